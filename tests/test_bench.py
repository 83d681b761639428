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


def _learning_point(reward: float, kl: float, step: int = 100, **extra) -> dict:
    return {
        "step": step,
        "positive_share": 0.5 + reward,
        "positive_share_se": 0.02,
        "reward_mean": reward,
        "reward_se": 0.01,
        "kl": kl,
        "kl_se": 0.1,
        "consistency": 0.8,
        "heldout_accuracy": 0.9,
        **extra,
    }


def test_learning_summary_compares_seed_means_with_trl_in_standard_errors(tmp_path):
    from bench.learning import plot, summary_of

    head = _learning_point(0.20, 1.0)
    result = {
        "reference": _learning_point(0.0, 0.0, step=0),
        "headline": head,
        "headline_run": {"beta": 0.5, "lr": 1e-4, "steps": 100, "batch": 32},
        "ours_seeds": [dict(head, seed=s) for s in range(3)],
        "trl": {"runs": [_learning_point(0.19, 1.25, seed=s) for s in range(3)]},
        "sweep": [{"name": "beta0.5", "beta": 0.5, "lr": 1e-4, "points": [_learning_point(0.1, 0.5, 50), head]}],
        "best_of_n": [dict(_learning_point(0.1, 0.19), n=2)],
        "generation_logprobs": {"runs": [_learning_point(0.2, 1.1)]},
    }
    s = summary_of(result)
    assert s["reward_gain_se"] == round(0.20 / (2**0.5 * 0.01), 1)
    # three seeds each side: the mean's SE is 0.01/sqrt(3); the difference's is sqrt(2) times that
    assert s["trl_reward_diff_se"] == pytest.approx(0.01 / (0.01 / 3**0.5 * 2**0.5), abs=0.01)
    assert s["trl_kl_ratio"] == 0.8
    plot(result, tmp_path / "learning.png")
    assert (tmp_path / "learning.png").stat().st_size > 10_000


def _rounds_report(points: list[tuple[float, float, float]], pairs: int) -> dict:
    """An `offdpo rounds` report: one (reward, KL to the base, KL to the round's reference) per round."""
    return {
        "run_name": "r",
        "rounds": [
            {
                "round": i + 1,
                "pairs_scored": pairs,
                "trainer": {"steps": pairs // 8},
                "eval_vs_base": {"reward_mean": rw, "reward_se": 0.01, "positive_share": 0.5, "kl": kl, "kl_se": 0.1},
                "eval_vs_round_reference": {"kl": kl_round, "kl_se": 0.1},
                "reference_fingerprint": {"fingerprint_id": f"fp{i}"},
                "final_checkpoint": f"s3://b/runs/r-round-{i + 1}/checkpoints/step-1/model/",
                "wall_s": 1.0,
            }
            for i, (rw, kl, kl_round) in enumerate(points)
        ],
    }


def test_rounds_verdict_compares_the_last_round_with_the_single_pass_and_keeps_the_learning_plot(tmp_path):
    from bench.learning import plot
    from bench.rounds import _arm, verdict

    rounds = _arm(_rounds_report([(0.05, 0.4, 0.4), (0.10, 0.9, 0.5), (0.15, 1.5, 0.6)], 200))
    single = _arm(_rounds_report([(0.12, 1.0, 1.0)], 600))
    v = verdict(rounds, single)
    assert v["last_round_reward_minus_single_pass"] == pytest.approx(0.03)
    assert v["difference_in_se"] == pytest.approx(0.03 / (2**0.5 * 0.01), abs=0.01)
    assert v["max_kl_per_round"] == 0.6 and v["reward_above_single_pass"] and v["kl_per_round_not_above_single_pass"]
    worse = verdict(_arm(_rounds_report([(0.05, 0.4, 1.4), (0.11, 1.9, 1.5)], 300)), single)
    assert not worse["reward_above_single_pass"] and not worse["kl_per_round_not_above_single_pass"]

    head = _learning_point(0.20, 1.0)
    result = {
        "reference": _learning_point(0.0, 0.0, step=0),
        "sweep": [{"name": "beta0.5", "beta": 0.5, "lr": 1e-4, "points": [head]}],
        "rounds": {
            "settings": {"prompts": 200},
            "base": {"reward_mean": 0.0, "reward_se": 0.01},
            "rounds_arm": rounds,
            "single_pass_arm": single,
        },
    }
    plot(result, tmp_path / "learning.png")
    assert (tmp_path / "learning.png").stat().st_size > 10_000


# -- the trainer benchmark (bench/trainer.py) ----------------------------------------------------------------
def test_trainer_workloads_are_deterministic_with_real_shapes():
    from bench.trainer import padding_waste, workload_batches

    vocab = 151936
    chat = workload_batches("chat_like", 8, 8, vocab)
    assert [[e.chosen for e in b] for b in chat] == [
        [e.chosen for e in b] for b in workload_batches("chat_like", 8, 8, vocab)
    ]
    pairs = [e for b in chat for e in b]
    assert all(50 <= len(e.prompt) <= 600 and 20 <= len(e.chosen) <= 1500 for e in pairs)
    answers = sorted(len(a) for e in pairs for a in (e.chosen, e.rejected))
    assert answers[-1] > 3 * answers[len(answers) // 2], "a long tail"
    assert sum(len(e.chosen) != len(e.rejected) for e in pairs) > len(pairs) // 2
    ids = [t for e in pairs for t in e.chosen]
    assert max(ids) > 0.9 * vocab and min(ids) < 0.1 * vocab, "ids spread over the whole vocabulary"
    long = [e for b in workload_batches("long_prompt", 4, 4, vocab) for e in b]
    assert all(1000 <= len(e.prompt) <= 3000 and 50 <= len(e.rejected) <= 400 for e in long)
    waste = padding_waste(chat)
    assert waste["packed_segments"] == 0.0 and waste["packed"] < min(0.1, waste["shared_prefix"])
    assert waste["padded"] > 0.2


def test_trainer_headline_ratios_and_verdicts():
    from bench.trainer import TARGETS, headline

    def e(tps, mem=1):
        return {"tokens_per_s": tps, "peak_mem_bytes": mem}

    by = {
        "chat_like": {
            "offline_dpo": e(100),
            "offline_dpo_shared_prefix": e(110),
            "offline_dpo_packed": e(150, 2),
            "sft": e(155),
            "trl_precompute": e(90, 5),
            "trl_live_ref": e(70),
        },
        "long_prompt": {"offline_dpo": e(100), "offline_dpo_shared_prefix": e(150)},
    }
    h = headline(by, {"chat_like": {"offline_dpo_packed": 0.4}})
    assert h["vs_trl_precompute"] == 150 / 90 and h["mem_vs_trl_precompute"] == 2 / 5
    assert h["shared_prefix_long_prompt"] == 1.5 and h["packing_chat_like"] == 150 / 110
    met = h["targets_met"]
    assert met["vs_trl_precompute"] and met["mem_vs_trl_precompute"] and met["vs_trl_live_ref"]
    assert met["shared_prefix_long_prompt"] and met["packing_chat_like"] and met["ratio_vs_sft"]
    assert met["fraction_of_ceiling"] is False and set(met) == set(TARGETS)
    assert h["mem_vs_trl_precompute_gc"] is None  # not measured: no ratio, never a made-up one


def test_trainer_method_variants():
    from bench.trainer import bf16_native, variant

    assert bf16_native({"fp32": 458.0, "bf16": 964.0}) and not bf16_native({"fp32": 175.0, "bf16": 21.5})

    assert variant("offline_dpo_packed") == ("offline_dpo_packed", False, False)
    assert variant("trl_precompute_bf16") == ("trl_precompute", True, False)
    assert variant("offline_dpo_packed_gc") == ("offline_dpo_packed", False, True)
    assert variant("trl_precompute_bf16_gc") == ("trl_precompute", True, True)


def test_trainer_bench_quick_runs(tmp_path):
    out = tmp_path / "trainer.json"
    cmd = [sys.executable, "-m", "bench.trainer", "--quick", "--workloads", "chat_like"]
    cmd += ["--out", str(out), "--tmp", str(tmp_path)]
    # Two invocations, the second merged into the first's file (a run cut short, finished later).
    for methods, merge in (("offline_dpo_packed", []), ("trl_precompute", ["--merge"])):
        proc = subprocess.run(
            cmd + ["--methods", methods, *merge], cwd=REPO, capture_output=True, text=True, timeout=1200
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert [run["status"] for run in res["merged_runs"]] == ["complete"]
    by = res["by_workload"]["chat_like"]
    assert {"offline_dpo_packed", "trl_precompute", "trl_precompute_incl_pass"} <= set(by)
    assert all(v["tokens_per_s"] > 0 and v["peak_mem_bytes"] > 0 for v in by.values())
    assert res["model"]["vocab_size"] > 0 and res["headline"]["vs_trl_precompute"] > 0
    assert 0 < res["fraction_of_ceiling"]["chat_like"]["offline_dpo_packed"] < 1
