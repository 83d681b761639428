"""The labeler's gRPC server (grpc.aio): submit candidate sets, submit one human judgement.

Requests are validated before anything is labelled: a bad request is refused as a whole with
INVALID_ARGUMENT and a message naming the set and what to fix. Responses return after Kafka has
acknowledged the pairs. Health (grpc.health.v1) and reflection are served too.

Security (the shared `offdpo.grpc_auth` layer, settings in `server_config.py`): TLS or mTLS with
certificates reloaded when their files change; every Labeler RPC is authenticated (team token, or the
client certificate's CN) and authorised per method by one interceptor before its request is read
(a team may be allowed SubmitCandidates but not SubmitJudgement); health and reflection stay open.
`serve` refuses to start without TLS and an auth file unless OFFDPO_LABELER_PLAINTEXT=true and
OFFDPO_LABELER_ALLOW_ANONYMOUS=true say explicitly that this is local development.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from offdpo.errors import BadInput
from offdpo.grpc_auth import AuthInterceptor, Quotas, ServerSecurity
from offdpo.v1 import labeler_pb2, labeler_pb2_grpc
from services.labeler.errors import PublishError
from services.labeler.inputs import Item, validate_candidate_set, validate_judgement
from services.labeler.names import StrategyName, candidate_strategy_problem
from services.labeler.pipeline import Labeler, SetReport

log = logging.getLogger(__name__)
SERVICE_NAME = labeler_pb2.DESCRIPTOR.services_by_name["Labeler"].full_name


class LabelerServicer(labeler_pb2_grpc.LabelerServicer):
    def __init__(self, labeler: Labeler):
        self.labeler = labeler

    async def SubmitCandidates(
        self, request: labeler_pb2.SubmitCandidatesRequest, context: grpc.aio.ServicerContext
    ) -> labeler_pb2.SubmitCandidatesResponse:
        cfg = self.labeler.cfg
        if not request.sets:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "no candidate sets: add at least one to 'sets'")
        if len(request.sets) > cfg.grpc_max_sets:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{len(request.sets)} candidate sets, over the limit of {cfg.grpc_max_sets}: split the request",
            )
        wrong = candidate_strategy_problem(request.strategy) if request.strategy else None
        if wrong:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, wrong)
        for i, cs in enumerate(request.sets):
            try:
                validate_candidate_set(cs, cfg.max_answers)
            except BadInput as exc:
                name = f" ({cs.set_id!r})" if cs.set_id else ""
                await context.abort(exc.grpc_status, f"sets[{i}]{name}: {exc}")
        peer = context.peer() or "unknown"
        items = [
            Item(source=f"grpc:{peer}", offset=i, raw=cs.SerializeToString(), value=cs)
            for i, cs in enumerate(request.sets)
        ]
        try:
            reports = await asyncio.to_thread(self._label, items, request.strategy)
        except PublishError as exc:
            await context.abort(exc.grpc_status, f"pairs not acknowledged by Kafka, retry: {exc}")
        resp = labeler_pb2.SubmitCandidatesResponse()
        for i, (cs, rep) in enumerate(zip(request.sets, reports)):
            resp.results.add(
                index=i,
                set_id=cs.set_id,
                strategy=rep.strategy,
                pair_ids=rep.pair_ids,
                duplicate_pair_ids=rep.duplicate_ids,
                ties=rep.ties,
                error=rep.error,
            )
        return resp

    def _label(self, items: list[Item[labeler_pb2.CandidateSet]], strategy: str) -> list[SetReport]:
        reports = self.labeler.label_candidates(items, strategy)
        self.labeler.confirm()
        return reports

    async def SubmitJudgement(
        self, request: labeler_pb2.HumanJudgement, context: grpc.aio.ServicerContext
    ) -> labeler_pb2.SubmitJudgementResponse:
        try:
            validate_judgement(request)
        except BadInput as exc:
            await context.abort(exc.grpc_status, f"judgement: {exc}")
        item = Item(
            source=f"grpc:{context.peer() or 'unknown'}", offset=0, raw=request.SerializeToString(), value=request
        )

        def run() -> SetReport:
            reports = self.labeler.publish_pairs([item], StrategyName.HUMAN.value)
            self.labeler.confirm()
            return reports[0]

        try:
            rep = await asyncio.to_thread(run)
        except PublishError as exc:
            await context.abort(exc.grpc_status, f"pair not acknowledged by Kafka, retry: {exc}")
        ids = rep.pair_ids or rep.duplicate_ids
        return labeler_pb2.SubmitJudgementResponse(
            pair_id=ids[0] if ids else "", published=bool(rep.pair_ids), duplicate=bool(rep.duplicate_ids)
        )


async def start_server(
    labeler: Labeler, host: str, port: int, security: ServerSecurity | None = None
) -> tuple[grpc.aio.Server, int]:
    """Start the server; returns it and the bound port (port 0 picks a free one).

    `security`: TLS credentials and token store (`offdpo.grpc_auth.build(LabelerServerConfig.security())`,
    which `serve` requires); None serves plaintext to anonymous callers, for in-process tests only.
    """
    if security is None:
        log.warning("SECURITY: labeler gRPC in PLAINTEXT without a token (in-process use only)")
        security = ServerSecurity(None, None)
    limit = labeler.cfg.grpc_max_message_bytes
    server = grpc.aio.server(
        interceptors=[AuthInterceptor(security.store, Quotas(), service="labeler")],
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            ("grpc.so_reuseport", 0),
        ],
    )
    labeler_pb2_grpc.add_LabelerServicer_to_server(LabelerServicer(labeler), server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection((SERVICE_NAME, "grpc.health.v1.Health", reflection.SERVICE_NAME), server)
    credentials = security.credentials()
    address = f"{host}:{port}"
    bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if bound == 0:
        raise RuntimeError(f"cannot bind the labeler gRPC server to {host}:{port}")
    await server.start()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    await health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    log.info(
        "labeler gRPC server on %s:%d (%s%s, %s)",
        host,
        bound,
        "TLS" if credentials else "PLAINTEXT",
        ", mTLS" if security.mtls else "",
        "team tokens" if security.store is not None else "anonymous callers",
    )
    return server, bound


async def start_health_port(host: str, port: int) -> tuple[grpc.aio.Server, int]:
    """A plaintext health-only server: kubelet's gRPC probes cannot speak TLS, and this port serves
    nothing but grpc.health.v1 (no token or training data ever crosses it)."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise RuntimeError(f"cannot bind the labeler's health port to {host}:{port} (OFFDPO_LABELER_HEALTH_PORT)")
    await server.start()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    await health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    return server, bound


async def serve(
    labeler: Labeler, host: str, port: int, security: ServerSecurity | None = None, health_port: int = 0
) -> None:
    server, _ = await start_server(labeler, host, port, security)
    health_server = (await start_health_port(host, health_port))[0] if health_port else None
    try:
        await server.wait_for_termination()
    finally:
        if health_server is not None:
            await health_server.stop(grace=None)
        await server.stop(grace=5)
