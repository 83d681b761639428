"""`offdpo`: the project's command line.

offdpo stack up|down|status      the local Kafka (Tansu) + S3 (SeaweedFS) stack
offdpo model build ...           deterministic local test models (--pretrain reviews: the review-language reference)
offdpo eval CHECKPOINT           sample a policy on held-out prompts: ground-truth reward and KL to the reference
offdpo config                    every environment variable, with its default
offdpo demo                      the main job end to end on the local stack; the model gets better
offdpo export-trl SOURCE OUT     scored shards -> a TRL-ready dataset (needs the `trl` extra)
offdpo deadletter list|replay    dead letters by service and error type; republish chosen ones after a fix
offdpo rescore --from P --model M stored pairs (scored shards or the archive) scored under a new reference
offdpo archive [--until-idle S]  archive the pairs topic to S3 as Parquet (replayable after Kafka forgets)
offdpo rounds [--rounds N]       iterative DPO on the local stack: each round's policy the next one's reference
offdpo plan --model M --gpus N --gpu-mem 80GiB   per-GPU memory of trainer and refscore, and the settings that fit
offdpo train --config run.yaml   the trainer (python -m services.trainer, same flags); --print-config shows all settings
offdpo run --model DIR --data prefs.jsonl   your model and a TRL preference file through the whole local pipeline
offdpo export --checkpoint s3://.../step-N --out DIR   a shareable model folder (bf16, model card) from a checkpoint
offdpo refscore serve|worker --config refscore.yaml   refscore (python -m services.refscore, same arguments)
offdpo labeler consume|serve|... --config labeler.yaml   the labeler (python -m services.labeler, same arguments)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys


def _stack_cmd(args) -> int:
    from localdev.stack import LocalStack

    stack = LocalStack()
    if args.action == "up":
        stack.up()
        print(json.dumps({"status": "up", **stack.env()}, indent=2))
        print(f"logs and data: {stack.data_dir}", file=sys.stderr)
    elif args.action == "down":
        stack.down()
        print("stack stopped")
    else:
        status = stack.status()
        print(json.dumps(status))
        return 0 if all(status.values()) else 1
    return 0


def _model_cmd(args) -> int:
    from localdev.testmodel import build_test_model, tree_digest

    if args.pretrain == "reviews":
        from localdev.pretrain import (
            build_reviews_model,
            build_reviews_reward_model,
            reviews_model_dir,
            reviews_reward_model_dir,
        )

        # Built from scratch (never copied from assets/): this is the command that makes them.
        ref = build_reviews_model(reviews_model_dir(args.out))
        reward = build_reviews_reward_model(reviews_reward_model_dir(args.out))
        print(json.dumps({"reference": str(ref), "reward_model": str(reward)}, indent=2))
        return 0
    out = build_test_model(args.out, size=args.size, kind=args.kind, seed=args.seed)
    digest = tree_digest(out)
    print(json.dumps({"path": str(out), "files": digest}, indent=2))
    return 0


def _config_cmd(args) -> int:
    from cli.service_configs import service_config_classes
    from localdev.stack import StackConfig
    from offdpo.archive import ArchiveConfig
    from offdpo.config import KafkaConfig, S3Config, describe

    classes = [S3Config, KafkaConfig, StackConfig, ArchiveConfig]
    for _service, service_classes in service_config_classes().items():
        classes += [c for c in service_classes if c not in classes]
    print(describe(*classes))
    return 0


def _demo_cmd(args) -> int:
    from cli.demo import main as demo_main

    return demo_main(args)


def _export_trl_cmd(args) -> int:
    from integrations.trl_export import ExportError, export_trl

    try:
        result = export_trl(args.source, args.out, format=args.format, overwrite=args.overwrite)
    except ExportError as exc:
        print(f"export-trl: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:
        print(f"export-trl needs the `trl` extra (pip install -e '.[trl]'): {exc}", file=sys.stderr)
        return 2
    print(
        json.dumps(
            {
                "path": str(result.path),
                "format": result.format,
                "shards": result.shards,
                "pairs": result.pairs,
                "duplicates_dropped": result.duplicates,
                "fingerprint_id": result.fingerprint.fingerprint_id,
            },
            indent=2,
        )
    )
    return 0


def _rescore_cmd(args) -> int:
    from services.refscore.backfill import run

    return run(args)


def _archive_cmd(args) -> int:
    from offdpo.archive import run_archiver

    return run_archiver(args.until_idle)


def _rounds_cmd(args) -> int:
    from cli.rounds import main as rounds_main

    return rounds_main(args)


def main(argv: list[str] | None = None) -> int:
    from localdev.testmodel import SIZES

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(
        prog="offdpo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("stack", help="start, stop or check the local stack")
    p.add_argument("action", choices=["up", "down", "status"])
    p.set_defaults(fn=_stack_cmd)

    p = sub.add_parser("model", help="build a deterministic local test model")
    p.add_argument("action", choices=["build"])
    p.add_argument("--size", default="tiny", choices=sorted(SIZES))
    p.add_argument("--kind", default="causal", choices=["causal", "reward"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--pretrain",
        choices=["reviews"],
        help="reviews: pretrain the review-language reference and its reward model (localdev.pretrain, ~4.5 "
        "CPU-minutes) into OUT/reviews-<hash>/ and OUT/reviews-reward-<hash>/ (--size/--kind/--seed ignored)",
    )
    p.add_argument("--out", required=True)
    p.set_defaults(fn=_model_cmd)

    p = sub.add_parser("config", help="list every environment variable with its default")
    p.set_defaults(fn=_config_cmd)

    from cli.deadletter import add_parser as add_deadletter_parser
    from cli.evaluate import add_parser as add_eval_parser

    add_eval_parser(sub)
    add_deadletter_parser(sub)

    p = sub.add_parser(
        "demo", help="run the main job end to end on the local stack and show the model it makes is better"
    )
    p.add_argument("--workdir", default=".cache/demo", help="models, logs and outputs of the demo")
    p.add_argument("--keep-stack", action="store_true", help="leave the local stack running afterwards")
    p.add_argument("--prompts", type=int, help="held-in review openings to label (default: cli.demo.PROMPTS)")
    p.add_argument("--verbose", action="store_true", help="show third-party INFO logs (kafka-python, ...)")
    p.set_defaults(fn=_demo_cmd)

    p = sub.add_parser(
        "export-trl",
        help="export scored shards as a dataset for TRL's DPOTrainer",
        description="Stream the scored shards under SOURCE (s3://BUCKET/PREFIX, credentials from "
        "OFFDPO_S3_*, or a local folder) into a Hugging Face dataset with TRL's columns "
        "prompt_ids, chosen_ids, rejected_ids, ref_chosen_logps, ref_rejected_logps; "
        "train on it with integrations.trl_dpo.OfflineRefDPOTrainer.",
    )
    p.add_argument("source", help="s3://BUCKET/scores/<fingerprint_id>/ or a local folder of *.parquet shards")
    p.add_argument("out", help="output folder")
    p.add_argument(
        "--format",
        default="disk",
        choices=["disk", "parquet"],
        help="disk: datasets.save_to_disk layout; parquet: one Parquet file (default: disk)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(fn=_export_trl_cmd)

    from services.refscore.backfill import add_arguments as add_rescore_arguments

    p = sub.add_parser(
        "rescore",
        help="score stored pairs under a new reference (backfill)",
        description="Read the pairs of scores/<fingerprint id>/ (or of the pairs archive), score them with "
        "--model and write shards under its fingerprint with shard-ready events; resumable "
        "(services/refscore/backfill.py).",
    )
    add_rescore_arguments(p)
    p.set_defaults(fn=_rescore_cmd)

    p = sub.add_parser("archive", help="archive the pairs topic to S3 as Parquet (offdpo/archive.py)")
    p.add_argument("--until-idle", type=float, default=None, help="stop once no record arrived for this many s")
    p.set_defaults(fn=_archive_cmd)

    from cli.rounds import add_arguments as add_rounds_arguments

    p = sub.add_parser(
        "rounds",
        help="iterative DPO: N rounds on the local stack, each round's policy the next round's reference",
        description="Round r: refscore serves round r-1's final checkpoint from S3 (the base model in round 1), "
        "which generates on-policy candidates; the labeler labels them, refscore scores them against it, "
        "the trainer trains from it (fresh optimizer). Provenance in each pair and in runs/<run>/rounds.json "
        "(cli/rounds.py).",
    )
    add_rounds_arguments(p)
    p.set_defaults(fn=_rounds_cmd)

    from cli.run import add_arguments as add_run_arguments
    from cli.run import main as run_main

    p = sub.add_parser(
        "run",
        help="your model folder and a TRL preference file (.jsonl/.parquet) through the whole pipeline locally",
        description="The local stack, the labeler importing --data, refscore scoring it into S3, the trainer, "
        "and a report: pairs imported / scored / trained, dead letters with reasons, held-out accuracy, the "
        "checkpoint, the model folder, TensorBoard log and config.yaml (cli/run.py, localdev/pipeline.py).",
    )
    add_run_arguments(p)
    p.set_defaults(fn=run_main)

    from cli.plan import add_parser as add_plan_parser

    add_plan_parser(sub)

    from cli.export import add_parser as add_export_parser

    add_export_parser(sub)

    p = sub.add_parser(
        "train",
        help="train: python -m services.trainer with the same flags (--config run.yaml, --print-config)",
        add_help=False,  # `offdpo train --help` is the trainer's own help
    )
    p.set_defaults(fn=None)
    for name in ("refscore", "labeler"):
        sub.add_parser(name, help=f"python -m services.{name} with the same arguments (--config FILE)", add_help=False)

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:  # every flag after it is the trainer's
        from services.trainer.train import main as train_main

        return train_main(argv[1:], prog="offdpo train")
    if argv[:1] == ["refscore"]:  # every argument after it is the service's
        from services.refscore.__main__ import main as refscore_main

        return refscore_main(argv[1:])
    if argv[:1] == ["labeler"]:
        from services.labeler.__main__ import main as labeler_main

        return labeler_main(argv[1:])
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
