"""Batch runs over files and the Kafka consumer loop."""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import grpc
from kafka import TopicPartition
from kafka.structs import OffsetAndMetadata

from offdpo import broker_profile, retry
from offdpo.config import KafkaConfig
from offdpo.errors import OffdpoError
from offdpo.kafka import (
    GROUP_CHANGED,
    CommitRefusals,
    DeadLetterSink,
    make_consumer,
    make_producer,
    rewind,
)
from offdpo.v1 import records_pb2
from services.labeler import inputs
from services.labeler.base import Strategy
from services.labeler.config import JudgeConfig, LabelerConfig
from services.labeler.errors import GenerateRefused
from services.labeler.names import InputKind, StrategyName
from services.labeler.pipeline import (
    SERVICE,
    Generator,
    Labeler,
    Ledger,
    Outage,
    PairPublisher,
    Producer,
    SetReport,
    Strategies,
)

log = logging.getLogger(__name__)


class RefScoreGenerator:
    """On-policy candidates from refscore's Generate RPC (TLS and a team token when configured)."""

    def __init__(self, cfg: LabelerConfig):
        from offdpo.refscore_client import RefscoreClient, channel_credentials
        from offdpo.v1 import refscore_pb2

        self._pb = refscore_pb2
        credentials = (
            channel_credentials(cfg.refscore_ca, cfg.refscore_cert or None, cfg.refscore_key or None)
            if cfg.refscore_ca
            else None
        )
        self.client = RefscoreClient(cfg.refscore_address, credentials=credentials, token=cfg.refscore_token or None)
        self.max_tokens, self.temperature = cfg.generate_max_tokens, cfg.generate_temperature
        self.timeout_s = cfg.generate_timeout_s

    def generate(self, prompt: records_pb2.Prompt, n: int) -> list[str]:
        req = self._pb.GenerateRequest(n=n, max_tokens=self.max_tokens, temperature=self.temperature)
        req.prompt.CopyFrom(prompt)
        try:
            resp = self.client.stub.Generate(req, timeout=self.timeout_s)
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            if code is grpc.StatusCode.INVALID_ARGUMENT or code is grpc.StatusCode.OUT_OF_RANGE:
                raise GenerateRefused(
                    f"refscore refused to generate for this set ({code.name}): {exc.details()}"
                ) from None
            raise  # UNAVAILABLE, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED, ...: an outage, retried
        return [a.text for a in resp.answers]

    def close(self) -> None:
        self.client.close()


def build_labeler(
    cfg: LabelerConfig,
    kafka: KafkaConfig,
    judge: JudgeConfig | None = None,
    strategy_overrides: Mapping[str, Strategy] | None = None,
    generator: Generator | None = None,
    progress: Callable[[str], None] | None = None,
    producer: Producer | None = None,
) -> Labeler:
    """A labeler publishing to `kafka` (through `producer` when given: tests pass an in-memory one)."""
    if producer is None:
        producer = make_producer(kafka, SERVICE)
    ledger = Ledger(Path(cfg.state_dir) / "published.sqlite") if cfg.ledger else None
    if generator is None and cfg.generate_n > 0:
        generator = RefScoreGenerator(cfg)
    return Labeler(
        cfg,
        PairPublisher(producer, kafka, ledger, cfg.ack_timeout_s),
        DeadLetterSink(producer, kafka, SERVICE, cfg.ack_timeout_s),
        Strategies(cfg, judge, strategy_overrides),
        generator=generator,
        progress=progress,
    )


def close_labeler(labeler: Labeler) -> None:
    labeler.publisher.producer.close(timeout=labeler.cfg.ack_timeout_s)
    if labeler.publisher.ledger:
        labeler.publisher.ledger.close()


T = TypeVar("T")


def _batches(it: Iterable[T], size: int) -> Iterator[list[T]]:
    it = iter(it)
    while batch := list(itertools.islice(it, size)):
        yield batch


def run_file(
    labeler: Labeler,
    path: str | Path,
    kind: str = InputKind.CANDIDATES,
    strategy: str = "",
    progress: Callable[[str], None] | None = None,
) -> dict[str, dict[str, int]]:
    """Label one file; returns the summary dict. kind: candidates | annotations | preferences."""
    limit = labeler.cfg.max_input_bytes
    match InputKind(kind):
        case InputKind.CANDIDATES:
            candidates = inputs.read_candidates_file(path, limit)
            _run_batches(labeler, path, candidates, lambda b: labeler.label_candidates(b, strategy), progress)
        case InputKind.ANNOTATIONS:
            human = StrategyName.HUMAN.value
            annotations = inputs.read_annotations(path, limit)
            _run_batches(labeler, path, annotations, lambda b: labeler.publish_pairs(b, human), progress)
        case InputKind.PREFERENCES:
            imported = StrategyName.IMPORTED.value
            preferences = inputs.read_preferences(path, limit)
            _run_batches(labeler, path, preferences, lambda b: labeler.publish_pairs(b, imported), progress)
    return labeler.summary.as_dict()


def _run_batches(
    labeler: Labeler,
    path: str | Path,
    items: Iterable[T],
    handle: Callable[[list[T]], object],
    progress: Callable[[str], None] | None,
) -> None:
    """`handle` each batch of items, then wait for Kafka's acknowledgements before reading on."""
    done = 0
    t0 = time.monotonic()
    for batch in _batches(items, labeler.cfg.batch_size):
        reports = handle(batch)
        labeler.confirm()
        unlabelled = [r for r in reports if r.retry] if isinstance(reports, list) else []
        if unlabelled:
            # A dependency is down: stop here (nothing of this was dead-lettered); the pairs published
            # so far are acknowledged, and a rerun of the file skips them (ledger / pair ids).
            log.error(
                "%s: stopping after %d inputs: %d candidate set(s) of this batch not labelled because a "
                "dependency is down (%s); rerun when it is back",
                path,
                done + len(batch),
                len(unlabelled),
                unlabelled[0].error,
            )
            raise Outage(len(unlabelled), unlabelled[0].error)
        done += len(batch)
        if progress:
            t = labeler.summary.total()
            progress(
                f"{path}: {done} inputs, {t['pairs']} pairs, {t['duplicates']} duplicates, "
                f"{t['rejects']} rejects ({time.monotonic() - t0:.1f} s)"
            )


def run_kafka(
    labeler: Labeler,
    kafka: KafkaConfig,
    strategy: str = "",
    stop: threading.Event | None = None,
    idle_exit_s: float | None = None,
    progress: Callable[[str], None] | None = None,
    heartbeat: Callable[[], None] = lambda: None,
    consumer_factory: Callable[[], Any] | None = None,
    outage_backoff: Mapping[str, float] | None = None,
    report_outage: Callable[[bool], None] = lambda down: None,
) -> dict[str, dict[str, int]]:
    """Consume candidate sets from the candidates topic in a consumer group. Offsets are committed only
    after the batch's pairs and dead letters are acknowledged. Returns when `stop` is set or, with
    `idle_exit_s`, after that long without records. `heartbeat` is called every time round the loop.

    A dependency outage (judge, reward model, refscore Generate, Kafka not acknowledging) is not bad
    data: nothing is dead-lettered for it and the commit stops at the first set it left unlabelled in
    each partition; the consumer rewinds there and retries with backoff (offdpo.retry, a log line per
    step; `outage_backoff`: its initial_s / max_delay_s) for as long as it takes, then goes on by itself.
    Sets of the batch already labelled are not labelled again on the redo. `report_outage(True)` is
    called on every failed try, `report_outage(False)` once a batch goes through again (consume's
    readiness, offdpo.health.LoopHealth.outage / resumed).
    `consumer_factory` replaces the Kafka consumer (tests pass an in-memory one)."""
    cfg = labeler.cfg

    def new_consumer() -> Any:
        if consumer_factory is not None:
            return consumer_factory()
        return make_consumer(kafka, cfg.group_id, [kafka.candidates_topic], max_poll_records=cfg.batch_size)

    consumer = new_consumer()
    offset_holes = broker_profile.poller(kafka)  # candidates from several producers
    stop = stop or threading.Event()
    last_record = time.monotonic()
    # Set while an outage left sets unlabelled (the consumer was rewound to them): an empty poll then is
    # the broker or the dependency still down, not an idle topic, so `idle_exit_s` does not end the run.
    redo = False
    refusals = CommitRefusals()
    # Offsets at or past a partition's commit point that were labelled (or dead-lettered) in an earlier
    # try of a batch an outage left unfinished: the redo skips them.
    handled: dict[TopicPartition, set[int]] = defaultdict(set)
    outages = 0

    def step() -> bool:
        """Poll and label one batch; False when idle long enough to exit. Raises a retryable
        OffdpoError (Outage, PublishError, ...) after rewinding to the first unlabelled set."""
        nonlocal consumer, last_record, redo
        heartbeat()
        polled = offset_holes.poll(consumer, timeout_ms=500)
        recs = sorted((r for batch in polled.values() for r in batch), key=lambda r: (r.topic, r.partition, r.offset))
        if not recs:
            return redo or not (idle_exit_s is not None and time.monotonic() - last_record > idle_exit_s)
        last_record = time.monotonic()
        todo = [r for r in recs if r.offset not in handled[TopicPartition(r.topic, r.partition)]]
        counted = {k: Counter(v) for k, v in labeler.summary.counts.items()}
        try:
            reports: list[SetReport] = labeler.label_candidates(
                [inputs.candidate_item(rec, cfg.max_input_bytes) for rec in todo], strategy
            )
            labeler.confirm()  # raises PublishError: nothing of this batch is marked done or committed
        except OffdpoError as exc:
            if exc.retryable:
                rewind(consumer, [r for r in recs if r.offset not in handled[TopicPartition(r.topic, r.partition)]])
                redo = True
                # The whole try is redone (a dead letter or the pairs not acknowledged): counted then.
                labeler.summary.counts = defaultdict(Counter, counted)
            raise
        for rec, rep in zip(todo, reports):
            if not rep.retry:
                handled[TopicPartition(rec.topic, rec.partition)].add(rec.offset)
        # Per partition, commit up to the first set not labelled (all of them when none is left).
        commit_at: dict[TopicPartition, int] = {}
        unfinished = []
        for (topic, partition), group in itertools.groupby(recs, key=lambda r: (r.topic, r.partition)):
            tp = TopicPartition(topic, partition)
            part = list(group)
            first = next((r for r in part if r.offset not in handled[tp]), None)
            commit_at[tp] = first.offset if first is not None else part[-1].offset + 1
            if first is not None:
                unfinished.append(first)
        try:
            consumer.commit({tp: OffsetAndMetadata(off, "", -1) for tp, off in commit_at.items()})
            refusals.committed()
            for tp, off in commit_at.items():
                handled[tp] = {o for o in handled[tp] if o >= off}
        except GROUP_CHANGED as exc:
            # The pairs are published; the redo skips what was handled (and the ledger or pair_id
            # downstream drops any repeats).
            if refusals.refused(consumer, recs, exc):
                consumer.close(autocommit=False)
                consumer = new_consumer()
                handled.clear()
            unfinished = []
        if progress:
            t = labeler.summary.total()
            progress(f"{kafka.candidates_topic}: {t['inputs']} inputs, {t['pairs']} pairs, {t['rejects']} rejects")
        redo = bool(unfinished)
        if unfinished:
            rewind(consumer, unfinished)
            unlabelled = [rep for rep in reports if rep.retry]
            raise Outage(len(unlabelled), unlabelled[0].error if unlabelled else "")
        return True

    def on_outage(exc: BaseException) -> bool:
        nonlocal outages
        if isinstance(exc, OffdpoError) and exc.retryable:
            outages += 1
            report_outage(True)
            log.warning("labeler outage #%d (%s): not committing past it; backing off", outages, exc.error_type)
            return True
        return False

    backoff = dict(outage_backoff or {})
    try:
        while not stop.is_set():
            try:
                more = retry.call(
                    "labelling candidate sets (a dependency is down)",
                    step,
                    retry_if=on_outage,
                    stop=stop,
                    logger=log,
                    **backoff,
                )
            except OffdpoError as exc:
                if exc.retryable and stop.is_set():
                    log.warning("stopping during an outage; the unlabelled sets are redone on restart: %s", exc)
                    break
                raise
            report_outage(False)
            if not more:
                break
    finally:
        consumer.close(autocommit=False)
    return labeler.summary.as_dict()
