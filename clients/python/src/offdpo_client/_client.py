"""RefscoreClient: refscore's RPCs with retries, deadlines, TLS, team tokens and load balancing."""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional, TypeVar, Union

import grpc

from offdpo_client._retry import RetryPolicy, delay_before_retry, retry_after_s
from offdpo_client._types import (
    Fingerprint,
    GenerateResult,
    ItemLike,
    ModelInfo,
    PromptLike,
    ScoredItem,
    ScoreResult,
    to_item,
    to_prompt,
)
from offdpo_client.v1 import refscore_pb2, refscore_pb2_grpc

T = TypeVar("T")
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
_SERVING = 1  # grpc.health.v1.HealthCheckResponse.ServingStatus.SERVING
_NO_FINGERPRINT = Fingerprint("", "", "", "", "", "", "", "")


class _ClientTimeout:
    """The default of every method's `timeout`: the client's `timeout_s`."""

    def __repr__(self) -> str:
        return "CLIENT_TIMEOUT"


CLIENT_TIMEOUT = _ClientTimeout()
Timeout = Union[float, None, _ClientTimeout]


class _LocalError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class RefscoreCallError(grpc.RpcError):
    """A call that failed for good (not retryable, out of attempts, or out of time). Still a
    grpc.RpcError with the last attempt's code(), details() and trailing_metadata()."""

    def __init__(self, method: str, error: grpc.RpcError, attempts: int):
        self.method = method
        self.attempts = attempts
        self._code: grpc.StatusCode = (
            error.code() if callable(getattr(error, "code", None)) else grpc.StatusCode.UNKNOWN
        )
        self._details: str = (error.details() if callable(getattr(error, "details", None)) else None) or str(error)
        trailing = getattr(error, "trailing_metadata", None)
        self._trailing = trailing() if callable(trailing) else None
        self.retry_after_s = retry_after_s(error)
        after = f" (after {attempts} attempts)" if attempts > 1 else ""
        super().__init__(f"refscore {method}: {self._code.name}: {self._details}{after}")

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self):  # noqa: ANN201 - grpc's metadata tuple
        return self._trailing


def read_file(path: Optional[str]) -> Optional[bytes]:
    if not path:
        return None
    with open(path, "rb") as f:
        return f.read(1 << 20)


def channel_credentials(
    ca_file: Optional[str] = None, cert_file: Optional[str] = None, key_file: Optional[str] = None
) -> grpc.ChannelCredentials:
    """TLS to refscore: `ca_file` (PEM) verifies the server (default: the system's roots);
    `cert_file` and `key_file` are this client's certificate and key for mutual TLS."""
    if bool(cert_file) != bool(key_file):
        raise ValueError("mutual TLS needs both a client certificate file and its key file")
    return grpc.ssl_channel_credentials(
        root_certificates=read_file(ca_file), private_key=read_file(key_file), certificate_chain=read_file(cert_file)
    )


class _PlaintextBearer(grpc.UnaryUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """`authorization: Bearer <token>` on a plaintext channel, over which gRPC never sends call
    credentials (local development, or a cluster that serves refscore without TLS)."""

    def __init__(self, token: str):
        self._metadata = (("authorization", f"Bearer {token}"),)

    def __repr__(self) -> str:
        return "_PlaintextBearer(***)"

    def _with_token(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return details._replace(metadata=[*(details.metadata or ()), *self._metadata])

    def intercept_unary_unary(self, continuation, details, request):  # noqa: ANN001, ANN201
        return continuation(self._with_token(details), request)

    def intercept_stream_stream(self, continuation, details, request_iterator):  # noqa: ANN001, ANN201
        return continuation(self._with_token(details), request_iterator)


def _health_status(response: bytes) -> int:
    """HealthCheckResponse.status from its wire bytes (field 1, a varint; absent = 0, UNKNOWN), so the
    client needs no grpcio-health-checking."""
    if not response or response[0] != 0x08:
        return 0
    value, shift = 0, 0
    for byte in response[1:]:
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value
        shift += 7
    return 0


def _chunks(items: Sequence[T], size: int) -> list[tuple[int, Sequence[T]]]:
    return [(start, items[start : start + size]) for start in range(0, len(items), size)]


class RefscoreClient:
    """A client for refscore (offdpo.v1.RefScore).

    target: "host:port", or "dns:///refscore-headless.ns.svc.cluster.local:50051" to spread calls over
        every address DNS returns (a Kubernetes headless Service's pods) with `load_balancing`
        ("round_robin", the default; "pick_first" sends everything to one address).
    credentials: TLS (see channel_credentials); None = plaintext (local development only).
    token: your team's bearer token, sent as `authorization` metadata on every call.
    retry: which failures are retried and how (RetryPolicy; offdpo_client.NO_RETRY turns it off).
    timeout_s: default deadline of one call, retries and waits included (None = none); every method
        takes `timeout` to override it.
    tls_server_name: the name the server's certificate must carry, when it differs from the target's.
    """

    def __init__(
        self,
        target: str,
        *,
        credentials: Optional[grpc.ChannelCredentials] = None,
        token: Optional[str] = None,
        retry: RetryPolicy = RetryPolicy(),
        timeout_s: Optional[float] = 300.0,
        load_balancing: str = "round_robin",
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        tls_server_name: Optional[str] = None,
        options: Sequence[tuple[str, object]] = (),
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.target = target
        self.retry = retry
        self.timeout_s = timeout_s
        self._sleep = sleep
        self._rng = random.Random()
        self._rng_lock = threading.Lock()
        channel_options: list[tuple[str, object]] = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.service_config", json.dumps({"loadBalancingConfig": [{load_balancing: {}}]})),
        ]
        if tls_server_name:
            channel_options.append(("grpc.ssl_target_name_override", tls_server_name))
        channel_options.extend(options)
        if credentials is not None:
            if token:
                credentials = grpc.composite_channel_credentials(credentials, grpc.access_token_call_credentials(token))
            self._raw_channel = grpc.secure_channel(target, credentials, channel_options)
            self.channel: grpc.Channel = self._raw_channel
        else:
            self._raw_channel = grpc.insecure_channel(target, channel_options)
            self.channel = (
                grpc.intercept_channel(self._raw_channel, _PlaintextBearer(token)) if token else self._raw_channel
            )
        self.stub = refscore_pb2_grpc.RefScoreStub(self.channel)
        self._health_check = self.channel.unary_unary(HEALTH_CHECK)
        self._model_info: Optional[ModelInfo] = None

    # -- retries -------------------------------------------------------------------------------
    def _deadline(self, timeout: Optional[float]) -> Optional[float]:
        return None if timeout is None else time.monotonic() + timeout

    @staticmethod
    def _remaining(deadline: Optional[float]) -> Optional[float]:
        return None if deadline is None else max(0.0, deadline - time.monotonic())

    def _delay(self, error: grpc.RpcError, attempt: int, deadline: Optional[float]) -> Optional[float]:
        with self._rng_lock:
            return delay_before_retry(self.retry, error, attempt, self._remaining(deadline), self._rng)

    def _unary(self, method: str, call: Callable[..., T], request: object, timeout: Optional[float]) -> T:
        deadline = self._deadline(timeout)
        attempt = 0
        while True:
            attempt += 1
            try:
                return call(request, timeout=self._remaining(deadline))
            except grpc.RpcError as exc:
                delay = self._delay(exc, attempt, deadline)
                if delay is None:
                    raise RefscoreCallError(method, exc, attempt) from exc
                self._sleep(delay)

    def _timeout(self, timeout: Timeout) -> Optional[float]:
        return self.timeout_s if isinstance(timeout, _ClientTimeout) else timeout

    # -- the RPCs --------------------------------------------------------------------------------
    def score_raw(
        self, items: Iterable[ItemLike], *, timeout: Timeout = CLIENT_TIMEOUT, expected_fingerprint_id: str = ""
    ) -> refscore_pb2.ScoreResponse:
        """Score as the wire message (refscore_pb2.ScoreResponse); `score` gives typed results."""
        request = refscore_pb2.ScoreRequest(
            items=[to_item(i) for i in items], expected_fingerprint_id=expected_fingerprint_id
        )
        return self._unary("Score", self.stub.Score, request, self._timeout(timeout))

    def score(
        self, items: Iterable[ItemLike], *, timeout: Timeout = CLIENT_TIMEOUT, expected_fingerprint_id: str = ""
    ) -> ScoreResult:
        """Scores one request's items: (prompt, answer) pairs or ScoreItems (see score_item). At most
        ModelInfo.max_items_per_request items; score_many splits larger jobs. `expected_fingerprint_id`
        picks the model (empty: the server's primary); FAILED_PRECONDITION if the server lacks it."""
        return ScoreResult.from_proto(
            self.score_raw(items, timeout=timeout, expected_fingerprint_id=expected_fingerprint_id)
        )

    def generate(
        self,
        prompt: PromptLike,
        n: int = 1,
        max_tokens: int = 256,
        *,
        temperature: Optional[float] = None,
        top_p: Optional[float] = None,
        seed: Optional[int] = None,
        timeout: Timeout = CLIENT_TIMEOUT,
        expected_fingerprint_id: str = "",
    ) -> GenerateResult:
        """Samples `n` answers to `prompt`. None leaves a sampling field to the server's default
        (temperature 1, top_p 1, no seed)."""
        request = refscore_pb2.GenerateRequest(
            prompt=to_prompt(prompt), n=n, max_tokens=max_tokens, expected_fingerprint_id=expected_fingerprint_id
        )
        if temperature is not None:
            request.temperature = temperature
        if top_p is not None:
            request.top_p = top_p
        if seed is not None:
            request.seed = seed
        return GenerateResult.from_proto(self.generate_raw(request, timeout=timeout))

    def generate_raw(
        self, request: refscore_pb2.GenerateRequest, *, timeout: Timeout = CLIENT_TIMEOUT
    ) -> refscore_pb2.GenerateResponse:
        """Generate with the wire messages; `generate` builds the request and gives typed results."""
        return self._unary("Generate", self.stub.Generate, request, self._timeout(timeout))

    def model_info(self, *, fingerprint_id: str = "", timeout: Timeout = 30.0) -> ModelInfo:
        """The fingerprint and limits of the model `fingerprint_id` (empty: the primary)."""
        return ModelInfo.from_proto(self.model_info_raw(fingerprint_id=fingerprint_id, timeout=timeout))

    def model_info_raw(self, *, fingerprint_id: str = "", timeout: Timeout = 30.0) -> refscore_pb2.ModelInfo:
        """GetModelInfo as the wire message (refscore_pb2.ModelInfo, with `.served`)."""
        request = refscore_pb2.GetModelInfoRequest(fingerprint_id=fingerprint_id)
        return self._unary("GetModelInfo", self.stub.GetModelInfo, request, self._timeout(timeout))

    # -- batching and streaming ------------------------------------------------------------------
    def _batch_size(self, batch_size: Optional[int]) -> int:
        if batch_size is not None:
            if batch_size < 1:
                raise ValueError(f"batch_size must be >= 1, got {batch_size}")
            return batch_size
        if self._model_info is None:
            self._model_info = self.model_info()
        return max(1, self._model_info.max_items_per_request)

    def score_many(
        self,
        items: Iterable[ItemLike],
        *,
        batch_size: Optional[int] = None,
        max_in_flight: int = 4,
        timeout: Timeout = CLIENT_TIMEOUT,
        expected_fingerprint_id: str = "",
    ) -> list[ScoredItem]:
        """Scores any number of items in Score calls of `batch_size` (default: the server's
        max_items_per_request), up to `max_in_flight` at once; results in the items' order, each with
        its index in `items`. `timeout` applies to each call. Every batch is scored by one model:
        after the first, the rest name its fingerprint_id, so a fleet mid-rollout cannot mix two."""
        work = [to_item(i) for i in items]
        if not work:
            return []
        batches = _chunks(work, self._batch_size(batch_size))
        start, first_items = batches[0]
        first = ScoreResult.from_proto(
            self.score_raw(first_items, timeout=timeout, expected_fingerprint_id=expected_fingerprint_id), start
        )
        pinned = expected_fingerprint_id or first.fingerprint.fingerprint_id

        def one(batch: tuple[int, Sequence[refscore_pb2.ScoreItem]]) -> ScoreResult:
            offset, chunk = batch
            raw = self.score_raw(chunk, timeout=timeout, expected_fingerprint_id=pinned)
            return ScoreResult.from_proto(raw, offset)

        results = [first]
        if len(batches) > 1:
            with ThreadPoolExecutor(max_workers=max(1, max_in_flight), thread_name_prefix="refscore") as pool:
                results.extend(pool.map(one, batches[1:]))
        return sorted((item for result in results for item in result.items), key=lambda item: item.index)

    def score_stream(
        self,
        items: Iterable[ItemLike],
        *,
        batch_size: Optional[int] = None,
        timeout: Optional[float] = None,
        expected_fingerprint_id: str = "",
    ) -> Iterator[ScoredItem]:
        """Scores many items on one ScoreStream call (requests of `batch_size` items), yielding each
        result as the server finishes it: not in order, each with its index in `items`. When the
        stream fails with a retryable error it is reopened with the requests not yet complete (items
        already yielded are not yielded again); every item is scored by the model that scored the
        first. `timeout`: the deadline of the whole job (default: none)."""
        work = [to_item(i) for i in items]
        if not work:
            return
        batches = _chunks(work, self._batch_size(batch_size))
        deadline = self._deadline(timeout)
        done: set[int] = set()
        pinned = expected_fingerprint_id
        attempt = 0
        while True:
            pending = [(s, chunk) for s, chunk in batches if any(s + i not in done for i in range(len(chunk)))]
            if not pending:
                return
            requests = [refscore_pb2.ScoreRequest(items=chunk, expected_fingerprint_id=pinned) for _, chunk in pending]
            attempt += 1
            call = self.stub.ScoreStream(iter(requests), timeout=self._remaining(deadline))
            fingerprint = _NO_FINGERPRINT
            try:
                for result in call:
                    if result.HasField("fingerprint"):
                        fingerprint = Fingerprint.from_proto(result.fingerprint)
                        pinned = pinned or fingerprint.fingerprint_id
                    index = pending[result.request_index][0] + result.item.item_index
                    if index in done:
                        continue
                    done.add(index)
                    attempt = 0  # progress: the next failure starts a fresh series of retries
                    yield ScoredItem.from_proto(result.item, fingerprint, index)
            except grpc.RpcError as exc:
                delay = self._delay(exc, max(attempt, 1), deadline)
                if delay is None:
                    raise RefscoreCallError("ScoreStream", exc, max(attempt, 1)) from exc
                self._sleep(delay)
                continue
            finally:
                call.cancel()  # a no-op once the stream ended; stops it when the caller stops iterating
            missing = len(work) - len(done)
            if missing:
                raise RefscoreCallError(
                    "ScoreStream",
                    _LocalError(grpc.StatusCode.INTERNAL, f"the stream ended with {missing} items unscored"),
                    attempt,
                )

    # -- readiness and lifetime --------------------------------------------------------------------
    def wait_serving(self, timeout_s: float = 300.0) -> None:
        """Wait until the server's health check says SERVING (the model is loaded)."""
        deadline = time.monotonic() + timeout_s
        last = "no answer"
        while time.monotonic() < deadline:
            try:
                status = _health_status(self._health_check(b"", timeout=5))
                if status == _SERVING:
                    return
                last = {0: "UNKNOWN", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}.get(status, str(status))
            except grpc.RpcError as exc:
                last = exc.code().name
            time.sleep(0.5)
        raise TimeoutError(f"refscore at {self.target} did not become SERVING within {timeout_s:.0f} s (last: {last})")

    def close(self) -> None:
        self._raw_channel.close()

    def __enter__(self) -> RefscoreClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
