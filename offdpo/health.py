"""gRPC health (grpc.health.v1) for a loop that serves no RPC API, such as the labeler's `consume`.

kubelet's gRPC liveness probe then restarts a pod whose loop is stuck (a hung call, a wedged client),
which a live-but-idle process would otherwise hide: the loop calls `beat()` every time round, and
`Check` answers NOT_SERVING once no beat came for `stale_after_s`, or once the loop is stopping.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent import futures

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

log = logging.getLogger(__name__)


class LoopHealth(health_pb2_grpc.HealthServicer):
    def __init__(self, service_name: str, stale_after_s: float, clock: Callable[[], float] = time.monotonic):
        self.service_name = service_name
        self.stale_after_s = stale_after_s
        self._clock = clock  # injectable so tests decide what "stale" is without sleeping
        self._last_beat = clock()
        self._stopping = False

    def beat(self) -> None:
        self._last_beat = self._clock()

    def stopping(self) -> None:
        self._stopping = True

    def status(self) -> int:
        stale = self._clock() - self._last_beat > self.stale_after_s
        if self._stopping or stale:
            return health_pb2.HealthCheckResponse.NOT_SERVING
        return health_pb2.HealthCheckResponse.SERVING

    def Check(self, request, context):
        if request.service not in ("", self.service_name):
            context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"unknown service {request.service!r}; this port serves '' and {self.service_name!r}",
            )
        return health_pb2.HealthCheckResponse(status=self.status())


class LoopHealthServer:
    """A plaintext health-only gRPC server on `host:port`; `variable` names the setting in errors."""

    def __init__(self, health: LoopHealth, host: str, port: int, variable: str):
        self.health = health
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="health"), options=[("grpc.so_reuseport", 0)]
        )
        health_pb2_grpc.add_HealthServicer_to_server(health, self.server)
        try:
            self.port = self.server.add_insecure_port(f"{host}:{port}")
        except RuntimeError:  # grpcio raises this (older versions returned 0) when the bind fails
            self.port = 0
        if not self.port:
            raise OSError(
                f"cannot listen on {host}:{port}: the port is taken or the address is not local; set {variable}"
            )

    def __enter__(self) -> LoopHealthServer:
        self.server.start()
        log.info("health (grpc.health.v1) on port %d", self.port)
        return self

    def __exit__(self, *exc) -> None:
        self.health.stopping()
        self.server.stop(grace=1).wait(5)
