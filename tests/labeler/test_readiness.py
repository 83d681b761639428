"""Issue 17: `consume`'s readiness reports a dependency outage it is waiting out (offdpo.health over a
real gRPC server on loopback). With the judge down, the service 'readiness' answers NOT_SERVING once
the outage has lasted OFFDPO_LABELER_OUTAGE_READY_S, and SERVING again once a batch goes through;
liveness ('') stays SERVING throughout, since the loop keeps going round (a restart would not bring the
judge back). The clock is the test's: each judge call moves it."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kafka.errors import KafkaTimeoutError

from offdpo.health import READINESS, LoopHealth, LoopHealthServer
from services.labeler.config import JudgeConfig, LabelerConfig
from services.labeler.errors import JudgeError
from services.labeler.judge import LLMJudgeStrategy
from services.labeler.runner import build_labeler, close_labeler, run_kafka
from tests.fakes import FakeBroker, FakeConsumer, FakeProducer

from .test_outages import FAST, KAFKA, FlakyJudge, WatchedConsumer, _letters, _pairs, _sets

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
READY_S = 60.0
STEP_S = 10.0  # fake seconds per judge call


def _check(port: int, service: str) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        req = health_pb2.HealthCheckRequest(service=service)
        return health_pb2_grpc.HealthStub(channel).Check(req, timeout=5).status


class ClockedJudge(FlakyJudge):
    """Down until the test clock reaches `up_at`; every call moves the clock and records what the
    probes see at that moment."""

    def __init__(self, up_at: float):
        super().__init__(fails=0)
        self.now, self.up_at = 1000.0, up_at
        self.port = 0
        self.seen: list[tuple[float, int, int]] = []  # (time, liveness, readiness)

    def clock(self) -> float:
        return self.now

    def complete(self, prompt, choices):
        self.seen.append((self.now, _check(self.port, ""), _check(self.port, READINESS)))
        self.now += STEP_S
        if self.now <= self.up_at:
            raise JudgeError("judge fake-judge at http://judge failed after 1 attempt(s): APIConnectionError")
        return super().complete(prompt, choices)


def test_judge_outage_turns_readiness_not_serving_after_the_outage_time_then_serving(tmp_path):
    broker = FakeBroker(partitions=1)
    sets = _sets(8)
    for cs in sets:
        broker.append(KAFKA.candidates_topic, cs.SerializeToString(), key=cs.set_id.encode())
    cfg = LabelerConfig(
        state_dir=str(tmp_path / "state"), batch_size=4, strategy="llm_judge", ledger=False, outage_ready_s=READY_S
    )
    judge = ClockedJudge(up_at=1000.0 + 200.0)  # the judge is down for 200 fake seconds
    strategy = LLMJudgeStrategy(judge, JudgeConfig(model="fake-judge", concurrency=1, max_retries=0), None)
    lab = build_labeler(cfg, KAFKA, producer=FakeProducer(broker), strategy_overrides={"llm_judge": strategy})
    health = LoopHealth("labeler-consume", cfg.stall_s, clock=judge.clock, outage_ready_s=cfg.outage_ready_s)
    reported: list[tuple[float, bool]] = []

    def report(down: bool) -> None:
        reported.append((judge.now, down))
        health.report_outage(down)

    consumer = FakeConsumer(broker, KAFKA.candidates_topic, group="labeler", max_poll_records=4)
    with LoopHealthServer(health, "127.0.0.1", 0, "OFFDPO_LABELER_HEALTH_PORT") as server:
        judge.port = server.port
        run_kafka(
            lab,
            KAFKA,
            idle_exit_s=0.3,
            consumer_factory=lambda: consumer,
            outage_backoff=FAST,
            heartbeat=health.beat,
            report_outage=report,
        )
        after = (_check(server.port, ""), _check(server.port, READINESS))
    close_labeler(lab)

    assert sorted(p.provenance.metadata["set_id"] for p in _pairs(broker)) == sorted(cs.set_id for cs in sets)
    assert _letters(broker) == [], "an outage is not bad data"
    assert all(live == SERVING for _, live, _ in judge.seen), "liveness stays about a stuck loop"
    start = next(t for t, down in reported if down)
    end = next(t for t, down in reported if not down and t > start)
    for t, _, ready in judge.seen:
        expected = NOT_SERVING if start <= t < end and t - start >= READY_S else SERVING
        assert ready == expected, f"at t={t - 1000:.0f} s (outage from {start - 1000:.0f} s) readiness said {ready}"
    assert {ready for _, _, ready in judge.seen} == {SERVING, NOT_SERVING}, "both sides of the threshold were probed"
    assert after == (SERVING, SERVING), "ready again once batches go through"


def test_outage_ready_setting_defaults_to_120_s(monkeypatch):
    assert LabelerConfig().outage_ready_s == 120.0
    monkeypatch.setenv("OFFDPO_LABELER_OUTAGE_READY_S", "30")
    assert LabelerConfig.from_env().outage_ready_s == 30.0


class DeadLetterProduceDown(FakeProducer):
    """The broker unreachable for dead letters: the first `fails` sends to the dead-letter topic raise
    as kafka-python's send() does when it gets no metadata within max_block_ms."""

    def __init__(self, broker, fails: int):
        super().__init__(broker)
        self.fails = fails

    def send(self, topic, value=None, key=None, partition=None, **kw):
        if topic == KAFKA.deadletter_topic and self.fails > 0:
            self.fails -= 1
            raise KafkaTimeoutError("Failed to update metadata after 2.0 secs.")
        return super().send(topic, value, key, partition, **kw)


class AwayConsumer(WatchedConsumer):
    """After each rewind the next polls come back empty, as they do while the broker is away."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.empty = 0

    def seek(self, tp, offset):
        super().seek(tp, offset)
        self.empty = 3

    def poll(self, timeout_ms=0, max_records=None, update_offsets=True):
        if self.empty:
            self.empty -= 1
            return {}
        return super().poll(timeout_ms, max_records, update_offsets)


def test_a_failed_dead_letter_produce_is_retried_never_committed_past_nor_counted_twice(tmp_path):
    """kafka-python's send() raising (not only its future failing) is an unacknowledged dead letter:
    Unavailable, the batch is redone, and an `idle_exit_s` run does not end while the redo is pending
    (empty polls then mean the broker is away, not an idle topic). The summary counts each input once."""
    broker = FakeBroker(partitions=1)
    sets = _sets(6)
    for cs in sets[:2]:
        broker.append(KAFKA.candidates_topic, cs.SerializeToString(), key=cs.set_id.encode())
    broker.append(KAFKA.candidates_topic, b"\xff\xfe not a candidate set", key=b"junk")
    for cs in sets[2:]:
        broker.append(KAFKA.candidates_topic, cs.SerializeToString(), key=cs.set_id.encode())
    cfg = LabelerConfig(state_dir=str(tmp_path / "state"), batch_size=4, strategy="llm_judge", ledger=False)
    strategy = LLMJudgeStrategy(FlakyJudge(fails=0), JudgeConfig(model="fake-judge", concurrency=1), None)
    producer = DeadLetterProduceDown(broker, fails=3)
    lab = build_labeler(cfg, KAFKA, producer=producer, strategy_overrides={"llm_judge": strategy})

    def settled(partition):  # offsets whose set has a pair or whose record has a dead letter
        done = {p.provenance.metadata["set_id"] for p in _pairs(broker)}
        letters = {d.offset for d in _letters(broker)}
        return {o for o, r in enumerate(broker.records(KAFKA.candidates_topic)) if r.key.decode() in done} | letters

    consumer = AwayConsumer(broker, settled, KAFKA.candidates_topic, group="labeler", max_poll_records=4)
    summary = run_kafka(lab, KAFKA, idle_exit_s=0.0, consumer_factory=lambda: consumer, outage_backoff=FAST)
    close_labeler(lab)

    assert producer.fails == 0, "the dead-letter produce failed three times"
    assert [(d.offset, d.error_type) for d in _letters(broker)] == [(2, "decode_error")], "once, after the retries"
    assert sorted({p.provenance.metadata["set_id"] for p in _pairs(broker)}) == sorted(cs.set_id for cs in sets)
    assert list(broker.committed.values()) == [len(sets) + 1], "committed to the end, never past a bad record early"
    assert summary["total"]["inputs"] == len(sets) + 1 and summary["total"]["rejects"] == 1, summary
