"""Issue 17 item 3: a dependency outage (judge down, refscore Generate unreachable) is not bad data.
No dead letter for it, no commit past the first unlabelled set; the consume loop rewinds, backs off and
goes on by itself when the dependency is back; the file mode stops with the outage instead."""

from __future__ import annotations

import dataclasses
import logging
import threading

import pytest

from offdpo import records
from offdpo.config import KafkaConfig
from offdpo.v1 import records_pb2
from services.labeler.config import JudgeConfig, LabelerConfig
from services.labeler.errors import JudgeError
from services.labeler.judge import LLMJudgeStrategy
from services.labeler.pipeline import Outage
from services.labeler.runner import build_labeler, close_labeler, run_file, run_kafka
from tests.fakes import FakeBroker, FakeConsumer, FakeProducer

from .conftest import SAMPLES
from .test_units import cset

KAFKA = KafkaConfig()
FAST = {"initial_s": 0.001, "max_delay_s": 0.005}


class FlakyJudge:
    """Fails its first `fails` calls with the client's JudgeError (endpoint down), then answers by length."""

    model = "fake-judge"

    def __init__(self, fails: int):
        self.fails = fails
        self.calls = 0
        self.answered = 0
        self._lock = threading.Lock()

    def complete(self, prompt, choices):
        with self._lock:
            self.calls += 1
            if self.calls <= self.fails:
                raise JudgeError("judge fake-judge at http://judge failed after 3 attempt(s): APIConnectionError")
            self.answered += 1
        first = prompt.split("[Answer A]\n")[1].split("\n\n[Answer B]")[0]
        second = prompt.split("[Answer B]\n")[1].split("\n\n")[0]
        return "Good" if len(first) > len(second) else "Bad" if len(first) < len(second) else "Same"


class FlakyGenerator:
    """refscore Generate unreachable for its first `fails` calls."""

    def __init__(self, fails: int):
        self.fails, self.calls = fails, 0

    def generate(self, prompt, n):
        self.calls += 1
        if self.calls <= self.fails:
            raise ConnectionError("failed to connect to all addresses; refscore:50051: Connection refused")
        return ["a much longer on-policy answer", "short"][:n]


class WatchedConsumer(FakeConsumer):
    """Checks on every commit that nothing unlabelled lies below the committed offset."""

    def __init__(self, broker, labelled_offsets, *a, **kw):
        super().__init__(broker, *a, **kw)
        self.labelled_offsets = labelled_offsets

    def commit(self, offsets=None):
        super().commit(offsets)
        for tp, off in self.commits[-1].items():
            missing = [o for o in range(off) if o not in self.labelled_offsets(tp.partition)]
            assert not missing, f"committed {tp} to {off} past unlabelled sets {missing}"


@pytest.fixture
def broker():
    return FakeBroker(partitions=2)


@pytest.fixture
def cfg(tmp_path):
    return LabelerConfig(state_dir=str(tmp_path / "state"), batch_size=4, strategy="llm_judge", ledger=False)


def _sets(n):
    return [cset([f"answer {'x' * (i + 1)}", "no"], prompt=f"question {i}?", set_id=f"s{i}") for i in range(n)]


def _pairs(broker):
    return [records.decode_pair(v) for v in broker.values(KAFKA.pairs_topic)]


def _letters(broker):
    return [records_pb2.DeadLetter.FromString(v) for v in broker.values(KAFKA.deadletter_topic)]


def _run_consumer(broker, lab, caplog=None):
    """run_kafka on a WatchedConsumer; `labelled(partition)` = offsets whose set id has a pair."""
    set_of = {}
    for rec in broker.records(KAFKA.candidates_topic):
        set_of[(rec.partition, rec.offset)] = rec.key.decode()

    def labelled(partition):
        done = {p.provenance.metadata["set_id"] for p in _pairs(broker)}
        bad = {d.original_key.decode() for d in _letters(broker)}
        return {o for (p, o), sid in set_of.items() if p == partition and (sid in done or sid in bad)}

    consumers = []

    def factory():
        consumers.append(WatchedConsumer(broker, labelled, KAFKA.candidates_topic, group="labeler", max_poll_records=4))
        return consumers[-1]

    summary = run_kafka(lab, KAFKA, idle_exit_s=0.3, consumer_factory=factory, outage_backoff=FAST)
    return summary, consumers


def test_judge_down_then_back_every_set_labelled_once_no_dead_letter_commit_never_passes(broker, cfg, caplog):
    sets = _sets(10)
    for cs in sets:
        broker.append(KAFKA.candidates_topic, cs.SerializeToString(), key=cs.set_id.encode())
    broker.append(KAFKA.candidates_topic, b"\xff\xfe not a protobuf", key=b"junk", partition=0)
    judge = FlakyJudge(fails=7)  # several batches' worth of failed questions
    strategy = LLMJudgeStrategy(judge, JudgeConfig(model="fake-judge", concurrency=1), None)
    lab = build_labeler(cfg, KAFKA, producer=FakeProducer(broker), strategy_overrides={"llm_judge": strategy})
    with caplog.at_level(logging.WARNING):
        summary, consumers = _run_consumer(broker, lab)
    close_labeler(lab)

    pairs = _pairs(broker)
    set_ids = [p.provenance.metadata["set_id"] for p in pairs]
    assert sorted(set_ids) == sorted(cs.set_id for cs in sets), "every set labelled exactly once"
    letters = _letters(broker)
    assert [(d.original_key, d.error_type) for d in letters] == [(b"junk", "decode_error")], "only bad data"
    assert judge.fails < judge.calls and lab.outages > 0
    assert summary["llm_judge"]["inputs"] == 11 and summary["llm_judge"]["pairs"] == 10
    ends = {p: len(part) for p, part in enumerate(broker.topics[KAFKA.candidates_topic])}
    assert {tp.partition: o for (g, tp), o in broker.committed.items()} == ends
    assert any("a dependency is down" in r.getMessage() and "retry" in r.getMessage() for r in caplog.records)


def test_generate_unreachable_is_redone_not_dead_lettered(broker, cfg):
    cfg = dataclasses.replace(cfg, generate_n=2)
    sets = _sets(6)
    for cs in sets:
        broker.append(KAFKA.candidates_topic, cs.SerializeToString(), key=cs.set_id.encode())
    gen = FlakyGenerator(fails=5)
    strategy = LLMJudgeStrategy(FlakyJudge(fails=0), JudgeConfig(model="fake-judge", concurrency=1), None)
    lab = build_labeler(
        cfg, KAFKA, producer=FakeProducer(broker), generator=gen, strategy_overrides={"llm_judge": strategy}
    )
    summary, _ = _run_consumer(broker, lab)
    close_labeler(lab)
    assert _letters(broker) == []
    assert len({p.provenance.metadata["set_id"] for p in _pairs(broker)}) == 6
    assert summary["llm_judge"]["inputs"] == 6


def test_stop_during_an_outage_commits_nothing_past_it(broker, cfg):
    for cs in _sets(4):
        broker.append(KAFKA.candidates_topic, cs.SerializeToString(), key=cs.set_id.encode(), partition=0)
    strategy = LLMJudgeStrategy(FlakyJudge(fails=10**9), JudgeConfig(model="fake-judge", concurrency=1), None)
    lab = build_labeler(cfg, KAFKA, producer=FakeProducer(broker), strategy_overrides={"llm_judge": strategy})
    stop = threading.Event()
    threading.Timer(0.5, stop.set).start()
    consumer = FakeConsumer(broker, KAFKA.candidates_topic, group="labeler", max_poll_records=4)
    run_kafka(lab, KAFKA, stop=stop, consumer_factory=lambda: consumer, outage_backoff=FAST)
    close_labeler(lab)
    assert _letters(broker) == [] and _pairs(broker) == []
    assert all(o == 0 for o in broker.committed.values())


def test_file_mode_reports_the_outage_and_stops_instead_of_dead_lettering(broker, cfg, tmp_path):
    path = tmp_path / "sets.jsonl"
    path.write_text((SAMPLES / "candidates.jsonl").read_text().splitlines()[0] + "\n")
    strategy = LLMJudgeStrategy(FlakyJudge(fails=10**9), JudgeConfig(model="fake-judge", concurrency=1), None)
    lab = build_labeler(cfg, KAFKA, producer=FakeProducer(broker), strategy_overrides={"llm_judge": strategy})
    with pytest.raises(Outage, match="dependency is down") as info:
        run_file(lab, path)
    close_labeler(lab)
    assert info.value.retryable and info.value.unlabelled == 1
    assert _letters(broker) == []
