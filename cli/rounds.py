"""`offdpo rounds`: iterative (on-policy) DPO, N rounds end to end on the local stack.

A round is (policy checkpoint -> reference of the next round). Round r (1..N):

  1. refscore serves round r's reference: the base model in round 1, else round r-1's final
     checkpoint straight from S3 (OFFDPO_REFSCORE_MODEL_DIR=s3://<bucket>/runs/<run>-round-<r-1>/
     checkpoints/step-<N>/model/, services/refscore/model_source.py); its fingerprint is the round's;
  2. that policy generates k on-policy candidates per prompt (refscore `Generate`), the labeler labels
     them (reward-model or rules strategy) and publishes the pairs to the round's own pairs topic;
     each pair's provenance says which policy generated it (candidate-set metadata carried into
     `Provenance.metadata`: `round`, `policy`, `policy_fingerprint`);
  3. refscore's stream worker scores them against the round's reference into
     scores/<round fingerprint>/<round pairs topic>/ (the generating policy is the reference: on-policy);
  4. the trainer replays those shards starting from the round's policy weights (round r-1's final
     checkpoint, downloaded from S3; the base model in round 1), the reference fingerprint it expects
     being that same checkpoint's. Optimizer state is NOT carried over: each round is a new trainer run
     (`<run>-round-<r>`) with a fresh AdamW and schedule, as in iterative DPO where each round is a new
     DPO problem against a new reference;
  5. the round's metadata goes next to its checkpoints (runs/<run>-round-<r>/round.json: round,
     reference URI and fingerprint, parent checkpoint, pairs, final checkpoint) and into
     runs/<run>/rounds.json, the whole run's record (also <workdir>/<run>/rounds.json).

Each round uses its own topics and consumer groups. With --eval-samples, each round's final policy is
evaluated on held-out review openings (ground-truth reward; KL to the base model via a local copy).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cli.demo import label_in_parallel
from localdev.experiment import evaluate_policy, quiet_third_party_logs, stack_up_quietly, write_candidates
from localdev.process import free_port, stop_process, wait_until
from offdpo import records
from offdpo.kafka import ensure_topics, read_topic
from offdpo.s3 import ObjectStore
from offdpo.v1 import records_pb2

REPO = Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class RoundsSettings:
    rounds: int = 3
    prompts: int = 200  # prompts per round (fresh held-in review openings each round)
    samples: int = 4  # on-policy candidates per prompt (best vs worst become the pair)
    strategy: str = "reward_model"  # or "rules"
    model: str = ""  # base reference directory ("" = the review-language reference)
    reward_model: str = ""  # reward model directory ("" = the review-language reward model)
    engine: str = "vllm"
    beta: float = 0.5
    lr: float = 2e-4
    batch: int = 8
    epochs: int = 1
    warmup_steps: int = 5
    max_tokens: int = 96
    labelers: int = 2
    eval_samples: int = 0  # 0: no per-round evaluation
    step_timeout_s: float = 900.0  # bound on each wait (refscore up, scoring, training)


def _say(msg: str) -> None:
    print(msg, flush=True)


def _add_provenance(path: Path, metadata: dict[str, str]) -> None:
    """Candidate sets -> the same sets carrying `metadata` (the labeler copies it into each pair)."""
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    path.write_text("".join(json.dumps({**obj, "metadata": metadata}) + "\n" for obj in lines))


def _check_alive(proc: subprocess.Popen, name: str, log_path: Path) -> None:
    code = proc.poll()
    if code is not None:
        raise RuntimeError(f"{name} exited with {code}; log tail:\n{log_path.read_text(errors='replace')[-3000:]}")


class Rounds:
    """One `offdpo rounds` run on a started local stack (tests pass their session's stack)."""

    def __init__(self, settings: RoundsSettings, stack, workdir: Path, say: Callable[[str], None] = _say):
        self.s = settings
        self.stack = stack
        self.run_name = f"rounds-{uuid.uuid4().hex[:6]}"
        self.workdir = (workdir / self.run_name).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.say = say
        self.store = ObjectStore(stack.s3)
        self.store.ensure_bucket()
        self.base_env = {
            **os.environ,
            **stack.env(),
            "PYTHONPATH": str(REPO),
            "OFFDPO_KAFKA_SESSION_TIMEOUT_MS": "6000",
            "OFFDPO_KAFKA_HEARTBEAT_MS": "1000",
            "OFFDPO_KAFKA_MAX_POLL_INTERVAL_MS": "120000",
            "OFFDPO_TRAINER_PROGRESS": "false",
        }
        self.procs: list[subprocess.Popen] = []

    # -- the pieces of one round -------------------------------------------------------------------
    def _round_env(self, r: int) -> dict[str, str]:
        return {
            **self.base_env,
            "OFFDPO_TOPIC_PAIRS": f"{self.run_name}.r{r}.pairs",
            "OFFDPO_TOPIC_SHARDS": f"{self.run_name}.r{r}.shards",
            "OFFDPO_TOPIC_DEADLETTER": f"{self.run_name}.r{r}.deadletter",
            "OFFDPO_TOPIC_CANDIDATES": f"{self.run_name}.r{r}.candidates",
        }

    def _start_refscore(self, r: int, env: dict[str, str], reference: str) -> tuple[subprocess.Popen, str, Path]:
        from offdpo.refscore_client import RefscoreClient

        port = free_port()
        log_path = self.workdir / f"refscore-round-{r}.log"
        proc = subprocess.Popen(
            [sys.executable, "-m", "services.refscore", "serve", "--worker"],
            env={
                **env,
                "OFFDPO_REFSCORE_MODEL_DIR": reference,
                "OFFDPO_REFSCORE_MODEL_CACHE": str(self.workdir / "refscore-model-cache"),
                "OFFDPO_REFSCORE_ENGINE": self.s.engine,
                "OFFDPO_REFSCORE_PORT": str(port),
                "OFFDPO_REFSCORE_METRICS_PORT": "0",
                "OFFDPO_REFSCORE_GROUP": f"{self.run_name}-r{r}-refscore",
                "OFFDPO_REFSCORE_MAX_MODEL_LEN": "512",
                "OFFDPO_REFSCORE_BATCH_WAIT_S": "0.5",
                "OFFDPO_REFSCORE_GPU_MEMORY_UTILIZATION": env.get("OFFDPO_REFSCORE_GPU_MEMORY_UTILIZATION", "0.08"),
                "OFFDPO_REFSCORE_PLAINTEXT": "true",  # local development on loopback, explicitly
                "OFFDPO_REFSCORE_ALLOW_ANONYMOUS": "true",
            },
            cwd=REPO,
            stdout=open(log_path, "ab"),
            stderr=subprocess.STDOUT,
        )
        self.procs.append(proc)
        address = f"127.0.0.1:{port}"
        with RefscoreClient(address) as client:
            wait_until(
                lambda: _serving(client),
                self.s.step_timeout_s,
                f"refscore of round {r} serving {reference}",
                every_s=1.0,
                proc=proc,
                log=log_path,
            )
        return proc, address, log_path

    def _label(self, r: int, env: dict[str, str], kafka, address: str, provenance: dict[str, str]) -> dict:
        from localdev import reviews
        from services.labeler.config import LabelerConfig

        openings = reviews.review_prompts(self.s.prompts, seed=1000 + r, split="held_in")
        files = []
        for w in range(self.s.labelers):
            path = self.workdir / f"candidates-r{r}-{w}.jsonl"
            write_candidates(path, openings[w :: self.s.labelers], self.s.samples, self.s.strategy)
            _add_provenance(path, provenance)
            files.append(path)

        if self.s.strategy == "rules" and not env.get("OFFDPO_LABELER_RULES"):
            # the review experiment's own rules (the exact rule as a python check) unless the user set a file
            env = {**env, **reviews.rules_env(self.workdir)}

        def cfg_for(i: int) -> LabelerConfig:
            return LabelerConfig.from_env(
                {
                    **env,
                    "OFFDPO_LABELER_REFSCORE_ADDR": address,
                    "OFFDPO_LABELER_GENERATE_N": str(self.s.samples),
                    "OFFDPO_LABELER_GENERATE_MAX_TOKENS": str(self.s.max_tokens),
                    "OFFDPO_LABELER_GENERATE_TEMPERATURE": "1.0",
                    "OFFDPO_LABELER_BATCH": "16",
                },
                state_dir=str(self.workdir / f"labeler-r{r}-{i}"),
                reward_model=self.reward_model,
            )

        return label_in_parallel(cfg_for, kafka, files, self.s.strategy)

    def _wait_scored(self, r: int, kafka, prefix: str, labelled: set[str], proc, log_path: Path) -> list[str]:
        def scored() -> list[str]:
            return [
                pid
                for key in self.store.list_keys(prefix)
                for pid in records.read_shard(self.store.get_bytes(key), key).pair_ids
            ]

        def refused() -> set[str]:
            ids = set()
            for rec in read_topic(kafka, kafka.deadletter_topic, idle_s=0.5):
                dl = records_pb2.DeadLetter.FromString(rec.value)
                if dl.service == "refscore":
                    try:
                        ids.add(records.PreferencePair.FromString(dl.original_value).pair_id)
                    except Exception:  # noqa: BLE001 - an undecodable record has no pair id
                        pass
            return ids

        wait_until(
            lambda: set(scored()) | refused() >= labelled,
            self.s.step_timeout_s,
            f"refscore scoring round {r}'s {len(labelled)} pairs under {prefix}",
            every_s=1.0,
            progress=lambda: _check_alive(proc, f"refscore of round {r}", log_path),
        )
        return scored()

    def _train(self, r: int, env: dict[str, str], policy_dir: Path, prefix: str, fp) -> dict[str, Any]:
        from services.trainer.checkpoint import latest_checkpoint

        run = f"{self.run_name}-round-{r}"
        log_path = self.workdir / f"trainer-round-{r}.log"
        cmd = [
            sys.executable,
            "-m",
            "services.trainer",
            *("--model", str(policy_dir), "--run-name", run, "--mode", "replay", "--prefix", prefix),
            # the reference is the round's policy itself, as refscore stamped it
            *("--reference-model", str(policy_dir), "--reference-model-id", fp.model_id),
            *("--reference-dtype", fp.dtype, "--epochs", str(self.s.epochs), "--seed", str(r)),
            *("--global-batch-size", str(self.s.batch), "--micro-batch-size", str(self.s.batch)),
            *("--lr", str(self.s.lr), "--warmup-steps", str(self.s.warmup_steps), "--beta", str(self.s.beta)),
            *("--save-every", "100000", "--log-dir", str(self.workdir / "trainer"), "--precision", "fp32"),
            "--no-resume",  # a fresh run each round: new optimizer, new schedule
        ]
        started = time.monotonic()
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
            self.procs.append(proc)
            try:
                code = proc.wait(timeout=self.s.step_timeout_s)
            except subprocess.TimeoutExpired:
                stop_process(proc)
                raise TimeoutError(
                    f"the trainer of round {r} did not finish within {self.s.step_timeout_s:.0f} s; see {log_path}"
                ) from None
        if code != 0:
            raise RuntimeError(
                f"trainer of round {r} exited with {code}: {log_path.read_text(errors='replace')[-3000:]}"
            )
        metrics_path = self.workdir / "trainer" / run / "metrics.jsonl"
        rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
        steps = [m for m in rows if "loss" in m]
        checkpoint = latest_checkpoint(self.store, run)
        if checkpoint is None:
            raise RuntimeError(f"trainer of round {r} wrote no checkpoint (runs/{run}/latest); see {log_path}")
        return {
            "run_name": run,
            "steps": len(steps),
            "first_step": steps[0] if steps else None,
            "last_step": steps[-1] if steps else None,
            "checkpoint": checkpoint,
            "metrics_path": str(metrics_path),
            "wall_s": round(time.monotonic() - started, 1),
        }

    # -- the run -----------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        from services.trainer.checkpoint import download_model

        s = self.s
        base = Path(s.model) if s.model else None
        reward = Path(s.reward_model) if s.reward_model else None
        if base is None or (reward is None and s.strategy == "reward_model"):
            from localdev.pretrain import ensure_reviews_model, ensure_reviews_reward_model

            models = self.workdir.parent / "models"
            base = base or ensure_reviews_model(models)
            if reward is None and s.strategy == "reward_model":
                reward = ensure_reviews_reward_model(models)
        self.reward_model = str(reward or "")
        base = base.resolve()
        report: dict[str, Any] = {
            "run_name": self.run_name,
            "base_model": str(base),
            "settings": dataclasses.asdict(s),
            "optimizer": "fresh AdamW and schedule each round (a new trainer run); weights carried over",
            "rounds": [],
        }
        reference, policy_dir, parent = str(base), base, None
        for r in range(1, s.rounds + 1):
            t0 = time.monotonic()
            env = self._round_env(r)
            kafka = self.stack.kafka.from_env(env)
            ensure_topics(
                kafka, [kafka.pairs_topic, kafka.shards_topic, kafka.deadletter_topic], self.stack.stack.partitions
            )
            self.say(f"[round {r}/{s.rounds}] refscore serving {reference}")
            proc, address, log_path = self._start_refscore(r, env, reference)
            try:
                fp = _fingerprint(address)
                self.say(f"      reference fingerprint {fp.fingerprint_id[:16]} ({fp.model_id})")
                provenance = {"round": str(r), "policy": reference, "policy_fingerprint": fp.fingerprint_id}
                summary = self._label(r, env, kafka, address, provenance)
                labelled = {
                    records.PreferencePair.FromString(rec.value).pair_id for rec in read_topic(kafka, kafka.pairs_topic)
                }
                if not labelled:
                    raise RuntimeError(f"round {r}: the labeler published no pairs ({summary}); see {self.workdir}")
                prefix = f"scores/{fp.fingerprint_id}/{kafka.pairs_topic}/"
                scored = self._wait_scored(r, kafka, prefix, labelled, proc, log_path)
                self.say(f"      {len(labelled)} pairs labelled, {len(set(scored))} scored under {prefix}")
            finally:
                stop_process(proc)  # the trainer gets the CPU to itself
            trained = self._train(r, env, policy_dir, prefix, fp)
            final_uri = f"s3://{self.store.bucket}/{trained['checkpoint']}/model/"
            self.say(
                f"      trained {trained['steps']} steps from {parent or base} -> {final_uri} ({trained['wall_s']} s)"
            )
            meta = {
                "round": r,
                "run_name": self.run_name,
                "trainer_run": trained["run_name"],
                "policy": reference,  # generated the round's candidates, and is its reference
                "reference": reference,
                "reference_fingerprint": fingerprint_json(fp),
                "parent_checkpoint": parent,  # the weights training started from (None: the base model)
                "start_weights": str(policy_dir),
                "pairs_topic": kafka.pairs_topic,
                "scores_prefix": prefix,
                "pairs_labelled": len(labelled),
                "pairs_scored": len(set(scored)),
                "labeler": summary,
                "trainer": {k: v for k, v in trained.items() if k != "metrics_path"},
                "final_checkpoint": final_uri,
                "optimizer": "fresh",
            }
            self.store.put_bytes(
                f"runs/{trained['run_name']}/round.json",
                json.dumps(meta, indent=2, sort_keys=True).encode(),
                content_type="application/json",
            )
            # The next round: this checkpoint is its policy (weights to start from) and its reference.
            parent = final_uri
            reference = final_uri
            round_reference_dir = policy_dir  # the weights that generated, were the reference, started training
            if r < s.rounds or s.eval_samples:  # the next round starts from it / it is evaluated
                policy_dir = download_model(self.store, trained["checkpoint"], self.workdir / f"policy-after-round-{r}")
            if s.eval_samples:
                ev = evaluate_policy(policy_dir, reference_dir=base, samples=s.eval_samples, seed=1)
                meta["eval_vs_base"] = {k: v for k, v in ev.items() if k != "examples"}
                # KL per round: to the round's own reference (the previous policy). The samples are the
                # same (same policy, same seed), only the reference log-probs differ.
                ev_round = (
                    ev
                    if round_reference_dir == base
                    else evaluate_policy(policy_dir, reference_dir=round_reference_dir, samples=s.eval_samples, seed=1)
                )
                meta["eval_vs_round_reference"] = {k: ev_round[k] for k in ("kl", "kl_se", "reward_mean", "samples")}
                self.say(
                    f"      policy after round {r}: reward {ev['reward_mean']:+.4f} +- {ev['reward_se']:.4f}, "
                    f"KL to the base {ev['kl']:.3f} +- {ev['kl_se']:.3f}, "
                    f"to the round's reference {ev_round['kl']:.3f} +- {ev_round['kl_se']:.3f}"
                )
            meta["wall_s"] = round(time.monotonic() - t0, 1)
            report["rounds"].append(meta)
            data = json.dumps(report, indent=2, sort_keys=True)
            self.store.put_bytes(f"runs/{self.run_name}/rounds.json", data.encode(), content_type="application/json")
            (self.workdir / "rounds.json").write_text(data)
        report["final_checkpoint"] = reference
        report["metadata"] = f"s3://{self.store.bucket}/runs/{self.run_name}/rounds.json"
        return report

    def close(self) -> None:
        for proc in self.procs:
            stop_process(proc)


def _serving(client) -> bool:
    try:
        client.wait_serving(timeout_s=1)
        return True
    except TimeoutError:
        return False


def _fingerprint(address: str):
    from offdpo.refscore_client import RefscoreClient

    with RefscoreClient(address) as client:
        return client.model_info().fingerprint


def fingerprint_json(fp) -> dict[str, str]:
    """A ReferenceFingerprint as a JSON object."""
    return {f.name: getattr(fp, f.name) for f in fp.DESCRIPTOR.fields}


def run_rounds(settings: RoundsSettings, stack, workdir: Path, say: Callable[[str], None] = _say) -> dict[str, Any]:
    rounds = Rounds(settings, stack, workdir, say)
    try:
        return rounds.run()
    finally:
        rounds.close()


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = RoundsSettings()
    p.add_argument("--rounds", type=int, default=d.rounds, help="rounds to run")
    p.add_argument("--prompts", type=int, default=d.prompts, help="held-in review openings per round")
    p.add_argument("--samples", type=int, default=d.samples, help="on-policy candidates per prompt")
    p.add_argument("--strategy", choices=["reward_model", "rules"], default=d.strategy, help="labelling strategy")
    p.add_argument("--model", default="", help="base reference directory (default: the review-language reference)")
    p.add_argument("--reward-model", default="", help="reward model directory (default: the review-language one)")
    p.add_argument("--engine", choices=["vllm", "transformers"], default=d.engine, help="refscore engine")
    p.add_argument("--beta", type=float, default=d.beta)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--batch", type=int, default=d.batch, help="pairs per optimizer step")
    p.add_argument("--epochs", type=int, default=d.epochs, help="passes over each round's pairs")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help="max tokens per generated candidate")
    p.add_argument("--labelers", type=int, default=d.labelers, help="labelers in threads")
    p.add_argument("--eval-samples", type=int, default=d.eval_samples, help="evaluate each round's policy (0: off)")
    p.add_argument("--workdir", default=".cache/rounds", help="models, logs and outputs")
    p.add_argument("--keep-stack", action="store_true", help="leave the local stack running afterwards")
    p.add_argument("--verbose", action="store_true", help="show third-party INFO logs")


def main(args: argparse.Namespace) -> int:
    from localdev.stack import LocalStack

    if args.rounds < 1 or args.prompts < 1 or args.samples < 2 or args.labelers < 1:
        raise SystemExit("offdpo rounds: --rounds, --prompts and --labelers must be >= 1 and --samples >= 2")
    quiet_third_party_logs(args.verbose)
    settings = RoundsSettings(
        rounds=args.rounds,
        prompts=args.prompts,
        samples=args.samples,
        strategy=args.strategy,
        model=args.model,
        reward_model=args.reward_model,
        engine=args.engine,
        beta=args.beta,
        lr=args.lr,
        batch=args.batch,
        epochs=args.epochs,
        max_tokens=args.max_tokens,
        labelers=args.labelers,
        eval_samples=args.eval_samples,
    )
    stack = LocalStack()
    stack_up_quietly(stack, args.verbose)
    try:
        report = run_rounds(settings, stack, Path(args.workdir))
    finally:
        if not args.keep_stack:
            stack.down()
    _say(f"done: {len(report['rounds'])} rounds; final policy {report['final_checkpoint']}")
    _say(f"metadata: {report['metadata']}")
    return 0
