"""Certificates made on the spot for TLS tests (EC P-256, one day): a CA, or a leaf signed by one."""

from __future__ import annotations

import datetime
import ipaddress


def _pem_key(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_cert(subject: str, issuer_cert=None, issuer_key=None, *, ca: bool = False, server: bool = False):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_cert.subject if issuer_cert is not None else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    else:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
    cert = builder.sign(issuer_key if issuer_key is not None else key, hashes.SHA256())
    return cert, key, cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


class LoopbackTLSServer:
    """A loopback TCP server that completes (or fails) the TLS handshake with `ctx`, hands each
    connection to `on_connection(tls)`, records handshake failures by type, and hangs up: a stand-in
    for a TLS broker or S3 endpoint where the handshake is the part under test."""

    def __init__(self, ctx):
        import socket
        import threading

        self.ctx = ctx
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def on_connection(self, tls) -> None:
        """What to read from a connection whose handshake succeeded (subclasses)."""

    def _serve(self):
        import ssl

        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            conn.settimeout(5)
            try:
                with self.ctx.wrap_socket(conn, server_side=True) as tls:
                    self.on_connection(tls)
            except (ssl.SSLError, OSError) as exc:
                self.failures.append(type(exc).__name__)
                conn.close()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


def kafka_connect_once(client_kwargs: dict) -> None:
    """Bootstrap a Kafka client once against a LoopbackTLSServer (which hangs up after the handshake,
    so the client gives up quickly). api_version given: no version probe (it would block ~30 s); the
    metadata request makes the client connect and authenticate."""
    from kafka import KafkaProducer
    from kafka.errors import KafkaError

    producer = KafkaProducer(**client_kwargs, max_block_ms=2000, api_version=(2, 8, 0))
    try:
        producer.partitions_for("offdpo.pairs.v1")
    except KafkaError:
        pass
    finally:
        producer.close(timeout=1)
