"""`offdpo deadletter list|replay` (cli/deadletter.py): fast with the fakes, and once on the real stack."""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import io

import pytest

from cli import deadletter
from offdpo.config import KafkaConfig
from offdpo.kafka import DEAD_LETTER_INLINE_BYTES, DeadLetterSink
from tests.fakes import FakeBroker, FakeProducer, FakeRecord

DL = KafkaConfig().deadletter_topic


def _args(action: str, **kw) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    deadletter._configure(p)
    argv = [action]
    for k, v in kw.items():
        flag = "--" + k.replace("_", "-")
        argv += [flag] if v is True else [flag, str(v)]
    return p.parse_args(argv)


def _broker_with_letters():
    broker = FakeBroker()
    labeler = DeadLetterSink(FakeProducer(broker), KafkaConfig(), "labeler")
    refscore = DeadLetterSink(FakeProducer(broker), KafkaConfig(), "refscore")
    labeler.send_record(FakeRecord("cands", 0, 3, b"k1", b"c1"), "no judge verdict", "judge_error")
    refscore.send_record(FakeRecord("pairs", 1, 7, b"k2", b"p2"), "too long " * 40, "too_long")
    refscore.send_record(FakeRecord("pairs", 0, 9, None, b"p3"), "undecodable", "decode_error")
    labeler.send_record(FakeRecord("cands", 0, 4, b"k4", b"c4"), "no judge verdict", "judge_error")
    broker.append(DL, b"\xff\xfenot a dead letter")
    return broker


def _run(broker, args, **kw):
    out = io.StringIO()
    rc = deadletter.run(
        args,
        kafka_cfg=KafkaConfig(),
        read=lambda cfg, topic: broker.records(topic),
        make_producer=lambda cfg: FakeProducer(broker),
        out=out,
        **kw,
    )
    return rc, out.getvalue()


def test_list_counts_by_service_and_error_type_and_shows_the_newest():
    broker = _broker_with_letters()
    rc, text = _run(broker, _args("list", show=2))
    assert rc == 0
    assert f"4 dead letters on {DL} (1 undecodable records skipped)" in text
    assert any(line.split() == ["2", "labeler", "judge_error"] for line in text.splitlines())
    assert any(line.split() == ["1", "refscore", "too_long"] for line in text.splitlines())
    newest = text.split("newest 2:")[1].strip().splitlines()
    assert "cands[0]@4 judge_error" in newest[0] and "pairs[0]@9 decode_error" in newest[1]
    assert all(len(line) < 200 for line in text.splitlines()), "reasons are truncated"


def test_replay_by_error_type_republishes_the_original_key_and_value_to_the_original_topic():
    broker = _broker_with_letters()
    rc, text = _run(broker, _args("replay", error_type="judge_error"))
    assert rc == 0
    assert [(r.key, r.value) for r in broker.records("cands")] == [(b"k1", b"c1"), (b"k4", b"c4")]
    assert broker.records("pairs") == []
    assert "replayed 2, refused 0" in text and "trains nothing twice" in text


def test_filters_dry_run_and_limit():
    broker = _broker_with_letters()
    rc, text = _run(broker, _args("replay", service="refscore", origin_topic="pairs", dry_run=True))
    assert rc == 0 and "would replay 2" in text and broker.records("pairs") == []
    _run(broker, _args("replay", service="refscore", limit=1))
    assert [(r.key, r.value) for r in broker.records("pairs")] == [(b"k2", b"p2")]
    future = (dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)).isoformat()
    rc, text = _run(broker, _args("replay", since=future))
    assert "0 of 4 dead letters" in text
    rc, text = _run(broker, _args("replay", since="2000-01-01T00:00:00"))
    assert "4 of 4 dead letters" in text


def test_letters_carried_by_reference_are_refused_with_how_to_fetch_them():
    broker = FakeBroker()
    sink = DeadLetterSink(FakeProducer(broker), KafkaConfig(), "refscore")
    big = b"x" * (DEAD_LETTER_INLINE_BYTES + 1)
    sink.send_record(FakeRecord("pairs", 2, 11, b"k", big), "record too large", "record_too_large")
    sink.send_record(FakeRecord("pairs", 0, 1, b"k", b"ok"), "bad", "record_too_large")
    rc, text = _run(broker, _args("replay"))
    assert rc == 1
    assert "refused pairs[2]@11: carried by reference" in text
    assert "topic pairs partition 2 offset 11" in text
    assert [r.value for r in broker.records("pairs")] == [b"ok"]


def test_replaying_twice_republishes_again_it_is_the_downstream_ids_that_dedupe():
    broker = _broker_with_letters()
    _run(broker, _args("replay", error_type="decode_error"))
    _run(broker, _args("replay", error_type="decode_error"))
    assert [r.value for r in broker.records("pairs")] == [b"p3", b"p3"]


def test_add_parser_wires_a_subcommand():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    deadletter.add_parser(sub)
    args = parser.parse_args(["deadletter", "replay", "--error-type", "x", "--dry-run"])
    assert args.fn is deadletter.run and args.error_type == "x" and args.dry_run


@pytest.mark.stack
def test_replay_on_the_local_stack_republishes_exactly_the_matching_letters(stack, unique):
    from offdpo.kafka import ensure_topics, make_producer, read_topic

    cfg = dataclasses.replace(stack.kafka, deadletter_topic=f"test.dl.{unique}")
    origin_a, origin_b = f"test.dl-origin-a.{unique}", f"test.dl-origin-b.{unique}"
    ensure_topics(cfg, [cfg.deadletter_topic, origin_a, origin_b], partitions=2)
    producer = make_producer(cfg, "test")
    sink = DeadLetterSink(producer, cfg, "labeler")
    sink.send_record(FakeRecord(origin_a, 1, 5, b"ka", b"va"), "judge down", "judge_error")
    sink.send_record(FakeRecord(origin_b, 0, 6, b"kb", b"vb"), "undecodable", "decode_error")
    sink.send_record(FakeRecord(origin_b, 1, 8, b"kc", b"vc"), "judge down", "judge_error")
    producer.close()

    out = io.StringIO()
    rc = deadletter.run(_args("replay", error_type="judge_error"), kafka_cfg=cfg, out=out)
    assert rc == 0, out.getvalue()
    assert "replayed 2, refused 0" in out.getvalue()
    assert [(r.key, r.value) for r in read_topic(cfg, origin_a)] == [(b"ka", b"va")]
    assert [(r.key, r.value) for r in read_topic(cfg, origin_b)] == [(b"kc", b"vc")]
    assert len(read_topic(cfg, cfg.deadletter_topic)) == 3, "replay does not consume the dead letters"
