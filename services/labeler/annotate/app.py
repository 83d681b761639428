"""The annotation pages (Starlette, server-rendered Jinja templates, a few lines of vanilla JS for keys).

GET  /login /guidelines /healthz /metrics      no session needed
POST /login                                    token + the sign-in form's CSRF token
GET  /  /stats                                 401 without a session
POST /judge /undo /logout                      401 without a session, 403 with a wrong CSRF token
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from services.labeler.annotate import auth
from services.labeler.annotate.agreement import fmt
from services.labeler.annotate.queue import QueueError
from services.labeler.annotate.service import Annotation, agreement
from services.labeler.config import AnnotateConfig
from services.labeler.inputs import prompt_text

HERE = Path(__file__).resolve().parent
DEFAULT_GUIDELINES = HERE / "guidelines.md"


@dataclass(frozen=True)
class Guidelines:
    text: str
    version: str

    @classmethod
    def load(cls, path: str = "", version: str = "") -> Guidelines:
        text = Path(path or DEFAULT_GUIDELINES).read_text(encoding="utf-8")
        return cls(text, version or hashlib.sha256(text.encode()).hexdigest()[:12])


class _Metrics:
    """Prometheus collector reading the queue at scrape time (no counters to keep in step)."""

    def __init__(self, annotation: Annotation, batch_size: int):
        self.annotation, self.batch_size = annotation, batch_size

    def collect(self) -> Any:
        counts = self.annotation.queue.counts()
        items = GaugeMetricFamily("offdpo_annotate_items", "items in the annotation queue", labels=["state"])
        items.add_metric(["open"], counts["open"])
        items.add_metric(["decided"], counts["decided"])
        yield items
        yield CounterMetricFamily("offdpo_annotate_judgements", "judgements recorded", value=counts["judgements"])
        yield CounterMetricFamily("offdpo_annotate_pairs", "pairs published from decided items", value=counts["pairs"])
        overall, _ = agreement(self.annotation.queue, self.batch_size)
        g = GaugeMetricFamily(
            "offdpo_annotate_agreement", "agreement over all items (NaN: undefined)", labels=["statistic"]
        )
        for name, value in (
            ("cohen_kappa", overall.kappa),
            ("krippendorff_alpha", overall.alpha),
            ("judge_kappa", overall.judge_kappa),
        ):
            g.add_metric([name], float("nan") if value is None else value)
        yield g


def create_app(cfg: AnnotateConfig, annotation: Annotation, tokens: auth.Tokens, guidelines: Guidelines) -> Starlette:
    queue = annotation.queue
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.filters["fmt"] = fmt
    registry = CollectorRegistry(auto_describe=True)
    registry.register(_Metrics(annotation, cfg.stats_batch))

    def page(request: Request, name: str, status: int = 200, **ctx: Any) -> Response:
        return templates.TemplateResponse(request, name, ctx, status_code=status)

    def cookie(resp: Response, name: str, value: str, max_age: int) -> None:
        resp.set_cookie(
            name, value, max_age=max_age, httponly=True, secure=not cfg.insecure_cookies, samesite="strict", path="/"
        )

    def session(request: Request) -> tuple[str, str] | None:
        sid = request.cookies.get(auth.SESSION_COOKIE, "")
        return queue.session(auth.hash_token(sid)) if sid else None

    def unauthorized(request: Request) -> Response:
        return page(request, "message.html", 401, title="Sign in first", message="Your session is missing or expired.")

    async def checked(request: Request) -> tuple[str, str, Any] | Response:
        """(annotator, csrf, form) for a POST, or the 401/403 response to send."""
        who = session(request)
        if who is None:
            return unauthorized(request)
        form = await request.form()
        if not auth.same(str(form.get("csrf", "")), who[1]):
            return page(request, "message.html", 403, title="Forbidden", message="The form's CSRF token is wrong.")
        return who[0], who[1], form

    async def login_page(request: Request) -> Response:
        csrf = auth.new_secret()
        resp = page(request, "login.html", csrf=csrf, error="")
        cookie(resp, auth.LOGIN_COOKIE, csrf, 3600)
        return resp

    async def login(request: Request) -> Response:
        form = await request.form()
        if not auth.same(str(form.get("csrf", "")), request.cookies.get(auth.LOGIN_COOKIE, "")):
            return page(request, "message.html", 403, title="Forbidden", message="The sign-in form expired: reload it.")
        annotator = tokens.annotator(str(form.get("token", "")))
        if annotator is None:
            csrf = auth.new_secret()
            resp = page(request, "login.html", 401, csrf=csrf, error="Unknown token.")
            cookie(resp, auth.LOGIN_COOKIE, csrf, 3600)
            return resp
        sid = auth.new_secret()
        queue.add_session(auth.hash_token(sid), annotator, auth.new_secret(), time.time() + cfg.session_s)
        resp = RedirectResponse("/", status_code=303)
        cookie(resp, auth.SESSION_COOKIE, sid, int(cfg.session_s))
        resp.delete_cookie(auth.LOGIN_COOKIE, path="/")
        return resp

    async def logout(request: Request) -> Response:
        got = await checked(request)
        if isinstance(got, Response):
            return got
        queue.drop_session(auth.hash_token(request.cookies.get(auth.SESSION_COOKIE, "")))
        resp = RedirectResponse("/login", status_code=303)
        resp.delete_cookie(auth.SESSION_COOKIE, path="/")
        return resp

    async def index(request: Request) -> Response:
        who = session(request)
        if who is None:
            return unauthorized(request)
        annotator, csrf = who
        now = time.time()
        claim = queue.claim(annotator, now)
        done, remaining = queue.progress(annotator, now)
        last = queue.last_judgement(annotator)
        undo_left = 0.0
        if last is not None and (item := queue.item(last.item_id)) is not None and item.outcome is None:
            undo_left = max(0.0, cfg.undo_s - (now - last.judged_at))
        return page(
            request,
            "annotate.html",
            annotator=annotator,
            csrf=csrf,
            claim=claim,
            prompt=prompt_text(claim.item.prompt) if claim else "",
            done=done,
            remaining=remaining,
            undo_left=int(undo_left + 0.999),
            guidelines=guidelines,
            max_chars=cfg.rationale_max_chars,
        )

    async def judge(request: Request) -> Response:
        got = await checked(request)
        if isinstance(got, Response):
            return got
        annotator, _, form = got
        rationale = str(form.get("rationale", "")).strip()
        if len(rationale) > cfg.rationale_max_chars:
            msg = f"The rationale is {len(rationale)} characters; the limit is {cfg.rationale_max_chars}. Shorten it."
            return page(request, "message.html", 413, title="Rationale too long", message=msg)
        try:
            queue.judge(
                annotator, str(form.get("item_id", "")), str(form.get("key", "")), rationale, guidelines.version
            )
        except QueueError as exc:
            return page(request, "message.html", 409, title="Not recorded", message=str(exc))
        return RedirectResponse("/", status_code=303)

    async def undo(request: Request) -> Response:
        got = await checked(request)
        if isinstance(got, Response):
            return got
        if queue.undo(got[0]) is None:
            msg = "Nothing to undo: the last judgement is final (its grace period is over) or there is none."
            return page(request, "message.html", 409, title="Too late to undo", message=msg)
        return RedirectResponse("/", status_code=303)

    async def stats(request: Request) -> Response:
        who = session(request)
        if who is None:
            return unauthorized(request)
        overall, batches = agreement(queue, cfg.stats_batch)
        return page(request, "stats.html", annotator=who[0], overall=overall, batches=batches, counts=queue.counts())

    async def guidelines_page(request: Request) -> Response:
        return page(request, "guidelines.html", guidelines=guidelines)

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    async def healthz(request: Request) -> Response:
        problem = annotation.health.problem(annotation.labeler.cfg.outage_ready_s)
        if problem:
            return PlainTextResponse(problem, status_code=503)
        return PlainTextResponse("ok")

    return Starlette(
        routes=[
            Route("/", index),
            Route("/login", login_page, methods=["GET"]),
            Route("/login", login, methods=["POST"]),
            Route("/logout", logout, methods=["POST"]),
            Route("/judge", judge, methods=["POST"]),
            Route("/undo", undo, methods=["POST"]),
            Route("/stats", stats),
            Route("/guidelines", guidelines_page),
            Route("/metrics", metrics),
            Route("/healthz", healthz),
            Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
        ]
    )
