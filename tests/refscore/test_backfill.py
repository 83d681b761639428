"""Rescore / backfill (services/refscore/backfill.py) on the local stack.

64 pairs go through the real stream worker under reference A (the session's tiny model) and the
pairs archiver; then `python -m services.refscore rescore` scores them under reference B (same
architecture and tokenizer, other random weights, so another fingerprint), killed (SIGKILL) right
after its first shard and rerun; then a rescore from the archive alone, the pairs topic deleted. The
transformers engine throughout: no vLLM engine beside the package's shared one.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from kafka import KafkaAdminClient, KafkaConsumer

from localdev.process import stop_process, wait_until
from offdpo import archive, records
from offdpo.kafka import ensure_topics, make_producer, read_topic
from offdpo.s3 import ObjectStore
from offdpo.v1 import records_pb2
from services.refscore import backfill
from tests.pairs import make_pairs
from tests.refscore.conftest import load_scorer as _scorer
from tests.refscore.conftest import transformers_cfg as _cfg
from tests.test_archive import archive_topic

REPO = Path(__file__).resolve().parents[2]
N_PAIRS = 64
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def scorer_b(model_b):
    scorer = _scorer(model_b)
    yield scorer
    scorer.shutdown()


@dataclasses.dataclass
class Scored:
    kafka: object
    store: ObjectStore
    fp_a: records_pb2.ReferenceFingerprint
    pairs: list
    source_keys: list[str]

    @property
    def prefix(self) -> str:
        return f"scores/{self.fp_a.fingerprint_id}/{self.kafka.pairs_topic}/"


@pytest.fixture(scope="module")
def scored_a(stack, tiny_model):
    """64 pairs in a 2-partition topic, scored under A by the stream worker (shards of <= 16 pairs)
    and archived by the pairs archiver."""
    import uuid

    from services.refscore.worker import StreamWorker

    tag = uuid.uuid4().hex[:8]
    kafka = dataclasses.replace(
        stack.kafka,
        pairs_topic=f"bf.pairs.{tag}",
        shards_topic=f"bf.shards.{tag}",
        deadletter_topic=f"bf.dead.{tag}",
    )
    ensure_topics(stack.kafka, [kafka.pairs_topic, kafka.shards_topic, kafka.deadletter_topic], partitions=2)
    pairs = make_pairs(N_PAIRS, tag)
    producer = make_producer(kafka, "test-backfill")
    for pair in pairs:
        producer.send(kafka.pairs_topic, key=pair.pair_id.encode(), value=pair.SerializeToString())
    producer.flush()
    producer.close()

    cfg = _cfg(tiny_model, group_id=f"bf-{tag}", batch_pairs=16)
    scorer = _scorer(tiny_model)
    stop = threading.Event()
    thread = threading.Thread(target=StreamWorker(scorer, cfg, kafka, stack.s3).run, args=(stop,), daemon=True)
    thread.start()
    store = ObjectStore(stack.s3)
    try:
        prefix = f"scores/{scorer.fingerprint.fingerprint_id}/{kafka.pairs_topic}/"

        def all_scored():
            ids = [pid for k in store.list_keys(prefix) for pid in records.read_shard(store.get_bytes(k)).pair_ids]
            return sorted(ids) == sorted(p.pair_id for p in pairs)

        wait_until(all_scored, 180, "the stream worker scoring all 64 pairs under A", every_s=1.0)
    finally:
        stop.set()
        thread.join(timeout=60)
        scorer.shutdown()
    archive_topic(stack, kafka, f"bf-archive-{tag}", batch_records=20)
    keys = store.list_keys(prefix)
    assert len(keys) >= 4, f"want several source shards to kill the backfill midway, got {keys}"
    return Scored(kafka, store, scorer.fingerprint, pairs, keys)


def _rows(store, prefix):
    """{pair_id: ScoredPair} and the list of every row's pair id (duplicates kept)."""
    rows, ids = {}, []
    for key in store.list_keys(prefix):
        for row in records.read_shard(store.get_bytes(key), key).rows():
            rows[row.pair.pair_id] = row
            ids.append(row.pair.pair_id)
    return rows, ids


def _assert_equal_to_fresh_scoring(rows, pairs, scorer):
    prepared = [scorer.prepare_pair(p) for p in pairs]
    fresh = scorer.score_pairs(prepared, timeout=300)
    worst = 0.0
    for f in fresh:
        row = rows[f.prepared.pair.pair_id]
        assert list(row.prompt_token_ids) == f.prepared.prompt_ids
        assert list(row.chosen_token_ids) == f.prepared.chosen_ids
        assert list(row.rejected_token_ids) == f.prepared.rejected_ids
        for got, want in ((row.chosen_logprobs, f.chosen_logprobs), (row.rejected_logprobs, f.rejected_logprobs)):
            assert len(got) == len(want)
            worst = max([worst] + [abs(a - b) for a, b in zip(got, want)])
    assert worst <= TOLERANCE, f"largest per-token difference to fresh scoring under B: {worst}"


def _run_rescore(stack, args, log_path, extra_env=None, timeout_s=240):
    env = {**os.environ, **stack.env(), "PYTHONPATH": str(REPO), "OFFDPO_REFSCORE_MAX_MODEL_LEN": "512"}
    env.update(extra_env or {})
    cmd = [sys.executable, "-m", "services.refscore", "rescore", *args]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT)
    try:
        return proc.wait(timeout=timeout_s)
    finally:
        stop_process(proc)


def test_rescore_under_b_killed_midway_and_rerun_scores_every_pair_once(stack, scored_a, model_b, scorer_b, tmp_path):
    s = scored_a
    fp_b = scorer_b.fingerprint.fingerprint_id
    assert fp_b != s.fp_a.fingerprint_id
    shards_topic = f"{s.kafka.shards_topic}.b"
    ensure_topics(stack.kafka, [shards_topic], partitions=1)
    args = ["--from", s.prefix, "--model", str(model_b), "--engine", "transformers", "--shards-topic", shards_topic]
    args += ["--batch-pairs", "8"]
    out_prefix = f"scores/{fp_b}/{s.kafka.pairs_topic}/"
    expected_keys = sorted(backfill.parse_scores_key(k).out_key(fp_b) for k in s.source_keys)

    code = _run_rescore(stack, args, tmp_path / "kill.log", {"OFFDPO_REFSCORE_FAILPOINT": "after_shard_write"})
    log1 = (tmp_path / "kill.log").read_text(errors="replace")
    assert code == -9, f"the failpoint should SIGKILL the backfill; exit {code}\n{log1[-3000:]}"
    written = s.store.list_keys(out_prefix)
    assert len(written) == 1 and written[0] in expected_keys, written
    first_bytes = s.store.get_bytes(written[0])

    code = _run_rescore(stack, args, tmp_path / "rerun.log")
    log2 = (tmp_path / "rerun.log").read_text(errors="replace")
    assert code == 0, log2[-3000:]
    assert "pairs/s, ETA" in log2, "progress (count, rate, ETA) on stderr"

    keys = s.store.list_keys(out_prefix)
    assert keys == expected_keys, "one shard per source shard, under the same key scheme"
    assert s.store.get_bytes(written[0]) == first_bytes, "the shard written before the kill is kept as it was"
    rows, ids = _rows(s.store, out_prefix)
    assert len(ids) == len(set(ids)) == N_PAIRS and set(ids) == {p.pair_id for p in s.pairs}, "each pair once"
    assert all(r.fingerprint.fingerprint_id == fp_b for r in rows.values())
    _assert_equal_to_fresh_scoring(rows, s.pairs, scorer_b)

    events = [records_pb2.ShardReady.FromString(r.value) for r in read_topic(stack.kafka, shards_topic, idle_s=1.0)]
    assert sorted(e.object_key for e in events) == keys, "every shard announced once (the first by the rerun)"
    sources = {backfill.parse_scores_key(k).out_key(fp_b): backfill.parse_scores_key(k) for k in s.source_keys}
    for e in events:
        src = sources[e.object_key]
        assert e.fingerprint.fingerprint_id == fp_b and e.row_count == len(e.pair_ids)
        assert e.sha256 == records.sha256_hex(s.store.get_bytes(e.object_key))
        rng = e.source_ranges[0]
        assert (rng.topic, rng.partition, rng.first_offset, rng.last_offset) == (
            src.topic,
            src.partition,
            src.first,
            src.last,
        )

    # A third run finds everything written and announced: no write, no event.
    code = _run_rescore(stack, args, tmp_path / "again.log")
    assert code == 0, (tmp_path / "again.log").read_text()[-3000:]
    assert s.store.list_keys(out_prefix) == keys
    assert len(read_topic(stack.kafka, shards_topic, idle_s=1.0)) == len(events)


def test_rescore_under_a_trainer_checkpoint_in_s3(stack, scored_a, model_b, scorer_b, tmp_path, unique):
    """`--model s3://.../checkpoints/step-N/model/`: the new reference is downloaded like refscore's
    (services/refscore/model_source.py) and scores every pair as the same weights do from a folder."""
    s = scored_a
    run = f"bf-ckpt-{unique}"
    for f in model_b.iterdir():
        s.store.put_bytes(f"runs/{run}/checkpoints/step-7/model/{f.name}", f.read_bytes())
    uri = f"s3://{s.store.bucket}/runs/{run}/checkpoints/step-7/model/"
    shards_topic = f"{s.kafka.shards_topic}.ckpt.{unique}"
    ensure_topics(stack.kafka, [shards_topic], partitions=1)
    args = ["--from", s.prefix, "--model", uri, "--engine", "transformers", "--shards-topic", shards_topic]
    env = {"OFFDPO_REFSCORE_MODEL_CACHE": str(tmp_path / "cache")}
    code = _run_rescore(stack, args, tmp_path / "ckpt.log", env)
    log = (tmp_path / "ckpt.log").read_text(errors="replace")
    assert code == 0, log[-3000:]
    fp = log.rsplit("fingerprint ", 1)[-1].split()[0]
    assert fp not in (s.fp_a.fingerprint_id, scorer_b.fingerprint.fingerprint_id), "a checkpoint names itself"
    rows, ids = _rows(s.store, f"scores/{fp}/{s.kafka.pairs_topic}/")
    assert sorted(ids) == sorted(p.pair_id for p in s.pairs), "each pair once"
    assert {r.fingerprint.model_id for r in rows.values()} == {f"{run}@step-7"}
    _assert_equal_to_fresh_scoring(rows, s.pairs, scorer_b)  # the same weights as model B's folder

    args = ["--from", s.prefix, "--model", uri + "nothing/", "--engine", "transformers"]
    missing = _run_rescore(stack, args, tmp_path / "missing.log", env)
    assert missing == 2 and "nothing/" in (tmp_path / "missing.log").read_text(errors="replace")


def test_rescore_from_the_archive_alone_gives_the_same_pairs(stack, scored_a, scorer_b, unique):
    s = scored_a
    admin = KafkaAdminClient(**stack.kafka.client_kwargs(), client_id="test-backfill")
    try:
        admin.delete_topics([s.kafka.pairs_topic])
    finally:
        admin.close()
    wait_until(
        lambda: s.kafka.pairs_topic not in set(KafkaConsumer(**stack.kafka.client_kwargs()).topics()),
        60,
        "the pairs topic deleted",
    )
    bucket = f"rescore-{unique}"
    out = ObjectStore(stack.s3, bucket)
    shards_topic = f"{s.kafka.shards_topic}.arch"
    ensure_topics(stack.kafka, [shards_topic], partitions=1)
    kafka = dataclasses.replace(stack.kafka, shards_topic=shards_topic)
    progress = io.StringIO()
    result = backfill.Backfill(scorer_b, s.store, kafka, out_store=out, progress_out=progress).run(
        f"{archive.ARCHIVE_PREFIX}{s.kafka.pairs_topic}/"
    )
    fp_b = scorer_b.fingerprint.fingerprint_id
    rows, ids = _rows(out, f"scores/{fp_b}/{s.kafka.pairs_topic}/")
    assert len(ids) == len(set(ids)) == N_PAIRS and set(ids) == {p.pair_id for p in s.pairs}
    assert result.pairs_scored == N_PAIRS and result.shards_written == len(result.out_keys)
    assert "64/64 pairs" in progress.getvalue()
    _assert_equal_to_fresh_scoring(rows, s.pairs, scorer_b)
    events = [records_pb2.ShardReady.FromString(r.value) for r in read_topic(stack.kafka, shards_topic, idle_s=1.0)]
    assert sorted(e.object_key for e in events) == result.out_keys and all(e.bucket == bucket for e in events)

    # Replay: the trainer's replay source over those shards takes exactly the 64 pairs, once each.
    from services.trainer.replay import ReplaySource

    replay = ReplaySource(out, f"scores/{fp_b}/", 1, 0, scorer_b.fingerprint, set(), 512, "refuse")
    taken = []
    while (batch := replay.next_batch(16)) is not None:
        taken += [ex.pair_id for ex in batch]
    assert sorted(taken) == sorted(p.pair_id for p in s.pairs)


# -- bad input: a clear error naming the shard or pair, nothing written --------------------------------------
def test_a_prefix_that_mixes_fingerprints_is_refused_naming_the_shard(stack, scored_a, scorer_b, unique):
    s = scored_a
    fp_a = s.fp_a.fingerprint_id
    topic = f"mixed.{unique}"
    good = s.store.get_bytes(s.source_keys[0])
    s.store.put_bytes(records.shard_key(fp_a, topic, 0, 0, 15, topic_id="x"), good)
    # A shard scored by another reference, stored under A's prefix.
    other = records.with_fingerprint_id(records_pb2.ReferenceFingerprint(model_id="other", weights_hash="w"))
    rows = list(records.read_shard(good).rows())
    intruder = records.shard_key(fp_a, topic, 0, 16, 31, topic_id="x")
    s.store.put_bytes(intruder, records.scored_pairs_to_parquet(rows, other))
    with pytest.raises(backfill.MixedFingerprints, match=f"{intruder}.*{other.fingerprint_id}"):
        backfill.Backfill(scorer_b, s.store, stack.kafka).run(f"scores/{fp_a}/{topic}/")
    assert s.store.list_keys(f"scores/{scorer_b.fingerprint.fingerprint_id}/{topic}/") == [], "nothing written"


def test_a_checkpoint_without_a_tokenizer_is_refused_naming_it(stack, scored_a, model_b, tmp_path, capsys):
    bare = tmp_path / "step-100" / "model"
    bare.mkdir(parents=True)
    for f in model_b.iterdir():
        if f.name not in backfill.TOKENIZER_FILES and "token" not in f.name and f.name != "merges.txt":
            shutil.copy(f, bare / f.name)
    with pytest.raises(backfill.ModelWithoutTokenizer, match="has no tokenizer"):
        backfill.check_model_dir(bare)
    before = scored_a.store.list_keys("scores/")
    code = backfill.main(["--from", scored_a.prefix, "--model", str(bare)])
    err = capsys.readouterr().err
    assert code == 2 and "ModelWithoutTokenizer" in err and str(bare) in err, err
    from cli.main import main as offdpo  # the same through `offdpo rescore`

    assert offdpo(["rescore", "--from", scored_a.prefix, "--model", str(bare)]) == 2
    assert "ModelWithoutTokenizer" in capsys.readouterr().err
    assert scored_a.store.list_keys("scores/") == before


def test_a_reference_that_cannot_encode_the_stored_pairs_is_refused_naming_the_pair(stack, scored_a, model_b, tmp_path):
    """A new reference without a chat template cannot tokenise the stored chat prompts."""
    plain = tmp_path / "no-template"
    shutil.copytree(model_b, plain)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    for f in plain.glob("chat_template*"):
        f.unlink()
    scorer = _scorer(plain)
    try:
        assert not scorer.model().boundary.chat_template
        first = records.read_shard(scored_a.store.get_bytes(scored_a.source_keys[0])).pair_ids[0]
        with pytest.raises(backfill.UnencodablePair, match=f"{scored_a.source_keys[0]}.*pair {first}.*chat template"):
            backfill.Backfill(scorer, scored_a.store, stack.kafka).run(scored_a.prefix)
        fp = scorer.fingerprint.fingerprint_id
    finally:
        scorer.shutdown()
    assert scored_a.store.list_keys(f"scores/{fp}/") == [], "nothing written: the rerun starts clean"


def test_rescoring_under_the_same_reference_is_refused(stack, scored_a, tiny_model):
    scorer = _scorer(tiny_model)
    try:
        with pytest.raises(backfill.SameReference):
            backfill.Backfill(scorer, scored_a.store, stack.kafka).run(scored_a.prefix)
    finally:
        scorer.shutdown()


def test_source_keys_parse_like_the_stream_workers():
    key = records.shard_key("fpA", "t.pairs", 2, 5, 9, topic_id="Zm9v")
    src = backfill.parse_scores_key(key)
    assert (src.topic, src.topic_id, src.partition, src.first, src.last) == ("t.pairs", "Zm9v", 2, 5, 9)
    assert src.out_key("fpB") == records.shard_key("fpB", "t.pairs", 2, 5, 9, topic_id="Zm9v")
    legacy = backfill.parse_scores_key(records.shard_key("fpA", "t", 0, 0, 3))
    assert legacy.topic_id is None and legacy.out_key("fpB") == "scores/fpB/t/p0000-000000000000-000000000003.parquet"
    with pytest.raises(backfill.RescoreError):
        backfill.parse_scores_key("scores/fpA/t/extra/deep/p0000-0-1.parquet")
