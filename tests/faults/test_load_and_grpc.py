"""refscore `serve --worker` (transformers engine) in its own process: many concurrent gRPC clients
with deadlines while pairs stream through the worker; then malformed, random and oversized gRPC
requests. The server must answer with the documented codes, never crash, and keep memory bounded."""

from __future__ import annotations

import collections
import statistics
import sys
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from localdev.process import free_port
from offdpo.refscore_client import RefscoreClient, score_item
from offdpo.v1 import refscore_pb2
from tests.pairs import make_pairs

pytestmark = [pytest.mark.faults, pytest.mark.stack]

CLIENTS, REQUESTS_PER_CLIENT, DEADLINE_S = 16, 12, 10.0
ALLOWED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION}


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


@pytest.fixture(scope="module")
def served(stack, tiny_model, tmp_path_factory):
    """One refscore serve --worker process for the load and gRPC fuzz cases, on its own topics."""
    from .harness import Case

    case = Case("load", stack, tiny_model, tmp_path_factory.mktemp("load"), __import__("uuid").uuid4().hex[:10])
    port = free_port()
    env = {
        **case.env,
        "OFFDPO_REFSCORE_MODEL_DIR": str(tiny_model),
        "OFFDPO_REFSCORE_ENGINE": "transformers",
        "OFFDPO_REFSCORE_PORT": str(port),
        "OFFDPO_REFSCORE_METRICS_PORT": "0",
        "OFFDPO_REFSCORE_MAX_MODEL_LEN": "512",
        "OFFDPO_REFSCORE_BATCH_WAIT_S": "0.3",
        "OFFDPO_REFSCORE_BATCH_PAIRS": "16",
        "OFFDPO_REFSCORE_GRACE_S": "10",
        "OFFDPO_REFSCORE_PLAINTEXT": "true",
        "OFFDPO_REFSCORE_ALLOW_ANONYMOUS": "true",
    }
    server = case._spawn("refscore-serve", [sys.executable, "-m", "services.refscore", "serve", "--worker"], env)
    client = RefscoreClient(f"127.0.0.1:{port}")
    try:
        try:
            client.wait_serving(timeout_s=180)
        except TimeoutError as exc:
            raise RuntimeError(f"{exc}\n{server.tail()}") from None
        yield case, server, client, f"127.0.0.1:{port}"
    finally:
        client.close()
        case.close()


def test_concurrent_clients_with_deadlines_while_the_stream_runs(served, fault_results):
    case, server, client, target = served
    # warm-up, then the baseline RSS
    for _ in range(3):
        client.score([score_item([("user", "warm up")], "hello")], timeout=60)
    rss_warm = _rss_mib(server.proc.pid)
    pairs = make_pairs(64, case.run_name)
    case.produce_pairs(pairs)

    latencies, codes, lock = [], collections.Counter(), threading.Lock()

    def one_client(i: int):
        with RefscoreClient(target) as c:
            for j in range(REQUESTS_PER_CLIENT):
                items = [
                    score_item([("user", f"client {i} request {j}: say something")], f"answer {k} " * (1 + j % 5))
                    for k in range(1 + (i + j) % 4)
                ]
                t0 = time.perf_counter()
                try:
                    c.score(items, timeout=DEADLINE_S)
                    code = "OK"
                except grpc.RpcError as exc:
                    code = exc.code().name
                with lock:
                    latencies.append((time.perf_counter() - t0) * 1000)
                    codes[code] += 1

    threads = [threading.Thread(target=one_client, args=(i,), daemon=True) for i in range(CLIENTS)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "client threads still running after 300 s"
    load_s = time.monotonic() - t0
    case.wait_scored(server, timeout_s=180)
    rss_after = _rss_mib(server.proc.pid)
    assert server.alive, server.tail()
    q = statistics.quantiles(latencies, n=100)
    errors = {k: v for k, v in codes.items() if k != "OK"}
    figures = {
        "clients": CLIENTS,
        "requests": sum(codes.values()),
        "ok": codes["OK"],
        "errors": errors,
        "deadline_s": DEADLINE_S,
        "p50_ms": round(q[49], 1),
        "p95_ms": round(q[94], 1),
        "p99_ms": round(q[98], 1),
        "max_ms": round(max(latencies), 1),
        "wall_s": round(load_s, 1),
        "rss_warm_mib": round(rss_warm, 1),
        "rss_after_mib": round(rss_after, 1),
        "rss_growth": round(rss_after / rss_warm, 2),
        "stream_pairs": len(pairs),
        "stream_scored": len(set(case.scored_rows()) & {p.pair_id for p in pairs}),
        "engine": "transformers (CPU)",
    }
    fault_results.add_load(figures)
    assert sum(codes.values()) == CLIENTS * REQUESTS_PER_CLIENT
    assert set(errors) <= {"DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "UNAVAILABLE"}, errors
    assert figures["stream_scored"] == len(pairs)
    assert rss_after < 1.5 * rss_warm, f"RSS grew from {rss_warm:.0f} to {rss_after:.0f} MiB"


def _raw(client, method: str, payload: bytes, timeout=30):
    call = client.channel.unary_unary(
        f"/offdpo.v1.RefScore/{method}", request_serializer=None, response_deserializer=None
    )
    return call(payload, timeout=timeout)


def _code(fn):
    try:
        fn()
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""


def test_malformed_random_and_oversized_grpc_requests(served, fault_results):
    case, server, client, _ = served
    codes = collections.Counter()

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(method=st.sampled_from(["Score", "Generate", "GetModelInfo"]), payload=st.binary(min_size=1, max_size=600))
    def random_bytes(method, payload):
        code, msg = _code(lambda: _raw(client, method, payload))
        codes[code.name] += 1
        assert code in ALLOWED | {grpc.StatusCode.OK}, f"{method} on {payload!r}: {code} {msg}"
        if code != grpc.StatusCode.OK:
            assert msg, "the status says what to fix"

    random_bytes()

    item = st.builds(
        lambda p, a, ids, use_ids: score_item(p, list(ids) if use_ids else a),
        st.text(max_size=80),
        st.text(max_size=80),
        st.lists(st.integers(-(2**31), 2**31 - 1), max_size=20),
        st.booleans(),
    )

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(items=st.lists(item, max_size=4), fp=st.text(max_size=20))
    def structured(items, fp):
        code, msg = _code(lambda: client.score(items, timeout=30, expected_fingerprint_id=fp))
        codes[code.name] += 1
        assert code in ALLOWED | {grpc.StatusCode.OK}, f"{items!r}: {code} {msg}"

    structured()

    # oversized: over the message limit (16 MiB), too many items, too many tokens
    over = refscore_pb2.ScoreRequest(items=[score_item("q", "x" * (17 * 1024 * 1024))]).SerializeToString()
    code, msg = _code(lambda: _raw(client, "Score", over, timeout=60))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, msg)
    code, msg = _code(lambda: client.score([score_item("q", [5])] * 1025))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, msg)
    code, msg = _code(lambda: _raw(client, "Score", b"\xff\xff\xff\xff\x0f"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "not a valid" in msg, (code, msg)
    code, msg = _code(lambda: client.score([score_item("q", "number " * 2000)]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "context" in msg, (code, msg)

    # still healthy and answering
    assert (
        client.health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
        == health_pb2.HealthCheckResponse.SERVING
    )
    assert len(client.score([score_item([("user", "still there?")], "yes")], timeout=30).items) == 1
    assert server.alive, server.tail()
    fault_results.add_fuzz(
        {
            **(fault_results.fuzz or {}),
            "gRPC requests (random bytes + structured + oversized)": sum(codes.values()) + 4,
            "gRPC status codes seen": dict(sorted(codes.items())),
            "server after fuzzing": "SERVING, answers a valid Score",
        }
    )
