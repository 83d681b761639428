"""LLM-judge strategy: any OpenAI-compatible chat endpoint judges the answers.

Two methods (`OFFDPO_JUDGE_MODE`): GSB compares two answers asked in both orders (`gsb`); reference
scores each answer against the set's reference answer (`reference`). Verdicts are cached in SQLite
under the state dir, so a rerun pays nothing.

    client.py     the endpoint (openai SDK, its own retries)       prompts.py    templates, parsing answers
    cache.py      verdicts already paid for                        method.py     plan -> ask -> outcome
    gsb.py        GSB in both orders                               reference.py  scores against a reference
"""

from __future__ import annotations

from collections.abc import Sequence

from offdpo.errors import ConfigError
from offdpo.v1 import labeler_pb2
from services.labeler.base import Result
from services.labeler.config import JudgeConfig
from services.labeler.errors import JudgeError
from services.labeler.judge.cache import VerdictCache
from services.labeler.judge.client import JudgeClient, OpenAIJudgeClient
from services.labeler.judge.gsb import GsbAsk, GsbDecision, GsbMethod, decide_gsb
from services.labeler.judge.method import Asker
from services.labeler.judge.prompts import (
    DEFAULT_GSB_TEMPLATE,
    DEFAULT_REFERENCE_TEMPLATE,
    GSB_FIELDS,
    GSB_LABELS,
    REFERENCE_FIELDS,
    REFERENCE_REQUIRED,
    check_template,
    load_template,
    parse_label,
)
from services.labeler.judge.reference import ReferenceAsk, ReferenceMethod
from services.labeler.names import JUDGE_MODES, JudgeMode, PairMode, StrategyName, problem

__all__ = [
    "GSB_LABELS",
    "GsbAsk",
    "GsbDecision",
    "JudgeClient",
    "JudgeError",
    "LLMJudgeStrategy",
    "OpenAIJudgeClient",
    "ReferenceAsk",
    "VerdictCache",
    "check_template",
    "decide_gsb",
    "parse_label",
]


class LLMJudgeStrategy:
    """The `llm_judge` strategy: the method `cfg.mode` names, asking `client` (through `cache` if given)."""

    name = StrategyName.LLM_JUDGE.value

    def __init__(
        self,
        client: JudgeClient,
        cfg: JudgeConfig,
        cache: VerdictCache | None = None,
        pair_mode: str = PairMode.BEST_WORST,
        margin: float = 0.0,
    ):
        wrong = problem(cfg.mode, JUDGE_MODES, "OFFDPO_JUDGE_MODE")
        if wrong:
            raise ConfigError(wrong)
        if cfg.scale_min >= cfg.scale_max:
            raise ConfigError("OFFDPO_JUDGE_SCALE_MIN must be below OFFDPO_JUDGE_SCALE_MAX")
        self.client, self.cfg, self.cache = client, cfg, cache
        asker = Asker(client, cache, cfg.concurrency)
        self.method: GsbMethod | ReferenceMethod
        if cfg.mode == JudgeMode.GSB:
            template = load_template(cfg.gsb_template, DEFAULT_GSB_TEMPLATE, GSB_FIELDS, GSB_FIELDS, "GSB template")
            self.method = GsbMethod(asker, template)
        else:
            template = load_template(
                cfg.reference_template,
                DEFAULT_REFERENCE_TEMPLATE,
                REFERENCE_FIELDS,
                REFERENCE_REQUIRED,
                "reference template",
            )
            self.method = ReferenceMethod(asker, template, cfg.scale_min, cfg.scale_max, pair_mode, margin)

    def label_batch(self, sets: Sequence[labeler_pb2.CandidateSet], source: str) -> list[Result]:
        return self.method.label_batch(sets, source)
