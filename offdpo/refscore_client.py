"""refscore from inside offdpo (the labeler's on-policy path, the local pipeline, tests and benchmarks).

A thin layer over the `offdpo-client` distribution (clients/python), which other teams install on
its own: the channel, TLS, tokens, load balancing, deadlines and retries are that package's, so
there is one client to keep right. What this layer adds is the shape offdpo's own code uses: the wire
messages (refscore_pb2.ScoreResponse, GenerateResponse, ModelInfo) rather than the typed results,
and no retries by default, because offdpo's callers already retry (the labeler's generator, the
local pipeline's waits) or test the server's answers (quota refusals must arrive as they are).

Both packages hold generated code of the same protos/offdpo/v1 files; protobuf's descriptor pool
registers identical files once, so their message classes are the same classes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import grpc
import offdpo_client
from grpc_health.v1 import health_pb2_grpc
from offdpo_client import NO_RETRY, RefscoreCallError, RetryPolicy, channel_credentials

from offdpo import records
from offdpo.v1 import refscore_pb2

__all__ = [
    "NO_RETRY",
    "RefscoreCallError",
    "RefscoreClient",
    "RetryPolicy",
    "channel_credentials",
    "score_item",
]


def _prompt(prompt) -> records.Prompt:
    if isinstance(prompt, str):
        return records.text_prompt(prompt)
    if not isinstance(prompt, records.Prompt):
        return records.chat_prompt(prompt)
    return prompt


def score_item(prompt, answer: str | Sequence[int], item_id: str = "") -> refscore_pb2.ScoreItem:
    """prompt: a Prompt, a str (plain text) or a list of (role, content) / {"role","content"} messages."""
    return offdpo_client.score_item(_prompt(prompt), answer, item_id)


class RefscoreClient:
    """`credentials`: grpc.ChannelCredentials (see channel_credentials) for TLS, None for plaintext;
    `token`: this team's bearer token, sent as `authorization` metadata on every call; `retry`:
    offdpo_client's RetryPolicy (default none, see the module docstring). A `dns:///` target is
    spread round robin over every address (a headless Service's pods)."""

    def __init__(
        self,
        target: str,
        max_message_bytes: int = 64 * 1024 * 1024,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
        retry: RetryPolicy = NO_RETRY,
    ):
        self.client = offdpo_client.RefscoreClient(
            target,
            credentials=credentials,
            token=token,
            retry=retry,
            timeout_s=None,
            max_message_bytes=max_message_bytes,
        )
        self.channel = self.client.channel
        self.stub = self.client.stub
        self.health = health_pb2_grpc.HealthStub(self.channel)  # grpc.health.v1 (offdpo's callers probe it)

    def wait_serving(self, timeout_s: float = 300.0) -> None:
        self.client.wait_serving(timeout_s)

    def score(
        self, items: Iterable[refscore_pb2.ScoreItem], timeout: float | None = 300.0, expected_fingerprint_id: str = ""
    ) -> refscore_pb2.ScoreResponse:
        return self.client.score_raw(items, timeout=timeout, expected_fingerprint_id=expected_fingerprint_id)

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
        return self.client.generate_raw(request, timeout=timeout)

    def model_info(self, timeout: float = 30.0, fingerprint_id: str = "") -> refscore_pb2.ModelInfo:
        """The fingerprint and limits of the model `fingerprint_id` (empty: the primary); `.served`
        lists every model the server serves."""
        return self.client.model_info_raw(fingerprint_id=fingerprint_id, timeout=timeout)

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> RefscoreClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
