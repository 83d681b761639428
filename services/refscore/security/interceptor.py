"""The auth interceptor: authenticates and authorises every RefScore RPC and holds the team's
concurrency slot while it runs. grpc.health.v1 and reflection stay open (probes, grpcurl `list`).

While a handler runs, its caller is in `CURRENT_CALLER`: the service charges that team's
tokens-per-minute quota and queues its jobs in that team's FIFO of the fair engine queue.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import grpc

from services.refscore import metrics
from services.refscore.errors import QuotaExceeded
from services.refscore.handlers import method_name, wrap_handler
from services.refscore.security.auth import ANONYMOUS, UNAUTHENTICATED_CALLER, Team, TokenStore
from services.refscore.security.quotas import Quotas

log = logging.getLogger(__name__)

OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
CURRENT_CALLER: contextvars.ContextVar[Team | None] = contextvars.ContextVar("refscore_caller", default=None)


def current_caller() -> Team | None:
    return CURRENT_CALLER.get()


@dataclasses.dataclass(frozen=True)
class Refusal:
    code: grpc.StatusCode
    message: str
    caller: str  # metrics label: the team, or UNAUTHENTICATED_CALLER


def bearer_token(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    """The token of `authorization: Bearer <token>`; "" for another scheme, None without the header."""
    for key, value in metadata or ():
        if key == "authorization":
            text = value.decode("latin-1") if isinstance(value, bytes) else value
            scheme, _, token = text.strip().partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else ""
    return None


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, store: TokenStore | None, quotas: Quotas, model_id: Callable[[], str]):
        self.store = store
        self.quotas = quotas
        self.model_id = model_id

    def decide(self, method: str, metadata: Sequence[tuple[str, str | bytes]] | None) -> Team | Refusal:
        """The calling team, or why it is refused."""
        if self.store is None:
            return ANONYMOUS
        self.store.maybe_reload()
        token = bearer_token(metadata)
        if token is None:
            return Refusal(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing credentials: send gRPC metadata 'authorization: Bearer <your team token>'",
                UNAUTHENTICATED_CALLER,
            )
        team = self.store.authenticate(token) if token else None
        if team is None:
            return Refusal(
                grpc.StatusCode.UNAUTHENTICATED,
                "unknown or malformed bearer token: check your team's token (metadata 'authorization: Bearer <token>')",
                UNAUTHENTICATED_CALLER,
            )
        short = method.rsplit("/", 1)[-1]
        if team.methods is not None and short not in team.methods:
            allowed = ", ".join(sorted(team.methods)) or "none"
            return Refusal(
                grpc.StatusCode.PERMISSION_DENIED,
                f"team {team.name!r} may not call {short}; allowed: {allowed}",
                team.name,
            )
        model = self.model_id()
        if team.models is not None and model not in team.models:
            allowed = ", ".join(sorted(team.models)) or "none"
            return Refusal(
                grpc.StatusCode.PERMISSION_DENIED,
                f"team {team.name!r} may not use model {model!r}; allowed: {allowed}",
                team.name,
            )
        return team

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(OPEN_PREFIXES):
            return handler
        short = method_name(handler_call_details)
        decision = self.decide(handler_call_details.method, handler_call_details.invocation_metadata)
        wrapped = wrap_handler(handler, lambda context: self._admitted(decision, short, context))
        return wrapped if wrapped is not None else _unimplemented(short)

    @contextlib.asynccontextmanager
    async def _admitted(
        self, decision: Team | Refusal, short: str, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[None]:
        """Runs the call as `decision`'s team, holding one of its concurrency slots; or refuses it."""
        if isinstance(decision, Refusal):
            metrics.CALLER_REQUESTS.labels(decision.caller, short).inc()
            metrics.CALLER_ERRORS.labels(decision.caller, decision.code.name).inc()
            log.info("refscore: %s for %s from %s (%s)", decision.code.name, short, context.peer(), decision.caller)
            await context.abort(decision.code, decision.message)
            return  # not reached: abort raises
        metrics.CALLER_REQUESTS.labels(decision.name, short).inc()
        try:
            self.quotas.acquire(decision)
        except QuotaExceeded as exc:
            metrics.CALLER_ERRORS.labels(decision.name, exc.grpc_status.name).inc()
            await context.abort(exc.grpc_status, str(exc), exc.trailing_metadata())
        CURRENT_CALLER.set(decision)
        try:
            yield
        finally:
            self.quotas.release(decision)


def _unimplemented(short: str) -> grpc.RpcMethodHandler:
    async def refuse(request: object, context: grpc.aio.ServicerContext) -> None:  # a shape refscore lacks
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{short} is not supported")

    return grpc.unary_unary_rpc_method_handler(refuse)
