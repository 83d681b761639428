"""Issue 17: outages that must not lose input, on a dedicated local stack (real Tansu broker, real S3,
the real vLLM OpenAI-compatible judge server), each counted pairs in -> trained like the other cases.

- deadletter_produce_fails: the broker is SIGKILLed exactly when the labeler's first dead letter is
  due, so its produce fails (not acknowledged); the labeler must not commit past that record, retries,
  and once the broker is back every bad record is dead-lettered, every good set labelled, and the
  pairs are scored and trained once.
- judge_down: the LLM judge is down for longer than a batch (several failed tries of the same batch),
  then started: every candidate set is labelled exactly once, nothing is dead-lettered for the outage,
  and the commit never passes a set the judge has not seen.

The labeler runs in-process (`run_kafka`, what `python -m services.labeler consume` runs) with a real
producer and consumer; refscore's stream worker and the trainer run as subprocesses.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time

import pytest

from localdev.process import free_port
from localdev.stack import LocalStack
from offdpo import records
from offdpo.config import KafkaConfig
from offdpo.kafka import make_producer, read_topic
from services.labeler import inputs
from services.labeler.config import JudgeConfig, LabelerConfig
from services.labeler.runner import build_labeler, close_labeler, run_kafka
from tests.fakes import FakeBroker, FakeProducer

from .harness import REPO, wait_for

pytestmark = [pytest.mark.faults, pytest.mark.stack]

SAMPLES = REPO / "services" / "labeler" / "samples"
BROKER_DOWN_S = 8.0  # how long the broker stays down once the dead letter is due (the outage itself)
ACK_TIMEOUT_S = 2.0  # the labeler's wait for an acknowledgement: shorter than the outage, so produces fail
BACKOFF = {"initial_s": 0.2, "max_delay_s": 2.0}


@pytest.fixture(scope="module")
def own_stack(tmp_path_factory):
    """Its own stack: the broker is killed here, which the session stack's other users must not see."""
    with LocalStack.for_tests(tmp_path_factory.mktemp("outage-stack")) as local:
        yield local


def _good_sets() -> list:
    out = []
    for line in (SAMPLES / "candidates.jsonl").read_text().splitlines():
        try:
            cs = inputs.candidate_set_from_json(json.loads(line))
            inputs.validate_candidate_set(cs, max_answers=16)
        except (ValueError, records.RecordError):
            continue
        out.append(cs)
    return out


def _labeler_cfg(case, tmp_path, group: str, **kw) -> LabelerConfig:
    return LabelerConfig.from_env(
        case.env,
        state_dir=str(tmp_path / "labeler"),
        rules_file=str(SAMPLES / "rules.yaml"),
        group_id=group,
        ledger=False,
        batch_size=4,
        ack_timeout_s=ACK_TIMEOUT_S,
        **kw,
    )


def _expected_pair_ids(sets: list, lcfg: LabelerConfig) -> set[str]:
    """The pairs the deterministic rules labeler makes of `sets`, computed in memory (an in-memory
    broker), independently of what reached the real pairs topic: a pair the run under test lost
    fails the case instead of silently shrinking what it is checked against."""
    broker = FakeBroker()
    kafka = KafkaConfig()
    labeler = build_labeler(dataclasses.replace(lcfg, ledger=False), kafka, producer=FakeProducer(broker))
    items = [
        inputs.Item(source="expected", offset=i, raw=cs.SerializeToString(), value=cs) for i, cs in enumerate(sets)
    ]
    labeler.label_candidates(items, "rules")
    labeler.confirm()
    return {records.decode_pair(v).pair_id for v in broker.values(kafka.pairs_topic)}


def _labelled(case) -> list:
    return [records.decode_pair(r.value) for r in read_topic(case.kafka, case.kafka.pairs_topic, idle_s=1.0)]


def _score_and_train(case) -> int:
    worker = case.start_worker(name="refscore")
    case.wait_scored(worker, timeout_s=240)
    case.run_trainer()
    return worker.stop()


# -- a dead-letter produce that fails -------------------------------------------------------------------
def test_a_failed_dead_letter_produce_blocks_the_commit_and_is_retried(
    own_stack, make_case, fault_results, tmp_path, caplog
):
    case = make_case("deadletter_produce_fails", own_stack, partitions=1)
    group = f"f-{case.run_name}-labeler"
    good = [cs.SerializeToString() for cs in _good_sets()]
    garbage = [b"\xff\xfe not a candidate set", b"{\x01 nor this", b"\x00" * 64]
    # one partition: good sets, then the bad records among more good sets (the first dead letter is due mid-stream)
    half = len(good) // 2
    case.produce(case.kafka.candidates_topic, [(b"set", v) for v in good[:half]])
    case.produce(case.kafka.candidates_topic, [(b"bad", v) for v in garbage[:1]], invalid=True)
    case.produce(case.kafka.candidates_topic, [(b"set", v) for v in good[half:]])
    case.produce(case.kafka.candidates_topic, [(b"bad", v) for v in garbage[1:]], invalid=True)
    (bad_offset,) = [o for t, _, o in case.invalid[:1]]
    end = len(good) + len(garbage)

    lcfg = _labeler_cfg(case, tmp_path, group)
    # A real producer with the client's own bounds tightened, so a dead broker fails a send in seconds.
    producer = make_producer(case.kafka, "labeler", max_block_ms=2000)
    labeler = build_labeler(lcfg, case.kafka, producer=producer)
    sink = labeler.deadletters
    assert sink is not None
    real_send = sink.send
    outage: dict = {}
    restart = threading.Timer(BROKER_DOWN_S, own_stack.start_broker)

    def send_with_the_broker_gone(**kw):
        """The moment the first dead letter is due: the broker dies (SIGKILL), and comes back later."""
        if not outage:
            outage["committed_before"] = case.committed(group, case.kafka.candidates_topic)[0]
            outage["due_for_offset"] = kw["offset"]
            own_stack.kill_broker()
            outage["killed_at"] = time.monotonic()
            restart.start()
        return real_send(**kw)

    sink.send = send_with_the_broker_gone  # type: ignore[method-assign]
    try:
        with caplog.at_level(logging.WARNING):
            summary = run_kafka(labeler, case.kafka, "rules", idle_exit_s=8, outage_backoff=BACKOFF)
    finally:
        if restart.is_alive():
            restart.join()
        if not own_stack.status()["kafka"]:
            own_stack.start_broker()
        close_labeler(labeler)
    case.events.append(
        f"broker SIGKILLed when the dead letter for offset {outage.get('due_for_offset')} was due, "
        f"restarted after {BROKER_DOWN_S:.0f} s; labeler run_kafka returned"
    )
    failed = [r for r in caplog.records if "was not acknowledged by the broker" in r.getMessage()]
    assert outage["due_for_offset"] == bad_offset
    assert outage["committed_before"] <= bad_offset, "committed past the record before its dead letter"
    assert failed, "the dead-letter produce never failed: the fault did not happen"
    assert case.committed(group, case.kafka.candidates_topic)[0] == end, "the labeler finished the partition"
    assert summary["total"]["inputs"] == end, summary

    expected = _expected_pair_ids(_good_sets(), lcfg)
    labelled = {p.pair_id for p in _labelled(case)}
    assert expected and labelled == expected, (
        f"pairs on the topic vs the rules labeler's in memory: missing {len(expected - labelled)}, "
        f"unexpected {len(labelled - expected)}"
    )
    case.valid_ids |= expected
    rc = _score_and_train(case)
    case.events.append(f"refscore SIGTERM exit {rc}; trainer exit 0")
    letters = case.dead_letters()
    copies = sum(1 for dl in letters if (dl.topic, dl.partition, dl.offset) == case.invalid[0])
    row = case.verify(
        services_ok=rc == 0,
        extra={
            "failed_dead_letter_produces": len(failed),
            "labeler_outage_retries": sum("labeler outage #" in r.getMessage() for r in caplog.records),
            "dead_letter_copies_of_the_first_bad_record": copies,
        },
    )
    fault_results.add(row)


# -- the judge down for longer than a batch --------------------------------------------------------------
def test_judge_down_longer_than_a_batch_then_back_labels_every_set_once(
    own_stack, make_case, fault_results, tmp_path, tiny_model
):
    from localdev.openai_server import OpenAIServer

    case = make_case("judge_down", own_stack, partitions=1)
    group = f"f-{case.run_name}-labeler"
    sets = _good_sets()
    judge_sets = []
    for i, cs in enumerate(sets):  # every other set goes to the LLM judge, the rest to the rules
        if i % 2 == 0:
            cs.strategy = "llm_judge"
            judge_sets.append(cs.set_id)
    case.produce(case.kafka.candidates_topic, [(cs.set_id.encode(), cs.SerializeToString()) for cs in sets])
    first_judge_offset = next(i for i, cs in enumerate(sets) if cs.strategy == "llm_judge")

    port = free_port()
    jcfg = JudgeConfig.from_env(
        case.env,
        base_url=f"http://127.0.0.1:{port}/v1",
        model="judge",
        timeout_s=20.0,
        max_retries=1,
        backoff_s=0.1,
        cache=False,
    )
    lcfg = _labeler_cfg(case, tmp_path, group)
    labeler = build_labeler(lcfg, case.kafka, jcfg)
    stop = threading.Event()
    result: dict = {}

    def consume():
        try:
            result["summary"] = run_kafka(
                labeler, case.kafka, "rules", stop=stop, idle_exit_s=10, outage_backoff=BACKOFF
            )
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            result["error"] = exc

    thread = threading.Thread(target=consume, name="labeler-consume")
    thread.start()
    # The judge's speed is not under test: eager mode skips vLLM's torch.compile warm-up (minutes on 2 busy cores).
    judge = OpenAIServer(
        tiny_model,
        port=port,
        served_model_name="judge",
        max_model_len=1024,
        gpu_memory_utilization=0.08,
        extra_args=("--enforce-eager",),
        start_timeout_s=480,  # start-up measured at 3 min on 2 cores at load 15-20
        log_path=case.workdir / "judge-server.log",
    )
    try:
        # The judge is down: the same batch fails again and again (longer than a batch), nothing passes it.
        wait_for(
            # two judge sets per batch of four: six sets left unlabelled = three failed tries of the batch
            lambda: labeler.outages >= 6 or "error" in result,
            120,
            "three failed tries of the batch while the judge is down",
        )
        assert "error" not in result, result.get("error")
        committed_down = case.committed(group, case.kafka.candidates_topic)[0]
        assert committed_down <= first_judge_offset, f"committed {committed_down} past the first judge set"
        assert case.dead_letters(idle_s=0.5) == [], "an outage is not bad data"
        unlabelled_down = labeler.outages
        case.events.append(
            f"judge down: {unlabelled_down // 2} failed tries of the batch, commit held at {committed_down}"
        )
        t0 = time.monotonic()
        judge.start()  # vLLM's OpenAI server on the tiny model, on the port the labeler is calling
        judge_start_s = round(time.monotonic() - t0, 1)
        case.events.append(f"judge (vLLM OpenAI server) started after {judge_start_s} s more of outage")
        thread.join(timeout=300)
        assert not thread.is_alive(), "the labeler did not finish after the judge came back"
    finally:
        stop.set()
        thread.join(timeout=60)
        judge.stop()
        close_labeler(labeler)
    assert "error" not in result, result.get("error")
    summary = result["summary"]
    assert case.committed(group, case.kafka.candidates_topic)[0] == len(sets)
    assert summary["llm_judge"]["inputs"] == len(judge_sets), summary  # each judge set labelled once
    assert summary["total"]["inputs"] == len(sets) and summary["total"]["rejects"] == 0, summary

    labelled = _labelled(case)
    by_set = {p.provenance.metadata["set_id"] for p in labelled}
    assert by_set, summary
    case.valid_ids |= {p.pair_id for p in labelled}
    rc = _score_and_train(case)
    case.events.append(f"refscore SIGTERM exit {rc}; trainer exit 0")
    row = case.verify(
        services_ok=rc == 0,
        extra={
            "judge_sets": len(judge_sets),
            "judge_sets_labelled": summary["llm_judge"]["inputs"],
            "judge_pairs": summary["llm_judge"]["pairs"],
            "judge_start_s": judge_start_s,
            "sets_left_unlabelled_before_the_judge_start": unlabelled_down,
            "sets_left_unlabelled_in_all": labeler.outages,
        },
    )
    assert row["dead_letters"] == {}, row["dead_letters"]
    fault_results.add(row)
