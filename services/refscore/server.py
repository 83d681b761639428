"""The refscore gRPC server (grpc.aio): Score, ScoreStream, Generate, GetModelInfo.

- Health (grpc.health.v1) says NOT_SERVING until the engine is loaded, and again while draining.
- Reflection lists offdpo.v1.RefScore, so grpcurl-style clients need no stubs.
- Requests are decoded here, not by grpc: malformed bytes and unknown fields become
  INVALID_ARGUMENT with a message, instead of grpc's generic INTERNAL.
- Domain errors (`offdpo.errors` classes) answer with their own status code, in one interceptor.
- Message sizes are limited explicitly; oversized messages get RESOURCE_EXHAUSTED from grpc itself.
- SIGTERM: health goes NOT_SERVING, in-flight RPCs get `grace_s` to finish, then the engine stops.
- OFFDPO_REFSCORE_HTTP_PORT: an OpenAI-compatible HTTP door (http_door.py) in the same event loop, on
  the same RefScoreService, interceptor and quotas; it starts and stops (same grace) with the gRPC server.
- Security (the `security` package over the shared `offdpo.grpc_auth`): TLS/mTLS (certificates reloaded
  without a restart) or explicit plaintext; every RefScore RPC is authenticated (token or client
  certificate) and authorised by one interceptor before its body is read (health and reflection stay
  open); per-team concurrency and tokens-per-minute quotas split over OFFDPO_REFSCORE_REPLICAS; an
  optional plaintext health-only port for kubelet probes.
- A caller's prompts are tokenised with a request-local cache, never the shared one: nothing is cached
  for a caller that is then refused, and no caller can time another's prompts through the cache.
- NotReady answers UNAVAILABLE with a generic message; its detail (e.g. the engine's load error) is logged.
- More than one reference model (OFFDPO_REFSCORE_EXTRA_MODEL_DIRS): one Scorer (engine) per model, keyed by
  fingerprint_id, the primary (OFFDPO_REFSCORE_MODEL_DIR) first. A request picks one by its
  `expected_fingerprint_id` (GetModelInfo: `fingerprint_id`); empty -> the primary; an id no served model
  has -> FAILED_PRECONDITION listing the served ones (UNAVAILABLE while a model is still loading, since
  its fingerprint is not known yet). Health is SERVING once every model has loaded. With several models a
  team limited to some `models` (auth file) is checked against the model its request picked, once the
  request is read; with one model the interceptor checks it before, as always.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import grpc
from google.protobuf.message import Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from offdpo import grpc_auth
from offdpo.errors import OffdpoError
from offdpo.grpc_auth import QuotaExceeded, Quotas, method_name, wrap_handler
from offdpo.records import decode
from offdpo.v1 import records_pb2, refscore_pb2
from services.refscore import metrics, security
from services.refscore.config import RefscoreConfig, RefscoreQuotaConfig
from services.refscore.errors import (
    DuplicateReference,
    FingerprintMismatch,
    InvalidArgument,
    ModelNotAllowed,
    NotReady,
    RefscoreError,
    TokenizationError,
    TooLong,
)
from services.refscore.scorer import GenerateParams, LoadedModel, Scorer
from services.refscore.tokenization import request_local_cache

if TYPE_CHECKING:
    from services.refscore.http_door import HttpDoor

log = logging.getLogger(__name__)

T = TypeVar("T")
M = TypeVar("M", bound=Message)
SERVICE_NAME = refscore_pb2.DESCRIPTOR.services_by_name["RefScore"].full_name
NOT_READY_MESSAGE = "the reference engine is not ready (loading, failed or restarting); retry later"


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    """Answers a domain error (`offdpo.errors.OffdpoError`) with its own status code and message."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = method_name(handler_call_details)

        @contextlib.asynccontextmanager
        async def mapped(context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
            try:
                yield
            except OffdpoError as exc:
                code = exc.grpc_status
                metrics.RPC_ERRORS.labels(method, code.name).inc()
                caller = security.current_caller()
                metrics.CALLER_ERRORS.labels(
                    caller.name if caller else security.UNAUTHENTICATED_CALLER, code.name
                ).inc()
                trailing = exc.trailing_metadata() if isinstance(exc, (RefscoreError, QuotaExceeded)) else ()
                message = str(exc)
                if isinstance(exc, NotReady):  # the detail (a load error, a path) is for the log only
                    log.warning("%s answered UNAVAILABLE: %s", method, message)
                    message = NOT_READY_MESSAGE
                await context.abort(code, message, trailing)

        return wrap_handler(handler, mapped)


def _decode(message_type: type[M], data: bytes, max_bytes: int, what: str) -> M:
    if not data:
        return message_type()  # an empty message is valid protobuf; the fields are checked later
    return decode(message_type, data, max_bytes, what)  # a DecodeError is INVALID_ARGUMENT by its type


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


async def _result(future: concurrent.futures.Future[T]) -> T:
    """The engine job's result; a caller that goes away cancels its job (no computing for nobody)."""
    try:
        return await asyncio.wrap_future(future)
    except asyncio.CancelledError:
        future.cancel()
        raise


class References:
    """The reference models one server serves: their scorers in configuration order, the primary
    (OFFDPO_REFSCORE_MODEL_DIR) first, and the loaded ones keyed by fingerprint_id."""

    def __init__(self, scorers: Sequence[Scorer]):
        if not scorers:
            raise ValueError("a refscore server serves at least one reference model")
        self.scorers = list(scorers)
        self.by_fingerprint: dict[str, Scorer] = {}

    @property
    def primary(self) -> Scorer:
        return self.scorers[0]

    def register(self, scorer: Scorer) -> records_pb2.ReferenceFingerprint:
        """Key a scorer that has loaded by its fingerprint; DuplicateReference if another has it."""
        fp = scorer.fingerprint
        assert fp is not None, "register() is called once the scorer has loaded"
        other = self.by_fingerprint.get(fp.fingerprint_id)
        if other is not None and other is not scorer:
            raise DuplicateReference(
                f"{scorer.cfg.model_dir!r} and {other.cfg.model_dir!r} have the same fingerprint "
                f"{fp.fingerprint_id} ({fp.model_id}): serve each reference once (OFFDPO_REFSCORE_MODEL_DIR, "
                "OFFDPO_REFSCORE_EXTRA_MODEL_DIRS), or give them different model ids"
            )
        self.by_fingerprint[fp.fingerprint_id] = scorer
        return fp

    def fingerprints(self) -> list[records_pb2.ReferenceFingerprint]:
        """The fingerprints of the loaded models, primary first."""
        return [s.fingerprint for s in self.scorers if s.fingerprint is not None]

    def served(self) -> str:
        return ", ".join(f"{fp.fingerprint_id} ({fp.model_id})" for fp in self.fingerprints()) or "none yet"

    def select(self, fingerprint_id: str, what: str = "expected_fingerprint_id") -> tuple[Scorer, LoadedModel]:
        """The scorer a request asks for by fingerprint id (empty: the primary) and its loaded model.
        NotReady while that model (or, for an id not known yet, any model) is loading;
        FingerprintMismatch for an id none of the loaded models has."""
        if not fingerprint_id:
            return self.primary, self.primary.model()
        scorer = self.by_fingerprint.get(fingerprint_id) or next(
            (s for s in self.scorers if s.fingerprint is not None and s.fingerprint.fingerprint_id == fingerprint_id),
            None,  # loaded, not registered yet (load_engine registers each model as it loads)
        )
        if scorer is not None:
            return scorer, scorer.model()
        if any(s.fingerprint is None for s in self.scorers):
            # A model still loading (or one that failed) may be the one asked for: retryable, not wrong.
            raise NotReady(f"{what} {fingerprint_id!r} is not among the models loaded so far; some are still loading")
        if len(self.scorers) == 1:  # the one-model message, as before
            fp = self.primary.model().fingerprint
            raise FingerprintMismatch(
                f"{what} {fingerprint_id!r} does not match this server's {fp.fingerprint_id!r} ({fp.model_id})"
            )
        raise FingerprintMismatch(f"{what} {fingerprint_id!r} is not served here; this server serves {self.served()}")


def _check_model_allowed(model: LoadedModel) -> None:
    """A team limited to some models (the auth file's `models`) may use only those."""
    caller = security.current_caller()
    refusal = caller.model_refusal(model.fingerprint.model_id) if caller is not None else None
    if refusal is not None:
        raise ModelNotAllowed(refusal)


class RefScoreService:
    def __init__(self, scorer: Scorer | References, cfg: RefscoreConfig, quotas: Quotas | None = None):
        self.references = scorer if isinstance(scorer, References) else References([scorer])
        self.cfg = cfg
        self.quotas = quotas or security.Quotas()

    @property
    def scorer(self) -> Scorer:
        """The primary model's scorer."""
        return self.references.primary

    def _select(self, fingerprint_id: str, what: str = "expected_fingerprint_id") -> tuple[Scorer, LoadedModel]:
        scorer, model = self.references.select(fingerprint_id, what)
        _check_model_allowed(model)
        return scorer, model

    def _charge(self, tokens: int) -> str:
        """Charge the caller's tokens-per-minute quota; returns the caller's name for the fair queue."""
        caller = security.current_caller() or security.ANONYMOUS
        self.quotas.charge(caller, tokens)
        return caller.name

    def _check_quota(self) -> None:
        """Refuse a caller whose tokens-per-minute bucket is empty before any tokenising is done."""
        self.quotas.check(security.current_caller() or security.ANONYMOUS)

    async def score(
        self, request: refscore_pb2.ScoreRequest, deadline: float | None
    ) -> tuple[list[refscore_pb2.ScoredItem], records_pb2.ReferenceFingerprint]:
        """The scored items and the fingerprint of the model that scored them (`deadline`: time.monotonic()).
        Score, ScoreStream and the HTTP door (http_door.py) all score through here, as the current caller."""
        scorer, model = self._select(request.expected_fingerprint_id)
        self._check_quota()
        with request_local_cache():  # nothing cached for a caller the charge below refuses
            prepared = scorer.prepare_items(request.items)
        caller = self._charge(sum(len(p.prompt_ids) + len(p.answer_ids) for p in prepared))
        results = await _result(scorer.submit_score(prepared, deadline, caller=caller))
        return [
            refscore_pb2.ScoredItem(
                item_index=i,
                item_id=item.item_id,
                prompt_token_ids=prep.prompt_ids,
                answer_token_ids=prep.answer_ids,
                token_logprobs=logps,
                logprob_sum=float(sum(logps)),
            )
            for i, (item, prep, logps) in enumerate(zip(request.items, prepared, results))
        ], model.fingerprint

    async def Score(self, raw: bytes, context: grpc.aio.ServicerContext) -> refscore_pb2.ScoreResponse:
        request = _decode(refscore_pb2.ScoreRequest, raw, self.cfg.max_message_bytes, "ScoreRequest")
        items, fingerprint = await self.score(request, _deadline(context))
        metrics.RPC_ITEMS.labels("Score").inc(len(items))
        return refscore_pb2.ScoreResponse(items=items, fingerprint=fingerprint)

    async def ScoreStream(
        self, raw_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[refscore_pb2.ScoreStreamResult]:
        index = 0
        last_fingerprint_id: str | None = None
        async for raw in raw_iterator:
            request = _decode(
                refscore_pb2.ScoreRequest, raw, self.cfg.max_message_bytes, f"ScoreStream request {index}"
            )
            try:
                items, fingerprint = await self.score(request, _deadline(context))
            except RefscoreError as exc:
                raise exc.at(f"request {index}") from None  # say which request on the stream it was
            except QuotaExceeded as exc:
                raise QuotaExceeded(f"request {index}: {exc}", exc.retry_after_s) from None
            for n, item in enumerate(items):
                result = refscore_pb2.ScoreStreamResult(request_index=index, item=item)
                # On the stream's first result, and again where a request picked another model than the one before.
                if n == 0 and fingerprint.fingerprint_id != last_fingerprint_id:
                    result.fingerprint.CopyFrom(fingerprint)
                    last_fingerprint_id = fingerprint.fingerprint_id
                yield result
            metrics.RPC_ITEMS.labels("ScoreStream").inc(len(items))
            index += 1

    def _generate_params(
        self, request: refscore_pb2.GenerateRequest, prompt_tokens: int, max_model_len: int
    ) -> GenerateParams:
        n = request.n or 1
        max_tokens = request.max_tokens or 256
        if n < 1 or n > self.cfg.max_generate_n:
            raise InvalidArgument(f"n={n} must be between 1 and {self.cfg.max_generate_n}")
        if max_tokens < 1 or max_tokens > self.cfg.max_generate_tokens:
            raise InvalidArgument(f"max_tokens={max_tokens} must be between 1 and {self.cfg.max_generate_tokens}")
        if prompt_tokens + max_tokens > max_model_len:
            raise TooLong(
                f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) exceeds the "
                f"model's context of {max_model_len} tokens"
            )
        temperature = request.temperature if request.HasField("temperature") else 1.0
        top_p = request.top_p if request.HasField("top_p") else 1.0
        if temperature < 0 or not (0 < top_p <= 1):
            raise InvalidArgument(f"temperature={temperature} must be >= 0 and top_p={top_p} in (0, 1]")
        seed = request.seed if request.HasField("seed") else None
        return GenerateParams(n=n, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)

    async def Generate(self, raw: bytes, context: grpc.aio.ServicerContext) -> refscore_pb2.GenerateResponse:
        request = _decode(refscore_pb2.GenerateRequest, raw, self.cfg.max_message_bytes, "GenerateRequest")
        return await self.generate(request, _deadline(context))

    async def generate(
        self, request: refscore_pb2.GenerateRequest, deadline: float | None
    ) -> refscore_pb2.GenerateResponse:
        """Samples for one prompt, as the current caller (Generate and the HTTP door)."""
        scorer, model = self._select(request.expected_fingerprint_id)
        self._check_quota()
        try:
            with request_local_cache():
                prompt = model.boundary.encode_prompt(request.prompt)
        except TokenizationError as exc:
            raise exc.at("prompt") from None
        params = self._generate_params(request, len(prompt.ids), scorer.max_model_len)
        caller = self._charge(len(prompt.ids) + params.n * params.max_tokens)  # the most it can cost
        answers = await _result(scorer.submit_generate(prompt.ids, params, deadline, caller=caller))
        return refscore_pb2.GenerateResponse(
            prompt_token_ids=prompt.ids,
            fingerprint=model.fingerprint,
            answers=[
                refscore_pb2.GeneratedAnswer(
                    text=model.boundary.decode(a.token_ids),
                    token_ids=a.token_ids,
                    token_logprobs=a.logprobs,
                    logprob_sum=float(sum(a.logprobs)),
                    finish_reason=a.finish_reason,
                )
                for a in answers
            ],
        )

    async def GetModelInfo(self, raw: bytes, context: grpc.aio.ServicerContext) -> refscore_pb2.ModelInfo:
        request = _decode(refscore_pb2.GetModelInfoRequest, raw, 1024, "GetModelInfoRequest")
        scorer, model = self._select(request.fingerprint_id, "fingerprint_id")
        tok = model.boundary.tok
        return refscore_pb2.ModelInfo(
            fingerprint=model.fingerprint,
            max_model_len=scorer.max_model_len,
            max_items_per_request=self.cfg.max_items_per_request,
            max_tokens_per_request=self.cfg.max_tokens_per_request,
            max_message_bytes=self.cfg.max_message_bytes,
            bos_token_id=-1 if tok.bos_token_id is None else tok.bos_token_id,
            eos_token_id=-1 if tok.eos_token_id is None else tok.eos_token_id,
            engine_settings=scorer.engine_settings,
            served=self.references.fingerprints(),
        )

    def generic_handler(self) -> grpc.GenericRpcHandler:
        identity = None  # raw bytes in; decoded (and validated) by the methods above
        handlers = {
            "Score": grpc.unary_unary_rpc_method_handler(
                self.Score, identity, refscore_pb2.ScoreResponse.SerializeToString
            ),
            "ScoreStream": grpc.stream_stream_rpc_method_handler(
                self.ScoreStream, identity, refscore_pb2.ScoreStreamResult.SerializeToString
            ),
            "Generate": grpc.unary_unary_rpc_method_handler(
                self.Generate, identity, refscore_pb2.GenerateResponse.SerializeToString
            ),
            "GetModelInfo": grpc.unary_unary_rpc_method_handler(
                self.GetModelInfo, identity, refscore_pb2.ModelInfo.SerializeToString
            ),
        }
        return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)


class RefscoreServer:
    """The gRPC server around the Scorers of its reference models (one per model, the primary first);
    the engines load in the background, one after another, after the port opens."""

    def __init__(
        self,
        cfg: RefscoreConfig,
        scorer: Scorer | None = None,
        replicas: int | None = None,
        extra_scorers: Sequence[Scorer] | None = None,
    ):
        """`scorer`: the primary model's (default: one for `cfg`); `extra_scorers`: the other models'
        (default: one per OFFDPO_REFSCORE_EXTRA_MODEL_DIRS entry, `cfg.model_configs()`, which refuses a
        set of models that cannot all be served); `replicas`: how many replicas share each team's quota
        (default OFFDPO_REFSCORE_REPLICAS)."""
        self.cfg = cfg
        if extra_scorers is None:
            extra_scorers = [Scorer(c) for c in cfg.model_configs()[1:]]
        self.references = References([scorer or Scorer(cfg), *extra_scorers])
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.health_server: grpc.aio.Server | None = None
        self.port: int | None = None
        self.health_port: int | None = None
        self.http: HttpDoor | None = None
        self.http_port: int | None = None
        self.quotas = security.Quotas(RefscoreQuotaConfig.from_env().replicas if replicas is None else replicas)

    @property
    def scorer(self) -> Scorer:
        """The primary model's scorer (the one the stream worker scores with)."""
        return self.references.primary

    @property
    def scorers(self) -> list[Scorer]:
        """Every model's scorer, the primary first."""
        return self.references.scorers

    def model_id(self) -> str:
        fp = self.scorer.fingerprint
        return fp.model_id if fp is not None else (self.cfg.model_id or Path(self.cfg.model_dir).name)

    async def start(self) -> int:
        options = [
            ("grpc.max_receive_message_length", self.cfg.max_message_bytes),
            ("grpc.max_send_message_length", self.cfg.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ]
        # Fail on a missing or contradictory security setting before the port opens.
        secured = security.build(self.cfg)
        credentials = secured.credentials()
        # One model: a team limited to some models is refused before its request is read, as always. Several:
        # which one a request uses is in its body, so RefScoreService checks the team against the model picked.
        auth = (
            security.AuthInterceptor(secured.store, self.quotas, self.model_id)
            if len(self.scorers) == 1
            else grpc_auth.AuthInterceptor(  # the same, without the model check
                secured.store, self.quotas, None, service=security.SERVICE, metrics=security.METRICS
            )
        )
        interceptors = [auth, ErrorMappingInterceptor()]
        self.server = grpc.aio.server(interceptors=interceptors, options=options)
        service = RefScoreService(self.references, self.cfg, self.quotas)
        self.server.add_generic_rpc_handlers([service.generic_handler()])
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection([SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], self.server)
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        address = f"{self.cfg.host}:{self.cfg.port}"
        self.port = (
            self.server.add_secure_port(address, credentials)
            if credentials is not None
            else self.server.add_insecure_port(address)
        )
        if not self.port:
            raise OSError(f"cannot listen on {address}")
        if self.cfg.health_port:
            await self._start_health_port()
        if self.cfg.http_port:  # the OpenAI-compatible door: the same service, interceptor and quotas
            from services.refscore.http_door import HttpDoor  # starlette and uvicorn only when it is on

            self.http = HttpDoor(service, auth, self.cfg)
            self.http_port = await self.http.start()
        await self.server.start()
        log.info(
            "refscore listening on %s:%d (%s%s; %s loading)%s",
            self.cfg.host,
            self.port,
            "TLS" if credentials is not None else "PLAINTEXT",
            ", mTLS" if self.cfg.tls_client_ca and credentials is not None else "",
            "engine" if len(self.scorers) == 1 else f"{len(self.scorers)} reference models",
            f"; health-only plaintext port {self.health_port}" if self.health_port else "",
        )
        return self.port

    async def _start_health_port(self) -> None:
        """kubelet's gRPC probes speak neither TLS nor tokens: health (and nothing else) in plaintext."""
        self.health_server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_server)
        self.health_port = self.health_server.add_insecure_port(f"{self.cfg.host}:{self.cfg.health_port}")
        if not self.health_port:
            raise OSError(f"cannot listen on {self.cfg.host}:{self.cfg.health_port} (OFFDPO_REFSCORE_HEALTH_PORT)")
        await self.health_server.start()

    async def load_engine(self) -> None:
        """Load every model's engine, one after another (the primary first: vLLM sizes its memory from
        what is free when it starts, so engines must not start side by side), then health SERVING.
        A model that fails to load, or has the fingerprint of one loaded before (DuplicateReference),
        raises: the server never becomes SERVING."""
        total = len(self.scorers)
        for n, scorer in enumerate(self.scorers, 1):
            if not scorer.ready.is_set():
                await asyncio.to_thread(scorer.load)
            fp = self.references.register(scorer)
            log.info(
                "reference model %d/%d loaded%s: fingerprint %s, model %s, from %s",
                n,
                total,
                " (primary)" if n == 1 else "",
                fp.fingerprint_id,
                fp.model_id,
                scorer.cfg.model_dir,
            )
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("refscore SERVING")

    async def stop(self, grace_s: float | None = None) -> None:
        grace = self.cfg.grace_s if grace_s is None else grace_s
        await self.health.enter_graceful_shutdown()  # probes see NOT_SERVING; load balancers drain us
        # Both doors stop taking requests; those in flight share one grace period, then the engines stop.
        await asyncio.gather(
            *([self.server.stop(grace)] if self.server is not None else []),
            *([self.http.stop(grace)] if self.http is not None else []),
        )
        if self.health_server is not None:
            await self.health_server.stop(0)
        await asyncio.to_thread(self._shutdown_scorers)

    def _shutdown_scorers(self) -> None:
        """Stop every model's engine; one that fails to stop does not keep the others running."""
        for scorer in self.scorers:
            try:
                scorer.shutdown()
            except Exception:  # noqa: BLE001 - log it and stop the rest
                log.exception("the engine of %s failed to shut down", scorer.cfg.model_dir)
