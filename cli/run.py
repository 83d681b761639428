"""`offdpo run`: your own model and preference data through the whole pipeline on the local stack.

    offdpo run --model path/to/hf-model --data prefs.jsonl [--config run.yaml] [--steps N] [--out DIR]

The data is TRL's preference format (JSONL or Parquet): `prompt`, `chosen`, `rejected`, each a string,
or conversational lists of {role, content} messages (refscore renders them with the model's chat
template). With --labels, the file holds candidate sets (prompt + answers) that a labeler backend
labels (rules, reward_model, llm_judge), or human judgements (human). A malformed row is never
dropped: it goes to the run's dead-letter topic with its reason, and the report lists it.

The run (localdev/pipeline.py): the local stack (started unless `offdpo stack up` already runs it;
stopped afterwards only if this command started it), the labeler importing the file into the run's
pairs topic, refscore scoring every pair into Parquet shards in S3, the trainer (replay of those
shards; settings from --config, the `offdpo train --config` format), then the report: pairs imported,
scored and trained, dead letters with their reasons, the held-out accuracy, the checkpoint, and where
the model folder, the TensorBoard log and the config.yaml that reruns the training landed.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

from localdev.pipeline import LABELS, PipelineError, RunSettings, Waits


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="Hugging Face model folder: the initial policy and the reference")
    p.add_argument("--data", required=True, help="preference file: .jsonl or .parquet (TRL's prompt/chosen/rejected)")
    p.add_argument(
        "--labels",
        choices=[k for k in LABELS if k],
        help="the file holds candidate sets labelled by this backend (rules, reward_model, llm_judge) or human "
        "judgements (human) instead of preference rows",
    )
    p.add_argument("--rules", help="--labels rules: the rules YAML (OFFDPO_LABELER_RULES)")
    p.add_argument("--reward-model", help="--labels reward_model: the sequence-classification model folder")
    p.add_argument("--steps", type=int, default=0, help="optimizer steps (default: one pass over the pairs)")
    p.add_argument(
        "--config",
        help="trainer settings, the `offdpo train --config` format (examples/*.yaml; beta, lr, batch sizes, "
        "trackers: report_to, ...); model, run_name, mode, prefix and log_dir are set by this command",
    )
    p.add_argument("--out", default=".cache/run", help="where each run's folder goes (<out>/<run name>/)")
    p.add_argument("--engine", choices=["vllm", "transformers"], help="refscore's engine (default: vllm with a GPU)")
    p.add_argument("--stall-s", type=float, default=Waits.stall_s, help="fail a stage after this long without progress")
    p.add_argument("--verbose", action="store_true", help="show third-party INFO logs")


def _fail(msg: str) -> int:
    print(f"offdpo run: {msg}", file=sys.stderr)
    return 2


def _check(args: argparse.Namespace) -> str | None:
    """What is wrong with the arguments (one line), before anything starts; None when nothing is."""
    model, data = Path(args.model), Path(args.data)
    if not (model / "config.json").is_file():
        return f"--model {model}: not a Hugging Face model folder (no config.json in it)"
    if not data.is_file():
        return f"--data {data}: no such file"
    if data.suffix.lower() not in (".jsonl", ".json", ".parquet", ".csv"):
        return f"--data {data}: expected a .jsonl or .parquet file (TRL preference format)"
    if data.suffix.lower() == ".csv" and args.labels != "human":
        return f"--data {data}: CSV is read for --labels human only; give preference rows as .jsonl or .parquet"
    if args.steps < 0:
        return "--steps must be >= 0"
    if args.labels == "rules" and not args.rules:
        import os

        if not os.environ.get("OFFDPO_LABELER_RULES"):
            return "--labels rules needs --rules RULES.yaml (services/labeler/samples/rules.yaml is an example)"
    if args.labels == "reward_model" and not args.reward_model:
        return "--labels reward_model needs --reward-model DIR (a sequence-classification model folder)"
    if args.config:
        from offdpo.config import ConfigError, load_config_file
        from services.trainer.config import TrainerConfig
        from services.trainer.train import CONFIG_SECTIONS, SETTINGS_LISTING

        try:  # the trainer would refuse it too, but only after the stack, refscore and scoring
            load_config_file(args.config, TrainerConfig, CONFIG_SECTIONS, SETTINGS_LISTING)
        except ConfigError as exc:
            return f"--config: {exc}"
    return None


def main(args: argparse.Namespace, stack=None) -> int:
    """`stack`: a started LocalStack to use (tests); default the one of `offdpo stack` (OFFDPO_STACK_*)."""
    from localdev.experiment import quiet_third_party_logs

    problem = _check(args)
    if problem:
        return _fail(problem)
    quiet_third_party_logs(args.verbose)
    # SIGTERM (a timeout, a test's teardown) unwinds like Ctrl-C: the services and the stack stop.
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        return _run(args, stack)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(args: argparse.Namespace, stack) -> int:
    from localdev.pipeline import LocalPipeline, has_chat_template, run_on_local_stack

    labeler_args: tuple[str, ...] = ()
    if args.rules:
        labeler_args += ("--rules", str(Path(args.rules).resolve()))
    if args.reward_model:
        labeler_args += ("--reward-model", str(Path(args.reward_model).resolve()))
    settings = RunSettings(
        model=Path(args.model),
        data=Path(args.data).resolve(),
        labels=args.labels,
        steps=args.steps,
        config=Path(args.config) if args.config else None,
        out=Path(args.out),
        engine=args.engine or "",
        labeler_args=labeler_args,
    )
    if not has_chat_template(settings.model):
        print(
            f"note: {settings.model} has no chat template: conversational rows will be dead-lettered by refscore",
            flush=True,
        )
    pipe = LocalPipeline(settings.out, stack=stack, waits=Waits(stall_s=args.stall_s), verbose=args.verbose)
    print(f"run {pipe.run_name}: folder {pipe.workdir}", flush=True)
    try:
        with pipe:
            report = run_on_local_stack(settings, pipe)
    except PipelineError as exc:
        print(f"offdpo run: {exc}", file=sys.stderr)
        return 1
    print_report(report)
    return 0


def print_report(r: dict) -> None:
    def say(msg: str) -> None:
        print(msg, flush=True)

    say("=" * 88)
    lab = r["labeler"].get("total", {})
    say(f"rows read        {r['rows']} from {r['data']}")
    say(
        f"pairs imported   {r['pairs_imported']} ({lab.get('duplicates', 0)} duplicates, {lab.get('ties', 0)} ties, "
        f"{lab.get('rejects', 0)} rows dead-lettered by the labeler)"
    )
    say(f"pairs scored     {r['pairs_scored']} (reference fingerprint {r['fingerprint'][:16]})")
    loss = f", final loss {r['final_loss']:.4f}" if r["final_loss"] is not None else ""
    say(f"pairs trained    {r['pairs_trained']} in {r['steps']} steps{loss}")
    if r["heldout_accuracy"] is not None:
        say(f"held-out         reward accuracy {r['heldout_accuracy']:.3f} on {r['heldout_pairs']} pairs never trained")
    else:
        say("held-out         none (no pair fell in eval_fraction; raise it in --config for an accuracy)")
    say(f"dead-lettered    {sum(r['dead_letters'].values())}: {json.dumps(r['dead_letters'])}")
    for dl in r["dead_letter_reasons"][:10]:
        say(f"                 {dl['service']}/{dl['error_type']}: {dl['reason'][:200]}")
    if len(r["dead_letter_reasons"]) > 10:
        say(f"                 ... {len(r['dead_letter_reasons']) - 10} more: offdpo deadletter list")
    say(f"checkpoint       {r['checkpoint']}")
    say(f"model            {r['model_dir']}")
    if r["model_card"]:
        say(f"model card       {r['model_card']}")
    if r["tensorboard"]:
        say(f"tensorboard      tensorboard --logdir {r['tensorboard']}")
    if r["config_yaml"]:
        say(f"config           {r['config_yaml']}")
        say(f"                 rerun: offdpo run --model {r['model']} --data {r['data']} --config {r['config_yaml']}")
    if r["ignored_config_settings"]:
        say(f"                 (set by offdpo run, not by --config: {', '.join(r['ignored_config_settings'])})")
    say(f"logs             {r['logs']} (refscore.log, labeler.log, trainer.log)")
    say(f"report           {r['report']}")
    say(f"done in {r['elapsed_s']:.0f} s")
