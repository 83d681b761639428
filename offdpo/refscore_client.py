"""A small client for refscore (other teams, the labeler's on-policy path, tests and benchmarks)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from offdpo import records
from offdpo.v1 import refscore_pb2, refscore_pb2_grpc


def _prompt(prompt) -> records.Prompt:
    if isinstance(prompt, str):
        return records.text_prompt(prompt)
    if not isinstance(prompt, records.Prompt):
        return records.chat_prompt(prompt)
    return prompt


def score_item(prompt, answer: str | Sequence[int], item_id: str = "") -> refscore_pb2.ScoreItem:
    """prompt: a Prompt, a str (plain text) or a list of (role, content) / {"role","content"} messages."""
    item = refscore_pb2.ScoreItem(prompt=_prompt(prompt), item_id=item_id)
    if isinstance(answer, str):
        item.answer_text = answer
    else:
        item.answer_token_ids.ids.extend(answer)
    return item


def _read(path: str | None) -> bytes | None:
    if not path:
        return None
    with open(path, "rb") as f:
        return f.read(1 << 20)


def channel_credentials(
    ca_file: str | None = None, cert_file: str | None = None, key_file: str | None = None
) -> grpc.ChannelCredentials:
    """TLS to refscore: `ca_file` verifies the server (default: the system roots); `cert_file` and
    `key_file` are this client's certificate for mutual TLS."""
    if bool(cert_file) != bool(key_file):
        raise ValueError("mutual TLS needs both a client certificate file and its key file")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca_file), private_key=_read(key_file), certificate_chain=_read(cert_file)
    )


class _PlaintextBearer(grpc.UnaryUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """`authorization: Bearer <token>` on a plaintext channel, which grpc's call credentials are
    never sent over (local development, or a cluster that serves refscore without TLS)."""

    def __init__(self, token: str):
        self._metadata = (("authorization", f"Bearer {token}"),)

    def __repr__(self) -> str:
        return "_PlaintextBearer(***)"

    def _with_token(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return details._replace(metadata=[*(details.metadata or ()), *self._metadata])

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._with_token(details), request_iterator)


def channel_options(target: str, max_message_bytes: int) -> list[tuple[str, object]]:
    """gRPC channel options: message limits, and round robin over every address of a dns:/// target
    (a headless Service resolves to every refscore pod; grpc's default, pick_first, uses one)."""
    options: list[tuple[str, object]] = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]
    if target.startswith("dns:///"):
        options.append(("grpc.lb_policy_name", "round_robin"))
    return options


class RefscoreClient:
    """`credentials`: grpc.ChannelCredentials (see channel_credentials) for TLS, None for plaintext;
    `token`: this team's bearer token, sent as `authorization` metadata on every call (grpc's
    access-token call credentials over TLS)."""

    def __init__(
        self,
        target: str,
        max_message_bytes: int = 64 * 1024 * 1024,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
    ):
        options = channel_options(target, max_message_bytes)
        if credentials is not None:
            if token:
                credentials = grpc.composite_channel_credentials(credentials, grpc.access_token_call_credentials(token))
            self._raw_channel = grpc.secure_channel(target, credentials, options)
            self.channel = self._raw_channel
        else:
            self._raw_channel = grpc.insecure_channel(target, options)
            self.channel = (
                grpc.intercept_channel(self._raw_channel, _PlaintextBearer(token)) if token else self._raw_channel
            )
        self.stub = refscore_pb2_grpc.RefScoreStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def wait_serving(self, timeout_s: float = 300.0) -> None:
        deadline = time.monotonic() + timeout_s
        last = None
        while time.monotonic() < deadline:
            try:
                status = self.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
            except grpc.RpcError as exc:
                last = exc.code().name
            time.sleep(0.5)
        raise TimeoutError(f"refscore did not become SERVING within {timeout_s:.0f} s (last health: {last})")

    def score(
        self, items: Iterable[refscore_pb2.ScoreItem], timeout: float | None = 300.0, expected_fingerprint_id: str = ""
    ) -> refscore_pb2.ScoreResponse:
        return self.stub.Score(
            refscore_pb2.ScoreRequest(items=list(items), expected_fingerprint_id=expected_fingerprint_id),
            timeout=timeout,
        )

    def generate(
        self,
        prompt,
        n: int = 1,
        max_tokens: int = 256,
        *,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        timeout: float | None = 300.0,
        expected_fingerprint_id: str = "",
    ) -> refscore_pb2.GenerateResponse:
        """Sample `n` answers to `prompt` (as for score_item). None leaves a sampling field unset (the
        server's default: temperature 1, top_p 1, no seed); `expected_fingerprint_id` picks the model
        (empty: the server's primary)."""
        request = refscore_pb2.GenerateRequest(
            prompt=_prompt(prompt), n=n, max_tokens=max_tokens, expected_fingerprint_id=expected_fingerprint_id
        )
        if temperature is not None:
            request.temperature = temperature
        if top_p is not None:
            request.top_p = top_p
        if seed is not None:
            request.seed = seed
        return self.stub.Generate(request, timeout=timeout)

    def model_info(self, timeout: float = 30.0, fingerprint_id: str = "") -> refscore_pb2.ModelInfo:
        """The fingerprint and limits of the model `fingerprint_id` (empty: the primary); `.served`
        lists every model the server serves."""
        return self.stub.GetModelInfo(refscore_pb2.GetModelInfoRequest(fingerprint_id=fingerprint_id), timeout=timeout)

    def close(self) -> None:
        self._raw_channel.close()

    def __enter__(self) -> RefscoreClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
