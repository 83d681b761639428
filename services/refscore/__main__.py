"""refscore entrypoint.

    python -m services.refscore serve            # gRPC API (+ the stream worker with --worker
                                                 #   or OFFDPO_REFSCORE_WORKER=true), one shared engine
    python -m services.refscore worker           # the stream worker alone (no gRPC port)

Configuration: environment variables (`offdpo config`), e.g.
    OFFDPO_REFSCORE_MODEL_DIR=models/tiny OFFDPO_REFSCORE_ENGINE=vllm python -m services.refscore serve --worker
SIGTERM/SIGINT: health goes NOT_SERVING, the worker finishes (and commits) its current batch,
in-flight RPCs get OFFDPO_REFSCORE_GRACE_S seconds, then the engine shuts down.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import threading
from typing import Any, Literal

from offdpo.config import ConfigError, KafkaConfig, S3Config
from offdpo.shutdown import StopOnSignals
from services.refscore.config import RefscoreConfig
from services.refscore.scorer import Scorer
from services.refscore.server import RefscoreServer
from services.refscore.worker import StreamWorker

log = logging.getLogger("refscore")


async def _serve(cfg: RefscoreConfig, with_worker: bool) -> int:
    server = RefscoreServer(cfg)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    worker_stop = threading.Event()
    worker_thread = None
    load = asyncio.create_task(server.load_engine())
    if with_worker:
        worker = StreamWorker(server.scorer, cfg, KafkaConfig.from_env(), S3Config.from_env())
        worker_thread = threading.Thread(target=worker.run, args=(worker_stop,), name="refscore-worker", daemon=True)
        worker_thread.start()
    ending = await _what_ends_serving(load, stop, worker_thread, cfg.grace_s)
    worker_stop.set()
    if ending == "load failed":
        await server.stop(0)
        return 1
    if worker_thread is not None:
        await asyncio.to_thread(worker_thread.join, cfg.grace_s)
    await server.stop()
    log.info("stopped cleanly" if ending == "signal" else "stopped")
    return 0 if ending == "signal" else 1


async def _what_ends_serving(
    load: asyncio.Task[None], stop: asyncio.Event, worker_thread: threading.Thread | None, grace_s: float
) -> Literal["load failed", "signal", "worker died"]:
    waiter = asyncio.create_task(stop.wait())
    # A worker thread that dies (its traceback is logged) must not leave a pod serving gRPC with its
    # stream dead: stop with exit 1 so Kubernetes restarts the container.
    worker_done = asyncio.create_task(asyncio.to_thread(worker_thread.join)) if worker_thread else None
    watched: set[asyncio.Task[Any]] = {load, waiter} | ({worker_done} if worker_done else set())
    while True:
        done, _ = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
        if load in done and load.exception() is not None:
            log.error("engine failed to load: %s", load.exception())
            return "load failed"
        if waiter in done:
            log.info("signal received: draining (grace %.0f s)", grace_s)
            return "signal"
        if worker_done in done:
            log.error(
                "the stream worker stopped unexpectedly (traceback above); stopping with exit 1 so the "
                "container is restarted"
            )
            return "worker died"
        watched -= done


def _worker_only(cfg: RefscoreConfig) -> int:
    scorer = Scorer(cfg)
    with StopOnSignals("the worker finishes (and commits) its current batch, then stops") as stop:
        scorer.load()
        try:
            StreamWorker(scorer, cfg, KafkaConfig.from_env(), S3Config.from_env()).run(stop.requested)
        finally:
            scorer.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)
    parser = argparse.ArgumentParser(
        prog="python -m services.refscore", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("mode", choices=["serve", "worker"])
    parser.add_argument("--worker", action="store_true", help="serve: also run the stream worker")
    args = parser.parse_args(argv)
    try:
        cfg = RefscoreConfig.from_env()
        cfg.engine_settings()  # refuse bad engine knobs now, not after the model has loaded
        if cfg.metrics_port:
            from prometheus_client import start_http_server

            start_http_server(cfg.metrics_port, addr=cfg.host)
        if args.mode == "serve":
            return asyncio.run(_serve(cfg, args.worker or cfg.worker_enabled))
        return _worker_only(cfg)
    except ConfigError as exc:
        log.error("configuration error: %s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
