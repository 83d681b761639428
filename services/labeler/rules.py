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

Import paths are refused unless the module is in a package listed in
OFFDPO_LABELER_RULES_CALLABLE_PACKAGES (comma-separated; empty by default) and the function is defined
in that module (not a name it imported, such as `shutil.rmtree`): a rules file must not make the
labeler import, and call with an answer's text, whatever it names. A path naming a registered check
is the same as its name, and allowed.

A check passes (adds its weight, and its name to the rule hits) or fails. A `python` callable gets
(answer, candidate_set) and returns a bool, or a number in [0, 1] that scales the weight. Checks
against the reference answer are skipped for sets without one.
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from offdpo.v1 import labeler_pb2, records_pb2
from services.labeler.base import Result, base_provenance, pairs_from_scores
from services.labeler.errors import LabelError, RulesError
from services.labeler.names import PAIR_MODES, PairMode, StrategyName, problem
from services.labeler.server_config import RulesConfig

__all__ = ["RuleSet", "RulesError", "RulesStrategy", "register_check"]

CheckFn = Callable[[str, labeler_pb2.CandidateSet], "bool | float"]
RuleFn = Callable[[str, labeler_pb2.CandidateSet], "float | None"]  # fraction passed in [0, 1]; None = skipped
_REGISTRY: dict[str, CheckFn] = {}


def register_check(name: str) -> Callable[[CheckFn], CheckFn]:
    """Decorator: make a Python callable usable as `type: python, callable: NAME` in a rules file."""

    def deco(fn: CheckFn) -> CheckFn:
        _REGISTRY[name] = fn
        return fn

    return deco


@register_check("no_empty_lines")
def _no_empty_lines(answer: str, cs: labeler_pb2.CandidateSet) -> bool:
    return "\n\n\n" not in answer


_MODULE_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_ATTR = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _registered(module: str, attr: str) -> CheckFn | None:
    """The registered check a path names, looked up in an already-imported module (nothing imported)."""
    loaded = sys.modules.get(module)
    fn = getattr(loaded, attr, None) if loaded is not None else None
    return fn if fn is not None and any(fn is f for f in _REGISTRY.values()) else None


def _allowed(module: str, packages: Sequence[str]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages if p)


def _import_callable(spec: str, where: str, packages: Sequence[str]) -> CheckFn:
    module, _, attr = spec.partition(":")
    if not _MODULE_PATH.match(module) or not _ATTR.match(attr):
        raise RulesError(f"{where}: callable {spec!r} must be 'package.module:function'")
    registered = _registered(module, attr)
    if registered is not None:
        return registered
    if not _allowed(module, packages):
        raise RulesError(
            f"{where}: callable {spec!r} is not in an allowed package: list its package in "
            f"OFFDPO_LABELER_RULES_CALLABLE_PACKAGES (now {','.join(packages) or 'empty'}), or register the "
            f"check with services.labeler.rules.register_check and name it"
        )
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise RulesError(f"{where}: cannot import callable {spec!r}: {exc}") from None
    if not inspect.isfunction(fn) or fn.__module__ != module:
        raise RulesError(f"{where}: {spec!r} is not a function defined in {module}")
    return fn


def _resolve_callable(spec: str, where: str, packages: Sequence[str]) -> CheckFn:
    if spec in _REGISTRY:
        return _REGISTRY[spec]
    if ":" in spec:
        return _import_callable(spec, where, packages)
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
    fn: RuleFn


# -- one builder per rule type: (spec, where) -> the check ------------------------------------
_FLAGS = {"i": re.I, "m": re.M, "s": re.S, "x": re.X}


def _regex(must: bool) -> Callable[[dict[str, Any], str], RuleFn]:
    def build(spec: dict[str, Any], where: str) -> RuleFn:
        flags = 0
        for flag in str(spec.get("flags", "")):
            if flag not in _FLAGS:
                raise RulesError(f"{where}: flag {flag!r} is not one of i, m, s, x")
            flags |= _FLAGS[flag]
        try:
            rx = re.compile(str(spec["pattern"]), flags)
        except KeyError:
            raise RulesError(f"{where}: needs 'pattern'") from None
        except re.error as exc:
            raise RulesError(f"{where}: bad regular expression: {exc}") from None
        return lambda a, cs: float(bool(rx.search(a)) == must)

    return build


def _length(spec: dict[str, Any], where: str) -> RuleFn:
    lo, hi = spec.get("min", 0), spec.get("max")
    unit = spec.get("unit", "chars")
    if unit not in ("chars", "words"):
        raise RulesError(f"{where}: unit must be chars or words")
    if not isinstance(lo, int) or (hi is not None and not isinstance(hi, int)) or (hi is not None and hi < lo):
        raise RulesError(f"{where}: min and max must be integers with min <= max")

    def count(a: str) -> int:
        return len(a) if unit == "chars" else len(a.split())

    return lambda a, cs: float(lo <= count(a) and (hi is None or count(a) <= hi))


def _valid_json(spec: dict[str, Any], where: str) -> RuleFn:
    def check(a: str, cs: labeler_pb2.CandidateSet) -> float:
        try:
            json.loads(a)
            return 1.0
        except ValueError:
            return 0.0

    return check


def _reference(equals: bool) -> Callable[[dict[str, Any], str], RuleFn]:
    def build(spec: dict[str, Any], where: str) -> RuleFn:
        normalize = bool(spec.get("normalize", True))

        def check(a: str, cs: labeler_pb2.CandidateSet) -> float | None:
            if not cs.HasField("reference"):
                return None
            ref, ans = _norm(cs.reference, normalize), _norm(a, normalize)
            return float(ans == ref if equals else ref in ans)

        return check

    return build


def _python(spec: dict[str, Any], where: str, packages: Sequence[str] = ()) -> RuleFn:
    target = _resolve_callable(str(spec.get("callable", "")), where, packages)

    def check(a: str, cs: labeler_pb2.CandidateSet) -> float:
        try:
            value = target(a, cs)
        except Exception as exc:  # noqa: BLE001 - a user's check failing rejects the set, not the run
            raise LabelError(f"{where}: callable raised {type(exc).__name__}: {exc}") from None
        if isinstance(value, bool):
            return float(value)
        if isinstance(value, (int, float)) and 0.0 <= float(value) <= 1.0:
            return float(value)
        raise LabelError(f"{where}: callable returned {value!r}; return a bool or a number in [0, 1]")

    return check


# type -> (its own keys, builder)
_TYPES: dict[str, tuple[set[str], Callable[[dict[str, Any], str], RuleFn]]] = {
    "regex_must": ({"pattern", "flags"}, _regex(must=True)),
    "regex_must_not": ({"pattern", "flags"}, _regex(must=False)),
    "length": ({"min", "max", "unit"}, _length),
    "valid_json": (set(), _valid_json),
    "equals_reference": ({"normalize"}, _reference(equals=True)),
    "contains_reference": ({"normalize"}, _reference(equals=False)),
    "python": ({"callable"}, _python),
}


def _build_rule(spec: Any, index: int, packages: Sequence[str]) -> Rule:
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
    keys, build = _TYPES[kind]
    allowed = {"name", "type", "weight"} | keys
    unknown = set(spec) - allowed
    if unknown:
        raise RulesError(f"{where}: unknown keys {sorted(unknown)} for type {kind} (allowed: {sorted(allowed)})")
    fn = _python(spec, where, packages) if kind == "python" else build(spec, where)
    return Rule(name=name, type=kind, weight=weight, fn=fn)


@dataclass
class RuleSet:
    rules: list[Rule]
    pair_mode: str = PairMode.BEST_WORST
    margin: float = 0.0
    source: str = ""

    @classmethod
    def from_dict(cls, data: Any, source: str = "", callable_packages: Sequence[str] | None = None) -> RuleSet:
        """`callable_packages`: where `callable: module:function` may import from (default:
        OFFDPO_LABELER_RULES_CALLABLE_PACKAGES, empty unless set)."""
        packages = RulesConfig.from_env().callable_packages if callable_packages is None else callable_packages
        if not isinstance(data, dict) or not isinstance(data.get("rules"), list) or not data["rules"]:
            raise RulesError(f"{source or 'rules'}: needs a non-empty 'rules' list")
        unknown = set(data) - {"rules", "pair_mode", "margin"}
        if unknown:
            raise RulesError(f"{source}: unknown top-level keys {sorted(unknown)}")
        rules = [_build_rule(spec, i, packages) for i, spec in enumerate(data["rules"])]
        names = [r.name for r in rules]
        if len(set(names)) != len(names):
            raise RulesError(f"{source}: rule names must be unique, got {names}")
        mode = data.get("pair_mode", PairMode.BEST_WORST)
        wrong = problem(mode, PAIR_MODES, "pair_mode")
        if wrong:
            raise RulesError(f"{source}: {wrong}")
        return cls(rules=rules, pair_mode=mode, margin=float(data.get("margin", 0.0)), source=source)

    @classmethod
    def load(cls, path: str | Path, callable_packages: Sequence[str] | None = None) -> RuleSet:
        try:
            data = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise RulesError(f"cannot read rules file {path}: {exc}") from None
        return cls.from_dict(data, str(path), callable_packages)

    def score(self, answer: str, cs: labeler_pb2.CandidateSet) -> tuple[float, list[str]]:
        total, hits = 0.0, []
        for rule in self.rules:
            frac = rule.fn(answer, cs)
            if frac:
                total += rule.weight * frac
                hits.append(rule.name)
        return total, hits


class RulesStrategy:
    name = StrategyName.RULES.value

    def __init__(self, rules: RuleSet):
        self.rules = rules

    def label_batch(self, sets: Sequence[labeler_pb2.CandidateSet], source: str) -> list[Result]:
        results: list[Result] = []
        for cs in sets:
            try:
                scored = [self.rules.score(a, cs) for a in cs.answers]
            except LabelError as exc:
                results.append(exc)
                continue
            scores = [s for s, _ in scored]

            def prov(c: int, r: int, cs=cs, scored=scored) -> records_pb2.Provenance:
                p = base_provenance(StrategyName.RULES, cs, source)
                p.chosen_score, p.rejected_score = scored[c][0], scored[r][0]
                p.chosen_rule_hits.extend(scored[c][1])
                p.rejected_rule_hits.extend(scored[r][1])
                if self.rules.source:
                    p.metadata["rules_file"] = self.rules.source
                return p

            results.append(pairs_from_scores(cs, scores, self.rules.pair_mode, self.rules.margin, prov))
        return results
