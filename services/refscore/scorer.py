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
import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

from offdpo.fingerprint import model_fingerprint
from offdpo.v1 import records_pb2, refscore_pb2
from services.refscore import metrics
from services.refscore.config import RefscoreConfig, check_fits_gpus
from services.refscore.engines import Engine, Generated, load_engine
from services.refscore.errors import DeadlineExceeded, InvalidArgument, NotReady, TokenizationError, TooLarge, TooLong
from services.refscore.tokenization import BoundaryTokenizer, EncodedPrompt

log = logging.getLogger(__name__)

STREAM_WORKER = "stream-worker"  # the caller name of jobs submitted without one (the Kafka stream worker)

R = TypeVar("R")


# -- jobs on the engine queue ----------------------------------------------------------------------
@dataclass(kw_only=True, eq=False)
class _Queued(Generic[R]):
    tokens: int
    deadline: float | None  # time.monotonic() deadline
    caller: str = STREAM_WORKER
    future: concurrent.futures.Future[R] = field(default_factory=concurrent.futures.Future)


@dataclass(kw_only=True, eq=False)
class ScoreJob(_Queued[list[list[float]]]):
    """Score sequences; the result is one list of answer-token log-probs per sequence, in order."""

    sequences: list[tuple[list[int], list[int]]]  # (prompt_ids, answer_ids)


@dataclass(frozen=True)
class GenerateParams:
    n: int
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None


@dataclass(kw_only=True, eq=False)
class GenerateJob(_Queued[list[Generated]]):
    """Sample answers to one prompt."""

    prompt_ids: list[int]
    params: GenerateParams


Job = ScoreJob | GenerateJob


class FairQueue:
    """A blocking queue with one FIFO per caller, served round-robin. `None` (stop) jumps the line."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._fifos: collections.OrderedDict[str, collections.deque[Job]] = collections.OrderedDict()
        self._stop = False
        self._closed: BaseException | None = None

    def put(self, job: Job | None) -> None:
        with self._cond:
            if job is None:
                self._stop = True
            elif self._closed is not None:
                raise self._closed
            else:
                self._fifos.setdefault(job.caller, collections.deque()).append(job)
                metrics.CALLER_QUEUED.labels(job.caller).set(len(self._fifos[job.caller]))
            self._cond.notify()

    def _take(self) -> Job | None:
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

    def get(self) -> Job | None:
        with self._cond:
            while not self._fifos and not self._stop:
                self._cond.wait()
            return self._take()

    def get_nowait(self) -> Job | None:
        with self._cond:
            if not self._fifos and not self._stop:
                raise queue.Empty
            return self._take()

    def qsize(self) -> int:
        with self._cond:
            return sum(len(f) for f in self._fifos.values())

    def close(self, refusal: BaseException) -> list[Job]:
        """Refuse every later `put` with `refusal` and hand back the jobs still queued. Under the same
        lock as `put`, so no job can slip in after the engine thread that would serve it is gone."""
        with self._cond:
            self._closed = refusal
            jobs = [job for fifo in self._fifos.values() for job in fifo]
            self._fifos.clear()
            return jobs


# -- what goes in and comes out ----------------------------------------------------------------------
@dataclass
class Prepared:
    """A gRPC ScoreItem ready for the engine."""

    prompt_ids: list[int]
    answer_ids: list[int]


@dataclass(frozen=True)
class PreparedPair:
    """A preference pair tokenised for the engine: one prompt, two answers."""

    pair: records_pb2.PreferencePair
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]


@dataclass(frozen=True)
class ScoredRow:
    """A scored pair: its token ids and the reference log-prob of each answer token."""

    prepared: PreparedPair
    chosen_logprobs: list[float]
    rejected_logprobs: list[float]

    def to_record(self, fingerprint: records_pb2.ReferenceFingerprint) -> records_pb2.ScoredPair:
        p = self.prepared
        return records_pb2.ScoredPair(
            pair=p.pair,
            fingerprint=fingerprint,
            prompt_token_ids=p.prompt_ids,
            chosen_token_ids=p.chosen_ids,
            rejected_token_ids=p.rejected_ids,
            chosen_logprobs=self.chosen_logprobs,
            rejected_logprobs=self.rejected_logprobs,
            chosen_logprob_sum=float(sum(self.chosen_logprobs)),
            rejected_logprob_sum=float(sum(self.rejected_logprobs)),
        )


@dataclass(frozen=True)
class LoadedModel:
    """What `Scorer.load` made, besides the engine (which only the engine thread touches)."""

    boundary: BoundaryTokenizer
    fingerprint: records_pb2.ReferenceFingerprint


class Scorer:
    def __init__(self, cfg: RefscoreConfig):
        self.cfg = cfg
        self.ready = threading.Event()
        self.load_error: BaseException | None = None
        self.engine: Engine | None = None
        self._model: LoadedModel | None = None
        self.engine_settings: dict[str, str] = {}
        self.max_model_len = cfg.max_model_len
        self._queue = FairQueue()
        self._thread: threading.Thread | None = None
        self._stopping = False
        # When the engine thread entered the engine call it is in (None: not in one). The watchdog
        # reads it: a call that never returns is a hung engine, which nothing else would notice.
        self._busy_since: float | None = None
        self._failpoint = cfg.failpoint

    @property
    def fingerprint(self) -> records_pb2.ReferenceFingerprint | None:
        return self._model.fingerprint if self._model else None

    @property
    def boundary(self) -> BoundaryTokenizer | None:
        return self._model.boundary if self._model else None

    # -- lifecycle ---------------------------------------------------------------------------
    def load(self, engine: Engine | None = None) -> None:
        """Load tokenizer and engine (blocking: tens of seconds). Safe to call from a thread.
        `engine`: one already made (tests), instead of the configured one."""
        try:
            from transformers import AutoTokenizer

            from offdpo.config import S3Config
            from services.refscore.model_source import is_s3_uri, resolve_model

            # A trainer checkpoint in S3 is downloaded once into the cache, then loaded like a folder.
            resolved = resolve_model(
                self.cfg.model_dir, self.cfg.model_cache, S3Config.from_env() if is_s3_uri(self.cfg.model_dir) else None
            )
            model_dir = resolved.path
            settings = self.cfg.engine_settings()
            if engine is None and self.cfg.engine == "vllm":
                check_fits_gpus(self.cfg, model_dir)
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
            boundary = BoundaryTokenizer(tokenizer, _stop_token_ids(model_dir))
            if engine is None:
                engine = load_engine(
                    self.cfg.engine,
                    str(model_dir),
                    self.cfg.dtype,
                    self.cfg.max_model_len,
                    self.cfg.gpu_memory_utilization,
                    settings,
                )
            self.engine = engine
            self.max_model_len = engine.max_model_len
            # Read once, before the engine thread owns the engine (engines are single-threaded).
            self.engine_settings = engine.effective_settings()
            log.info("engine settings: %s", self.engine_settings)
            fingerprint = model_fingerprint(
                model_dir,
                dtype=self.cfg.dtype,
                engine=engine.name,
                engine_version=engine.version,
                model_id=self.cfg.model_id or resolved.model_id,
                chat_template=boundary.chat_template,
                parallel_layout=settings.parallel_layout,
            )
            self._model = LoadedModel(boundary, fingerprint)
            self._thread = threading.Thread(target=self._engine_loop, name="refscore-engine", daemon=True)
            self._thread.start()
            log.info("engine %s %s ready: %s", engine.name, engine.version, fingerprint)
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
        if not self.engine_alive():
            raise NotReady("the engine thread has stopped; this process is restarting")

    def engine_alive(self) -> bool:
        """False once the engine thread has ended (it only ends on shutdown or by dying)."""
        return self._thread is None or self._thread.is_alive()

    def engine_busy_s(self, now: float | None = None) -> float:
        """How long the engine thread has been inside its current engine call (0 when idle)."""
        since = self._busy_since
        return 0.0 if since is None else (time.monotonic() if now is None else now) - since

    @property
    def stopping(self) -> bool:
        return self._stopping

    def model(self) -> LoadedModel:
        """The tokenizer and fingerprint; NotReady while loading, after a failed load or while stopping."""
        self.check_ready()
        if self._model is None:
            raise NotReady("the engine is not ready (loading or shutting down); retry later")
        return self._model

    # -- preparation (validation + tokenisation) ------------------------------------------------
    def prepare_items(self, items: Sequence[refscore_pb2.ScoreItem]) -> list[Prepared]:
        """Tokenise ScoreItems; InvalidArgument / TooLarge / TokenizationError name the offending item."""
        boundary = self.model().boundary
        if len(items) == 0:
            raise InvalidArgument("the request has no items: send at least one (prompt, answer) item")
        if len(items) > self.cfg.max_items_per_request:
            raise TooLarge(
                f"the request has {len(items)} items; the limit is {self.cfg.max_items_per_request} "
                f"per request (split it, or use ScoreStream)"
            )
        prepared: list[Prepared] = []
        total = 0
        for i, item in enumerate(items):
            try:
                prepared.append(self._prepare_item(boundary, item))
            except TokenizationError as exc:
                raise exc.at(f"items[{i}]") from None
            total += len(prepared[-1].prompt_ids) + len(prepared[-1].answer_ids)
            if total > self.cfg.max_tokens_per_request:
                raise TooLarge(
                    f"the request has more than {self.cfg.max_tokens_per_request} tokens "
                    f"(reached at items[{i}]); split it, or use ScoreStream"
                )
        return prepared

    def _prepare_item(self, boundary: BoundaryTokenizer, item: refscore_pb2.ScoreItem) -> Prepared:
        prompt = boundary.encode_prompt(item.prompt)
        kind = item.WhichOneof("answer")
        if kind == "answer_text":
            answer = boundary.encode_answer_text(item.answer_text, prompt.is_chat)
        elif kind == "answer_token_ids":
            answer = boundary.encode_answer_ids(item.answer_token_ids.ids)
        else:
            raise TokenizationError("the answer is missing: set answer_text or answer_token_ids")
        self._check_length(prompt.ids, answer)
        return Prepared(prompt.ids, answer)

    def prepare_pair(self, pair: records_pb2.PreferencePair) -> PreparedPair:
        """Tokenise a preference pair (the prompt once); TokenizationError / TooLong name the pair and answer."""
        boundary = self.model().boundary
        where = f"pair {pair.pair_id}"
        try:
            prompt = boundary.encode_prompt(pair.prompt)
        except TokenizationError as exc:
            raise exc.at(where) from None
        return PreparedPair(
            pair,
            prompt.ids,
            self._prepare_answer(boundary, prompt, pair.chosen, f"{where} chosen"),
            self._prepare_answer(boundary, prompt, pair.rejected, f"{where} rejected"),
        )

    def _prepare_answer(self, boundary: BoundaryTokenizer, prompt: EncodedPrompt, text: str, where: str) -> list[int]:
        try:
            answer = boundary.encode_answer_text(text, prompt.is_chat)
            self._check_length(prompt.ids, answer)
        except TokenizationError as exc:
            raise exc.at(where) from None
        return answer

    def _check_length(self, prompt_ids: list[int], answer_ids: list[int]) -> None:
        total = len(prompt_ids) + len(answer_ids)
        # vLLM scores a prompt by generating one token after it, so one position must stay free.
        if total > self.max_model_len - 1:
            raise TooLong(
                f"prompt ({len(prompt_ids)} tokens) + answer ({len(answer_ids)} tokens)"
                f" = {total} tokens exceeds the model's context of {self.max_model_len - 1} tokens"
            )

    # -- execution -----------------------------------------------------------------------------
    def _submit(self, job: Job) -> None:
        self.check_ready()
        metrics.CALLER_TOKENS.labels(job.caller).inc(job.tokens)
        self._queue.put(job)

    def submit_score(
        self, prepared: Sequence[Prepared], deadline: float | None = None, caller: str | None = None
    ) -> concurrent.futures.Future[list[list[float]]]:
        """Queue a scoring job; `caller` (default: the stream worker) picks its fair-queue FIFO."""
        sequences = [(p.prompt_ids, p.answer_ids) for p in prepared]
        job = ScoreJob(
            sequences=sequences,
            tokens=sum(len(s) + len(a) for s, a in sequences),
            deadline=deadline,
            caller=caller or STREAM_WORKER,
        )
        self._submit(job)
        return job.future

    def submit_generate(
        self, prompt_ids: list[int], params: GenerateParams, deadline: float | None = None, caller: str | None = None
    ) -> concurrent.futures.Future[list[Generated]]:
        job = GenerateJob(
            prompt_ids=prompt_ids,
            params=params,
            tokens=len(prompt_ids),
            deadline=deadline,
            caller=caller or STREAM_WORKER,
        )
        self._submit(job)
        return job.future

    def score(
        self, prepared: Sequence[Prepared], timeout: float | None = None, heartbeat: Callable[[], None] | None = None
    ) -> list[list[float]]:
        """Blocking scoring of gRPC-shaped items. With `timeout`, a job the engine has not answered by
        then is cancelled and NotReady raised (retryable): a caller never waits on the engine for ever.
        `heartbeat` is called about once a second while waiting (the caller is alive, just waiting)."""
        future = self.submit_score(prepared)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            step = 1.0 if deadline is None else min(1.0, max(0.0, deadline - time.monotonic()))
            try:
                return future.result(timeout=step)
            except concurrent.futures.TimeoutError:
                if deadline is not None and time.monotonic() >= deadline:
                    future.cancel()  # still queued: dropped; already running: the result is discarded
                    raise NotReady(f"the engine did not answer within {timeout:.0f} s") from None
                if not self.engine_alive():
                    raise NotReady("the engine thread stopped while this job waited") from None
                if heartbeat is not None:
                    heartbeat()

    def score_pairs(
        self,
        pairs: Sequence[PreparedPair],
        timeout: float | None = None,
        heartbeat: Callable[[], None] | None = None,
    ) -> list[ScoredRow]:
        """Blocking scoring of preference pairs (the stream worker's path): both answers of every
        pair in one engine job; one row per pair, in order."""
        items = [Prepared(p.prompt_ids, answer) for p in pairs for answer in (p.chosen_ids, p.rejected_ids)]
        logps = self.score(items, timeout, heartbeat)
        return [ScoredRow(p, logps[2 * i], logps[2 * i + 1]) for i, p in enumerate(pairs)]

    def _engine_loop(self) -> None:
        """The engine thread. An error while serving some jobs fails those jobs and the loop goes on;
        if the thread ends anyway (shutdown, or something no handler expects), every job still
        queued is failed with NotReady and later submissions are refused, so no caller waits on a
        thread that is gone. The watchdog sees a dead thread and restarts the process."""
        engine = self.engine
        assert engine is not None, "load() sets the engine before it starts this thread"
        try:
            self._serve_queue(engine)
        except BaseException:
            log.critical("the engine thread died; nothing will be scored until the process restarts", exc_info=True)
            raise
        finally:
            self._busy_since = None
            refusal = NotReady("the engine thread has stopped; retry later")
            for job in self._queue.close(refusal):
                _fail(job, refusal)

    def _serve_queue(self, engine: Engine) -> None:
        pending: Job | None = None
        while True:
            job = pending or self._queue.get()
            if job is None:
                return
            pending = None
            batch: list[Job] = [job]
            try:
                if self._failpoint == "engine_thread_dies":
                    raise EngineThreadKilled("failpoint engine_thread_dies (fault-injection test)")
                if isinstance(job, GenerateJob):
                    self._run_generate(engine, job)
                    continue
                score_batch, pending = self._gather(job)
                batch = list(score_batch)
                self._run_score_batch(engine, score_batch)
            except Exception as exc:  # noqa: BLE001 - fail these jobs, keep serving the others
                log.exception("the engine thread failed on a batch of %d jobs; failing them and going on", len(batch))
                for j in batch:
                    _fail(j, exc)
            except BaseException:
                # The thread is ending: the jobs in hand are no longer queued, so fail them here.
                for j in [*batch, *([pending] if pending else [])]:
                    _fail(j, NotReady("the engine thread has stopped; retry later"))
                raise

    def _gather(self, first: ScoreJob) -> tuple[list[ScoreJob], GenerateJob | None]:
        """`first` and the score jobs queued behind it, up to `engine_batch_tokens`; a generate job
        met on the way is handed back to run next."""
        batch, tokens = [first], first.tokens
        while tokens < self.cfg.engine_batch_tokens:
            try:
                nxt = self._queue.get_nowait()
            except queue.Empty:
                break
            if nxt is None:  # stop after this batch
                self._queue.put(None)
                break
            if isinstance(nxt, GenerateJob):
                return batch, nxt
            batch.append(nxt)
            tokens += nxt.tokens
        return batch, None

    @staticmethod
    def _claim(job: Job) -> bool:
        """Take a queued job for the engine: True if it is to be computed now.

        The future is moved to RUNNING first (`set_running_or_notify_cancel`, atomic with `cancel`),
        and only then is its deadline checked: once RUNNING a caller's cancel can no longer land, so
        setting the deadline error cannot meet a cancelled future (which would raise in this thread).
        """
        if not job.future.set_running_or_notify_cancel():
            return False  # cancelled while queued: its caller has gone
        if job.deadline is not None and time.monotonic() > job.deadline:
            job.future.set_exception(DeadlineExceeded("the deadline passed while the request was queued"))
            return False
        return True

    def _run_score_batch(self, engine: Engine, batch: list[ScoreJob]) -> None:
        live = [j for j in batch if self._claim(j)]
        if not live:
            return
        seqs = [s for j in live for s in j.sequences]
        started = time.perf_counter()
        shared_before = getattr(engine, "shared_prompt_tokens", 0)
        self._busy_since = time.monotonic()
        try:
            if self._failpoint == "engine_hangs":
                log.error("failpoint engine_hangs: this engine call never returns (fault-injection test)")
                threading.Event().wait()
            results = engine.score(seqs)
        except Exception as exc:  # noqa: BLE001 - the callers get the engine's error
            log.exception("engine failed on a batch of %d sequences", len(seqs))
            for j in live:
                j.future.set_exception(exc)
            return
        finally:
            self._busy_since = None
        elapsed = time.perf_counter() - started
        model = self.fingerprint.fingerprint_id if self.fingerprint else ""
        metrics.ENGINE_BATCH_SEQS.labels(model).observe(len(seqs))
        metrics.ENGINE_TOKENS.labels(model).inc(sum(len(p) + len(a) for p, a in seqs))
        metrics.ENGINE_SHARED_TOKENS.labels(model).inc(getattr(engine, "shared_prompt_tokens", 0) - shared_before)
        metrics.ENGINE_SECONDS.labels(model).inc(elapsed)
        offset = 0
        for j in live:
            j.future.set_result(results[offset : offset + len(j.sequences)])
            offset += len(j.sequences)

    def _run_generate(self, engine: Engine, job: GenerateJob) -> None:
        if not self._claim(job):
            return
        model = self._model
        assert model is not None, "generate jobs are only queued once loaded"
        p = job.params
        self._busy_since = time.monotonic()
        try:
            answers = engine.generate(
                job.prompt_ids,
                n=p.n,
                max_tokens=p.max_tokens,
                temperature=p.temperature,
                top_p=p.top_p,
                seed=p.seed,
                stop_token_ids=model.boundary.stop_token_ids,
            )
        except Exception as exc:  # noqa: BLE001 - the caller gets the engine's error
            job.future.set_exception(exc)
            return
        finally:
            self._busy_since = None
        job.future.set_result(answers)


class EngineThreadKilled(BaseException):
    """Ends the engine thread the way an unexpected fault would (fault injection only). A
    BaseException, so the loop's per-batch handler does not catch it."""


def _fail(job: Job, exc: BaseException) -> None:
    """Fail `job` unless it is already done or cancelled (then its caller has its answer or has gone)."""
    try:
        job.future.set_exception(exc)
    except concurrent.futures.InvalidStateError:
        pass


def _stop_token_ids(model_dir: Path) -> list[int]:
    path = model_dir / "generation_config.json"
    if not path.exists():
        return []
    eos = json.loads(path.read_text()).get("eos_token_id")
    if eos is None:
        return []
    return list(eos) if isinstance(eos, list) else [eos]
