"""Fast tests of the judge's pieces: typed GSB plans, the strategy with a fake client whose verdicts are
known, the verdict cache, and the OpenAI client's use of the SDK's retries with the judge's backoff."""

from __future__ import annotations

import http.server
import json
import threading

import pytest

from services.labeler.config import JudgeConfig
from services.labeler.errors import JudgeError, JudgeRefused
from services.labeler.judge import GSB_LABELS, GsbAsk, LLMJudgeStrategy, OpenAIJudgeClient, VerdictCache
from services.labeler.judge.gsb import GsbMethod
from services.labeler.judge.reference import ReferenceAsk, ReferenceMethod

from .test_units import FakeJudge, cset


def strategy(fake, cache=None, **kw) -> LLMJudgeStrategy:
    return LLMJudgeStrategy(fake, JudgeConfig(model=fake.model, concurrency=2, **kw), cache)


def test_gsb_plan_is_typed_asks_in_both_orders():
    strat = strategy(FakeJudge(lambda a, b: "Same"))
    assert isinstance(strat.method, GsbMethod)
    cs = cset(["x", "y", "z"])
    plan = strat.method.plan(cs, "user: What is 2+2?")
    assert [(ask.a, ask.b) for ask in plan] == [(0, 1), (0, 2), (1, 2)]
    assert all(isinstance(ask, GsbAsk) for ask in plan)
    first = plan[0]
    assert "[Answer A]\nx\n\n[Answer B]\ny" in first.a_first.text
    assert "[Answer A]\ny\n\n[Answer B]\nx" in first.b_first.text
    assert first.a_first.choices == GSB_LABELS and first.a_first.key != first.b_first.key


def test_reference_plan_one_ask_per_answer():
    strat = strategy(FakeJudge(lambda a, b: "1"), mode="reference", scale_min=1, scale_max=5)
    assert isinstance(strat.method, ReferenceMethod)
    plan = strat.method.plan(cset(["x", "y"], reference="x"), "q")
    assert [ask.index for ask in plan] == [0, 1] and all(isinstance(a, ReferenceAsk) for a in plan)
    assert plan[0].question.choices == ("1", "2", "3", "4", "5")


@pytest.mark.parametrize(
    "verdict, pairs, ties, inconsistent",
    [
        (lambda a, b: "Good" if a == "4" else "Bad", [("4", "5")], 0, 0),  # both orders agree: a pair
        (lambda a, b: "Bad" if a == "4" else "Good", [("5", "4")], 0, 0),
        (lambda a, b: "Good", [], 0, 1),  # each order prefers the answer shown first: no pair
        (lambda a, b: "Same", [], 1, 0),
        (lambda a, b: "Same" if a == "4" else "Good", [], 0, 1),
    ],
)
def test_gsb_outcome_from_known_verdicts(verdict, pairs, ties, inconsistent):
    fake = FakeJudge(verdict)
    (out,) = strategy(fake).label_batch([cset(["4", "5"])], "src")
    assert [(p.chosen, p.rejected) for p in out.pairs] == pairs
    assert (out.ties, out.inconsistent, out.unparseable) == (ties, inconsistent, 0)
    assert sorted(fake.calls) == [("4", "5"), ("5", "4")]


def test_identical_questions_in_a_batch_are_asked_once_and_cached(tmp_path):
    fake = FakeJudge(lambda a, b: "Good" if a == "4" else "Bad")
    cache = VerdictCache(tmp_path / "v.sqlite")
    results = strategy(fake, cache).label_batch([cset(["4", "5"]), cset(["4", "5"])], "src")
    assert len(fake.calls) == 2 and [len(r.pairs) for r in results] == [1, 1]
    again = FakeJudge(lambda a, b: pytest.fail("asked although cached"))
    strategy(again, VerdictCache(tmp_path / "v.sqlite")).label_batch([cset(["5", "4"])], "src")
    assert again.calls == []


def test_a_failing_client_fails_only_the_sets_that_needed_it():
    class HalfDown:
        model = "half"

        def complete(self, prompt, choices):
            if "Paris" in prompt:
                raise ConnectionError("endpoint reset")
            return "Good" if "[Answer A]\n4" in prompt else "Bad"

    ok, down = strategy(HalfDown()).label_batch([cset(["4", "5"]), cset(["Paris", "Lyon"])], "s")
    assert len(ok.pairs) == 1
    assert isinstance(down, JudgeError) and down.error_type == "judge_unavailable" and "reset" in str(down)


def test_bad_settings_are_config_errors():
    from offdpo.errors import ConfigError

    with pytest.raises(ConfigError, match="OFFDPO_JUDGE_MODE='pairwise': use gsb or reference"):
        strategy(FakeJudge(lambda a, b: "Good"), mode="pairwise")
    with pytest.raises(ConfigError, match="OFFDPO_JUDGE_MODEL is not set"):
        OpenAIJudgeClient(JudgeConfig(model=""))


class _Status(http.server.BaseHTTPRequestHandler):
    """A fake OpenAI endpoint answering every request with `status`; records each attempt's time."""

    status = 400
    attempts: list[float] = []

    def do_POST(self):
        import time

        type(self).attempts.append(time.monotonic())
        self.rfile.read(int(self.headers["Content-Length"]))
        body = json.dumps({"error": {"message": "nope"}}).encode()
        self.send_response(type(self).status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def status_server():
    _Status.attempts = []
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Status)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()


@pytest.mark.parametrize("status", [400, 413, 422])
def test_a_request_the_judge_refuses_is_this_sets_error_not_an_outage(status_server, status):
    # Audit path 2 (issue 27): a 400 (context length) was an outage, retried forever: the set's
    # partition stalled. Now it is a record error, dead-lettered with the reason.
    _Status.status = status
    client = OpenAIJudgeClient(JudgeConfig(base_url=status_server, model="m", max_retries=3, backoff_s=0.01))
    with pytest.raises(JudgeRefused, match=rf"refused the request for this set \(HTTP {status}: ") as err:
        client.complete("q", GSB_LABELS)
    assert not err.value.retryable and err.value.error_type == "judge_refused"
    assert client.calls == 1 and len(_Status.attempts) == 1


@pytest.mark.parametrize("status", [401, 404])
def test_a_judge_setting_problem_is_an_outage_that_loses_no_set(status_server, status):
    # A wrong key or model name is the operator's to fix: the sets wait (readiness reports it).
    _Status.status = status
    client = OpenAIJudgeClient(JudgeConfig(base_url=status_server, model="m", max_retries=3, backoff_s=0.01))
    with pytest.raises(JudgeError, match=r"failed after 1 attempt\(s\)") as err:
        client.complete("q", GSB_LABELS)
    assert err.value.retryable


def test_only_the_set_the_judge_refused_is_dead_lettered():
    class RefusesLong:
        model = "short-context"

        def complete(self, prompt, choices):
            if "Paris" in prompt:
                raise JudgeRefused("HTTP 400: maximum context length exceeded")
            return "Good" if "[Answer A]\n4" in prompt else "Bad"

    ok, refused = strategy(RefusesLong()).label_batch([cset(["4", "5"]), cset(["Paris", "Lyon"])], "s")
    assert len(ok.pairs) == 1
    assert isinstance(refused, JudgeRefused) and not refused.retryable and "context length" in str(refused)


def test_client_spaces_retries_by_the_judge_backoff_settings(status_server):
    _Status.status = 503
    client = OpenAIJudgeClient(
        JudgeConfig(base_url=status_server, model="m", max_retries=3, backoff_s=0.2, backoff_max_s=0.3, timeout_s=5)
    )
    with pytest.raises(JudgeError, match=r"failed after 4 attempt\(s\)"):
        client.complete("q", GSB_LABELS)
    gaps = [b - a for a, b in zip(_Status.attempts, _Status.attempts[1:])]
    # backoff_s doubling, capped at backoff_max_s, each scaled by a jitter in [0.5, 1]
    assert len(gaps) == 3
    for gap, full in zip(gaps, (0.2, 0.3, 0.3)):
        assert 0.5 * full - 0.02 <= gap <= full + 0.25
