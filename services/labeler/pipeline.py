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
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from offdpo.config import KafkaConfig
from offdpo.errors import ConfigError, OffdpoError, Unavailable
from offdpo.kafka import DeadLetterSink
from offdpo.v1 import labeler_pb2, records_pb2
from services.labeler.base import Strategy
from services.labeler.config import JudgeConfig, LabelerConfig
from services.labeler.errors import (
    GenerateFailed,
    GenerateNotConfigured,
    GenerateRefused,
    InvalidCandidateSet,
    PublishError,
    StrategyUnavailable,
    TooFewAnswers,
)
from services.labeler.inputs import Item, validate_candidate_set
from services.labeler.names import StrategyName, candidate_strategy_problem

__all__ = ["Labeler", "Ledger", "Outage", "PairPublisher", "PublishError", "SetReport", "Strategies", "Summary"]

log = logging.getLogger(__name__)
SERVICE = "labeler"


class Outage(Unavailable):
    """Candidate sets were left unlabelled because a dependency (judge, reward model, refscore
    Generate) is down. Nothing was dead-lettered for them; whoever reads the input must not move past
    them, and redoes them when the dependency is back."""

    error_type = "dependency_unavailable"

    def __init__(self, unlabelled: int, first_error: str):
        super().__init__(
            f"{unlabelled} candidate set(s) not labelled because a dependency is down (first: {first_error}); "
            "not dead-lettered, to be redone when it is back"
        )
        self.unlabelled = unlabelled


class SendFuture(Protocol):
    def get(self, timeout: float | None = None) -> Any: ...


class Producer(Protocol):
    """The part of kafka-python's KafkaProducer the publisher uses (tests pass an in-memory fake)."""

    def send(self, topic: str, value: bytes | None = None, key: bytes | None = None) -> SendFuture: ...

    def flush(self, timeout: float | None = None) -> None: ...

    def close(self, timeout: float | None = None) -> None: ...


class Generator(Protocol):
    """On-policy answers for a prompt (refscore's Generate in production)."""

    def generate(self, prompt: records_pb2.Prompt, n: int) -> list[str]: ...


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

    def __init__(
        self, producer: Producer, kafka: KafkaConfig, ledger: Ledger | None = None, ack_timeout_s: float = 60.0
    ):
        self.producer = producer
        self.topic = kafka.pairs_topic
        self.scope = f"{kafka.bootstrap_servers}/{kafka.pairs_topic}"
        self.ledger = ledger
        self.ack_timeout_s = ack_timeout_s
        self._seen: set[str] = set()
        self._pending: list[tuple[str, SendFuture]] = []
        self._lock = threading.Lock()

    def publish(self, pair: records_pb2.PreferencePair) -> bool:
        """False if this pair id was already published (this run, or acknowledged in an earlier one).

        An id counts as published from the moment `send` queued it until `confirm` finds it was not
        acknowledged: then it is forgotten again, so a retry (the caller's, or the consumer's redo of
        its batch) sends it anew instead of answering "duplicate" for a pair that never reached Kafka.
        """
        with self._lock:
            if pair.pair_id in self._seen or (self.ledger and self.ledger.has(self.scope, pair.pair_id)):
                return False
            try:
                # kafka-python blocks up to max_block_ms for metadata or buffer space, then raises
                # (KafkaTimeoutError while the broker is down): nothing was queued.
                fut = self.producer.send(self.topic, key=pair.pair_id.encode(), value=pair.SerializeToString())
            except Exception as exc:  # noqa: BLE001 - any failure to queue means not sent
                # The whole batch is abandoned: the caller redoes it, and the pairs queued before this
                # one must then be sent again, not answered as duplicates (arrivals are deduplicated
                # downstream by their content-derived ids).
                self._seen.difference_update(pid for pid, _ in self._pending)
                self._pending = []
                raise PublishError(f"Kafka did not take pair {pair.pair_id} ({type(exc).__name__}: {exc})") from exc
            self._seen.add(pair.pair_id)
            self._pending.append((pair.pair_id, fut))
            return True

    def confirm(self) -> list[str]:
        """Block until every pending pair is acknowledged (acks=all); raise PublishError otherwise
        (every pair of the batch is then forgotten, so the redo sends them all again: the pairs that
        did arrive are deduplicated downstream by their content-derived ids)."""
        with self._lock:
            pending, self._pending = self._pending, []
        if not pending:
            return []
        failed: list[str] = []
        try:
            self.producer.flush(timeout=self.ack_timeout_s)
        except Exception as exc:  # noqa: BLE001 - a flush that times out leaves every ack unknown: not durable
            failed = [f"{pid}: flush {type(exc).__name__}: {exc}" for pid, _ in pending]
        if not failed:
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
    counts: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    FIELDS = ("inputs", "pairs", "duplicates", "ties", "inconsistent", "unparseable", "rejects")

    def add(self, strategy: str, **counts: int) -> None:
        self.counts[strategy].update({k: v for k, v in counts.items() if v})

    def total(self) -> Counter[str]:
        out: Counter[str] = Counter()
        for c in self.counts.values():
            out.update(c)
        return out

    def as_dict(self) -> dict[str, dict[str, int]]:
        return {s: {f: c.get(f, 0) for f in self.FIELDS} for s, c in sorted(self.counts.items())} | {
            "total": {f: self.total().get(f, 0) for f in self.FIELDS}
        }

    def table(self) -> str:
        rows: list[tuple[str, ...]] = [("strategy", *self.FIELDS)]
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
    # Not labelled because a dependency is down (judge, reward model, refscore Generate): not
    # dead-lettered; the caller must not commit past this set and redoes it when the dependency is back.
    retry: bool = False


class Strategies:
    """Builds each strategy on first use (a reward model or judge client is only loaded if needed)."""

    def __init__(
        self, cfg: LabelerConfig, judge_cfg: JudgeConfig | None = None, overrides: Mapping[str, Strategy] | None = None
    ):
        self.cfg, self.judge_cfg = cfg, judge_cfg or JudgeConfig.from_env()
        self._built: dict[str, Strategy] = dict(overrides or {})
        self._lock = threading.Lock()

    def get(self, name: str) -> Strategy:
        """The strategy `name`; StrategyUnavailable saying why it cannot be built."""
        with self._lock:
            if name not in self._built:
                try:
                    self._built[name] = self._build(name)
                except Exception as exc:  # noqa: BLE001 - any failure to build means unavailable, with its reason
                    raise StrategyUnavailable(f"strategy {name!r} unavailable: {exc}") from exc
            return self._built[name]

    def _build(self, name: str) -> Strategy:
        cfg = self.cfg
        wrong = candidate_strategy_problem(name)
        if wrong:
            raise ConfigError(wrong)
        if name == StrategyName.RULES:
            from services.labeler.rules import RuleSet, RulesStrategy

            if not cfg.rules_file:
                raise ConfigError("the rules strategy needs a rules file: set OFFDPO_LABELER_RULES or --rules")
            return RulesStrategy(RuleSet.load(cfg.rules_file))
        if name == StrategyName.REWARD_MODEL:
            from services.labeler.reward import RewardModel, RewardModelStrategy

            if not cfg.reward_model:
                raise ConfigError("the reward_model strategy needs OFFDPO_LABELER_REWARD_MODEL (or --reward-model)")
            return RewardModelStrategy(
                RewardModel(cfg.reward_model, cfg.reward_batch_size, cfg.reward_max_length), cfg.pair_mode, cfg.margin
            )
        from services.labeler.judge import LLMJudgeStrategy, OpenAIJudgeClient, VerdictCache

        cache = VerdictCache(Path(cfg.state_dir) / "verdicts.sqlite") if self.judge_cfg.cache else None
        return LLMJudgeStrategy(OpenAIJudgeClient(self.judge_cfg), self.judge_cfg, cache, cfg.pair_mode, cfg.margin)


@dataclass(frozen=True)
class _Ready:
    """A candidate set that passed validation (and generation), waiting for its strategy."""

    item: Item[labeler_pb2.CandidateSet]
    report: SetReport
    cs: labeler_pb2.CandidateSet


class Labeler:
    """Labels batches of inputs and publishes the results. Thread-safe for one batch at a time."""

    def __init__(
        self,
        cfg: LabelerConfig,
        publisher: PairPublisher,
        deadletters: DeadLetterSink | None,
        strategies: Strategies,
        generator: Generator | None = None,
        progress: Callable[[str], None] | None = None,
    ):
        self.cfg = cfg
        self.publisher = publisher
        self.deadletters = deadletters
        self.strategies = strategies
        self.generator = generator
        self.summary = Summary()
        self.progress = progress
        self.outages = 0  # sets left unlabelled because a dependency was down (redone later)
        self._lock = threading.Lock()

    # -- dead letters -----------------------------------------------------------------------
    def reject(self, item: Item[Any], strategy: str, reason: str, error_type: str) -> None:
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

    def _fail(self, item: Item[Any], report: SetReport, exc: OffdpoError, where: str = "") -> None:
        """Dead-letter `item` with `exc`'s reason and its class's error_type; a retryable error (a
        dependency down) is not the item's fault: it is marked for a redo and never dead-lettered."""
        report.error = f"{where}{exc}"
        if exc.retryable:
            report.retry = True
            self.outages += 1
            # Counted as an input once, when it is finally labelled (or rejected) on the redo.
            self.summary.counts[report.strategy]["inputs"] -= 1
            log.warning("not labelled, will be redone (%s): %s", exc.error_type, report.error)
            return
        self.reject(item, report.strategy, report.error, exc.error_type)

    @staticmethod
    def _where(item: Item[Any]) -> str:
        """File inputs name their line in the reason; Kafka records carry their position in the dead letter."""
        return f"{item.source}:{item.offset}: " if item.offset >= 0 and item.partition < 0 else ""

    def _publish(self, strategy: str, pairs: Sequence[records_pb2.PreferencePair], report: SetReport) -> None:
        for pair in pairs:
            if self.cfg.reference and not pair.reference_fingerprint_id:
                # Routes the pair to that model in a refscore worker serving several (multi-reference).
                pair.reference_fingerprint_id = self.cfg.reference
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
    def label_candidates(
        self, items: Sequence[Item[labeler_pb2.CandidateSet]], default_strategy: str = ""
    ) -> list[SetReport]:
        """Label candidate-set items (malformed ones are dead-lettered) and publish the pairs.
        Sets a dependency outage left unlabelled come back with `retry` set (not dead-lettered): the
        caller must not commit past them. Call confirm() afterwards (the gRPC server and the runners do)."""
        with self._lock:
            default = default_strategy or self.cfg.strategy
            reports: list[SetReport] = []
            groups: dict[str, list[_Ready]] = defaultdict(list)
            for item in items:
                report = SetReport(strategy=item.value.strategy if item.value and item.value.strategy else default)
                reports.append(report)
                self.summary.add(report.strategy, inputs=1)
                try:
                    cs = self._prepare(item)
                except OffdpoError as exc:  # a reader's error already names the position
                    self._fail(item, report, exc, "" if exc is item.error else self._where(item))
                    continue
                groups[report.strategy].append(_Ready(item, report, cs))
            for strategy, ready in groups.items():
                self._label_group(strategy, ready)
            return reports

    def _prepare(self, item: Item[labeler_pb2.CandidateSet]) -> labeler_pb2.CandidateSet:
        """The set to label, validated and with its on-policy answers; raises the OffdpoError that rejects it."""
        if item.error is not None or item.value is None:
            raise item.error or InvalidCandidateSet("no candidate set")
        cs = item.value
        validate_candidate_set(cs, self.cfg.max_answers)
        n = cs.generate_n or self.cfg.generate_n
        if n <= 0:
            return cs
        if self.generator is None:
            raise GenerateNotConfigured(
                f"generate_n={n} but on-policy generation is not configured (start with --generate / a refscore address)"
            )
        try:
            new = self.generator.generate(cs.prompt, n)
        except GenerateRefused:
            raise  # refscore says this set's request is wrong: dead-lettered, not retried
        except Exception as exc:  # noqa: BLE001 - whatever the generator raised rejects this set, with its reason
            raise GenerateFailed(f"on-policy generation failed: {exc}") from exc
        seen = set(cs.answers)
        for text in new:
            if text.strip() and text not in seen:
                cs.answers.append(text)
                seen.add(text)
        if len(cs.answers) < 2:
            raise TooFewAnswers(f"fewer than 2 distinct non-empty answers after generating {n} samples")
        return cs

    def _label_group(self, strategy: str, ready: Sequence[_Ready]) -> None:
        """Label the sets of one strategy in one batch and publish their pairs."""
        try:
            impl = self.strategies.get(strategy)
        except StrategyUnavailable as exc:  # a configuration problem: every set says why
            for r in ready:
                self._fail(r.item, r.report, exc)
            return
        t0 = time.monotonic()
        try:
            results = impl.label_batch([r.cs for r in ready], ready[0].item.source)
        except OffdpoError as exc:
            if not exc.retryable:
                raise
            for r in ready:  # a dependency down for the whole batch: every set is redone later
                self._fail(r.item, r.report, exc, self._where(r.item))
            return
        for r, result in zip(ready, results):
            if isinstance(result, OffdpoError):
                self._fail(r.item, r.report, result, self._where(r.item))
                continue
            r.report.ties = result.ties
            self.summary.add(
                strategy, ties=result.ties, inconsistent=result.inconsistent, unparseable=result.unparseable
            )
            self._publish(strategy, result.pairs, r.report)
        log.debug("%s labelled %d sets in %.2f s", strategy, len(ready), time.monotonic() - t0)

    # -- ready-made pairs: human annotations and imported data --------------------------------
    def publish_pairs(
        self, items: Sequence[Item[records_pb2.PreferencePair] | Item[labeler_pb2.HumanJudgement]], strategy: str
    ) -> list[SetReport]:
        """Items whose value is a PreferencePair (imported), a HumanJudgement, or an error."""
        from services.labeler.human import judgement_to_pair

        out = []
        with self._lock:
            for item in items:
                report = SetReport(strategy=strategy)
                out.append(report)
                self.summary.add(strategy, inputs=1)
                if item.error is not None:
                    self._fail(item, report, item.error)
                    continue
                value = item.value
                if isinstance(value, labeler_pb2.HumanJudgement):
                    value = judgement_to_pair(value, item.source)
                    if value is None:
                        report.ties = 1
                        self.summary.add(strategy, ties=1)
                        continue
                if value is not None:
                    self._publish(strategy, [value], report)
        return out
