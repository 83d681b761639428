"""refscore security: the shared auth layer (`offdpo.grpc_auth`) bound to refscore's settings and metrics.

- TLS: `server_credentials(cfg)` from OFFDPO_REFSCORE_TLS_CERT / _TLS_KEY (and _TLS_CLIENT_CA for mutual
  TLS: then every client must present a certificate that CA signed), re-read when the files change.
  Plaintext needs OFFDPO_REFSCORE_PLAINTEXT=true and logs a warning; nothing is plaintext by accident.
- Identity: a `TokenStore` loaded from OFFDPO_REFSCORE_AUTH_FILE (a Secret) holds only sha256 hashes of
  the teams' tokens and the mTLS certificate CNs mapped to each team; schema in offdpo/grpc_auth/auth.py.
  Without an auth file, OFFDPO_REFSCORE_ALLOW_ANONYMOUS=true must be set (and a warning is logged).
- The interceptor: `authorization: Bearer <token>` metadata, or the client certificate's CN. Missing or
  unknown credentials -> UNAUTHENTICATED; a method or model the team may not use -> PERMISSION_DENIED.
  grpc.health.v1 and reflection stay open. Decided before the request body is read.
- Quotas: per team, concurrent requests (checked by the interceptor) and prompt+answer tokens per
  minute (charged once a request is tokenised) -> RESOURCE_EXHAUSTED with trailing metadata
  `retry-after-ms` and the same hint in the message. Each replica enforces 1/OFFDPO_REFSCORE_REPLICAS of
  them (README, "Quotas across replicas").
"""

from __future__ import annotations

from collections.abc import Callable

from offdpo import grpc_auth
from offdpo.grpc_auth import (
    ANONYMOUS,
    CURRENT_CALLER,
    UNAUTHENTICATED_CALLER,
    QuotaExceeded,
    ServerSecurity,
    Team,
    current_caller,
    parse_auth,
    token_hash,
)
from offdpo.grpc_auth.settings import certificates
from offdpo.grpc_auth.settings import token_store as _token_store
from services.refscore import metrics
from services.refscore.config import RefscoreConfig

METHODS = frozenset({"Score", "ScoreStream", "Generate", "GetModelInfo"})
SERVICE = "refscore"
_AUTH_VAR = "OFFDPO_REFSCORE_AUTH_FILE"


def security_settings(cfg: RefscoreConfig) -> grpc_auth.SecuritySettings:
    return grpc_auth.SecuritySettings(
        service=SERVICE,
        prefix="OFFDPO_REFSCORE_",
        tls_cert=cfg.tls_cert,
        tls_key=cfg.tls_key,
        tls_client_ca=cfg.tls_client_ca,
        plaintext=cfg.plaintext,
        auth_file=cfg.auth_file,
        allow_anonymous=cfg.allow_anonymous,
        methods=METHODS,
    )


def build(cfg: RefscoreConfig) -> ServerSecurity:
    """TLS credentials and token store, checked now (ConfigError names the variable)."""
    return grpc_auth.build(security_settings(cfg))


def server_credentials(cfg: RefscoreConfig):
    """TLS (or mTLS) credentials, reloaded when the files change; None for explicit, warned plaintext."""
    certs = certificates(security_settings(cfg))
    return certs.credentials() if certs is not None else None


def token_store(cfg: RefscoreConfig) -> grpc_auth.TokenStore | None:
    """The configured token store; None only for an explicit, warned OFFDPO_REFSCORE_ALLOW_ANONYMOUS=true."""
    return _token_store(security_settings(cfg))


class TokenStore(grpc_auth.TokenStore):
    """The shared token store with refscore's method names and variable."""

    def __init__(self, path: str, reload_s: float = 5.0):
        super().__init__(path, reload_s, methods=METHODS, var=_AUTH_VAR, service=SERVICE)


def _in_flight(team: str, n: int) -> None:
    metrics.CALLER_IN_FLIGHT.labels(team).set(n)


def Quotas(replicas: int = 1) -> grpc_auth.Quotas:
    """Per-team quotas, 1/`replicas` of each in this process, in-flight counts to refscore's metrics."""
    return grpc_auth.Quotas(replicas=replicas, on_in_flight=_in_flight)


METRICS = grpc_auth.AuthMetrics(
    request=lambda caller, method: metrics.CALLER_REQUESTS.labels(caller, method).inc(),
    refused=lambda caller, code: metrics.CALLER_ERRORS.labels(caller, code).inc(),
)


def AuthInterceptor(
    store: grpc_auth.TokenStore | None, quotas: grpc_auth.Quotas, model_id: Callable[[], str]
) -> grpc_auth.AuthInterceptor:
    return grpc_auth.AuthInterceptor(store, quotas, model_id, service=SERVICE, metrics=METRICS)


__all__ = [
    "ANONYMOUS",
    "CURRENT_CALLER",
    "METHODS",
    "UNAUTHENTICATED_CALLER",
    "AuthInterceptor",
    "QuotaExceeded",
    "Quotas",
    "Team",
    "TokenStore",
    "build",
    "current_caller",
    "parse_auth",
    "server_credentials",
    "token_hash",
    "token_store",
]
