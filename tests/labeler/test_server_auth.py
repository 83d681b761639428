"""The labeler's gRPC API behind the shared auth layer, through real TLS handshakes (Kafka is the
in-memory fake of tests/fakes.py): no token -> UNAUTHENTICATED, a team allowed SubmitCandidates
calling SubmitJudgement -> PERMISSION_DENIED, plaintext against the TLS port -> UNAVAILABLE, an mTLS
client certificate mapped to its team, certificate and auth-file rotation without a restart;
`serve` refuses insecure settings with exit 2 before it connects to Kafka; and the rules file's
`callable:` import allow-list.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from pathlib import Path

import grpc
import pytest
import yaml

from offdpo import grpc_auth, records
from offdpo.config import KafkaConfig
from offdpo.v1 import labeler_pb2, labeler_pb2_grpc
from services.labeler import __main__ as cli
from services.labeler.config import LabelerConfig
from services.labeler.errors import RulesError
from services.labeler.rules import RuleSet, register_check
from services.labeler.runner import build_labeler, close_labeler
from services.labeler.server import start_server
from services.labeler.server_config import LabelerServerConfig
from tests.fakes import FakeBroker, FakeProducer
from tests.pki import make_cert

SAMPLES = Path(__file__).resolve().parents[2] / "services" / "labeler" / "samples"
WAIT_S = 30
TOKENS = {"producers": "tok-producers-" + "p" * 32, "humans": "tok-humans-" + "h" * 32}
LOCAL = [("grpc.use_local_subchannel_pool", 1)]  # each channel handshakes anew
KAFKA = KafkaConfig()


def teams(producers_token: str = TOKENS["producers"]) -> dict:
    return {
        "producers": {"token_sha256": [grpc_auth.token_hash(producers_token)], "methods": ["SubmitCandidates"]},
        "humans": {
            "token_sha256": [grpc_auth.token_hash(TOKENS["humans"])],
            "client_cn": ["annotation-app"],
            "methods": ["SubmitJudgement"],
            "max_concurrent": 2,
        },
    }


def write(path: Path, data: bytes) -> None:
    path.with_suffix(".new").write_bytes(data)
    os.replace(path.with_suffix(".new"), path)  # atomically, as a Secret volume is updated


@pytest.fixture
def pki(tmp_path):
    ca, ca_key, ca_pem, _ = make_cert("labeler test CA", ca=True)
    _, _, server_pem, server_key = make_cert("labeler-one", ca, ca_key, server=True)
    client_ca, client_ca_key, client_ca_pem, _ = make_cert("client CA", ca=True)
    _, _, app_pem, app_key = make_cert("annotation-app", client_ca, client_ca_key)
    write(tmp_path / "tls.crt", server_pem)
    write(tmp_path / "tls.key", server_key)
    write(tmp_path / "client-ca.crt", client_ca_pem)
    write(tmp_path / "teams.yaml", yaml.safe_dump({"teams": teams()}).encode())
    return {"dir": tmp_path, "ca_pem": ca_pem, "app": (app_pem, app_key)}


def server_config(pki, mtls: bool = False) -> LabelerServerConfig:
    d = pki["dir"]
    return LabelerServerConfig(
        tls_cert=str(d / "tls.crt"),
        tls_key=str(d / "tls.key"),
        tls_client_ca=str(d / "client-ca.crt") if mtls else "",
        auth_file=str(d / "teams.yaml"),
    )


class Served:
    """The labeler's gRPC server (on a fake broker) on an event loop in a background thread."""

    def __init__(self, tmp_path: Path, security: grpc_auth.ServerSecurity):
        self.broker = FakeBroker(partitions=1)
        cfg = LabelerConfig(state_dir=str(tmp_path / "state"), rules_file=str(SAMPLES / "rules.yaml"), batch_size=8)
        self.labeler = build_labeler(cfg, KAFKA, producer=FakeProducer(self.broker))
        self.security = security
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server, self.port = asyncio.run_coroutine_threadsafe(
            start_server(self.labeler, "127.0.0.1", 0, security), self.loop
        ).result(WAIT_S)
        self.target = f"localhost:{self.port}"

    def pairs(self) -> list:
        return [records.decode_pair(v) for v in self.broker.values(KAFKA.pairs_topic)]

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(0), self.loop).result(WAIT_S)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(WAIT_S)
        close_labeler(self.labeler)


@pytest.fixture
def served(tmp_path, pki):
    s = Served(tmp_path, grpc_auth.build(server_config(pki).security()))
    s.security.certificates.reload_s = s.security.store.reload_s = 0.0  # see rotations at once
    yield s
    s.close()


def stub(target, ca_pem, token=None, client=None) -> tuple[grpc.Channel, labeler_pb2_grpc.LabelerStub]:
    cert, key = client or (None, None)
    creds = grpc.ssl_channel_credentials(ca_pem, private_key=key, certificate_chain=cert)
    if token:
        creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(token))
    ch = grpc.secure_channel(target, creds, LOCAL)
    return ch, labeler_pb2_grpc.LabelerStub(ch)


def candidates() -> labeler_pb2.SubmitCandidatesRequest:
    cs = labeler_pb2.CandidateSet(
        set_id="s1", prompt=records.chat_prompt([("user", "2+2?")]), answers=["Sorry, I cannot.", "4"], reference="4"
    )
    return labeler_pb2.SubmitCandidatesRequest(sets=[cs], strategy="rules")


def judgement() -> labeler_pb2.HumanJudgement:
    return labeler_pb2.HumanJudgement(
        prompt=records.text_prompt("Best fruit?"), answer_a="apple", answer_b="rock", verdict="Good", annotator="erin"
    )


def error(fn) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value


# -- tokens and methods over TLS ------------------------------------------------------------------------------
def test_no_token_other_teams_method_and_plaintext_are_refused(served, pki, caplog):
    caplog.set_level(logging.DEBUG)
    ch, anonymous = stub(served.target, pki["ca_pem"])
    with ch:
        err = error(lambda: anonymous.SubmitCandidates(candidates(), timeout=WAIT_S))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "Bearer" in err.details()
        assert error(lambda: anonymous.SubmitJudgement(judgement(), timeout=WAIT_S)).code() == (
            grpc.StatusCode.UNAUTHENTICATED
        )
    ch, producers = stub(served.target, pki["ca_pem"], TOKENS["producers"])
    with ch:
        err = error(lambda: producers.SubmitJudgement(judgement(), timeout=WAIT_S))
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "'producers' may not call SubmitJudgement" in err.details()
        assert served.pairs() == [], "a refused call published a pair"
        resp = producers.SubmitCandidates(candidates(), timeout=WAIT_S)
        assert resp.results[0].pair_ids and len(served.pairs()) == 1
    ch, humans = stub(served.target, pki["ca_pem"], TOKENS["humans"])
    with ch:
        assert humans.SubmitJudgement(judgement(), timeout=WAIT_S).published
        assert error(lambda: humans.SubmitCandidates(candidates(), timeout=WAIT_S)).code() == (
            grpc.StatusCode.PERMISSION_DENIED
        )
    with grpc.insecure_channel(f"127.0.0.1:{served.port}", LOCAL) as plain:
        plain_stub = labeler_pb2_grpc.LabelerStub(plain)
        assert error(lambda: plain_stub.SubmitCandidates(candidates(), timeout=10)).code() == (
            grpc.StatusCode.UNAVAILABLE
        )
    assert not any(t in caplog.text for t in TOKENS.values()), "a token reached the log"


def test_health_stays_open(served, pki):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    ch, _ = stub(served.target, pki["ca_pem"])
    with ch:
        status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=WAIT_S).status
        assert status == health_pb2.HealthCheckResponse.SERVING


def test_rotated_certificate_and_auth_file_take_effect_without_a_restart(served, pki):
    d = pki["dir"]
    rotated = "tok-producers-rotated-" + "r" * 32
    ca2, ca2_key, ca2_pem, _ = make_cert("labeler test CA 2", ca=True)
    _, _, pem2, key2 = make_cert("labeler-two", ca2, ca2_key, server=True)
    write(d / "tls.key", key2)
    write(d / "tls.crt", pem2)
    write(d / "teams.yaml", yaml.safe_dump({"teams": teams(rotated)}).encode())
    ch, old_ca = stub(served.target, pki["ca_pem"], rotated)
    with ch:  # the old CA no longer verifies the server
        assert error(lambda: old_ca.SubmitCandidates(candidates(), timeout=10)).code() == grpc.StatusCode.UNAVAILABLE
    ch, old_token = stub(served.target, ca2_pem, TOKENS["producers"])
    with ch:
        assert error(lambda: old_token.SubmitCandidates(candidates(), timeout=WAIT_S)).code() == (
            grpc.StatusCode.UNAUTHENTICATED
        )
    ch, new = stub(served.target, ca2_pem, rotated)
    with ch:
        assert new.SubmitCandidates(candidates(), timeout=WAIT_S).results[0].pair_ids
    assert served.security.certificates.reloads == 1


def test_mtls_client_certificate_is_mapped_to_its_team(tmp_path, pki):
    s = Served(tmp_path, grpc_auth.build(server_config(pki, mtls=True).security()))
    try:
        ch, app = stub(s.target, pki["ca_pem"], client=pki["app"])  # CN annotation-app -> team humans
        with ch:
            assert app.SubmitJudgement(judgement(), timeout=WAIT_S).published
            err = error(lambda: app.SubmitCandidates(candidates(), timeout=WAIT_S))
            assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "'humans'" in err.details()
        ch, no_cert = stub(s.target, pki["ca_pem"], TOKENS["producers"])
        with ch:  # mTLS: without a client certificate the handshake fails
            assert error(lambda: no_cert.SubmitCandidates(candidates(), timeout=10)).code() == (
                grpc.StatusCode.UNAVAILABLE
            )
    finally:
        s.close()


# -- serve refuses insecure settings before connecting -----------------------------------------------------------
@pytest.mark.parametrize(
    "env, variable",
    [
        ({}, "OFFDPO_LABELER_TLS_CERT"),
        ({"OFFDPO_LABELER_PLAINTEXT": "true"}, "OFFDPO_LABELER_AUTH_FILE"),
        ({"OFFDPO_LABELER_PLAINTEXT": "true", "OFFDPO_LABELER_TLS_CERT": "x.pem"}, "OFFDPO_LABELER_PLAINTEXT"),
        ({"OFFDPO_LABELER_TLS_CERT": "/nonexistent/tls.crt", "OFFDPO_LABELER_TLS_KEY": "k"}, "OFFDPO_LABELER_TLS_CERT"),
    ],
)
def test_serve_exits_2_naming_the_variable_before_connecting(monkeypatch, caplog, env, variable):
    for name in LabelerServerConfig.env_vars():
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)

    def no_kafka(*a, **kw):
        raise AssertionError("serve connected to Kafka before checking its security settings")

    monkeypatch.setattr(cli, "build_labeler", no_kafka)
    caplog.set_level(logging.ERROR)
    assert cli.main(["serve", "--port", "0"]) == 2
    assert variable in caplog.text


def test_serve_local_development_is_explicit(monkeypatch, caplog):
    for name in LabelerServerConfig.env_vars():
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OFFDPO_LABELER_PLAINTEXT", "true")
    monkeypatch.setenv("OFFDPO_LABELER_ALLOW_ANONYMOUS", "true")
    caplog.set_level(logging.WARNING)
    security = cli._serve_security()
    assert security.credentials() is None and security.store is None
    assert "PLAINTEXT" in caplog.text and "without a token" in caplog.text


# -- rules: callable import paths only from allowed packages -------------------------------------------------------
def rule(callable_: str) -> dict:
    return {"rules": [{"name": "c", "type": "python", "callable": callable_}]}


def test_rules_callable_paths_are_off_by_default_and_registered_names_work(monkeypatch):
    monkeypatch.delenv("OFFDPO_LABELER_RULES_CALLABLE_PACKAGES", raising=False)
    register_check("always")(lambda a, cs: True)
    assert RuleSet.from_dict(rule("always")).rules[0].name == "c"  # a registered name
    # A path naming a registered check is that check (nothing is imported).
    RuleSet.from_dict(rule("services.labeler.rules:_no_empty_lines"))
    for spec in ("shutil:rmtree", "os:system", "tests.labeler.test_server_auth:rule"):
        with pytest.raises(RulesError, match="not in an allowed package.*OFFDPO_LABELER_RULES_CALLABLE_PACKAGES"):
            RuleSet.from_dict(rule(spec))
    with pytest.raises(RulesError, match="must be 'package.module:function'"):
        RuleSet.from_dict(rule("os;rm:x"))


def test_rules_callable_paths_from_an_allow_listed_package(monkeypatch):
    monkeypatch.setenv("OFFDPO_LABELER_RULES_CALLABLE_PACKAGES", "tests.labeler, other")
    rs = RuleSet.from_dict(rule("tests.labeler.test_server_auth:starts_with_four"))
    assert rs.score("4 it is", labeler_pb2.CandidateSet())[0] == 1.0
    assert rs.score("five", labeler_pb2.CandidateSet())[0] == 0.0
    with pytest.raises(RulesError, match="not a function defined in"):  # a name the module imported
        RuleSet.from_dict(rule("tests.labeler.test_server_auth:make_cert"))
    with pytest.raises(RulesError, match="not in an allowed package"):  # a prefix is not a package
        RuleSet.from_dict(rule("tests.labeler_evil:x"))
    assert RuleSet.from_dict(rule("shutil:rmtree"), callable_packages=("shutil",))  # explicit, by the caller
    with pytest.raises(RulesError, match="not in an allowed package"):
        RuleSet.from_dict(rule("tests.labeler.test_server_auth:starts_with_four"), callable_packages=())


def starts_with_four(answer: str, cs) -> bool:
    return answer.startswith("4")


def test_the_health_only_port_answers_kubelet_in_plaintext_and_serves_nothing_else():
    import asyncio

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from offdpo.v1 import labeler_pb2, labeler_pb2_grpc
    from services.labeler.server import start_health_port

    async def check() -> None:
        server, port = await start_health_port("127.0.0.1", 0)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await labeler_pb2_grpc.LabelerStub(channel).SubmitCandidates(
                        labeler_pb2.SubmitCandidatesRequest(), timeout=10
                    )
                assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
        finally:
            await server.stop(None)

    asyncio.run(check())
