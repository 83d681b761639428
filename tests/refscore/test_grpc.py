"""The gRPC API through real channels: results, every error case, health, reflection, draining."""

import asyncio
import signal
import threading
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from prometheus_client.parser import text_string_to_metric_families

from localdev.process import free_port, wait_until
from offdpo import records
from offdpo.refscore_client import RefscoreClient, score_item
from offdpo.v1 import refscore_pb2, refscore_pb2_grpc
from services.refscore.config import RefscoreConfig
from services.refscore.server import RefscoreServer

from .conftest import start_refscore

pytestmark = pytest.mark.vllm


def _code(call):
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def _raw_score(client, payload: bytes, timeout=30):
    method = client.channel.unary_unary(
        "/offdpo.v1.RefScore/Score",
        request_serializer=None,
        response_deserializer=refscore_pb2.ScoreResponse.FromString,
    )
    return method(payload, timeout=timeout)


def test_score_returns_ids_logprobs_and_fingerprint(vllm_client):
    resp = vllm_client.score(
        [score_item([("user", "hi")], "hello there", item_id="a"), score_item("plain prompt", [5, 6, 7], item_id="b")]
    )
    assert [i.item_id for i in resp.items] == ["a", "b"]
    assert [i.item_index for i in resp.items] == [0, 1]
    assert list(resp.items[1].answer_token_ids) == [5, 6, 7]
    for item in resp.items:
        assert len(item.token_logprobs) == len(item.answer_token_ids)
        assert item.logprob_sum == pytest.approx(sum(item.token_logprobs), abs=1e-4)
        assert all(lp <= 0 for lp in item.token_logprobs)
    fp = resp.fingerprint
    assert fp.engine == "vllm" and fp.dtype == "float32" and fp.weights_hash and fp.tokenizer_hash
    assert fp.chat_template_hash and fp.fingerprint_id == records.fingerprint_id(fp)


def test_invalid_items_name_the_item(vllm_client):
    ok = score_item([("user", "hi")], "fine")
    code, msg = _code(lambda: vllm_client.score([]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "no items" in msg
    code, msg = _code(lambda: vllm_client.score([ok, refscore_pb2.ScoreItem(answer_text="x")]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "items[1]" in msg and "prompt is missing" in msg
    code, msg = _code(lambda: vllm_client.score([ok, ok, refscore_pb2.ScoreItem(prompt=records.text_prompt("q"))]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "items[2]" in msg and "answer is missing" in msg
    code, msg = _code(lambda: vllm_client.score([score_item("q", [1, 2, 10**7])]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "items[0]" in msg and "outside the vocabulary" in msg
    long_answer = " ".join(["number"] * 2000)
    code, msg = _code(lambda: vllm_client.score([ok, score_item("q", long_answer)]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "items[1]" in msg and "exceeds the model's context" in msg


def test_malformed_bytes_and_unknown_fields_are_invalid_argument(vllm_client):
    code, msg = _code(lambda: _raw_score(vllm_client, b"\xff\xff\xff\xff\x0f"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "not a valid offdpo.v1.ScoreRequest" in msg
    good = refscore_pb2.ScoreRequest(items=[score_item("q", "a")]).SerializeToString()
    unknown_field = b"\xa8\x06\x01"  # field 101, varint 1: not in ScoreRequest
    code, msg = _code(lambda: _raw_score(vllm_client, good + unknown_field))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "unknown" in msg
    assert len(_raw_score(vllm_client, good).items) == 1


def test_size_limits_are_resource_exhausted(vllm_client):
    too_many = [score_item("q", [5])] * 1025
    code, msg = _code(lambda: vllm_client.score(too_many))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "1025 items" in msg
    huge = score_item("q", "x" * (17 * 1024 * 1024))
    code, _ = _code(lambda: vllm_client.score([huge]))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_fingerprint_precondition_and_deadline(vllm_client):
    code, msg = _code(lambda: vllm_client.score([score_item("q", "a")], expected_fingerprint_id="0000"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "0000" in msg
    fp = vllm_client.model_info().fingerprint.fingerprint_id
    assert vllm_client.score([score_item("q", "a")], expected_fingerprint_id=fp).items
    code, _ = _code(lambda: vllm_client.score([score_item("q", "a")] * 200, timeout=0.001))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_score_stream_yields_every_item_and_names_the_bad_request(vllm_client):
    requests = [
        refscore_pb2.ScoreRequest(items=[score_item("q", f"answer {i} {j}") for j in range(3)]) for i in range(4)
    ]
    results = list(vllm_client.stub.ScoreStream(iter(requests), timeout=120))
    assert [(r.request_index, r.item.item_index) for r in results] == [(i, j) for i in range(4) for j in range(3)]
    assert results[0].fingerprint.fingerprint_id and not results[1].HasField("fingerprint")
    bad = requests[:1] + [refscore_pb2.ScoreRequest()] + requests[2:]
    code, msg = _code(lambda: list(vllm_client.stub.ScoreStream(iter(bad), timeout=120)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "request 1" in msg


def test_generate_returns_samples_whose_logprobs_rescore_the_same(vllm_client):
    prompt = records.chat_prompt([("user", "count from one to ten")])
    resp = vllm_client.stub.Generate(
        refscore_pb2.GenerateRequest(prompt=prompt, n=2, max_tokens=12, seed=7), timeout=120
    )
    assert len(resp.answers) == 2 and resp.fingerprint.engine == "vllm"
    for answer in resp.answers:
        assert 0 < len(answer.token_ids) <= 12 and len(answer.token_logprobs) == len(answer.token_ids)
        assert answer.finish_reason in ("stop", "length")
        # The recipe's two methods on the same tokens: sampled-token log-probs vs prompt log-probs.
        rescored = vllm_client.score([score_item(prompt, list(answer.token_ids))]).items[0]
        assert max(abs(a - b) for a, b in zip(rescored.token_logprobs, answer.token_logprobs)) < 1e-4
    code, msg = _code(
        lambda: vllm_client.stub.Generate(refscore_pb2.GenerateRequest(prompt=prompt, n=1000), timeout=30)
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "n=1000" in msg


def test_health_serving_and_reflection(vllm_server):
    channel = grpc.insecure_channel(vllm_server.target)
    try:
        status = (
            health_pb2_grpc.HealthStub(channel)
            .Check(health_pb2.HealthCheckRequest(service="offdpo.v1.RefScore"), timeout=10)
            .status
        )
        assert status == health_pb2.HealthCheckResponse.SERVING
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
        assert "offdpo.v1.RefScore" in services and "grpc.health.v1.Health" in services
    finally:
        channel.close()


def _reflected_services(port: int) -> list[str]:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        return list(ProtoReflectionDescriptorDatabase(channel).get_services())


def test_not_serving_and_unavailable_before_the_engine_loads(tiny_model):
    async def scenario():
        cfg = RefscoreConfig(
            model_dir=str(tiny_model), port=free_port(), metrics_port=0, plaintext=True, allow_anonymous=True
        )
        server = RefscoreServer(cfg)
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
                status = (
                    await health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(service=""), timeout=10
                    )
                ).status
                assert status == health_pb2.HealthCheckResponse.NOT_SERVING
                # The RefScore service is registered (reflection lists it) while the engine loads...
                assert "offdpo.v1.RefScore" in await asyncio.to_thread(_reflected_services, server.port)
                # ...and its methods answer UNAVAILABLE, not UNIMPLEMENTED.
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await refscore_pb2_grpc.RefScoreStub(channel).Score(
                        refscore_pb2.ScoreRequest(items=[score_item("q", "a")]), timeout=10
                    )
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "not ready" in info.value.details()
        finally:
            await server.stop(0)

    asyncio.run(scenario())


def _queued_tokens(metrics_port: int, caller: str) -> float:
    """refscore_caller_tokens_total of `caller`, read from the server's metrics endpoint."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "refscore_caller_tokens_total" and sample.labels.get("caller") == caller:
                return sample.value
    return 0.0


def test_sigterm_drains_in_flight_requests(tiny_model, tmp_path):
    metrics_port = free_port()
    server = start_refscore(
        tiny_model,
        tmp_path / "drain.log",
        engine="transformers",
        extra_env={"OFFDPO_REFSCORE_ENGINE_BATCH_TOKENS": "4096", "OFFDPO_REFSCORE_METRICS_PORT": str(metrics_port)},
    )
    try:
        with RefscoreClient(server.target) as client:
            client.wait_serving(timeout_s=120)
            items = [score_item("q " * 50, "answer " * 150, item_id=str(i)) for i in range(400)]
            result = {}

            def call():
                try:
                    result["response"] = client.score(items, timeout=120)
                except grpc.RpcError as exc:
                    result["error"] = exc

            thread = threading.Thread(target=call)
            thread.start()
            # In flight: the server has tokenised the request and queued it for the engine.
            wait_until(lambda: _queued_tokens(metrics_port, "anonymous") > 0, 60, "the request reaching the engine")
            assert not result, "the request finished before SIGTERM: nothing was left to drain"
            server.proc.send_signal(signal.SIGTERM)
            thread.join(timeout=120)
            assert "error" not in result, f"in-flight request failed during drain: {result.get('error')}"
            assert len(result["response"].items) == 400
        assert server.proc.wait(timeout=60) == 0, server.log_tail()
        assert "stopped cleanly" in server.log_tail()
    finally:
        server.stop()
