"""One auth layer for the pipeline's gRPC servers (refscore, the labeler): TLS/mTLS, team tokens,
allowed methods, client-certificate identities, quotas, and one interceptor.

- Settings (`settings.py`): TLS and an auth file are required unless the environment says explicitly
  that this is local development (`<PREFIX>PLAINTEXT=true`, `<PREFIX>ALLOW_ANONYMOUS=true`, each
  warned); `build(settings)` checks everything (reads the files) before a server connects to anything.
- TLS (`tls.py`): dynamic server credentials whose certificate, key and client CA are re-read when
  the files change (rotation without a restart); TLS 1.2 minimum, 1.3 where the client supports it.
- Identity (`auth.py`): a `TokenStore` from the auth file (a Secret; only sha256 hashes of tokens;
  client-certificate CNs per team; re-read when it changes). Schema documented there.
- The interceptor (`interceptor.py`): decides before the request body is read; health and
  reflection stay open.
- Quotas (`quotas.py`): per team, concurrent requests and tokens per minute, each process enforcing
  1/replicas of them so the bound holds across the autoscaler's replicas.
"""

from offdpo.grpc_auth.auth import ANONYMOUS, UNAUTHENTICATED_CALLER, Team, TokenStore, parse_auth, token_hash
from offdpo.grpc_auth.handlers import method_name, read_request_inside, wrap_handler
from offdpo.grpc_auth.interceptor import (
    CURRENT_CALLER,
    AuthInterceptor,
    AuthMetrics,
    Refusal,
    bearer_token,
    client_cn,
    current_caller,
)
from offdpo.grpc_auth.quotas import QuotaExceeded, Quotas
from offdpo.grpc_auth.settings import SecuritySettings, ServerSecurity, build
from offdpo.grpc_auth.tls import CertificateFiles, TlsFiles

__all__ = [
    "ANONYMOUS",
    "CURRENT_CALLER",
    "UNAUTHENTICATED_CALLER",
    "AuthInterceptor",
    "AuthMetrics",
    "CertificateFiles",
    "QuotaExceeded",
    "Quotas",
    "Refusal",
    "SecuritySettings",
    "ServerSecurity",
    "Team",
    "TlsFiles",
    "TokenStore",
    "bearer_token",
    "build",
    "client_cn",
    "current_caller",
    "method_name",
    "parse_auth",
    "read_request_inside",
    "token_hash",
    "wrap_handler",
]
