"""refscore security: TLS credentials, caller identity (per-team bearer tokens), permissions, quotas.

- TLS (`tls.py`): `server_credentials(cfg)` loads the PEM files named by OFFDPO_REFSCORE_TLS_CERT /
  _TLS_KEY (and _TLS_CLIENT_CA for mutual TLS: then every client must present a certificate that CA
  signed). Plaintext needs OFFDPO_REFSCORE_PLAINTEXT=true and logs a warning; nothing is plaintext
  by accident.
- Identity (`auth.py`): a `TokenStore` loaded from OFFDPO_REFSCORE_AUTH_FILE (a Secret) holds only
  sha256 hashes of the teams' tokens; the file's schema is documented there. Without an auth file,
  OFFDPO_REFSCORE_ALLOW_ANONYMOUS=true must be set (and a warning is logged).
- The interceptor (`interceptor.py`): reads `authorization: Bearer <token>` metadata. Missing or
  unknown token -> UNAUTHENTICATED; a method or model the team may not use -> PERMISSION_DENIED.
  grpc.health.v1 and reflection stay open.
- Quotas (`quotas.py`): per team, concurrent requests (checked by the interceptor) and prompt+answer
  tokens per minute (charged once a request is tokenised) -> RESOURCE_EXHAUSTED with trailing
  metadata `retry-after-ms` and the same hint in the message.
"""

from services.refscore.errors import QuotaExceeded
from services.refscore.security.auth import (
    ANONYMOUS,
    UNAUTHENTICATED_CALLER,
    Team,
    TokenStore,
    parse_auth,
    token_hash,
    token_store,
)
from services.refscore.security.interceptor import CURRENT_CALLER, AuthInterceptor, current_caller
from services.refscore.security.quotas import Quotas
from services.refscore.security.tls import server_credentials

__all__ = [
    "ANONYMOUS",
    "CURRENT_CALLER",
    "UNAUTHENTICATED_CALLER",
    "AuthInterceptor",
    "QuotaExceeded",
    "Quotas",
    "Team",
    "TokenStore",
    "current_caller",
    "parse_auth",
    "server_credentials",
    "token_hash",
    "token_store",
]
