"""The scoring core, shared by the gRPC API and the stream worker (no gRPC or Kafka in here).

One engine thread owns the engine. Callers enqueue jobs; the thread gathers whatever is queued,
up to `engine_batch_tokens`, into one engine call, so concurrent gRPC callers and the stream
worker are batched together. Jobs whose deadline passed while queued are dropped, not computed.

The queue is fair between callers: each caller (a team, "anonymous", or the stream worker, which
is one caller of its own) has its own FIFO, and the engine thread takes from them round-robin. A
caller that floods the queue only lengthens its own wait; every other caller's next job is at
most one job per busy caller away from the engine.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import json
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from offdpo.fingerprint import model_fingerprint
from services.refscore import metrics
from services.refscore.config import RefscoreConfig
from services.refscore.engines import Engine, Generated, load_engine
from services.refscore.tokenization import BoundaryTokenizer, TokenizationError

log = logging.getLogger(__name__)


class RefscoreError(Exception):
    """Domain error; the server's interceptor maps each subclass to one gRPC status code."""


class InvalidArgument(RefscoreError):
    pass


class TooLarge(RefscoreError):
    pass


class NotReady(RefscoreError):
    pass


class FingerprintMismatch(RefscoreError):
    pass


class DeadlineExceeded(RefscoreError):
    pass


STREAM_WORKER = "stream-worker"  # the caller name of jobs submitted without one (the Kafka stream worker)


class FairQueue:
    """A blocking queue with one FIFO per caller, served round-robin. `None` (stop) jumps the line."""

    def __init__(self):
        self._cond = threading.Condition()
        self._fifos: collections.OrderedDict[str, collections.deque] = collections.OrderedDict()
        self._stop = False

    def put(self, job: _Job | None) -> None:
        with self._cond:
            if job is None:
                self._stop = True
            else:
                self._fifos.setdefault(job.caller, collections.deque()).append(job)
                metrics.CALLER_QUEUED.labels(job.caller).set(len(self._fifos[job.caller]))
            self._cond.notify()

    def _take(self) -> _Job | None:
        if self._stop:
            self._stop = False  # consumed; put(None) again to stop again
            return None
        caller, fifo = next(iter(self._fifos.items()))
        job = fifo.popleft()
        del self._fifos[caller]
        if fifo:
            self._fifos[caller] = fifo  # to the back of the round
        metrics.CALLER_QUEUED.labels(caller).set(len(fifo))
        return job

    def get(self) -> _Job | None:
        with self._cond:
            while not self._fifos and not self._stop:
                self._cond.wait()
            return self._take()

    def get_nowait(self) -> _Job | None:
        with self._cond:
            if not self._fifos and not self._stop:
                raise queue.Empty
            return self._take()

    def qsize(self) -> int:
        with self._cond:
            return sum(len(f) for f in self._fifos.values())


@dataclass
class _Job:
    kind: str  # "score" | "generate"
    payload: object
    tokens: int
    deadline: float | None  # time.monotonic() deadline
    caller: str = STREAM_WORKER
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


@dataclass
class Prepared:
    """An item ready for the engine."""

    prompt_ids: list[int]
    answer_ids: list[int]


class Scorer:
    def __init__(self, cfg: RefscoreConfig):
        self.cfg = cfg
        self.ready = threading.Event()
        self.load_error: BaseException | None = None
        self.engine: Engine | None = None
        self.boundary: BoundaryTokenizer | None = None
        self.fingerprint = None
        self.engine_settings: dict[str, str] = {}
        self.max_model_len = cfg.max_model_len
        self._queue = FairQueue()
        self._thread: threading.Thread | None = None
        self._stopping = False

    # -- lifecycle ---------------------------------------------------------------------------
    def load(self) -> None:
        """Load tokenizer and engine (blocking: tens of seconds). Safe to call from a thread."""
        try:
            from transformers import AutoTokenizer

            model_dir = Path(self.cfg.model_dir)
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
            self.boundary = BoundaryTokenizer(tokenizer, _stop_token_ids(model_dir))
            self.engine = load_engine(
                self.cfg.engine,
                str(model_dir),
                self.cfg.dtype,
                self.cfg.max_model_len,
                self.cfg.gpu_memory_utilization,
                self.cfg.engine_settings(),
            )
            self.max_model_len = self.engine.max_model_len
            # Read once, before the engine thread owns the engine (engines are single-threaded).
            self.engine_settings = self.engine.effective_settings()
            log.info("engine settings: %s", self.engine_settings)
            self.fingerprint = model_fingerprint(
                model_dir,
                dtype=self.cfg.dtype,
                engine=self.engine.name,
                engine_version=self.engine.version,
                model_id=self.cfg.model_id or None,
                chat_template=self.boundary.chat_template,
            )
            self._thread = threading.Thread(target=self._engine_loop, name="refscore-engine", daemon=True)
            self._thread.start()
            log.info("engine %s %s ready: %s", self.engine.name, self.engine.version, self.fingerprint)
            self.ready.set()
        except BaseException as exc:
            self.load_error = exc
            log.exception("engine failed to load")
            raise

    def shutdown(self) -> None:
        self._stopping = True
        self._queue.put(None)
        if self._thread:
            self._thread.join(timeout=60)
        if self.engine:
            self.engine.shutdown()

    def check_ready(self) -> None:
        if self.load_error is not None:
            raise NotReady(f"the engine failed to load: {self.load_error}")
        if not self.ready.is_set() or self._stopping:
            raise NotReady("the engine is not ready (loading or shutting down); retry later")

    # -- preparation (validation + tokenisation) ------------------------------------------------
    def prepare_items(self, items) -> list[Prepared]:
        """Tokenise ScoreItems; InvalidArgument / TooLarge name the offending item."""
        self.check_ready()
        if len(items) == 0:
            raise InvalidArgument("the request has no items: send at least one (prompt, answer) item")
        if len(items) > self.cfg.max_items_per_request:
            raise TooLarge(
                f"the request has {len(items)} items; the limit is {self.cfg.max_items_per_request} "
                f"per request (split it, or use ScoreStream)"
            )
        prepared, total = [], 0
        for i, item in enumerate(items):
            prepared.append(self.prepare_one(item.prompt, item.WhichOneof("answer"), item, where=f"items[{i}]"))
            total += len(prepared[-1].prompt_ids) + len(prepared[-1].answer_ids)
            if total > self.cfg.max_tokens_per_request:
                raise TooLarge(
                    f"the request has more than {self.cfg.max_tokens_per_request} tokens "
                    f"(reached at items[{i}]); split it, or use ScoreStream"
                )
        return prepared

    def prepare_one(self, prompt, answer_kind: str | None, item, where: str) -> Prepared:
        assert self.boundary is not None
        try:
            enc = self.boundary.encode_prompt(prompt)
            if answer_kind == "answer_text":
                answer = self.boundary.encode_answer_text(item.answer_text, enc.is_chat)
            elif answer_kind == "answer_token_ids":
                answer = self.boundary.encode_answer_ids(item.answer_token_ids.ids)
            else:
                raise TokenizationError("the answer is missing: set answer_text or answer_token_ids")
        except TokenizationError as exc:
            raise InvalidArgument(f"{where}: {exc}") from None
        return self.check_length(Prepared(enc.ids, answer), where)

    def check_length(self, p: Prepared, where: str) -> Prepared:
        total = len(p.prompt_ids) + len(p.answer_ids)
        # vLLM scores a prompt by generating one token after it, so one position must stay free.
        if total > self.max_model_len - 1:
            raise InvalidArgument(
                f"{where}: prompt ({len(p.prompt_ids)} tokens) + answer ({len(p.answer_ids)} tokens)"
                f" = {total} tokens exceeds the model's context of {self.max_model_len - 1} tokens"
            )
        return p

    # -- execution -----------------------------------------------------------------------------
    def submit_score(
        self, prepared: list[Prepared], deadline: float | None = None, caller: str | None = None
    ) -> concurrent.futures.Future:
        """Queue a scoring job; `caller` (default: the stream worker) picks its fair-queue FIFO."""
        self.check_ready()
        tokens = sum(len(p.prompt_ids) + len(p.answer_ids) for p in prepared)
        job = _Job("score", [(p.prompt_ids, p.answer_ids) for p in prepared], tokens, deadline, caller or STREAM_WORKER)
        metrics.CALLER_TOKENS.labels(job.caller).inc(tokens)
        self._queue.put(job)
        return job.future

    def submit_generate(
        self, prompt_ids: list[int], deadline: float | None = None, caller: str | None = None, **params
    ) -> concurrent.futures.Future:
        self.check_ready()
        job = _Job("generate", (prompt_ids, params), len(prompt_ids), deadline, caller or STREAM_WORKER)
        metrics.CALLER_TOKENS.labels(job.caller).inc(len(prompt_ids))
        self._queue.put(job)
        return job.future

    def score(self, prepared: list[Prepared], timeout: float | None = None) -> list[list[float]]:
        """Blocking scoring (the stream worker's path)."""
        return self.submit_score(prepared).result(timeout=timeout)

    def _engine_loop(self) -> None:
        assert self.engine is not None
        pending: _Job | None = None
        while True:
            job = pending or self._queue.get()
            pending = None
            if job is None:
                return
            if job.kind == "generate":
                self._run(job, functools.partial(self._generate, job))
                continue
            batch, tokens = [job], job.tokens
            while tokens < self.cfg.engine_batch_tokens:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:  # stop after this batch
                    self._queue.put(None)
                    break
                if nxt.kind != "score":
                    pending = nxt
                    break
                batch.append(nxt)
                tokens += nxt.tokens
            self._run_score_batch(batch)

    def _expired(self, job: _Job) -> bool:
        if job.future.cancelled():
            return True
        if job.deadline is not None and time.monotonic() > job.deadline:
            job.future.set_exception(DeadlineExceeded("the deadline passed while the request was queued"))
            return True
        return False

    def _run_score_batch(self, batch: list[_Job]) -> None:
        live = [j for j in batch if not self._expired(j) and j.future.set_running_or_notify_cancel()]
        if not live:
            return
        seqs = [s for j in live for s in j.payload]  # type: ignore[union-attr]
        started = time.perf_counter()
        try:
            results = self.engine.score(seqs)  # type: ignore[union-attr]
        except Exception as exc:  # noqa: BLE001
            log.exception("engine failed on a batch of %d sequences", len(seqs))
            for j in live:
                j.future.set_exception(exc)
            return
        elapsed = time.perf_counter() - started
        metrics.ENGINE_BATCH_SEQS.observe(len(seqs))
        metrics.ENGINE_TOKENS.inc(sum(len(p) + len(a) for p, a in seqs))
        metrics.ENGINE_SECONDS.inc(elapsed)
        offset = 0
        for j in live:
            n = len(j.payload)  # type: ignore[arg-type]
            j.future.set_result(results[offset : offset + n])
            offset += n

    def _run(self, job: _Job, fn) -> None:
        if self._expired(job) or not job.future.set_running_or_notify_cancel():
            return
        try:
            job.future.set_result(fn())
        except Exception as exc:  # noqa: BLE001
            job.future.set_exception(exc)

    def _generate(self, job: _Job) -> list[Generated]:
        prompt_ids, params = job.payload  # type: ignore[misc]
        return self.engine.generate(prompt_ids, stop_token_ids=self.boundary.stop_token_ids, **params)  # type: ignore


def _stop_token_ids(model_dir: Path) -> list[int]:
    path = model_dir / "generation_config.json"
    if not path.exists():
        return []
    eos = json.loads(path.read_text()).get("eos_token_id")
    if eos is None:
        return []
    return list(eos) if isinstance(eos, list) else [eos]
