"""Deterministic reproduction of what the broker-kill and S3-outage cases sometimes hit: the
continuous trainer's offset commit fails once (broker unreachable / group rebalancing after an
outage) right after a checkpoint is written. The trainer retries the commit with backoff (and defers
it to the next checkpoint if it keeps failing) instead of ending the run."""

from __future__ import annotations

import random

import pytest
from kafka.errors import KafkaTimeoutError, RebalanceInProgressError

import offdpo.kafka as okafka
from offdpo import records
from offdpo.kafka import make_producer
from offdpo.v1 import records_pb2
from tests.pairs import make_pairs

from .harness import Case

pytestmark = [pytest.mark.faults, pytest.mark.stack]


class _FlakyCommit:
    """A real KafkaConsumer whose first commit fails with `error` (broker down, or group rebalancing)."""

    def __init__(self, inner, error):
        self._inner, self.error, self.failures = inner, error, 0

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def commit(self, *args, **kwargs):
        if self.failures == 0:
            self.failures += 1
            raise self.error
        return self._inner.commit(*args, **kwargs)


@pytest.mark.parametrize(
    "error, handling",
    [
        (KafkaTimeoutError("injected: broker unreachable during the offset commit"), "retrying in"),
        # only the next poll completes a rebalance, so the commit waits for the next checkpoint, no sleep
        (RebalanceInProgressError("injected: the group is rebalancing"), "deferred to the next checkpoint"),
    ],
    ids=["broker_down", "rebalance"],
)
def test_continuous_trainer_survives_a_failed_offset_commit(
    stack, tiny_model, tmp_path, unique, monkeypatch, caplog, error, handling
):
    import logging

    from services.trainer.train import TrainerConfig, expected_fingerprint, run

    case = Case("trainer_commit", stack, tiny_model, tmp_path, unique)
    fp = expected_fingerprint(TrainerConfig(model=str(tiny_model)))
    rng = random.Random(unique)
    rows = []
    for pair in make_pairs(16, case.run_name):
        c, r = [rng.randrange(100, 120) for _ in range(4)], [rng.randrange(300, 320) for _ in range(4)]
        lc, lr = [-rng.random() - 1 for _ in c], [-rng.random() - 1 for _ in r]
        rows.append(
            records_pb2.ScoredPair(
                pair=pair,
                fingerprint=fp,
                prompt_token_ids=[1, 500, 501],
                chosen_token_ids=c,
                rejected_token_ids=r,
                chosen_logprobs=lc,
                rejected_logprobs=lr,
                chosen_logprob_sum=sum(lc),
                rejected_logprob_sum=sum(lr),
            )
        )
    key = records.shard_key(fp.fingerprint_id, case.kafka.pairs_topic, 0, 0, 15)
    data = records.scored_pairs_to_parquet(rows, fp)
    case.store.put_bytes(key, data)
    event = records_pb2.ShardReady(
        bucket=case.store.bucket,
        object_key=key,
        row_count=16,
        pair_ids=[r.pair.pair_id for r in rows],
        fingerprint=fp,
        sha256=records.sha256_hex(data),
    )
    producer = make_producer(case.kafka, "faults")
    producer.send(case.kafka.shards_topic, key=key.encode(), value=event.SerializeToString()).get(timeout=60)
    producer.close()

    flaky = []
    real = okafka.make_consumer
    monkeypatch.setattr(
        okafka, "make_consumer", lambda *a, **k: flaky.append(_FlakyCommit(real(*a, **k), error)) or flaky[-1]
    )
    caplog.set_level(logging.WARNING, logger="offdpo.trainer")
    cfg = TrainerConfig(
        model=str(tiny_model),
        run_name=case.run_name,
        mode="continuous",
        stop_when_idle_s=3,
        consumer_group=case.trainer_group,
        global_batch_size=8,
        micro_batch_size=8,
        save_every=1,
        log_dir=str(tmp_path / "trainer"),
        progress=False,
        poll_timeout_ms=300,
        warmup_steps=1,
    )
    summary = run(cfg, stack.s3, case.kafka)
    assert summary["step"] == 2 and flaky and flaky[0].failures == 1
    assert sorted(case.trained_ids()) == sorted(r.pair.pair_id for r in rows)
    assert any(handling in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]
    assert case.committed_all(case.trainer_group, case.kafka.shards_topic), "no later checkpoint committed the offsets"
