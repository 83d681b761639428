"""gRPC health (grpc.health.v1) for a loop that serves no RPC API, such as the labeler's `consume`
or the trainer.

Two answers on one port, so two kubelet probes can ask different questions:

- liveness (the service names '' and the loop's own name): is the loop going round? The loop calls
  `beat()` every time round, and `Check` answers NOT_SERVING once no beat came for `stale_after_s`
  (0: never stale), or once the loop is stopping. kubelet's gRPC liveness probe then restarts a pod
  whose loop is stuck (a hung call, a wedged client), which a live-but-idle process would otherwise
  hide. An outage of a dependency does NOT make it NOT_SERVING: a pod that is merely waiting on S3,
  Kafka or the judge keeps retrying, and a restart would not bring the dependency back.
- readiness (the service name `READINESS`, "readiness"): liveness, and in addition NOT_SERVING once
  the process has been retrying infrastructure trouble continuously for `outage_ready_s` (0: never);
  SERVING again as soon as it resumes. The outage is reported by `outage()` / `resumed()`, or read at
  Check time from `outage_since` (a callable giving the clock time the current outage began, None
  when there is none: the trainer's main thread is blocked in its backoff exactly when kubelet asks).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent import futures

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

log = logging.getLogger(__name__)

READINESS = "readiness"  # the service name a readiness probe asks for (kubelet: grpc.service)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class LoopHealth(health_pb2_grpc.HealthServicer):
    def __init__(
        self,
        service_name: str,
        stale_after_s: float,
        clock: Callable[[], float] = time.monotonic,
        outage_ready_s: float = 0.0,
        outage_since: Callable[[], float | None] | None = None,
    ):
        self.service_name = service_name
        self.stale_after_s = stale_after_s
        self.outage_ready_s = outage_ready_s
        self._clock = clock  # injectable so tests decide what "stale" is without sleeping
        self._last_beat = clock()
        self._stopping = False
        self._outage_started: float | None = None
        self._outage_since = outage_since if outage_since is not None else lambda: self._outage_started
        self._reported_unready = False

    def beat(self) -> None:
        self._last_beat = self._clock()

    def stopping(self) -> None:
        self._stopping = True

    def outage(self) -> None:
        """A dependency failed and is being retried: the outage starts now unless one is going on."""
        if self._outage_started is None:
            self._outage_started = self._clock()

    def resumed(self) -> None:
        """Progress again: the outage (if any) is over."""
        self._outage_started = None

    def report_outage(self, down: bool) -> None:
        """`outage()` when `down`, else `resumed()` (the labeler's run_kafka calls it so)."""
        if down:
            self.outage()
        else:
            self.resumed()

    def outage_s(self) -> float:
        """How long the current outage has lasted (0: none)."""
        since = self._outage_since()
        return 0.0 if since is None else max(0.0, self._clock() - since)

    def status(self) -> int:
        """Liveness: is the loop going round (an outage does not count against it)."""
        stale = self.stale_after_s > 0 and self._clock() - self._last_beat > self.stale_after_s
        if self._stopping or stale:
            return NOT_SERVING
        return SERVING

    def readiness(self) -> int:
        """Liveness, and NOT_SERVING after `outage_ready_s` of continuous outage."""
        if self.status() != SERVING:
            return NOT_SERVING
        waited = self.outage_s()
        unready = self.outage_ready_s > 0 and waited >= self.outage_ready_s
        if unready != self._reported_unready:  # one line per change, not one per probe
            self._reported_unready = unready
            if unready:
                log.warning("readiness NOT_SERVING: retrying infrastructure trouble for %.0f s", waited)
            else:
                log.info("readiness SERVING again: the outage is over")
        return NOT_SERVING if unready else SERVING

    def Check(self, request, context):
        if request.service == READINESS:
            return health_pb2.HealthCheckResponse(status=self.readiness())
        if request.service not in ("", self.service_name):
            context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"unknown service {request.service!r}; this port serves '', {self.service_name!r} (liveness) "
                f"and {READINESS!r}",
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
