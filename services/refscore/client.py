"""A small client for refscore (other teams, the labeler's on-policy path, tests and benchmarks)."""
from __future__ import annotations

import time
from typing import Iterable, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from offdpo import records
from offdpo.v1 import refscore_pb2, refscore_pb2_grpc


def score_item(prompt, answer: str | Sequence[int], item_id: str = "") -> refscore_pb2.ScoreItem:
    """prompt: a Prompt, a str (plain text) or a list of (role, content) / {"role","content"} messages."""
    if isinstance(prompt, str):
        prompt = records.text_prompt(prompt)
    elif not isinstance(prompt, records.Prompt):
        prompt = records.chat_prompt(prompt)
    item = refscore_pb2.ScoreItem(prompt=prompt, item_id=item_id)
    if isinstance(answer, str):
        item.answer_text = answer
    else:
        item.answer_token_ids.ids.extend(answer)
    return item


class RefscoreClient:
    def __init__(self, target: str, max_message_bytes: int = 64 * 1024 * 1024, credentials=None):
        options = [("grpc.max_receive_message_length", max_message_bytes),
                   ("grpc.max_send_message_length", max_message_bytes)]
        self.channel = (grpc.secure_channel(target, credentials, options) if credentials
                        else grpc.insecure_channel(target, options))
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

    def score(self, items: Iterable[refscore_pb2.ScoreItem], timeout: float | None = 300.0,
              expected_fingerprint_id: str = "") -> refscore_pb2.ScoreResponse:
        return self.stub.Score(refscore_pb2.ScoreRequest(items=list(items),
                                                         expected_fingerprint_id=expected_fingerprint_id),
                               timeout=timeout)

    def model_info(self, timeout: float = 30.0) -> refscore_pb2.ModelInfo:
        return self.stub.GetModelInfo(refscore_pb2.GetModelInfoRequest(), timeout=timeout)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
