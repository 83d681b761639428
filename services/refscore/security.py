"""refscore security: TLS credentials, caller identity (per-team bearer tokens), permissions, quotas.

- TLS: `server_credentials(cfg)` loads the PEM files named by OFFDPO_REFSCORE_TLS_CERT / _TLS_KEY
  (and _TLS_CLIENT_CA for mutual TLS: then every client must present a certificate that CA signed).
  Plaintext needs OFFDPO_REFSCORE_PLAINTEXT=true and logs a warning; nothing is plaintext by accident.
- Identity: `AuthInterceptor` reads `authorization: Bearer <token>` metadata and looks the token up
  in a `TokenStore` loaded from OFFDPO_REFSCORE_AUTH_FILE (a Secret), which holds only sha256 hashes
  of the tokens. Missing or unknown token -> UNAUTHENTICATED; a method or model the team may not use
  -> PERMISSION_DENIED. grpc.health.v1 and reflection stay open (probes, grpcurl `list`).
  Without an auth file, OFFDPO_REFSCORE_ALLOW_ANONYMOUS=true must be set (and a warning is logged).
- Quotas: per team, concurrent requests (checked in the interceptor) and prompt+answer tokens per
  minute (a token bucket charged once a request is tokenised) -> RESOURCE_EXHAUSTED with trailing
  metadata `retry-after-ms` and the same hint in the message.
- The caller's identity is in the contextvar `CURRENT_CALLER` while its handler runs; the scorer's
  queue is fair between callers (the stream worker is one more caller), see scorer.py.

Auth file (YAML or JSON; at most 1 MiB):

    teams:
      alignment:                       # team name: [A-Za-z0-9][A-Za-z0-9_.-]{0,63}
        token_sha256: [<64 hex>, ...]  # sha256(token) of each valid token (several: rotation)
        methods: [Score, ScoreStream, GetModelInfo]   # optional, default: every method
        models: [offdpo-reference]     # optional, default: any model (the fingerprint's model_id)
        max_concurrent: 4              # optional, 0 = unlimited
        tokens_per_minute: 200000      # optional, 0 = unlimited

Make a token: `python -c "import secrets; print(secrets.token_urlsafe(32))"`; its hash:
`printf %s "$TOKEN" | sha256sum`. The file is re-read when it changes (Secret rotation).
"""

from __future__ import annotations

import contextvars
import dataclasses
import hashlib
import hmac
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable

import grpc

from offdpo.config import ConfigError
from services.refscore import metrics
from services.refscore.scorer import RefscoreError

log = logging.getLogger(__name__)

METHODS = frozenset({"Score", "ScoreStream", "Generate", "GetModelInfo"})
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
MAX_FILE_BYTES = 1 << 20
TEAM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
HEX64 = re.compile(r"^[0-9a-f]{64}$")
UNAUTHENTICATED_CALLER = "-"  # metrics label of callers that did not authenticate
CONCURRENCY_RETRY_S = 0.5


@dataclasses.dataclass(frozen=True)
class Team:
    name: str
    token_hashes: tuple[bytes, ...] = ()
    methods: frozenset[str] | None = None  # None: every method
    models: frozenset[str] | None = None  # None: any model
    max_concurrent: int = 0  # 0: unlimited
    tokens_per_minute: int = 0  # 0: unlimited

    def __repr__(self) -> str:  # never print the hashes either
        return f"Team({self.name!r})"


ANONYMOUS = Team("anonymous")
CURRENT_CALLER: contextvars.ContextVar[Team | None] = contextvars.ContextVar("refscore_caller", default=None)


class QuotaExceeded(RefscoreError):
    """RESOURCE_EXHAUSTED with a retry hint (trailing metadata `retry-after-ms`)."""

    def __init__(self, message: str, retry_after_s: float | None):
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def trailing_metadata(self) -> tuple:
        if self.retry_after_s is None:
            return ()
        return (("retry-after-ms", str(max(1, math.ceil(self.retry_after_s * 1000)))),)


# -- files ------------------------------------------------------------------------------------------
def _read_limited(path: str, var: str, limit: int = MAX_FILE_BYTES) -> bytes:
    try:
        size = os.path.getsize(path)
        if size > limit:
            raise ConfigError(f"{var}={path!r} is {size} bytes; the limit is {limit}")
        with open(path, "rb") as f:
            return f.read(limit + 1)
    except OSError as exc:
        raise ConfigError(f"{var}={path!r} cannot be read: {exc.strerror}") from None


def _read_pem(path: str, var: str, marker: bytes) -> bytes:
    data = _read_limited(path, var)
    if b"-----BEGIN " not in data or marker not in data:  # never echo the content: it may be a key
        raise ConfigError(f"{var}={path!r} is not a PEM file holding a {marker.decode()}")
    return data


def server_credentials(cfg) -> grpc.ServerCredentials | None:
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


# -- tokens -------------------------------------------------------------------------------------------
def token_hash(token: str) -> str:
    """The hex sha256 of a token, as the auth file stores it."""
    return hashlib.sha256(token.encode()).hexdigest()


def _names(value, what: str, allowed: frozenset[str] | None = None) -> frozenset[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{what} must be a list of names")
    if allowed is not None and set(value) - allowed:
        raise ConfigError(f"{what} names unknown methods {sorted(set(value) - allowed)}; known: {sorted(allowed)}")
    return frozenset(value)


def _count(value, what: str) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{what} must be an integer >= 0 (0 = unlimited)")
    return value


def parse_auth(data: bytes, where: str) -> dict[str, Team]:
    import yaml

    try:
        doc = yaml.safe_load(data.decode("utf-8"))  # safe_load: plain data only (JSON is YAML too)
    except (UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"{where}: not valid YAML/JSON ({type(exc).__name__})") from None
    if not isinstance(doc, dict) or set(doc) != {"teams"} or not isinstance(doc["teams"], dict) or not doc["teams"]:
        raise ConfigError(f"{where}: expected a mapping with one key, 'teams', mapping team names to settings")
    teams, seen = {}, set()
    fields = {"token_sha256", "methods", "models", "max_concurrent", "tokens_per_minute"}
    for name, spec in doc["teams"].items():
        if not isinstance(name, str) or not TEAM_NAME.match(name) or name in (ANONYMOUS.name, UNAUTHENTICATED_CALLER):
            raise ConfigError(
                f"{where}: team name {str(name)[:70]!r} must match {TEAM_NAME.pattern} and not be 'anonymous'"
            )
        what = f"{where}: teams.{name}"
        if not isinstance(spec, dict) or set(spec) - fields:
            raise ConfigError(f"{what} must be a mapping with keys among {sorted(fields)}")
        hashes = spec.get("token_sha256")
        hashes = [hashes] if isinstance(hashes, str) else hashes
        if (
            not isinstance(hashes, list)
            or not hashes
            or not all(isinstance(h, str) and HEX64.match(h.lower()) for h in hashes)
        ):
            raise ConfigError(f"{what}.token_sha256 must be one or more sha256 hex digests (never the token itself)")
        raw = tuple(bytes.fromhex(h) for h in hashes)
        if seen & set(raw):
            raise ConfigError(f"{what}.token_sha256 repeats a hash used elsewhere: each token belongs to one team")
        seen |= set(raw)
        teams[name] = Team(
            name,
            raw,
            _names(spec.get("methods"), f"{what}.methods", METHODS),
            _names(spec.get("models"), f"{what}.models"),
            _count(spec.get("max_concurrent"), f"{what}.max_concurrent"),
            _count(spec.get("tokens_per_minute"), f"{what}.tokens_per_minute"),
        )
    return teams


class TokenStore:
    """Teams by token hash, from the auth file; re-read (at most every `reload_s`) when it changes."""

    def __init__(self, path: str, reload_s: float = 5.0):
        self.path = path
        self.reload_s = reload_s
        self._stamp = self._stat()
        self.teams = parse_auth(_read_limited(path, "OFFDPO_REFSCORE_AUTH_FILE"), f"OFFDPO_REFSCORE_AUTH_FILE={path!r}")
        self._checked = time.monotonic()
        log.info("refscore auth: %d team(s) from %s: %s", len(self.teams), path, ", ".join(sorted(self.teams)))

    def _stat(self):
        try:
            st = os.stat(self.path)
            return st.st_mtime_ns, st.st_size, st.st_ino
        except OSError:
            return None

    def maybe_reload(self) -> None:
        now = time.monotonic()
        if now - self._checked < self.reload_s:
            return
        self._checked = now
        stamp = self._stat()
        if stamp is None or stamp == self._stamp:
            return
        try:
            teams = parse_auth(
                _read_limited(self.path, "OFFDPO_REFSCORE_AUTH_FILE"), f"OFFDPO_REFSCORE_AUTH_FILE={self.path!r}"
            )
        except ConfigError as exc:
            log.error("auth file changed but is invalid; keeping the previous teams: %s", exc)
            return
        self._stamp, self.teams = stamp, teams
        log.info("refscore auth reloaded: %d team(s): %s", len(teams), ", ".join(sorted(teams)))

    def authenticate(self, token: str) -> Team | None:
        digest = hashlib.sha256(token.encode()).digest()
        found = None
        for team in self.teams.values():  # compare against every hash: no early exit
            for h in team.token_hashes:
                if hmac.compare_digest(digest, h):
                    found = team
        return found


def token_store(cfg) -> TokenStore | None:
    """The configured token store; None only for an explicit, warned OFFDPO_REFSCORE_ALLOW_ANONYMOUS=true."""
    if cfg.auth_file:
        if cfg.allow_anonymous:
            raise ConfigError("OFFDPO_REFSCORE_ALLOW_ANONYMOUS=true contradicts OFFDPO_REFSCORE_AUTH_FILE: unset one")
        return TokenStore(cfg.auth_file)
    if not cfg.allow_anonymous:
        raise ConfigError(
            "refscore authenticates callers: set OFFDPO_REFSCORE_AUTH_FILE (team token hashes, from a "
            "Secret), or OFFDPO_REFSCORE_ALLOW_ANONYMOUS=true for local development"
        )
    log.warning(
        "SECURITY: refscore accepts every caller without a token (OFFDPO_REFSCORE_ALLOW_ANONYMOUS=true). "
        "Local development only; set OFFDPO_REFSCORE_AUTH_FILE in production."
    )
    return None


# -- quotas -------------------------------------------------------------------------------------------
class Quotas:
    """Per-team concurrent requests and a tokens-per-minute bucket (capacity: one minute's tokens)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self._in_flight: dict[str, int] = {}
        self._buckets: dict[str, tuple[float, float]] = {}  # team -> (level, at)

    def acquire(self, team: Team) -> None:
        with self._lock:
            n = self._in_flight.get(team.name, 0)
            if team.max_concurrent and n >= team.max_concurrent:
                raise QuotaExceeded(
                    f"team {team.name!r} already has {n} requests in flight, its limit is "
                    f"{team.max_concurrent}; retry after {CONCURRENCY_RETRY_S:.1f} s or send fewer at once",
                    CONCURRENCY_RETRY_S,
                )
            self._in_flight[team.name] = n + 1
        metrics.CALLER_IN_FLIGHT.labels(team.name).set(n + 1)

    def release(self, team: Team) -> None:
        with self._lock:
            n = max(0, self._in_flight.get(team.name, 0) - 1)
            self._in_flight[team.name] = n
        metrics.CALLER_IN_FLIGHT.labels(team.name).set(n)

    def charge(self, team: Team, tokens: int) -> None:
        """Take `tokens` from the team's bucket, or raise QuotaExceeded with when to retry."""
        rate = team.tokens_per_minute
        if not rate:
            return
        if tokens > rate:
            raise QuotaExceeded(
                f"the request has {tokens} tokens, more than team {team.name!r}'s quota of {rate} "
                f"tokens per minute: split it",
                None,
            )
        with self._lock:
            now = self._clock()
            level, at = self._buckets.get(team.name, (float(rate), now))
            level = min(float(rate), level + (now - at) * rate / 60.0)
            if level < tokens:
                self._buckets[team.name] = (level, now)
                wait = (tokens - level) * 60.0 / rate
                raise QuotaExceeded(
                    f"team {team.name!r} is over its quota of {rate} tokens per minute "
                    f"(this request: {tokens}); retry after {wait:.1f} s",
                    wait,
                )
            self._buckets[team.name] = (level - tokens, now)


# -- the interceptor ----------------------------------------------------------------------------------
def _bearer(metadata) -> str | None:
    for item in metadata or ():
        key, value = item[0], item[1]
        if key == "authorization":
            if isinstance(value, bytes):
                value = value.decode("latin-1")
            scheme, _, token = value.strip().partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else ""
    return None


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates and authorises every RPC except health and reflection; enforces concurrency."""

    def __init__(self, store: TokenStore | None, quotas: Quotas, model_id: Callable[[], str]):
        self.store = store
        self.quotas = quotas
        self.model_id = model_id

    def decide(self, method: str, metadata) -> tuple[Team | None, grpc.StatusCode | None, str]:
        short = method.rsplit("/", 1)[-1]
        if self.store is None:
            return ANONYMOUS, None, ""
        self.store.maybe_reload()
        token = _bearer(metadata)
        if token is None:
            return (
                None,
                grpc.StatusCode.UNAUTHENTICATED,
                ("missing credentials: send gRPC metadata 'authorization: Bearer <your team token>'"),
            )
        team = self.store.authenticate(token) if token else None
        if team is None:
            return (
                None,
                grpc.StatusCode.UNAUTHENTICATED,
                (
                    "unknown or malformed bearer token: check your team's "
                    "token (metadata 'authorization: Bearer <token>')"
                ),
            )
        if team.methods is not None and short not in team.methods:
            return (
                team,
                grpc.StatusCode.PERMISSION_DENIED,
                (f"team {team.name!r} may not call {short}; allowed: {', '.join(sorted(team.methods)) or 'none'}"),
            )
        model = self.model_id()
        if team.models is not None and model not in team.models:
            return (
                team,
                grpc.StatusCode.PERMISSION_DENIED,
                (
                    f"team {team.name!r} may not use model {model!r}; "
                    f"allowed: {', '.join(sorted(team.models)) or 'none'}"
                ),
            )
        return team, None, ""

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method.startswith(OPEN_PREFIXES):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        short = method.rsplit("/", 1)[-1]
        team, code, message = self.decide(method, handler_call_details.invocation_metadata)
        quotas = self.quotas

        async def enter(context) -> Team:
            caller = team.name if team else UNAUTHENTICATED_CALLER
            metrics.CALLER_REQUESTS.labels(caller, short).inc()
            if code is not None:
                metrics.CALLER_ERRORS.labels(caller, code.name).inc()
                log.info("refscore: %s for %s from %s (%s)", code.name, short, context.peer(), caller)
                await context.abort(code, message)
            try:
                quotas.acquire(team)
            except QuotaExceeded as exc:
                metrics.CALLER_ERRORS.labels(caller, grpc.StatusCode.RESOURCE_EXHAUSTED.name).inc()
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc), exc.trailing_metadata())
            CURRENT_CALLER.set(team)
            return team

        if handler.unary_unary:
            inner = handler.unary_unary

            async def unary_unary(request, context):
                caller = await enter(context)
                try:
                    return await inner(request, context)
                finally:
                    quotas.release(caller)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary, handler.request_deserializer, handler.response_serializer
            )
        if handler.stream_stream:
            inner_stream = handler.stream_stream

            async def stream_stream(request_iterator, context):
                caller = await enter(context)
                try:
                    async for response in inner_stream(request_iterator, context):
                        yield response
                finally:
                    quotas.release(caller)

            return grpc.stream_stream_rpc_method_handler(
                stream_stream, handler.request_deserializer, handler.response_serializer
            )

        async def refuse(request, context):  # a method shape refscore does not have
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{short} is not supported")

        return grpc.unary_unary_rpc_method_handler(refuse)


def current_caller() -> Team | None:
    return CURRENT_CALLER.get()
