"""The training loop end to end on the local stack: learning, refusals, continuous mode."""

from __future__ import annotations

import json

import pytest

from offdpo.kafka import ensure_topics, make_producer, read_topic
from offdpo.records import DeadLetter, ShardReady, scored_pairs_to_parquet, shard_key
from services.trainer.config import TrainerConfig
from services.trainer.shards import DataError
from services.trainer.stream import TrainedShards
from services.trainer.train import run

from .conftest import reference_fingerprint, scored_pairs, synthetic_tokens, upload_shards

pytestmark = pytest.mark.stack


def _cfg(tiny_model, tmp_path, **kw) -> TrainerConfig:
    base = dict(
        model=str(tiny_model),
        log_dir=str(tmp_path / "runs"),
        progress=False,
        warmup_steps=0,
        min_lr_ratio=1.0,
        global_batch_size=8,
        micro_batch_size=4,
    )
    base.update(kw)
    return TrainerConfig(**base)


def _metrics(tmp_path, run_name):
    path = tmp_path / "runs" / run_name / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_learns_synthetic_preferences(stack, store, tiny_model, ref_fp, tmp_path, unique):
    rows = scored_pairs(tiny_model, synthetic_tokens(32, seed=1), ref_fp)
    upload_shards(store, rows, ref_fp, f"learn-{unique}", per_shard=16)
    cfg = _cfg(
        tiny_model,
        tmp_path,
        run_name=f"learn-{unique}",
        prefix=f"scores/{ref_fp.fingerprint_id}/learn-{unique}/",
        epochs=10,
        lr=3e-3,
        beta=0.1,
        save_every=1000,
    )
    summary = run(cfg, stack.s3, stack.kafka)
    rows = _metrics(tmp_path, cfg.run_name)
    assert summary["step"] == len(rows) == 40
    assert rows[0]["rewards/margins"] == pytest.approx(0, abs=1e-4)
    best = max(r["rewards/accuracies"] for r in rows)
    assert best > 0.9, [round(r["rewards/accuracies"], 2) for r in rows]
    assert rows[-1]["rewards/accuracies"] > 0.9 and rows[-1]["rewards/margins"] > 0
    assert rows[-1]["loss"] < rows[0]["loss"]
    for key in (
        "loss",
        "rewards/chosen",
        "rewards/rejected",
        "logps/chosen",
        "logps/rejected",
        "grad_norm",
        "lr",
        "tokens_per_s",
    ):
        assert key in rows[-1]
    # Each pair exactly once per epoch; checkpoint, plot and logs are in S3.
    trained = [
        json.loads(line) for line in (tmp_path / "runs" / cfg.run_name / "trained_pairs.jsonl").read_text().splitlines()
    ]
    ids = [p for t in trained for p in t["pair_ids"]]
    assert len(ids) == 320 and len(set(ids)) == 32
    assert (tmp_path / "runs" / cfg.run_name / "curves.png").stat().st_size > 1000
    prefix = f"runs/{cfg.run_name}"
    assert json.loads(store.get_bytes(f"{prefix}/latest"))["step"] == 40
    keys = store.list_keys(f"{prefix}/checkpoints/step-00000040/")
    assert f"{prefix}/checkpoints/step-00000040/model/model.safetensors" in keys
    assert f"{prefix}/checkpoints/step-00000040/optimizer.safetensors" in keys
    assert store.exists(f"{prefix}/curves.png")


def _no_checkpoint(store, run_name):
    assert store.list_keys(f"runs/{run_name}/") == [], "nothing may be trained or saved on refused data"


def test_refuses_mismatched_fingerprint(stack, store, tiny_model, tmp_path, unique):
    other = reference_fingerprint(tiny_model, model_id="some-other-model")
    other.dtype = "bfloat16"
    from offdpo.records import with_fingerprint_id

    other = with_fingerprint_id(other)
    rows = scored_pairs(tiny_model, synthetic_tokens(4, seed=2), other)
    keys = upload_shards(store, rows, other, f"fp-{unique}", per_shard=4)
    cfg = _cfg(tiny_model, tmp_path, run_name=f"fp-{unique}", prefix=f"scores/{other.fingerprint_id}/fp-{unique}/")
    with pytest.raises(DataError) as err:
        run(cfg, stack.s3, stack.kafka)
    msg = str(err.value)
    assert keys[0] in msg and "model_id" in msg and "dtype" in msg and "--allow-fingerprint" in msg, msg
    _no_checkpoint(store, cfg.run_name)
    # The deliberate override trains on it.
    cfg2 = _cfg(
        tiny_model,
        tmp_path,
        run_name=f"fp-ok-{unique}",
        prefix=cfg.prefix,
        allow_fingerprint=(other.fingerprint_id,),
        save_every=1000,
    )
    assert run(cfg2, stack.s3, stack.kafka)["step"] == 1


def test_refuses_over_long_record_unless_truncation_configured(stack, store, tiny_model, ref_fp, tmp_path, unique):
    tokens = synthetic_tokens(4, seed=3, min_len=3, max_len=5)
    name, prompt, chosen, rejected = tokens[2]
    tokens[2] = (name, prompt, chosen + [101] * 40, rejected)
    rows = scored_pairs(tiny_model, tokens, ref_fp)
    keys = upload_shards(store, rows, ref_fp, f"long-{unique}", per_shard=4)
    prefix = f"scores/{ref_fp.fingerprint_id}/long-{unique}/"
    cfg = _cfg(tiny_model, tmp_path, run_name=f"long-{unique}", prefix=prefix, max_length=32)
    with pytest.raises(DataError) as err:
        run(cfg, stack.s3, stack.kafka)
    msg = str(err.value)
    assert rows[2].pair.pair_id in msg and keys[0] in msg and "--max-length 32" in msg, msg
    _no_checkpoint(store, cfg.run_name)
    cfg2 = _cfg(
        tiny_model,
        tmp_path,
        run_name=f"long-ok-{unique}",
        prefix=prefix,
        max_length=32,
        truncation="truncate_answers",
        save_every=1000,
    )
    assert run(cfg2, stack.s3, stack.kafka)["step"] == 1


def test_refuses_corrupt_shard(stack, store, tiny_model, ref_fp, tmp_path, unique):
    rows = scored_pairs(tiny_model, synthetic_tokens(4, seed=4), ref_fp)
    upload_shards(store, rows, ref_fp, f"bad-{unique}", per_shard=4)
    bad_key = shard_key(ref_fp.fingerprint_id, f"bad-{unique}", 1, 0, 3)
    store.put_bytes(bad_key, scored_pairs_to_parquet(rows, ref_fp)[:-100])  # truncated upload
    cfg = _cfg(tiny_model, tmp_path, run_name=f"bad-{unique}", prefix=f"scores/{ref_fp.fingerprint_id}/bad-{unique}/")
    with pytest.raises(DataError) as err:
        run(cfg, stack.s3, stack.kafka)
    assert bad_key in str(err.value) and "Parquet" in str(err.value), str(err.value)
    _no_checkpoint(store, cfg.run_name)


def _announce(producer, topic, bucket, key, rows, fp):
    event = ShardReady(bucket=bucket, object_key=key, row_count=len(rows), pair_ids=[r.pair.pair_id for r in rows])
    event.fingerprint.CopyFrom(fp)
    producer.send(topic, key=key.encode(), value=event.SerializeToString())


def test_continuous_mode_dedups_deadletters_and_commits(stack, store, tiny_model, ref_fp, tmp_path, unique):
    import dataclasses

    kafka = dataclasses.replace(stack.kafka, shards_topic=f"shards-{unique}", deadletter_topic=f"dl-{unique}")
    ensure_topics(kafka, [kafka.shards_topic, kafka.deadletter_topic], partitions=1)
    rows = scored_pairs(tiny_model, synthetic_tokens(12, seed=5), ref_fp)
    good = upload_shards(store, rows, ref_fp, f"cont-{unique}", per_shard=6)
    other = reference_fingerprint(tiny_model, model_id="another")
    bad_rows = scored_pairs(tiny_model, synthetic_tokens(2, seed=6), other)
    mismatched = upload_shards(store, bad_rows, other, f"cont-{unique}", per_shard=2)[0]
    corrupt = shard_key(ref_fp.fingerprint_id, f"cont-{unique}", 9, 0, 1)
    store.put_bytes(corrupt, b"not a parquet file")
    producer = make_producer(kafka, "test")
    _announce(producer, kafka.shards_topic, store.bucket, good[0], rows[:6], ref_fp)
    _announce(producer, kafka.shards_topic, store.bucket, mismatched, bad_rows, other)
    _announce(producer, kafka.shards_topic, store.bucket, good[0], rows[:6], ref_fp)  # announced twice
    _announce(producer, kafka.shards_topic, store.bucket, corrupt, bad_rows, ref_fp)
    _announce(producer, kafka.shards_topic, store.bucket, good[1], rows[6:], ref_fp)
    producer.send(kafka.shards_topic, value=b"\xff garbage")
    producer.flush()
    cfg = _cfg(
        tiny_model,
        tmp_path,
        run_name=f"cont-{unique}",
        mode="continuous",
        stop_when_idle_s=3.0,
        global_batch_size=4,
        poll_timeout_ms=300,
    )
    summary = run(cfg, stack.s3, kafka)
    trained = [
        json.loads(line) for line in (tmp_path / "runs" / cfg.run_name / "trained_pairs.jsonl").read_text().splitlines()
    ]
    ids = [p for t in trained for p in t["pair_ids"]]
    assert sorted(ids) == sorted(r.pair.pair_id for r in rows), "each good pair exactly once, nothing else"
    assert summary["step"] == 3
    letters = [DeadLetter.FromString(r.value) for r in read_topic(kafka, kafka.deadletter_topic, timeout_s=30)]
    reasons = {letter.error_type: letter.reason for letter in letters}
    assert set(reasons) == {"fingerprint_mismatch", "corrupt_shard", "decode_error"}, reasons
    assert mismatched in reasons["fingerprint_mismatch"] and "model_id" in reasons["fingerprint_mismatch"]
    assert corrupt in reasons["corrupt_shard"]
    state_prefix = json.loads(store.get_bytes(f"runs/{cfg.run_name}/latest"))["prefix"]
    state = json.loads(store.get_bytes(f"{state_prefix}/state.json"))
    trained_shards = TrainedShards()
    trained_shards.load(state["data"]["trained_shards"])
    assert all(key in trained_shards for key in good)
    assert mismatched not in trained_shards and corrupt not in trained_shards
    # Offsets were committed after the checkpoint: a restart of the same run finds nothing new.
    summary2 = run(cfg, stack.s3, kafka)
    assert summary2["step"] == 3
