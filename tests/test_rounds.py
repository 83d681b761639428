"""`offdpo rounds` on the local stack (cli/rounds.py): two rounds of iterative DPO with the tiny test
model, a few pairs each, refscore on the transformers engine (the quickest to start; fingerprints
exclude the engine). Round 2's reference is round 1's final checkpoint, served by refscore straight
from S3: its pairs are scored under a fingerprint different from round 1's and equal to that
checkpoint's; each pair names the policy that generated it; the trainer of round 2 starts from round
1's weights (the policy equals its reference at its first step) and the run's metadata records
round, reference fingerprint and parent checkpoint."""

from __future__ import annotations

import json

from cli.rounds import RoundsSettings, run_rounds
from localdev.testmodel import ensure_test_model
from offdpo import records
from offdpo.fingerprint import weights_hash
from offdpo.s3 import ObjectStore
from services.trainer.checkpoint import read_state


def _rows(store: ObjectStore, prefix: str):
    return [row for key in store.list_keys(prefix) for row in records.read_shard(store.get_bytes(key), key).rows()]


def test_two_rounds_each_reference_is_the_previous_policy(stack, tiny_model, tmp_path_factory):
    reward = ensure_test_model(tmp_path_factory.mktemp("models") / "tiny-reward", size="tiny", kind="reward")
    settings = RoundsSettings(
        rounds=2,
        prompts=6,
        samples=2,
        strategy="reward_model",
        model=str(tiny_model),
        reward_model=str(reward),
        engine="transformers",
        beta=0.5,
        lr=5e-3,  # large, so round 1 moves the weights far enough to tell them from the base model's
        batch=2,
        epochs=1,
        warmup_steps=1,
        max_tokens=12,
        labelers=1,
        step_timeout_s=240,
    )
    workdir = tmp_path_factory.mktemp("rounds")
    report = run_rounds(settings, stack, workdir, say=print)
    store = ObjectStore(stack.s3)
    r1, r2 = report["rounds"]
    fp1, fp2 = r1["reference_fingerprint"], r2["reference_fingerprint"]

    # Round 1: the base model generates, is the reference, and is where training starts.
    assert r1["policy"] == r1["reference"] == str(tiny_model.resolve()) and r1["parent_checkpoint"] is None
    assert fp1["weights_hash"] == weights_hash(tiny_model)
    # Round 2: round 1's final checkpoint, from S3, is policy, reference and parent.
    ckpt1 = r1["final_checkpoint"]
    assert ckpt1.startswith(f"s3://{store.bucket}/runs/{r1['trainer_run']}/checkpoints/step-")
    assert r2["policy"] == r2["reference"] == r2["parent_checkpoint"] == ckpt1
    round1_weights = workdir / report["run_name"] / "policy-after-round-1"
    assert fp2["fingerprint_id"] != fp1["fingerprint_id"]
    assert fp2["weights_hash"] == weights_hash(round1_weights) != weights_hash(tiny_model)
    assert fp2["model_id"] == f"{r1['trainer_run']}@{ckpt1.rstrip('/').split('/')[-2]}"

    for meta, fp, policy in ((r1, fp1, r1["policy"]), (r2, fp2, ckpt1)):
        rows = _rows(store, meta["scores_prefix"])
        assert rows and len(rows) == meta["pairs_scored"] == meta["pairs_labelled"]
        for row in rows:
            assert row.fingerprint.fingerprint_id == fp["fingerprint_id"]
            prov = dict(row.pair.provenance.metadata)
            assert prov["round"] == str(meta["round"])
            assert prov["policy"] == policy
            assert prov["policy_fingerprint"] == fp["fingerprint_id"]  # on-policy: the generator is the reference

    # The trainer of round 2 started from round 1's weights against round 1's checkpoint as reference.
    state = read_state(store, r2["trainer"]["checkpoint"])
    assert state["fingerprint"] == fp2["fingerprint_id"]
    assert state["config"]["model"] == r2["start_weights"] == str(round1_weights)
    first = r2["trainer"]["first_step"]
    assert abs(first["rewards/chosen"]) < 1e-3 and abs(first["rewards/rejected"]) < 1e-3, first
    assert r2["trainer"]["steps"] >= 1 and r1["trainer"]["steps"] >= 1

    # The run's metadata: per round next to its checkpoints, and the whole run's record.
    saved = json.loads(store.get_bytes(f"runs/{r2['trainer_run']}/round.json"))
    assert (saved["round"], saved["parent_checkpoint"]) == (2, ckpt1)
    assert saved["reference_fingerprint"]["fingerprint_id"] == fp2["fingerprint_id"]
    whole = json.loads(store.get_bytes(f"runs/{report['run_name']}/rounds.json"))
    assert [r["round"] for r in whole["rounds"]] == [1, 2]
