"""The trainer as a process: kill -9 and resume exactly once; 2 gloo ranks == 1 process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load

from .conftest import scored_pairs, synthetic_tokens, upload_shards

pytestmark = pytest.mark.stack
REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 240


def _trainer(stack, tiny_model, tmp_path, run_name, prefix, *extra, nproc: int = 1, check: bool = True):
    env = {**os.environ, **stack.env(), "OMP_NUM_THREADS": "1", "OFFDPO_TRAINER_PROGRESS": "false"}
    launcher = (
        [sys.executable, "-m", "services.trainer"]
        if nproc == 1
        else [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            "services.trainer",
        ]
    )
    cmd = launcher + [
        "--save-dtype",
        "float32",
        "--model",
        str(tiny_model),
        "--run-name",
        run_name,
        "--prefix",
        prefix,
        "--log-dir",
        str(tmp_path / "runs"),
        "--warmup-steps",
        "2",
        "--lr",
        "1e-3",
        "--global-batch-size",
        "4",
        "--micro-batch-size",
        "2",
        *extra,
    ]
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"trainer did not finish within {TIMEOUT_S} s: {' '.join(cmd)}\n{out[-3000:]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if check:
        assert proc.returncode == 0, f"trainer exited {proc.returncode}:\n{out[-5000:]}"
    return proc.returncode, out


def _jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line]


def _final_weights(store, run_name):
    """The exported model of the run's last checkpoint, in float32 (_trainer's --save-dtype): the
    comparisons below are of training, not of bfloat16 rounding."""
    prefix = json.loads(store.get_bytes(f"runs/{run_name}/latest"))["prefix"]
    return load(store.get_bytes(f"{prefix}/model/model.safetensors"))


def test_kill9_and_resume_trains_each_pair_exactly_once(stack, store, tiny_model, ref_fp, tmp_path, unique):
    rows = scored_pairs(tiny_model, synthetic_tokens(20, seed=11), ref_fp)
    upload_shards(store, rows, ref_fp, f"resume-{unique}", per_shard=7)
    prefix = f"scores/{ref_fp.fingerprint_id}/resume-{unique}/"
    common = ["--epochs", "2", "--save-every", "3"]  # 5 steps per epoch, 10 in all
    _trainer(stack, tiny_model, tmp_path, f"straight-{unique}", prefix, *common)

    crashed = f"crashed-{unique}"
    # SIGKILL (kill -9) itself right after step 7: mid-epoch 2, one step after the step-6 checkpoint.
    rc, out = _trainer(
        stack, tiny_model, tmp_path, crashed, prefix, *common, "--fault-kill-after-step", "7", check=False
    )
    assert rc == -signal.SIGKILL, f"expected the trainer to die of SIGKILL, got {rc}:\n{out[-3000:]}"
    assert json.loads(store.get_bytes(f"runs/{crashed}/latest"))["step"] == 6
    _trainer(stack, tiny_model, tmp_path, crashed, prefix, *common)  # the same command resumes

    straight = _jsonl(tmp_path / "runs" / f"straight-{unique}" / "trained_pairs.jsonl")
    resumed = _jsonl(tmp_path / "runs" / crashed / "trained_pairs.jsonl")
    assert [r["step"] for r in resumed] == list(range(1, 11))
    ids = [p for r in resumed for p in r["pair_ids"]]
    assert sorted(ids) == sorted([r.pair.pair_id for r in rows] * 2), "each pair exactly once per epoch"
    assert resumed == straight
    a, b = _final_weights(store, f"straight-{unique}"), _final_weights(store, crashed)
    assert a.keys() == b.keys()
    initial = load((Path(tiny_model) / "model.safetensors").read_bytes())
    assert any(not torch.equal(a[k], initial[k]) for k in a), "training moved the weights"
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), k


def test_two_gloo_ranks_match_one_process(stack, store, tiny_model, ref_fp, tmp_path, unique):
    rows = scored_pairs(tiny_model, synthetic_tokens(16, seed=12), ref_fp)
    upload_shards(store, rows, ref_fp, f"dist-{unique}", per_shard=8)
    prefix = f"scores/{ref_fp.fingerprint_id}/dist-{unique}/"
    # Global batch 4, micro 2: one process accumulates 2 micro-batches, two ranks take one each.
    _trainer(stack, tiny_model, tmp_path, f"one-{unique}", prefix, "--epochs", "1")
    _trainer(stack, tiny_model, tmp_path, f"two-{unique}", prefix, "--epochs", "1", nproc=2)
    one = _jsonl(tmp_path / "runs" / f"one-{unique}" / "metrics.jsonl")
    two = _jsonl(tmp_path / "runs" / f"two-{unique}" / "metrics.jsonl")
    assert len(one) == len(two) == 4
    for a, b in zip(one, two):
        for k in ("loss", "rewards/margins", "rewards/chosen", "logps/chosen", "grad_norm", "lr"):
            assert abs(a[k] - b[k]) < 1e-5, (a["step"], k, a[k], b[k])
    state = json.loads(
        store.get_bytes(json.loads(store.get_bytes(f"runs/two-{unique}/latest"))["prefix"] + "/state.json")
    )
    assert state["world_size"] == 2


def test_fsdp_two_gloo_ranks_match_one_process_across_a_kill_and_resume(
    stack, store, tiny_model, ref_fp, tmp_path, unique
):
    """FSDP2 shards weights, gradients and AdamW state; its checkpoints gather them to rank 0 in the same
    layout as one process's, and a resume shards them again. Two ranks killed after step 3 and resumed
    from the step-2 checkpoint end where one uninterrupted process does."""
    rows = scored_pairs(tiny_model, synthetic_tokens(16, seed=13), ref_fp)
    upload_shards(store, rows, ref_fp, f"fsdp-{unique}", per_shard=8)
    prefix = f"scores/{ref_fp.fingerprint_id}/fsdp-{unique}/"
    common = ["--epochs", "1", "--save-every", "2"]  # 4 steps
    _trainer(stack, tiny_model, tmp_path, f"one-{unique}", prefix, *common)
    sharded = f"fsdp-{unique}"
    rc, out = _trainer(
        stack,
        tiny_model,
        tmp_path,
        sharded,
        prefix,
        *common,
        "--distributed",
        "fsdp",
        "--fault-kill-after-step",
        "3",
        nproc=2,
        check=False,
    )
    assert rc != 0 and json.loads(store.get_bytes(f"runs/{sharded}/latest"))["step"] == 2, out[-3000:]
    _, out = _trainer(stack, tiny_model, tmp_path, sharded, prefix, *common, "--distributed", "fsdp", nproc=2)
    assert "resumed from" in out
    one = _jsonl(tmp_path / "runs" / f"one-{unique}" / "metrics.jsonl")
    two = _jsonl(tmp_path / "runs" / sharded / "metrics.jsonl")
    assert [r["step"] for r in two] == [1, 2, 3, 4]
    for a, b in zip(one, two):
        for k in ("loss", "rewards/margins", "logps/chosen", "grad_norm", "lr"):
            # float32 sums in another order (reduce-scatter over ranks): relative, not absolute
            assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-5), (a["step"], k, a[k], b[k])
    a, b = _final_weights(store, f"one-{unique}"), _final_weights(store, sharded)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5, rtol=0), k
    state = json.loads(store.get_bytes(json.loads(store.get_bytes(f"runs/{sharded}/latest"))["prefix"] + "/state.json"))
    assert state["world_size"] == 2 and state["config"]["distributed"] == "fsdp"
