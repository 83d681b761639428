"""A service's security settings -> TLS credentials and a token store, or a refusal naming the variable.

Both are required unless the environment says explicitly that this is local development:
`<PREFIX>PLAINTEXT=true` (no TLS) and `<PREFIX>ALLOW_ANONYMOUS=true` (no auth file); each logs a
SECURITY warning. A contradictory pair (PLAINTEXT with a certificate, ALLOW_ANONYMOUS with an auth
file) is an error too. Services call `build` before they connect to anything, so a bad setting
stops `serve` at once with exit 2.
"""

from __future__ import annotations

import dataclasses
import logging

import grpc

from offdpo.errors import ConfigError
from offdpo.grpc_auth.auth import TokenStore
from offdpo.grpc_auth.tls import CertificateFiles, TlsFiles

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SecuritySettings:
    """The values of a service's security variables; `prefix` names them (e.g. "OFFDPO_LABELER_")."""

    service: str
    prefix: str
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    plaintext: bool = False
    auth_file: str = ""
    allow_anonymous: bool = False
    methods: frozenset[str] | None = None  # the service's method names (auth-file validation)
    reload_s: float = 5.0  # how often changed certificate and auth files are looked for

    def var(self, name: str) -> str:
        return f"{self.prefix}{name}"


@dataclasses.dataclass
class ServerSecurity:
    """What a server needs: credentials (None: explicit plaintext) and a token store (None: explicit
    anonymous access)."""

    certificates: CertificateFiles | None
    store: TokenStore | None

    def credentials(self) -> grpc.ServerCredentials | None:
        return self.certificates.credentials() if self.certificates is not None else None

    @property
    def mtls(self) -> bool:
        return self.certificates is not None and bool(self.certificates.files.client_ca)


def certificates(s: SecuritySettings) -> CertificateFiles | None:
    """The server's certificate files (checked now); None for explicit, warned plaintext."""
    tls_vars = {s.var("TLS_CERT"): s.tls_cert, s.var("TLS_KEY"): s.tls_key, s.var("TLS_CLIENT_CA"): s.tls_client_ca}
    if s.plaintext:
        if any(tls_vars.values()):
            raise ConfigError(
                f"{s.var('PLAINTEXT')}=true contradicts {sorted(k for k, v in tls_vars.items() if v)}:"
                f" unset one of them"
            )
        log.warning(
            "SECURITY: %s serves gRPC in PLAINTEXT (%s=true): tokens and data cross the network unencrypted. "
            "Local development only; set %s/_KEY in production.",
            s.service,
            s.var("PLAINTEXT"),
            s.var("TLS_CERT"),
        )
        return None
    if not (s.tls_cert and s.tls_key):
        raise ConfigError(
            f"{s.service} serves gRPC over TLS: set {s.var('TLS_CERT')} and {s.var('TLS_KEY')} "
            f"(PEM files, mounted from a Secret), or {s.var('PLAINTEXT')}=true for local development"
        )
    files = TlsFiles(
        s.tls_cert, s.tls_key, s.tls_client_ca, s.var("TLS_CERT"), s.var("TLS_KEY"), s.var("TLS_CLIENT_CA")
    )
    certs = CertificateFiles(files, s.reload_s, s.service)
    log.info("%s gRPC over TLS%s", s.service, " with client certificates required (mTLS)" if s.tls_client_ca else "")
    return certs


def token_store(s: SecuritySettings) -> TokenStore | None:
    """The configured token store; None only for an explicit, warned ALLOW_ANONYMOUS=true."""
    if s.auth_file:
        if s.allow_anonymous:
            raise ConfigError(f"{s.var('ALLOW_ANONYMOUS')}=true contradicts {s.var('AUTH_FILE')}: unset one")
        return TokenStore(s.auth_file, s.reload_s, methods=s.methods, var=s.var("AUTH_FILE"), service=s.service)
    if not s.allow_anonymous:
        raise ConfigError(
            f"{s.service} authenticates callers: set {s.var('AUTH_FILE')} (team token hashes, from a "
            f"Secret), or {s.var('ALLOW_ANONYMOUS')}=true for local development"
        )
    log.warning(
        "SECURITY: %s accepts every caller without a token (%s=true). Local development only; set %s in production.",
        s.service,
        s.var("ALLOW_ANONYMOUS"),
        s.var("AUTH_FILE"),
    )
    return None


def build(s: SecuritySettings) -> ServerSecurity:
    """Both halves, checked (files read) now; ConfigError names the variable to fix."""
    return ServerSecurity(certificates(s), token_store(s))
