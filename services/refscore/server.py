"""The refscore gRPC server (grpc.aio): Score, ScoreStream, Generate, GetModelInfo.

- Health (grpc.health.v1) says NOT_SERVING until the engine is loaded, and again while draining.
- Reflection lists offdpo.v1.RefScore, so grpcurl-style clients need no stubs.
- Requests are decoded here, not by grpc: malformed bytes and unknown fields become
  INVALID_ARGUMENT with a message, instead of grpc's generic INTERNAL.
- Domain errors (`offdpo.errors` classes) answer with their own status code, in one interceptor.
- Message sizes are limited explicitly; oversized messages get RESOURCE_EXHAUSTED from grpc itself.
- SIGTERM: health goes NOT_SERVING, in-flight RPCs get `grace_s` to finish, then the engine stops.
- Security (the `security` package over the shared `offdpo.grpc_auth`): TLS/mTLS (certificates reloaded
  without a restart) or explicit plaintext; every RefScore RPC is authenticated (token or client
  certificate) and authorised by one interceptor before its body is read (health and reflection stay
  open); per-team concurrency and tokens-per-minute quotas split over OFFDPO_REFSCORE_REPLICAS; an
  optional plaintext health-only port for kubelet probes.
- A caller's prompts are tokenised with a request-local cache, never the shared one: nothing is cached
  for a caller that is then refused, and no caller can time another's prompts through the cache.
- NotReady answers UNAVAILABLE with a generic message; its detail (e.g. the engine's load error) is logged.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import grpc
from google.protobuf.message import Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from offdpo.errors import OffdpoError
from offdpo.grpc_auth import QuotaExceeded, Quotas, method_name, wrap_handler
from offdpo.records import decode
from offdpo.v1 import refscore_pb2
from services.refscore import metrics, security
from services.refscore.config import RefscoreConfig, RefscoreQuotaConfig
from services.refscore.errors import (
    FingerprintMismatch,
    InvalidArgument,
    NotReady,
    RefscoreError,
    TokenizationError,
    TooLong,
)
from services.refscore.scorer import GenerateParams, Scorer
from services.refscore.tokenization import request_local_cache

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


class RefScoreService:
    def __init__(self, scorer: Scorer, cfg: RefscoreConfig, quotas: Quotas | None = None):
        self.scorer = scorer
        self.cfg = cfg
        self.quotas = quotas or security.Quotas()

    def _charge(self, tokens: int) -> str:
        """Charge the caller's tokens-per-minute quota; returns the caller's name for the fair queue."""
        caller = security.current_caller() or security.ANONYMOUS
        self.quotas.charge(caller, tokens)
        return caller.name

    def _check_quota(self) -> None:
        """Refuse a caller whose tokens-per-minute bucket is empty before any tokenising is done."""
        self.quotas.check(security.current_caller() or security.ANONYMOUS)

    async def _score(
        self, request: refscore_pb2.ScoreRequest, context: grpc.aio.ServicerContext
    ) -> list[refscore_pb2.ScoredItem]:
        fingerprint = self.scorer.model().fingerprint
        want = request.expected_fingerprint_id
        if want and want != fingerprint.fingerprint_id:
            raise FingerprintMismatch(
                f"expected_fingerprint_id {want!r} does not match this server's "
                f"{fingerprint.fingerprint_id!r} ({fingerprint.model_id})"
            )
        self._check_quota()
        with request_local_cache():  # nothing cached for a caller the charge below refuses
            prepared = self.scorer.prepare_items(request.items)
        caller = self._charge(sum(len(p.prompt_ids) + len(p.answer_ids) for p in prepared))
        results = await _result(self.scorer.submit_score(prepared, _deadline(context), caller=caller))
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
        ]

    async def Score(self, raw: bytes, context: grpc.aio.ServicerContext) -> refscore_pb2.ScoreResponse:
        request = _decode(refscore_pb2.ScoreRequest, raw, self.cfg.max_message_bytes, "ScoreRequest")
        items = await self._score(request, context)
        metrics.RPC_ITEMS.labels("Score").inc(len(items))
        return refscore_pb2.ScoreResponse(items=items, fingerprint=self.scorer.model().fingerprint)

    async def ScoreStream(
        self, raw_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[refscore_pb2.ScoreStreamResult]:
        index = 0
        async for raw in raw_iterator:
            request = _decode(
                refscore_pb2.ScoreRequest, raw, self.cfg.max_message_bytes, f"ScoreStream request {index}"
            )
            try:
                items = await self._score(request, context)
            except RefscoreError as exc:
                raise exc.at(f"request {index}") from None  # say which request on the stream it was
            except QuotaExceeded as exc:
                raise QuotaExceeded(f"request {index}: {exc}", exc.retry_after_s) from None
            for n, item in enumerate(items):
                result = refscore_pb2.ScoreStreamResult(request_index=index, item=item)
                if index == 0 and n == 0:
                    result.fingerprint.CopyFrom(self.scorer.model().fingerprint)
                yield result
            metrics.RPC_ITEMS.labels("ScoreStream").inc(len(items))
            index += 1

    def _generate_params(self, request: refscore_pb2.GenerateRequest, prompt_tokens: int) -> GenerateParams:
        n = request.n or 1
        max_tokens = request.max_tokens or 256
        if n < 1 or n > self.cfg.max_generate_n:
            raise InvalidArgument(f"n={n} must be between 1 and {self.cfg.max_generate_n}")
        if max_tokens < 1 or max_tokens > self.cfg.max_generate_tokens:
            raise InvalidArgument(f"max_tokens={max_tokens} must be between 1 and {self.cfg.max_generate_tokens}")
        if prompt_tokens + max_tokens > self.scorer.max_model_len:
            raise TooLong(
                f"prompt ({prompt_tokens} tokens) + max_tokens ({max_tokens}) exceeds the "
                f"model's context of {self.scorer.max_model_len} tokens"
            )
        temperature = request.temperature if request.HasField("temperature") else 1.0
        top_p = request.top_p if request.HasField("top_p") else 1.0
        if temperature < 0 or not (0 < top_p <= 1):
            raise InvalidArgument(f"temperature={temperature} must be >= 0 and top_p={top_p} in (0, 1]")
        seed = request.seed if request.HasField("seed") else None
        return GenerateParams(n=n, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)

    async def Generate(self, raw: bytes, context: grpc.aio.ServicerContext) -> refscore_pb2.GenerateResponse:
        request = _decode(refscore_pb2.GenerateRequest, raw, self.cfg.max_message_bytes, "GenerateRequest")
        model = self.scorer.model()
        self._check_quota()
        try:
            with request_local_cache():
                prompt = model.boundary.encode_prompt(request.prompt)
        except TokenizationError as exc:
            raise exc.at("prompt") from None
        params = self._generate_params(request, len(prompt.ids))
        caller = self._charge(len(prompt.ids) + params.n * params.max_tokens)  # the most it can cost
        answers = await _result(self.scorer.submit_generate(prompt.ids, params, _deadline(context), caller=caller))
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
        _decode(refscore_pb2.GetModelInfoRequest, raw, 1024, "GetModelInfoRequest")
        model = self.scorer.model()
        tok = model.boundary.tok
        return refscore_pb2.ModelInfo(
            fingerprint=model.fingerprint,
            max_model_len=self.scorer.max_model_len,
            max_items_per_request=self.cfg.max_items_per_request,
            max_tokens_per_request=self.cfg.max_tokens_per_request,
            max_message_bytes=self.cfg.max_message_bytes,
            bos_token_id=-1 if tok.bos_token_id is None else tok.bos_token_id,
            eos_token_id=-1 if tok.eos_token_id is None else tok.eos_token_id,
            engine_settings=self.scorer.engine_settings,
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
    """The gRPC server around a Scorer; the engine loads in the background after the port opens."""

    def __init__(self, cfg: RefscoreConfig, scorer: Scorer | None = None, replicas: int | None = None):
        """`replicas`: how many replicas share each team's quota (default OFFDPO_REFSCORE_REPLICAS)."""
        self.cfg = cfg
        self.scorer = scorer or Scorer(cfg)
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.health_server: grpc.aio.Server | None = None
        self.port: int | None = None
        self.health_port: int | None = None
        self.quotas = security.Quotas(RefscoreQuotaConfig.from_env().replicas if replicas is None else replicas)

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
        interceptors = [security.AuthInterceptor(secured.store, self.quotas, self.model_id), ErrorMappingInterceptor()]
        self.server = grpc.aio.server(interceptors=interceptors, options=options)
        self.server.add_generic_rpc_handlers([RefScoreService(self.scorer, self.cfg, self.quotas).generic_handler()])
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
        await self.server.start()
        log.info(
            "refscore listening on %s:%d (%s%s; engine loading)%s",
            self.cfg.host,
            self.port,
            "TLS" if credentials is not None else "PLAINTEXT",
            ", mTLS" if self.cfg.tls_client_ca and credentials is not None else "",
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
        if not self.scorer.ready.is_set():
            await asyncio.to_thread(self.scorer.load)
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("refscore SERVING")

    async def stop(self, grace_s: float | None = None) -> None:
        grace = self.cfg.grace_s if grace_s is None else grace_s
        await self.health.enter_graceful_shutdown()  # probes see NOT_SERVING; load balancers drain us
        if self.server is not None:
            await self.server.stop(grace)
        if self.health_server is not None:
            await self.health_server.stop(0)
        await asyncio.to_thread(self.scorer.shutdown)
