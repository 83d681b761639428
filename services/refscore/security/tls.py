"""TLS for the gRPC port: server certificate and key, and a client CA for mutual TLS."""

from __future__ import annotations

import logging

import grpc

from offdpo.config import ConfigError
from services.refscore.config import RefscoreConfig
from services.refscore.security.files import read_limited

log = logging.getLogger(__name__)


def _read_pem(path: str, var: str, marker: bytes) -> bytes:
    data = read_limited(path, var)
    if b"-----BEGIN " not in data or marker not in data:  # never echo the content: it may be a key
        raise ConfigError(f"{var}={path!r} is not a PEM file holding a {marker.decode()}")
    return data


def server_credentials(cfg: RefscoreConfig) -> grpc.ServerCredentials | None:
    """TLS (or mTLS) credentials from the configured files; None for explicit, warned plaintext."""
    tls_vars = {
        "OFFDPO_REFSCORE_TLS_CERT": cfg.tls_cert,
        "OFFDPO_REFSCORE_TLS_KEY": cfg.tls_key,
        "OFFDPO_REFSCORE_TLS_CLIENT_CA": cfg.tls_client_ca,
    }
    if cfg.plaintext:
        if any(tls_vars.values()):
            raise ConfigError(
                f"OFFDPO_REFSCORE_PLAINTEXT=true contradicts {sorted(k for k, v in tls_vars.items() if v)}:"
                f" unset one of them"
            )
        log.warning(
            "SECURITY: refscore serves gRPC in PLAINTEXT (OFFDPO_REFSCORE_PLAINTEXT=true): tokens and data "
            "cross the network unencrypted. Local development only; set OFFDPO_REFSCORE_TLS_CERT/_KEY in production."
        )
        return None
    if not (cfg.tls_cert and cfg.tls_key):
        raise ConfigError(
            "refscore serves gRPC over TLS: set OFFDPO_REFSCORE_TLS_CERT and OFFDPO_REFSCORE_TLS_KEY "
            "(PEM files, mounted from a Secret), or OFFDPO_REFSCORE_PLAINTEXT=true for local development"
        )
    cert = _read_pem(cfg.tls_cert, "OFFDPO_REFSCORE_TLS_CERT", b"CERTIFICATE")
    key = _read_pem(cfg.tls_key, "OFFDPO_REFSCORE_TLS_KEY", b"PRIVATE KEY")
    client_ca = (
        _read_pem(cfg.tls_client_ca, "OFFDPO_REFSCORE_TLS_CLIENT_CA", b"CERTIFICATE") if cfg.tls_client_ca else None
    )
    log.info("refscore gRPC over TLS%s", " with client certificates required (mTLS)" if client_ca else "")
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )
