"""The training loop in-process over an in-memory object store (replay mode needs no broker): the
held-out evaluation, the skip of non-finite steps, and the read-only rule for model folders."""

from __future__ import annotations

import json
import shutil
import urllib.request

import pytest
import torch
from safetensors.torch import load

from localdev.process import free_port
from localdev.testmodel import build_test_model, tree_digest
from services.trainer import train
from services.trainer.config import TrainerConfig
from services.trainer.examples import is_heldout
from services.trainer.metrics import EVAL_KEYS
from tests.fakes import FakeObjectStore

from .conftest import reference_fingerprint, scored_pairs, synthetic_tokens, upload_shards


@pytest.fixture
def fake_store(monkeypatch):
    store = FakeObjectStore()
    monkeypatch.setattr(train, "ObjectStore", lambda cfg: store)
    return store


def _cfg(model, tmp_path, **kw) -> TrainerConfig:
    base = dict(
        model=str(model),
        run_name="inproc",
        prefix="scores/",
        log_dir=str(tmp_path / "runs"),
        progress=False,
        warmup_steps=0,
        min_lr_ratio=1.0,
        global_batch_size=8,
        micro_batch_size=4,
        lr=1e-3,
    )
    base.update(kw)
    return TrainerConfig(**base)


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def test_heldout_pairs_are_evaluated_every_n_steps_and_never_trained(fake_store, tiny_model, tmp_path):
    before = tree_digest(tiny_model)
    fp = reference_fingerprint(tiny_model)
    rows = scored_pairs(tiny_model, synthetic_tokens(40, seed=21), fp)
    upload_shards(fake_store, rows, fp, "evaltopic", per_shard=10)
    port = free_port()
    cfg = _cfg(tiny_model, tmp_path, epochs=2, eval_fraction=0.25, eval_every=2, metrics_port=port)
    summary = train.run(cfg)
    heldout = {r.pair.pair_id for r in rows if is_heldout(r.pair.pair_id, 0.25)}
    assert heldout, "the seed gives a non-empty held-out split"
    run_dir = tmp_path / "runs" / cfg.run_name
    trained = [p for line in _jsonl(run_dir / "trained_pairs.jsonl") for p in line["pair_ids"]]
    assert set(trained).isdisjoint(heldout) and set(trained) | heldout == {r.pair.pair_id for r in rows}
    lines = _jsonl(run_dir / "metrics.jsonl")
    evals = [r for r in lines if "eval/loss" in r]
    steps = [r for r in lines if "loss" in r]
    assert len(steps) == summary["step"]
    assert [r["step"] for r in evals] == list(range(2, summary["step"] + 1, 2)) + (
        [summary["step"]] if summary["step"] % 2 else []
    )
    for r in evals:
        assert set(EVAL_KEYS) <= set(r) and r["eval/pairs"] == len(heldout)
    assert evals[0]["eval/rewards/margins"] != evals[-1]["eval/rewards/margins"], "the policy moved"
    assert all("skipped_nonfinite_steps" in r for r in steps)
    assert (run_dir / "curves.png").stat().st_size > 1000
    scraped = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    for name in (
        "offdpo_trainer_eval_loss",
        "offdpo_trainer_eval_rewards_accuracies",
        "offdpo_trainer_infra_errors_total",
    ):
        assert name in scraped, name
    assert tree_digest(tiny_model) == before, "training never writes into the model folder"
    # The resolved configuration goes with the checkpoint, and reruns the same run (issue 32).
    prefix = json.loads(fake_store.get_bytes(f"runs/{cfg.run_name}/latest"))["prefix"]
    saved = tmp_path / "config.yaml"
    saved.write_bytes(fake_store.get_bytes(f"{prefix}/config.yaml"))
    rerun, _ = train.parse_args(["--config", str(saved)])
    assert rerun == cfg


def test_a_step_whose_loss_is_not_finite_is_skipped_counted_and_never_checkpointed(fake_store, tiny_model, tmp_path):
    fp = reference_fingerprint(tiny_model)
    good = scored_pairs(tiny_model, synthetic_tokens(8, seed=22), fp)
    bad = scored_pairs(tiny_model, synthetic_tokens(8, seed=23), fp)
    for r in bad:  # each value finite (it passes the poison checks), their float32 sum is not
        r.chosen_logprobs[:] = [-3e38] * len(r.chosen_logprobs)
        r.chosen_logprob_sum = float("-inf")
    upload_shards(fake_store, good, fp, "a-good", per_shard=8)
    upload_shards(fake_store, bad, fp, "b-bad", per_shard=8)
    cfg = _cfg(tiny_model, tmp_path, epochs=1, shuffle_pairs=1)  # one shard per window: batches stay pure
    summary = train.run(cfg)
    assert summary["skipped_nonfinite_steps"] == 1 and summary["step"] == 1
    run_dir = tmp_path / "runs" / cfg.run_name
    (skipped,) = _jsonl(run_dir / "skipped_pairs.jsonl")
    assert sorted(skipped["pair_ids"]) == sorted(r.pair.pair_id for r in bad) and "not finite" in skipped["reason"]
    prefix = json.loads(fake_store.get_bytes("runs/inproc/latest"))["prefix"]
    weights = load(fake_store.get_bytes(f"{prefix}/model/model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_a_users_model_folder_is_read_only_to_the_trainer_and_the_benchmark(tmp_path, fake_store):
    from transformers import AutoTokenizer

    from bench import trainer as bench_trainer

    model = build_test_model(tmp_path / "users-model", size="tiny")
    (model / "offdpo_model.json").unlink()  # a real model: nothing says the project built it
    before = tree_digest(model)
    assert bench_trainer.resolve_model(model, "tiny") == model
    cfg = _cfg(model, tmp_path)
    train.load_policy(model, cfg, "cpu")
    AutoTokenizer.from_pretrained(model)
    train.expected_fingerprint(cfg)
    assert train.model_vocab_size(model) == json.loads((model / "config.json").read_text())["vocab_size"]
    fp = reference_fingerprint(model)
    upload_shards(fake_store, scored_pairs(model, synthetic_tokens(8, seed=24), fp), fp, "ro", per_shard=8)
    train.run(cfg)  # a whole run, checkpoints included
    assert tree_digest(model) == before, "every file of the model folder is byte-identical"

    not_a_model = tmp_path / "not-a-model"
    not_a_model.mkdir()
    (not_a_model / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="not a model directory"):
        bench_trainer.resolve_model(not_a_model, "tiny")
    assert [p.name for p in not_a_model.iterdir()] == ["notes.txt"]
    shutil.rmtree(not_a_model)
