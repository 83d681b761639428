"""Experiment trackers: the scalars of metrics.jsonl (training and eval lines) and the run's configuration
sent to TensorBoard, MLflow or Weights & Biases, as transformers' `report_to` does.

Each tracker's package is imported only when `report_to` names it, so none is a dependency of the trainer;
a missing one is a ConfigError at start-up that names the extra to install. Only rank 0 logs (where
MetricsLog lives). Settings: the `trackers:` section of a config file, OFFDPO_TRAINER_REPORT_TO and the
other variables below, or the flags --report-to, --tracker-dir, ...
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
from pathlib import Path
from typing import Any, Protocol

from offdpo.config import ConfigError, EnvConfig, KafkaConfig, S3Config, config_params, env, resolved_config_yaml

log = logging.getLogger("offdpo.trainer")

TRACKERS = ("tensorboard", "mlflow", "wandb")
# report_to name -> (module to import, the pyproject extra that installs it)
_PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow"), "wandb": ("wandb", "wandb")}
WANDB_MODES = ("offline", "online", "disabled")
# The metrics a tracker's run comparison shows first (TensorBoard's HParams table).
SUMMARY_METRICS = ("loss", "rewards/accuracies", "eval/loss", "eval/rewards/accuracies")


@dataclasses.dataclass(frozen=True, repr=False)
class TrackerConfig(EnvConfig):
    report_to: tuple = env(
        "OFFDPO_TRAINER_REPORT_TO", (), f"experiment trackers to log to, comma-separated: {', '.join(TRACKERS)}"
    )
    tracker_dir: str = env(
        "OFFDPO_TRAINER_TRACKER_DIR", "", "TensorBoard event folder (default: <log_dir>/<run_name>/tb)"
    )
    mlflow_tracking_uri: str = env(
        "OFFDPO_TRAINER_MLFLOW_TRACKING_URI",
        "",
        "MLflow tracking URI, e.g. http://mlflow:5000 or file:///data/mlruns (default: MLflow's, MLFLOW_TRACKING_URI)",
    )
    mlflow_experiment: str = env("OFFDPO_TRAINER_MLFLOW_EXPERIMENT", "offdpo", "MLflow experiment name")
    wandb_project: str = env("OFFDPO_TRAINER_WANDB_PROJECT", "offdpo", "Weights & Biases project")
    wandb_mode: str = env(
        "OFFDPO_TRAINER_WANDB_MODE",
        "offline",
        "Weights & Biases mode: offline (files under <log_dir>/<run_name>/wandb; `wandb sync` uploads them), online",
    )

    def __post_init__(self) -> None:
        unknown = [t for t in self.report_to if t not in TRACKERS]
        if unknown:
            raise ConfigError(f"report_to: {', '.join(map(repr, unknown))}: expected any of {', '.join(TRACKERS)}")
        if self.wandb_mode not in WANDB_MODES:
            raise ConfigError(f"wandb_mode: {self.wandb_mode!r}: expected one of {', '.join(WANDB_MODES)}")


def check_installed(cfg: TrackerConfig) -> None:
    """Refuse at start-up, before the model loads, a tracker whose package is not installed."""
    for name in cfg.report_to:
        module, extra = _PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(_missing(name, module, extra))


def _missing(name: str, module: str, extra: str) -> str:
    return f"report_to {name} needs the `{module}` package: pip install -e '.[{extra}]' (or pip install {module})"


def _scalars(values: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in values.items() if isinstance(v, int | float) and not isinstance(v, bool)}


class Tracker(Protocol):
    def log_scalars(self, step: int, values: dict[str, float]) -> None: ...
    def close(self) -> None: ...


class TensorBoardTracker:
    """torch.utils.tensorboard: one scalar per key and step; the configuration as hparams and as text."""

    def __init__(self, folder: Path, resume_step: int, params: dict[str, Any], config_text: str):
        try:
            from torch.utils.tensorboard import SummaryWriter
            from torch.utils.tensorboard.summary import hparams
        except ImportError as exc:
            raise ConfigError(_missing("tensorboard", "tensorboard", "tensorboard")) from exc
        # After a crash the steps past the checkpoint are redone: purge their events (metrics.jsonl drops
        # its lines past the checkpoint for the same reason).
        self.writer = SummaryWriter(str(folder), purge_step=resume_step + 1 if resume_step else None)
        hp = {k: v if isinstance(v, int | float | str | bool) else ",".join(map(str, v)) for k, v in params.items()}
        for summary in hparams(hp, dict.fromkeys(SUMMARY_METRICS, 0.0)):
            self.writer._get_file_writer().add_summary(summary)  # this run's folder (add_hparams makes a sub-run)
        self.writer.add_text("config", "```yaml\n" + config_text + "```", resume_step)
        self.folder = folder

    def log_scalars(self, step: int, values: dict[str, float]) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        self.writer.close()


class MLflowTracker:
    """mlflow: metrics by step, the configuration as params and as a config.yaml artifact. A restarted run
    (same run_name, resumed from its checkpoint) continues its MLflow run."""

    def __init__(self, cfg: TrackerConfig, run_name: str, resume_step: int, params: dict[str, Any], text: str):
        try:
            import mlflow
        except ImportError as exc:
            raise ConfigError(_missing("mlflow", "mlflow", "mlflow")) from exc
        self.mlflow = mlflow
        if cfg.mlflow_tracking_uri:
            mlflow.set_tracking_uri(cfg.mlflow_tracking_uri)
        experiment = mlflow.set_experiment(cfg.mlflow_experiment)
        run_id = None
        if resume_step:
            runs = mlflow.tracking.MlflowClient().search_runs(
                [experiment.experiment_id],
                filter_string=f"tags.`offdpo.run_name` = '{run_name}'",
                order_by=["attributes.start_time DESC"],
                max_results=1,
            )
            run_id = runs[0].info.run_id if runs else None
        self.run = mlflow.start_run(run_id=run_id, run_name=None if run_id else run_name)
        mlflow.set_tag("offdpo.run_name", run_name)
        if run_id is None:  # params cannot change once logged; a resumed run has them
            mlflow.log_params({k: ",".join(map(str, v)) if isinstance(v, tuple) else v for k, v in params.items()})
        mlflow.log_text(text, f"config-step{resume_step}.yaml")

    def log_scalars(self, step: int, values: dict[str, float]) -> None:
        self.mlflow.log_metrics(values, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


class WandbTracker:
    """wandb (offline by default: no account, files under <log_dir>/<run_name>/wandb): the run id is the
    run name, so a restarted run continues its W&B run; W&B keeps only increasing steps, so steps redone
    after a crash are not logged twice there."""

    def __init__(self, cfg: TrackerConfig, run_name: str, folder: Path, params: dict[str, Any]):
        try:
            import wandb
        except ImportError as exc:
            raise ConfigError(_missing("wandb", "wandb", "wandb")) from exc
        folder.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=cfg.wandb_project,
            name=run_name,
            id=run_name,
            resume="allow",
            mode=cfg.wandb_mode,
            dir=str(folder),
            config={k: list(v) if isinstance(v, tuple) else v for k, v in params.items()},
        )

    def log_scalars(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class Trackers:
    """The trackers `report_to` names, fed by MetricsLog.log/log_eval; closing twice is harmless."""

    def __init__(self, trackers: list[Tracker]):
        self.trackers = trackers

    def log_scalars(self, step: int, values: dict[str, Any]) -> None:
        scalars = _scalars(values)
        for t in self.trackers:
            t.log_scalars(step, scalars)

    def close(self) -> None:
        trackers, self.trackers = self.trackers, []
        for t in trackers:
            t.close()


def tensorboard_dir(cfg: TrackerConfig, log_dir: str, run_name: str) -> Path:
    return Path(cfg.tracker_dir) if cfg.tracker_dir else Path(log_dir) / run_name / "tb"


def open_trackers(
    cfg: TrackerConfig,
    trainer_cfg: Any,
    s3: S3Config,
    kafka: KafkaConfig,
    resume_step: int = 0,
) -> Trackers | None:
    """The trackers of `cfg.report_to` (None if it names none), each given the run's configuration.
    `trainer_cfg` is the run's TrainerConfig (its log_dir and run_name place the local files)."""
    if not cfg.report_to:
        return None
    params = config_params(trainer_cfg, kafka=kafka, s3=s3, trackers=cfg)
    text = resolved_config_yaml(trainer_cfg, kafka, s3, trackers=cfg)
    run_name, log_dir = trainer_cfg.run_name, trainer_cfg.log_dir
    opened: list[Tracker] = []
    try:
        for name in dict.fromkeys(cfg.report_to):
            if name == "tensorboard":
                opened.append(TensorBoardTracker(tensorboard_dir(cfg, log_dir, run_name), resume_step, params, text))
            elif name == "mlflow":
                opened.append(MLflowTracker(cfg, run_name, resume_step, params, text))
            else:
                opened.append(WandbTracker(cfg, run_name, Path(log_dir) / run_name, params))
            log.info("logging metrics to %s", name)
    except BaseException:
        Trackers(opened).close()
        raise
    return Trackers(opened)
