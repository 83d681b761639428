"""Where training records come from, and the checks they pass first.

Two sources, one protocol (`Source`), chosen by `open_source`:
- replay (services.trainer.replay): every *.parquet under an S3 prefix, epochs in a seeded order;
- continuous (services.trainer.stream): ShardReady events from Kafka, offsets committed only after
  a checkpoint holding the source's state is durable (exactly once).
A shard is fetched and checked by services.trainer.shards into services.trainer.examples' Examples;
services.trainer.infra tells an outage (retried for as long as it takes) from bad data (dead-lettered).
"""

from __future__ import annotations

import threading
from typing import Any, Protocol

from offdpo import broker_profile
from offdpo import kafka as okafka
from offdpo.config import KafkaConfig
from offdpo.kafka import DeadLetterSink
from offdpo.records import ReferenceFingerprint
from services.trainer.config import TrainerConfig
from services.trainer.examples import EvalSet, Example
from services.trainer.infra import InfraStatus
from services.trainer.replay import ReplaySource
from services.trainer.shards import ObjectReader
from services.trainer.stream import StreamSource


# -- the sources ----------------------------------------------------------------------------------
class Source(Protocol):
    """Where the training loop's pairs come from (on rank 0 only)."""

    infra: InfraStatus
    evals: EvalSet

    def total_steps(self, batch: int, max_steps: int) -> int | None:
        """Optimizer steps the run will take, when known (it shapes the learning-rate schedule)."""
        ...

    def next_batch(self, size: int) -> list[Example] | None:
        """Up to `size` pairs; None when there are no more (or a stop was requested while waiting)."""
        ...

    def mark_trained(self, batch: list[Example]) -> None: ...

    def state(self) -> dict[str, Any]:
        """The data position, saved in each checkpoint."""
        ...

    def load_state(self, state: dict[str, Any]) -> None: ...

    def commit(self) -> None:
        """Let the upstream forget what the checkpoint just written covers."""
        ...

    def close(self) -> None: ...


def open_source(
    cfg: TrainerConfig,
    store: ObjectReader,
    kafka: KafkaConfig,
    expected_fp: ReferenceFingerprint,
    stop: threading.Event,
    vocab_size: int | None = None,
    infra: InfraStatus | None = None,
) -> Source:
    """The source `cfg.mode` asks for. Replay reads and checks every shard now (raising BadInput)."""
    allowed = set(cfg.allow_fingerprint)
    evals = EvalSet(cfg.eval_fraction, cfg.eval_max_pairs)
    if cfg.mode == "replay":
        return ReplaySource(
            store,
            cfg.prefix,
            cfg.epochs,
            cfg.seed,
            expected_fp,
            allowed,
            cfg.max_length,
            cfg.truncation,
            vocab_size=vocab_size,
            shuffle_pairs=cfg.shuffle_pairs,
            max_shard_bytes=cfg.max_shard_bytes,
            evals=evals,
            stop=stop,
            infra=infra,
        )
    group = cfg.consumer_group or f"offdpo-trainer-{cfg.run_name}"

    # Looked up on the module when called, so a test can put a wrapped client in its place. A small
    # max_poll_records: each event may stand for a shard of thousands of pairs.
    def new_consumer() -> Any:
        return okafka.make_consumer(kafka, group, [kafka.shards_topic], max_poll_records=cfg.max_poll_records)

    consumer = new_consumer()
    sink = DeadLetterSink(okafka.make_producer(kafka, f"trainer-{cfg.run_name}"), kafka, "trainer")
    return StreamSource(
        store,
        consumer,
        sink,
        expected_fp,
        allowed,
        cfg.max_length,
        cfg.truncation,
        cfg.poll_timeout_ms,
        cfg.stop_when_idle_s,
        kafka.shards_topic,
        stop=stop,
        vocab_size=vocab_size,
        max_poll_records=cfg.max_poll_records,
        max_shard_bytes=cfg.max_shard_bytes,
        dedup_window=cfg.dedup_window,
        evals=evals,
        infra=infra,
        new_consumer=new_consumer,
        other_references=[fp.strip() for fp in cfg.other_references.split(",") if fp.strip()],
        offset_holes=broker_profile.poller(kafka),
        assignment_watch=broker_profile.assignment_watch(kafka, [kafka.shards_topic]),
    )
