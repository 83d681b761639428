"""`make bench-learning`: does the pipeline make a model better? The DPO paper's controlled-sentiment
experiment (Rafailov et al. 2023, section 6.1) in miniature, through the real pipeline, on CPU.

1. Pairs through the pipeline once: held-in review openings -> labeler (k on-policy samples each from
   refscore `Generate`, best vs worst by the reward-model strategy) -> pairs topic -> refscore's
   worker scores them (float32) into shards in S3. A second refscore in bfloat16 scores the same
   topic under its own fingerprint (the dtype comparison), and the bench writes a third set of shards
   whose reference log-probs are the sampled tokens' log-probs from `Generate` (the seed's claim).
2. The sweep replays the shards (trainer `--mode replay --prefix ...`): beta in {0.1, 0.5} at lr 1e-4,
   checkpoints every 20 steps (headline: beta 0.5, 80 steps); the over-optimisation regime (beta 0.05,
   lr 1e-3); seeds 1 and 2 of the headline setting; the bf16 and generation-log-prob references.
3. Every checkpoint is evaluated by `offdpo eval` (localdev.experiment.evaluate_policy): >= 400 held-out openings, one sample
   each at T=1 without top-k/top-p, ground-truth reward, KL(policy || reference) from refscore `Score`.
4. Best-of-n from the reference (n = 2, 4, 16; picked by the reward model; KL = log n - (n-1)/n,
   the standard bound) is the baseline curve; TRL's DPOTrainer with a live reference (its default) on
   the exported shards, same settings, 3 seeds.
5. The rules strategy (localdev.reviews.RULES_YAML: the exact rule as a `python` check) labels the same
   openings through the pipeline again, on its own topics; the headline setting is trained on those
   pairs (`--only-rules` adds just this arm to an existing results file).

Writes bench/results/learning.json and learning.png. Never reports accuracy without KL.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

from bench.machine import stamp

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"


def _say(msg: str) -> None:
    print(msg, flush=True)


class PipelineRun:
    """The local stack, refscore on the reference and the labeled + scored pairs of one run."""

    def __init__(self, workdir: Path, models: Path, verbose: bool = False, stack=None):
        from localdev.experiment import quiet_third_party_logs
        from localdev.pretrain import ensure_reviews_model, ensure_reviews_reward_model
        from localdev.stack import LocalStack

        quiet_third_party_logs(verbose)
        self.run_name = f"learn-{uuid.uuid4().hex[:6]}"
        self.workdir = workdir / self.run_name
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.reference = ensure_reviews_model(models)
        self.reward = ensure_reviews_reward_model(models)
        self.own_stack = stack is None  # tests pass their session's stack (free ports), left running
        # its own stack on free ports: other stacks on this machine (tests, other benches) keep theirs
        self.stack = stack or LocalStack.for_tests(self.workdir / "stack")
        self.verbose = verbose
        self.procs: list[subprocess.Popen] = []
        # (prompt, text) -> (prompt ids, answer ids, log-probs reported by Generate while sampling)
        self.generated: dict[tuple[str, str], tuple[list[int], list[int], list[float]]] = {}

    def __enter__(self) -> PipelineRun:
        from localdev.experiment import stack_up_quietly
        from offdpo.kafka import ensure_topics
        from offdpo.s3 import ObjectStore

        if self.own_stack:
            stack_up_quietly(self.stack, self.verbose)
        topics = {
            "OFFDPO_TOPIC_PAIRS": f"{self.run_name}.pairs",
            "OFFDPO_TOPIC_SHARDS": f"{self.run_name}.shards",
            "OFFDPO_TOPIC_DEADLETTER": f"{self.run_name}.deadletter",
            "OFFDPO_TOPIC_CANDIDATES": f"{self.run_name}.candidates",
        }
        self.env = {
            **os.environ,
            **self.stack.env(),
            **topics,
            "PYTHONPATH": str(REPO),
            "OFFDPO_KAFKA_SESSION_TIMEOUT_MS": "6000",
            "OFFDPO_KAFKA_HEARTBEAT_MS": "1000",
            "OFFDPO_KAFKA_MAX_POLL_INTERVAL_MS": "120000",
            "OFFDPO_TRAINER_PROGRESS": "false",
        }
        self.kafka = self.stack.kafka.from_env(self.env)
        ensure_topics(
            self.kafka,
            [self.kafka.pairs_topic, self.kafka.shards_topic, self.kafka.deadletter_topic],
            self.stack.stack.partitions,
        )
        self.store = ObjectStore(self.stack.s3)
        return self

    def __exit__(self, *exc: object) -> None:
        from localdev.process import stop_process

        for proc in self.procs:
            stop_process(proc)
        if self.own_stack:
            self.stack.down()

    def start_refscore(self, dtype: str = "", worker: bool = True) -> str:
        """A refscore on the reference (its own consumer group per dtype); returns its address."""
        from localdev.process import free_port
        from offdpo.refscore_client import RefscoreClient

        port = free_port()
        env = {
            **self.env,
            "OFFDPO_REFSCORE_MODEL_DIR": str(self.reference),
            "OFFDPO_REFSCORE_PORT": str(port),
            "OFFDPO_REFSCORE_METRICS_PORT": "0",
            "OFFDPO_REFSCORE_GROUP": f"{self.run_name}-refscore-{dtype or 'default'}",
            "OFFDPO_REFSCORE_MAX_MODEL_LEN": "512",
            "OFFDPO_REFSCORE_BATCH_WAIT_S": "1.0",
            "OFFDPO_REFSCORE_PLAINTEXT": "true",
            "OFFDPO_REFSCORE_ALLOW_ANONYMOUS": "true",
        }
        if dtype:
            env["OFFDPO_REFSCORE_DTYPE"] = dtype
        log = open(self.workdir / f"refscore-{dtype or 'default'}.log", "ab")
        cmd = [sys.executable, "-m", "services.refscore", "serve"] + (["--worker"] if worker else [])
        self.procs.append(subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT))
        address = f"127.0.0.1:{port}"
        with RefscoreClient(address) as client:
            client.wait_serving(timeout_s=400)
        return address

    def fingerprint(self, address: str):
        from offdpo.refscore_client import RefscoreClient

        with RefscoreClient(address) as client:
            return client.model_info().fingerprint

    def label(
        self,
        address: str,
        openings: list[str],
        k: int,
        workers: int = 6,
        swap: bool = False,
        strategy: str = "reward_model",
    ) -> dict:
        """Openings -> labeler (on-policy generation through refscore; the reward-model strategy, or the
        rules strategy with localdev.reviews.RULES_YAML: the ground-truth rule as a `python` check) -> pairs topic."""
        from cli.demo import label_in_parallel
        from localdev import reviews
        from localdev.experiment import write_candidates
        from services.labeler.config import LabelerConfig

        files = []
        for w in range(workers):
            path = self.workdir / f"candidates-{strategy}-{w}.jsonl"
            write_candidates(path, openings[w::workers], k, strategy)
            files.append(path)
        rules = reviews.rules_env(self.workdir) if strategy == "rules" else {}

        def cfg_for(i: int) -> LabelerConfig:
            return LabelerConfig.from_env(
                {
                    **self.env,
                    **rules,
                    "OFFDPO_LABELER_REFSCORE_ADDR": address,
                    "OFFDPO_LABELER_GENERATE_N": str(k),
                    "OFFDPO_LABELER_GENERATE_MAX_TOKENS": "96",
                    "OFFDPO_LABELER_GENERATE_TEMPERATURE": "1.0",
                    "OFFDPO_LABELER_BATCH": "16",
                },
                state_dir=str(self.workdir / f"labeler-{strategy}-{i}"),
                reward_model=str(self.reward),
            )

        summaries = label_in_parallel(cfg_for, self.kafka, files, strategy, swap=swap, generator_for=self._generator)
        check_complete_load(self.reference)
        return summaries

    def _generator(self, cfg):
        """The labeler's own refscore generator, recording each sample's token ids and the log-probs
        vLLM reported while sampling them (the seed's claim: generation vs scoring log-probs)."""
        from offdpo import records
        from services.labeler.runner import RefScoreGenerator

        generated = self.generated

        class Recording(RefScoreGenerator):
            def generate(self, prompt, n):
                req = self._pb.GenerateRequest(n=n, max_tokens=self.max_tokens, temperature=self.temperature)
                req.prompt.CopyFrom(prompt)
                resp = self.client.stub.Generate(req, timeout=self.timeout_s)
                key = json.dumps(records.canonical_prompt(prompt), sort_keys=True)
                for a in resp.answers:
                    generated[(key, a.text)] = (list(resp.prompt_token_ids), list(a.token_ids), list(a.token_logprobs))
                return [a.text for a in resp.answers]

        return Recording(cfg)

    def write_generation_shards(self, fp, prefix_out: str) -> dict:
        """A copy of the scored shards whose reference log-probs are the ones recorded while generating
        (where the generated token ids are exactly the scored ones; other rows keep the scored values)."""
        from offdpo import records

        src = self.shard_prefix(fp)
        counts = {"answers": 0, "replaced": 0, "id_mismatch": 0, "not_recorded": 0, "max_abs_token_diff": 0.0}
        diffs: list[float] = []
        for key in self.store.list_keys(src):
            shard = records.read_shard(self.store.get_bytes(key), key)
            rows = []
            for row in shard.rows():
                pkey = json.dumps(records.canonical_prompt(row.pair.prompt), sort_keys=True)
                for side in ("chosen", "rejected"):
                    counts["answers"] += 1
                    hit = self.generated.get((pkey, getattr(row.pair, side)))
                    ids = list(getattr(row, f"{side}_token_ids"))
                    if hit is None:
                        counts["not_recorded"] += 1
                        continue
                    p_ids, g_ids, g_lps = hit
                    if g_ids != ids or p_ids != list(row.prompt_token_ids):
                        counts["id_mismatch"] += 1
                        continue
                    scored = list(getattr(row, f"{side}_logprobs"))
                    diffs.append(sum(g_lps) - sum(scored))
                    counts["max_abs_token_diff"] = max(
                        counts["max_abs_token_diff"], max((abs(a - b) for a, b in zip(g_lps, scored)), default=0.0)
                    )
                    field = getattr(row, f"{side}_logprobs")
                    del field[:]
                    field.extend(g_lps)
                    setattr(row, f"{side}_logprob_sum", float(sum(g_lps)))
                    counts["replaced"] += 1
                rows.append(row)
            data = records.scored_pairs_to_parquet(rows, shard.fingerprint)
            self.store.put_bytes(prefix_out + key[len("scores/") :], data)
        if diffs:
            counts["sum_diff_mean"] = round(statistics.fmean(diffs), 6)
            counts["sum_diff_mean_abs"] = round(statistics.fmean(abs(d) for d in diffs), 6)
            counts["sum_diff_max_abs"] = round(max(abs(d) for d in diffs), 6)
        counts["max_abs_token_diff"] = round(counts["max_abs_token_diff"], 6)
        return counts

    def pair_count(self) -> int:
        from offdpo import records
        from offdpo.kafka import read_topic

        return len(
            {records.PreferencePair.FromString(r.value).pair_id for r in read_topic(self.kafka, self.kafka.pairs_topic)}
        )

    def shard_prefix(self, fp) -> str:
        return f"scores/{fp.fingerprint_id}/{self.kafka.pairs_topic}/"

    def wait_scored(self, fp, expected: int, timeout_s: float = 900) -> int:
        from localdev.process import wait_until
        from offdpo import records

        prefix = self.shard_prefix(fp)

        def count() -> int:
            return len(
                {
                    pid
                    for key in self.store.list_keys(prefix)
                    for pid in records.read_shard(self.store.get_bytes(key), key).pair_ids
                }
            )

        wait_until(lambda: count() >= expected, timeout_s, f"scoring {expected} pairs under {prefix}", every_s=2.0)
        return count()

    def train(
        self,
        prefix: str,
        name: str,
        beta: float,
        lr: float,
        steps: int,
        batch: int = 32,
        seed: int = 0,
        save_every: int = 50,
        eval_fraction: float = 0.1,
        pairs: int = 1000,
        extra: list[str] | None = None,
    ) -> dict:
        """One replay run of services.trainer over `prefix`; its metrics and wall time."""
        run_name = f"{self.run_name}-{name}"
        epochs = max(1, math.ceil(steps * batch / max(1, int(pairs * (1 - eval_fraction)))) + 1)
        cmd = [
            sys.executable,
            "-m",
            "services.trainer",
            "--model",
            str(self.reference),
            "--run-name",
            run_name,
            "--mode",
            "replay",
            "--prefix",
            prefix,
            "--epochs",
            str(epochs),
            "--max-steps",
            str(steps),
            "--global-batch-size",
            str(batch),
            "--micro-batch-size",
            str(batch),
            "--lr",
            str(lr),
            "--warmup-steps",
            "10",
            "--min-lr-ratio",
            "1.0",  # constant after warm-up (TRL: constant_with_warmup)
            "--beta",
            str(beta),
            "--seed",
            str(seed),
            "--save-every",
            str(save_every),
            "--log-dir",
            str(self.workdir / "trainer"),
            "--precision",
            "fp32",
        ]
        if trainer_has_eval_flags() and eval_fraction > 0:
            cmd += ["--eval-fraction", str(eval_fraction), "--eval-every", str(save_every)]
        cmd += extra or []
        started = time.monotonic()
        log = self.workdir / f"trainer-{name}.log"
        with open(log, "ab") as out:
            code = subprocess.run(cmd, env=self.env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT).returncode
        if code != 0:
            raise RuntimeError(f"trainer {name} exited with {code}: {log.read_text(errors='replace')[-3000:]}")
        rows = [json.loads(line) for line in (self.workdir / "trainer" / run_name / "metrics.jsonl").open()]
        return {"run_name": run_name, "metrics": rows, "wall_s": round(time.monotonic() - started, 1)}

    def checkpoint(self, run_name: str, step: int) -> Path:
        from services.trainer.checkpoint import download_model, run_prefix

        prefix = f"{run_prefix(run_name)}/checkpoints/step-{step:08d}"
        return download_model(self.store, prefix, self.workdir / "checkpoints" / run_name / str(step))


def check_complete_load(model_dir: Path) -> None:
    """Refuse to go on if a causal LM no longer loads whole in this process (a missing tied lm_head
    means weight tying was switched off by overlapping loads: every evaluation after would sample
    from uninitialised weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    _, info = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, output_loading_info=True)
    if info["missing_keys"]:
        raise RuntimeError(f"{model_dir} loads with weights missing: {sorted(info['missing_keys'])}")


def trainer_has_eval_flags() -> bool:
    """Whether services/trainer takes --eval-fraction/--eval-every (held-out pair metrics)."""
    import dataclasses

    from services.trainer.config import TrainerConfig

    return "eval_fraction" in {f.name for f in dataclasses.fields(TrainerConfig)}


def _eval_at(metrics: list[dict], step: int) -> dict:
    """The trainer's held-out pair metrics at `step` (the last eval row at or before it)."""
    rows = [m for m in metrics if "eval/rewards/accuracies" in m and m.get("step", 0) <= step]
    if not rows:
        return {}
    r = rows[-1]
    return {
        "heldout_accuracy": r["eval/rewards/accuracies"],
        "heldout_loss": r.get("eval/loss"),
        "heldout_margin": r.get("eval/rewards/margins"),
        "heldout_pairs": r.get("eval/pairs"),
    }


def _point(evaluation: dict, **extra) -> dict:
    keys = (
        "positive_share",
        "positive_share_se",
        "reward_mean",
        "reward_se",
        "kl",
        "kl_se",
        "consistency",
        "mean_answer_tokens",
        "samples",
    )
    return {
        **extra,
        **{k: evaluation[k] for k in keys},
        "examples": [e["continuation"] for e in evaluation["examples"]],
    }


def sweep_run(
    run: PipelineRun, address: str, prefix: str, name: str, beta: float, lr: float, steps: list[int], args, **kw
) -> dict:
    from localdev.experiment import evaluate_policy

    trained = run.train(prefix, name, beta, lr, max(steps), save_every=min(steps), pairs=args.pairs_made, **kw)
    points = []
    for step in steps:
        t0 = time.monotonic()
        ev = evaluate_policy(
            run.checkpoint(trained["run_name"], step), refscore=address, samples=args.eval_samples, seed=args.eval_seed
        )
        point = _point(ev, step=step, **_eval_at(trained["metrics"], step), eval_wall_s=round(time.monotonic() - t0, 1))
        points.append(point)
        _say(
            f"  {name} step {step}: positive {point['positive_share']:.3f}, reward {point['reward_mean']:+.4f} "
            f"+- {point['reward_se']:.4f}, KL {point['kl']:.3f} +- {point['kl_se']:.3f}, held-out acc "
            f"{point.get('heldout_accuracy')}"
        )
    return {
        "name": name,
        "beta": beta,
        "lr": lr,
        "batch": 32,
        "seed": kw.get("seed", 0),
        "points": points,
        "wall_s": trained["wall_s"],
    }


def rules_arm(run: PipelineRun, args, result: dict) -> None:
    """The same experiment labelled by the labeler's rules strategy (the ground-truth rule as a check):
    its own topics, pairs through the pipeline, the headline setting replayed and evaluated."""
    import copy

    from localdev import reviews

    address = run.start_refscore()
    fp = run.fingerprint(address)
    t0 = time.monotonic()
    openings = reviews.review_prompts(args.prompts, seed=0, split="held_in")
    summaries = run.label(address, openings, args.k, strategy="rules")
    pairs = run.pair_count()
    scored = run.wait_scored(fp, pairs)
    pipeline = {"labeler": summaries, "pairs": pairs, "scored": scored, "wall_s": round(time.monotonic() - t0, 1)}
    _say(f"  rules strategy: {pairs} pairs, {scored} scored ({pipeline['wall_s']} s)")
    rules_args = copy.copy(args)
    rules_args.pairs_made = pairs
    r = sweep_run(
        run, address, run.shard_prefix(fp), "rules", args.headline_beta, args.lr, [args.headline_steps], rules_args
    )
    p = r["points"][0]
    out = {"runs": [dict(p, labels="rules strategy", wall_s=r["wall_s"])], "pipeline": pipeline}
    head = result.get("headline")
    if head:
        out["reward_model_headline"] = {
            k: head[k] for k in ("positive_share", "reward_mean", "reward_se", "kl", "kl_se")
        }
        out["reward_diff_se"] = round(
            (p["reward_mean"] - head["reward_mean"]) / math.hypot(p["reward_se"], head["reward_se"]), 2
        )
        out["kl_diff"] = round(p["kl"] - head["kl"], 4)
    result["rules"] = out


def best_of_n(reference_dir: Path, reward_dir: Path, ns: list[int], samples: int, seed: int) -> list[dict]:
    """Best-of-n from the reference, picked by the reward model, scored by the ground truth.
    KL(best-of-n || reference) <= log n - (n-1)/n (the standard analytical value)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from localdev import reviews
    from localdev.experiment import mean_se
    from localdev.pretrain import sample_continuations

    ref = AutoModelForCausalLM.from_pretrained(reference_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(reference_dir)
    rm = AutoModelForSequenceClassification.from_pretrained(reward_dir, dtype=torch.float32).eval()
    rm_tok = AutoTokenizer.from_pretrained(reward_dir)
    openings = reviews.review_prompts(samples, seed=seed, split="held_out")
    drawn = sample_continuations(ref, tok, openings, k=max(ns), seed=seed + 100)
    scores = []
    for opening, group in zip(openings, drawn):
        texts = [
            rm_tok.apply_chat_template(
                [{"role": "user", "content": opening}, {"role": "assistant", "content": s["text"]}], tokenize=False
            )
            for s in group
        ]
        enc = rm_tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            scores.append(rm(**enc).logits[:, 0].tolist())
    out = []
    for n in ns:
        picked = [group[max(range(n), key=lambda i: s[i])]["text"] for group, s in zip(drawn, scores)]
        share, share_se = mean_se([float(reviews.is_positive(t)) for t in picked])
        reward, reward_se = mean_se([reviews.reward(t) for t in picked])
        out.append(
            {
                "n": n,
                "positive_share": round(share, 4),
                "positive_share_se": round(share_se, 4),
                "reward_mean": round(reward, 5),
                "reward_se": round(reward_se, 5),
                "kl": round(math.log(n) - (n - 1) / n, 4),
                "kl_note": "analytical: log n - (n-1)/n",
                "samples": len(picked),
            }
        )
    return out


def trl_live_reference(
    run: PipelineRun, prefix: str, address: str, beta: float, lr: float, steps: int, seed: int, args
) -> dict:
    """TRL 1.16's DPOTrainer with its default live reference (a frozen copy of the model), on the
    pairs exported from the same shards (integrations.trl_export), float32, same beta/lr/batch/steps,
    constant lr after 10 warm-up steps, AdamW without weight decay, grad-norm clip 1."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from integrations.trl_export import export_trl, load_trl_dataset
    from localdev.experiment import evaluate_policy

    data_dir = run.workdir / "trl-data"
    if not data_dir.exists():
        export_trl(f"s3://{run.store.bucket}/{prefix}", data_dir, s3_config=run.stack.s3)
    dataset = load_trl_dataset(data_dir).remove_columns(["ref_chosen_logps", "ref_rejected_logps"])
    if args.trl_exclude_heldout:
        from services.trainer.examples import is_heldout

        dataset = dataset.filter(lambda row: not is_heldout(row["pair_id"], 0.1))

    class LiveRefDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset  # already tokenized exactly as refscore scored it: no re-tokenising

    out = run.workdir / f"trl-seed{seed}"
    model = AutoModelForCausalLM.from_pretrained(run.reference, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(run.reference)
    config = DPOConfig(
        output_dir=str(out),
        beta=beta,
        learning_rate=lr,
        per_device_train_batch_size=32,
        gradient_accumulation_steps=1,
        max_steps=steps,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=10,
        weight_decay=0.0,
        max_grad_norm=1.0,
        bf16=False,
        fp16=False,
        use_cpu=True,
        seed=seed,
        data_seed=seed,
        max_length=None,
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    started = time.monotonic()
    trainer = LiveRefDPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tok)
    trainer.train()
    trainer.save_model(str(out / "final"))
    tok.save_pretrained(str(out / "final"))
    wall = round(time.monotonic() - started, 1)
    ev = evaluate_policy(out / "final", refscore=address, samples=args.eval_samples, seed=args.eval_seed)
    return _point(ev, seed=seed, step=steps, beta=beta, lr=lr, wall_s=wall, pairs=len(dataset))


def summary_of(result: dict) -> dict:
    head = result["headline"]
    before = result["reference"]
    trl = result.get("trl", {}).get("runs", [])
    ours = result.get("ours_seeds", [])
    gain = head["reward_mean"] - before["reward_mean"]
    se = math.hypot(head["reward_se"], before["reward_se"])
    out = {
        "positive_share_before": before["positive_share"],
        "positive_share_after": head["positive_share"],
        "reward_before": before["reward_mean"],
        "reward_after": head["reward_mean"],
        "kl": head["kl"],
        "kl_se": head["kl_se"],
        "reward_gain_se": round(gain / se, 1),
        "heldout_accuracy": head.get("heldout_accuracy"),
        "headline_run": result["headline_run"],
    }
    if trl and ours:
        ours_r = statistics.fmean(p["reward_mean"] for p in ours)
        trl_r = statistics.fmean(p["reward_mean"] for p in trl)
        ours_se = math.sqrt(sum(p["reward_se"] ** 2 for p in ours)) / len(ours)
        trl_se = math.sqrt(sum(p["reward_se"] ** 2 for p in trl)) / len(trl)
        ours_kl = statistics.fmean(p["kl"] for p in ours)
        trl_kl = statistics.fmean(p["kl"] for p in trl)
        out["trl_reward_diff_se"] = round((ours_r - trl_r) / math.hypot(ours_se, trl_se), 2)
        out["trl_kl_ratio"] = round(ours_kl / trl_kl, 3) if trl_kl else None
        out["ours_3seeds"] = {"reward_mean": round(ours_r, 5), "kl": round(ours_kl, 4)}
        out["trl_3seeds"] = {"reward_mean": round(trl_r, 5), "kl": round(trl_kl, 4)}
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = result.get("rounds", {})
    with_rounds = "rounds_arm" in rounds and "single_pass_arm" in rounds
    fig, axes = plt.subplots(1, 3 if with_rounds else 2, figsize=(19.5 if with_rounds else 13, 5))
    ax, ax2 = axes[0], axes[1]
    if with_rounds:  # written by `make bench-rounds` (bench/rounds.py) into the same file
        from bench.rounds import draw_rounds

        draw_rounds(axes[2], rounds)
    ref = result["reference"]
    for a in (ax,):
        a.errorbar([ref["kl"]], [ref["reward_mean"]], yerr=[ref["reward_se"]], fmt="ks", label="reference")
    for run in result["sweep"]:
        xs = [0.0] + [p["kl"] for p in run["points"]]
        ys = [ref["reward_mean"]] + [p["reward_mean"] for p in run["points"]]
        es = [ref["reward_se"]] + [p["reward_se"] for p in run["points"]]
        what = "over-optimisation" if run["name"] == "overopt" else run["name"]
        ax.errorbar(xs, ys, yerr=es, fmt="o-", capsize=2, label=f"{what} (beta {run['beta']}, lr {run['lr']:g}), steps")
        for p in run["points"]:
            ax.annotate(
                str(p["step"]), (p["kl"], p["reward_mean"]), fontsize=7, xytext=(3, -8), textcoords="offset points"
            )
        ax2.plot(
            [p["kl"] for p in run["points"]],
            [p.get("heldout_accuracy") or float("nan") for p in run["points"]],
            "o-",
            label=f"{what}: held-out pair accuracy",
        )
        ax2.plot(
            [p["kl"] for p in run["points"]],
            [p["consistency"] for p in run["points"]],
            "x--",
            label=f"{what}: sentiment consistency of samples",
        )
    bon = result.get("best_of_n", [])
    if bon:
        ax.errorbar(
            [0.0] + [b["kl"] for b in bon],
            [ref["reward_mean"]] + [b["reward_mean"] for b in bon],
            yerr=[ref["reward_se"]] + [b["reward_se"] for b in bon],
            fmt="^:",
            color="gray",
            label="best-of-n (n=2,4,16; reward model)",
        )
    labels = {
        "trl": "TRL DPOTrainer, live reference (one point per seed)",
        "dtype": "bf16-scored references",
        "generation_logprobs": "references from generation log-probs",
        "rules": "labelled by the rules strategy (the exact rule)",
    }
    for key, marker in (("trl", "D"), ("dtype", "P"), ("generation_logprobs", "X"), ("rules", "v")):
        runs = result.get(key, {}).get("runs", [])
        if runs:
            ax.errorbar(
                [p["kl"] for p in runs],
                [p["reward_mean"] for p in runs],
                xerr=[p["kl_se"] for p in runs],
                yerr=[p["reward_se"] for p in runs],
                fmt=marker,
                label=labels[key],
            )
    ours = result.get("ours_seeds", [])
    if ours:
        ax.errorbar(
            [p["kl"] for p in ours],
            [p["reward_mean"] for p in ours],
            xerr=[p["kl_se"] for p in ours],
            yerr=[p["reward_se"] for p in ours],
            fmt="*",
            markersize=10,
            label=f"ours, {len(ours)} seeds (headline setting)",
        )
    ax.set_xlabel("KL(policy || reference), nats per sample")
    ax.set_ylabel("ground-truth reward (pos - neg adjectives per word)")
    samples = result.get("settings", {}).get("eval_samples", 400)
    ax.set_title(f"reward vs KL frontier (held-out openings, {samples} samples per point)")
    kls = [p["kl"] for run in result["sweep"] for p in run["points"]]
    if kls and max(kls) > 12:  # an over-optimised run would squash the rest: linear to 4 nats, log beyond
        for a in (ax, ax2):
            a.set_xscale("symlog", linthresh=4, linscale=2)
    ax.legend(fontsize=7)
    ax2.set_xlabel("KL(policy || reference), nats per sample")
    ax2.set_ylabel("share")
    ax2.set_title("pair accuracy stays high while KL grows: never read it alone")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _save(result: dict, out: Path) -> None:
    """Written after every stage, so an interrupted run keeps what it measured."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")


def _optional(result: dict, key: str, fn) -> None:
    """A stage whose failure is recorded in the result instead of losing the others."""
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - recorded with its reason, the bench goes on
        result.setdefault("failed", {})[key] = f"{type(exc).__name__}: {exc}"[:2000]
        _say(f"  {key} failed: {exc}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=800, help="held-in openings through the pipeline")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--eval-samples", type=int, default=400)
    parser.add_argument("--eval-seed", type=int, default=1)
    parser.add_argument("--steps", type=int, nargs="+", default=[20, 40, 60, 80, 100])
    parser.add_argument(
        "--sweep-steps",
        type=int,
        nargs="+",
        default=[50, 100],
        help="checkpoints of the other betas (default: --steps)",
    )
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--betas", type=float, nargs="+", default=[0.1, 0.5])
    parser.add_argument("--headline-beta", type=float, default=0.5)
    parser.add_argument("--headline-steps", type=int, default=80)
    parser.add_argument("--overopt", type=float, nargs=2, default=[0.05, 1e-3], metavar=("BETA", "LR"))
    parser.add_argument("--trl-seeds", type=int, default=3, help="0: skip TRL")
    parser.add_argument("--trl-exclude-heldout", action="store_true", default=True)
    parser.add_argument("--overopt-steps", type=int, nargs="+", default=[25, 50])
    parser.add_argument("--skip-dtype", action="store_true")
    parser.add_argument("--skip-genlogprobs", action="store_true")
    parser.add_argument("--skip-rules", action="store_true")
    parser.add_argument(
        "--only-rules",
        action="store_true",
        help="run only the rules-strategy arm and add it to the existing --out file (its headline as the comparison)",
    )
    parser.add_argument("--workdir", default=str(REPO / ".cache" / "bench-learning"))
    parser.add_argument("--models", default=str(REPO / ".cache" / "models"))
    parser.add_argument("--out", default=str(RESULTS / "learning.json"))
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)

    import torch

    from localdev import reviews
    from localdev.experiment import evaluate_policy

    torch.set_num_threads(2)
    started = time.monotonic()
    result: dict = {
        **stamp(),
        "settings": vars(args),
    }
    out = Path(args.out)
    if out.exists():  # the rounds comparison (`make bench-rounds`) lives in the same file: kept
        kept = json.loads(out.read_text()).get("rounds")
        if kept:
            result["rounds"] = kept

    def checkpoint_result() -> None:
        if "headline" in result:
            result["summary"] = summary_of(result)
        result["wall_s"] = round(time.monotonic() - started, 1)
        _save(result, out)
        if "sweep" in result:
            plot(result, out.with_suffix(".png"))

    if args.only_rules:
        if not out.exists():
            raise SystemExit(f"bench.learning --only-rules: {out} does not exist; run the whole bench first")
        result = json.loads(out.read_text())
        with PipelineRun(Path(args.workdir), Path(args.models), args.verbose) as run:
            _say("[9] the rules strategy: the same experiment labelled by the exact rule")
            rules_arm(run, args, result)
        result["rules"]["measured"] = {**stamp(), "wall_s": round(time.monotonic() - started, 1)}
        _save(result, out)
        plot(result, out.with_suffix(".png"))
        _say(json.dumps({k: v for k, v in result["rules"].items() if k != "runs"}, indent=1))
        return 0

    with PipelineRun(Path(args.workdir), Path(args.models), args.verbose) as run:
        _say(f"[1] pipeline: stack, refscore (float32) on {run.reference.name}")
        address = run.start_refscore()
        fp = run.fingerprint(address)
        result["reference"] = _point(
            evaluate_policy(run.reference, refscore=address, samples=args.eval_samples, seed=args.eval_seed), step=0
        )
        ref = result["reference"]
        _say(f"  reference: positive {ref['positive_share']:.3f}, reward {ref['reward_mean']:+.4f}, KL {ref['kl']:.4f}")
        t0 = time.monotonic()
        openings = reviews.review_prompts(args.prompts, seed=0, split="held_in")
        summaries = run.label(address, openings, args.k)
        pairs = run.pair_count()
        scored = run.wait_scored(fp, pairs)
        args.pairs_made = pairs
        prefix = run.shard_prefix(fp)
        result["pipeline"] = {
            "prompts": len(openings),
            "k": args.k,
            "labeler": summaries,
            "pairs": pairs,
            "scored": scored,
            "prefix": prefix,
            "fingerprint": fp.fingerprint_id,
            "wall_s": round(time.monotonic() - t0, 1),
        }
        _say(f"  {pairs} pairs, {scored} scored under {prefix} ({result['pipeline']['wall_s']} s)")
        checkpoint_result()

        _say(f"[2] headline: beta {args.headline_beta} replaying the shards, steps {args.steps}")
        result["sweep"] = []

        def beta_sweep(beta: float, steps: list[int]) -> None:
            result["sweep"].append(sweep_run(run, address, prefix, f"beta{beta}", beta, args.lr, steps, args))

        beta_sweep(args.headline_beta, args.steps)
        result["headline"] = next(p for p in result["sweep"][-1]["points"] if p["step"] == args.headline_steps)
        result["headline_run"] = {"beta": args.headline_beta, "lr": args.lr, "steps": args.headline_steps, "batch": 32}
        checkpoint_result()

        # The parts the issue asks most come first: a run stopped early keeps them.
        _say("[3] best-of-n from the reference")

        def bon() -> None:
            result["best_of_n"] = best_of_n(run.reference, run.reward, [2, 4, 16], args.eval_samples, args.eval_seed)

        _optional(result, "best_of_n", bon)
        checkpoint_result()

        _say("[4] TRL with a live reference, and our seeds of the headline setting (interleaved)")
        result["ours_seeds"] = [dict(result["headline"], seed=0)]
        if args.trl_seeds:
            result["trl"] = {"runs": [], "trl_version": __import__("trl").__version__}
        for seed in range(max(1, args.trl_seeds)):

            def trl(seed: int = seed) -> None:
                point = trl_live_reference(
                    run, prefix, address, args.headline_beta, args.lr, args.headline_steps, seed, args
                )
                result["trl"]["runs"].append(point)
                _say(
                    f"  TRL seed {seed}: positive {point['positive_share']:.3f}, reward {point['reward_mean']:+.4f} "
                    f"+- {point['reward_se']:.4f}, KL {point['kl']:.3f} +- {point['kl_se']:.3f}"
                )

            def ours(seed: int = seed) -> None:
                r = sweep_run(
                    run,
                    address,
                    prefix,
                    f"seed{seed}",
                    args.headline_beta,
                    args.lr,
                    [args.headline_steps],
                    args,
                    seed=seed,
                )
                result["ours_seeds"].append(dict(r["points"][0], seed=seed, wall_s=r["wall_s"]))

            if args.trl_seeds:
                _optional(result, f"trl_seed{seed}", trl)
                checkpoint_result()
            if seed > 0:
                _optional(result, f"ours_seed{seed}", ours)
                checkpoint_result()

        _say(f"[5] over-optimisation: beta {args.overopt[0]}, lr {args.overopt[1]}, steps {args.overopt_steps}")

        def overopt() -> None:
            beta, lr = args.overopt
            result["sweep"].append(sweep_run(run, address, prefix, "overopt", beta, lr, args.overopt_steps, args))

        _optional(result, "overopt", overopt)
        checkpoint_result()

        def dtype() -> None:
            # the same pairs topic, scored again by a bfloat16 refscore worker (its own group and fingerprint)
            bf16_fp = run.fingerprint(run.start_refscore(dtype="bfloat16"))
            run.wait_scored(bf16_fp, pairs)
            r = sweep_run(
                run,
                address,
                run.shard_prefix(bf16_fp),
                "bf16",
                args.headline_beta,
                args.lr,
                [args.headline_steps],
                args,
                extra=["--reference-dtype", "bfloat16", "--allow-fingerprint", bf16_fp.fingerprint_id],
            )
            p, head = r["points"][0], result["headline"]
            result["dtype"] = {
                "runs": [dict(p, dtype="bfloat16", wall_s=r["wall_s"], fingerprint=bf16_fp.fingerprint_id)],
                "fp32_headline": {k: head[k] for k in ("reward_mean", "reward_se", "kl", "kl_se")},
                "reward_diff_se": round(
                    (p["reward_mean"] - head["reward_mean"]) / math.hypot(p["reward_se"], head["reward_se"]), 2
                ),
                "kl_diff": round(p["kl"] - head["kl"], 4),
            }

        if not args.skip_dtype:
            _say("[6] bfloat16-scored references, same pairs and settings")
            _optional(result, "dtype", dtype)
            checkpoint_result()

        def generation_logprobs() -> None:
            # the seed's claim: the sampled tokens' log-probs from Generate instead of scoring the answers
            gen_prefix = "genlogprobs/"
            counts = run.write_generation_shards(fp, gen_prefix)
            _say(f"  generation log-probs: {counts}")
            result["generation_logprobs"] = {"per_answer": counts}
            if counts["replaced"] and not counts["id_mismatch"] and counts["max_abs_token_diff"] == 0.0:
                # bit-identical references: the replay would be the headline run again
                result["generation_logprobs"]["not_trained"] = (
                    "every generation log-prob equals the scored one exactly, so the shards are identical "
                    "in content to the scored ones and training on them repeats the headline run"
                )
                return
            r = sweep_run(
                run,
                address,
                gen_prefix + prefix[len("scores/") :],
                "genlogprobs",
                args.headline_beta,
                args.lr,
                [args.headline_steps],
                args,
            )
            p, head = r["points"][0], result["headline"]
            result["generation_logprobs"] = {
                "runs": [dict(p, reference="generation log-probs", wall_s=r["wall_s"])],
                "per_answer": counts,
                "scored_headline": {k: head[k] for k in ("reward_mean", "reward_se", "kl", "kl_se")},
                "reward_diff_se": round(
                    (p["reward_mean"] - head["reward_mean"]) / math.hypot(p["reward_se"], head["reward_se"]), 2
                ),
                "kl_diff": round(p["kl"] - head["kl"], 4),
            }

        if not args.skip_genlogprobs:
            _say("[7] reference log-probs from generation instead of scoring, same pairs and settings")
            _optional(result, "generation_logprobs", generation_logprobs)
            checkpoint_result()

        for beta in [b for b in args.betas if b != args.headline_beta]:
            _say(f"[8] beta {beta} sweep, steps {args.sweep_steps or args.steps}")
            _optional(result, f"beta{beta}", lambda beta=beta: beta_sweep(beta, args.sweep_steps or args.steps))
            checkpoint_result()

        def rules() -> None:
            # its own topics and refscore on the same local stack
            with PipelineRun(Path(args.workdir), Path(args.models), args.verbose, stack=run.stack) as rules_run:
                rules_arm(rules_run, args, result)

        if not args.skip_rules:
            _say("[9] the rules strategy: the same experiment labelled by the exact rule")
            _optional(result, "rules", rules)
            checkpoint_result()
    _say(json.dumps(result.get("summary"), indent=1))
    _say(f"wrote {out} and {out.with_suffix('.png')} in {result['wall_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
