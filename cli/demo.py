"""`make demo`: the whole pipeline end to end on the local stack, and the model it makes is better.

The DPO paper's controlled-sentiment experiment in miniature (README, "Does it make a model better?"):
the reference is a 575k-parameter Qwen2 pretrained on a synthetic review language (checked in under
assets/models/); the preference is "a positive continuation of a review's opening".

  1. start the local stack (SeaweedFS S3 + Tansu Kafka); the review-language reference and reward
     model (the checked-in copies when their recipe hash matches: no rebuild)
  2. start refscore on the reference (vLLM engine, gRPC API + stream worker); evaluate the reference
     ("before", `offdpo eval`): held-out openings, ground-truth reward, KL via refscore `Score`
  3. labelers take held-in review openings, ask refscore `Generate` for 4 on-policy samples each and
     publish best vs worst by the reward-model strategy to the pairs topic; the input also holds three
     malformed candidate sets (as real input does), which are dead-lettered with their reasons
  4. refscore's worker scores every pair into Parquet shards in S3 and announces each shard
  5. the trainer follows the shard-ready topic (continuous mode, DPO beta 0.5) from the first shard
     until the stream is drained, holding out 10% of the pairs (by pair-id hash) for its eval metrics
  6. evaluate the final checkpoint ("after") the same way; report what Kafka and S3 hold (read back),
     before/after, sample continuations; the report also goes to <workdir>/demo-<id>/report.json

Each run uses its own topics, consumer groups and run name (demo-<id>), so reruns do not mix.
Third-party INFO logs stay out of the output (--verbose shows them); each service logs to its file.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

from localdev.experiment import (
    NegatedRewardModel,
    evaluate_policy,
    fan_out,
    format_result,
    quiet_third_party_logs,
    stack_up_quietly,
    write_candidates,
)
from localdev.pipeline import jsonl
from localdev.process import free_port, stop_process, wait_until
from localdev.stack import LocalStack
from offdpo import records
from offdpo.kafka import ensure_topics, read_topic
from offdpo.s3 import ObjectStore
from offdpo.v1 import records_pb2

REPO = Path(__file__).resolve().parent.parent

# The experiment's size, for `make demo` to fit 10 minutes on a fresh 2-core machine with set-up.
PROMPTS = 400  # held-in review openings -> ~380 pairs (best vs worst of 4 samples; ties give none)
SAMPLES_PER_PROMPT = 4
LABELER_WORKERS = 4  # labelers in threads, each on its own slice of the openings (Generate calls in flight)
BETA = 0.5
LR = 2e-4
BATCH = 8  # one pass over the ~340 training pairs: ~40 steps
EVAL_FRACTION = 0.1  # pairs held out by the trainer (by pair-id hash) for its eval metrics
EVAL_SAMPLES = 400  # held-out openings sampled before and after
# Bad input, as real input has: dead-lettered by the labeler with the reason, never dropped.
MALFORMED = [
    '{"id": "broken-json", "prompt": "i watched this drama',  # decode_error (not JSON)
    '{"id": "one-answer", "prompt": "it runs for two hours .", "answers": ["the film was great ."]}',  # invalid set
    '{"id": "no-prompt", "answers": ["the plot was dull .", "the plot was great ."]}',  # decode_error (no prompt)
]


def _say(msg: str) -> None:
    print(msg, flush=True)


def _start(args: list[str], env: dict, log_path: Path) -> subprocess.Popen:
    return subprocess.Popen(args, env=env, cwd=REPO, stdout=open(log_path, "ab"), stderr=subprocess.STDOUT)


def label_in_parallel(cfg_for, kafka, files: list[Path], strategy: str, swap: bool = False, generator_for=None) -> dict:
    """One labeler per file, in threads; the summed per-strategy summary. swap (tests only): the
    reward model's scores negated, so chosen and rejected are exchanged. generator_for(cfg), when
    given, builds each labeler's candidate generator (default: refscore `Generate` from the config)."""
    from services.labeler.reward import RewardModel, RewardModelStrategy
    from services.labeler.runner import build_labeler, close_labeler, run_file

    def work(i: int, path: Path) -> dict:
        cfg = cfg_for(i)
        overrides = None
        if swap:
            model = RewardModel(cfg.reward_model, cfg.reward_batch_size, cfg.reward_max_length)
            overrides = {"reward_model": RewardModelStrategy(NegatedRewardModel(model), cfg.pair_mode, cfg.margin)}
        generator = generator_for(cfg) if generator_for is not None else None
        labeler = build_labeler(cfg, kafka, strategy_overrides=overrides, generator=generator)
        try:
            return run_file(labeler, path, "candidates", strategy)
        finally:
            close_labeler(labeler)

    return fan_out(work, files)


def main(args) -> int:
    from localdev import reviews
    from localdev.pretrain import ensure_reviews_model, ensure_reviews_reward_model
    from offdpo.refscore_client import RefscoreClient
    from services.labeler.config import LabelerConfig

    verbose = getattr(args, "verbose", False)
    quiet_third_party_logs(verbose)
    # SIGTERM (a timeout, a test's teardown) unwinds like Ctrl-C: the child services and the stack stop.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.monotonic()
    run_name = f"demo-{uuid.uuid4().hex[:6]}"
    workdir = (Path(args.workdir) / run_name).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    models = Path(args.workdir).resolve() / "models"
    prompts = getattr(args, "prompts", None) or PROMPTS

    stack = LocalStack()
    _say(f"[1/6] local stack (S3 {stack.s3.endpoint}, Kafka {stack.kafka.bootstrap_servers}) and the review models")
    stack_up_quietly(stack, verbose)
    refscore = trainer = None
    try:
        reference = ensure_reviews_model(models)
        reward = ensure_reviews_reward_model(models)
        build = json.loads((reference / "metrics.json").read_text())
        _say(
            f"      reference {reference.name}: {build['params']:,} parameters, val loss {build['val_loss']:.3f} "
            f"per answer token (unigram {build['val_loss_unigram']:.3f}), sentiment consistency "
            f"{build['consistency_samples']:.2f} (corpus {build['consistency_corpus']:.2f})"
        )
        topics = {
            "OFFDPO_TOPIC_PAIRS": f"{run_name}.pairs",
            "OFFDPO_TOPIC_SHARDS": f"{run_name}.shards",
            "OFFDPO_TOPIC_DEADLETTER": f"{run_name}.deadletter",
            "OFFDPO_TOPIC_CANDIDATES": f"{run_name}.candidates",
        }
        env = {
            **os.environ,
            **stack.env(),
            **topics,
            "PYTHONPATH": str(REPO),
            # the local broker joins a group in ~3 s with these, ~23 s with kafka-python's defaults
            "OFFDPO_KAFKA_SESSION_TIMEOUT_MS": "6000",
            "OFFDPO_KAFKA_HEARTBEAT_MS": "1000",
            "OFFDPO_KAFKA_MAX_POLL_INTERVAL_MS": "120000",
        }
        kafka = stack.kafka.from_env(env)
        ensure_topics(kafka, [kafka.pairs_topic, kafka.shards_topic, kafka.deadletter_topic], stack.stack.partitions)
        store = ObjectStore(stack.s3)

        _say("[2/6] refscore on the reference (vLLM engine, gRPC + stream worker); evaluating the reference")
        address = f"127.0.0.1:{free_port()}"
        refscore = _start(
            [sys.executable, "-m", "services.refscore", "serve", "--worker"],
            {
                **env,
                "OFFDPO_REFSCORE_MODEL_DIR": str(reference),
                "OFFDPO_REFSCORE_PORT": address.rsplit(":", 1)[1],
                "OFFDPO_REFSCORE_METRICS_PORT": "0",
                "OFFDPO_REFSCORE_GROUP": f"{run_name}-refscore",
                "OFFDPO_REFSCORE_MAX_MODEL_LEN": "512",
                "OFFDPO_REFSCORE_BATCH_WAIT_S": "1.0",
                # local development on loopback: explicitly plaintext and without team tokens
                "OFFDPO_REFSCORE_PLAINTEXT": "true",
                "OFFDPO_REFSCORE_ALLOW_ANONYMOUS": "true",
            },
            workdir / "refscore.log",
        )
        # Sampling the reference locally overlaps refscore's start; its Score then gives the KL.
        before = evaluate_policy(reference, refscore=address, samples=EVAL_SAMPLES, seed=1)
        _check_alive(refscore, "refscore", workdir / "refscore.log")
        _say(f"      before: {format_result(before)}")
        with RefscoreClient(address) as client:
            client.wait_serving(timeout_s=300)
            fp = client.model_info().fingerprint

        openings = reviews.review_prompts(prompts, seed=0, split="held_in")
        _say(
            f"[3/6] labelling {len(openings)} held-in openings (+{len(MALFORMED)} malformed candidate sets): "
            f"{SAMPLES_PER_PROMPT} on-policy samples each from refscore Generate (T=1), best vs worst by the "
            f"reward model ({LABELER_WORKERS} labelers)"
        )
        files = []
        for w in range(LABELER_WORKERS):
            path = workdir / f"candidates-{w}.jsonl"
            write_candidates(path, openings[w::LABELER_WORKERS], SAMPLES_PER_PROMPT)
            files.append(path)
        with files[0].open("a") as f:
            f.write("\n".join(MALFORMED) + "\n")

        def labeler_cfg(i: int) -> LabelerConfig:
            return LabelerConfig.from_env(
                {
                    **env,
                    "OFFDPO_LABELER_REFSCORE_ADDR": address,
                    "OFFDPO_LABELER_GENERATE_N": str(SAMPLES_PER_PROMPT),
                    "OFFDPO_LABELER_GENERATE_MAX_TOKENS": "96",
                    "OFFDPO_LABELER_GENERATE_TEMPERATURE": "1.0",
                    "OFFDPO_LABELER_BATCH": "16",
                },
                state_dir=str(workdir / f"labeler-{i}"),
                reward_model=str(reward),
            )

        t0 = time.monotonic()
        shard_prefix = f"scores/{fp.fingerprint_id}/{kafka.pairs_topic}/"
        # a daemon thread (not an executor, whose threads are joined at exit): Ctrl-C/SIGTERM stop at once
        labelling: concurrent.futures.Future = concurrent.futures.Future()

        def label() -> None:
            try:
                labelling.set_result(label_in_parallel(labeler_cfg, kafka, files, "reward_model"))
            except BaseException as exc:  # noqa: BLE001 - re-raised by labelling.result()
                labelling.set_exception(exc)

        threading.Thread(target=label, daemon=True).start()
        summaries = labelling.result()
        # The trainer follows the shard-ready topic (continuous mode) from here: refscore is still
        # scoring the last pairs and the trainer trains on each shard as it is announced. It starts
        # after the labelers, not with the first shard: it stops once the topic has been idle for
        # --stop-when-idle-s, and on a busy machine Generate can leave longer gaps than that (measured:
        # a trainer started with the first shard stopped after 114 of 400 pairs at load 30).
        trainer = _start(
            [
                sys.executable,
                "-m",
                "services.trainer",
                *("--model", str(reference), "--run-name", run_name, "--mode", "continuous"),
                *("--stop-when-idle-s", "30", "--global-batch-size", str(BATCH), "--micro-batch-size", str(BATCH)),
                *("--lr", str(LR), "--warmup-steps", "5", "--beta", str(BETA), "--save-every", "1000"),
                *("--eval-fraction", str(EVAL_FRACTION), "--eval-every", "20"),
                *("--log-dir", str(workdir / "trainer"), "--consumer-group", f"{run_name}-trainer"),
            ],
            {**env, "OFFDPO_TRAINER_PROGRESS": "false"},
            workdir / "trainer.log",
        )
        _say(
            f"      trainer following {kafka.shards_topic}: DPO beta {BETA}, lr {LR}, batch {BATCH}, "
            f"{EVAL_FRACTION:.0%} of the pairs held out for eval (log: {workdir / 'trainer.log'})"
        )
        pair_records = read_topic(kafka, kafka.pairs_topic)
        labelled = {records.PreferencePair.FromString(r.value).pair_id for r in pair_records}
        counts = summaries.get("reward_model", {})
        _say(
            f"      {len(labelled)} distinct pairs on {kafka.pairs_topic} in {time.monotonic() - t0:.0f} s "
            f"({counts.get('inputs', 0)} candidate sets, {counts.get('ties', 0)} ties, "
            f"{counts.get('rejects', 0)} dead-lettered)"
        )

        _say("[4/6] refscore scoring the stream into S3")

        def scored_ids() -> list[str]:
            ids = []
            for key in store.list_keys(shard_prefix):
                ids += records.read_shard(store.get_bytes(key), key).pair_ids
            return ids

        def refscore_dead_letters() -> list:
            letters = (
                records_pb2.DeadLetter.FromString(r.value)
                for r in read_topic(kafka, kafka.deadletter_topic, idle_s=1.0)
            )
            return [dl for dl in letters if dl.service == "refscore"]

        wait_until(
            lambda: (
                len(set(scored_ids())) + len({(d.partition, d.offset) for d in refscore_dead_letters()})
                >= len(pair_records)
            ),
            600,
            "scoring every pair",
            every_s=2.0,
            progress=lambda: _check_alive(refscore, "refscore", workdir / "refscore.log"),
        )
        scored = scored_ids()
        _say(f"      {len(scored)} scored rows in s3://{store.bucket}/{shard_prefix}")

        _say("[5/6] training until the shard-ready stream is drained")
        _follow_training(trainer, workdir / "trainer" / run_name / "metrics.jsonl", workdir / "trainer.log")

        _say("[6/6] evaluating the final checkpoint on the held-out openings; report")
        report = _report(store, kafka, run_name, workdir, summaries, labelled, scored, fp)
        after = evaluate_policy(report["final_model_dir"], refscore=address, samples=EVAL_SAMPLES, seed=1)
        report["before"], report["after"] = before, after
        report["learning"] = _learning(before, after, report["trained"])
        (workdir / "report.json").write_text(json.dumps(report, indent=2))
        _print_report(report, workdir / "report.json", time.monotonic() - started)
        return 0
    finally:
        stop_process(trainer)
        stop_process(refscore)
        if not args.keep_stack:
            stack.down()


def _follow_training(trainer: subprocess.Popen, metrics_log: Path, log_path: Path, timeout_s: float = 900) -> None:
    """Wait for the trainer, printing its latest metrics every ~20 s (its own log: trainer.log)."""
    deadline = time.monotonic() + timeout_s
    shown = 0
    while trainer.poll() is None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the trainer did not finish in {timeout_s:.0f} s (log: {log_path})")
        try:
            trainer.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
        rows = [m for m in jsonl(metrics_log) if "loss" in m]
        if rows and rows[-1].get("step", 0) > shown:
            m = rows[-1]
            shown = m.get("step", 0)
            _say(
                f"      step {shown}: loss {m['loss']:.3f}, batch reward accuracy {m.get('rewards/accuracies', 0):.2f}"
            )
    _check_alive(trainer, "the trainer", log_path, expect_zero=True)


def _check_alive(proc: subprocess.Popen, name: str, log_path: Path, expect_zero: bool = False) -> None:
    """RuntimeError with the log's tail if `proc` exited (or, with expect_zero, exited non-zero)."""
    code = proc.poll()
    if code is not None and (code != 0 or not expect_zero):
        tail = log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{name} exited with {code}; log tail:\n{tail}")


def _learning(before: dict, after: dict, trained: dict) -> dict:
    gain = after["reward_mean"] - before["reward_mean"]
    se = (after["reward_se"] ** 2 + before["reward_se"] ** 2) ** 0.5
    return {
        "positive_share_before": before["positive_share"],
        "positive_share_after": after["positive_share"],
        "reward_gain": round(gain, 5),
        "reward_gain_se": round(gain / se, 1) if se else None,
        "kl": after["kl"],
        "kl_se": after["kl_se"],
        "heldout_accuracy": trained.get("heldout_accuracy"),
        "heldout_pairs": trained.get("heldout_pairs"),
    }


def _report(store, kafka, run_name, workdir, summaries, labelled, scored, fp) -> dict:
    from services.trainer.checkpoint import download_model, latest_checkpoint

    trained = []
    pairs_log = workdir / "trainer" / run_name / "trained_pairs.jsonl"
    metrics_log = workdir / "trainer" / run_name / "metrics.jsonl"
    for line in pairs_log.read_text().splitlines():
        trained += json.loads(line)["pair_ids"]
    rows = jsonl(metrics_log)
    metrics = [m for m in rows if "loss" in m]
    evals = [m for m in rows if "eval/rewards/accuracies" in m]
    letters = [records_pb2.DeadLetter.FromString(r.value) for r in read_topic(kafka, kafka.deadletter_topic)]
    by_reason = collections.Counter((dl.service, dl.error_type) for dl in letters)
    examples: dict[str, str] = {}
    for dl in letters:
        examples.setdefault(f"{dl.service}/{dl.error_type}", dl.reason[:160])
    prefix = latest_checkpoint(store, run_name)
    final_dir = download_model(store, prefix, workdir / "final-model")
    from localdev.experiment import load_causal_lm

    model = load_causal_lm(final_dir)  # refuses a checkpoint that does not load whole
    return {
        "run_name": run_name,
        "labelled": {"distinct_pairs_on_topic": len(labelled), "summary": summaries},
        "scored": {"rows": len(scored), "distinct": len(set(scored)), "fingerprint": fp.fingerprint_id},
        "trained": {
            "pairs": len(trained),
            "distinct": len(set(trained)),
            "steps": len(metrics),
            "final_loss": metrics[-1].get("loss") if metrics else None,
            "heldout_accuracy": evals[-1]["eval/rewards/accuracies"] if evals else None,
            "heldout_pairs": evals[-1].get("eval/pairs") if evals else None,
            "heldout_loss": evals[-1].get("eval/loss") if evals else None,
        },
        "consistency": {
            "scored_equals_labelled_minus_refscore_dead_letters": set(scored)
            == labelled - _dead_pair_ids(letters, "refscore")
            and len(scored) == len(set(scored)),
            # held-out pairs are scored but never trained
            "trained_within_scored_once": set(trained) <= set(scored) and len(trained) == len(set(trained)),
        },
        "dead_letters": {f"{s}/{t}": n for (s, t), n in sorted(by_reason.items())},
        "dead_letter_examples": examples,
        "checkpoint": f"s3://{store.bucket}/{prefix}/model/",
        "final_model_dir": str(final_dir),
        "checkpoint_loaded_by_transformers": type(model).__name__,
        "plot": str(workdir / "trainer" / run_name / "curves.png"),
        "frontier_plot": str(REPO / "bench" / "results" / "learning.png"),
        "metrics_log": str(metrics_log),
    }


def _dead_pair_ids(letters, service: str) -> set[str]:
    ids = set()
    for dl in letters:
        if dl.service == service:
            try:
                ids.add(records.PreferencePair.FromString(dl.original_value).pair_id)
            except Exception:  # noqa: BLE001 - undecodable records have no pair id
                pass
    return ids


def _print_report(report: dict, path: Path, elapsed_s: float) -> None:
    t, s, b, a, g = report["trained"], report["scored"], report["before"], report["after"], report["learning"]
    _say("=" * 88)
    _say(f"pairs labelled   {report['labelled']['distinct_pairs_on_topic']}")
    _say(f"pairs scored     {s['distinct']} (fingerprint {s['fingerprint']})")
    _say(
        f"pairs trained    {t['distinct']} in {t['steps']} steps (each once; {t['heldout_pairs']} held out), "
        f"final loss {t['final_loss']:.4f}"
    )
    _say(f"dead-lettered    {sum(report['dead_letters'].values())}: {report['dead_letters']}")
    for kind, reason in report["dead_letter_examples"].items():
        _say(f"                 {kind}: {reason}")
    _say(f"checkpoint       {report['checkpoint']} (loads as {report['checkpoint_loaded_by_transformers']})")
    _say(f"consistent       {report['consistency']}")
    _say("-" * 88)
    _say(f"the policy on {a['samples']} held-out openings, one sample each at T=1 (no top-k/top-p);")
    _say("reward = the ground-truth rule (positive minus negative adjectives per word); KL via refscore Score")
    _say(f"{'':17}{'before (reference)':>24}{'after DPO':>26}")
    _say(
        f"positive share   {b['positive_share']:>15.3f} +- {b['positive_share_se']:.3f}"
        f"{a['positive_share']:>17.3f} +- {a['positive_share_se']:.3f}"
    )
    _say(
        f"mean reward      {b['reward_mean']:>+15.4f} +- {b['reward_se']:.4f}{a['reward_mean']:>+16.4f} +- {a['reward_se']:.4f}"
    )
    _say(f"KL(pol || ref)   {b['kl']:>15.3f} +- {b['kl_se']:.3f}{a['kl']:>17.3f} +- {a['kl_se']:.3f}   nats per sample")
    acc = f"{t['heldout_accuracy']:.3f} on {t['heldout_pairs']} pairs" if t["heldout_accuracy"] is not None else "n/a"
    _say(
        f"reward gain      {g['reward_gain']:+.4f} = {g['reward_gain_se']} standard errors; held-out reward accuracy {acc}"
    )
    _say("samples (same openings, before -> after):")
    for eb, ea in zip(b["examples"], a["examples"]):
        _say(f"  {eb['prompt']}")
        _say(f"    before: {eb['continuation']}")
        _say(f"    after:  {ea['continuation']}")
    _say(f"plots            {report['plot']} (training curves)")
    _say(f"                 {report['frontier_plot']} (reward vs KL frontier of make bench-learning)")
    _say(f"report           {path}")
    _say(f"done in {elapsed_s / 60:.1f} min")
