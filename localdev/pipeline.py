"""The local pipeline: labeler -> Kafka -> refscore -> S3 shards -> trainer, on the embedded stack.

`LocalPipeline` is the wiring that `offdpo run` uses (and that `offdpo demo`, `offdpo rounds`, the
learning bench and the fault harness wire by hand today, issue 27): it starts the local stack unless
one is already up, gives the run its own topics and consumer groups, starts the services as child
processes (each logging to a file of the run's folder), waits for each stage with a bound and a
message that says what did not happen, and always stops what it started (a stack it found running is
left running).

    with LocalPipeline(workdir) as pipe:
        refscore = pipe.start_refscore(model_dir, engine="transformers")
        summary = pipe.label_file(data, kind="preferences")
        scored = pipe.wait_scored(pipe.labelled_ids(), refscore)
        pipe.stop(refscore)                       # the trainer gets the machine to itself
        trained = pipe.train(model_dir, refscore.fingerprint, config_file=...)

`run_on_local_stack` is `offdpo run` (cli/run.py): one user's model folder and one preference file
(TRL's prompt/chosen/rejected columns; or candidate sets or human judgements with `labels`) through
the whole pipeline, returning the report it prints. The services' own code is never imported here
(localdev sits beside services in the layers): they are run as `python -m services.<name>`.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from localdev.process import free_port, stop_process, wait_until
from localdev.stack import LocalStack
from offdpo import records
from offdpo.config import KafkaConfig
from offdpo.kafka import ensure_topics, read_topic
from offdpo.s3 import ObjectStore
from offdpo.v1 import records_pb2

REPO = Path(__file__).resolve().parent.parent

# The local broker joins a consumer group in ~3 s with these, ~23 s with kafka-python's defaults.
FAST_GROUPS = {
    "OFFDPO_KAFKA_SESSION_TIMEOUT_MS": "6000",
    "OFFDPO_KAFKA_HEARTBEAT_MS": "1000",
    "OFFDPO_KAFKA_MAX_POLL_INTERVAL_MS": "120000",
}

# `labels` of run_on_local_stack -> (the labeler's input kind, its strategy). None: TRL preference rows.
LABELS: dict[str | None, tuple[str, str]] = {
    None: ("preferences", ""),
    "human": ("annotations", ""),
    "rules": ("candidates", "rules"),
    "reward_model": ("candidates", "reward_model"),
    "llm_judge": ("candidates", "llm_judge"),
}

# Trainer settings `offdpo run` chooses unless the --config file says otherwise: the trainer's own
# defaults, plus pairs held out for the held-out accuracy the report shows.
RUN_DEFAULTS: dict[str, Any] = {"eval_fraction": 0.1, "eval_every": 50, "progress": False}
# Settings the pipeline sets itself (the flags it passes override a --config file's values).
OWNED = ("model", "run_name", "mode", "prefix", "reference_model", "reference_model_id", "reference_dtype", "log_dir")


class PipelineError(RuntimeError):
    """A stage of the local pipeline failed or did not finish in time; the message says which and
    where its log is."""


@dataclasses.dataclass(frozen=True)
class Waits:
    """Bounds on each wait, in seconds. The scoring and training waits are on progress: they fail after
    `stall_s` without any (no new scored pair; the trainer's log and metrics unchanged)."""

    start_s: float = 600.0  # refscore loading the model until it answers
    label_s: float = 3600.0  # the labeler through the whole file
    stall_s: float = 600.0  # scoring or training without progress


@dataclasses.dataclass
class Service:
    """A child process of the pipeline and its log."""

    name: str
    proc: subprocess.Popen
    log: Path
    address: str = ""
    fingerprint: Any = None  # refscore: the ReferenceFingerprint it stamps on its scores

    def check_alive(self, expect_zero: bool = False) -> None:
        """PipelineError with the log's tail if it exited (with expect_zero: exited non-zero)."""
        code = self.proc.poll()
        if code is not None and (code != 0 or not expect_zero):
            raise PipelineError(f"{self.name} exited with code {code}; log {self.log}, tail:\n{log_tail(self.log)}")


def log_tail(path: Path, chars: int = 3000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"


def default_engine() -> str:
    """refscore's engine for a local run: OFFDPO_REFSCORE_ENGINE when set; vLLM with a GPU; else
    transformers (it starts in seconds on the CPU, where vLLM takes a minute)."""
    if os.environ.get("OFFDPO_REFSCORE_ENGINE"):
        return os.environ["OFFDPO_REFSCORE_ENGINE"]
    if importlib.util.find_spec("vllm") is not None:
        import torch

        if torch.cuda.is_available():
            return "vllm"
    return "transformers"


def has_chat_template(model_dir: Path) -> bool:
    """Whether the model folder carries a chat template (conversational rows need one)."""
    if (model_dir / "chat_template.jinja").exists() or (model_dir / "chat_template.json").exists():
        return True
    try:
        return bool(json.loads((model_dir / "tokenizer_config.json").read_text()).get("chat_template"))
    except (OSError, ValueError):
        return False


class LocalPipeline:
    """One run on the local stack: its own topics (`<run_name>.pairs`, ...), groups and folder."""

    def __init__(
        self,
        workdir: Path,
        run_name: str = "",
        stack: LocalStack | None = None,
        waits: Waits = Waits(),
        say: Callable[[str], None] = lambda msg: print(msg, flush=True),
        environ: Mapping[str, str] | None = None,
        verbose: bool = False,
    ):
        self.run_name = run_name or f"run-{uuid.uuid4().hex[:6]}"
        self.workdir = (Path(workdir) / self.run_name).resolve()
        self.stack = stack or LocalStack()
        self.waits = waits
        self.say = say
        self.verbose = verbose  # the broker's refused connections while the stack starts
        self.environ = dict(os.environ if environ is None else environ)
        self.topics = {
            "OFFDPO_TOPIC_PAIRS": f"{self.run_name}.pairs",
            "OFFDPO_TOPIC_SHARDS": f"{self.run_name}.shards",
            "OFFDPO_TOPIC_DEADLETTER": f"{self.run_name}.deadletter",
            "OFFDPO_TOPIC_CANDIDATES": f"{self.run_name}.candidates",
        }
        self.started_stack = False
        self.services: list[Service] = []
        self._kafka: KafkaConfig | None = None
        self._store: ObjectStore | None = None

    # -- the stack and the run's topics ----------------------------------------------------------
    def start(self) -> LocalPipeline:
        """Start the stack unless it is up (then it is left running at the end), create the topics."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self.stack.is_up():
            from localdev.experiment import stack_up_quietly

            self.started_stack = True  # before up(): a half-started stack is stopped too
            stack_up_quietly(self.stack, self.verbose)
        kafka = self.kafka
        ensure_topics(
            kafka, [kafka.pairs_topic, kafka.shards_topic, kafka.deadletter_topic], self.stack.stack.partitions
        )
        self.store.ensure_bucket()
        return self

    def env(self, **extra: str) -> dict[str, str]:
        """The services' environment: the caller's, pointed at the stack and this run's topics."""
        return {
            **self.environ,
            **self.stack.env(),
            **FAST_GROUPS,
            **self.topics,
            "PYTHONPATH": str(REPO),
            **extra,
        }

    @property
    def kafka(self) -> KafkaConfig:
        if self._kafka is None:
            self._kafka = self.stack.kafka.from_env(self.env())
        return self._kafka

    @property
    def store(self) -> ObjectStore:
        if self._store is None:
            self._store = ObjectStore(self.stack.s3)
        return self._store

    def close(self) -> None:
        """Stop every service this pipeline started, then the stack if it started it."""
        for service in reversed(self.services):
            stop_process(service.proc)
        self.services.clear()
        if self.started_stack:
            self.stack.down()
            self.started_stack = False

    def __enter__(self) -> LocalPipeline:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- services --------------------------------------------------------------------------------
    def spawn(self, name: str, args: list[str], env: Mapping[str, str]) -> Service:
        """`python <args>` in the repository, its output appended to <workdir>/<name>.log."""
        log = self.workdir / f"{name}.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                [sys.executable, *args], env=dict(env), cwd=REPO, stdout=out, stderr=subprocess.STDOUT
            )
        service = Service(name, proc, log)
        self.services.append(service)
        return service

    def stop(self, service: Service) -> int | None:
        code = stop_process(service.proc)
        if service in self.services:
            self.services.remove(service)
        return code

    def start_refscore(
        self, model_dir: str | Path, engine: str = "transformers", wait: bool = True, **extra: str
    ) -> Service:
        """refscore on `model_dir` (gRPC on a free loopback port + the stream worker scoring this run's
        pairs topic). With `wait`, returns once it answers, its fingerprint read."""
        port = free_port()
        env = self.env(
            OFFDPO_REFSCORE_MODEL_DIR=str(model_dir),
            OFFDPO_REFSCORE_ENGINE=engine,
            OFFDPO_REFSCORE_PORT=str(port),
            OFFDPO_REFSCORE_METRICS_PORT="0",
            OFFDPO_REFSCORE_GROUP=f"{self.run_name}-refscore",
            OFFDPO_REFSCORE_BATCH_WAIT_S=self.environ.get("OFFDPO_REFSCORE_BATCH_WAIT_S", "0.5"),
            OFFDPO_REFSCORE_MODEL_CACHE=str(self.workdir / "refscore-model-cache"),
            # local development on loopback: explicitly plaintext and without team tokens
            OFFDPO_REFSCORE_PLAINTEXT="true",
            OFFDPO_REFSCORE_ALLOW_ANONYMOUS="true",
            **extra,
        )
        service = self.spawn("refscore", ["-m", "services.refscore", "serve", "--worker"], env)
        service.address = f"127.0.0.1:{port}"
        if wait:
            self.wait_serving(service)
        return service

    def wait_serving(self, refscore: Service) -> Any:
        """Wait until refscore answers; returns (and keeps) the fingerprint it stamps on scores."""
        from offdpo.refscore_client import RefscoreClient

        if refscore.fingerprint is None:
            with RefscoreClient(refscore.address) as client:

                def serving() -> bool:
                    client.wait_serving(timeout_s=1)
                    return True

                wait_until(
                    serving,
                    self.waits.start_s,
                    f"refscore serving {refscore.address}",
                    every_s=0.5,
                    proc=refscore.proc,
                    log=refscore.log,
                )
                refscore.fingerprint = client.model_info().fingerprint
        return refscore.fingerprint

    def label_file(
        self, path: str | Path, kind: str = "preferences", strategy: str = "", args: tuple[str, ...] = (), **extra: str
    ) -> dict[str, dict[str, int]]:
        """`python -m services.labeler label PATH --kind KIND`: its pairs to this run's pairs topic, its
        malformed inputs to the dead-letter topic with their reasons. Returns the labeler's summary."""
        cmd = ["-m", "services.labeler", "label", str(path), "--kind", kind, "--no-ledger"]
        cmd += ["--state-dir", str(self.workdir / "labeler"), *(("--strategy", strategy) if strategy else ()), *args]
        service = self.spawn("labeler", cmd, self.env(**extra))
        try:
            service.proc.wait(timeout=self.waits.label_s)
        except subprocess.TimeoutExpired:
            raise PipelineError(
                f"the labeler did not finish {path} within {self.waits.label_s:.0f} s; log {service.log}"
            ) from None
        finally:
            self.stop(service)
        service.check_alive(expect_zero=True)
        # Its last line of output is the JSON summary (python -m services.labeler label).
        for line in reversed(service.log.read_text(errors="replace").splitlines()):
            if line.startswith("{") and '"summary"' in line:
                return json.loads(line)["summary"]
        raise PipelineError(f"the labeler printed no summary; log {service.log}")

    # -- what the topics and the bucket hold -----------------------------------------------------
    def labelled_ids(self) -> set[str]:
        """Distinct pair ids on this run's pairs topic."""
        return {
            records.PreferencePair.FromString(r.value).pair_id for r in read_topic(self.kafka, self.kafka.pairs_topic)
        }

    def dead_letters(self, idle_s: float = 2.0) -> list[records_pb2.DeadLetter]:
        return [
            records_pb2.DeadLetter.FromString(r.value)
            for r in read_topic(self.kafka, self.kafka.deadletter_topic, idle_s=idle_s)
        ]

    def scores_prefix(self, fingerprint: Any) -> str:
        return f"scores/{fingerprint.fingerprint_id}/{self.kafka.pairs_topic}/"

    def scored_ids(self, fingerprint: Any) -> list[str]:
        """Pair ids of every row refscore wrote for this run under `fingerprint` (duplicates kept)."""
        prefix = self.scores_prefix(fingerprint)
        return [
            pid
            for key in self.store.list_keys(prefix)
            for pid in records.read_shard(self.store.get_bytes(key), key).pair_ids
        ]

    def wait_scored(self, labelled: set[str], refscore: Service) -> list[str]:
        """Wait until every labelled pair is scored into S3 or dead-lettered by refscore; returns the
        scored ids. Fails after `stall_s` without a new one, or at once if refscore exits."""
        fingerprint = self.wait_serving(refscore)
        done: set[str] = set()
        last = [0, time.monotonic()]

        def finished() -> bool:
            refscore.check_alive()
            done.clear()
            done.update(self.scored_ids(fingerprint))
            done.update(dead_pair_ids(self.dead_letters(idle_s=0.5), "refscore"))
            if len(done) > last[0]:
                last[:] = [len(done), time.monotonic()]
            elif time.monotonic() - last[1] > self.waits.stall_s:
                raise PipelineError(
                    f"refscore scored nothing new for {self.waits.stall_s:.0f} s ({len(done & labelled)} of "
                    f"{len(labelled)} pairs scored or dead-lettered); log {refscore.log}"
                )
            return done >= labelled

        while not finished():  # PipelineError is not "not yet" here, unlike in wait_until
            time.sleep(1.0)
        return self.scored_ids(fingerprint)

    # -- training --------------------------------------------------------------------------------
    def trainer_config(self, user_config: str | Path | None, defaults: Mapping[str, Any]) -> Path:
        """The trainer's --config file: `defaults` overlaid by the user's file (top-level settings and
        the `kafka:`/`s3:`/`trackers:` sections key by key); the trainer validates the result."""
        import yaml

        merged: dict[str, Any] = {k: (dict(v) if isinstance(v, dict) else v) for k, v in defaults.items()}
        if user_config:
            given = yaml.safe_load(Path(user_config).read_text()) or {}
            for key, value in given.items():
                if isinstance(value, dict) and isinstance(merged.get(key), dict):
                    merged[key].update(value)
                else:
                    merged[key] = value
        path = self.workdir / "trainer-config.yaml"
        path.write_text(yaml.safe_dump(merged, sort_keys=False))
        return path

    def train(
        self,
        model_dir: str | Path,
        fingerprint: Any,
        config_file: Path | None = None,
        flags: tuple[str, ...] = (),
        **extra: str,
    ) -> Service:
        """The trainer in replay mode over this run's scored shards (every pair scored by then), from
        `model_dir` against the reference refscore stamped; returns once it exited 0."""
        run = self.run_name
        cmd = ["-m", "services.trainer", *(("--config", str(config_file)) if config_file else ())]
        cmd += [
            "--model",
            str(model_dir),
            "--run-name",
            run,
            "--mode",
            "replay",
            "--prefix",
            self.scores_prefix(fingerprint),
        ]
        cmd += ["--reference-model-id", fingerprint.model_id, "--reference-dtype", fingerprint.dtype]
        cmd += ["--log-dir", str(self.trainer_dir.parent), "--no-resume", *flags]
        service = self.spawn("trainer", cmd, self.env(OFFDPO_TRAINER_PROGRESS="false", **extra))
        self.wait_exit(service, lambda: (_size(service.log), _size(self.trainer_dir / "metrics.jsonl")))
        return service

    @property
    def trainer_dir(self) -> Path:
        """The trainer's metrics.jsonl, trained_pairs.jsonl, curves.png and (by default) tb/."""
        return self.workdir / "trainer" / self.run_name

    def wait_exit(self, service: Service, progress: Callable[[], object]) -> None:
        """Wait for `service` to exit 0; PipelineError after `stall_s` without `progress()` changing."""
        seen, since = progress(), time.monotonic()
        while service.proc.poll() is None:
            try:
                service.proc.wait(timeout=2.0)
            except subprocess.TimeoutExpired:
                now = progress()
                if now != seen:
                    seen, since = now, time.monotonic()
                elif time.monotonic() - since > self.waits.stall_s:
                    self.stop(service)
                    raise PipelineError(
                        f"{service.name} made no progress for {self.waits.stall_s:.0f} s and was stopped; log {service.log}"
                    ) from None
        if service in self.services:
            self.services.remove(service)
        service.check_alive(expect_zero=True)

    def checkpoint(self) -> str:
        """The S3 prefix of the run's final checkpoint (runs/<run>/checkpoints/step-N)."""
        from offdpo.s3 import safe_key_part

        key = f"runs/{safe_key_part(self.run_name, 'run name')}/latest"
        if not self.store.exists(key):
            raise PipelineError(
                f"the trainer wrote no checkpoint ({key} is missing); log {self.workdir / 'trainer.log'}"
            )
        return str(json.loads(self.store.get_bytes(key))["prefix"])

    def download(self, prefix: str, folder: str, dest: Path) -> Path:
        """Every object under <prefix>/<folder>/ into `dest` (keys checked to stay inside it)."""
        root = f"{prefix}/{folder}/"
        dest = dest.resolve()
        for key in self.store.list_keys(root):
            path = (dest / key[len(root) :]).resolve()
            if not path.is_relative_to(dest):
                raise PipelineError(f"checkpoint object {key!r} would be written outside {dest}")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(self.store.get_bytes(key))
        return dest


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return -1


def dead_pair_ids(letters: list[records_pb2.DeadLetter], service: str) -> set[str]:
    """Pair ids of `service`'s dead letters whose original record decodes as a pair."""
    ids = set()
    for dl in letters:
        if dl.service == service and dl.original_value:
            try:
                ids.add(records.PreferencePair.FromString(dl.original_value).pair_id)
            except Exception:  # noqa: BLE001 - an undecodable record has no pair id
                pass
    return ids


def jsonl(path: Path) -> list[dict[str, Any]]:
    """The complete lines of a JSONL log (a line being written is skipped)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


# -- offdpo run ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RunSettings:
    """What `offdpo run` was asked (cli/run.py)."""

    model: Path
    data: Path
    labels: str | None = None  # None: TRL preference rows; else a key of LABELS
    steps: int = 0  # 0: one pass (the config's epochs); N: stop after N optimizer steps
    config: Path | None = None  # the trainer's settings (offdpo train --config format)
    out: Path = Path(".cache/run")
    engine: str = ""  # refscore's engine ("" = default_engine())
    labeler_args: tuple[str, ...] = ()  # e.g. --rules FILE, --reward-model DIR


def trainer_defaults() -> dict[str, Any]:
    """RUN_DEFAULTS, and a TensorBoard log when the package is there (report_to: [] in --config: none)."""
    defaults: dict[str, Any] = dict(RUN_DEFAULTS)
    if importlib.util.find_spec("tensorboard") is not None:
        defaults["trackers"] = {"report_to": ["tensorboard"]}
    return defaults


def run_on_local_stack(settings: RunSettings, pipe: LocalPipeline) -> dict[str, Any]:
    """The whole pipeline for one model folder and one data file on a started LocalPipeline; returns
    the report (also written to <run folder>/report.json)."""
    import yaml

    t0 = time.monotonic()
    model = settings.model.resolve()
    kind, strategy = LABELS[settings.labels]
    engine = settings.engine or default_engine()
    config = pipe.trainer_config(settings.config, trainer_defaults())
    resolved = yaml.safe_load(config.read_text())
    ignored = [k for k in OWNED if k in resolved]
    for key in ignored:
        del resolved[key]
    config.write_text(yaml.safe_dump(resolved, sort_keys=False))

    pipe.say(f"[1/5] refscore on {model} ({engine} engine)")
    refscore = pipe.start_refscore(model, engine=engine, wait=False)
    pipe.say(
        f"[2/5] importing {settings.data} ({kind}{', ' + strategy if strategy else ''}) -> {pipe.kafka.pairs_topic}"
    )
    extra = {}
    if kind == "candidates":  # candidate sets may ask refscore Generate for on-policy answers
        pipe.wait_serving(refscore)
        extra["OFFDPO_LABELER_REFSCORE_ADDR"] = refscore.address
    summary = pipe.label_file(settings.data, kind, strategy, settings.labeler_args, **extra)
    labelled = pipe.labelled_ids()
    if not labelled:
        letters = pipe.dead_letters()
        reasons = "; ".join(dl.reason[:200] for dl in letters[:3])
        raise PipelineError(f"no pair was imported from {settings.data} ({len(letters)} dead-lettered: {reasons})")
    pipe.say(f"      {len(labelled)} pairs on {pipe.kafka.pairs_topic}")

    pipe.say("[3/5] refscore scoring the pairs into S3")
    fingerprint = pipe.wait_serving(refscore)
    scored = pipe.wait_scored(labelled, refscore)
    pipe.stop(refscore)  # the trainer gets the machine to itself
    pipe.say(f"      {len(set(scored))} pairs scored under s3://{pipe.store.bucket}/{pipe.scores_prefix(fingerprint)}")

    pipe.say("[4/5] training (replay of the scored shards)")
    flags: tuple[str, ...] = ()
    if settings.steps:
        # --steps N like TRL's max_steps: N optimizer steps, the data repeated as often as it takes.
        epochs = max(int(resolved.get("epochs", 1)), settings.steps)
        flags = ("--max-steps", str(settings.steps), "--epochs", str(epochs))
    pipe.train(model, fingerprint, config, flags)

    pipe.say("[5/5] the trained model and the report")
    prefix = pipe.checkpoint()
    run_dir = pipe.workdir
    model_dir = pipe.download(prefix, "model", run_dir / "model")
    config_yaml = run_dir / "config.yaml"
    if pipe.store.exists(f"{prefix}/config.yaml"):
        config_yaml.write_bytes(pipe.store.get_bytes(f"{prefix}/config.yaml"))
    report = _report(settings, pipe, summary, labelled, scored, fingerprint, prefix, model_dir, config_yaml, resolved)
    report["ignored_config_settings"] = ignored
    report["elapsed_s"] = round(time.monotonic() - t0, 1)
    (run_dir / "report.json").write_text(json.dumps(report, indent=2))
    report["report"] = str(run_dir / "report.json")
    return report


def _report(
    settings: RunSettings,
    pipe: LocalPipeline,
    summary: dict[str, dict[str, int]],
    labelled: set[str],
    scored: list[str],
    fingerprint: Any,
    prefix: str,
    model_dir: Path,
    config_yaml: Path,
    resolved: dict[str, Any],
) -> dict[str, Any]:
    rows = jsonl(pipe.trainer_dir / "metrics.jsonl")
    steps = [m for m in rows if "loss" in m]
    evals = [m for m in rows if "eval/rewards/accuracies" in m]
    trained = [pid for line in jsonl(pipe.trainer_dir / "trained_pairs.jsonl") for pid in line["pair_ids"]]
    letters = pipe.dead_letters()
    by_kind = collections.Counter(f"{dl.service}/{dl.error_type}" for dl in letters)
    total = summary.get("total", {})
    trackers = resolved.get("trackers") or {}
    tensorboard = None
    if "tensorboard" in (trackers.get("report_to") or []):
        tensorboard = str(Path(trackers["tracker_dir"]) if trackers.get("tracker_dir") else pipe.trainer_dir / "tb")
    card = model_dir / "README.md"
    last_eval = evals[-1] if evals else {}
    return {
        "run_name": pipe.run_name,
        "model": str(settings.model.resolve()),
        "data": str(settings.data.resolve()),
        "labels": settings.labels or "imported (TRL preference rows)",
        "rows": total.get("inputs", 0),
        "pairs_imported": len(labelled),
        "labeler": summary,
        "pairs_scored": len(set(scored)),
        "fingerprint": fingerprint.fingerprint_id,
        "pairs_trained": len(set(trained)),
        "steps": len(steps),
        "final_loss": steps[-1].get("loss") if steps else None,
        "heldout_accuracy": last_eval.get("eval/rewards/accuracies"),
        "heldout_pairs": last_eval.get("eval/pairs"),
        "heldout_loss": last_eval.get("eval/loss"),
        "dead_letters": dict(sorted(by_kind.items())),
        "dead_letter_reasons": [
            {"service": dl.service, "error_type": dl.error_type, "reason": dl.reason} for dl in letters
        ],
        "checkpoint": f"s3://{pipe.store.bucket}/{prefix}/",
        "model_dir": str(model_dir),
        "model_card": str(card) if card.exists() else None,
        "tensorboard": tensorboard,
        "config_yaml": str(config_yaml) if config_yaml.exists() else None,
        "metrics": str(pipe.trainer_dir / "metrics.jsonl"),
        "plot": str(pipe.trainer_dir / "curves.png"),
        "logs": str(pipe.workdir),
        "stack_left_running": not pipe.started_stack,
    }
