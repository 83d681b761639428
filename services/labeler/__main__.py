"""labeler command line.

    python -m services.labeler label FILE --strategy rules --rules services/labeler/samples/rules.yaml
    python -m services.labeler label ANNOTATIONS.csv --kind annotations           # human judgements
    python -m services.labeler label ultrafeedback.parquet --kind preferences     # TRL-format import
    python -m services.labeler consume [--idle-exit-s 30]                          # Kafka candidates topic
    python -m services.labeler serve [--port 50061]                                # gRPC
    python -m services.labeler annotate [--file CANDIDATES.jsonl] [--port 8088]   # annotation web app
    python -m services.labeler calibrate [--sample 200]                           # LLM judge vs the humans
    python -m services.labeler config                                              # every variable

Settings come from a file, `--config labeler.yaml` (examples/labeler.yaml: the labeler's settings at the
top level, `kafka:`, `judge:`, `server:` and `annotate:` sections), and the environment (`config` lists
the variables), which overrides the file; the flags override both. `--print-config` prints the resolved
file.
`consume` on SIGTERM/SIGINT finishes the batch in hand (publish, acknowledge, commit) and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import sys

from offdpo.config import EnvConfig, KafkaConfig, Settings, describe, parse_settings
from offdpo.errors import ConfigError
from offdpo.health import LoopHealth, LoopHealthServer
from offdpo.shutdown import StopOnSignals
from services.labeler.config import CONFIG_CLASSES, CONFIG_FILE, AnnotateConfig, JudgeConfig, LabelerConfig
from services.labeler.names import CANDIDATE_STRATEGIES, INPUT_KINDS, JUDGE_MODES, PAIR_MODES, InputKind
from services.labeler.pipeline import Labeler
from services.labeler.runner import build_labeler, close_labeler, run_file, run_kafka
from services.labeler.server import serve
from services.labeler.server_config import LabelerServerConfig


def _overrides(args: argparse.Namespace) -> dict[type[EnvConfig], dict[str, object]]:
    """The flags given, as settings by class: they override the file and the environment."""

    def given(**values: object) -> dict[str, object]:
        return {k: v for k, v in values.items() if v is not None}

    labeler = given(
        strategy=getattr(args, "strategy", None),
        rules_file=args.rules,
        reward_model=args.reward_model,
        pair_mode=args.pair_mode,
        margin=args.margin,
        state_dir=args.state_dir,
        grpc_port=args.port if args.cmd == "serve" else None,
    )
    if args.no_ledger:
        labeler["ledger"] = False
    annotate = given(port=args.port, overlap=args.overlap) if args.cmd == "annotate" else {}
    return {
        LabelerConfig: labeler,
        JudgeConfig: given(base_url=args.judge_base_url, model=args.judge_model, mode=args.judge_mode),
        KafkaConfig: given(bootstrap_servers=args.bootstrap),
        AnnotateConfig: annotate,
    }


def parse_args(argv: list[str] | None = None) -> tuple[Settings, argparse.Namespace]:
    """defaults < --config FILE < OFFDPO_* environment variables < flags; ConfigError (one line) if bad."""
    return parse_settings(argv, CONFIG_FILE, lambda bases: _parser(), overrides=_overrides)


def _progress(msg: str) -> None:
    print(f"[labeler] {msg}", file=sys.stderr, flush=True)


def _print_summary(summary: dict[str, dict[str, int]], labeler: Labeler) -> None:
    print(labeler.summary.table())
    dead_letters = labeler.deadletters.count if labeler.deadletters else 0
    print(json.dumps({"summary": summary, "dead_letters": dead_letters}, sort_keys=True))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m services.labeler", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--rules", help="rules YAML (OFFDPO_LABELER_RULES)")
    common.add_argument("--reward-model", help="sequence-classification model dir (OFFDPO_LABELER_REWARD_MODEL)")
    common.add_argument("--pair-mode", choices=PAIR_MODES)
    common.add_argument("--margin", type=float)
    common.add_argument("--state-dir", help="verdict cache and published-ids ledger (OFFDPO_LABELER_STATE_DIR)")
    common.add_argument("--no-ledger", action="store_true", help="do not skip pairs published by earlier runs")
    common.add_argument("--judge-base-url")
    common.add_argument("--judge-model")
    common.add_argument("--judge-mode", choices=JUDGE_MODES)
    common.add_argument("--bootstrap", help="Kafka bootstrap servers (OFFDPO_KAFKA_BOOTSTRAP)")
    common.add_argument("-v", "--verbose", action="store_true")
    CONFIG_FILE.add_arguments(common)

    p = sub.add_parser("label", parents=[common], help="label one file and print the summary")
    p.add_argument("file")
    p.add_argument("--kind", choices=INPUT_KINDS, default=InputKind.CANDIDATES.value)
    p.add_argument("--strategy", choices=CANDIDATE_STRATEGIES)
    p = sub.add_parser("consume", parents=[common], help="label candidate sets from the candidates topic")
    p.add_argument("--strategy", choices=CANDIDATE_STRATEGIES)
    p.add_argument("--idle-exit-s", type=float, help="exit after this long without records")
    p = sub.add_parser("serve", parents=[common], help="serve the gRPC API")
    p.add_argument("--strategy", choices=CANDIDATE_STRATEGIES)
    p.add_argument("--port", type=int)
    p = sub.add_parser("annotate", parents=[common], help="serve the annotation web app (pairs from people)")
    p.add_argument("--file", help="queue the candidate sets of this JSONL file instead of reading the topic")
    p.add_argument("--port", type=int, help="OFFDPO_ANNOTATE_PORT")
    p.add_argument("--overlap", type=int, help="annotators per item (OFFDPO_ANNOTATE_OVERLAP)")
    p = sub.add_parser("calibrate", parents=[common], help="the LLM judge against the human-labelled items")
    p.add_argument("--sample", type=int, default=200, help="most human-labelled items to judge")
    p.add_argument("--seed", type=int, default=0)
    sub.add_parser("config", help="list the environment variables with their defaults")
    return parser


def _consume(labeler: Labeler, cfg: LabelerConfig, kafka: KafkaConfig, idle_exit_s: float | None) -> None:
    # Liveness ('') is about the poll loop going round; readiness ('readiness') also turns NOT_SERVING
    # after OFFDPO_LABELER_OUTAGE_READY_S of a dependency outage, which a restart would not cure.
    health = LoopHealth("labeler-consume", cfg.stall_s, outage_ready_s=cfg.outage_ready_s)
    with (
        StopOnSignals("finishing the batch in hand, then stopping", announce=_progress) as stop,
        LoopHealthServer(health, cfg.grpc_host, cfg.health_port, "OFFDPO_LABELER_HEALTH_PORT")
        if cfg.health_port
        else contextlib.nullcontext(),
    ):
        summary = run_kafka(
            labeler,
            kafka,
            cfg.strategy,
            stop=stop.requested,
            idle_exit_s=idle_exit_s,
            progress=_progress,
            heartbeat=health.beat,
            report_outage=health.report_outage,
        )
    _print_summary(summary, labeler)


def _annotate(labeler: Labeler, kafka: KafkaConfig, acfg: AnnotateConfig, args: argparse.Namespace) -> None:
    from services.labeler.annotate import AnnotateServer

    _progress(f"annotation app on http://{acfg.host}:{acfg.port} -> {kafka.pairs_topic} on {kafka.bootstrap_servers}")
    AnnotateServer(acfg, labeler, kafka, from_file=args.file or "").serve()


def _calibrate(cfg: LabelerConfig, judge: JudgeConfig, args: argparse.Namespace) -> None:
    """The judge against the annotation app's decided items (its SQLite state); needs no broker."""
    from pathlib import Path

    from services.labeler.annotate.queue import Queue
    from services.labeler.calibrate import calibrate_queue
    from services.labeler.names import JudgeMode, StrategyName
    from services.labeler.pipeline import Strategies

    if judge.mode != JudgeMode.GSB:
        raise ConfigError("calibrate asks the judge in both orders: set OFFDPO_JUDGE_MODE=gsb (or --judge-mode gsb)")
    db = Path(cfg.state_dir) / "annotate.sqlite"
    if not db.exists():
        raise ConfigError(f"no annotation state at {db}: run `annotate` with the same OFFDPO_LABELER_STATE_DIR first")
    queue = Queue(db)
    try:
        report = calibrate_queue(
            queue, Strategies(cfg, judge).get(StrategyName.LLM_JUDGE), judge.model, args.sample, args.seed
        )
    finally:
        queue.close()
    print(report.table())
    print(json.dumps(report.as_dict(), sort_keys=True))


def _serve_security(server_cfg: LabelerServerConfig | None = None):
    """`serve`'s TLS credentials and token store (services/labeler/server_config.py; default: the
    environment's), checked before anything connects; a ConfigError names the variable to set."""
    from offdpo.grpc_auth import build

    return build((server_cfg or LabelerServerConfig.from_env()).security())


def main(argv: list[str] | None = None) -> int:
    """The command line (also `offdpo labeler`). A bad setting (file, environment variable, flag) is one
    line on stderr, `labeler: <what is wrong>`, and exit 2; no traceback."""
    try:
        return _main(argv)
    except ConfigError as exc:
        print(f"labeler: {exc}", file=sys.stderr)
        return 2


def _main(argv: list[str] | None) -> int:
    if _parser().parse_args(argv).cmd == "config":
        print(describe(*CONFIG_CLASSES, AnnotateConfig))
        return 0
    settings, args = parse_args(argv)
    if args.print_config:
        print(CONFIG_FILE.dump(settings), end="")
        return 0
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("openai").setLevel(logging.WARNING)  # the judge client logs its own retries

    cfg, kafka, judge = settings.of(LabelerConfig), settings.of(KafkaConfig), settings.of(JudgeConfig)
    if args.cmd == "calibrate":
        _calibrate(cfg, judge, args)
        return 0
    security = None
    if args.cmd == "serve":
        try:
            security = _serve_security(settings.of(LabelerServerConfig))
        except ConfigError as exc:
            logging.getLogger("labeler").error("configuration error: %s", exc)
            return 2
    labeler = build_labeler(cfg, kafka, judge)
    try:
        if args.cmd == "label":
            _progress(f"labelling {args.file} ({args.kind}) -> {kafka.pairs_topic} on {kafka.bootstrap_servers}")
            _print_summary(run_file(labeler, args.file, args.kind, cfg.strategy, progress=_progress), labeler)
        elif args.cmd == "annotate":
            _annotate(labeler, kafka, settings.of(AnnotateConfig), args)
        elif args.cmd == "consume":
            _consume(labeler, cfg, kafka, args.idle_exit_s)
        else:
            asyncio.run(serve(labeler, cfg.grpc_host, cfg.grpc_port, security, cfg.health_port))
    except KeyboardInterrupt:
        if args.cmd != "serve":
            raise
    finally:
        close_labeler(labeler)
    return 0


if __name__ == "__main__":
    from offdpo.errors import ConfigError

    try:
        code = main()
    except ConfigError as exc:  # a bad setting: one line naming it, no traceback (issue 32)
        print(f"labeler: {exc}", file=sys.stderr)
        code = 2
    sys.exit(code)
