"""refscore entrypoint.

    python -m services.refscore serve            # gRPC API (+ the stream worker with --worker
                                                 #   or OFFDPO_REFSCORE_WORKER=true), one shared engine
    python -m services.refscore worker           # the stream worker alone (no gRPC port)
    python -m services.refscore rescore --from scores/<fingerprint id>/ --model DIR
                                                 # backfill: stored pairs scored under a new reference
                                                 #   (services/refscore/backfill.py; --help for options)
    python -m services.refscore archive [--until-idle S]
                                                 # the pairs archive: the pairs topic -> Parquet in S3
                                                 #   (offdpo/archive.py), its own consumer group

Configuration: environment variables (`offdpo config`), e.g.
    OFFDPO_REFSCORE_MODEL_DIR=models/tiny OFFDPO_REFSCORE_ENGINE=vllm python -m services.refscore serve --worker
or a file, `serve --config refscore.yaml` (examples/refscore.yaml: refscore's settings at the top level,
`kafka:`, `s3:` and `quota:` sections); environment variables override the file and flags of the same
names (--model-dir, --engine, ...) override both; `--print-config` prints the resolved file.
`serve` also serves the models of OFFDPO_REFSCORE_EXTRA_MODEL_DIRS (an engine each; requests pick one by
fingerprint), and the stream worker (with `serve --worker` or `worker`) scores with all of them: each pair
names its reference by fingerprint (empty: OFFDPO_REFSCORE_MODEL_DIR's model; one not served: dead letter).
SIGTERM/SIGINT: health goes NOT_SERVING, the worker finishes (and commits) its current batch,
in-flight RPCs get OFFDPO_REFSCORE_GRACE_S seconds, then the engine shuts down.
Watchdog (services/refscore/watchdog.py): the engine or stream-worker thread dead, or stuck for
OFFDPO_REFSCORE_STALL_S, makes health NOT_SERVING and the process exit 1 (stuck: at once, without an
orderly stop) so Kubernetes restarts it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal, NoReturn

from offdpo.config import ConfigError, EnvConfig, KafkaConfig, S3Config, Settings, add_setting_flags, parse_settings
from offdpo.health import LoopHealthServer
from offdpo.shutdown import StopOnSignals
from services.refscore import security
from services.refscore.config import CONFIG_FILE, RefscoreConfig, RefscoreQuotaConfig
from services.refscore.scorer import Scorer
from services.refscore.server import RefscoreServer
from services.refscore.watchdog import Heartbeat, Problem, Watchdog, WorkerHealth
from services.refscore.worker import StreamWorker

log = logging.getLogger("refscore")


class _AllEngines:
    """The watchdog's view (watchdog.EngineState) of every served model's engine at once: any engine
    thread dead or stuck is the process's problem, whichever model it serves."""

    def __init__(self, scorers: Sequence[Scorer]):
        self.scorers = list(scorers)

    @property
    def stopping(self) -> bool:
        return any(s.stopping for s in self.scorers)

    def engine_alive(self) -> bool:
        return all(s.engine_alive() for s in self.scorers)

    def engine_busy_s(self, now: float | None = None) -> float:
        return max(s.engine_busy_s(now) for s in self.scorers)


async def _serve(
    cfg: RefscoreConfig,
    with_worker: bool,
    kafka: KafkaConfig | None = None,
    s3: S3Config | None = None,
    replicas: int | None = None,
) -> int:
    """`kafka`, `s3`, `replicas`: the resolved settings (default: the environment's)."""
    server = RefscoreServer(cfg, replicas=replicas)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    worker_stop = threading.Event()
    worker_thread = None
    beat = Heartbeat()
    load = asyncio.create_task(server.load_engine())
    if with_worker:  # the stream worker scores with every served model; it starts once all have loaded
        worker = StreamWorker(
            server.scorer,
            cfg,
            kafka or KafkaConfig.from_env(),
            s3 or S3Config.from_env(),
            heartbeat=beat,
            extra_scorers=server.scorers[1:],
        )
        worker_thread = threading.Thread(target=worker.run, args=(worker_stop,), name="refscore-worker", daemon=True)
        worker_thread.start()
    engines = server.scorer if len(server.scorers) == 1 else _AllEngines(server.scorers)
    watchdog = Watchdog(engines, cfg.stall_s, worker_thread, beat if with_worker else None)
    ending = await _what_ends_serving(load, stop, watchdog, cfg.grace_s)
    watchdog.stopping()
    worker_stop.set()
    if ending == "load failed":
        await server.stop(0)
        return 1
    if isinstance(ending, Problem):
        # Probes and load balancers see NOT_SERVING at once, whatever happens next.
        await server.health.enter_graceful_shutdown()
        if ending.stalled:
            _exit_now(server.scorers, 1)  # a stuck thread would block any orderly stop
    if worker_thread is not None:
        await asyncio.to_thread(worker_thread.join, cfg.grace_s)
    await server.stop()
    log.info("stopped cleanly" if ending == "signal" else "stopped")
    return 0 if ending == "signal" else 1


async def _what_ends_serving(
    load: asyncio.Task[None], stop: asyncio.Event, watchdog: Watchdog, grace_s: float
) -> Literal["load failed", "signal"] | Problem:
    waiter = asyncio.create_task(stop.wait())
    # A dead or stuck engine or stream worker must not leave a pod serving (health SERVING) with its
    # work stopped: the watchdog's problem ends serving with exit 1 so Kubernetes restarts the container.
    watch = asyncio.create_task(_watch(watchdog))
    watched: set[asyncio.Task[Any]] = {load, waiter, watch}
    try:
        while True:
            done, _ = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
            if load in done and load.exception() is not None:
                log.error("engine failed to load: %s", load.exception())
                return "load failed"
            if waiter in done:
                log.info("signal received: draining (grace %.0f s)", grace_s)
                return "signal"
            if watch in done:
                problem = watch.result()
                log.error("%s; stopping with exit 1 so the container is restarted", problem)
                return problem
            watched -= done
    finally:
        for task in (waiter, watch):
            task.cancel()


async def _watch(watchdog: Watchdog, every_s: float = 1.0) -> Problem:
    while (problem := watchdog.problem()) is None:
        await asyncio.sleep(every_s)
    return problem


def _exit_now(scorers: Scorer | Sequence[Scorer], code: int, engine_grace_s: float = 10.0) -> NoReturn:
    """Exit at once, skipping the orderly stop a stuck thread would block. Each engine gets a bounded
    chance (`engine_grace_s` for all together) to release what lives outside this process (vLLM's
    engine-core process)."""
    closers = [
        threading.Thread(target=s.engine.shutdown, name="engine-shutdown", daemon=True)
        for s in ([scorers] if isinstance(scorers, Scorer) else scorers)
        if s.engine is not None
    ]
    for closer in closers:
        closer.start()
    deadline = time.monotonic() + engine_grace_s
    for closer in closers:
        closer.join(max(0.0, deadline - time.monotonic()))
    log.critical("exiting with %d without an orderly stop", code)
    logging.shutdown()
    os._exit(code)


def _worker_only(cfg: RefscoreConfig, kafka: KafkaConfig | None = None, s3: S3Config | None = None) -> int:
    # The primary and the extras (OFFDPO_REFSCORE_EXTRA_MODEL_DIRS), loaded one after another (vLLM sizes
    # its memory from what is free when it starts); pairs pick one by fingerprint.
    scorers = [Scorer(c) for c in cfg.model_configs()]
    scorer = scorers[0]
    engines = scorer if len(scorers) == 1 else _AllEngines(scorers)
    beat = Heartbeat()
    health = WorkerHealth()
    # Kubelet's gRPC probes (OFFDPO_REFSCORE_HEALTH_PORT): NOT_SERVING until the engines are loaded.
    probes = (
        LoopHealthServer(health, cfg.host, cfg.health_port, "OFFDPO_REFSCORE_HEALTH_PORT")
        if cfg.health_port
        else contextlib.nullcontext()
    )
    with probes, StopOnSignals("the worker finishes (and commits) its current batch, then stops") as stop:
        try:
            for s in scorers:
                s.load()
        except BaseException:
            for s in scorers:
                if s.ready.is_set():
                    s.shutdown()
            raise
        watchdog = Watchdog(engines, cfg.stall_s, worker_beat=beat)
        health.watchdog = watchdog
        failed = threading.Event()

        def watch() -> None:
            while not stop.requested.is_set():
                problem = watchdog.problem()
                if problem is not None:
                    log.error("%s; stopping with exit 1 so the container is restarted", problem)
                    failed.set()
                    if problem.stalled:
                        _exit_now(scorers, 1)
                    # A dead engine: the worker stops after its batch (its engine waits fail at once);
                    # should it not return within the grace period, exit anyway.
                    stop.requested.set()
                    backstop = threading.Timer(cfg.grace_s, _exit_now, args=(scorers, 1))
                    backstop.daemon = True
                    backstop.start()
                    return
                stop.requested.wait(1.0)

        threading.Thread(target=watch, name="refscore-watchdog", daemon=True).start()
        try:
            StreamWorker(
                scorer,
                cfg,
                kafka or KafkaConfig.from_env(),
                s3 or S3Config.from_env(),
                heartbeat=beat,
                extra_scorers=scorers[1:],
            ).run(stop.requested)
        finally:
            health.stopping()
            watchdog.stopping()
            for s in scorers:
                s.shutdown()
    return 1 if failed.is_set() else 0


def _archive_main(argv: list[str]) -> int:
    from offdpo.archive import run_archiver

    parser = argparse.ArgumentParser(
        prog="python -m services.refscore archive",
        description="Archive the pairs topic to S3 as Parquet (offdpo/archive.py); settings OFFDPO_ARCHIVE_*.",
    )
    parser.add_argument(
        "--until-idle", type=float, default=None, help="stop once no record arrived for this many seconds"
    )
    args = parser.parse_args(argv)
    try:
        return run_archiver(args.until_idle)
    except ConfigError as exc:
        log.error("configuration error: %s", exc)
        return 2


def _check_model_source(cfg: RefscoreConfig, s3: S3Config | None = None) -> None:
    """An s3:// model URI must be well formed before anything starts (its download happens while the
    engine loads, health NOT_SERVING meanwhile: services/refscore/model_source.py), the extra models'
    (OFFDPO_REFSCORE_EXTRA_MODEL_DIRS) too, and they must fit together (both modes load them all).
    `s3`: the resolved S3 settings; the download reads the environment's (Scorer.load), so a config file's
    `s3:` section that would change them for a model in S3 is refused rather than ignored."""
    from services.refscore.model_source import is_s3_uri, parse_s3_uri

    in_s3 = [c.model_dir for c in cfg.model_configs() if is_s3_uri(c.model_dir)]
    for uri in in_s3:
        parse_s3_uri(uri)
    if in_s3 and s3 is not None and s3 != S3Config.from_env():
        raise ConfigError(
            f"{in_s3[0]}: models in S3 are downloaded with the OFFDPO_S3_* environment variables only; set "
            "them there instead of in the config file's `s3:` section"
        )


def parse_args(argv: Sequence[str]) -> tuple[Settings, argparse.Namespace]:
    """`serve`/`worker`: defaults < --config FILE < OFFDPO_* environment variables < flags (one per setting).
    ConfigError (one line naming the setting) for a bad one."""

    def build(bases: Mapping[type[EnvConfig], EnvConfig]) -> argparse.ArgumentParser:
        parser = argparse.ArgumentParser(
            prog="python -m services.refscore",
            description=__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        parser.add_argument("mode", choices=["serve", "worker"])
        parser.add_argument(
            "--worker", action="store_true", help="serve: also run the stream worker (--worker-enabled)"
        )
        CONFIG_FILE.add_arguments(parser)
        add_setting_flags(
            parser.add_argument_group("settings (the file's top level)"), RefscoreConfig, bases[RefscoreConfig]
        )
        add_setting_flags(
            parser.add_argument_group("quotas (the `quota:` section)"), RefscoreQuotaConfig, bases[RefscoreQuotaConfig]
        )
        return parser

    def overrides(ns: argparse.Namespace) -> dict[type[EnvConfig], dict[str, Any]]:
        return {RefscoreConfig: {"worker_enabled": True}} if ns.worker else {}

    return parse_settings(argv, CONFIG_FILE, build, flagged=(RefscoreConfig, RefscoreQuotaConfig), overrides=overrides)


def main(argv: list[str] | None = None) -> int:
    """The command line (also `offdpo refscore`). A bad setting (file, environment variable, flag) is one
    line on stderr, `refscore: <what is wrong>`, and exit 2; no traceback."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "rescore":  # subcommands with options of their own
        from services.refscore.backfill import main as rescore_main

        return rescore_main(argv[1:])
    if argv and argv[0] == "archive":
        return _archive_main(argv[1:])
    try:
        settings, args = parse_args(argv)
        cfg = settings.of(RefscoreConfig)
        cfg.engine_settings()  # refuse bad engine knobs now, not after the model has loaded
        _check_model_source(cfg, settings.of(S3Config))
        if args.print_config:
            print(CONFIG_FILE.dump(settings), end="")
            return 0
        if args.mode == "serve":  # TLS and auth file settings, before anything listens or connects
            security.build(cfg)
    except ConfigError as exc:
        print(f"refscore: {exc}", file=sys.stderr)
        return 2
    kafka, s3 = settings.of(KafkaConfig), settings.of(S3Config)
    try:
        if cfg.metrics_port:
            from prometheus_client import start_http_server

            start_http_server(cfg.metrics_port, addr=cfg.host)
        if args.mode == "serve":
            replicas = settings.of(RefscoreQuotaConfig).replicas
            return asyncio.run(_serve(cfg, cfg.worker_enabled, kafka, s3, replicas))
        return _worker_only(cfg, kafka, s3)
    except ConfigError as exc:  # met while starting (Kafka's client settings, a model's files)
        log.error("configuration error: %s", exc)
        print(f"refscore: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    from offdpo.errors import ConfigError

    try:
        code = main()
    except ConfigError as exc:  # a bad setting: one line naming it, no traceback (issue 32)
        print(f"refscore: {exc}", file=sys.stderr)
        code = 2
    sys.exit(code)
