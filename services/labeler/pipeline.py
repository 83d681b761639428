"""The labeler's core: inputs in, strategies applied, pairs published once, rejects dead-lettered.

Duplicates: a pair's id is the hash of its content (offdpo.records.pair_id), the Kafka key is that id,
and the publisher sends each id at most once per run. With the ledger on (OFFDPO_LABELER_LEDGER) the
ids Kafka acknowledged are also written to `<state dir>/published.sqlite` per (bootstrap, topic), so a
rerun of the same input sends nothing again; downstream consumers are idempotent by pair_id anyway.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from offdpo.config import KafkaConfig
from offdpo.kafka import DeadLetterSink
from offdpo.records import RecordError
from offdpo.v1 import labeler_pb2, records_pb2
from services.labeler.base import Outcome
from services.labeler.config import JudgeConfig, LabelerConfig
from services.labeler.inputs import Item, validate_candidate_set

log = logging.getLogger(__name__)
SERVICE = "labeler"


class PublishError(RuntimeError):
    """Kafka did not acknowledge some pairs; nothing was committed."""


class Ledger:
    """Pair ids Kafka acknowledged, per (bootstrap servers, topic), in SQLite."""

    def __init__(self, path: str | Path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS published (scope TEXT, pair_id TEXT, PRIMARY KEY (scope, pair_id))"
        )
        self._lock = threading.Lock()

    def has(self, scope: str, pair_id: str) -> bool:
        with self._lock:
            return (
                self._db.execute("SELECT 1 FROM published WHERE scope=? AND pair_id=?", (scope, pair_id)).fetchone()
                is not None
            )

    def add(self, scope: str, pair_ids: Iterable[str]) -> None:
        with self._lock:
            self._db.execute("BEGIN")
            self._db.executemany("INSERT OR IGNORE INTO published VALUES (?, ?)", [(scope, p) for p in pair_ids])
            self._db.execute("COMMIT")

    def close(self) -> None:
        self._db.close()


class PairPublisher:
    """Sends pairs keyed by pair_id, each id once; `confirm()` waits for Kafka's acknowledgements."""

    def __init__(self, producer, kafka: KafkaConfig, ledger: Ledger | None = None, ack_timeout_s: float = 60.0):
        self.producer = producer
        self.topic = kafka.pairs_topic
        self.scope = f"{kafka.bootstrap_servers}/{kafka.pairs_topic}"
        self.ledger = ledger
        self.ack_timeout_s = ack_timeout_s
        self._seen: set[str] = set()
        self._pending: list[tuple[str, object]] = []
        self._lock = threading.Lock()

    def publish(self, pair: records_pb2.PreferencePair) -> bool:
        """False if this pair id was already published (this run, or acknowledged in an earlier one)."""
        with self._lock:
            if pair.pair_id in self._seen or (self.ledger and self.ledger.has(self.scope, pair.pair_id)):
                return False
            self._seen.add(pair.pair_id)
            fut = self.producer.send(self.topic, key=pair.pair_id.encode(), value=pair.SerializeToString())
            self._pending.append((pair.pair_id, fut))
            return True

    def confirm(self) -> list[str]:
        """Block until every pending pair is acknowledged (acks=all); raise PublishError otherwise."""
        with self._lock:
            pending, self._pending = self._pending, []
        if not pending:
            return []
        self.producer.flush(timeout=self.ack_timeout_s)
        failed = []
        for pid, fut in pending:
            try:
                fut.get(timeout=self.ack_timeout_s)
            except Exception as exc:  # noqa: BLE001 - any failure means not durable
                failed.append(f"{pid}: {exc}")
        if failed:
            with self._lock:
                self._seen.difference_update(pid for pid, _ in pending)
            raise PublishError(f"{len(failed)} of {len(pending)} pairs not acknowledged by Kafka: {failed[:3]}")
        ids = [pid for pid, _ in pending]
        if self.ledger:
            self.ledger.add(self.scope, ids)
        return ids


@dataclass
class Summary:
    counts: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    FIELDS = ("inputs", "pairs", "duplicates", "ties", "inconsistent", "unparseable", "rejects")

    def add(self, strategy: str, **counts: int) -> None:
        self.counts[strategy].update({k: v for k, v in counts.items() if v})

    def total(self) -> Counter:
        out: Counter = Counter()
        for c in self.counts.values():
            out.update(c)
        return out

    def as_dict(self) -> dict:
        return {s: {f: c.get(f, 0) for f in self.FIELDS} for s, c in sorted(self.counts.items())} | {
            "total": {f: self.total().get(f, 0) for f in self.FIELDS}
        }

    def table(self) -> str:
        rows = [("strategy",) + self.FIELDS]
        for s, c in self.as_dict().items():
            rows.append((s,) + tuple(str(c[f]) for f in self.FIELDS))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows)


@dataclass
class SetReport:
    """What became of one input (for gRPC results and tests)."""

    strategy: str
    pair_ids: list[str] = field(default_factory=list)
    duplicate_ids: list[str] = field(default_factory=list)
    ties: int = 0
    error: str = ""


class Strategies:
    """Builds each strategy on first use (a reward model or judge client is only loaded if needed)."""

    def __init__(self, cfg: LabelerConfig, judge_cfg: JudgeConfig | None = None, overrides: dict | None = None):
        self.cfg, self.judge_cfg = cfg, judge_cfg or JudgeConfig.from_env()
        self._built: dict[str, object] = dict(overrides or {})
        self._lock = threading.Lock()

    def get(self, name: str):
        with self._lock:
            if name not in self._built:
                self._built[name] = self._build(name)
            return self._built[name]

    def _build(self, name: str):
        cfg = self.cfg
        if name == "rules":
            from services.labeler.rules import RuleSet, RulesStrategy

            if not cfg.rules_file:
                raise ValueError("the rules strategy needs a rules file: set OFFDPO_LABELER_RULES or --rules")
            return RulesStrategy(RuleSet.load(cfg.rules_file))
        if name == "reward_model":
            from services.labeler.reward import RewardModel, RewardModelStrategy

            if not cfg.reward_model:
                raise ValueError("the reward_model strategy needs OFFDPO_LABELER_REWARD_MODEL (or --reward-model)")
            return RewardModelStrategy(
                RewardModel(cfg.reward_model, cfg.reward_batch_size, cfg.reward_max_length), cfg.pair_mode, cfg.margin
            )
        if name == "llm_judge":
            from services.labeler.judge import LLMJudgeStrategy, OpenAIJudgeClient, VerdictCache

            cache = VerdictCache(Path(cfg.state_dir) / "verdicts.sqlite") if self.judge_cfg.cache else None
            return LLMJudgeStrategy(OpenAIJudgeClient(self.judge_cfg), self.judge_cfg, cache, cfg.pair_mode, cfg.margin)
        raise ValueError(f"unknown strategy {name!r}: use rules, reward_model or llm_judge")


class Labeler:
    """Labels batches of inputs and publishes the results. Thread-safe for one batch at a time."""

    def __init__(
        self,
        cfg: LabelerConfig,
        publisher: PairPublisher,
        deadletters: DeadLetterSink | None,
        strategies: Strategies,
        generator=None,
        progress: Callable[[str], None] | None = None,
    ):
        self.cfg = cfg
        self.publisher = publisher
        self.deadletters = deadletters
        self.strategies = strategies
        self.generator = generator
        self.summary = Summary()
        self.progress = progress
        self._lock = threading.Lock()

    # -- dead letters -----------------------------------------------------------------------
    def reject(self, item: Item, strategy: str, reason: str, error_type: str) -> None:
        self.summary.add(strategy, rejects=1)
        if self.deadletters is None:
            log.warning("rejected %s@%s: %s", item.source, item.offset, reason)
            return
        self.deadletters.send(
            value=item.raw,
            key=item.key,
            topic=item.source,
            partition=item.partition,
            offset=item.offset,
            reason=reason,
            error_type=error_type,
        )

    def _publish(self, strategy: str, pairs: Sequence[records_pb2.PreferencePair], report: SetReport) -> None:
        for pair in pairs:
            if self.publisher.publish(pair):
                report.pair_ids.append(pair.pair_id)
            else:
                report.duplicate_ids.append(pair.pair_id)
        self.summary.add(strategy, pairs=len(report.pair_ids), duplicates=len(report.duplicate_ids))

    def confirm(self) -> None:
        """Wait for Kafka to acknowledge this batch's pairs and dead letters."""
        self.publisher.confirm()
        if self.deadletters is not None:
            self.deadletters.flush(self.cfg.ack_timeout_s)

    # -- candidate sets ---------------------------------------------------------------------
    def label_candidates(self, items: Sequence[Item], default_strategy: str = "") -> list[SetReport]:
        """Label candidate-set items (malformed ones are dead-lettered) and publish the pairs.
        Call confirm() afterwards (the gRPC server and the runners do)."""
        with self._lock:
            return self._label_candidates(items, default_strategy or self.cfg.strategy)

    def _label_candidates(self, items: Sequence[Item], default: str) -> list[SetReport]:
        reports: list[SetReport | None] = [None] * len(items)
        groups: dict[str, list[int]] = defaultdict(list)
        for idx, item in enumerate(items):
            strategy = item.value.strategy if item.value is not None and item.value.strategy else default
            reports[idx] = SetReport(strategy=strategy)
            self.summary.add(strategy, inputs=1)
            if item.error:
                self._fail(item, reports[idx], item.error, item.error_type)
                continue
            cs: labeler_pb2.CandidateSet = item.value
            try:
                validate_candidate_set(cs, self.cfg.max_answers)
            except RecordError as exc:
                self._fail(item, reports[idx], f"{self._where(item)}{exc}", "invalid_candidate_set")
                continue
            n = cs.generate_n or self.cfg.generate_n
            if n > 0:
                if self.generator is None:
                    self._fail(
                        item,
                        reports[idx],
                        f"{self._where(item)}generate_n={n} but on-policy generation is "
                        f"not configured (start with --generate / a refscore address)",
                        "generate_unavailable",
                    )
                    continue
                try:
                    new = self.generator.generate(cs.prompt, n)
                except Exception as exc:  # noqa: BLE001 - reported as a dead letter
                    self._fail(
                        item, reports[idx], f"{self._where(item)}on-policy generation failed: {exc}", "generate_failed"
                    )
                    continue
                seen = set(cs.answers)
                for text in new:
                    if text.strip() and text not in seen:
                        cs.answers.append(text)
                        seen.add(text)
                if len(cs.answers) < 2:
                    self._fail(
                        item,
                        reports[idx],
                        f"{self._where(item)}fewer than 2 distinct non-empty answers after generating {n} samples",
                        "too_few_answers",
                    )
                    continue
            groups[strategy].append(idx)

        for strategy, idxs in groups.items():
            try:
                impl = self.strategies.get(strategy)
            except Exception as exc:  # noqa: BLE001 - configuration problem: every set says why
                for idx in idxs:
                    self._fail(
                        items[idx], reports[idx], f"strategy {strategy!r} unavailable: {exc}", "strategy_unavailable"
                    )
                continue
            t0 = time.monotonic()
            results = impl.label_batch([items[i].value for i in idxs], items[idxs[0]].source)
            for idx, result in zip(idxs, results):
                report = reports[idx]
                if isinstance(result, Exception):
                    etype = "judge_unavailable" if type(result).__name__ == "JudgeError" else "label_error"
                    self._fail(items[idx], report, f"{self._where(items[idx])}{result}", etype)
                    continue
                assert isinstance(result, Outcome)
                report.ties = result.ties
                self.summary.add(
                    strategy, ties=result.ties, inconsistent=result.inconsistent, unparseable=result.unparseable
                )
                self._publish(strategy, result.pairs, report)
            log.debug("%s labelled %d sets in %.2f s", strategy, len(idxs), time.monotonic() - t0)
        return reports  # type: ignore[return-value]

    @staticmethod
    def _where(item: Item) -> str:
        return f"{item.source}:{item.offset}: " if item.offset >= 0 and item.partition < 0 else ""

    def _fail(self, item: Item, report: SetReport, reason: str, error_type: str) -> None:
        report.error = reason
        self.reject(item, report.strategy, reason, error_type)

    # -- ready-made pairs: human annotations and imported data --------------------------------
    def publish_pairs(self, items: Sequence[Item], strategy: str) -> list[SetReport]:
        """Items whose value is a PreferencePair (imported), a HumanJudgement, or an error."""
        from services.labeler.human import judgement_to_pair

        out = []
        with self._lock:
            for item in items:
                report = SetReport(strategy=strategy)
                out.append(report)
                self.summary.add(strategy, inputs=1)
                if item.error:
                    self._fail(item, report, item.error, item.error_type)
                    continue
                value = item.value
                if isinstance(value, labeler_pb2.HumanJudgement):
                    value = judgement_to_pair(value, item.source)
                    if value is None:
                        report.ties = 1
                        self.summary.add(strategy, ties=1)
                        continue
                self._publish(strategy, [value], report)
        return out
