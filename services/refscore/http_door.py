"""refscore's HTTP door: an OpenAI-compatible `POST /v1/completions` and `GET /v1/models` for teams that
already score the seed's way (send <x, y> with `echo`/`logprobs` or vLLM's `prompt_logprobs`, read y's
positions), so their code and the `openai` client work against refscore unchanged.

Same process, same everything as the gRPC API (server.py), on OFFDPO_REFSCORE_HTTP_PORT (0 = off):
- engine work goes through `RefScoreService.score` / `.generate`, the path of the Score and Generate RPCs
  (model selection by fingerprint, the team's `models`, tokens-per-minute charge, request limits, the
  fair queue under the team's name); a prompt of ids t0..tn is scored as the item (prompt [t0], answer
  [t1..tn]), so every position after the first gets the engine's log-prob, the first none (as vLLM);
- who may call: `authorization: Bearer <team token>` (the openai client sends its api_key so), decided
  by the gRPC interceptor's own `decide` as the method `Score` (`GetModelInfo` for /v1/models; `Generate`
  too when max_tokens > 0), the team's concurrency slot held for the request; no mTLS identity here (the
  handshake still requires a client certificate when OFFDPO_REFSCORE_TLS_CLIENT_CA is set), so a team
  that has only `client_cn` needs a token for this door;
- TLS with the gRPC port's certificate files (read when the door starts: rotating them needs a restart
  here, unlike gRPC), plaintext only with OFFDPO_REFSCORE_PLAINTEXT=true;
- every answer carries the fingerprint of the model that answered (the primary's before one is picked)
  as headers `x-offdpo-fingerprint-id`, `x-offdpo-model-id`, `x-offdpo-weights-hash`, ... (one per
  ReferenceFingerprint field), and the body's `system_fingerprint` is the fingerprint id.

What the engine has: only the log-prob of the token at each position, not the distribution. So
`top_logprobs` holds just that token (whatever `logprobs: N` asks), `prompt_logprobs` entries just the
prompt token with `rank: null`. Tokens are `tokenizer.decode([id])` per id (vLLM's incremental detokenizer
can differ on partial UTF-8 characters). Log-probs below -9999 are -9999 (vLLM's clamp; JSON has no -inf).
max_tokens > 0 samples through the Generate path (a second engine job after the scoring one; its own
limits OFFDPO_REFSCORE_MAX_GENERATE_*), `stream`, `suffix`, `stop`, penalties, `logit_bias` and `best_of`
are refused with 400. Errors are OpenAI-shaped: `{"error": {"message", "type", "param", "code"}}`, 400
(bad request), 401 (+ WWW-Authenticate), 403, 404 (unknown model), 413 (body over
OFFDPO_REFSCORE_MAX_MESSAGE_BYTES), 429 (over a quota, + Retry-After; a request larger than the team's
whole minute is a 400: waiting cannot help), 503 (loading; + Retry-After), 504.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import ssl
import time
import uuid
from collections.abc import Awaitable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from offdpo import grpc_auth
from offdpo.errors import OffdpoError
from offdpo.grpc_auth import CURRENT_CALLER, QuotaExceeded, Refusal, Team
from offdpo.v1 import records_pb2, refscore_pb2
from services.refscore import metrics, security
from services.refscore.config import RefscoreConfig
from services.refscore.errors import InvalidArgument, NotReady, RefscoreError, TokenizationError, TooLarge
from services.refscore.scorer import LoadedModel
from services.refscore.tokenization import request_local_cache

if TYPE_CHECKING:
    from services.refscore.server import RefScoreService

log = logging.getLogger(__name__)

SERVICE_PREFIX = "/offdpo.v1.RefScore/"
MAX_LOGPROBS = 20  # vLLM's default max_logprobs: the most `logprobs`/`prompt_logprobs` it accepts
MIN_LOGPROB = -9999.0  # vLLM clamps so (the JSON OpenAI uses has no -inf)
NOT_READY_RETRY_S = 2
NOT_READY_MESSAGE = "the reference engine is not ready (loading, failed or restarting); retry later"
# Parameters of the completions API this door cannot honour: refused when set to anything but these.
UNSUPPORTED = {
    "stream": (None, False),
    "suffix": (None, ""),
    "stop": (None, "", []),
    "stop_token_ids": (None, []),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "repetition_penalty": (None, 1, 1.0),
    "top_k": (None, 0, -1),
    "min_p": (None, 0, 0.0),
    "min_tokens": (None, 0),
    "ignore_eos": (None, False),
    "add_special_tokens": (None, True),
    "return_tokens_as_token_ids": (None, False),
    "prompt_embeds": (None,),
}


class UnknownModel(InvalidArgument):
    """The request's `model` is none of the served ones (OpenAI and vLLM answer 404)."""

    error_type = "model_not_found"
    grpc_status = grpc.StatusCode.NOT_FOUND


class BodyTooLarge(TooLarge):
    """The HTTP body is over OFFDPO_REFSCORE_MAX_MESSAGE_BYTES (413, where gRPC's own limit answers)."""


class MethodNotAllowed(RefscoreError):
    """The team may not call the RPC the request needs (the auth file's `methods`)."""

    error_type = "permission_denied"
    grpc_status = grpc.StatusCode.PERMISSION_DENIED


class ClientGone(Exception):
    """The client closed the connection before its answer was ready; its engine work was cancelled."""


# -- the request -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CompletionParams:
    model: str
    prompts: list[str | list[int]]
    max_tokens: int
    echo: bool
    logprobs: int | None
    prompt_logprobs: int | None
    n: int
    temperature: float | None
    top_p: float | None
    seed: int | None

    @property
    def scores(self) -> bool:
        """Whether the prompt's log-probs are asked for (the engine's scoring job)."""
        return (self.echo and self.logprobs is not None) or self.prompt_logprobs is not None


def _int(body: dict[str, Any], key: str, default: int | None, lo: int, hi: int) -> int | None:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise InvalidArgument(f"{key}={value!r} must be an integer between {lo} and {hi}")
    return value


def _float(body: dict[str, Any], key: str) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidArgument(f"{key}={value!r} must be a number")
    return float(value)


def _prompts(value: object) -> list[str | list[int]]:
    """`prompt` as the completions API takes it: a string, a list of strings, a list of token ids, or a
    list of such lists; one choice (n choices) per prompt."""
    shape = "prompt must be a string, a list of strings, a list of token ids or a list of token id lists"
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not value:
        raise InvalidArgument(f"{shape} (not empty)")
    if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return [list(value)]
    prompts: list[str | list[int]] = []
    for i, p in enumerate(value):
        if isinstance(p, str):
            prompts.append(p)
        elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            prompts.append(list(p))
        else:
            raise InvalidArgument(f"prompt[{i}]: {shape}")
    return prompts


def parse_completion(body: object, cfg: RefscoreConfig) -> CompletionParams:
    """A `POST /v1/completions` body, checked; InvalidArgument says what to fix."""
    if not isinstance(body, dict):
        raise InvalidArgument("the body must be a JSON object (the OpenAI completions request)")
    if "prompt" not in body:
        raise InvalidArgument("prompt is missing: send the text (or token ids) to score, e.g. x+y")
    for key, allowed in UNSUPPORTED.items():
        if key in body and body[key] not in allowed:
            raise InvalidArgument(
                f"{key}={body[key]!r} is not supported by refscore's completions endpoint; leave it out"
                " (refscore scores and samples plainly: echo + logprobs / prompt_logprobs, max_tokens, n,"
                " temperature, top_p, seed)"
            )
    best_of = body.get("best_of")
    if best_of not in (None, 1, body.get("n", 1)):
        raise InvalidArgument(f"best_of={best_of!r} is not supported; leave it out")
    model = body.get("model") or ""
    if not isinstance(model, str):
        raise InvalidArgument("model must be a string: a served model id or fingerprint id (GET /v1/models)")
    max_tokens = _int(body, "max_tokens", 16, 0, cfg.max_generate_tokens)
    assert max_tokens is not None
    echo = body.get("echo", False)
    if not isinstance(echo, bool):
        raise InvalidArgument(f"echo={echo!r} must be true or false")
    if max_tokens == 0 and not echo:
        raise InvalidArgument("max_tokens=0 returns nothing without echo=true: set echo=true to score the prompt")
    n = _int(body, "n", 1, 1, cfg.max_generate_n)
    assert n is not None
    return CompletionParams(
        model=model,
        prompts=_prompts(body["prompt"]),
        max_tokens=max_tokens,
        echo=echo,
        logprobs=_int(body, "logprobs", None, 0, MAX_LOGPROBS),
        prompt_logprobs=_int(body, "prompt_logprobs", None, 0, MAX_LOGPROBS),
        n=n,
        temperature=_float(body, "temperature"),
        top_p=_float(body, "top_p"),
        seed=_int(body, "seed", None, -(2**63), 2**63 - 1),
    )


# -- errors ------------------------------------------------------------------------------------------
_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.NOT_FOUND: (404, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (400, "invalid_request_error"),  # a size limit; quotas are 429
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
}


def error_response(
    status: int, message: str, type_: str, code: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": type_, "param": None, "code": code}}, status, headers=headers
    )


def _from_error(exc: OffdpoError, headers: dict[str, str]) -> JSONResponse:
    """The OpenAI-shaped answer to a domain error: its gRPC status decides the HTTP one."""
    if isinstance(exc, QuotaExceeded):
        if exc.retry_after_s is None:  # larger than the team's whole minute: waiting cannot help, splitting does
            return error_response(400, str(exc), "invalid_request_error", exc.error_type, headers)
        retry = {"retry-after": str(max(1, math.ceil(exc.retry_after_s)))}
        return error_response(429, str(exc), "rate_limit_error", exc.error_type, {**headers, **retry})
    if isinstance(exc, NotReady):  # the detail (a load error, a path) is for the log only
        log.warning("HTTP answered 503: %s", exc)
        return error_response(
            503,
            NOT_READY_MESSAGE,
            "service_unavailable_error",
            exc.error_type,
            {**headers, "retry-after": str(NOT_READY_RETRY_S)},
        )
    status, type_ = _HTTP_STATUS.get(exc.grpc_status, (500, "server_error"))
    if isinstance(exc, BodyTooLarge):
        status = 413
    return error_response(status, str(exc), type_, exc.error_type, headers)


def fingerprint_headers(fp: records_pb2.ReferenceFingerprint | None) -> dict[str, str]:
    """One header per fingerprint field: `x-offdpo-fingerprint-id`, `x-offdpo-model-id`, ..."""
    if fp is None:
        return {}
    headers = {}
    for field in records_pb2.ReferenceFingerprint.DESCRIPTOR.fields:
        value = str(getattr(fp, field.name))
        if value:
            headers["x-offdpo-" + field.name.replace("_", "-")] = value.encode("ascii", "backslashreplace").decode()
    return headers


# -- the door ----------------------------------------------------------------------------------------
class HttpDoor:
    """The HTTP app and its uvicorn server, in the gRPC server's event loop. `auth`: the gRPC server's
    interceptor (its `decide` and quotas are this door's); `service`: its RefScoreService."""

    def __init__(self, service: RefScoreService, auth: grpc_auth.AuthInterceptor, cfg: RefscoreConfig):
        self.service = service
        self.auth = auth
        self.cfg = cfg
        self.app = Starlette(
            routes=[
                Route("/v1/completions", self.completions, methods=["POST"]),
                Route("/v1/models", self.models, methods=["GET"]),
            ],
            exception_handlers={HTTPException: self._http_error},  # unknown paths and methods, OpenAI-shaped
        )
        self.port: int | None = None
        self._server: _Uvicorn | None = None
        self._task: asyncio.Task[None] | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> int:
        """Listen on OFFDPO_REFSCORE_HTTP_PORT (OSError if it cannot) and serve in this event loop."""
        host, port = self.cfg.host, self.cfg.http_port
        # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets whose proto says TCP (the
        # accepted ones inherit it); with proto 0, Nagle and the client's delayed ACK add ~40 ms per answer.
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            raise OSError(f"cannot listen on {host}:{port} (OFFDPO_REFSCORE_HTTP_PORT): {exc}") from None
        self.port = sock.getsockname()[1]
        tls: dict[str, Any] = {}
        if not self.cfg.plaintext:
            tls = {"ssl_certfile": self.cfg.tls_cert, "ssl_keyfile": self.cfg.tls_key}
            if self.cfg.tls_client_ca:
                tls |= {"ssl_ca_certs": self.cfg.tls_client_ca, "ssl_cert_reqs": ssl.CERT_REQUIRED}
        config = uvicorn.Config(
            self.app,
            lifespan="off",
            log_level="warning",
            access_log=False,
            server_header=False,
            timeout_graceful_shutdown=max(1, math.ceil(self.cfg.grace_s)),
            **tls,
        )
        self._server = _Uvicorn(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]), name="refscore-http")
        while not self._server.started:
            if self._task.done():
                self._task.result()  # its error
                raise OSError(f"the HTTP door on {host}:{self.port} stopped while starting")
            await asyncio.sleep(0.01)
        log.info(
            "refscore HTTP door (OpenAI completions) on %s:%d (%s)", host, self.port, "PLAINTEXT" if not tls else "TLS"
        )
        return self.port

    async def stop(self, grace_s: float) -> None:
        """Stop listening; requests in flight get `grace_s` to finish, then are cancelled."""
        if self._server is None or self._task is None:
            return
        self._server.config.timeout_graceful_shutdown = max(1, math.ceil(grace_s))
        self._server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    # -- who calls ---------------------------------------------------------------------------
    def _decide(self, request: Request, method: str) -> Team | Refusal:
        """The gRPC interceptor's decision for this request's bearer token, in HTTP words."""
        header = request.headers.get("authorization")
        decision = self.auth.decide(SERVICE_PREFIX + method, [("authorization", header)] if header else [], None)
        if isinstance(decision, Refusal) and decision.code == grpc.StatusCode.UNAUTHENTICATED:
            what = "missing credentials" if header is None else "unknown or malformed bearer token"
            return Refusal(
                decision.code,
                f"{what}: send the header 'Authorization: Bearer <your team token>' (the openai client"
                " sends its api_key so)",
                decision.caller,
            )
        return decision

    @contextlib.contextmanager
    def _as_caller(self, team: Team) -> Iterator[None]:
        """Runs the request as `team`, holding one of its concurrency slots (QuotaExceeded if none)."""
        self.auth.quotas.acquire(team)
        token = CURRENT_CALLER.set(team)
        try:
            yield
        finally:
            CURRENT_CALLER.reset(token)
            self.auth.quotas.release(team)

    def _refused(self, refusal: Refusal, route: str, headers: dict[str, str]) -> Response:
        security.METRICS.refused(refusal.caller, refusal.code.name)
        status, type_ = _HTTP_STATUS[refusal.code]
        if status == 401:
            headers = {**headers, "www-authenticate": 'Bearer realm="refscore"'}
        log.info("HTTP %s: %s (%s)", route, refusal.code.name, refusal.caller)
        return error_response(status, refusal.message, type_, refusal.code.name.lower(), headers)

    def _failed(self, exc: OffdpoError, route: str, caller: str, headers: dict[str, str]) -> Response:
        code = exc.grpc_status.name
        metrics.RPC_ERRORS.labels(route, code).inc()
        metrics.CALLER_ERRORS.labels(caller, code).inc()
        return _from_error(exc, headers)

    async def _http_error(self, request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        message = f"{request.method} {request.url.path}: {exc.detail if isinstance(exc, HTTPException) else exc}"
        hint = "; refscore serves POST /v1/completions and GET /v1/models"
        return error_response(status, message + hint, "invalid_request_error", str(status), self._primary_headers())

    def _primary_headers(self) -> dict[str, str]:
        return fingerprint_headers(self.service.references.primary.fingerprint)

    # -- GET /v1/models ----------------------------------------------------------------------
    async def models(self, request: Request) -> Response:
        route = "HTTP /v1/models"
        headers = self._primary_headers()
        decision = self._decide(request, "GetModelInfo")
        security.METRICS.request(decision.caller if isinstance(decision, Refusal) else decision.name, route)
        if isinstance(decision, Refusal):
            return self._refused(decision, route, headers)
        created = int(time.time())
        data = [
            {
                "id": fp.model_id,
                "object": "model",
                "created": created,
                "owned_by": "offdpo",
                "root": fp.model_id,
                "parent": None,
                "max_model_len": scorer.max_model_len,
                "offdpo_fingerprint_id": fp.fingerprint_id,
            }
            for scorer in self.service.references.scorers
            if (fp := scorer.fingerprint) is not None and decision.model_refusal(fp.model_id) is None
        ]
        return JSONResponse({"object": "list", "data": data}, headers=headers)

    # -- POST /v1/completions ----------------------------------------------------------------
    async def completions(self, request: Request) -> Response:
        route = "HTTP /v1/completions"
        headers = self._primary_headers()
        decision = self._decide(request, "Score")  # before the body is read, as the interceptor does
        caller = decision.caller if isinstance(decision, Refusal) else decision.name
        security.METRICS.request(caller, route)
        if isinstance(decision, Refusal):
            return self._refused(decision, route, headers)
        try:
            params = parse_completion(await self._json_body(request), self.cfg)
            if params.max_tokens > 0 and decision.methods is not None and "Generate" not in decision.methods:
                raise MethodNotAllowed(
                    f"team {decision.name!r} may not call Generate, which max_tokens={params.max_tokens} needs"
                    " (it samples tokens): set max_tokens=0 with echo=true to score the prompt only"
                )
            with self._as_caller(decision):
                body, fp = await _unless_disconnected(request, self._complete(params))
        except OffdpoError as exc:
            return self._failed(exc, route, caller, headers)
        except ClientGone:
            log.info("HTTP %s: the client of %s left; its engine work was cancelled", route, caller)
            return Response(status_code=499)
        except Exception:  # noqa: BLE001 - a bug or an engine fault: logged, answered as OpenAI does
            log.exception("HTTP %s failed for %s", route, caller)
            metrics.RPC_ERRORS.labels(route, "INTERNAL").inc()
            return error_response(
                500, "internal error; see the refscore log", "server_error", "internal_error", headers
            )
        return JSONResponse(body, headers=fingerprint_headers(fp))

    async def _json_body(self, request: Request) -> object:
        import json

        limit = self.cfg.max_message_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise BodyTooLarge(
                f"the body has {declared} bytes; the limit is {limit} (OFFDPO_REFSCORE_MAX_MESSAGE_BYTES)"
            )
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge(f"the body is over {limit} bytes (OFFDPO_REFSCORE_MAX_MESSAGE_BYTES)")
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except ValueError:
            raise InvalidArgument("the body is not valid JSON (send Content-Type: application/json)") from None

    def _fingerprint_id(self, name: str) -> str:
        """The fingerprint id a request's `model` names: a served model id or fingerprint id; empty for
        the primary. UnknownModel (404) for any other; NotReady while a model that may be it loads."""
        if not name:
            return ""
        served = self.service.references.fingerprints()
        if any(fp.fingerprint_id == name for fp in served):
            return name
        named = [fp for fp in served if fp.model_id == name]
        if len(named) == 1:
            return named[0].fingerprint_id
        if named:
            ids = ", ".join(fp.fingerprint_id for fp in named)
            raise InvalidArgument(f"model {name!r} names {len(named)} served models ({ids}): send one fingerprint id")
        if any(s.fingerprint is None for s in self.service.references.scorers):
            raise NotReady(f"model {name!r} is not among the models loaded so far; some are still loading")
        listed = ", ".join(f"{fp.model_id} ({fp.fingerprint_id})" for fp in served)
        raise UnknownModel(f"the model {name!r} does not exist here; served: {listed} (GET /v1/models)")

    def _encode(self, model: LoadedModel, params: CompletionParams) -> list[list[int]]:
        """Every prompt's token ids: text as the Score RPC tokenises a text prompt (the tokenizer's special
        tokens, BOS once), ids verbatim (checked against the vocabulary)."""
        ids = []
        with request_local_cache():
            for i, prompt in enumerate(params.prompts):
                p = (
                    records_pb2.Prompt(text=prompt)
                    if isinstance(prompt, str)
                    else records_pb2.Prompt(token_ids=records_pb2.TokenIds(ids=prompt))
                )
                try:
                    ids.append(model.boundary.encode_prompt(p).ids)
                except TokenizationError as exc:
                    raise exc.at(f"prompt[{i}]" if len(params.prompts) > 1 else "prompt") from None
        return ids

    async def _complete(self, params: CompletionParams) -> tuple[dict[str, Any], records_pb2.ReferenceFingerprint]:
        fingerprint_id = self._fingerprint_id(params.model)
        _, model = self.service._select(fingerprint_id)  # the team's `models` checked against the pick
        self.service._check_quota()  # an empty bucket is refused before any tokenising
        prompt_ids = self._encode(model, params)
        fp = model.fingerprint
        # The prompts' log-probs: one Score item per prompt of 2+ tokens, (prompt [t0], answer [t1..tn]).
        scored: list[list[float] | None] = [None] * len(prompt_ids)
        if params.scores:
            scorable = [i for i, ids in enumerate(prompt_ids) if len(ids) > 1]
            if scorable:
                items = [
                    refscore_pb2.ScoreItem(
                        prompt=records_pb2.Prompt(token_ids=records_pb2.TokenIds(ids=prompt_ids[i][:1])),
                        answer_token_ids=records_pb2.TokenIds(ids=prompt_ids[i][1:]),
                    )
                    for i in scorable
                ]
                results, fp = await self.service.score(
                    refscore_pb2.ScoreRequest(items=items, expected_fingerprint_id=fp.fingerprint_id), None
                )
                metrics.RPC_ITEMS.labels("HTTP /v1/completions").inc(len(results))
                for i, item in zip(scorable, results):
                    scored[i] = list(item.token_logprobs)
        # Samples (max_tokens > 0): the Generate path, one request per prompt (the engine runs one
        # generate job at a time anyway).
        generated: list[list[refscore_pb2.GeneratedAnswer]] = []
        if params.max_tokens > 0:
            for ids in prompt_ids:
                request = refscore_pb2.GenerateRequest(
                    prompt=records_pb2.Prompt(token_ids=records_pb2.TokenIds(ids=ids)),
                    n=params.n,
                    max_tokens=params.max_tokens,
                    expected_fingerprint_id=fp.fingerprint_id,
                )
                if params.temperature is not None:
                    request.temperature = params.temperature
                if params.top_p is not None:
                    request.top_p = params.top_p
                if params.seed is not None:
                    request.seed = params.seed
                answer = await self.service.generate(request, None)
                generated.append(list(answer.answers))
        return _completion_body(model, params, prompt_ids, scored, generated, fp), fp


async def _unless_disconnected(request: Request, work: Awaitable[Any]) -> Any:
    """`work`'s result; cancelled (its queued engine jobs dropped) if the client goes away first."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ClientGone
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


# -- the answer --------------------------------------------------------------------------------------
def _logprob(value: float) -> float:
    return max(float(value), MIN_LOGPROB)


def _completion_logprobs(tokens: Sequence[str], logprobs: Sequence[float | None]) -> dict[str, Any]:
    """OpenAI's `choices[i].logprobs` (vLLM's `_create_completion_logprobs`, top = the chosen token only)."""
    offsets, at = [], 0
    for token in tokens:
        offsets.append(at)
        at += len(token)
    return {
        "text_offset": offsets,
        "token_logprobs": [None if lp is None else _logprob(lp) for lp in logprobs],
        "tokens": list(tokens),
        "top_logprobs": [None if lp is None else {token: _logprob(lp)} for token, lp in zip(tokens, logprobs)],
    }


def _completion_body(
    model: LoadedModel,
    params: CompletionParams,
    prompt_ids: list[list[int]],
    scored: list[list[float] | None],
    generated: list[list[refscore_pb2.GeneratedAnswer]],
    fp: records_pb2.ReferenceFingerprint,
) -> dict[str, Any]:
    tok = model.boundary.tok
    choices: list[dict[str, Any]] = []
    completion_tokens = 0
    for i, ids in enumerate(prompt_ids):
        pieces = [tok.decode([t]) for t in ids]
        prompt_lps: list[float | None] = [None, *(scored[i] or [])]
        prompt_text = params.prompts[i] if isinstance(params.prompts[i], str) else tok.decode(ids)
        prompt_logprobs = (
            [None]
            + [
                {str(t): {"logprob": _logprob(lp), "rank": None, "decoded_token": piece}}
                for t, lp, piece in zip(ids[1:], scored[i] or [], pieces[1:])
            ]
            if params.prompt_logprobs is not None
            else None
        )
        answers: Sequence[refscore_pb2.GeneratedAnswer | None] = list(generated[i]) if generated else [None] * params.n
        for answer in answers:
            out_ids = list(answer.token_ids) if answer is not None else []
            out_lps: list[float | None] = list(answer.token_logprobs) if answer is not None else []
            out_pieces = [tok.decode([t]) for t in out_ids]
            text = answer.text if answer is not None else ""
            completion_tokens += len(out_ids)
            logprobs = None
            if params.logprobs is not None:
                logprobs = (
                    _completion_logprobs(pieces + out_pieces, prompt_lps + out_lps)
                    if params.echo
                    else _completion_logprobs(out_pieces, out_lps)
                )
            choices.append(
                {
                    "index": len(choices),
                    "text": str(prompt_text) + text if params.echo else text,
                    "logprobs": logprobs,
                    "finish_reason": answer.finish_reason if answer is not None else "length",
                    "stop_reason": None,
                    "prompt_logprobs": prompt_logprobs,
                }
            )
    prompt_tokens = sum(len(ids) for ids in prompt_ids)
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": params.model or fp.model_id,
        "system_fingerprint": fp.fingerprint_id,
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


class _Uvicorn(uvicorn.Server):
    """uvicorn inside refscore's event loop: the process's signals stay refscore's (its SIGTERM drain
    stops this server with the gRPC one), so uvicorn installs no handlers of its own."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield
