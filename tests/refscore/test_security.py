"""refscore security through real channels: TLS and mTLS with certificates made here, team tokens
(none, wrong, another team's, valid), permissions, quotas with retry hints, a fair engine queue.

In-process servers on the transformers engine (one engine shared by every server of this module);
the sync gRPC clients of the tests talk to them from the test thread.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from localdev.process import free_port
from offdpo.config import ConfigError
from offdpo.refscore_client import RefscoreClient, channel_credentials, score_item
from offdpo.v1 import refscore_pb2
from services.refscore import security
from services.refscore.config import RefscoreConfig
from services.refscore.scorer import STREAM_WORKER, FairQueue, ScoreJob, Scorer
from services.refscore.server import RefscoreServer
from tests.pki import make_cert

WAIT_S = 60  # bound on every RPC of this module (a hang fails with DEADLINE_EXCEEDED, not a stuck run)
TOKENS = {
    name: f"tok-{name}-{secrets.token_urlsafe(24)}"
    for name in ("alpha", "beta", "gamma", "busy", "metered", "calm", "shared", "bycert")
}
WRONG_TOKEN = f"tok-wrong-{secrets.token_urlsafe(24)}"
TEAMS = {
    "alpha": {},
    "beta": {"methods": ["GetModelInfo"]},  # may not Score
    "gamma": {"models": ["some-other-model"]},  # may not use this server's model
    "busy": {"max_concurrent": 2},
    "metered": {"tokens_per_minute": 300},
    "calm": {},
    "shared": {"tokens_per_minute": 400},  # the two-replica test's team
    "bycert": {"client_cn": ["labeler"], "methods": ["GetModelInfo", "Score"]},  # tests/pki's client certificate
}


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pki")
    ca, ca_key, ca_pem, _ = make_cert("offdpo test CA", ca=True)
    _, _, server_pem, server_key = make_cert("refscore", ca, ca_key, server=True)
    client_ca, client_ca_key, client_ca_pem, _ = make_cert("offdpo test client CA", ca=True)
    _, _, client_pem, client_key = make_cert("labeler", client_ca, client_ca_key)
    rogue_ca, rogue_ca_key, _, _ = make_cert("rogue CA", ca=True)
    _, _, rogue_pem, rogue_key = make_cert("intruder", rogue_ca, rogue_ca_key)
    files = {
        "ca": ca_pem,
        "server.crt": server_pem,
        "server.key": server_key,
        "client-ca": client_ca_pem,
        "client.crt": client_pem,
        "client.key": client_key,
        "rogue.crt": rogue_pem,
        "rogue.key": rogue_key,
    }
    for name, data in files.items():
        (d / name).write_bytes(data)
    return {name: d / name for name in files}


@pytest.fixture(scope="module")
def auth_file(tmp_path_factory) -> Path:
    teams = {name: {"token_sha256": [security.token_hash(TOKENS[name])], **spec} for name, spec in TEAMS.items()}
    path = tmp_path_factory.mktemp("auth") / "teams.yaml"
    path.write_text(yaml.safe_dump({"teams": teams}))
    return path


# -- in-process servers ------------------------------------------------------------------------------------
class ThreadServer:
    """A RefscoreServer on an event loop in a background thread."""

    def __init__(self, cfg: RefscoreConfig, scorer: Scorer, replicas: int | None = None, load: bool = True):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-refscore-loop", daemon=True)
        self.thread.start()
        self.server = RefscoreServer(cfg, scorer, replicas=replicas)
        try:
            self.port = self.run(self.server.start())
            if load:
                self.run(self.server.load_engine())
        except BaseException:
            self.close()
            raise
        self.target = f"localhost:{self.port}"

    def run(self, coro, timeout: float = 120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        async def stop():
            for s in (self.server.server, self.server.health_server):
                if s is not None:
                    await s.stop(0)  # the shared scorer stays up

        try:
            self.run(stop(), timeout=30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=30)


def _cfg(model_dir, **kw) -> RefscoreConfig:
    base = dict(
        model_dir=str(model_dir),
        engine="transformers",
        max_model_len=512,
        port=free_port(),
        host="127.0.0.1",
        metrics_port=0,
    )
    return RefscoreConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def scorer(tiny_model):
    s = Scorer(_cfg(tiny_model))
    s.load()
    yield s
    s.shutdown()


@pytest.fixture(scope="module")
def tls_server(tiny_model, scorer, pki, auth_file):
    server = ThreadServer(
        _cfg(
            tiny_model,
            tls_cert=str(pki["server.crt"]),
            tls_key=str(pki["server.key"]),
            auth_file=str(auth_file),
            health_port=free_port(),
        ),
        scorer,
    )
    yield server
    server.close()


@pytest.fixture(scope="module")
def mtls_server(tiny_model, scorer, pki):
    server = ThreadServer(
        _cfg(
            tiny_model,
            tls_cert=str(pki["server.crt"]),
            tls_key=str(pki["server.key"]),
            tls_client_ca=str(pki["client-ca"]),
            allow_anonymous=True,
        ),
        scorer,
    )
    yield server
    server.close()


def _client(server, pki, token=None, **tls) -> RefscoreClient:
    return RefscoreClient(server.target, credentials=channel_credentials(str(pki["ca"]), **tls), token=token)


def _items(n=1, words=3):
    return [
        score_item([("user", "what is two plus two")], " ".join(["four"] * words), item_id=str(i)) for i in range(n)
    ]


def _error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


# -- TLS + tokens ------------------------------------------------------------------------------------------
def test_tokens_over_tls_none_wrong_other_team_valid(tls_server, pki, caplog):
    caplog.set_level(logging.DEBUG)
    with _client(tls_server, pki) as anonymous:
        err = _error(lambda: anonymous.score(_items(), timeout=WAIT_S))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "Bearer" in err.details()
    with _client(tls_server, pki, token=WRONG_TOKEN) as wrong:
        err = _error(lambda: wrong.score(_items(), timeout=WAIT_S))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "unknown" in err.details()
        assert WRONG_TOKEN not in err.details()
        err = _error(lambda: wrong.model_info(timeout=WAIT_S))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    with _client(tls_server, pki, token=TOKENS["beta"]) as beta:  # another team's token: a team limited to GetModelInfo
        assert beta.model_info(timeout=WAIT_S).fingerprint.fingerprint_id
        err = _error(lambda: beta.score(_items(), timeout=WAIT_S))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "'beta' may not call Score" in err.details()
    with _client(tls_server, pki, token=TOKENS["gamma"]) as gamma:  # a team limited to another model
        err = _error(lambda: gamma.model_info(timeout=WAIT_S))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "may not use model" in err.details()
    with _client(tls_server, pki, token=TOKENS["alpha"]) as alpha:
        resp = alpha.score(_items(2), timeout=WAIT_S)
        assert [i.item_id for i in resp.items] == ["0", "1"] and all(i.token_logprobs for i in resp.items)
        streamed = list(alpha.stub.ScoreStream(iter([refscore_pb2.ScoreRequest(items=_items(2))]), timeout=WAIT_S))
        assert len(streamed) == 2
    logged = caplog.text
    assert not any(t in logged for t in [WRONG_TOKEN, *TOKENS.values()]), "a token reached the log"


def test_health_and_reflection_need_no_token(tls_server, pki):
    channel = grpc.secure_channel(tls_server.target, channel_credentials(str(pki["ca"])))
    try:
        status = (
            health_pb2_grpc.HealthStub(channel)
            .Check(health_pb2.HealthCheckRequest(service="offdpo.v1.RefScore"), timeout=WAIT_S)
            .status
        )
        assert status == health_pb2.HealthCheckResponse.SERVING
        assert "offdpo.v1.RefScore" in ProtoReflectionDescriptorDatabase(channel).get_services()
    finally:
        channel.close()
    # The kubelet's probe port: plaintext, health only.
    plain = grpc.insecure_channel(f"127.0.0.1:{tls_server.server.health_port}")
    try:
        status = (
            health_pb2_grpc.HealthStub(plain).Check(health_pb2.HealthCheckRequest(service=""), timeout=WAIT_S).status
        )
        assert status == health_pb2.HealthCheckResponse.SERVING
        score = plain.unary_unary("/offdpo.v1.RefScore/Score", request_serializer=None, response_deserializer=None)
        assert _error(lambda: score(b"", timeout=WAIT_S)).code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        plain.close()


def test_plaintext_client_cannot_talk_to_the_tls_port(tls_server):
    with RefscoreClient(f"127.0.0.1:{tls_server.port}", token=TOKENS["alpha"]) as client:
        assert _error(lambda: client.score(_items(), timeout=10)).code() == grpc.StatusCode.UNAVAILABLE


# -- mutual TLS -------------------------------------------------------------------------------------------
def test_mtls_with_and_without_a_client_certificate(mtls_server, pki):
    with _client(mtls_server, pki) as no_cert:
        err = _error(lambda: no_cert.score(_items(), timeout=10))
        assert err.code() == grpc.StatusCode.UNAVAILABLE  # the handshake fails: no RPC ever reaches refscore
    with _client(mtls_server, pki, cert_file=str(pki["rogue.crt"]), key_file=str(pki["rogue.key"])) as rogue:
        assert _error(lambda: rogue.score(_items(), timeout=10)).code() == grpc.StatusCode.UNAVAILABLE
    with _client(mtls_server, pki, cert_file=str(pki["client.crt"]), key_file=str(pki["client.key"])) as client:
        assert len(client.score(_items(2), timeout=WAIT_S).items) == 2


# -- quotas and fairness ----------------------------------------------------------------------------------
def test_concurrency_quota_rejects_with_retry_hint_while_others_succeed(tls_server, pki):
    release = threading.Event()
    opened = threading.Semaphore(0)

    def held_stream():  # a stream that stays open (holding one of busy's 2 slots) until released
        opened.release()
        yield refscore_pb2.ScoreRequest(items=_items())
        release.wait(WAIT_S)

    results: list = []

    def run_stream(client):
        try:
            results.append(len(list(client.stub.ScoreStream(held_stream(), timeout=WAIT_S))))
        except grpc.RpcError as exc:
            results.append(exc)

    with _client(tls_server, pki, token=TOKENS["busy"]) as busy, _client(tls_server, pki, token=TOKENS["calm"]) as calm:
        threads = [threading.Thread(target=run_stream, args=(busy,)) for _ in range(2)]
        try:
            for t in threads:
                t.start()
            for _ in threads:
                assert opened.acquire(timeout=WAIT_S), "the held streams did not start"
            # Both slots are taken once the server has counted both streams in flight.
            deadline = time.monotonic() + WAIT_S
            while security_in_flight(tls_server, "busy") < 2:
                assert time.monotonic() < deadline, "the server never saw busy's two streams"
                time.sleep(0.05)
            err = _error(lambda: busy.score(_items(), timeout=WAIT_S))
            assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "retry after" in err.details()
            assert int(dict(err.trailing_metadata())["retry-after-ms"]) > 0
            for _ in range(5):  # another caller is unaffected, within its deadline
                assert len(calm.score(_items(2), timeout=WAIT_S).items) == 2
        finally:
            release.set()
            for t in threads:
                t.join(timeout=WAIT_S)
        assert results == [1, 1], results
        assert len(busy.score(_items(), timeout=WAIT_S).items) == 1  # slots freed


def security_in_flight(server, team: str) -> int:
    return server.server.quotas._in_flight.get(team, 0)


def test_tokens_per_minute_quota_rejects_with_retry_hint_while_others_succeed(tls_server, pki):
    with (
        _client(tls_server, pki, token=TOKENS["metered"]) as metered,
        _client(tls_server, pki, token=TOKENS["calm"]) as calm,
    ):
        served, err = 0, None
        for _ in range(100):  # 300 tokens per minute; each request is tens of tokens
            try:
                metered.score(_items(2, words=8), timeout=WAIT_S)
                served += 1
            except grpc.RpcError as exc:
                err = exc
                break
        assert err is not None and served >= 1, f"metered was never limited ({served} requests served)"
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "tokens per minute" in err.details() and "retry after" in err.details()
        assert int(dict(err.trailing_metadata())["retry-after-ms"]) > 0
        big = _error(lambda: metered.score(_items(40, words=20), timeout=WAIT_S))  # more than a minute's quota
        assert big.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "split it" in big.details()
        for _ in range(5):
            assert len(calm.score(_items(2, words=8), timeout=WAIT_S).items) == 2


class _GatedEngine:
    """A fake engine that records which jobs it ran, and blocks its first call until released."""

    name, version, max_model_len = "fake", "0", 512

    def __init__(self):
        self.gate = threading.Event()
        self.calls: list[list[int]] = []

    def score(self, seqs):
        if not self.calls:
            self.gate.wait(WAIT_S)
        self.calls.append([p[0] for p, _ in seqs])  # the first prompt id tags the job
        return [[-1.0] * len(a) for _, a in seqs]

    def shutdown(self):
        pass


def test_a_flood_does_not_starve_the_stream_worker_or_other_callers(tiny_model):
    from services.refscore.scorer import Prepared

    scorer = Scorer(_cfg(tiny_model, engine_batch_tokens=1))  # one job per engine call: the order is visible
    engine = scorer.engine = _GatedEngine()
    scorer._thread = threading.Thread(target=scorer._engine_loop, daemon=True)
    scorer._thread.start()
    scorer.ready.set()
    try:
        first = scorer.submit_score([Prepared([0], [1])], caller="flood")  # blocks the engine
        deadline = time.monotonic() + WAIT_S
        while scorer._queue.qsize():
            assert time.monotonic() < deadline, "the engine never took the first job"
            time.sleep(0.01)
        flood = [scorer.submit_score([Prepared([1], [1])], caller="flood") for _ in range(50)]
        other = scorer.submit_score([Prepared([2], [1])], caller="calm")
        worker = scorer.submit_score([Prepared([3], [1])])  # the stream worker's path: no caller
        engine.gate.set()
        for f in [first, *flood, other, worker]:
            f.result(timeout=WAIT_S)
        order = [tags[0] for tags in engine.calls]
        assert len(order) == 53
        # FIFO would run them at positions 51 and 52; fair round-robin runs them right away.
        assert order.index(2) <= 3 and order.index(3) <= 3, order[:8]
    finally:
        scorer.shutdown()


def test_fair_queue_round_robin_and_stop():
    q = FairQueue()
    jobs = [
        ScoreJob(sequences=[], tokens=1, deadline=None, caller=caller)
        for caller in ["a", "a", "a", "b", STREAM_WORKER, "a"]
    ]
    for j in jobs:
        q.put(j)
    assert [q.get().caller for _ in range(6)] == ["a", "b", STREAM_WORKER, "a", "a", "a"]
    q.put(ScoreJob(sequences=[], tokens=1, deadline=None, caller="a"))
    q.put(None)
    assert q.get() is None  # stop jumps the line


# -- configuration: nothing insecure by accident -----------------------------------------------------------
def test_refuses_to_serve_without_tls_or_explicit_plaintext(tiny_model, auth_file, pki, caplog):
    async def start(**kw):
        server = RefscoreServer(_cfg(tiny_model, **kw))
        try:
            await server.start()
        finally:
            if server.server is not None:
                await server.server.stop(0)

    with pytest.raises(ConfigError, match="OFFDPO_REFSCORE_PLAINTEXT=true"):
        asyncio.run(start(auth_file=str(auth_file)))
    with pytest.raises(ConfigError, match="OFFDPO_REFSCORE_ALLOW_ANONYMOUS=true"):
        asyncio.run(start(plaintext=True))
    with pytest.raises(ConfigError, match="contradicts"):
        asyncio.run(start(plaintext=True, tls_cert=str(pki["server.crt"]), allow_anonymous=True))
    with pytest.raises(ConfigError, match="not a PEM file"):
        asyncio.run(start(tls_cert=str(pki["server.crt"]), tls_key=str(auth_file), allow_anonymous=True))
    caplog.set_level(logging.WARNING)
    asyncio.run(start(plaintext=True, allow_anonymous=True))
    assert "PLAINTEXT" in caplog.text and "without a token" in caplog.text


def test_auth_file_validation_and_reload(tmp_path):
    path = tmp_path / "teams.json"
    raw_token = "a-raw-token-is-not-a-hash"
    path.write_text('{"teams": {"x": {"token_sha256": ["%s"]}}}' % raw_token)
    with pytest.raises(ConfigError, match="sha256 hex") as info:
        security.TokenStore(str(path))
    assert raw_token not in str(info.value)
    path.write_text('{"teams": {"../etc": {"token_sha256": ["%s"]}}}' % ("0" * 64))
    with pytest.raises(ConfigError, match="team name"):
        security.TokenStore(str(path))
    path.write_text("!!python/object/apply:os.system ['true']")
    with pytest.raises(ConfigError, match="not valid YAML"):
        security.TokenStore(str(path))
    path.write_text('{"teams": {"x": {"token_sha256": "%s", "methods": ["Score"]}}}' % security.token_hash("t1"))
    store = security.TokenStore(str(path), reload_s=0)
    assert store.authenticate("t1").name == "x" and store.authenticate("t2") is None
    path.write_text('{"teams": {"y": {"token_sha256": "%s"}}}' % security.token_hash("t2"))
    store.maybe_reload()
    assert store.authenticate("t1") is None and store.authenticate("t2").name == "y"


# -- issue 18: quotas across replicas, client certificates, what a refused caller costs --------------------------
def test_two_replicas_hold_a_teams_quota_together(tiny_model, scorer, pki, auth_file):
    """OFFDPO_REFSCORE_REPLICAS=2: each replica admits half of `shared`'s 400 tokens per minute, so a client
    spreading calls over both is refused by both once the team's quota (not twice it) is spent."""
    tls = dict(tls_cert=str(pki["server.crt"]), tls_key=str(pki["server.key"]), auth_file=str(auth_file))
    replicas = [ThreadServer(_cfg(tiny_model, **tls), scorer, replicas=2) for _ in range(2)]
    clients = [_client(r, pki, token=TOKENS["shared"]) for r in replicas]
    try:
        started = time.monotonic()
        admitted, refused = 0, set()
        for i in range(200):
            try:
                resp = clients[i % 2].score(_items(2, words=8), timeout=WAIT_S)
                admitted += sum(len(it.prompt_token_ids) + len(it.answer_token_ids) for it in resp.items)
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
                assert "400 tokens per minute (this replica's share of 2)" in exc.details()
                refused.add(i % 2)
                if refused == {0, 1}:
                    break
        elapsed = time.monotonic() - started
        assert refused == {0, 1}, "a replica never refused the team"
        # The global bound: one bucket of the team's quota, refilled at its rate, over both replicas.
        assert 200 < admitted <= 400 + 400 * elapsed / 60, (admitted, elapsed)
    finally:
        for c in clients:
            c.close()
        for r in replicas:
            r.close()


def test_mtls_client_certificate_maps_to_its_team(tiny_model, scorer, pki, auth_file):
    server = ThreadServer(
        _cfg(
            tiny_model,
            tls_cert=str(pki["server.crt"]),
            tls_key=str(pki["server.key"]),
            tls_client_ca=str(pki["client-ca"]),
            auth_file=str(auth_file),
        ),
        scorer,
    )
    cert = dict(cert_file=str(pki["client.crt"]), key_file=str(pki["client.key"]))
    try:
        with _client(server, pki, **cert) as bycert:  # CN "labeler" -> team bycert, no token
            assert len(bycert.score(_items(2), timeout=WAIT_S).items) == 2
            err = _error(lambda: bycert.stub.Generate(refscore_pb2.GenerateRequest(), timeout=WAIT_S))
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "'bycert' may not call Generate" in err.details()
        with _client(server, pki, token=TOKENS["beta"], **cert) as beta:  # a token decides when sent
            assert _error(lambda: beta.score(_items(), timeout=WAIT_S)).code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        server.close()


def test_callers_prompts_never_enter_the_shared_tokenisation_cache(tls_server, pki):
    cache = tls_server.server.scorer.model().boundary._prompt_ids
    before = cache.cache_info().currsize
    unique = secrets.token_hex(8)
    items = [score_item([("user", f"prompt {unique}")], "four", item_id=str(i)) for i in range(2)]
    with _client(tls_server, pki, token=TOKENS["alpha"]) as alpha:
        assert len(alpha.score(items, timeout=WAIT_S).items) == 2
    with _client(tls_server, pki, token=TOKENS["metered"]) as metered:  # refused or not: nothing cached
        try:
            metered.score([score_item([("user", f"other {unique}")], "four " * 200)], timeout=WAIT_S)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert cache.cache_info().currsize == before


def test_engine_load_error_is_logged_not_sent(tiny_model, caplog):
    scorer = Scorer(_cfg(tiny_model))
    scorer.load_error = RuntimeError("cannot open /secret/path/weights.safetensors")
    server = ThreadServer(_cfg(tiny_model, plaintext=True, allow_anonymous=True), scorer, load=False)
    caplog.set_level(logging.WARNING)
    try:
        with RefscoreClient(f"127.0.0.1:{server.port}") as client:
            err = _error(lambda: client.model_info(timeout=WAIT_S))
        assert err.code() == grpc.StatusCode.UNAVAILABLE and "not ready" in err.details()
        assert "/secret/path" not in err.details() and "/secret/path" in caplog.text
    finally:
        server.close()
