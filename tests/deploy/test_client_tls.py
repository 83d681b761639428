"""The client settings deploy/ gives the services (prod's offdpo-kafka-client and offdpo-s3-client
ConfigMaps) reach real TLS handshakes verified against the deployment's CA: Kafka over SASL_SSL with
SCRAM-SHA-512, S3 over HTTPS with OFFDPO_S3_CA_FILE. Loopback servers made here stand in for the
broker and MinIO (the local stack's Tansu and SeaweedFS speak plaintext); what is under test is our
client configuration, so the handshakes are the part that must be real. Without the CA, both refuse."""

from __future__ import annotations

import http.server
import ssl
import struct
import threading
from pathlib import Path

import pytest
import urllib3

from offdpo.config import KafkaConfig, S3Config
from offdpo.s3 import ObjectStore
from tests.deploy.test_least_privilege import _configmap
from tests.pki import LoopbackTLSServer, kafka_connect_once, make_cert

KAFKA_API_KEYS_BEFORE_AUTH = {17, 18}  # SaslHandshake, ApiVersions: what a client sends first


@pytest.fixture
def pki(tmp_path) -> dict[str, Path]:
    ca, ca_key, ca_pem, _ = make_cert("offdpo test CA", ca=True)
    _, _, server_pem, server_key = make_cert("server", ca, ca_key, server=True)
    _, _, other_ca_pem, _ = make_cert("another CA", ca=True)
    files = {"ca.crt": ca_pem, "tls.crt": server_pem, "tls.key": server_key, "other-ca.crt": other_ca_pem}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return {name: tmp_path / name for name in files}


def _server_context(pki) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(pki["tls.crt"], pki["tls.key"])
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def _prod_env(overlays, name: str, **replace: str) -> dict[str, str]:
    env = dict(_configmap(overlays["prod"], name))
    env.update(replace)
    return env


# -- Kafka --------------------------------------------------------------------------------------------------
class TLSBroker(LoopbackTLSServer):
    """Completes the TLS handshake, reads the api key of the client's first Kafka request, hangs up."""

    def __init__(self, pki):
        super().__init__(_server_context(pki))
        self.api_keys: list[int] = []

    def on_connection(self, tls) -> None:
        head = tls.recv(6)
        if len(head) == 6:
            self.api_keys.append(struct.unpack(">ih", head)[1])


def _connect(cfg: KafkaConfig) -> None:
    kafka_connect_once(cfg.client_kwargs())


def test_kafka_clients_of_prod_speak_sasl_over_verified_tls(overlays, pki):
    with TLSBroker(pki) as broker:
        env = _prod_env(
            overlays,
            "offdpo-kafka-client",
            OFFDPO_KAFKA_BOOTSTRAP=f"localhost:{broker.port}",
            OFFDPO_KAFKA_SSL_CAFILE=str(pki["ca.crt"]),
            OFFDPO_KAFKA_SASL_USERNAME="offdpo-refscore",
            OFFDPO_KAFKA_SASL_PASSWORD="test-password",
        )
        cfg = KafkaConfig.from_env(env)
        assert (cfg.security_protocol, cfg.sasl_mechanism) == ("SASL_SSL", "SCRAM-SHA-512")
        kwargs = cfg.client_kwargs()
        assert (kwargs["sasl_mechanism"], kwargs["sasl_plain_username"]) == ("SCRAM-SHA-512", "offdpo-refscore")
        _connect(cfg)
        # TLS completed (the broker's certificate verified against the CA and its host name) and the
        # client went on to speak Kafka inside it.
        assert set(broker.api_keys) & KAFKA_API_KEYS_BEFORE_AUTH, (broker.api_keys, broker.failures)

        broker.api_keys.clear()
        _connect(KafkaConfig.from_env({**env, "OFFDPO_KAFKA_SSL_CAFILE": str(pki["other-ca.crt"])}))
        assert not broker.api_keys, "a broker certificate from another CA must be refused"


def test_sasl_without_credentials_is_refused_before_connecting():
    from offdpo.errors import ConfigError

    with pytest.raises(ConfigError, match="OFFDPO_KAFKA_SASL_USERNAME"):
        KafkaConfig(security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512").client_kwargs()


# -- S3 -------------------------------------------------------------------------------------------------------
class TLSObjectStore:
    """An HTTPS server answering HEAD on the bucket, recording the access key of each signed request."""

    def __init__(self, pki, bucket: str):
        seen = self.access_keys = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_HEAD(self):  # noqa: N802 - http.server's naming
                auth = self.headers.get("Authorization", "")
                seen.append(auth.split("Credential=")[1].split("/")[0] if "Credential=" in auth else "")
                self.send_response(200 if self.path.rstrip("/") == f"/{bucket}" else 404)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.socket = _server_context(pki).wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(5)


def test_s3_clients_of_prod_use_https_verified_against_the_ca(overlays, pki):
    bucket = _configmap(overlays["prod"], "offdpo-s3-client")["OFFDPO_S3_BUCKET"]
    with TLSObjectStore(pki, bucket) as server:
        env = _prod_env(
            overlays,
            "offdpo-s3-client",
            OFFDPO_S3_ENDPOINT=f"localhost:{server.port}",
            OFFDPO_S3_CA_FILE=str(pki["ca.crt"]),
            OFFDPO_S3_ACCESS_KEY="refscore-access-key",
            OFFDPO_S3_SECRET_KEY="refscore-secret-key",
            OFFDPO_S3_RETRY_MAX_S="0",
        )
        cfg = S3Config.from_env(env)
        assert cfg.secure
        assert ObjectStore(cfg).client.bucket_exists(bucket)
        assert server.access_keys == ["refscore-access-key"], "the service's own identity signed the request"

        wrong_ca = S3Config.from_env({**env, "OFFDPO_S3_CA_FILE": str(pki["other-ca.crt"])})
        with pytest.raises(urllib3.exceptions.SSLError):
            ObjectStore(wrong_ca).client.bucket_exists(bucket)
        assert server.access_keys == ["refscore-access-key"], "nothing was sent to an unverified server"


def test_a_ca_file_without_https_is_a_configuration_error():
    from offdpo.errors import ConfigError

    with pytest.raises(ConfigError, match="OFFDPO_S3_SECURE"):
        ObjectStore(S3Config(secure=False, ca_file="/etc/offdpo/ca/ca.crt"))
