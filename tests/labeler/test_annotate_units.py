"""Fast tests of the annotation app (no broker, no browser): agreement math against hand-computed
values, the queue's leases / overlap / undo / majority, the pairs it publishes, the judge calibration
with a fake judge whose verdicts are known, and the HTTP refusals (401, 403, oversized rationale)."""

from __future__ import annotations

import hashlib
import http.server
import json
import random
import threading
import time

import pytest

from offdpo import records
from offdpo.config import KafkaConfig
from offdpo.records import decode, decode_pair
from offdpo.v1 import labeler_pb2, records_pb2
from services.labeler.annotate import Annotation, Guidelines, Queue, Tokens, create_app
from services.labeler.annotate.agreement import cohen_kappa, krippendorff_alpha_nominal
from services.labeler.annotate.queue import BAD, NO_MAJORITY, TIE, A, B, QueueError, majority, verdict_for_key
from services.labeler.annotate.service import agreement
from services.labeler.calibrate import INCONSISTENT, Sample, calibrate, report
from services.labeler.config import AnnotateConfig, JudgeConfig, LabelerConfig
from services.labeler.inputs import Item
from services.labeler.judge import LLMJudgeStrategy
from services.labeler.runner import build_labeler
from tests.fakes import FakeBroker, FakeProducer

from .test_units import FakeJudge

KAFKA = KafkaConfig(pairs_topic="pairs", deadletter_topic="dlq", candidates_topic="cands")


def cs(i: int, a: str | None = None, b: str | None = None, prompt: str | None = None) -> labeler_pb2.CandidateSet:
    out = labeler_pb2.CandidateSet(set_id=f"s{i}", answers=[a or f"answer A{i}", b or f"answer B{i}"])
    out.prompt.CopyFrom(records.text_prompt(prompt or f"prompt {i}"))
    return out


def item(c: labeler_pb2.CandidateSet, offset: int = 0) -> Item[labeler_pb2.CandidateSet]:
    return Item(source="cands", offset=offset, raw=c.SerializeToString(), value=c, partition=0)


# -- agreement ---------------------------------------------------------------------------------
def test_cohen_kappa_hand_computed():
    # p_o = 4/6; marginals a 3/3, b 2/2, tie 1/1 -> p_e = 14/36; kappa = (24-14)/(36-14) = 10/22
    pairs = [(A, A), (A, A), (B, B), (A, B), (B, A), (TIE, TIE)]
    assert cohen_kappa(pairs) == pytest.approx(10 / 22)
    assert cohen_kappa([(A, A), (B, B)]) == pytest.approx(1.0)
    assert cohen_kappa([(A, B), (B, A)]) == pytest.approx(-1.0)
    assert cohen_kappa([]) is None
    assert cohen_kappa([(A, A), (A, A)]) is None  # one category only: chance agreement is 1


def test_krippendorff_alpha_nominal_hand_computed():
    # coincidences: (a,a)=2, (a,b)=(b,a)=1, (b,b)=2; n=6; alpha = 1 - 5 * 2 / (3*3*2) = 4/9
    assert krippendorff_alpha_nominal([[A, A], [A, B], [B, B]]) == pytest.approx(4 / 9)
    # three raters: (a,a)=3+1, (a,b)=(b,a)=1, (b,b)=3; n_a=5, n_b=4, n=9; alpha = 1 - 8 * 2 / 40 = 0.6
    assert krippendorff_alpha_nominal([[A, A, A], [A, A, B], [B, B, B]]) == pytest.approx(0.6)
    # units with one rating are left out; missing ratings allowed
    assert krippendorff_alpha_nominal([[A], [A, A, A], [A, A, B], [B, B, B]]) == pytest.approx(0.6)
    assert krippendorff_alpha_nominal([[A, A], [A, A]]) is None
    assert krippendorff_alpha_nominal([]) is None


# -- the queue ---------------------------------------------------------------------------------
def queue(tmp_path, **kw) -> Queue:
    return Queue(tmp_path / "q.sqlite", rng=random.Random(7), **kw)


def test_keys_map_to_answers_through_the_displayed_order():
    assert verdict_for_key("1", a_left=True) == A and verdict_for_key("1", a_left=False) == B
    assert verdict_for_key("2", a_left=True) == B and verdict_for_key("2", a_left=False) == A
    assert verdict_for_key("0", True) == TIE and verdict_for_key("b", False) == BAD
    with pytest.raises(QueueError):
        verdict_for_key("x", True)


def test_majority():
    assert majority([A, A]) == A
    assert majority([A, B]) == NO_MAJORITY
    assert majority([A, B, A]) == A
    assert majority([TIE, TIE, B]) == TIE
    assert majority([]) == NO_MAJORITY


def test_overlap_never_twice_to_the_same_annotator_and_full_items_leave(tmp_path):
    q = queue(tmp_path, overlap=2)
    assert q.add(cs(1), "f") and q.add(cs(2), "f")
    assert not q.add(cs(1), "f"), "the same comparison is queued once"
    t = 1000.0
    c1 = q.claim("alice", t)
    assert c1.item.set_id == "s1"
    assert q.claim("alice", t + 1).item.item_id == c1.item.item_id, "a reload shows the item held"
    assert q.claim("alice", t + 1).a_left == c1.a_left, "in the same order"
    assert q.claim("bob", t).item.set_id == "s1", "the second slot of item 1"
    assert q.claim("carol", t).item.set_id == "s2", "item 1 has its two annotators claimed"
    q.judge("alice", c1.item.item_id, "1", now=t + 5)
    with pytest.raises(QueueError):
        q.judge("alice", c1.item.item_id, "2", now=t + 6)  # not claimed any more: judged already
    assert q.claim("alice", t + 6).item.set_id == "s2"
    q.judge("bob", c1.item.item_id, "2", now=t + 7)
    assert q.progress("carol", t + 8) == (0, 1), "item 1 is full: only item 2 is left for carol"
    assert q.due(t + 7) == [], "still in the grace period"
    assert q.due(t + 7 + q.undo_s) == [c1.item.item_id]


def test_lease_expiry_returns_the_item(tmp_path):
    q = queue(tmp_path, overlap=1, lease_s=30)
    q.add(cs(1), "f")
    t = 1000.0
    held = q.claim("alice", t)
    assert q.claim("bob", t + 10) is None, "the only slot is held"
    again = q.claim("bob", t + 31)
    assert again is not None and again.item.item_id == held.item.item_id, "the lease expired: back in the queue"
    q.judge("bob", held.item.item_id, "1", now=t + 32)
    with pytest.raises(QueueError, match="already has its judgements"):
        q.judge("alice", held.item.item_id, "1", now=t + 33)  # alice's stale tab cannot add a second


def test_skip_and_undo_within_the_grace_period_only(tmp_path):
    q = queue(tmp_path, overlap=1, undo_s=10)
    for i in range(3):
        q.add(cs(i), "f")
    t = 1000.0
    first = q.claim("alice", t)
    assert q.judge("alice", first.item.item_id, "s", now=t + 1) is None
    second = q.claim("alice", t + 2)
    assert second.item.item_id != first.item.item_id, "a skipped item is not shown again"
    j = q.judge("alice", second.item.item_id, "1", rationale="clearer", guideline_version="v1", now=t + 4)
    assert j.time_spent_s == pytest.approx(2.0) and j.a_left == second.a_left
    third = q.claim("alice", t + 4.5)  # the page after the judgement shows the next item
    assert third.item.item_id != second.item.item_id
    assert q.undo("alice", now=t + 5) == second.item.item_id
    back = q.claim("alice", t + 6)
    assert back.item.item_id == second.item.item_id and back.a_left == second.a_left
    q.judge("alice", second.item.item_id, "2", now=t + 7)
    assert q.undo("alice", now=t + 17.5) is None, "final after the grace period"
    assert q.progress("alice", t + 18) == (1, 1), "the third item, released by the undo, is still to do"


# -- publishing --------------------------------------------------------------------------------
def annotation(tmp_path, overlap=2, undo_s=0.0):
    broker = FakeBroker()
    cfg = LabelerConfig(state_dir=str(tmp_path / "state"), batch_size=8)
    lab = build_labeler(cfg, KAFKA, producer=FakeProducer(broker))
    return Annotation(Queue(tmp_path / "q.sqlite", overlap=overlap, undo_s=undo_s), lab), broker


def test_malformed_sets_are_dead_lettered_valid_ones_queued(tmp_path):
    ann, broker = annotation(tmp_path)
    bad = Item(source="cands", offset=3, raw=b"\xff\x00junk", partition=1)
    from offdpo.errors import DecodeError

    bad.error = DecodeError("not a candidate set")
    one = labeler_pb2.CandidateSet(answers=["only one"])
    one.prompt.CopyFrom(records.text_prompt("p"))
    assert ann.ingest([item(cs(1)), bad, item(one, 4), item(cs(2))]) == 2
    letters = [decode(records_pb2.DeadLetter, v, 1 << 20, "dl") for v in broker.values("dlq")]
    assert [(d.offset, d.error_type) for d in letters] == [(3, "decode_error"), (4, "invalid_candidate_set")]
    assert letters[0].original_value == b"\xff\x00junk"


def test_one_pair_per_item_by_majority_with_every_judgement(tmp_path):
    ann, broker = annotation(tmp_path, overlap=2)
    ann.ingest([item(cs(1, a="短的回答", b="a longer answer")), item(cs(2)), item(cs(3))])
    q = ann.queue
    keys = {"s1": ("1", "1"), "s2": ("0", "0"), "s3": ("1", "2")}  # left/left, tie/tie, left/right
    for who, k in (("alice", 0), ("bob", 1)):
        for _ in range(3):
            c = q.claim(who)
            # press the key for the *answer* so the outcome does not depend on the random order
            want = keys[c.item.set_id][k]
            key = want if want == "0" else (("1" if c.a_left else "2") if want == "1" else ("2" if c.a_left else "1"))
            q.judge(who, c.item.item_id, key, rationale=f"{who} says so", guideline_version="g1")
    assert ann.publish_due() >= 1
    assert ann.publish_due() == 0, "decided items are published once"
    pairs = [decode_pair(v) for v in broker.values("pairs")]
    outcomes = {it.set_id: o for it, o in q.decided_items()}
    s3 = outcomes["s3"]
    assert outcomes["s1"] == A and outcomes["s2"] == TIE
    assert len(pairs) == 1 + (s3 in (A, B)) and s3 == NO_MAJORITY
    (pair,) = pairs
    assert pair.chosen == "短的回答" and pair.rejected == "a longer answer"
    assert pair.pair_id == records.pair_id(pair.prompt, pair.chosen, pair.rejected)
    prov = pair.provenance
    assert prov.strategy == records_pb2.LABEL_STRATEGY_HUMAN and prov.annotator == "alice,bob"
    js = json.loads(prov.metadata["judgements"])
    assert [j["annotator"] for j in js] == ["alice", "bob"] and {j["verdict"] for j in js} == {"chosen"}
    assert {j["displayed_order"] for j in js} <= {"chosen_left", "rejected_left"}
    assert js[0]["rationale"] == "alice says so" and prov.metadata["guideline_version"] == "g1"
    assert prov.metadata["displayed_order"].startswith("alice:")
    assert [v.order for v in prov.verdicts] == [
        "chosen_first" if j["displayed_order"] == "chosen_left" else "rejected_first" for j in js
    ]
    overall, per = agreement(q, batch_size=2)
    # items (s1: a,a) (s2: tie,tie) (s3: a,b): p_o = 2/3, marginals a 2/1, tie 1/1, b 0/1 -> p_e = 3/9
    assert overall.items == 3 and overall.kappa == pytest.approx((2 / 3 - 1 / 3) / (1 - 1 / 3))
    assert [b.items for b in per] == [2, 1]


# -- calibration -------------------------------------------------------------------------------
# Eight human-labelled items and the fake judge's verdicts on each, asked (a, b) and then (b, a).
# judge: 1 a, 2 a, 3 b, 4 a, 5 Good/Good (flips), 6 Same/Same, 7 Bad/Bad (flips), 8 b.
CASES = [
    # human, judge (a first), judge (b first), len a, len b
    (A, "Good", "Bad", 30, 10),
    (A, "Good", "Bad", 10, 30),
    (B, "Bad", "Good", 10, 30),
    (B, "Good", "Bad", 30, 10),
    (A, "Good", "Good", 30, 10),
    (TIE, "Same", "Same", 20, 25),
    (B, "Bad", "Bad", 30, 10),
    (BAD, "Bad", "Good", 10, 30),
]


def calibration_samples():
    samples, verdicts = [], {}
    for i, (human, v_ab, v_ba, la, lb) in enumerate(CASES):
        a, b = f"a{i}".ljust(la, "."), f"b{i}".ljust(lb, ",")
        samples.append(Sample(f"i{i}", records.text_prompt(f"question {i}"), a, b, human))
        verdicts[(a, b)], verdicts[(b, a)] = v_ab, v_ba
    return samples, FakeJudge(lambda first, second: verdicts[(first, second)])


def test_calibration_numbers_against_hand_computed_values():
    samples, fake = calibration_samples()
    strategy = LLMJudgeStrategy(fake, JudgeConfig(model=fake.model, concurrency=1))
    rep, decisions = calibrate(strategy, samples, fake.model)
    assert decisions == [A, A, B, A, INCONSISTENT, TIE, INCONSISTENT, B]
    # agreement: item 8 (both bad) left out; flips count as ties ->
    # (a,a) (a,a) (b,b) (b,a) (a,tie) (tie,tie) (b,tie): p_o = 4/7; human a3 b3 tie1, judge a3 b1 tie3
    # p_e = (9 + 3 + 3) / 49 = 15/49; kappa = (28 - 15) / (49 - 15) = 13/34
    assert rep.agreement_items == 7
    assert rep.kappa == pytest.approx(13 / 34)
    assert rep.raw_agreement == pytest.approx(4 / 7)
    # swap consistency: 6 of 8 do not flip
    assert rep.swap_consistency == pytest.approx(6 / 8)
    # length bias: judge wins 1 a(long) 2 a(short) 3 b(long) 4 a(long) 8 b(long) -> 4/5 to the longer
    assert (rep.judge_wins, rep.length_bias) == (5, pytest.approx(0.8))
    # humans: 1 a(long) 2 a(short) 3 b(long) 4 b(short) 5 a(long) 7 b(short) -> 3/6
    assert (rep.human_wins, rep.human_length_bias) == (6, pytest.approx(0.5))
    assert "kappa 0.382" in rep.table() and "75.0%" in rep.table()
    print("\n" + rep.table())


def test_report_is_undefined_not_zero_without_data():
    rep = report([], [])
    assert rep.kappa is None and rep.swap_consistency is None and rep.length_bias is None


# -- HTTP refusals -----------------------------------------------------------------------------
@pytest.fixture
def client(tmp_path):
    from starlette.testclient import TestClient

    tokens = tmp_path / "tokens"
    tokens.write_text(f"alice:{hashlib.sha256(b'tok-alice').hexdigest()}\n")
    cfg = AnnotateConfig(tokens_file=str(tokens), insecure_cookies=True, rationale_max_chars=20, overlap=1)
    ann, _ = annotation(tmp_path, overlap=1)
    ann.ingest([item(cs(1)), item(cs(2))])
    app = create_app(cfg, ann, Tokens.load(str(tokens)), Guidelines.load(version="t1"))
    with TestClient(app, base_url="http://127.0.0.1") as c:
        yield c


def sign_in(client, token="tok-alice"):
    page = client.get("/login")
    csrf = page.text.split('name="csrf" value="')[1].split('"')[0]
    return client.post("/login", data={"csrf": csrf, "token": token}, follow_redirects=False)


def csrf_of(page: str) -> str:
    return page.split('name="csrf" value="')[1].split('"')[0]


def test_no_session_is_401_wrong_token_401(client):
    assert client.get("/").status_code == 401
    assert client.get("/stats").status_code == 401
    assert client.post("/judge", data={"key": "1"}).status_code == 401
    assert sign_in(client, "nope").status_code == 401


def test_cookie_flags_and_forged_form_is_403(tmp_path, client):
    resp = sign_in(client)
    assert resp.status_code == 303
    set_cookie = resp.headers["set-cookie"].lower()
    assert "httponly" in set_cookie and "samesite=strict" in set_cookie
    page = client.get("/")
    assert page.status_code == 200 and "prompt 1" in page.text
    item_id = page.text.split('name="item_id" value="')[1].split('"')[0]
    assert client.post("/judge", data={"csrf": "forged", "item_id": item_id, "key": "1"}).status_code == 403
    login_form = client.get("/login")
    assert client.post("/login", data={"csrf": "forged", "token": "tok-alice"}).status_code == 403
    assert login_form.status_code == 200


def test_secure_cookie_unless_the_dev_flag(tmp_path):
    from starlette.testclient import TestClient

    tokens = tmp_path / "tokens"
    tokens.write_text(f"alice:{hashlib.sha256(b'tok-alice').hexdigest()}\n")
    ann, _ = annotation(tmp_path)
    app = create_app(AnnotateConfig(tokens_file=str(tokens)), ann, Tokens.load(str(tokens)), Guidelines.load())
    with TestClient(app, base_url="https://127.0.0.1") as c:
        assert "secure" in sign_in(c).headers["set-cookie"].lower()


def test_oversized_rationale_refused_with_a_message(client):
    sign_in(client)
    page = client.get("/")
    item_id = page.text.split('name="item_id" value="')[1].split('"')[0]
    form = {"csrf": csrf_of(page.text), "item_id": item_id, "key": "1"}
    resp = client.post("/judge", data=form | {"rationale": "x" * 21})
    assert resp.status_code == 413 and "limit is 20" in resp.text
    ok = client.post("/judge", data=form | {"rationale": "<b>ok</b> 中文"}, follow_redirects=False)
    assert ok.status_code == 303
    assert 'done <b id="done">1</b>' in client.get("/").text


def test_guidelines_are_versioned_and_metrics_exported(client):
    assert "version t1" in client.get("/guidelines").text
    metrics = client.get("/metrics").text
    assert "offdpo_annotate_items" in metrics and "offdpo_annotate_agreement" in metrics


def test_tokens_file_is_checked(tmp_path):
    from offdpo.errors import ConfigError

    bad = tmp_path / "t"
    bad.write_text("alice:not-a-hash\n")
    with pytest.raises(ConfigError, match="64 hex"):
        Tokens.load(str(bad))
    good = tmp_path / "g"
    good.write_text(f"# comment\nbob:{hashlib.sha256(b'x').hexdigest()}\n")
    assert Tokens.load(str(good)).annotator("x") == "bob"
    assert Tokens.load(str(good)).annotator("y") is None


# -- the calibrate command against an OpenAI-compatible endpoint --------------------------------
class _AlwaysFirst(http.server.BaseHTTPRequestHandler):
    """A judge with pure position bias: "Good" (the first answer is better) whatever it is shown."""

    def log_message(self, *args):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        message = {"role": "assistant", "content": "Good"}
        doc = {
            "id": "x",
            "object": "chat.completion",
            "created": 0,
            "model": "biased",
            "choices": [{"index": 0, "finish_reason": "stop", "message": message}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }
        data = json.dumps(doc).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def test_calibrate_command_reports_a_position_biased_judge(tmp_path, monkeypatch, capsys):
    from services.labeler.__main__ import main

    state = tmp_path / "state"
    q = Queue(state / "annotate.sqlite", overlap=1, undo_s=0.0)
    for i in range(4):
        q.add(cs(i), "f")
        c = q.claim("alice")
        q.judge("alice", c.item.item_id, "1" if c.a_left else "2")  # humans: answer a, every time
        q.decided(c.item.item_id, A, "")
    q.close()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _AlwaysFirst)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("OFFDPO_LABELER_STATE_DIR", str(state))
        monkeypatch.setenv("OFFDPO_JUDGE_STRUCTURED", "false")
        monkeypatch.setenv("OFFDPO_JUDGE_CACHE", "false")
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        assert main(["calibrate", "--judge-base-url", url, "--judge-model", "biased"]) == 0
    finally:
        server.shutdown()
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # Good in both orders flips every verdict: consistency 0, every verdict a tie against the humans' a:
    # p_o = 0 and p_e = 0 (no category in common), kappa 0
    assert out["items"] == 4 and out["swap_consistency"] == 0.0 and out["raw_agreement"] == 0.0
    assert out["kappa"] == 0.0 and out["judge_wins"] == 0
    again = Queue(state / "annotate.sqlite")
    assert set(again.judge_verdicts().values()) == {TIE}, "the verdicts are kept for the stats page"


# -- background loops ------------------------------------------------------------------------------
def test_the_ingest_loop_survives_a_failing_queue_and_kafka(tmp_path, monkeypatch):
    # Audit path 6 (issue 27): a Kafka or SQLite error killed the consumer thread silently while
    # /healthz said ok; nothing was queued again until a restart.
    import sqlite3

    from kafka.errors import KafkaTimeoutError

    from services.labeler.annotate import service
    from tests.fakes import FakeConsumer

    ann, broker = annotation(tmp_path)
    for i in range(3):
        broker.append(KAFKA.candidates_topic, cs(i).SerializeToString(), key=b"k")
    made: list[FakeConsumer] = []
    failures = [sqlite3.OperationalError("database is locked"), KafkaTimeoutError("commit")]

    def make_consumer(kafka, group, topics, **kw):
        made.append(FakeConsumer(broker, *topics, group=group))
        if len(made) == 2:  # the second consumer's commit times out once
            real = made[-1].commit

            def commit(offsets=None):
                if failures:
                    raise failures.pop(0)
                real(offsets)

            made[-1].commit = commit
        return made[-1]

    real_ingest = ann.ingest

    def ingest(items):
        if len(made) == 1:
            raise failures.pop(0)
        return real_ingest(items)

    monkeypatch.setattr(service, "make_consumer", make_consumer)
    monkeypatch.setattr(service, "RETRY_MIN_S", 0.01)
    monkeypatch.setattr(ann, "ingest", ingest)
    stop = threading.Event()
    t = threading.Thread(target=service.consume, args=(ann, KAFKA, "g", stop), daemon=True)
    t.start()

    def committed() -> int:
        return sum(offset for (group, _), offset in broker.committed.items() if group == "g")

    try:
        deadline = time.monotonic() + 20
        while ann.queue.counts()["items"] < 3 or committed() < 3:
            assert time.monotonic() < deadline, f"not queued: {ann.queue.counts()}, {len(made)} consumers"
            assert t.is_alive()
            stop.wait(0.05)
    finally:
        stop.set()
        t.join(10)
    assert failures == [] and len(made) == 3 and ann.health.problem(0) is None


def test_health_reports_a_loop_failing_longer_than_the_outage_limit():
    from services.labeler.annotate.service import LoopHealth

    now = [100.0]
    health = LoopHealth(clock=lambda: now[0])
    health.failed("ingest", OSError("broker down"))
    now[0] += 60
    health.failed("ingest", OSError("broker still down"))
    assert health.problem(120) is None
    now[0] += 61
    assert health.problem(120) == "ingest failing for 121 s (OSError: broker still down)"
    health.ok("ingest")
    assert health.problem(0) is None
