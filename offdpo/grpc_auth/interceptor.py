"""The auth interceptor: authenticates and authorises every RPC of a service and holds the team's
concurrency slot while it runs. grpc.health.v1 and reflection stay open (probes, grpcurl `list`).

Who the caller is: the team of the `authorization: Bearer <token>` metadata; without that header,
the team its mTLS client certificate's subject CN is mapped to (the client CA verified the
certificate during the handshake). Missing or unknown credentials -> UNAUTHENTICATED; a method or
model the team may not use -> PERMISSION_DENIED; over a quota -> RESOURCE_EXHAUSTED.

The decision is made before the request body is read: a unary request is read by the behaviour
(`handlers.read_request_inside`), inside the wrapper that decides, so a refused caller's message
(up to the size limit) is never read into memory or deserialised.

While a handler runs, its caller is in `CURRENT_CALLER` (the service charges that team's
tokens-per-minute quota, queues its work under that name).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import grpc

from offdpo.grpc_auth.auth import ANONYMOUS, UNAUTHENTICATED_CALLER, Team, TokenStore
from offdpo.grpc_auth.handlers import read_request_inside, wrap_handler
from offdpo.grpc_auth.quotas import QuotaExceeded, Quotas

log = logging.getLogger(__name__)

OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
CURRENT_CALLER: contextvars.ContextVar[Team | None] = contextvars.ContextVar("grpc_caller", default=None)
MAX_CN_CHARS = 64


def current_caller() -> Team | None:
    return CURRENT_CALLER.get()


@dataclasses.dataclass(frozen=True)
class Refusal:
    code: grpc.StatusCode
    message: str
    caller: str  # metrics label: the team, or UNAUTHENTICATED_CALLER


@dataclasses.dataclass(frozen=True)
class AuthMetrics:
    """Hooks for a service's metrics: a call received (caller, method), a call refused (caller, code)."""

    request: Callable[[str, str], None] = lambda caller, method: None
    refused: Callable[[str, str], None] = lambda caller, code: None


def bearer_token(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    """The token of `authorization: Bearer <token>`; "" for another scheme, None without the header."""
    for key, value in metadata or ():
        if key == "authorization":
            text = value.decode("latin-1") if isinstance(value, bytes) else value
            scheme, _, token = text.strip().partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else ""
    return None


def client_cn(context: grpc.aio.ServicerContext) -> str | None:
    """The subject CN of the client's certificate, when the handshake verified one (mTLS)."""
    try:
        names = context.auth_context().get("x509_common_name") or []
    except Exception:  # noqa: BLE001 - no auth context (plaintext): no certificate
        return None
    return names[0].decode("utf-8", "replace") if names else None


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """`store` None: every caller is ANONYMOUS (explicit local development). `model_id`: the served
    model's name, for teams limited to some models (None: the service has no models)."""

    def __init__(
        self,
        store: TokenStore | None,
        quotas: Quotas,
        model_id: Callable[[], str] | None = None,
        *,
        service: str = "gRPC",
        metrics: AuthMetrics | None = None,
    ):
        self.store = store
        self.quotas = quotas
        self.model_id = model_id
        self.service = service
        self.metrics = metrics or AuthMetrics()

    def _identify(self, token: str | None, cn: str | None) -> Team | Refusal:
        assert self.store is not None
        if token is not None:
            team = self.store.authenticate(token) if token else None
            if team is None:
                return Refusal(
                    grpc.StatusCode.UNAUTHENTICATED,
                    "unknown or malformed bearer token: check your team's token (metadata 'authorization: Bearer <token>')",
                    UNAUTHENTICATED_CALLER,
                )
            return team
        if cn is not None:
            team = self.store.by_client_cn(cn)
            if team is None:
                return Refusal(
                    grpc.StatusCode.UNAUTHENTICATED,
                    f"client certificate CN {cn[:MAX_CN_CHARS]!r} is not mapped to a team: send a team token "
                    f"(metadata 'authorization: Bearer <token>') or ask for the CN to be added",
                    UNAUTHENTICATED_CALLER,
                )
            return team
        return Refusal(
            grpc.StatusCode.UNAUTHENTICATED,
            "missing credentials: send gRPC metadata 'authorization: Bearer <your team token>'",
            UNAUTHENTICATED_CALLER,
        )

    def decide(
        self, method: str, metadata: Sequence[tuple[str, str | bytes]] | None, cn: str | None = None
    ) -> Team | Refusal:
        """The calling team, or why it is refused."""
        if self.store is None:
            return ANONYMOUS
        self.store.maybe_reload()
        team = self._identify(bearer_token(metadata), cn)
        if isinstance(team, Refusal):
            return team
        short = method.rsplit("/", 1)[-1]
        if team.methods is not None and short not in team.methods:
            allowed = ", ".join(sorted(team.methods)) or "none"
            return Refusal(
                grpc.StatusCode.PERMISSION_DENIED,
                f"team {team.name!r} may not call {short}; allowed: {allowed}",
                team.name,
            )
        if self.model_id is not None and team.models is not None:
            refusal = team.model_refusal(self.model_id())
            if refusal is not None:
                return Refusal(grpc.StatusCode.PERMISSION_DENIED, refusal, team.name)
        return team

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_PREFIXES):
            return handler
        method = handler_call_details.method
        metadata = handler_call_details.invocation_metadata
        return wrap_handler(read_request_inside(handler), lambda context: self._admitted(method, metadata, context))

    @contextlib.asynccontextmanager
    async def _admitted(
        self, method: str, metadata: Sequence[tuple[str, str | bytes]] | None, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[None]:
        """Runs the call as its team, holding one of its concurrency slots; or refuses it."""
        short = method.rsplit("/", 1)[-1]
        decision = self.decide(method, metadata, client_cn(context) if self.store is not None else None)
        if isinstance(decision, Refusal):
            self.metrics.request(decision.caller, short)
            self.metrics.refused(decision.caller, decision.code.name)
            log.info(
                "%s: %s for %s from %s (%s)", self.service, decision.code.name, short, context.peer(), decision.caller
            )
            await context.abort(decision.code, decision.message)
            return  # not reached: abort raises
        self.metrics.request(decision.name, short)
        try:
            self.quotas.acquire(decision)
        except QuotaExceeded as exc:
            self.metrics.refused(decision.name, exc.grpc_status.name)
            await context.abort(exc.grpc_status, str(exc), exc.trailing_metadata())
        CURRENT_CALLER.set(decision)
        try:
            yield
        finally:
            self.quotas.release(decision)
