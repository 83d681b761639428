"""Outage vs bad data, poison checks, bounded memory and state, safe checkpoints: the trainer's data
sources and checkpoints over in-memory fakes (no broker, no S3, no model)."""

from __future__ import annotations

import json
import math
import threading
import time

import pytest
import urllib3
from kafka.structs import TopicPartition
from minio.error import S3Error

from offdpo import errors
from offdpo.records import ScoredPair, scored_pairs_to_parquet
from services.trainer import checkpoint as ckpt
from services.trainer.examples import EvalSet, is_heldout
from services.trainer.infra import is_infrastructure
from services.trainer.replay import ReplaySource
from services.trainer.shards import examples_from_shard
from tests.fakes import FakeObjectStore

from .test_data import FP, SHARDS, Stream, ids, put_shard, row


def s3_error(code: str) -> S3Error:
    return S3Error(None, code, f"{code} (test)", "/k", "", "", "fake", "k")  # type: ignore[arg-type]


def fast_retries(monkeypatch):
    """Backoff steps of milliseconds: the policy is the real one, only its clock is shortened."""
    from offdpo import retry

    real = retry.policy
    monkeypatch.setattr(
        retry, "policy", lambda what, **kw: real(what, **{**kw, "initial_s": 0.001, "max_delay_s": 0.005})
    )


# -- outage vs bad data ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "exc",
    [
        s3_error("AccessDenied"),
        s3_error("RequestTimeTooSkewed"),
        s3_error("InternalError"),
        urllib3.exceptions.MaxRetryError(None, "/k", "connection refused"),  # type: ignore[arg-type]
        ConnectionRefusedError("connection refused"),
        errors.Unavailable("S3 down"),
    ],
    ids=lambda e: getattr(e, "code", None) or type(e).__name__,
)
def test_an_outage_is_retried_never_deadlettered_and_nothing_is_committed_past_it(monkeypatch, caplog, exc):
    fast_retries(monkeypatch)
    s = Stream()
    rows = [row(str(i)) for i in range(4)]
    s.announce(put_shard(s.store, rows, 0), rows)
    s.store.fail_next(5, exc)
    batch = s.source.next_batch(4)
    assert sorted(ids(batch)) == sorted(r.pair.pair_id for r in rows), "the shard is trained once S3 answers"
    assert s.deadletters() == {}, "an outage is not bad data"
    assert s.source.infra.errors_total == 5 and s.source.infra.backoff_s == 0
    steps = [r.getMessage() for r in caplog.records if "infrastructure, not bad data" in r.getMessage()]
    assert len(steps) == 5, "one log line per backoff step"


def test_a_stop_ends_the_wait_promptly_and_the_event_is_not_passed(monkeypatch):
    s = Stream()
    rows = [row(str(i)) for i in range(4)]
    first = put_shard(s.store, rows[:2], 0)
    s.announce(first, rows[:2])  # offset 0: trained
    s.source.mark_trained(s.source.next_batch(2) or [])
    s.announce(put_shard(s.store, rows[2:], 2), rows[2:])  # offset 1: S3 fails for it, for ever
    s.store.fail_next(10**6, s3_error("AccessDenied"))
    stop = threading.Event()
    s.source.stop = stop
    threading.Timer(0.5, stop.set).start()
    t0 = time.monotonic()
    assert s.source.next_batch(2) is None
    assert time.monotonic() - t0 < 5, "the stop signal ends the backoff"
    assert s.source.resume_offsets() == {0: 1}, "the event whose shard could not be read is not passed"
    s.source.commit()
    assert s.committed() == 1 and s.deadletters() == {}


def test_only_data_that_is_wrong_is_deadlettered():
    assert not is_infrastructure(s3_error("NoSuchKey")) and not is_infrastructure(KeyError("k"))
    assert not is_infrastructure(errors.CorruptShard("x"))
    assert is_infrastructure(s3_error("AccessDenied")) and is_infrastructure(errors.Unavailable("x"))
    s = Stream()
    s.source.max_shard_bytes = 200
    big = put_shard(s.store, [row(str(i)) for i in range(3)], 0)
    s.announce(big, [row("0")])
    s.announce("scores/none/missing.parquet", [row("1")])
    assert s.source.next_batch(4) is None
    letters = s.deadletters()
    assert set(letters) == {"shard_too_large", "shard_unreadable"}
    assert big in letters["shard_too_large"].reason and "--max-shard-bytes" in letters["shard_too_large"].reason
    assert "does not exist" in letters["shard_unreadable"].reason
    assert s.source.resume_offsets() == {0: 2}, "bad data is dead-lettered and passed"


def test_a_deadletter_the_broker_does_not_acknowledge_is_retried_before_moving_on(monkeypatch):
    fast_retries(monkeypatch)
    s = Stream()
    s.source.deadletter.producer.fail_next(3, TimeoutError("broker down"))
    s.broker.append(SHARDS, b"\xff garbage", partition=0)
    assert s.source.next_batch(4) is None
    assert set(s.deadletters()) == {"decode_error"} and s.source.infra.errors_total == 3


# -- poison ----------------------------------------------------------------------------------------
def poisoned(name: str, token: int | None = None, logprob: float | None = None) -> ScoredPair:
    r = row(name)
    if token is not None:
        r.chosen_token_ids[0] = token
    if logprob is not None:
        r.rejected_logprobs[1] = logprob
    return r


def test_poisoned_rows_are_refused_with_their_pair_id():
    rows = [
        row("ok"),
        poisoned("oov", token=5000),
        poisoned("nan", logprob=math.nan),
        poisoned("inf", logprob=-math.inf),
    ]
    rows.append(poisoned("neg", token=-1))
    data = scored_pairs_to_parquet(rows, FP)
    examples, refusals = examples_from_shard(data, "k", FP, set(), 64, "refuse", vocab_size=1000)
    assert ids(examples) == [rows[0].pair.pair_id]
    by_pair = {next(r.pair.pair_id for r in rows if r.pair.pair_id in x): x.error_type for x in refusals}
    assert by_pair == {
        rows[1].pair.pair_id: "token_out_of_vocab",
        rows[2].pair.pair_id: "poisoned_values",
        rows[3].pair.pair_id: "poisoned_values",
        rows[4].pair.pair_id: "token_out_of_vocab",
    }


def test_stream_deadletters_poisoned_rows_and_trains_the_rest():
    s = Stream()
    s.source.vocab_size = 1000
    rows = [row("a"), poisoned("oov", token=1000), poisoned("nan", logprob=math.nan), row("b")]
    s.announce(put_shard(s.store, rows, 0), rows)
    assert sorted(ids(s.source.next_batch(4))) == sorted([rows[0].pair.pair_id, rows[3].pair.pair_id])
    letters = s.deadletters()
    assert rows[1].pair.pair_id in letters["token_out_of_vocab"].reason
    assert rows[2].pair.pair_id in letters["poisoned_values"].reason


def test_replay_refuses_poisoned_shards_before_training():
    store = FakeObjectStore()
    put_shard(store, [row("a"), poisoned("inf", logprob=math.inf)], 0)
    with pytest.raises(errors.BadInput, match="non-finite"):
        ReplaySource(store, "scores/", 1, 0, FP, set(), 64, "refuse", vocab_size=1000)


# -- bounded state -----------------------------------------------------------------------------------
def test_stream_state_is_bounded_and_exactly_once_across_a_crash_before_the_commit():
    s = Stream()
    s.source.max_poll_records = 2
    rows = [row(str(i)) for i in range(40)]
    for n in range(10):  # 10 shards of 4 pairs, one event each
        s.announce(put_shard(s.store, rows[4 * n : 4 * n + 4], 4 * n), rows[4 * n : 4 * n + 4])
    taken: list[str] = []
    for _ in range(5):  # 30 pairs trained in batches of 6: events 0-6 done, event 7 half trained
        batch = s.source.next_batch(6) or []
        s.source.mark_trained(batch)
        taken += ids(batch)
    assert len(s.consumer.commits) == 0
    state = json.loads(json.dumps(s.source.state()))  # as the checkpoint stores it
    assert "trained_pair_ids" not in state
    assert state["offsets"] == {"0": 7} and [e["offset"] for e in state["in_flight"]] == [7]
    assert len(state["in_flight"][0]["pending"]) == 2
    # Killed before the commit: the group redelivers every event from the start.
    restarted = s.open()
    restarted.load_state(state)
    rest: list[str] = []
    while (batch := restarted.next_batch(6)) is not None:
        restarted.mark_trained(batch)
        rest += ids(batch)
    assert sorted(taken + rest) == sorted(r.pair.pair_id for r in rows) and len(set(taken + rest)) == 40
    restarted.commit()
    assert s.broker.committed[(s.group, TopicPartition(SHARDS, 0))] == 10
    assert restarted.state()["in_flight"] == [] and restarted.state()["done_offsets"] == {}


def test_the_dedup_window_is_bounded_and_a_pair_in_two_shards_trains_once_within_it():
    s = Stream()
    s.source.recent.size = 3
    rows = [row(str(i)) for i in range(5)]
    s.announce(put_shard(s.store, rows, 0), rows)
    s.source.mark_trained(s.source.next_batch(5) or [])
    assert len(list(s.source.recent)) == 3
    again = put_shard(s.store, rows[2:], 10)  # the last 3 pairs again, in another shard
    s.announce(again, rows[2:])
    assert s.source.next_batch(5) is None


def test_stream_polls_a_bounded_number_of_events():
    s = Stream()
    s.source.max_poll_records = 2
    polls: list[int | None] = []
    real = s.consumer.poll
    s.consumer.poll = lambda **kw: polls.append(kw.get("max_records")) or real(**kw)
    rows = [row(str(i)) for i in range(6)]
    for n in range(6):
        s.announce(put_shard(s.store, rows[n : n + 1], n), rows[n : n + 1])
    s.source.next_batch(6)
    assert polls and set(polls) == {2}


def test_replay_streams_windows_and_keeps_each_pair_once_per_epoch():
    store = FakeObjectStore()
    rows = [row(str(i)) for i in range(30)]
    for n in range(10):
        put_shard(store, rows[3 * n : 3 * n + 3], 3 * n)
    put_shard(store, rows[:3], 100)  # the same pairs in another shard
    source = ReplaySource(store, "scores/", 2, 1, FP, set(), 64, "refuse", shuffle_pairs=5)
    assert source.num_pairs == 30 and not hasattr(source, "pairs")
    store.calls.clear()
    epoch1 = [p for b in iter(lambda: source.next_batch(7), None) for p in ids(b)]
    assert len(epoch1) == 60 and sorted(epoch1[:30]) == sorted(epoch1[30:]) == sorted(r.pair.pair_id for r in rows)
    assert epoch1[:30] != epoch1[30:], "each epoch has its own order"
    assert sum(op == "get" for op, _ in store.calls) == 2 * 10, "each owning shard read once per epoch"
    # Resume mid-epoch: the same order from there, without reading the windows before it.
    again = ReplaySource(store, "scores/", 2, 1, FP, set(), 64, "refuse", shuffle_pairs=5)
    for _ in range(7):  # epoch 0 (7, 7, 7, 7, 2), then two batches into epoch 1
        again.next_batch(7)
    resumed = ReplaySource(store, "scores/", 2, 1, FP, set(), 64, "refuse", shuffle_pairs=5)
    resumed.load_state(again.state())
    store.calls.clear()
    rest = [p for b in iter(lambda: resumed.next_batch(7), None) for p in ids(b)]
    assert rest == epoch1[-16:]
    assert sum(op == "get" for op, _ in store.calls) < 10, "the windows before the position are not read"


def test_replay_refuses_a_shard_changed_under_it():
    store = FakeObjectStore()
    key = put_shard(store, [row("a"), row("b")], 0)
    source = ReplaySource(store, "scores/", 1, 0, FP, set(), 64, "refuse")
    store.put_bytes(key, scored_pairs_to_parquet([row("a"), row("c")], FP))
    with pytest.raises(errors.BadInput, match="changed since this replay checked it"):
        source.next_batch(2)


# -- held-out split ------------------------------------------------------------------------------
def test_the_heldout_split_is_deterministic_disjoint_and_never_trained():
    pids = [f"{i:032x}" for i in range(4000)]
    held = [p for p in pids if is_heldout(p, 0.05)]
    assert held == [p for p in pids if is_heldout(p, 0.05)], "deterministic"
    assert 0.03 < len(held) / len(pids) < 0.07
    assert not any(is_heldout(p, 0.0) for p in pids)
    store = FakeObjectStore()
    rows = [row(str(i)) for i in range(60)]
    put_shard(store, rows, 0)
    evals = EvalSet(0.2, 5)
    source = ReplaySource(store, "scores/", 1, 0, FP, set(), 64, "refuse", evals=evals)
    trained = {p for b in iter(lambda: source.next_batch(8), None) for p in ids(b)}
    heldout = {r.pair.pair_id for r in rows if is_heldout(r.pair.pair_id, 0.2)}
    assert heldout and trained.isdisjoint(heldout) and trained | heldout == {r.pair.pair_id for r in rows}
    assert len(evals.examples) == min(5, len(heldout)) and {e.pair_id for e in evals.examples} <= heldout

    s = Stream()
    s.source.evals = EvalSet(0.2, 5)
    s.announce(put_shard(s.store, rows, 0), rows)
    streamed = set()
    while (batch := s.source.next_batch(8)) is not None:
        s.source.mark_trained(batch)
        streamed |= set(ids(batch))
    assert streamed == trained and len(s.source.evals.examples) == min(5, len(heldout))
    assert s.source.resume_offsets() == {0: 1}, "an event whose other pairs are trained is done"


# -- checkpoints -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "prefix",
    ["../../x", "runs/ck/checkpoints/../../other/checkpoints/step-1", "/etc", "runs/other/checkpoints/step-1", 7],
)
def test_a_latest_pointing_outside_the_run_is_refused(prefix):
    store = FakeObjectStore()
    store.put_bytes("runs/ck/latest", json.dumps({"step": 1, "prefix": prefix}).encode())
    with pytest.raises(ckpt.UnsafeCheckpoint, match="refusing|not allowed") as err:
        ckpt.latest_checkpoint(store, "ck")
    assert isinstance(err.value, errors.BadInput) and err.value.error_type == "unsafe_checkpoint"


def test_checkpoint_keys_outside_the_model_folder_are_never_written(tmp_path):
    store = FakeObjectStore()
    prefix = "runs/ck/checkpoints/step-00000001"
    store.put_bytes(f"{prefix}/model/config.json", b"{}")
    store.put_bytes(f"{prefix}/model/../../../../escape.txt", b"x")
    dest = tmp_path / "dl"
    dest.mkdir()
    with pytest.raises(ckpt.UnsafeCheckpoint, match="escape.txt"):
        ckpt.download_model(store, prefix, dest)
    assert list(dest.iterdir()) == [] and not (tmp_path / "escape.txt").exists()
    del store.objects[f"{prefix}/model/../../../../escape.txt"]
    ckpt.download_model(store, prefix, dest)
    assert (dest / "config.json").read_bytes() == b"{}"
    assert ckpt.latest_checkpoint(store, "ck") is None


def test_prepare_turns_an_unsafe_latest_into_a_clear_refusal(monkeypatch, tiny_model):
    from services.trainer import train
    from services.trainer.config import TrainerConfig
    from services.trainer.messages import Failure

    store = FakeObjectStore()
    put_shard(store, [row("a")], 0)
    store.put_bytes("runs/ck/latest", json.dumps({"step": 1, "prefix": "../../x"}).encode())
    cfg = TrainerConfig(model=str(tiny_model), run_name="ck", prefix="scores/")
    monkeypatch.setattr(train, "expected_fingerprint", lambda cfg: FP)
    source, setup = train.prepare(cfg, store, None, threading.Event())  # type: ignore[arg-type]
    assert source is None and isinstance(setup, Failure)
    assert "'../../x'" in setup.message and "not a checkpoint of this run" in setup.message
