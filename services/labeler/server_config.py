"""The labeler gRPC server's security settings (`serve`) and the rules strategy's import allow-list.

`serve` needs TLS (OFFDPO_LABELER_TLS_CERT/_KEY, optional _TLS_CLIENT_CA for mTLS) and an auth file
(OFFDPO_LABELER_AUTH_FILE, the schema of offdpo/grpc_auth/auth.py, methods among SubmitCandidates and
SubmitJudgement), unless OFFDPO_LABELER_PLAINTEXT=true / OFFDPO_LABELER_ALLOW_ANONYMOUS=true say
explicitly that this is local development.
"""

from __future__ import annotations

import dataclasses

from offdpo.config import EnvConfig, env
from offdpo.grpc_auth import SecuritySettings

METHODS = frozenset({"SubmitCandidates", "SubmitJudgement"})


@dataclasses.dataclass(frozen=True, repr=False)
class LabelerServerConfig(EnvConfig):
    tls_cert: str = env("OFFDPO_LABELER_TLS_CERT", "", "PEM server certificate (chain) file: gRPC over TLS")
    tls_key: str = env("OFFDPO_LABELER_TLS_KEY", "", "PEM private key file of the server certificate")
    tls_client_ca: str = env(
        "OFFDPO_LABELER_TLS_CLIENT_CA",
        "",
        "PEM CA bundle file: set it for mutual TLS (every client must present a certificate it signed;"
        " a certificate's CN can stand for a team, see client_cn in the auth file)",
    )
    plaintext: bool = env(
        "OFFDPO_LABELER_PLAINTEXT", False, "serve gRPC without TLS (local development only; logs a warning)"
    )
    auth_file: str = env(
        "OFFDPO_LABELER_AUTH_FILE",
        "",
        "YAML/JSON file (from a Secret) of teams: sha256 token hashes, client certificate CNs, allowed"
        " methods (SubmitCandidates, SubmitJudgement), max_concurrent",
    )
    allow_anonymous: bool = env(
        "OFFDPO_LABELER_ALLOW_ANONYMOUS",
        False,
        "without an auth file, accept callers without a token (local development only; logs a warning)",
    )

    def security(self) -> SecuritySettings:
        return SecuritySettings(
            service="labeler",
            prefix="OFFDPO_LABELER_",
            tls_cert=self.tls_cert,
            tls_key=self.tls_key,
            tls_client_ca=self.tls_client_ca,
            plaintext=self.plaintext,
            auth_file=self.auth_file,
            allow_anonymous=self.allow_anonymous,
            methods=METHODS,
        )


@dataclasses.dataclass(frozen=True, repr=False)
class RulesConfig(EnvConfig):
    callable_packages: tuple[str, ...] = env(
        "OFFDPO_LABELER_RULES_CALLABLE_PACKAGES",
        (),
        "comma-separated packages a rules file's `callable: module:function` may import from (empty:"
        " none; checks registered with @register_check are always available by name)",
    )


SERVER_CONFIG_CLASSES = (LabelerServerConfig, RulesConfig)
