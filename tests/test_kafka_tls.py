"""Kafka client TLS settings reach a real TLS handshake: a loopback TLS server that, like a broker
with `ssl.client.auth=required`, demands a client certificate signed by its CA and records whom it
saw. (The local Tansu broker speaks plaintext only; what is under test is our configuration, so the
handshake is the part that must be real.)"""

from __future__ import annotations

import dataclasses
import ssl

import pytest

from offdpo.config import KafkaConfig
from tests.pki import LoopbackTLSServer, kafka_connect_once, make_cert


@pytest.fixture
def pki(tmp_path):
    ca, ca_key, ca_pem, _ = make_cert("kafka test CA", ca=True)
    _, _, broker_pem, broker_key = make_cert("broker", ca, ca_key, server=True)
    _, _, client_pem, client_key = make_cert("refscore-worker", ca, ca_key)
    files = {
        "ca": ca_pem,
        "broker.crt": broker_pem,
        "broker.key": broker_key,
        "client.crt": client_pem,
        "client.key": client_key,
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return {name: str(tmp_path / name) for name in files}


class MutualTLSListener(LoopbackTLSServer):
    """Accepts connections, completes (or fails) the TLS handshake, records the client's CN, hangs up."""

    def __init__(self, pki):
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=pki["ca"])
        ctx.load_cert_chain(pki["broker.crt"], pki["broker.key"])
        ctx.verify_mode = ssl.CERT_REQUIRED
        super().__init__(ctx)
        self.client_names: list[str] = []

    def on_connection(self, tls) -> None:
        subject = dict(x[0] for x in tls.getpeercert()["subject"])
        self.client_names.append(subject["commonName"])


def _connect(cfg: KafkaConfig) -> None:
    kafka_connect_once(cfg.client_kwargs())


def test_client_certificate_from_the_environment_reaches_the_handshake(pki, monkeypatch):
    with MutualTLSListener(pki) as broker:
        monkeypatch.setenv("OFFDPO_KAFKA_BOOTSTRAP", f"127.0.0.1:{broker.port}")
        monkeypatch.setenv("OFFDPO_KAFKA_SECURITY_PROTOCOL", "SSL")
        monkeypatch.setenv("OFFDPO_KAFKA_SSL_CAFILE", pki["ca"])
        monkeypatch.setenv("OFFDPO_KAFKA_SSL_CERTFILE", pki["client.crt"])
        monkeypatch.setenv("OFFDPO_KAFKA_SSL_KEYFILE", pki["client.key"])
        cfg = KafkaConfig.from_env()
        _connect(cfg)
        assert "refscore-worker" in broker.client_names, broker.failures

        # Without the certificate the broker refuses the handshake: the setting is what made it work.
        broker.client_names.clear()
        _connect(dataclasses.replace(cfg, ssl_certfile="", ssl_keyfile=""))
        assert not broker.client_names and broker.failures


def test_the_key_password_is_a_secret():
    assert KafkaConfig.env_vars()["OFFDPO_KAFKA_SSL_PASSWORD"]["secret"]
    assert "hunter2" not in repr(KafkaConfig(ssl_password="hunter2"))
