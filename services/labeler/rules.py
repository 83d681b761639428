"""Rules strategy: a declarative YAML file of weighted checks; the higher-scoring answer is chosen.

    pair_mode: best_worst        # or: all
    margin: 0                    # a gap of this or less gives no pair
    rules:
      - {name: has_number, type: regex_must, pattern: '\\d', weight: 1}
      - {name: no_apology, type: regex_must_not, pattern: '(?i)sorry', weight: 2}
      - {name: short, type: length, min: 1, max: 400, weight: 0.5}
      - {name: json, type: valid_json, weight: 1}
      - {name: exact, type: equals_reference, weight: 3, normalize: true}
      - {name: mentions, type: contains_reference, weight: 1}
      - {name: polite, type: python, callable: polite, weight: 1}           # registered with @register_check
      - {name: custom, type: python, callable: "mypkg.checks:is_ok", weight: 1}  # or imported by path

A check passes (adds its weight, and its name to the rule hits) or fails. A `python` callable gets
(answer, candidate_set) and returns a bool, or a number in [0, 1] that scales the weight. Checks
against the reference answer are skipped for sets without one.
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from offdpo.records import RecordError
from offdpo.v1 import labeler_pb2, records_pb2
from services.labeler.base import Outcome, base_provenance, pairs_from_scores

CheckFn = Callable[[str, labeler_pb2.CandidateSet], "bool | float"]
_REGISTRY: dict[str, CheckFn] = {}


class RulesError(ValueError):
    """The rules file is invalid; the message names the rule and what to fix."""


def register_check(name: str):
    """Decorator: make a Python callable usable as `type: python, callable: NAME` in a rules file."""

    def deco(fn: CheckFn) -> CheckFn:
        _REGISTRY[name] = fn
        return fn

    return deco


@register_check("no_empty_lines")
def _no_empty_lines(answer: str, cs) -> bool:
    return "\n\n\n" not in answer


def _resolve_callable(spec: str, where: str) -> CheckFn:
    if spec in _REGISTRY:
        return _REGISTRY[spec]
    if ":" in spec:
        module, _, attr = spec.partition(":")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise RulesError(f"{where}: cannot import callable {spec!r}: {exc}") from None
        if not callable(fn):
            raise RulesError(f"{where}: {spec!r} is not callable")
        return fn
    raise RulesError(
        f"{where}: no check registered as {spec!r} (registered: {sorted(_REGISTRY)}); "
        f"register it with services.labeler.rules.register_check or use 'module:function'"
    )


def _norm(text: str, normalize: bool) -> str:
    return " ".join(text.split()).lower() if normalize else text


@dataclass
class Rule:
    name: str
    type: str
    weight: float
    fn: Callable[[str, labeler_pb2.CandidateSet], float | None]  # fraction passed in [0,1]; None = skipped


_TYPES = ("regex_must", "regex_must_not", "length", "valid_json", "equals_reference", "contains_reference", "python")


def _build_rule(spec: Any, index: int) -> Rule:
    where = f"rules[{index}]"
    if not isinstance(spec, dict):
        raise RulesError(f"{where} must be a mapping with at least 'type'")
    kind = spec.get("type")
    if kind not in _TYPES:
        raise RulesError(f"{where}: type {kind!r} is not one of {list(_TYPES)}")
    name = str(spec.get("name") or f"{kind}_{index}")
    where = f"rule {name!r}"
    try:
        weight = float(spec.get("weight", 1.0))
    except (TypeError, ValueError):
        raise RulesError(f"{where}: weight must be a number") from None
    allowed = {"name", "type", "weight"} | {
        "regex_must": {"pattern", "flags"},
        "regex_must_not": {"pattern", "flags"},
        "length": {"min", "max", "unit"},
        "valid_json": set(),
        "equals_reference": {"normalize"},
        "contains_reference": {"normalize"},
        "python": {"callable"},
    }[kind]
    unknown = set(spec) - allowed
    if unknown:
        raise RulesError(f"{where}: unknown keys {sorted(unknown)} for type {kind} (allowed: {sorted(allowed)})")
    fn: Callable[[str, labeler_pb2.CandidateSet], float | None]
    if kind in ("regex_must", "regex_must_not"):
        flags = 0
        for flag in str(spec.get("flags", "")):
            if flag not in "imsx":
                raise RulesError(f"{where}: flag {flag!r} is not one of i, m, s, x")
            flags |= {"i": re.I, "m": re.M, "s": re.S, "x": re.X}[flag]
        try:
            rx = re.compile(str(spec["pattern"]), flags)
        except KeyError:
            raise RulesError(f"{where}: needs 'pattern'") from None
        except re.error as exc:
            raise RulesError(f"{where}: bad regular expression: {exc}") from None
        must = kind == "regex_must"
        fn = lambda a, cs: float(bool(rx.search(a)) == must)  # noqa: E731
    elif kind == "length":
        lo, hi = spec.get("min", 0), spec.get("max", None)
        unit = spec.get("unit", "chars")
        if unit not in ("chars", "words"):
            raise RulesError(f"{where}: unit must be chars or words")
        if not isinstance(lo, int) or (hi is not None and not isinstance(hi, int)) or (hi is not None and hi < lo):
            raise RulesError(f"{where}: min and max must be integers with min <= max")
        count = (lambda a: len(a)) if unit == "chars" else (lambda a: len(a.split()))
        fn = lambda a, cs: float(lo <= count(a) and (hi is None or count(a) <= hi))  # noqa: E731
    elif kind == "valid_json":

        def fn(a, cs):
            try:
                json.loads(a)
                return 1.0
            except ValueError:
                return 0.0
    elif kind in ("equals_reference", "contains_reference"):
        normalize = bool(spec.get("normalize", True))
        equals = kind == "equals_reference"

        def fn(a, cs, normalize=normalize, equals=equals):
            if not cs.HasField("reference"):
                return None
            ref, ans = _norm(cs.reference, normalize), _norm(a, normalize)
            return float(ans == ref if equals else ref in ans)
    else:
        target = _resolve_callable(str(spec.get("callable", "")), where)

        def fn(a, cs, target=target, where=where):
            try:
                value = target(a, cs)
            except Exception as exc:  # noqa: BLE001 - a user's check failing is reported, not fatal
                raise RulesError(f"{where}: callable raised {type(exc).__name__}: {exc}") from None
            if isinstance(value, bool):
                return float(value)
            if isinstance(value, (int, float)) and 0.0 <= float(value) <= 1.0:
                return float(value)
            raise RulesError(f"{where}: callable returned {value!r}; return a bool or a number in [0, 1]")

    return Rule(name=name, type=kind, weight=weight, fn=fn)


@dataclass
class RuleSet:
    rules: list[Rule]
    pair_mode: str = "best_worst"
    margin: float = 0.0
    source: str = ""

    @classmethod
    def from_dict(cls, data: Any, source: str = "") -> RuleSet:
        if not isinstance(data, dict) or not isinstance(data.get("rules"), list) or not data["rules"]:
            raise RulesError(f"{source or 'rules'}: needs a non-empty 'rules' list")
        unknown = set(data) - {"rules", "pair_mode", "margin"}
        if unknown:
            raise RulesError(f"{source}: unknown top-level keys {sorted(unknown)}")
        rules = [_build_rule(spec, i) for i, spec in enumerate(data["rules"])]
        names = [r.name for r in rules]
        if len(set(names)) != len(names):
            raise RulesError(f"{source}: rule names must be unique, got {names}")
        mode = data.get("pair_mode", "best_worst")
        if mode not in ("best_worst", "all"):
            raise RulesError(f"{source}: pair_mode must be best_worst or all")
        return cls(rules=rules, pair_mode=mode, margin=float(data.get("margin", 0.0)), source=source)

    @classmethod
    def load(cls, path: str | Path) -> RuleSet:
        try:
            data = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise RulesError(f"cannot read rules file {path}: {exc}") from None
        return cls.from_dict(data, str(path))

    def score(self, answer: str, cs: labeler_pb2.CandidateSet) -> tuple[float, list[str]]:
        total, hits = 0.0, []
        for rule in self.rules:
            frac = rule.fn(answer, cs)
            if frac:
                total += rule.weight * frac
                hits.append(rule.name)
        return total, hits


class RulesStrategy:
    name = "rules"

    def __init__(self, rules: RuleSet):
        self.rules = rules

    def label_batch(self, sets: Sequence[labeler_pb2.CandidateSet], source: str) -> list[Outcome | Exception]:
        results: list[Outcome | Exception] = []
        for cs in sets:
            try:
                scored = [self.rules.score(a, cs) for a in cs.answers]
            except RulesError as exc:
                results.append(RecordError(str(exc)))
                continue
            scores = [s for s, _ in scored]

            def prov(c: int, r: int, cs=cs, scored=scored) -> records_pb2.Provenance:
                p = base_provenance(records_pb2.LABEL_STRATEGY_RULES, cs, source)
                p.chosen_score, p.rejected_score = scored[c][0], scored[r][0]
                p.chosen_rule_hits.extend(scored[c][1])
                p.rejected_rule_hits.extend(scored[r][1])
                if self.rules.source:
                    p.metadata["rules_file"] = self.rules.source
                return p

            results.append(pairs_from_scores(cs, scores, self.rules.pair_mode, self.rules.margin, prov))
        return results
