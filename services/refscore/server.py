"""The refscore gRPC server (grpc.aio): Score, ScoreStream, Generate, GetModelInfo.

- Health (grpc.health.v1) says NOT_SERVING until the engine is loaded, and again while draining.
- Reflection lists offdpo.v1.RefScore, so grpcurl-style clients need no stubs.
- Requests are decoded here, not by grpc: malformed bytes and unknown fields become
  INVALID_ARGUMENT with a message, instead of grpc's generic INTERNAL.
- Domain errors (scorer.RefscoreError subclasses) are mapped to status codes in one interceptor.
- Message sizes are limited explicitly; oversized messages get RESOURCE_EXHAUSTED from grpc itself.
- SIGTERM: health goes NOT_SERVING, in-flight RPCs get `grace_s` to finish, then the engine stops.
- Security (security.py): TLS/mTLS or explicit plaintext; every RefScore RPC is authenticated and
  authorised by one interceptor (health and reflection stay open); per-team concurrency and
  tokens-per-minute quotas; an optional plaintext health-only port for kubelet probes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from offdpo.records import RecordError, decode
from offdpo.v1 import refscore_pb2
from services.refscore import metrics, security
from services.refscore.config import RefscoreConfig
from services.refscore.scorer import (
    DeadlineExceeded,
    FingerprintMismatch,
    InvalidArgument,
    NotReady,
    RefscoreError,
    Scorer,
    TooLarge,
)

log = logging.getLogger(__name__)

SERVICE_NAME = refscore_pb2.DESCRIPTOR.services_by_name["RefScore"].full_name

_STATUS = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    TooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    NotReady: grpc.StatusCode.UNAVAILABLE,
    FingerprintMismatch: grpc.StatusCode.FAILED_PRECONDITION,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    security.QuotaExceeded: grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def status_for(exc: RefscoreError) -> grpc.StatusCode:
    for cls, code in _STATUS.items():
        if isinstance(exc, cls):
            return code
    return grpc.StatusCode.INTERNAL


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    """Turns domain errors into status codes with their message, for every method, in one place."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method.rsplit("/", 1)[-1]

        async def abort(context, exc: RefscoreError):
            code = status_for(exc)
            metrics.RPC_ERRORS.labels(method, code.name).inc()
            caller = security.current_caller()
            metrics.CALLER_ERRORS.labels(caller.name if caller else security.UNAUTHENTICATED_CALLER, code.name).inc()
            trailing = exc.trailing_metadata() if isinstance(exc, security.QuotaExceeded) else ()
            await context.abort(code, str(exc), trailing)

        if handler.unary_unary:
            inner = handler.unary_unary

            async def unary_unary(request, context):
                try:
                    return await inner(request, context)
                except RefscoreError as exc:
                    await abort(context, exc)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary, handler.request_deserializer, handler.response_serializer
            )
        if handler.stream_stream:
            inner_stream = handler.stream_stream

            async def stream_stream(request_iterator, context):
                try:
                    async for response in inner_stream(request_iterator, context):
                        yield response
                except RefscoreError as exc:
                    await abort(context, exc)

            return grpc.stream_stream_rpc_method_handler(
                stream_stream, handler.request_deserializer, handler.response_serializer
            )
        return handler


def _decode(message_type, data: bytes, max_bytes: int, what: str):
    if not data:
        return message_type()  # an empty message is valid protobuf; the fields are checked later
    try:
        return decode(message_type, data, max_bytes, what)
    except RecordError as exc:
        raise InvalidArgument(str(exc)) from None


def _deadline(context) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class RefScoreService:
    def __init__(self, scorer: Scorer, cfg: RefscoreConfig, quotas: security.Quotas | None = None):
        self.scorer = scorer
        self.cfg = cfg
        self.quotas = quotas or security.Quotas()

    def _charge(self, tokens: int) -> str:
        """Charge the caller's tokens-per-minute quota; returns the caller's name for the fair queue."""
        caller = security.current_caller() or security.ANONYMOUS
        self.quotas.charge(caller, tokens)
        return caller.name

    def _fingerprint_check(self, request) -> None:
        want = request.expected_fingerprint_id
        if want and want != self.scorer.fingerprint.fingerprint_id:
            raise FingerprintMismatch(
                f"expected_fingerprint_id {want!r} does not match this server's "
                f"{self.scorer.fingerprint.fingerprint_id!r} ({self.scorer.fingerprint.model_id})"
            )

    async def _score(self, request, context) -> list[refscore_pb2.ScoredItem]:
        self.scorer.check_ready()
        self._fingerprint_check(request)
        prepared = self.scorer.prepare_items(request.items)
        caller = self._charge(sum(len(p.prompt_ids) + len(p.answer_ids) for p in prepared))
        future = self.scorer.submit_score(prepared, _deadline(context), caller=caller)
        try:
            results = await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            future.cancel()  # the caller went away: do not compute for nobody
            raise
        out = []
        for i, (item, prep, logps) in enumerate(zip(request.items, prepared, results)):
            out.append(
                refscore_pb2.ScoredItem(
                    item_index=i,
                    item_id=item.item_id,
                    prompt_token_ids=prep.prompt_ids,
                    answer_token_ids=prep.answer_ids,
                    token_logprobs=logps,
                    logprob_sum=float(sum(logps)),
                )
            )
        return out

    async def Score(self, raw: bytes, context):
        request = _decode(refscore_pb2.ScoreRequest, raw, self.cfg.max_message_bytes, "ScoreRequest")
        items = await self._score(request, context)
        metrics.RPC_ITEMS.labels("Score").inc(len(items))
        return refscore_pb2.ScoreResponse(items=items, fingerprint=self.scorer.fingerprint)

    async def ScoreStream(self, raw_iterator, context):
        index = 0
        async for raw in raw_iterator:
            request = _decode(
                refscore_pb2.ScoreRequest, raw, self.cfg.max_message_bytes, f"ScoreStream request {index}"
            )
            try:
                items = await self._score(request, context)
            except RefscoreError as exc:
                # Same error, but say which request on the stream it was.
                raise type(exc)(f"request {index}: {exc}") from None
            for n, item in enumerate(items):
                result = refscore_pb2.ScoreStreamResult(request_index=index, item=item)
                if index == 0 and n == 0:
                    result.fingerprint.CopyFrom(self.scorer.fingerprint)
                yield result
            metrics.RPC_ITEMS.labels("ScoreStream").inc(len(items))
            index += 1

    async def Generate(self, raw: bytes, context):
        request = _decode(refscore_pb2.GenerateRequest, raw, self.cfg.max_message_bytes, "GenerateRequest")
        self.scorer.check_ready()
        boundary = self.scorer.boundary
        try:
            prompt = boundary.encode_prompt(request.prompt)
        except ValueError as exc:
            raise InvalidArgument(f"prompt: {exc}") from None
        n = request.n or 1
        max_tokens = request.max_tokens or 256
        if n < 1 or n > self.cfg.max_generate_n:
            raise InvalidArgument(f"n={n} must be between 1 and {self.cfg.max_generate_n}")
        if max_tokens < 1 or max_tokens > self.cfg.max_generate_tokens:
            raise InvalidArgument(f"max_tokens={max_tokens} must be between 1 and {self.cfg.max_generate_tokens}")
        if len(prompt.ids) + max_tokens > self.scorer.max_model_len:
            raise InvalidArgument(
                f"prompt ({len(prompt.ids)} tokens) + max_tokens ({max_tokens}) exceeds the "
                f"model's context of {self.scorer.max_model_len} tokens"
            )
        temperature = request.temperature if request.HasField("temperature") else 1.0
        top_p = request.top_p if request.HasField("top_p") else 1.0
        if temperature < 0 or not (0 < top_p <= 1):
            raise InvalidArgument(f"temperature={temperature} must be >= 0 and top_p={top_p} in (0, 1]")
        caller = self._charge(len(prompt.ids) + n * max_tokens)  # the most it can cost
        future = self.scorer.submit_generate(
            prompt.ids,
            _deadline(context),
            caller=caller,
            n=n,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=request.seed if request.HasField("seed") else None,
        )
        answers = await asyncio.wrap_future(future)
        return refscore_pb2.GenerateResponse(
            prompt_token_ids=prompt.ids,
            fingerprint=self.scorer.fingerprint,
            answers=[
                refscore_pb2.GeneratedAnswer(
                    text=boundary.decode(a.token_ids),
                    token_ids=a.token_ids,
                    token_logprobs=a.logprobs,
                    logprob_sum=float(sum(a.logprobs)),
                    finish_reason=a.finish_reason,
                )
                for a in answers
            ],
        )

    async def GetModelInfo(self, raw: bytes, context):
        _decode(refscore_pb2.GetModelInfoRequest, raw, 1024, "GetModelInfoRequest")
        self.scorer.check_ready()
        tok = self.scorer.boundary.tok
        return refscore_pb2.ModelInfo(
            fingerprint=self.scorer.fingerprint,
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

    def __init__(self, cfg: RefscoreConfig, scorer: Scorer | None = None):
        self.cfg = cfg
        self.scorer = scorer or Scorer(cfg)
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.health_server: grpc.aio.Server | None = None
        self.port: int | None = None
        self.health_port: int | None = None
        self.quotas = security.Quotas()

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
        credentials = security.server_credentials(self.cfg)
        store = security.token_store(self.cfg)
        interceptors = [security.AuthInterceptor(store, self.quotas, self.model_id), ErrorMappingInterceptor()]
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
            # kubelet's gRPC probes speak neither TLS nor tokens: health (and nothing else) in plaintext.
            self.health_server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_server)
            self.health_port = self.health_server.add_insecure_port(f"{self.cfg.host}:{self.cfg.health_port}")
            if not self.health_port:
                raise OSError(f"cannot listen on {self.cfg.host}:{self.cfg.health_port} (OFFDPO_REFSCORE_HEALTH_PORT)")
            await self.health_server.start()
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
