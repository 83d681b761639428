"""Unit tests: parsing, rules, position-swap logic with a fake judge, verdict cache, retries."""

from __future__ import annotations

import http.server
import json
import threading

import pytest

from offdpo import records
from offdpo.records import RecordError
from offdpo.v1 import labeler_pb2, records_pb2
from services.labeler import inputs
from services.labeler.config import CONFIG_CLASSES, JudgeConfig
from services.labeler.judge import (
    GSB_LABELS,
    JudgeError,
    LLMJudgeStrategy,
    OpenAIJudgeClient,
    VerdictCache,
    check_template,
    decide_gsb,
    parse_label,
)
from services.labeler.rules import RulesError, RuleSet, RulesStrategy, register_check


def cset(answers, prompt="What is 2+2?", reference=None, **kw) -> labeler_pb2.CandidateSet:
    obj = {"prompt": [{"role": "user", "content": prompt}], "answers": answers, **kw}
    if reference is not None:
        obj["reference"] = reference
    return inputs.candidate_set_from_json(obj)


def test_config_declares_secret_key_and_prefixes():
    names = {n: spec for cls in CONFIG_CLASSES for n, spec in cls.env_vars().items()}
    assert names["OFFDPO_JUDGE_API_KEY"]["secret"]
    assert "***" in repr(JudgeConfig(api_key="sk-very-secret")) and "sk-very-secret" not in repr(
        JudgeConfig(api_key="sk-very-secret")
    )
    assert all(n.startswith(("OFFDPO_LABELER_", "OFFDPO_JUDGE_", "OFFDPO_KAFKA_", "OFFDPO_TOPIC_")) for n in names)


@pytest.mark.parametrize(
    "obj, message",
    [
        ({"answers": ["a", "b"]}, "missing 'prompt'"),
        ({"prompt": "", "answers": ["a", "b"]}, "prompt is empty"),
        ({"prompt": [{"role": "user"}], "answers": ["a", "b"]}, "prompt[0] must be an object"),
        ({"prompt": "x", "answers": "ab"}, "'answers' must be a list of strings"),
        ({"prompt": "x", "answers": ["a"], "colour": 1}, "unknown keys ['colour']"),
        ({"prompt": "x", "answers": ["a", "b"], "generate_n": -1}, "generate_n"),
    ],
)
def test_candidate_set_json_errors_are_precise(obj, message):
    with pytest.raises(RecordError, match=r"" + message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
        inputs.candidate_set_from_json(obj)


@pytest.mark.parametrize(
    "answers, message",
    [(["a"], "at least 2 answers"), (["a", "a"], "duplicates"), (["a", " "], r"answers\[1\] is empty")],
)
def test_candidate_set_validation(answers, message):
    with pytest.raises(RecordError, match=message):
        inputs.validate_candidate_set(cset(answers), max_answers=4)
    with pytest.raises(RecordError, match="over the limit of 4"):
        inputs.validate_candidate_set(cset(list("abcde")), max_answers=4)


def test_trl_standard_conversational_and_ultrafeedback_forms():
    std = inputs.imported_pair({"prompt": "2+2=", "chosen": "4", "rejected": "5"}, "f")
    assert std.prompt.text == "2+2=" and (std.chosen, std.rejected) == ("4", "5")
    assert std.provenance.strategy == records_pb2.LABEL_STRATEGY_IMPORTED
    conv = inputs.imported_pair(
        {
            "prompt": [{"role": "user", "content": "2+2?"}],
            "chosen": [{"role": "assistant", "content": "4"}],
            "rejected": [{"role": "assistant", "content": "5"}],
        },
        "f",
    )
    assert [(m.role, m.content) for m in conv.prompt.chat.messages] == [("user", "2+2?")]
    # UltraFeedback-binarized: prompt string + whole conversations + scores.
    uf = inputs.imported_pair(
        {
            "prompt": "2+2?",
            "prompt_id": "p1",
            "score_chosen": 8.5,
            "score_rejected": 3,
            "chosen": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
            "rejected": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "5"}],
        },
        "uf.parquet",
    )
    assert uf.pair_id == conv.pair_id
    assert uf.provenance.chosen_score == 8.5 and uf.provenance.rejected_score == 3.0
    assert uf.provenance.metadata["prompt_id"] == "p1"
    implicit = inputs.imported_pair(
        {
            "chosen": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
            "rejected": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "5"}],
        },
        "f",
    )
    assert implicit.pair_id == conv.pair_id
    for bad, msg in [
        ({"prompt": "x", "chosen": "a"}, "missing or empty 'rejected'"),
        ({"prompt": "x", "chosen": "a", "rejected": "a"}, "identical"),
        ({"prompt": "x", "chosen": "a", "rejected": [{"role": "assistant", "content": "b"}]}, "both be strings"),
        (
            {
                "chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "b"}],
            },
            "different prompts",
        ),
    ]:
        with pytest.raises(RecordError, match=msg):
            inputs.imported_pair(bad, "f")


def test_human_judgement_forms():
    j = inputs.judgement_from_json({"prompt": "q", "chosen": "a", "rejected": "b", "annotator": "ann-1"})
    assert (j.answer_a, j.answer_b, j.verdict) == ("a", "b", "Good")
    j = inputs.judgement_from_json(
        {
            "prompt": '[{"role": "user", "content": "q"}]',
            "answer_a": "a",
            "answer_b": "b",
            "verdict": "Bad",
            "annotator": "ann-2",
        }
    )
    assert j.prompt.WhichOneof("kind") == "chat"
    with pytest.raises(RecordError, match="annotator is required"):
        inputs.judgement_from_json({"prompt": "q", "chosen": "a", "rejected": "b"})
    with pytest.raises(RecordError, match="verdict 'Better'"):
        inputs.judgement_from_json(
            {"prompt": "q", "answer_a": "a", "answer_b": "b", "verdict": "Better", "annotator": "x"}
        )


def test_rules_scoring_hits_ties_and_custom_callables():
    register_check("shouts")(lambda a, cs: a.isupper())
    rs = RuleSet.from_dict(
        {
            "rules": [
                {"name": "exact", "type": "equals_reference", "weight": 3},
                {"name": "digit", "type": "regex_must", "pattern": r"\d"},
                {"name": "no_sorry", "type": "regex_must_not", "pattern": "sorry", "flags": "i"},
                {"name": "short", "type": "length", "max": 5, "weight": 0.5},
                {"name": "json", "type": "valid_json", "weight": 0.25},
                {"name": "loud", "type": "python", "callable": "shouts", "weight": 0.1},
                {"name": "path", "type": "python", "callable": "services.labeler.rules:_no_empty_lines", "weight": 0},
            ]
        }
    )
    out = RulesStrategy(rs).label_batch([cset(["4", "SORRY, FIVE", "5"], reference="4")], "src")[0]
    assert len(out.pairs) == 1
    pair = out.pairs[0]
    assert (pair.chosen, pair.rejected) == ("4", "SORRY, FIVE")
    assert list(pair.provenance.chosen_rule_hits) == ["exact", "digit", "no_sorry", "short", "json", "path"]
    assert list(pair.provenance.rejected_rule_hits) == ["loud", "path"]
    assert pair.provenance.chosen_score == pytest.approx(5.75)
    assert pair.provenance.strategy == records_pb2.LABEL_STRATEGY_RULES
    tie = RulesStrategy(rs).label_batch([cset(["7", "8"])], "src")[0]
    assert tie.pairs == [] and tie.ties == 1
    every = RulesStrategy(RuleSet.from_dict({"pair_mode": "all", "rules": rs_rules_digit()})).label_batch(
        [cset(["1", "x", "2"])], "s"
    )[0]
    assert sorted((p.chosen, p.rejected) for p in every.pairs) == [("1", "x"), ("2", "x")] and every.ties == 1


def rs_rules_digit():
    return [{"name": "digit", "type": "regex_must", "pattern": r"\d"}]


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"rules": []}, "non-empty 'rules'"),
        ({"rules": [{"type": "regex"}]}, "type 'regex' is not one of"),
        ({"rules": [{"type": "regex_must", "pattern": "("}]}, "bad regular expression"),
        ({"rules": [{"type": "length", "min": 5, "max": 1}]}, "min <= max"),
        ({"rules": [{"type": "python", "callable": "nope"}]}, "no check registered as 'nope'"),
        ({"rules": [{"type": "valid_json", "patern": "x"}]}, "unknown keys"),
    ],
)
def test_rules_file_errors(spec, message):
    with pytest.raises(RulesError, match=message):
        RuleSet.from_dict(spec)


@pytest.mark.parametrize(
    "first, second, expected",
    [
        ("Good", "Bad", "a"),
        ("Bad", "Good", "b"),
        ("Same", "Same", "tie"),
        ("Good", "Good", "inconsistent"),
        ("Bad", "Bad", "inconsistent"),
        ("Good", "Same", "inconsistent"),
        ("Same", "Bad", "inconsistent"),
        (None, "Bad", "unparseable"),
    ],
)
def test_decide_gsb_table(first, second, expected):
    assert decide_gsb(first, second) == expected


def test_parse_label():
    assert parse_label(" good.", GSB_LABELS) == "Good"
    assert parse_label("**Bad** because", GSB_LABELS) == "Bad"
    assert parse_label("Better", GSB_LABELS) is None
    assert parse_label("7", [str(i) for i in range(1, 11)]) == "7"


class FakeJudge:
    """Answers by a rule on the (first, second) answers shown; records every call."""

    model = "fake-judge"

    def __init__(self, verdict):
        self.verdict = verdict
        self.calls = []

    def complete(self, prompt, choices):
        first = prompt.split("[Answer A]\n")[1].split("\n\n[Answer B]")[0]
        second = prompt.split("[Answer B]\n")[1].split("\n\n")[0]
        self.calls.append((first, second))
        return self.verdict(first, second)


def judge(fake, tmp_path=None, **kw):
    cache = VerdictCache(tmp_path / "v.sqlite") if tmp_path else None
    return LLMJudgeStrategy(fake, JudgeConfig(model="fake-judge", concurrency=2, **kw), cache)


def test_position_swap_consistent_gives_pair_with_both_verdicts():
    fake = FakeJudge(lambda a, b: "Good" if a == "4" else "Bad")
    out = judge(fake).label_batch([cset(["5", "4"])], "src")[0]
    assert sorted(fake.calls) == [("4", "5"), ("5", "4")]
    (pair,) = out.pairs
    assert (pair.chosen, pair.rejected) == ("4", "5")
    assert [(v.order, v.verdict) for v in pair.provenance.verdicts] == [
        ("chosen_first", "Good"),
        ("rejected_first", "Bad"),
    ]
    assert pair.provenance.judge_model == "fake-judge"
    assert pair.provenance.strategy == records_pb2.LABEL_STRATEGY_LLM_JUDGE


def test_position_bias_gives_no_pair():
    always_first = FakeJudge(lambda a, b: "Good")  # prefers whatever is shown first
    out = judge(always_first).label_batch([cset(["4", "5"])], "src")[0]
    assert out.pairs == [] and out.inconsistent == 1
    always_second = FakeJudge(lambda a, b: "Bad")
    assert judge(always_second).label_batch([cset(["4", "5"])], "src")[0].inconsistent == 1
    same = FakeJudge(lambda a, b: "Same")
    out = judge(same).label_batch([cset(["4", "5"])], "src")[0]
    assert out.pairs == [] and out.ties == 1
    junk = FakeJudge(lambda a, b: "I think A")
    assert judge(junk).label_batch([cset(["4", "5"])], "src")[0].unparseable == 1


def test_gsb_three_answers_compares_every_pair():
    rank = {"best": 3, "mid": 2, "worst": 1}
    fake = FakeJudge(lambda a, b: "Good" if rank[a] > rank[b] else "Bad")
    out = judge(fake).label_batch([cset(["mid", "worst", "best"])], "src")[0]
    assert len(fake.calls) == 6
    assert sorted((p.chosen, p.rejected) for p in out.pairs) == [("best", "mid"), ("best", "worst"), ("mid", "worst")]


def test_reference_mode_scores_and_missing_reference():
    scores = {"4": "9", "four": "7", "5": "2"}

    class RefJudge:
        model = "fake-ref"
        calls = 0

        def complete(self, prompt, choices):
            RefJudge.calls += 1
            assert choices[0] == "1" and choices[-1] == "10"
            return scores[prompt.split("[Answer to grade]\n")[1].split("\n\n")[0]]

    strat = LLMJudgeStrategy(RefJudge(), JudgeConfig(model="fake-ref", mode="reference"))
    out, missing = strat.label_batch([cset(["5", "4", "four"], reference="4"), cset(["a", "b"])], "src")
    (pair,) = out.pairs
    assert (pair.chosen, pair.rejected, pair.provenance.chosen_score, pair.provenance.rejected_score) == (
        "4",
        "5",
        9,
        2,
    )
    assert [(v.order, v.verdict) for v in pair.provenance.verdicts] == [("chosen", "9"), ("rejected", "2")]
    assert isinstance(missing, RecordError) and "needs a reference answer" in str(missing)


def test_verdict_cache_rerun_makes_zero_calls(tmp_path):
    fake = FakeJudge(lambda a, b: "Good" if a == "4" else "Bad")
    first = judge(fake, tmp_path).label_batch([cset(["5", "4"]), cset(["4", "6"])], "src")
    assert len(fake.calls) == 4
    again = FakeJudge(lambda a, b: pytest.fail("the endpoint was called on a rerun"))
    second = judge(again, tmp_path).label_batch([cset(["5", "4"]), cset(["4", "6"])], "src")
    assert again.calls == []
    assert [p.pair_id for o in first for p in o.pairs] == [p.pair_id for o in second for p in o.pairs]
    # A different template is a different question: not served from the cache.
    tpl = tmp_path / "gsb.txt"
    tpl.write_text("Q: {prompt}\n\n[Answer A]\n{answer_a}\n\n[Answer B]\n{answer_b}\n\nGood, Same or Bad?")
    third = FakeJudge(lambda a, b: "Same")
    judge(third, tmp_path, gsb_template=str(tpl)).label_batch([cset(["5", "4"])], "src")
    assert len(third.calls) == 2


def test_template_validation():
    with pytest.raises(ValueError, match="unknown fields"):
        check_template("{prompt} {answer_a} {answer_b} {oops}", {"prompt", "answer_a", "answer_b"}, set(), "t")
    with pytest.raises(ValueError, match="must use"):
        check_template("{prompt}", {"prompt", "answer_a", "answer_b"}, {"answer_a"}, "t")


class _Flaky(http.server.BaseHTTPRequestHandler):
    """A fake OpenAI endpoint: HTTP 503 twice, then a verdict."""

    count = 0

    def do_POST(self):
        type(self).count += 1
        self.rfile.read(int(self.headers["Content-Length"]))
        if type(self).count <= 2:
            self.send_response(503)
            self.end_headers()
            self.wfile.write(b'{"error": {"message": "busy"}}')
            return
        body = json.dumps(
            {
                "id": "x",
                "object": "chat.completion",
                "created": 0,
                "model": "m",
                "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "Good"}}],
            }
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_openai_client_retries_with_backoff_then_gives_up():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{srv.server_address[1]}/v1"
        client = OpenAIJudgeClient(JudgeConfig(base_url=base, model="m", max_retries=3, backoff_s=0.05, timeout_s=5))
        assert client.complete("q", GSB_LABELS) == "Good" and client.calls == 3
        _Flaky.count = -10
        stingy = OpenAIJudgeClient(JudgeConfig(base_url=base, model="m", max_retries=1, backoff_s=0.05, timeout_s=5))
        with pytest.raises(JudgeError, match="failed after 2 attempt"):
            stingy.complete("q", GSB_LABELS)
    finally:
        srv.shutdown()


def test_judge_error_becomes_a_per_set_error():
    class Down:
        model = "down"

        def complete(self, prompt, choices):
            raise JudgeError("endpoint unreachable")

    (res,) = LLMJudgeStrategy(Down(), JudgeConfig(model="down")).label_batch([cset(["a", "b"])], "s")
    assert isinstance(res, JudgeError) and "unreachable" in str(res)


def test_human_pair_directions():
    from services.labeler.human import judgement_to_pair

    base = {"prompt": "q", "answer_a": "a", "answer_b": "b", "annotator": "ann"}
    good = judgement_to_pair(inputs.judgement_from_json({**base, "verdict": "Good"}), "s")
    bad = judgement_to_pair(inputs.judgement_from_json({**base, "verdict": "Bad"}), "s")
    assert (good.chosen, good.rejected, bad.chosen, bad.rejected) == ("a", "b", "b", "a")
    assert good.provenance.annotator == "ann" and good.provenance.strategy == records_pb2.LABEL_STRATEGY_HUMAN
    assert judgement_to_pair(inputs.judgement_from_json({**base, "verdict": "Same"}), "s") is None
    assert good.pair_id == records.pair_id(good.prompt, "a", "b")


def test_openai_server_failure_paths_are_bounded_and_clear(tmp_path):
    from localdev.openai_server import OpenAIServer, OpenAIServerError

    dies = tmp_path / "dies.sh"
    dies.write_text("#!/bin/sh\necho 'engine exploded: no such model'\nexit 3\n")
    hangs = tmp_path / "hangs.sh"
    hangs.write_text("#!/bin/sh\necho 'loading forever'\nexec sleep 300\n")
    for f in (dies, hangs):
        f.chmod(0o755)
    with pytest.raises(OpenAIServerError, match=r"(?s)exited with code 3.*engine exploded"):
        OpenAIServer(tmp_path / "model", python=str(dies), start_timeout_s=30).start()
    server = OpenAIServer(tmp_path / "model", python=str(hangs), start_timeout_s=1.5)
    with pytest.raises(OpenAIServerError, match=r"(?s)did not answer .*/v1/models within 2 s.*loading forever"):
        with server:
            pass
    assert server.proc is None
    assert server.base_url.startswith("http://127.0.0.1:") and server.base_url.endswith("/v1")
