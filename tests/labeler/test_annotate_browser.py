"""The annotation app in a real headless browser (Debian's chromium, driven by Playwright) against the
local stack: candidate sets read from the candidates topic, pairs checked on the pairs topic.

Keyboard only: every judgement, the undo and the rationale are key presses (`page.keyboard`), never
clicks. Bounded waits everywhere; the app and the browser are always stopped by their fixtures.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import pytest

from offdpo import records
from offdpo.kafka import make_producer
from offdpo.v1 import labeler_pb2
from services.labeler.calibrate import calibrate_queue
from services.labeler.config import JudgeConfig
from services.labeler.judge import LLMJudgeStrategy
from services.labeler.runner import build_labeler, close_labeler

from .conftest import read_deadletters, read_pairs, wait_until
from .test_units import FakeJudge

pytestmark = [pytest.mark.browser, pytest.mark.stack]
# Screenshots of a test run go under the ignored .cache/results/ so `make test` never rewrites
# checked-in files; `make screenshots` publishes them to docs/ (OFFDPO_SCREENSHOTS_DIR).
DOCS = Path(os.environ.get("OFFDPO_SCREENSHOTS_DIR") or Path(__file__).resolve().parents[2] / ".cache" / "results")

CODE = 'def greet(name: str) -> str:\n    """<script>alert(1)</script> stays text."""\n    return f"你好, {name}!"\n'
LONG = "\n".join(f"{i:03d}. a long answer line that has to scroll inside its box" for i in range(120))
SETS = [
    ("用一句话解释什么是偏好优化。", "偏好优化让模型学会在两个回答中选择人更喜欢的那个。", "它是一种优化。"),
    ("Write a Python function that greets someone.", CODE, "print('hi')"),
    ("List 120 numbered lines.", LONG, "1. one line"),
    ("What is 2 + 2?", "4", "5"),
    ("Name a prime number.", "7", "8"),
    ("Capital of France?", "Paris", "Lyon"),
]


def send_sets(kcfg, sets, junk: bool = False) -> None:
    producer = make_producer(kcfg, "annotate-test")
    try:
        for i, (prompt, a, b) in enumerate(sets):
            cs = labeler_pb2.CandidateSet(set_id=f"set-{i}", answers=[a, b])
            cs.prompt.CopyFrom(records.text_prompt(prompt))
            # one partition: the queue's order is the order sent
            producer.send(kcfg.candidates_topic, value=cs.SerializeToString(), partition=0).get(timeout=30)
        if junk:
            producer.send(kcfg.candidates_topic, value=b"\x08\x96\x01 not a candidate set", partition=0).get(timeout=30)
    finally:
        producer.close(timeout=30)


@pytest.fixture
def labeler(lcfg, kcfg):
    lab = build_labeler(dataclasses.replace(lcfg, ledger=False), kcfg)
    yield lab
    close_labeler(lab)


def sign_in(chromium, app, token, **ctx):
    context = chromium.new_context(**({"viewport": {"width": 1280, "height": 860}} | ctx))
    page = context.new_page()
    page.set_default_timeout(15_000)
    page.goto(f"{app.url}/login")
    page.locator("#token:focus").wait_for()  # autofocus: the keyboard alone signs in
    page.keyboard.type(token)
    with page.expect_navigation():
        page.keyboard.press("Enter")
    assert page.url == f"{app.url}/", f"sign-in failed: {page.locator('body').inner_text()}"
    return context, page


def current_item(page, timeout_s: float = 20, app=None) -> str:
    """The item on the page, reloading while the queue is still empty (items arrive from Kafka)."""

    def shown():
        if page.locator("#judge-form").count():
            return page.locator("#judge-form").get_attribute("data-item")
        page.reload()
        return None

    return wait_until(shown, timeout_s, "an item on the annotation page")


def press(page, key: str) -> None:
    """Press a verdict key and wait for the next page (the form posts and redirects)."""
    with page.expect_navigation():
        page.keyboard.press(key)


def key_for(page, answer: str) -> str:
    """The key that picks `answer` ('a' or 'b', the set's first or second) in this page's random order."""
    return "1" if page.locator("#left").get_attribute("data-answer") == answer else "2"


def test_label_five_with_the_keyboard_undo_one_and_pairs_arrive(
    chromium, annotate_app, annotator_tokens, labeler, kcfg, unique
):
    send_sets(kcfg, SETS, junk=True)
    app = annotate_app(labeler, kcfg, overlap=1, undo_s=6.0, group_id=f"annotate-{unique}")
    _, tokens = annotator_tokens
    context, page = sign_in(chromium, app, tokens["alice"])
    try:
        first = current_item(page)
        # Chinese and code render as written: escaped, whitespace kept.
        assert page.locator("#prompt").inner_text() == SETS[0][0]
        assert page.locator("#left .text, #right .text").all_inner_texts()
        legend = page.locator(".legend").inner_text()
        assert all(k in legend for k in ("1", "2", "0", "b", "s", "u"))

        wanted = {}
        # First judgement, then undo it within the grace period: the same item comes back.
        press(page, key_for(page, "b"))
        assert page.locator("#undo").count() == 1, "an undo button during the grace period"
        press(page, "u")
        assert current_item(page) == first, "undo brings the item back"
        # Rationale by keyboard: r focuses it, Esc leaves it, then the verdict key.
        page.keyboard.press("r")
        page.keyboard.type("更准确 / more accurate")
        page.keyboard.press("Escape")
        wanted[first] = "a"
        press(page, key_for(page, "a"))

        for _ in range(4):
            iid = current_item(page)
            if page.locator("#prompt").inner_text() == SETS[1][0]:
                left = page.locator("#left .text").inner_text() + page.locator("#right .text").inner_text()
                assert "<script>alert(1)</script>" in left and "你好" in left
                page.keyboard.press("r")
                page.keyboard.type("tie-break: the function actually greets")
                page.keyboard.press("Escape")
                DOCS.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(DOCS / "annotate.png"))
            if page.locator("#prompt").inner_text() == SETS[2][0]:
                side = "left" if key_for(page, "a") == "1" else "right"  # where the long answer (a) is shown
                box = page.locator(f"#{side} .scroll")
                assert box.evaluate("e => e.scrollHeight > e.clientHeight"), "a long answer scrolls in its box"
            wanted[iid] = "a"
            press(page, key_for(page, "a"))
        assert page.locator("#done").inner_text() == "5"
        assert page.locator("#remaining").inner_text() == "1", "the sixth item, shown now"

        pairs = wait_until(
            lambda: (ps := read_pairs(kcfg)) and len(ps) >= 5 and ps, 60, "five pairs on the pairs topic"
        )
        assert len(pairs) == 5, [p.prompt.text for p in pairs]
        by_prompt = {p.prompt.text: p for p in pairs}
        for prompt, a, _ in SETS[:5]:
            pair = by_prompt[prompt]
            assert pair.chosen == a, "the undone verdict (b) was replaced by the final one (a)"
            assert pair.provenance.annotator == "alice"
            assert pair.provenance.metadata["displayed_order"] in ("alice:chosen_left", "alice:rejected_left")
            (j,) = json.loads(pair.provenance.metadata["judgements"])
            assert j["guideline_version"] and j["time_spent_s"] >= 0
        rationale = json.loads(by_prompt[SETS[0][0]].provenance.metadata["judgements"])[0]["rationale"]
        assert rationale == "更准确 / more accurate"
        letters = read_deadletters(kcfg)
        assert [d.error_type for d in letters] == ["decode_error"], "the malformed set is dead-lettered"
    finally:
        context.close()


def test_narrow_screen_stacks_the_answers(chromium, annotate_app, annotator_tokens, labeler, kcfg, unique):
    send_sets(kcfg, SETS[:1])
    app = annotate_app(labeler, kcfg, overlap=1, group_id=f"annotate-{unique}")
    context, page = sign_in(chromium, app, annotator_tokens[1]["bob"], viewport={"width": 380, "height": 800})
    try:
        current_item(page)
        left, right = page.locator("#left").bounding_box(), page.locator("#right").bounding_box()
        assert right["y"] >= left["y"] + left["height"] - 1, "answers stacked on a narrow screen"
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1"), "no sideways scroll"
    finally:
        context.close()


def test_two_annotators_one_pair_per_item_and_kappa(chromium, annotate_app, annotator_tokens, labeler, kcfg, unique):
    sets = SETS[3:] + [("Pick a colour.", "blue", "green")]
    send_sets(kcfg, sets)
    app = annotate_app(labeler, kcfg, overlap=2, undo_s=1.0, group_id=f"annotate-{unique}")
    _, tokens = annotator_tokens
    # alice: a a a a; bob: a a a b -> pairs for the three items they agree on; the fourth has no majority.
    # kappa (first, second judgement): (a,a) x3, (a,b): p_o = 3/4, p_e = (4*3)/16 = 3/4 -> undefined... so
    # alice answers b on the third: (a,a) (a,a) (b,b) (a,b): p_o = 3/4, p_e = (3*2 + 1*2)/16 = 1/2, kappa 0.5
    plan = {"alice": ["a", "a", "b", "a"], "bob": ["a", "a", "b", "b"]}
    for who in ("alice", "bob"):
        context, page = sign_in(chromium, app, tokens[who])
        try:
            for _ in range(4):
                current_item(page)
                idx = [s[0] for s in sets].index(page.locator("#prompt").inner_text())
                press(page, key_for(page, plan[who][idx]))
            assert page.locator("#empty").count() == 1, "every item judged: nothing left for this annotator"
        finally:
            context.close()

    pairs = wait_until(lambda: (ps := read_pairs(kcfg)) and len(ps) >= 3 and ps, 60, "three pairs on the pairs topic")
    time.sleep(2)  # a fourth pair would be a bug: give it the time to show up
    pairs = read_pairs(kcfg)
    assert len(pairs) == 3 and len({p.pair_id for p in pairs}) == 3, "one pair per decided item"
    assert all(p.provenance.annotator == "alice,bob" for p in pairs)
    assert {p.prompt.text: p.chosen for p in pairs} == {
        sets[0][0]: sets[0][1],
        sets[1][0]: sets[1][1],
        sets[2][0]: sets[2][2],
    }

    # Calibrate a judge that prefers the longer answer on the decided items (the fourth has no majority).
    # humans a, a, b; judge: 4/5 Same both ways (tie), 7/8 tie, Paris/Lyon -> Paris (a):
    # p_o = 0, p_e = (a: 2 * 1) / 9 -> kappa = -(2/9) / (7/9) = -2/7
    judge = FakeJudge(
        lambda first, second: "Good" if len(first) > len(second) else "Bad" if len(first) < len(second) else "Same"
    )
    strategy = LLMJudgeStrategy(judge, JudgeConfig(model=judge.model, concurrency=1))
    rep = calibrate_queue(app.server.queue, strategy, judge.model)
    assert rep.items == 3 and rep.kappa == pytest.approx(-2 / 7) and rep.swap_consistency == 1.0

    context, page = sign_in(chromium, app, tokens["carol"])
    try:
        page.goto(f"{app.url}/stats")
        kappa = page.locator("#agreement tr.overall .kappa").inner_text()
        assert kappa == "0.500", kappa
        assert page.locator("#agreement tr.overall .judge-kappa").inner_text() == "-0.286"
        DOCS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(DOCS / "annotate-stats.png"), full_page=True)
    finally:
        context.close()


def test_a_tab_closed_mid_item_returns_it_after_the_lease(
    chromium, annotate_app, annotator_tokens, labeler, kcfg, unique
):
    send_sets(kcfg, SETS[3:5])
    app = annotate_app(labeler, kcfg, overlap=1, lease_s=4.0, undo_s=0.5, group_id=f"annotate-{unique}")
    _, tokens = annotator_tokens
    context, page = sign_in(chromium, app, tokens["alice"])
    abandoned = current_item(page)
    t_claim = time.monotonic()
    context.close()  # the tab is gone, its claim is not

    context, page = sign_in(chromium, app, tokens["bob"])
    try:
        other = current_item(page)
        assert other != abandoned, "the abandoned item is still leased"
        press(page, "1")
        if time.monotonic() - t_claim < 4.0:
            assert page.locator("#empty").count() == 1, "nothing for bob while the lease runs"
        returned = wait_until(
            lambda: (
                (page.reload() or True) and page.locator("#judge-form").get_attribute("data-item", timeout=1000)
                if page.locator("#judge-form").count()
                else None
            ),
            20,
            "the abandoned item back in the queue after its lease",
        )
        assert returned == abandoned
        press(page, "2")
        pairs = wait_until(lambda: (ps := read_pairs(kcfg)) and len(ps) >= 2 and ps, 60, "two pairs")
        assert len(pairs) == 2 and {p.provenance.annotator for p in pairs} == {"bob"}
    finally:
        context.close()
