"""Fast tests of the labeler's pipeline on in-memory Kafka (tests/fakes.py): candidate sets in, pairs
published once, duplicates counted, rejects dead-lettered with the error_type of their exception class."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json

import grpc
import pytest
from kafka.errors import KafkaTimeoutError

from offdpo import errors, records
from offdpo.config import KafkaConfig
from offdpo.v1 import labeler_pb2, records_pb2, refscore_pb2_grpc
from services.labeler import inputs
from services.labeler.base import Outcome
from services.labeler.config import LabelerConfig
from services.labeler.errors import InvalidCandidateSet, JudgeError, LabelError, PublishError, RulesError
from services.labeler.judge import LLMJudgeStrategy, VerdictCache
from services.labeler.names import CANDIDATE_STRATEGIES, StrategyName
from services.labeler.runner import RefScoreGenerator, build_labeler, close_labeler, run_file, run_kafka
from tests.fakes import FakeBroker, FakeConsumer, FakeProducer

from .conftest import SAMPLES
from .test_units import FakeJudge, cset

KAFKA = KafkaConfig()


@pytest.fixture
def broker():
    return FakeBroker(partitions=2)


@pytest.fixture
def fake_cfg(tmp_path):
    return LabelerConfig(state_dir=str(tmp_path / "state"), rules_file=str(SAMPLES / "rules.yaml"), batch_size=8)


def labeler_on(broker, cfg, **kw):
    return build_labeler(cfg, KAFKA, producer=FakeProducer(broker), **kw)


def pairs_on(broker) -> list[records_pb2.PreferencePair]:
    return [records.decode_pair(v) for v in broker.values(KAFKA.pairs_topic)]


def letters_on(broker) -> list[records_pb2.DeadLetter]:
    return [records_pb2.DeadLetter.FromString(v) for v in broker.values(KAFKA.deadletter_topic)]


def test_sample_file_pairs_once_duplicates_counted_rejects_typed(broker, fake_cfg):
    sample = SAMPLES / "candidates.jsonl"
    lab = labeler_on(broker, fake_cfg)
    try:
        summary = run_file(lab, sample)["rules"]
    finally:
        close_labeler(lab)
    assert summary == {
        "inputs": 24,
        "pairs": 18,
        "duplicates": 1,
        "ties": 2,
        "inconsistent": 0,
        "unparseable": 0,
        "rejects": 3,
    }
    pairs = pairs_on(broker)
    assert len(pairs) == 18 == len({p.pair_id for p in pairs})
    keys = [r.key.decode() for r in broker.records(KAFKA.pairs_topic)]
    assert sorted(keys) == sorted(p.pair_id for p in pairs)
    letters = sorted(letters_on(broker), key=lambda d: d.offset)
    assert [(d.offset, d.error_type) for d in letters] == [
        (6, "decode_error"),
        (13, "invalid_candidate_set"),
        (19, "decode_error"),
    ]
    assert letters[0].reason.startswith(f"{sample}:6: not valid JSON")
    assert letters[1].reason.startswith(f"{sample}:13: needs at least 2 answers")
    assert all(d.service == "labeler" and d.topic == str(sample) for d in letters)

    # A rerun on the same state dir publishes nothing: the ledger has every acknowledged id.
    lab = labeler_on(broker, fake_cfg)
    try:
        again = run_file(lab, sample)["rules"]
    finally:
        close_labeler(lab)
    assert again["pairs"] == 0 and again["duplicates"] == 19
    assert len(pairs_on(broker)) == 18


class Scripted:
    """A strategy whose result per set is looked up by set_id."""

    name = "rules"

    def __init__(self, results):
        self.results = results
        self.seen: list[str] = []

    def label_batch(self, sets, source):
        self.seen += [cs.set_id for cs in sets]
        return [self.results[cs.set_id] for cs in sets]


class Generator:
    def __init__(self, answers=None, error=None):
        self.answers, self.error = answers or [], error

    def generate(self, prompt, n):
        if self.error:
            raise self.error
        return self.answers[:n]


def item(cs: labeler_pb2.CandidateSet, offset: int) -> inputs.Item[labeler_pb2.CandidateSet]:
    return inputs.Item(source="in.jsonl", offset=offset, raw=cs.SerializeToString(), value=cs)


def test_a_labeler_with_a_reference_names_it_on_every_pair_it_makes(broker, fake_cfg):
    # A refscore worker serving several models scores a pair with the one it names (empty: its primary).
    cfg = dataclasses.replace(fake_cfg, reference="fp-generation-2")
    lab = labeler_on(broker, cfg)
    try:
        assert run_file(lab, SAMPLES / "candidates.jsonl")["rules"]["pairs"] == 18
        imported = records.make_pair(records_pb2.Prompt(text="an imported prompt"), "a", "b")
        imported.reference_fingerprint_id = "fp-its-own"
        lab.publish_pairs([inputs.Item(source="import", offset=0, raw=b"", value=imported)], "imported")
        lab.confirm()
    finally:
        close_labeler(lab)
    named = {p.pair_id: p.reference_fingerprint_id for p in pairs_on(broker)}
    assert named.pop(imported.pair_id) == "fp-its-own", "a pair that names its reference keeps it"
    assert len(named) == 18 and set(named.values()) == {"fp-generation-2"}
    assert not LabelerConfig(state_dir="x").reference, "by default pairs name no reference"


def test_every_reject_carries_the_error_type_of_its_class(broker, fake_cfg):
    pair = records.make_pair(records.text_prompt("q"), "good", "bad")
    strategy = Scripted(
        {
            "ok": Outcome(pairs=[pair], ties=1),
            "again": Outcome(pairs=[pair]),  # the same pair from another set: a duplicate, not sent twice
            "label": LabelError("no reference"),
            "judge": JudgeError("endpoint down"),
        }
    )
    lab = labeler_on(broker, fake_cfg, strategy_overrides={"rules": strategy})
    sets = [
        cset(["a", "b"], set_id="ok"),
        cset(["a", "b"], set_id="again"),
        cset(["a", "b"], set_id="label"),
        cset(["a", "b"], set_id="judge"),
        cset(["a", "a"], set_id="dup-answers"),
        cset(["a", "b"], set_id="needs-rm", strategy="reward_model"),  # no reward model configured
        cset(["a"], set_id="gen", generate_n=2),  # no generator configured
    ]
    junk = inputs.Item(source="in.jsonl", offset=99, raw=b"{", error=errors.DecodeError("in.jsonl:99: not valid JSON"))
    reports = lab.label_candidates([item(cs, i + 1) for i, cs in enumerate(sets)] + [junk])
    lab.confirm()
    close_labeler(lab)

    assert strategy.seen == ["ok", "again", "label", "judge"]
    assert reports[0].pair_ids == [pair.pair_id] and reports[0].ties == 1
    assert reports[1].pair_ids == [] and reports[1].duplicate_ids == [pair.pair_id]
    assert [p.pair_id for p in pairs_on(broker)] == [pair.pair_id]
    by_offset = {d.offset: d for d in letters_on(broker)}
    assert {o: d.error_type for o, d in by_offset.items()} == {
        3: "label_error",
        5: "invalid_candidate_set",
        6: "strategy_unavailable",
        7: "generate_unavailable",
        99: "decode_error",
    }
    assert by_offset[3].reason == "in.jsonl:3: no reference"
    assert by_offset[99].reason == "in.jsonl:99: not valid JSON"  # the reader's position, not twice
    assert "needs OFFDPO_LABELER_REWARD_MODEL" in by_offset[6].reason
    assert reports[2].error == by_offset[3].reason
    # A judge outage is not bad data (issue 17): never dead-lettered, marked for a redo instead.
    assert reports[3].retry and "endpoint down" in reports[3].error and lab.outages == 1
    summary = lab.summary.as_dict()
    # The judge outage is neither a reject nor (until its redo) a labelled input.
    assert summary["rules"]["rejects"] == 4 and summary["reward_model"]["rejects"] == 1
    assert summary["total"] == {
        "inputs": 7,
        "pairs": 1,
        "duplicates": 1,
        "ties": 1,
        "inconsistent": 0,
        "unparseable": 0,
        "rejects": 5,
    }


def test_on_policy_generation_outcomes(broker, fake_cfg):
    sets = [cset(["Sorry."], set_id="g", generate_n=2, reference="42")]
    lab = labeler_on(broker, fake_cfg, generator=Generator(["42", "Sorry."]))
    (report,) = lab.label_candidates([item(sets[0], 1)])
    assert len(report.pair_ids) == 1 and pairs_on(broker)[0].chosen == "42"

    lab = labeler_on(broker, fake_cfg, generator=Generator(["Sorry.", " "]))
    lab.label_candidates([item(cset(["Sorry."], generate_n=2), 2)])
    lab = labeler_on(broker, fake_cfg, generator=Generator(error=RuntimeError("refscore is down")))
    (down,) = lab.label_candidates([item(cset(["x"], generate_n=2), 3)])
    lab.confirm()
    # refscore unreachable is an outage, not bad data (issue 17): marked for a redo, never dead-lettered.
    assert [(d.offset, d.error_type) for d in letters_on(broker)] == [(2, "too_few_answers")]
    assert down.retry and "on-policy generation failed: refscore is down" in down.error


def test_unacknowledged_pairs_raise_publish_error_and_are_sent_again(broker, fake_cfg):
    producer = FakeProducer(broker)
    lab = build_labeler(fake_cfg, KAFKA, producer=producer)
    cs = cset(["4", "Sorry, I cannot."], reference="4")
    producer.fail_next(1, RuntimeError("not enough replicas"))
    lab.label_candidates([item(cs, 1)])
    with pytest.raises(PublishError, match="1 of 1 pairs not acknowledged") as err:
        lab.confirm()
    assert err.value.retryable and err.value.error_type == "publish_failed"
    (report,) = lab.label_candidates([item(cs, 1)])  # the redo sends it again: it was never acknowledged
    lab.confirm()
    assert len(report.pair_ids) == 1 and len(pairs_on(broker)) == 1


def test_kafka_loop_commits_after_publishing(broker, fake_cfg, monkeypatch):
    from services.labeler import runner

    good = [cset([str(i), "Sorry, I cannot."], set_id=f"k{i}", reference=str(i)) for i in range(5)]
    for cs in good:
        broker.append(KAFKA.candidates_topic, cs.SerializeToString(), key=cs.set_id.encode())
    broker.append(KAFKA.candidates_topic, b"\xff\xfe not a protobuf", key=b"junk")
    broker.append(KAFKA.candidates_topic, b"x" * 200, key=b"big")
    consumers = []

    def make_consumer(kafka, group, topics, **kw):
        consumers.append(FakeConsumer(broker, *topics, group=group, max_poll_records=kw["max_poll_records"]))
        return consumers[-1]

    monkeypatch.setattr(runner, "make_consumer", make_consumer)
    cfg = dataclasses.replace(fake_cfg, max_input_bytes=100)
    lab = labeler_on(broker, cfg)
    summary = run_kafka(lab, KAFKA, idle_exit_s=0.2)
    assert summary["rules"]["inputs"] == 7 and summary["rules"]["pairs"] == 5 and summary["rules"]["rejects"] == 2
    letters = {d.original_key: d for d in letters_on(broker)}
    assert letters[b"junk"].error_type == "decode_error" and letters[b"big"].error_type == "too_large"
    assert letters[b"junk"].partition >= 0 and letters[b"junk"].topic == KAFKA.candidates_topic
    assert consumers[0].commits, "nothing was committed"
    again = run_kafka(labeler_on(broker, dataclasses.replace(cfg, ledger=False)), KAFKA, idle_exit_s=0.2)
    assert again["total"]["inputs"] == 0


def test_judge_through_the_pipeline_second_run_asks_nothing(broker, fake_cfg, tmp_path):
    from services.labeler.config import JudgeConfig

    path = tmp_path / "sets.jsonl"
    sets = [
        {"id": "a", "prompt": "2+2=", "answers": ["4", "5", "four"]},
        {"id": "b", "prompt": "2+2=", "answers": ["4", "5"]},  # its questions were asked for set a
    ]
    path.write_text("\n".join(json.dumps(s) for s in sets) + "\n")
    quality = {"4": 2, "four": 2, "5": 1}
    cfg = dataclasses.replace(fake_cfg, strategy="llm_judge", ledger=False)

    def run(judge):
        strategy = LLMJudgeStrategy(judge, JudgeConfig(model="fake-judge"), VerdictCache(tmp_path / "v.sqlite"))
        lab = labeler_on(broker, cfg, strategy_overrides={"llm_judge": strategy})
        return run_file(lab, path)["llm_judge"], strategy

    first = FakeJudge(lambda a, b: "Good" if quality[a] > quality[b] else "Bad" if quality[a] < quality[b] else "Same")
    summary, _ = run(first)
    assert len(first.calls) == 6  # 3 comparisons x 2 orders; set b's comparison was already asked
    assert summary["pairs"] == 2 and summary["duplicates"] == 1 and summary["ties"] == 1
    second = FakeJudge(lambda a, b: pytest.fail("the judge was asked again"))
    again, strategy = run(second)
    assert second.calls == [] and strategy.cache.hits == 8
    assert again == summary  # the same verdicts: the same pairs (sent again: this run has no ledger)


def test_errors_join_the_offdpo_hierarchy():
    assert issubclass(RulesError, errors.BadInput) and issubclass(RulesError, ValueError)
    assert issubclass(JudgeError, errors.Unavailable) and JudgeError.retryable
    assert issubclass(PublishError, errors.Unavailable)
    assert issubclass(LabelError, errors.RecordError) and LabelError.error_type == "label_error"


def test_strategy_names_are_defined_once():
    assert set(CANDIDATE_STRATEGIES) == {"rules", "reward_model", "llm_judge"}
    values = {s.label_strategy for s in StrategyName}
    assert values == set(records_pb2.LabelStrategy.values()) - {records_pb2.LABEL_STRATEGY_UNSPECIFIED}
    with pytest.raises(errors.ConfigError, match=r"OFFDPO_LABELER_STRATEGY: unknown strategy 'human'"):
        LabelerConfig(strategy="human")
    with pytest.raises(errors.ConfigError, match="use best_worst or all"):
        LabelerConfig(pair_mode="some")
    with pytest.raises(InvalidCandidateSet, match="use rules, reward_model or llm_judge"):
        inputs.validate_candidate_set(cset(["a", "b"], strategy="magic"), max_answers=4)
    from services.labeler.__main__ import _parser

    with pytest.raises(SystemExit):
        _parser().parse_args(["label", "f", "--strategy", "human"])
    assert _parser().parse_args(["label", "f", "--strategy", "llm_judge"]).strategy == "llm_judge"


class _BrokerDownProducer(FakeProducer):
    """kafka-python while the broker is unreachable: `send` blocks for max_block_ms, then raises
    KafkaTimeoutError (no future); `flush` raises the same when acknowledgements do not come."""

    def __init__(self, broker):
        super().__init__(broker)
        self.down_sends = 0
        self.down_flushes = 0

    def send(self, topic, value=None, key=None, partition=None, **kw):
        if self.down_sends:
            self.down_sends -= 1
            raise KafkaTimeoutError("Failed to update metadata after 60.0 secs.")
        return super().send(topic, value, key, partition, **kw)

    def flush(self, timeout=None):
        if self.down_flushes:
            self.down_flushes -= 1
            raise KafkaTimeoutError("Timeout waiting for future")
        super().flush(timeout)


@pytest.mark.parametrize("where", ["send", "flush"])
def test_broker_down_at_publish_loses_no_pair(broker, fake_cfg, where):
    # Audit path 1 (issue 27): a KafkaTimeoutError from send/flush left the ids "seen"; the caller's
    # retry after recovery was answered duplicate_pair_ids and the pairs never reached the topic.
    producer = _BrokerDownProducer(broker)
    lab = build_labeler(fake_cfg, KAFKA, producer=producer)
    sets = [cset([str(i), "Sorry, I cannot."], set_id=f"s{i}", reference=str(i)) for i in range(3)]
    if where == "send":
        first = lab.label_candidates([item(sets[0], 0)])  # queued, not yet confirmed
        assert first[0].pair_ids
        producer.down_sends = 1  # the batch's next pair cannot be queued
        with pytest.raises(PublishError, match="KafkaTimeoutError") as err:
            lab.label_candidates([item(cs, i) for i, cs in enumerate(sets[1:], 1)])
        lab.publisher.confirm()  # nothing of the abandoned batch is pending
    else:
        producer.down_flushes = 1
        lab.label_candidates([item(cs, i) for i, cs in enumerate(sets)])
        with pytest.raises(PublishError, match="3 of 3 pairs not acknowledged") as err:
            lab.confirm()
    assert err.value.retryable  # UNAVAILABLE to a gRPC caller, a rewind in the Kafka loop
    producer.down_sends = 0
    reports = lab.label_candidates([item(cs, i) for i, cs in enumerate(sets)])  # the caller's retry
    lab.confirm()
    # Sent anew, not answered as duplicates of pairs Kafka never acknowledged.
    assert [(len(r.pair_ids), r.duplicate_ids) for r in reports] == [(1, [])] * 3
    assert {pid for r in reports for pid in r.pair_ids} <= {p.pair_id for p in pairs_on(broker)}


class _RefusingRefscore(refscore_pb2_grpc.RefScoreServicer):
    """A refscore whose Generate answers `code` (a real gRPC server, in this process)."""

    def __init__(self, code):
        self.code = code

    def Generate(self, request, context):
        context.abort(self.code, "prompt is 9000 tokens, over max_model_len 4096: shorten it")


@pytest.mark.parametrize("code", [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAVAILABLE])
def test_refscore_refusing_a_set_dead_letters_it_and_an_outage_does_not(broker, fake_cfg, code):
    # Audit path 2 (issue 27): every Generate error, INVALID_ARGUMENT included, was an outage: one
    # set whose prompt refscore can never take stalled its partition forever.
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=2))
    refscore_pb2_grpc.add_RefScoreServicer_to_server(_RefusingRefscore(code), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        cfg = dataclasses.replace(fake_cfg, refscore_address=f"127.0.0.1:{port}", generate_timeout_s=10.0)
        generator = RefScoreGenerator(cfg)
        lab = labeler_on(broker, cfg, generator=generator)
        (report,) = lab.label_candidates([item(cset(["x"], generate_n=2), 7)])
        lab.confirm()
        generator.close()
    finally:
        server.stop(0)
    letters = [(d.offset, d.error_type) for d in letters_on(broker)]
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        assert letters == [(7, "generate_refused")] and not report.retry
        assert "over max_model_len" in report.error
    else:
        assert letters == [] and report.retry  # redone when refscore is back
