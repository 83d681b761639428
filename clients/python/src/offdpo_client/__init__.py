"""offdpo-client: a small client for refscore, the offdpo reference-model scoring service (offdpo.v1).

    from offdpo_client import RefscoreClient

    with RefscoreClient("refscore.example:50051", credentials=channel_credentials(), token="...") as client:
        result = client.score([([("user", "What is 2+2?")], "4")])
        print(result.items[0].token_logprobs, result.fingerprint.fingerprint_id)

Needs only grpcio and protobuf. offdpo_client.v1 holds the generated modules (refscore_pb2, ...).
"""

from offdpo_client._client import (
    CLIENT_TIMEOUT,
    DEFAULT_MAX_MESSAGE_BYTES,
    RefscoreCallError,
    RefscoreClient,
    channel_credentials,
)
from offdpo_client._retry import NO_RETRY, RetryPolicy, retry_after_s
from offdpo_client._types import (
    Fingerprint,
    GeneratedAnswer,
    GenerateResult,
    ModelInfo,
    ScoredItem,
    ScoreResult,
    chat_prompt,
    score_item,
    text_prompt,
    token_prompt,
)
from offdpo_client._version import __version__

__all__ = [
    "CLIENT_TIMEOUT",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "NO_RETRY",
    "Fingerprint",
    "GenerateResult",
    "GeneratedAnswer",
    "ModelInfo",
    "RefscoreCallError",
    "RefscoreClient",
    "RetryPolicy",
    "ScoreResult",
    "ScoredItem",
    "__version__",
    "channel_credentials",
    "chat_prompt",
    "retry_after_s",
    "score_item",
    "text_prompt",
    "token_prompt",
]
