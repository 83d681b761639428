"""TLS for a gRPC port: server certificate and key, a client CA for mutual TLS, reloaded without a restart.

The credentials are grpc's dynamic SSL server credentials: on every new connection's handshake grpc
asks `CertificateFiles.fetch`, which re-reads the PEM files when they have changed (checked at most
every `reload_s`; a Kubernetes Secret update swaps them atomically) and hands grpc the new
configuration; open connections keep theirs. A changed set that does not load (a half-written file,
a key that does not match) is logged, and grpc keeps the previous certificate.

TLS versions: grpc core's SSL server credentials accept TLS 1.2 and 1.3 (grpc_ssl_server_config in
src/core/credentials/transport/ssl/ssl_security_connector.h: min TLS1_2, max TLS1_3; grpcio 1.85.1
exposes no setting for it). A client offering only TLS 1.0/1.1 fails the handshake, TLS 1.3 is
negotiated where the client supports it; tests/test_grpc_auth.py checks both, after a reload too.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time

import grpc

from offdpo.errors import ConfigError
from offdpo.grpc_auth.files import read_limited

log = logging.getLogger(__name__)


def read_pem(path: str, var: str, marker: bytes) -> bytes:
    data = read_limited(path, var)
    if b"-----BEGIN " not in data or marker not in data:  # never echo the content: it may be a key
        raise ConfigError(f"{var}={path!r} is not a PEM file holding a {marker.decode()}")
    return data


@dataclasses.dataclass(frozen=True)
class TlsFiles:
    """Paths of the PEM files and the variables that name them (for error messages)."""

    cert: str
    key: str
    client_ca: str = ""
    cert_var: str = "TLS_CERT"
    key_var: str = "TLS_KEY"
    client_ca_var: str = "TLS_CLIENT_CA"


class CertificateFiles:
    """The PEM files of a server's TLS, re-read when they change."""

    def __init__(self, files: TlsFiles, reload_s: float = 5.0, service: str = "gRPC"):
        self.files = files
        self.reload_s = reload_s
        self.service = service
        self._lock = threading.Lock()
        self._stamp = self._stat()
        self.config = self._load()  # raises ConfigError: a server never starts on bad files
        self._checked = time.monotonic()
        self.reloads = 0

    def _paths(self) -> list[str]:
        return [p for p in (self.files.cert, self.files.key, self.files.client_ca) if p]

    def _stat(self) -> tuple[tuple[int, int, int] | None, ...]:
        out: list[tuple[int, int, int] | None] = []
        for path in self._paths():
            try:
                st = os.stat(path)
                out.append((st.st_mtime_ns, st.st_size, st.st_ino))
            except OSError:
                out.append(None)
        return tuple(out)

    def _load(self) -> grpc.ServerCertificateConfiguration:
        f = self.files
        cert = read_pem(f.cert, f.cert_var, b"CERTIFICATE")
        key = read_pem(f.key, f.key_var, b"PRIVATE KEY")
        ca = read_pem(f.client_ca, f.client_ca_var, b"CERTIFICATE") if f.client_ca else None
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """grpc's certificate-configuration fetcher: a new configuration when the files changed, else None."""
        with self._lock:
            now = time.monotonic()
            if now - self._checked < self.reload_s:
                return None
            self._checked = now
            stamp = self._stat()
            if stamp == self._stamp or None in stamp:
                return None
            try:
                config = self._load()
            except ConfigError as exc:
                log.error(
                    "%s TLS files changed but do not load; keeping the previous certificate: %s", self.service, exc
                )
                return None
            self._stamp, self.config = stamp, config
            self.reloads += 1
        log.info("%s TLS certificate reloaded from %s", self.service, self.files.cert)
        return config

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self.config, self.fetch, require_client_authentication=bool(self.files.client_ca)
        )
