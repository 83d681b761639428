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
from kafka import ConsumerRebalanceListener

from offdpo.config import KafkaConfig
from offdpo.consume import DONE, Batch, BatchResult, ConsumeLoop, Hooks, LoopSettings, Outcome, Retry
from offdpo.errors import OffdpoError
from offdpo.kafka import DeadLetterSink, make_consumer, make_producer
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
    """Consume candidate sets from the candidates topic in a consumer group, on the consume loop
    (offdpo.consume): offsets are committed only after the batch's pairs and dead letters are
    acknowledged. Returns when `stop` is set or, with `idle_exit_s`, after that long without records.
    `heartbeat` is called every time round the loop.

    A dependency outage (judge, reward model, refscore Generate, Kafka not acknowledging) is not bad
    data: nothing is dead-lettered for it and the commit stops at the first set it left unlabelled in
    each partition; the loop rewinds there and retries with backoff (`outage_backoff`: its initial_s /
    max_delay_s) for as long as it takes. Sets of the batch already labelled are not labelled again on
    the redo. `report_outage(True)` is called on every failed try, `report_outage(False)` once a step
    goes through again (consume's readiness, offdpo.health.LoopHealth.outage / resumed).
    `consumer_factory` replaces the Kafka consumer (tests pass an in-memory one)."""
    cfg = labeler.cfg
    outages = 0

    def new_consumer(listener: ConsumerRebalanceListener) -> Any:
        if consumer_factory is not None:
            return consumer_factory()
        return make_consumer(
            kafka, cfg.group_id, [kafka.candidates_topic], listener=listener, max_poll_records=cfg.batch_size
        )

    def handle(batch: Batch) -> list[Outcome]:
        counted = {k: Counter(v) for k, v in labeler.summary.counts.items()}
        try:
            reports: list[SetReport] = labeler.label_candidates(
                [inputs.candidate_item(rec, cfg.max_input_bytes) for rec in batch.records], strategy
            )
            labeler.confirm()  # raises PublishError: nothing of this batch is marked done or committed
        except OffdpoError as exc:
            if exc.retryable:  # the whole try is redone (a dead letter or the pairs not acknowledged)
                labeler.summary.counts = defaultdict(Counter, counted)
            raise
        # Malformed sets were dead-lettered (and acknowledged) by the labeler itself: done here.
        unlabelled = [rep for rep in reports if rep.retry]
        if not unlabelled:
            return [DONE] * len(reports)
        outage = Retry(Outage(len(unlabelled), unlabelled[0].error))
        return [outage if rep.retry else DONE for rep in reports]

    def on_outage(down: bool, exc: BaseException | None) -> None:
        nonlocal outages
        if down:
            outages += 1
            log.warning(
                "labeler outage #%d (%s): not committing past it; backing off",
                outages,
                exc.error_type if isinstance(exc, OffdpoError) else type(exc).__name__,
            )
        report_outage(down)

    def on_batch(result: BatchResult) -> None:
        if progress:
            t = labeler.summary.total()
            progress(f"{kafka.candidates_topic}: {t['inputs']} inputs, {t['pairs']} pairs, {t['rejects']} rejects")

    backoff = {"initial_s": 0.2, "max_delay_s": 10.0, **(outage_backoff or {})}
    settings = LoopSettings(
        "labelling candidate sets (a dependency is down)",
        max_records=cfg.batch_size,
        idle_exit_s=idle_exit_s,
        initial_s=backoff["initial_s"],
        max_delay_s=backoff["max_delay_s"],
    )
    loop = ConsumeLoop(kafka, new_consumer, handle, settings, hooks=Hooks(heartbeat, on_outage, on_batch))
    loop.run(stop or threading.Event())
    return labeler.summary.as_dict()
