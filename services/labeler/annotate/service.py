"""What the annotation app does besides serving pages: it fills the queue (candidates topic or a file;
malformed sets dead-lettered as the other strategies do) and publishes decided items as pairs through
the labeler's own publisher (acks=all, pair_id-keyed, ledger), then marks them decided.

Order of durability: a Kafka offset is committed only after its item is in SQLite (or its dead letter
acknowledged); an item is marked decided only after Kafka acknowledged its pair. A crash in between
redoes the step, and the content-hashed pair_id makes the repeat harmless (ledger, idempotent consumers).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from kafka import ConsumerRebalanceListener

from offdpo import records
from offdpo.config import KafkaConfig
from offdpo.consume import DONE, Batch, ConsumeLoop, Hooks, LoopSettings, Outcome
from offdpo.errors import OffdpoError
from offdpo.kafka import make_consumer, now_timestamp
from offdpo.v1 import labeler_pb2, records_pb2
from services.labeler import inputs
from services.labeler.annotate.agreement import cohen_kappa, krippendorff_alpha_nominal
from services.labeler.annotate.queue import NO_MAJORITY, A, B, Item, Judgement, Queue, majority
from services.labeler.errors import InvalidCandidateSet
from services.labeler.names import StrategyName
from services.labeler.pipeline import Labeler

log = logging.getLogger(__name__)
HUMAN = StrategyName.HUMAN.value


def _shown(j: Judgement, chosen_is_a: bool | None) -> str:
    """Which answer the annotator saw on the left, in the pair's terms."""
    if chosen_is_a is None:
        return "a_left" if j.a_left else "b_left"
    return "chosen_left" if j.a_left == chosen_is_a else "rejected_left"


def _verdict_name(verdict: str, chosen_is_a: bool | None) -> str:
    if verdict in (A, B) and chosen_is_a is not None:
        return "chosen" if (verdict == A) == chosen_is_a else "rejected"
    return verdict


def pair_for(item: Item, judgements: list[Judgement], outcome: str) -> records_pb2.PreferencePair | None:
    """The pair a decided item gives (None for a tie, both bad or no majority), every judgement in its
    provenance: annotator, what they chose, which answer they saw first, guideline version, time, rationale."""
    if outcome not in (A, B):
        return None
    chosen_is_a = outcome == A
    chosen, rejected = (item.answer_a, item.answer_b) if chosen_is_a else (item.answer_b, item.answer_a)
    prov = records_pb2.Provenance(
        strategy=StrategyName.HUMAN.label_strategy,
        source=item.source,
        annotator=",".join(j.annotator for j in judgements),
        labeled_at=now_timestamp(),
    )
    for k, v in item.metadata.items():
        prov.metadata[k] = v
    if item.set_id:
        prov.metadata.setdefault("set_id", item.set_id)
    for j in judgements:
        # As in the GSB judge: which answer came first, and the verdict on the pair as it was shown.
        chosen_first = j.a_left == chosen_is_a
        shown_verdict = {A: "Good" if j.a_left else "Bad", B: "Bad" if j.a_left else "Good"}.get(j.verdict, j.verdict)
        prov.verdicts.add(order="chosen_first" if chosen_first else "rejected_first", verdict=shown_verdict)
    prov.metadata["item_id"] = item.item_id
    prov.metadata["displayed_order"] = ",".join(f"{j.annotator}:{_shown(j, chosen_is_a)}" for j in judgements)
    prov.metadata["guideline_version"] = ",".join(sorted({j.guideline_version for j in judgements}))
    prov.metadata["judgements"] = json.dumps(
        [
            dict(
                annotator=j.annotator,
                verdict=_verdict_name(j.verdict, chosen_is_a),
                displayed_order=_shown(j, chosen_is_a),
                guideline_version=j.guideline_version,
                time_spent_s=j.time_spent_s,
                rationale=j.rationale,
                judged_at=j.judged_at,
            )
            for j in judgements
        ],
        ensure_ascii=False,
        sort_keys=True,
    )
    return records.make_pair(item.prompt, chosen, rejected, prov)


class LoopHealth:
    """Whether the background loops (ingest from Kafka, publish decided items) are working. A loop that
    fails keeps retrying (it never dies: a dead thread behind an "ok" health check queued nothing while
    people waited); one failing for longer than `outage_s` turns /healthz to 503 with the reason."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self._failing: dict[str, tuple[float, str]] = {}  # loop -> (failing since, last error)
        self._lock = threading.Lock()

    def ok(self, loop: str) -> None:
        with self._lock:
            self._failing.pop(loop, None)

    def failed(self, loop: str, exc: BaseException) -> None:
        with self._lock:
            since = self._failing.get(loop, (self.clock(), ""))[0]
            self._failing[loop] = (since, f"{type(exc).__name__}: {exc}")

    def problem(self, outage_s: float) -> str | None:
        """Why the page is not healthy, or None."""
        now = self.clock()
        with self._lock:
            long = [
                f"{loop} failing for {now - since:.0f} s ({error})"
                for loop, (since, error) in sorted(self._failing.items())
                if now - since >= outage_s
            ]
        return "; ".join(long) or None


RETRY_MIN_S, RETRY_MAX_S = 1.0, 30.0  # a failing background loop's waits, doubling


class Annotation:
    """The queue plus the labeler's publisher and dead-letter sink."""

    def __init__(self, queue: Queue, labeler: Labeler):
        self.queue, self.labeler = queue, labeler
        self.published = 0
        self._publish_lock = threading.Lock()
        self.health = LoopHealth()

    # -- filling the queue --------------------------------------------------------------------
    def ingest(self, items: Iterable[inputs.Item[labeler_pb2.CandidateSet]]) -> int:
        """Queue the valid sets, dead-letter the rest (acknowledged before this returns). New items count."""
        added = 0
        for item in items:
            try:
                if item.error is not None or item.value is None:
                    raise item.error or InvalidCandidateSet("no candidate set")
                cs = item.value
                inputs.validate_candidate_set(cs, self.labeler.cfg.max_answers, generating=True)
                if len(cs.answers) < 2:  # no generation here: a person compares what the set holds
                    raise InvalidCandidateSet(f"needs at least 2 answers to compare, got {len(cs.answers)}")
                inputs.readable_kind(cs.prompt, "annotation")
            except OffdpoError as exc:
                self.labeler.reject(item, HUMAN, str(exc), exc.error_type)
                continue
            added += self.queue.add(cs, item.source)
        # Nothing to confirm: DeadLetterSink.send returns once the broker acknowledged the letter. Not
        # labeler.confirm(): that would take the publisher thread's pending pairs and let it mark an
        # item decided before its pair is acknowledged.
        return added

    def ingest_file(self, path: str) -> int:
        return self.ingest(inputs.read_candidates_file(path, self.labeler.cfg.max_input_bytes))

    # -- publishing ---------------------------------------------------------------------------
    def publish_due(self, now: float | None = None) -> int:
        """Decide and publish every item whose judgements are final. Returns the pairs published."""
        with self._publish_lock:
            sent = 0
            for item_id in self.queue.due(now):
                item = self.queue.item(item_id)
                if item is None:
                    continue
                judgements = self.queue.judgements(item_id)
                outcome = majority([j.verdict for j in judgements])
                pair = pair_for(item, judgements, outcome)
                if pair is not None:
                    self.labeler.publisher.publish(pair)
                    self.labeler.publisher.confirm()  # PublishError: not marked, retried next round
                    sent += 1
                self.queue.decided(item_id, outcome, pair.pair_id if pair else "")
            self.published += sent
            return sent


def consume(annotation: Annotation, kafka: KafkaConfig, group_id: str, stop: threading.Event) -> None:
    """Fill the queue from the candidates topic until `stop`, on the consume loop (offdpo.consume):
    commit only what is queued or dead-lettered. Any failure (Kafka, the queue's database, an
    unacknowledged letter) is retried with a new consumer from the committed offsets (the queue ignores
    the items it already holds), and shows on /healthz while it lasts; the loop never dies."""
    cfg = annotation.labeler.cfg

    def new_consumer(listener: ConsumerRebalanceListener) -> Any:
        return make_consumer(
            kafka, group_id, [kafka.candidates_topic], listener=listener, max_poll_records=cfg.batch_size
        )

    def handle(batch: Batch) -> list[Outcome]:
        # Malformed sets are dead-lettered (acknowledged) by ingest itself before it returns.
        annotation.ingest(inputs.candidate_item(r, cfg.max_input_bytes) for r in batch.records)
        return [DONE] * len(batch.records)

    def on_outage(down: bool, exc: BaseException | None) -> None:
        if down and exc is not None:
            annotation.health.failed("ingest", exc)
            log.warning("candidates not queued, retrying: %s: %s", type(exc).__name__, exc)
        elif not down:
            annotation.health.ok("ingest")

    settings = LoopSettings(
        "queueing candidate sets",
        max_records=cfg.batch_size,
        initial_s=RETRY_MIN_S,
        max_delay_s=RETRY_MAX_S,
        retry_if=lambda exc: isinstance(exc, Exception),
        new_consumer_on_error=True,
    )
    ConsumeLoop(kafka, new_consumer, handle, settings, hooks=Hooks(outage=on_outage)).run(stop)


def publish_loop(annotation: Annotation, interval_s: float, stop: threading.Event) -> None:
    while not stop.wait(interval_s):
        try:
            annotation.publish_due()
            annotation.health.ok("publish")
        except Exception as exc:  # noqa: BLE001 - Kafka down, the queue's database: the items stay due
            annotation.health.failed("publish", exc)
            log.warning("publishing decided items failed, retrying: %s: %s", type(exc).__name__, exc)


# -- statistics -------------------------------------------------------------------------------
@dataclass(frozen=True)
class BatchStats:
    name: str
    items: int  # items with at least two judgements
    kappa: float | None  # Cohen's kappa between each item's first and second judgement
    alpha: float | None  # Krippendorff's alpha (nominal) over all judgements
    judge_kappa: float | None  # the LLM judge against the human majority
    judge_items: int


def _stats(
    name: str, rows: list[tuple[str, int, list[str]]], judge: dict[str, str], human: dict[str, str]
) -> BatchStats:
    multi = [verdicts for _, _, verdicts in rows if len(verdicts) >= 2]
    pairs = [(v[0], v[1]) for v in multi]
    both = [(human[iid], judge[iid]) for iid, _, _ in rows if iid in judge and human.get(iid) in (A, B, "tie")]
    return BatchStats(
        name, len(multi), cohen_kappa(pairs), krippendorff_alpha_nominal(multi), cohen_kappa(both), len(both)
    )


def agreement(queue: Queue, batch_size: int) -> tuple[BatchStats, list[BatchStats]]:
    """Overall and per-batch agreement; a batch is `batch_size` consecutive items in queue order."""
    rows = queue.ratings()
    judge = queue.judge_verdicts()
    human = {it.item_id: outcome for it, outcome in queue.decided_items() if outcome != NO_MAJORITY}
    batches: dict[int, list[tuple[str, int, list[str]]]] = {}
    for row in rows:
        batches.setdefault((row[1] - 1) // batch_size, []).append(row)
    per = [
        _stats(f"items {b * batch_size + 1}-{(b + 1) * batch_size}", rs, judge, human)
        for b, rs in sorted(batches.items())
    ]
    return _stats("overall", rows, judge, human), per
