"""The benchmarks' own logic: workload shape, FLOP count, target verdicts, and the GPU script runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from bench.refscore import ANSWER_TOKENS, PROMPT_TOKENS, make_pairs, model_flops, targets

REPO = Path(__file__).resolve().parent.parent


def test_workload_is_deterministic_with_the_stated_lengths(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    pairs = make_pairs(tok, 40, seed=3)
    assert pairs == make_pairs(tok, 40, seed=3) and pairs != make_pairs(tok, 40, seed=4)
    # Lengths are cut in tokens, then decoded; re-encoding may merge a few tokens at the cut.
    prompt_lens = [len(tok(p[1][1], add_special_tokens=False).input_ids) for p, _, _ in pairs]
    answer_lens = [len(tok(a, add_special_tokens=False).input_ids) for _, c, r in pairs for a in (c, r)]
    assert PROMPT_TOKENS[0] - 3 <= min(prompt_lens) and max(prompt_lens) <= PROMPT_TOKENS[1]
    assert ANSWER_TOKENS[0] - 3 <= min(answer_lens) and max(answer_lens) <= ANSWER_TOKENS[1]
    assert max(answer_lens) > 3 * sorted(answer_lens)[len(answer_lens) // 2], "a long tail"


def test_flop_count_matches_the_model(tiny_model):
    import torch
    from transformers import AutoModelForCausalLM

    params, linear, flop = model_flops(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert params == sum(p.numel() for p in model.parameters())
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert linear == matmul  # lm_head is tied to the embedding: counted once, as a matmul
    cfg = model.config
    q_dim = cfg.hidden_size  # num_attention_heads x head_dim for these models
    assert flop(10) == 2 * linear * 10 + 2 * cfg.num_hidden_layers * q_dim * 10 * 11


def test_target_verdicts():
    by_model = {
        "bench": {
            "float32": {
                "speedup_vs_openai": 3.2,
                "speedup_vs_transformers": 0.9,
                "fraction_of_ceiling": {"refscore": 0.61},
                "stream_vs_grpc": 0.5,
            },
            "bfloat16": {"speedup_vs_openai": 2.0, "vs_float32": {"max_abs_token_diff": 0.01}},
        }
    }
    verdicts = {t["target"].split(":")[0] + ":" + t["wanted"]: t["met"] for t in targets(by_model)}
    assert verdicts == {
        "bench float32:>= 3": True,
        "bench float32:>= 1.0": False,
        "bench float32:>= 0.6": True,
        "bench bfloat16:>= 10": False,
        "bench bfloat16:<= 0.05": True,
        "tiny float32:>= 5": None,
        "bench float32:>= 0.8": False,
    }


@pytest.mark.engine
def test_gpu_script_runs_on_any_device(tiny_model, tmp_path):
    out = tmp_path / "gpu.json"
    subprocess.run(
        [sys.executable, "bench/gpu.py", "--size", "tiny", "--dtype", "float32", "--pairs", "4", "--out", str(out)],
        cwd=REPO,
        check=True,
        capture_output=True,
        timeout=600,
    )
    result = json.loads(out.read_text())
    assert result["items"] == 8 and result["tokens_per_s"]["refscore_transformers_engine"] > 0
    assert 0 < result["fraction_of_peak"]["transformers"] < 1
    assert result["max_abs_token_diff_engine_vs_forward"] < 1e-4  # the engine and (c) agree in float32
