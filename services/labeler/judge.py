"""LLM-judge strategy: any OpenAI-compatible chat endpoint judges the answers.

GSB mode: for each pair of answers (A, B) the judge is asked twice, A first and B first, and says
"Good" (the first answer is better), "Same" or "Bad". Only consistent verdicts (Good then Bad, or Bad
then Good) give a pair; "Same" in either order is a tie and a contradiction is counted as
inconsistent: position bias cancels out instead of leaking into the labels.

Reference mode: each answer is scored against the set's reference answer on [scale_min, scale_max];
the best against the worst answer (or all pairs above the margin) become pairs.

With vLLM the verdict is forced into the allowed labels by structured outputs
(`extra_body={"structured_outputs": {"choice": [...]}}`); other endpoints get the same prompt and the
answer is parsed, anything else counting as unparseable. Verdicts are cached in SQLite under the state
dir, keyed by (judge model, template, mode, prompt, answers, order), so a rerun pays nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import sqlite3
import string
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from offdpo import records
from offdpo.records import RecordError
from offdpo.v1 import labeler_pb2, records_pb2
from services.labeler.base import Outcome, base_provenance, pairs_from_scores
from services.labeler.config import JudgeConfig
from services.labeler.inputs import prompt_text

log = logging.getLogger(__name__)

GSB_LABELS = ("Good", "Same", "Bad")

DEFAULT_GSB_TEMPLATE = """You compare two answers to the same request.

[Request]
{prompt}

[Answer A]
{answer_a}

[Answer B]
{answer_b}

Is Answer A better than Answer B? Reply with exactly one word: Good (A is better), Same (they are equally good), or Bad (B is better)."""

DEFAULT_REFERENCE_TEMPLATE = """You grade an answer against a reference answer.

[Request]
{prompt}

[Reference answer]
{reference}

[Answer to grade]
{answer}

Score the answer from {scale_min} (wrong or useless) to {scale_max} (as good as the reference). Reply with the number only."""

_GSB_FIELDS = {"prompt", "answer_a", "answer_b"}
_REF_FIELDS = {"prompt", "reference", "answer", "scale_min", "scale_max"}


class JudgeError(RuntimeError):
    """The judge endpoint failed (after retries, or with an error retrying cannot fix)."""


def check_template(template: str, allowed: set[str], required: set[str], what: str) -> str:
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as exc:
        raise ValueError(f"{what}: not a valid template ({exc}); write literal braces as {{{{ and }}}}") from None
    if "" in fields or any(not f.isidentifier() for f in fields):
        raise ValueError(f"{what}: use named fields only, from {sorted(allowed)}")
    if fields - allowed:
        raise ValueError(f"{what}: unknown fields {sorted(fields - allowed)}; allowed: {sorted(allowed)}")
    if required - fields:
        raise ValueError(f"{what}: the template must use {sorted(required - fields)}")
    return template


def decide_gsb(first: str | None, second: str | None) -> str:
    """Verdicts for (A, B) asked A-first (`first`) and B-first (`second`) -> 'a', 'b', 'tie',
    'inconsistent' or 'unparseable'. Only Good/Bad or Bad/Good is a preference."""
    if first not in GSB_LABELS or second not in GSB_LABELS:
        return "unparseable"
    if first == "Good" and second == "Bad":
        return "a"
    if first == "Bad" and second == "Good":
        return "b"
    if first == "Same" and second == "Same":
        return "tie"
    return "inconsistent"


def parse_label(raw: str, labels: Sequence[str]) -> str | None:
    text = raw.strip().strip("\"'`*.!: \n").split()
    if not text:
        return None
    word = text[0].strip("\"'`*.,!:")
    for label in labels:
        if word.lower() == label.lower():
            return label
    return None


class JudgeClient(Protocol):
    model: str

    def complete(self, prompt: str, choices: Sequence[str]) -> str:
        """The judge's raw answer to `prompt`; `choices` are the allowed answers."""
        ...


class OpenAIJudgeClient:
    """Chat completions on an OpenAI-compatible endpoint, with timeouts, retries and backoff."""

    def __init__(self, cfg: JudgeConfig):
        import openai

        if not cfg.model:
            raise ValueError("OFFDPO_JUDGE_MODEL is not set: name the judge model the endpoint serves")
        self.openai = openai
        self.cfg = cfg
        self.model = cfg.model
        # Retries are ours (with jitter and a log line), not the client's.
        self.client = openai.OpenAI(
            base_url=cfg.base_url, api_key=cfg.api_key or "unused", timeout=cfg.timeout_s, max_retries=0
        )
        self.calls = 0
        self._lock = threading.Lock()

    def _retryable(self, exc: Exception) -> bool:
        o = self.openai
        if isinstance(exc, (o.APITimeoutError, o.APIConnectionError, o.RateLimitError, o.InternalServerError)):
            return True
        return isinstance(exc, o.APIStatusError) and exc.status_code >= 500

    def complete(self, prompt: str, choices: Sequence[str]) -> str:
        kwargs = dict(
            model=self.model,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=self.cfg.max_tokens,
            temperature=self.cfg.temperature,
        )
        if self.cfg.structured_output:
            kwargs["extra_body"] = {"structured_outputs": {"choice": list(choices)}}
        delay = self.cfg.backoff_s
        for attempt in range(self.cfg.max_retries + 1):
            with self._lock:
                self.calls += 1
            try:
                resp = self.client.chat.completions.create(**kwargs)
                return resp.choices[0].message.content or ""
            except Exception as exc:  # noqa: BLE001 - classified below
                if not isinstance(exc, self.openai.OpenAIError):
                    raise
                if not self._retryable(exc) or attempt == self.cfg.max_retries:
                    raise JudgeError(
                        f"judge {self.model} at {self.cfg.base_url} failed after {attempt + 1} "
                        f"attempt(s): {type(exc).__name__}: {exc}"
                    ) from None
                sleep = min(delay, self.cfg.backoff_max_s) * (0.5 + random.random() / 2)
                log.warning(
                    "judge request failed (%s), retry %d/%d in %.1f s",
                    type(exc).__name__,
                    attempt + 1,
                    self.cfg.max_retries,
                    sleep,
                )
                time.sleep(sleep)
                delay *= 2
        raise AssertionError("unreachable")


class VerdictCache:
    """SQLite map from a content key to the judge's raw answer; safe to share between threads."""

    def __init__(self, path: str | Path | None):
        self.path = str(path) if path else ":memory:"
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL" if path else "PRAGMA journal_mode=MEMORY")
        self._db.execute("CREATE TABLE IF NOT EXISTS verdicts (key TEXT PRIMARY KEY, raw TEXT NOT NULL)")
        self._lock = threading.Lock()
        self.hits = 0

    @staticmethod
    def key(*parts: object) -> str:
        return hashlib.sha256(json.dumps(parts, ensure_ascii=False, sort_keys=True).encode()).hexdigest()

    def get(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT raw FROM verdicts WHERE key = ?", (key,)).fetchone()
        if row is not None:
            self.hits += 1
        return row[0] if row else None

    def put(self, key: str, raw: str) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO verdicts (key, raw) VALUES (?, ?)", (key, raw))

    def close(self) -> None:
        self._db.close()


@dataclass
class _Ask:
    key: str
    text: str
    choices: tuple[str, ...]
    raw: str | None = None
    error: Exception | None = None


class LLMJudgeStrategy:
    name = "llm_judge"

    def __init__(
        self,
        client: JudgeClient,
        cfg: JudgeConfig,
        cache: VerdictCache | None = None,
        pair_mode: str = "best_worst",
        margin: float = 0.0,
    ):
        if cfg.mode not in ("gsb", "reference"):
            raise ValueError(f"OFFDPO_JUDGE_MODE={cfg.mode!r}: use gsb or reference")
        if cfg.scale_min >= cfg.scale_max:
            raise ValueError("OFFDPO_JUDGE_SCALE_MIN must be below OFFDPO_JUDGE_SCALE_MAX")
        self.client, self.cfg, self.cache = client, cfg, cache
        self.pair_mode, self.margin = pair_mode, margin
        gsb = Path(cfg.gsb_template).read_text() if cfg.gsb_template else DEFAULT_GSB_TEMPLATE
        ref = Path(cfg.reference_template).read_text() if cfg.reference_template else DEFAULT_REFERENCE_TEMPLATE
        self.gsb_template = check_template(gsb, _GSB_FIELDS, _GSB_FIELDS, "GSB template")
        self.reference_template = check_template(ref, _REF_FIELDS, {"answer", "reference"}, "reference template")
        self.score_labels = tuple(str(i) for i in range(cfg.scale_min, cfg.scale_max + 1))

    # -- asking -----------------------------------------------------------------------------
    def _ask(
        self, template: str, mode: str, cs: labeler_pb2.CandidateSet, order: str, fields: dict, choices: tuple[str, ...]
    ) -> _Ask:
        key = VerdictCache.key(
            self.client.model,
            template,
            mode,
            records.canonical_prompt(cs.prompt),
            fields.get("answer_a", fields.get("answer")),
            fields.get("answer_b", fields.get("reference")),
            order,
            list(choices),
        )
        return _Ask(key=key, text=template.format(**fields), choices=choices)

    def _run(self, asks: list[_Ask]) -> None:
        todo = []
        for ask in asks:
            cached = self.cache.get(ask.key) if self.cache else None
            if cached is not None:
                ask.raw = cached
            else:
                todo.append(ask)
        # Identical questions in one batch are asked once.
        unique: dict[str, list[_Ask]] = {}
        for ask in todo:
            unique.setdefault(ask.key, []).append(ask)

        def one(group: list[_Ask]) -> None:
            try:
                raw = self.client.complete(group[0].text, group[0].choices)
                if self.cache:
                    self.cache.put(group[0].key, raw)
                for a in group:
                    a.raw = raw
            except (JudgeError, Exception) as exc:  # noqa: BLE001 - reported per set
                for a in group:
                    a.error = exc

        if unique:
            with ThreadPoolExecutor(max_workers=max(1, self.cfg.concurrency)) as pool:
                list(pool.map(one, unique.values()))

    # -- labelling --------------------------------------------------------------------------
    def label_batch(self, sets: Sequence[labeler_pb2.CandidateSet], source: str) -> list[Outcome | Exception]:
        plans: list[list[tuple] | Exception] = []
        asks: list[_Ask] = []
        for cs in sets:
            try:
                ptext = prompt_text(cs.prompt)
                if self.cfg.mode == "reference" and not cs.HasField("reference"):
                    raise RecordError("reference mode needs a reference answer: set 'reference' on the candidate set")
            except RecordError as exc:
                plans.append(exc)
                continue
            plan = []
            if self.cfg.mode == "gsb":
                n = len(cs.answers)
                for i in range(n):
                    for j in range(i + 1, n):
                        a, b = cs.answers[i], cs.answers[j]
                        ab = self._ask(
                            self.gsb_template,
                            "gsb",
                            cs,
                            "as_presented",
                            dict(prompt=ptext, answer_a=a, answer_b=b),
                            GSB_LABELS,
                        )
                        ba = self._ask(
                            self.gsb_template,
                            "gsb",
                            cs,
                            "as_presented",
                            dict(prompt=ptext, answer_a=b, answer_b=a),
                            GSB_LABELS,
                        )
                        plan.append((i, j, ab, ba))
                        asks += [ab, ba]
            else:
                for i, a in enumerate(cs.answers):
                    ask = self._ask(
                        self.reference_template,
                        "reference",
                        cs,
                        "single",
                        dict(
                            prompt=ptext,
                            reference=cs.reference,
                            answer=a,
                            scale_min=self.cfg.scale_min,
                            scale_max=self.cfg.scale_max,
                        ),
                        self.score_labels,
                    )
                    plan.append((i, ask))
                    asks.append(ask)
            plans.append(plan)
        self._run(asks)
        results: list[Outcome | Exception] = []
        for cs, plan in zip(sets, plans):
            if isinstance(plan, Exception):
                results.append(plan)
                continue
            errors = [a.error for step in plan for a in step if isinstance(a, _Ask) and a.error]
            if errors:
                results.append(JudgeError(str(errors[0])))
                continue
            results.append(self._gsb(cs, plan, source) if self.cfg.mode == "gsb" else self._reference(cs, plan, source))
        return results

    def _prov(self, cs, source) -> records_pb2.Provenance:
        p = base_provenance(records_pb2.LABEL_STRATEGY_LLM_JUDGE, cs, source)
        p.judge_model = self.client.model
        p.metadata["judge_mode"] = self.cfg.mode
        return p

    def _gsb(self, cs, plan, source) -> Outcome:
        out = Outcome()
        for i, j, ab, ba in plan:
            v_ab, v_ba = parse_label(ab.raw, GSB_LABELS), parse_label(ba.raw, GSB_LABELS)
            decision = decide_gsb(v_ab, v_ba)
            if decision in ("a", "b"):
                c, r = (i, j) if decision == "a" else (j, i)
                c_first, r_first = (ab, ba) if decision == "a" else (ba, ab)
                p = self._prov(cs, source)
                for order, ask in (("chosen_first", c_first), ("rejected_first", r_first)):
                    p.verdicts.add(order=order, verdict=parse_label(ask.raw, GSB_LABELS) or "", raw_response=ask.raw)
                out.pairs.append(records.make_pair(cs.prompt, cs.answers[c], cs.answers[r], p))
            elif decision == "tie":
                out.ties += 1
            elif decision == "inconsistent":
                out.inconsistent += 1
                log.info("judge inconsistent on set %s answers %d/%d: %s then %s", cs.set_id, i, j, v_ab, v_ba)
            else:
                out.unparseable += 1
                log.warning("judge answer outside %s on set %s: %r / %r", GSB_LABELS, cs.set_id, ab.raw, ba.raw)
        return out

    def _reference(self, cs, plan, source) -> Outcome:
        scored: list[tuple[int, float, _Ask]] = []
        unparseable = 0
        for i, ask in plan:
            label = parse_label(ask.raw, self.score_labels)
            if label is None:
                unparseable += 1
                log.warning(
                    "judge score outside %s..%s on set %s: %r",
                    self.cfg.scale_min,
                    self.cfg.scale_max,
                    cs.set_id,
                    ask.raw,
                )
                continue
            scored.append((i, float(label), ask))
        if len(scored) < 2:
            return Outcome(unparseable=unparseable)
        sub = labeler_pb2.CandidateSet()
        sub.CopyFrom(cs)
        del sub.answers[:]
        sub.answers.extend(cs.answers[i] for i, _, _ in scored)
        scores = [s for _, s, _ in scored]

        def prov(c: int, r: int) -> records_pb2.Provenance:
            p = self._prov(cs, source)
            p.chosen_score, p.rejected_score = scores[c], scores[r]
            p.verdicts.add(order="chosen", verdict=str(int(scores[c])), raw_response=scored[c][2].raw)
            p.verdicts.add(order="rejected", verdict=str(int(scores[r])), raw_response=scored[r][2].raw)
            p.metadata["judge_scale"] = f"{self.cfg.scale_min}-{self.cfg.scale_max}"
            return p

        out = pairs_from_scores(sub, scores, self.pair_mode, self.margin, prov)
        out.unparseable = unparseable
        return out
