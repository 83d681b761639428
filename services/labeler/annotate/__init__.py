"""The annotation web app: people label pairs in a browser, each judgement an event on the pairs topic.

queue.py      items, claims with leases, judgements, undo, majority (SQLite)
service.py    fill the queue (topic or file, dead letters), publish decided items as pairs
auth.py       tokens from a Secret (sha256), sessions, CSRF
app.py        the pages (Starlette + Jinja), Prometheus metrics
agreement.py  Cohen's kappa, Krippendorff's alpha
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import uvicorn

from offdpo.config import KafkaConfig
from services.labeler.annotate.app import Guidelines, create_app
from services.labeler.annotate.auth import Tokens
from services.labeler.annotate.queue import Queue
from services.labeler.annotate.service import Annotation, consume, publish_loop
from services.labeler.config import AnnotateConfig
from services.labeler.pipeline import Labeler

__all__ = ["Annotation", "AnnotateServer", "Guidelines", "Queue", "Tokens", "create_app"]
log = logging.getLogger(__name__)


@dataclass
class AnnotateServer:
    """The app with its background threads (Kafka ingest unless `from_file`, the publisher) on uvicorn."""

    cfg: AnnotateConfig
    labeler: Labeler
    kafka: KafkaConfig
    from_file: str = ""
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.queue = Queue(
            Path(self.labeler.cfg.state_dir) / "annotate.sqlite", self.cfg.overlap, self.cfg.lease_s, self.cfg.undo_s
        )
        self.annotation = Annotation(self.queue, self.labeler)
        self.app = create_app(
            self.cfg,
            self.annotation,
            Tokens.load(self.cfg.tokens_file),
            Guidelines.load(self.cfg.guidelines_file, self.cfg.guidelines_version),
        )

    @contextlib.contextmanager
    def background(self) -> Iterator[None]:
        """Run the ingest and publish threads for the duration of the block; stop and join them after."""
        if self.from_file:
            added = self.annotation.ingest_file(self.from_file)
            log.info("queued %d items from %s", added, self.from_file)
        threads = [
            threading.Thread(
                target=publish_loop, args=(self.annotation, self.cfg.publish_interval_s, self._stop), daemon=True
            )
        ]
        if not self.from_file:
            threads.append(
                threading.Thread(
                    target=consume, args=(self.annotation, self.kafka, self.cfg.group_id, self._stop), daemon=True
                )
            )
        for t in threads:
            t.start()
        try:
            yield
        finally:
            self._stop.set()
            for t in threads:
                t.join(timeout=30)
            self.queue.close()

    def serve(self) -> None:
        """Serve until SIGTERM/SIGINT: uvicorn finishes the requests in hand, then the threads stop, the
        queue is closed and the caller flushes the producer; the process exits 0, like `consume`."""
        server = _Uvicorn(uvicorn.Config(self.app, host=self.cfg.host, port=self.cfg.port, log_level="warning"))
        with self.background():
            server.run()


class _Uvicorn(uvicorn.Server):
    """uvicorn re-raises the signal after its graceful shutdown, which would kill the process before the
    publisher thread stops and the producer is flushed; here the signal only stops serving."""

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        self._captured_signals.clear()
