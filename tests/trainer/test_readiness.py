"""Issue 17: the trainer's readiness reports an outage it is waiting out (offdpo.health over a real
gRPC server on loopback). After OFFDPO_TRAINER_OUTAGE_READY_S of continuous retrying the service
'readiness' answers NOT_SERVING, and SERVING again once the fetch goes through; liveness ('') never
depends on S3. The clock is the test's: the retry's sleeps move it instead of waiting."""

from __future__ import annotations

import contextlib
import socket

import grpc
import pytest
import tenacity
from grpc_health.v1 import health_pb2, health_pb2_grpc

from offdpo import errors
from offdpo.health import READINESS, LoopHealthServer
from services.trainer import train
from services.trainer.config import TrainerConfig
from services.trainer.infra import InfraStatus, until_done
from services.trainer.replay import ReplaySource
from tests.fakes import FakeObjectStore

from .test_data import FP, put_shard, row

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
READY_S = 120.0


def _check(port: int, service: str) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        req = health_pb2.HealthCheckRequest(service=service)
        return health_pb2_grpc.HealthStub(channel).Check(req, timeout=5).status


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    """A clock the backoff moves: tenacity's sleep (used by offdpo.retry without a stop event) advances it."""
    c = Clock()

    def sleep(seconds: float) -> None:
        c.now += seconds

    monkeypatch.setattr(tenacity.nap, "sleep", sleep)
    return c


class DownStore(FakeObjectStore):
    """S3 unreachable until the clock reaches `up_at`; every call records what the probes see then."""

    def __init__(self, clock: Clock, up_at: float):
        super().__init__()
        self.clock, self.up_at = clock, up_at
        self.port = 0
        self.seen: list[tuple[float, int, int]] = []  # (time, liveness, readiness) at each attempt

    def _call(self, op: str, key: str) -> None:
        super()._call(op, key)
        if self.port:
            self.seen.append((self.clock.now, _check(self.port, ""), _check(self.port, READINESS)))
        if self.clock.now < self.up_at:
            raise ConnectionError(f"Could not connect to the endpoint URL (S3 down) during {op} {key}")


def test_readiness_not_serving_after_the_outage_time_and_serving_when_reads_resume(clock):
    cfg = TrainerConfig(outage_ready_s=READY_S)
    infra = InfraStatus(clock=clock)
    store = DownStore(clock, up_at=0.0)
    put_shard(store, [row("a"), row("b")], 0)
    store.up_at = clock.now + 300.0  # S3 goes down for 300 s, longer than the readiness threshold
    with LoopHealthServer(train.trainer_health(cfg, infra), "127.0.0.1", 0, "OFFDPO_TRAINER_HEALTH_PORT") as server:
        store.port = server.port
        assert _check(server.port, READINESS) == SERVING
        source = ReplaySource(store, "scores/", 1, 0, FP, set(), 64, "refuse", infra=infra)
        assert source.infra is infra  # the state the probe reads is the source's own
        assert len(source.next_batch(2) or []) == 2, "the pairs are trained once S3 is back"
        after = (_check(server.port, ""), _check(server.port, READINESS))

    first_failure = store.seen[0][0]
    assert infra.errors_total >= 5 and infra.waiting_since is None
    assert all(live == SERVING for _, live, _ in store.seen), "liveness never depends on S3"
    down = [(t, ready) for t, _, ready in store.seen if t < store.up_at]
    for t, ready in down:
        expected = NOT_SERVING if t - first_failure >= READY_S else SERVING
        assert ready == expected, f"at {t - first_failure:.1f} s into the outage readiness said {ready}"
    assert {ready for _, ready in down} == {SERVING, NOT_SERVING}, "both sides of the threshold were probed"
    assert after == (SERVING, SERVING), "ready again once the reads resume"


def test_bad_data_after_an_outage_ends_the_outage(clock):
    """A missing object (bad data: dead-lettered, not retried) answered after some infra failures: the
    infrastructure is back, so readiness must not stay NOT_SERVING."""
    cfg = TrainerConfig(outage_ready_s=READY_S)
    infra = InfraStatus(clock=clock)
    health = train.trainer_health(cfg, infra)
    calls = []

    def fetch() -> bytes:
        calls.append(clock.now)
        if clock.now < 1200.0:
            raise ConnectionError("S3 down")
        raise errors.BadInput("object the event promised is missing")

    with pytest.raises(errors.BadInput):
        until_done("fetch shard k", fetch, infra, None)
    assert len(calls) > 2 and infra.waiting_since is None
    assert health.readiness() == SERVING and health.status() == SERVING


def test_outage_ready_s_zero_never_reports_unready(clock):
    infra = InfraStatus(clock=clock)
    health = train.trainer_health(TrainerConfig(outage_ready_s=0.0), infra)
    infra.failed("fetch shard k", ConnectionError("S3 down"), 1.0)
    clock.now += 10_000
    assert health.readiness() == SERVING


def test_settings_and_where_the_port_is_served(monkeypatch):
    monkeypatch.setenv("OFFDPO_TRAINER_OUTAGE_READY_S", "45")
    monkeypatch.setenv("OFFDPO_TRAINER_HEALTH_PORT", "9402")
    cfg = TrainerConfig.from_env()
    assert (cfg.outage_ready_s, cfg.health_port) == (45.0, 9402)
    assert TrainerConfig().outage_ready_s == 120.0 and TrainerConfig().health_port == 0
    infra = InfraStatus()
    assert isinstance(train.health_server(TrainerConfig(), infra), contextlib.nullcontext), "port 0: off"
    with socket.socket() as s:  # a free port, released for the server
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("LOCAL_RANK", "1")  # one health port per pod: only its local rank 0 serves it
    assert isinstance(train.health_server(TrainerConfig(health_port=port), infra), contextlib.nullcontext)
    monkeypatch.setenv("LOCAL_RANK", "0")
    with train.health_server(TrainerConfig(health_port=port), infra) as server:
        assert isinstance(server, LoopHealthServer) and server.port == port
        assert _check(port, READINESS) == SERVING and _check(port, "") == SERVING
