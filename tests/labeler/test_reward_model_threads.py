"""Reward models loaded by labelers in threads of one process leave transformers as they found it.

transformers' from_pretrained swaps process-wide attributes for the length of a load (weight tying,
torch's init functions, torch.linspace) and puts back what it saw on entry. Loads overlapping in
threads put back each other's stand-ins: weight tying stayed off for the rest of the process, so the
next tied causal LM (the review reference, a trained checkpoint) loaded with an uninitialised lm_head
and sampling from it raised "probability tensor contains inf/nan" (the learning demo and test, whose
labelers run in threads). Without the load lock in services/labeler/reward.py one round of 8 threads
failed 5 runs of 6 (the overlap is a race); two rounds are loaded here.
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from services.labeler.reward import RewardModel

ASSETS = Path(__file__).resolve().parent.parent.parent / "assets" / "models"


def _asset(prefix: str) -> Path:
    (path,) = [p for p in ASSETS.iterdir() if p.is_dir() and p.name.startswith(prefix)]
    return path


def test_reward_models_loaded_in_threads_leave_weight_tying_working():
    reward_dir = _asset("reviews-reward-")
    reference_dir = next(p for p in ASSETS.iterdir() if p.is_dir() and not p.name.startswith("reviews-reward-"))
    tie_weights, linspace = PreTrainedModel.tie_weights, torch.linspace
    threads = 8
    errors: list[BaseException] = []
    for _round in range(2):
        start = threading.Barrier(threads)  # all loads begin together: they overlap

        def load(start: threading.Barrier = start) -> None:
            try:
                start.wait(timeout=60)
                RewardModel(reward_dir)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        workers = [threading.Thread(target=load) for _ in range(threads)]
        for t in workers:
            t.start()
        for t in workers:
            t.join(timeout=300)
        assert not any(t.is_alive() for t in workers), "a reward-model load did not finish in 300 s"
    assert not errors, errors
    assert PreTrainedModel.tie_weights is tie_weights, "weight tying left disabled process-wide"
    assert torch.linspace is linspace, "torch.linspace left patched process-wide"

    # What went wrong downstream: the tied reference loads whole and samples from finite probabilities.
    model, info = AutoModelForCausalLM.from_pretrained(reference_dir, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"], info
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([[1, 5, 6, 7]])).logits
    assert torch.isfinite(logits).all()
