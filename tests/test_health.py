"""offdpo.health: the liveness answer of a loop without an RPC API, over a real gRPC server on loopback."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from offdpo.health import LoopHealth, LoopHealthServer

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def _check(port: int, service: str = "") -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        return (
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
        )


def test_serving_while_the_loop_beats_and_not_once_it_stalls_or_stops():
    now = [1000.0]  # a clock the test moves, so a loaded machine cannot make the loop look stale
    health = LoopHealth("labeler-consume", stale_after_s=30, clock=lambda: now[0])
    with LoopHealthServer(health, "127.0.0.1", 0, "OFFDPO_LABELER_HEALTH_PORT") as server:
        assert _check(server.port) == SERVING
        assert _check(server.port, "labeler-consume") == SERVING
        now[0] += 29.9
        assert _check(server.port) == SERVING
        now[0] += 0.2  # no beat for longer than stale_after_s: a stuck loop
        assert _check(server.port) == NOT_SERVING
        health.beat()
        assert _check(server.port) == SERVING
        with pytest.raises(grpc.RpcError) as err:
            _check(server.port, "offdpo.v1.RefScore")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and "labeler-consume" in err.value.details()
    assert health.status() == NOT_SERVING  # stopping: kubelet must not see a draining loop as healthy


def test_a_taken_port_names_the_variable():
    health = LoopHealth("x", 1.0)
    with LoopHealthServer(health, "127.0.0.1", 0, "OFFDPO_LABELER_HEALTH_PORT") as first:
        with pytest.raises(OSError, match="OFFDPO_LABELER_HEALTH_PORT"):
            LoopHealthServer(health, "127.0.0.1", first.port, "OFFDPO_LABELER_HEALTH_PORT")
