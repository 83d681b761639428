"""The shared gRPC auth layer (offdpo.grpc_auth) through real TLS handshakes, on a small echo service:
TLS 1.2 minimum (1.3 negotiated), certificate rotation and auth-file rotation without a restart, an
mTLS client certificate's CN mapped to its team, allowed methods, a large body never read for a
refused caller, quotas split over replicas, and settings that refuse to start naming the variable.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import threading
import warnings
from pathlib import Path

import grpc
import pytest
import yaml

from offdpo import grpc_auth
from offdpo.errors import ConfigError
from offdpo.grpc_auth import SecuritySettings, Team
from tests.pki import make_cert

WAIT_S = 30
TOKENS = {"ops": "tok-ops-" + "o" * 32, "readers": "tok-readers-" + "r" * 32}
METHODS = frozenset({"Ping", "Admin", "Chat"})
LOCAL = [("grpc.use_local_subchannel_pool", 1)]  # a new channel makes a new connection (a new handshake)


# -- a small service on an event loop in a background thread -------------------------------------------------
class Echo:
    """Ping and Admin (unary) answer with the caller's team; Chat (stream) echoes. Counts the request
    bodies grpc deserialised, to show a refused caller's body is never read."""

    def __init__(self):
        self.deserialised = 0

    def deserialize(self, data: bytes) -> bytes:
        self.deserialised += 1
        return data

    async def unary(self, request: bytes, context) -> bytes:
        caller = grpc_auth.current_caller()
        return (caller.name if caller else "?").encode()

    async def chat(self, requests, context):
        async for r in requests:
            yield r

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            "t.Echo",
            {
                "Ping": grpc.unary_unary_rpc_method_handler(self.unary, self.deserialize),
                "Admin": grpc.unary_unary_rpc_method_handler(self.unary, self.deserialize),
                "Chat": grpc.stream_stream_rpc_method_handler(self.chat, self.deserialize),
            },
        )


class LoopServer:
    def __init__(self, security: grpc_auth.ServerSecurity, quotas: grpc_auth.Quotas | None = None):
        self.echo = Echo()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.security = security

        async def start():
            server = grpc.aio.server(
                interceptors=[grpc_auth.AuthInterceptor(security.store, quotas or grpc_auth.Quotas(), service="echo")],
                options=[("grpc.max_receive_message_length", 32 << 20), ("grpc.so_reuseport", 0)],
            )
            server.add_generic_rpc_handlers([self.echo.handler()])
            creds = security.credentials()
            port = server.add_secure_port("127.0.0.1:0", creds) if creds else server.add_insecure_port("127.0.0.1:0")
            await server.start()
            return server, port

        self.server, self.port = asyncio.run_coroutine_threadsafe(start(), self.loop).result(WAIT_S)
        self.target = f"localhost:{self.port}"

    def close(self):
        asyncio.run_coroutine_threadsafe(self.server.stop(0), self.loop).result(WAIT_S)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(WAIT_S)


# -- certificates and files ---------------------------------------------------------------------------------------
@pytest.fixture
def pki(tmp_path) -> dict:
    ca, ca_key, ca_pem, _ = make_cert("echo CA", ca=True)
    _, _, server_pem, server_key = make_cert("echo-one", ca, ca_key, server=True)
    client_ca, client_ca_key, client_ca_pem, _ = make_cert("client CA", ca=True)
    clients = {cn: make_cert(cn, client_ca, client_ca_key)[2:] for cn in ("ops-bot", "stranger")}
    (tmp_path / "server.crt").write_bytes(server_pem)
    (tmp_path / "server.key").write_bytes(server_key)
    (tmp_path / "client-ca.crt").write_bytes(client_ca_pem)
    return {"dir": tmp_path, "ca": ca, "ca_key": ca_key, "ca_pem": ca_pem, "clients": clients}


def write_auth(path: Path, teams: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump({"teams": teams}))
    os.replace(tmp, path)  # as a Secret volume swaps its files: atomically


def default_teams() -> dict:
    return {
        "ops": {"token_sha256": [grpc_auth.token_hash(TOKENS["ops"])], "client_cn": ["ops-bot"]},
        "readers": {"token_sha256": [grpc_auth.token_hash(TOKENS["readers"])], "methods": ["Ping", "Chat"]},
    }


def settings(pki, mtls: bool = False, **kw) -> SecuritySettings:
    d = pki["dir"]
    auth = d / "teams.yaml"
    if not auth.exists():
        write_auth(auth, default_teams())
    base = dict(
        service="echo",
        prefix="ECHO_",
        tls_cert=str(d / "server.crt"),
        tls_key=str(d / "server.key"),
        tls_client_ca=str(d / "client-ca.crt") if mtls else "",
        auth_file=str(auth),
        methods=METHODS,
        reload_s=0.0,
    )
    return SecuritySettings(**{**base, **kw})


@pytest.fixture
def server(pki):
    s = LoopServer(grpc_auth.build(settings(pki)))
    yield s
    s.close()


def channel(target, ca_pem, token=None, client=None):
    key, cert = (client[1], client[0]) if client else (None, None)
    creds = grpc.ssl_channel_credentials(ca_pem, private_key=key, certificate_chain=cert)
    if token:
        creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(token))
    return grpc.secure_channel(target, creds, LOCAL)


def call(ch, method="Ping", body=b"hi", timeout=WAIT_S):
    return ch.unary_unary(f"/t.Echo/{method}")(body, timeout=timeout)


def code_of(fn) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value


def handshake(port, ca_pem, version=None) -> tuple[str, str]:
    """A raw TLS handshake (Python's ssl), optionally pinned to one protocol version: (version, server CN)."""
    ctx = ssl.create_default_context(cadata=ca_pem.decode())
    ctx.set_alpn_protocols(["h2"])
    if version is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx.minimum_version = ctx.maximum_version = version
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # let the client offer TLS 1.0/1.1 at all
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as sock:
        with ctx.wrap_socket(sock, server_hostname="localhost") as s:
            subject = dict(x[0] for x in s.getpeercert()["subject"])
            return str(s.version()), subject["commonName"]


# -- TLS ------------------------------------------------------------------------------------------------------
def assert_tls_floor(port, ca_pem):
    assert handshake(port, ca_pem)[0] == "TLSv1.3"  # 1.3 where the client supports it
    assert handshake(port, ca_pem, ssl.TLSVersion.TLSv1_2)[0] == "TLSv1.2"
    for old in (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1):
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            handshake(port, ca_pem, old)


def test_tls_12_minimum_and_13_negotiated(server, pki):
    assert_tls_floor(server.port, pki["ca_pem"])


def test_plaintext_client_cannot_call_the_tls_port(server):
    with grpc.insecure_channel(f"127.0.0.1:{server.port}", LOCAL) as plain:
        assert code_of(lambda: call(plain, timeout=10)).code() == grpc.StatusCode.UNAVAILABLE


def test_rotated_certificate_is_served_without_a_restart(server, pki):
    d = pki["dir"]
    assert handshake(server.port, pki["ca_pem"])[1] == "echo-one"
    # A new CA and server certificate, as a Secret rotation delivers them.
    ca2, ca2_key, ca2_pem, _ = make_cert("echo CA 2", ca=True)
    _, _, pem2, key2 = make_cert("echo-two", ca2, ca2_key, server=True)
    for name, data in (("server.key", key2), ("server.crt", pem2)):
        (d / (name + ".new")).write_bytes(data)
        os.replace(d / (name + ".new"), d / name)
    assert handshake(server.port, ca2_pem)[1] == "echo-two"
    assert server.security.certificates.reloads == 1
    with channel(server.target, ca2_pem, TOKENS["ops"]) as ch:
        assert call(ch) == b"ops"
    with channel(server.target, pki["ca_pem"], TOKENS["ops"]) as old:  # the old CA no longer verifies it
        assert code_of(lambda: call(old, timeout=10)).code() == grpc.StatusCode.UNAVAILABLE
    assert_tls_floor(server.port, ca2_pem)  # the reloaded configuration keeps the TLS floor
    # A half-written rotation (not a PEM key) is refused and the current certificate kept.
    (d / "server.key").write_bytes(b"not a key")
    assert handshake(server.port, ca2_pem)[1] == "echo-two"
    assert server.security.certificates.reloads == 1
    # A certificate whose key has not arrived yet (valid PEM, wrong key): grpc keeps the served one...
    (d / "server.key").write_bytes(key2)
    _, _, pem3, key3 = make_cert("echo-three", ca2, ca2_key, server=True)
    (d / "server.crt").write_bytes(pem3)
    assert handshake(server.port, ca2_pem)[1] == "echo-two"
    (d / "server.key").write_bytes(key3)  # ...until the pair matches
    assert handshake(server.port, ca2_pem)[1] == "echo-three"


# -- tokens, methods, client certificates ------------------------------------------------------------------------
def test_tokens_and_allowed_methods(server, pki, caplog):
    caplog.set_level(logging.DEBUG)
    with channel(server.target, pki["ca_pem"]) as none:
        err = code_of(lambda: call(none))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "Bearer" in err.details()
    with channel(server.target, pki["ca_pem"], "tok-wrong-" + "w" * 32) as wrong:
        assert code_of(lambda: call(wrong)).code() == grpc.StatusCode.UNAUTHENTICATED
    with channel(server.target, pki["ca_pem"], TOKENS["readers"]) as readers:
        assert call(readers) == b"readers"
        err = code_of(lambda: call(readers, "Admin"))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "'readers' may not call Admin" in err.details()
        chat = readers.stream_stream("/t.Echo/Chat")
        assert list(chat(iter([b"a", b"b"]), timeout=WAIT_S)) == [b"a", b"b"]
    with channel(server.target, pki["ca_pem"], TOKENS["ops"]) as ops:
        assert call(ops, "Admin") == b"ops"
    assert not any(t in caplog.text for t in TOKENS.values())


def test_auth_file_rotation_takes_effect_without_a_restart(server, pki):
    new_token = "tok-ops-rotated-" + "n" * 32
    with (
        channel(server.target, pki["ca_pem"], TOKENS["ops"]) as old,
        channel(server.target, pki["ca_pem"], new_token) as new,
    ):
        assert call(old) == b"ops"
        assert code_of(lambda: call(new)).code() == grpc.StatusCode.UNAUTHENTICATED
        teams = default_teams()
        teams["ops"]["token_sha256"] = [grpc_auth.token_hash(new_token)]
        teams["readers"]["methods"] = ["Chat"]
        write_auth(pki["dir"] / "teams.yaml", teams)
        assert call(new) == b"ops"
        assert code_of(lambda: call(old)).code() == grpc.StatusCode.UNAUTHENTICATED
    with channel(server.target, pki["ca_pem"], TOKENS["readers"]) as readers:
        assert code_of(lambda: call(readers)).code() == grpc.StatusCode.PERMISSION_DENIED


def test_mtls_client_certificate_cn_is_mapped_to_its_team(pki):
    s = LoopServer(grpc_auth.build(settings(pki, mtls=True)))
    try:
        ca = pki["ca_pem"]
        with channel(s.target, ca, client=pki["clients"]["ops-bot"]) as bot:
            assert call(bot, "Admin") == b"ops"  # no token: the certificate's CN is the identity
        with channel(s.target, ca, TOKENS["readers"], client=pki["clients"]["ops-bot"]) as both:
            assert call(both) == b"readers"  # a token, when sent, decides
        with channel(s.target, ca, client=pki["clients"]["stranger"]) as stranger:
            err = code_of(lambda: call(stranger))
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "'stranger' is not mapped" in err.details()
        with channel(s.target, ca, TOKENS["ops"]) as no_cert:  # mTLS: no certificate, no handshake
            assert code_of(lambda: call(no_cert, timeout=10)).code() == grpc.StatusCode.UNAVAILABLE
    finally:
        s.close()


def test_a_refused_callers_large_body_is_never_read(server, pki):
    body = b"x" * (16 << 20)
    with channel(server.target, pki["ca_pem"]) as none:
        assert code_of(lambda: call(none, body=body)).code() == grpc.StatusCode.UNAUTHENTICATED
    with channel(server.target, pki["ca_pem"], TOKENS["readers"]) as readers:
        assert code_of(lambda: call(readers, "Admin", body=body)).code() == grpc.StatusCode.PERMISSION_DENIED
        assert server.echo.deserialised == 0, "a refused request's body was read"
        assert call(readers, body=b"small") == b"readers"
    assert server.echo.deserialised == 1


# -- quotas across replicas ---------------------------------------------------------------------------------------
def test_quota_split_over_replicas_holds_globally():
    now = [0.0]
    replicas = [grpc_auth.Quotas(lambda: now[0], replicas=2) for _ in range(2)]
    team = Team("t", tokens_per_minute=600, max_concurrent=4)
    admitted = 0
    refused = set()
    for i in range(200):  # a client spreading 10-token requests over both replicas
        try:
            replicas[i % 2].charge(team, 10)
            admitted += 10
        except grpc_auth.QuotaExceeded as exc:
            assert "tokens per minute (this replica's share of 2)" in str(exc)
            refused.add(i % 2)
    assert admitted == 600 and refused == {0, 1}  # the team's quota, not 2 x 600
    now[0] += 30.0  # half a minute refills half the quota, over both replicas together
    for i in range(200):
        try:
            replicas[i % 2].charge(team, 10)
            admitted += 10
        except grpc_auth.QuotaExceeded:
            pass
    assert admitted == 900
    with pytest.raises(grpc_auth.QuotaExceeded, match="retry after"):
        replicas[0].check(team)  # an empty bucket refuses before any work is done
    for q in replicas:  # max_concurrent 4 over 2 replicas: 2 each
        q.acquire(team)
        q.acquire(team)
        with pytest.raises(grpc_auth.QuotaExceeded, match="limit is 2"):
            q.acquire(team)


# -- settings -----------------------------------------------------------------------------------------------------
def test_settings_refuse_to_start_naming_the_variable(pki, caplog):
    d = pki["dir"]
    with pytest.raises(ConfigError, match="ECHO_TLS_CERT and ECHO_TLS_KEY"):
        grpc_auth.build(settings(pki, tls_cert="", tls_key=""))
    with pytest.raises(ConfigError, match="ECHO_AUTH_FILE"):
        grpc_auth.build(settings(pki, auth_file=""))
    with pytest.raises(ConfigError, match="ECHO_PLAINTEXT=true contradicts"):
        grpc_auth.build(settings(pki, plaintext=True))
    with pytest.raises(ConfigError, match="ECHO_TLS_KEY=.* is not a PEM file"):
        grpc_auth.build(settings(pki, tls_key=str(d / "server.crt")))
    write_auth(d / "bad.yaml", {"x": {"token_sha256": ["0" * 64], "methods": ["Delete"]}})
    with pytest.raises(ConfigError, match="unknown methods"):
        grpc_auth.build(settings(pki, auth_file=str(d / "bad.yaml")))
    write_auth(d / "cn.yaml", {"a": {"client_cn": ["x"]}, "b": {"client_cn": ["x"]}})
    with pytest.raises(ConfigError, match="client_cn repeats"):
        grpc_auth.build(settings(pki, auth_file=str(d / "cn.yaml")))
    caplog.set_level(logging.WARNING)
    dev = grpc_auth.build(settings(pki, tls_cert="", tls_key="", plaintext=True, auth_file="", allow_anonymous=True))
    assert dev.credentials() is None and dev.store is None
    assert "PLAINTEXT" in caplog.text and "without a token" in caplog.text


def test_an_oversized_body_is_still_resource_exhausted(server, pki):
    with channel(server.target, pki["ca_pem"], TOKENS["ops"]) as ops:  # over the server's 32 MiB limit
        err = code_of(lambda: call(ops, body=b"x" * (33 << 20)))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
        assert call(ops) == b"ops"


def test_one_model_check_for_the_interceptor_and_a_multi_model_server():
    # The auth file's `models`: the interceptor (one-model servers) and refscore's per-request check
    # (several models) both ask Team.model_refusal, so they refuse alike.
    limited = Team("ranking", models=frozenset({"reviews-b", "reviews-a"}))
    assert limited.model_refusal("reviews-a") is None
    assert limited.model_refusal("other") == "team 'ranking' may not use model 'other'; allowed: reviews-a, reviews-b"
    assert Team("none-allowed", models=frozenset()).model_refusal("x").endswith("allowed: none")
    assert Team("any").model_refusal("whatever") is None
