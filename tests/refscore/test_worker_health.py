"""`python -m services.refscore worker` answers kubelet's gRPC probes (OFFDPO_REFSCORE_HEALTH_PORT):
NOT_SERVING while loading, on a watchdog problem and once stopping; a real health server, a fake
watchdog (what it reports is tested in test_watchdog)."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from offdpo.health import LoopHealthServer
from services.refscore.watchdog import Problem, WorkerHealth

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


class FakeWatchdog:
    def __init__(self) -> None:
        self.now: Problem | None = None

    def problem(self) -> Problem | None:
        return self.now


def test_worker_health_follows_loading_the_watchdog_and_stopping():
    health = WorkerHealth()
    with LoopHealthServer(health, "127.0.0.1", 0, "OFFDPO_REFSCORE_HEALTH_PORT") as server:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)

            def status(service: str = "") -> int:
                return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status

            assert status() == NOT_SERVING, "engines not loaded yet"
            watchdog = FakeWatchdog()
            health.watchdog = watchdog  # type: ignore[assignment]
            assert status() == SERVING and status("offdpo.v1.RefScore") == SERVING and status("readiness") == SERVING
            watchdog.now = Problem("the engine thread died", stalled=False)
            assert status() == NOT_SERVING and status("readiness") == NOT_SERVING
            watchdog.now = None
            assert status() == SERVING
            health.stopping()
            assert status() == NOT_SERVING
