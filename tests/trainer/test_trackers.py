"""Experiment trackers (issue 32): a short in-process run with report_to tensorboard (and mlflow where
it is installed) logs the same scalars as metrics.jsonl, eval included, and the run's configuration;
read back with each tool's own reader. A tracker whose package is missing is refused at start-up."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from offdpo.config import ConfigError
from services.trainer import train
from services.trainer.config import TrainerConfig
from services.trainer.metrics import EVAL_KEYS, KEYS
from services.trainer.trackers import TrackerConfig, check_installed, open_trackers
from tests.fakes import FakeObjectStore

from .conftest import reference_fingerprint, scored_pairs, synthetic_tokens, upload_shards


@pytest.fixture
def fake_store(monkeypatch):
    store = FakeObjectStore()
    monkeypatch.setattr(train, "ObjectStore", lambda cfg: store)
    return store


def _train(store, model, tmp_path, trackers: TrackerConfig) -> tuple[TrainerConfig, list[dict]]:
    """Three steps of 8 pairs on the tiny model, a quarter of the pairs held out and evaluated every 2 steps."""
    fp = reference_fingerprint(model)
    upload_shards(store, scored_pairs(model, synthetic_tokens(32, seed=31), fp), fp, "trk", per_shard=16)
    cfg = TrainerConfig(
        model=str(model),
        run_name="tracked",
        log_dir=str(tmp_path / "runs"),
        progress=False,
        warmup_steps=0,
        global_batch_size=8,
        micro_batch_size=8,
        lr=1e-3,
        eval_fraction=0.25,
        eval_every=2,
    )
    summary = train.run(cfg, trackers=trackers)
    assert summary["step"] >= 2
    lines = (tmp_path / "runs" / "tracked" / "metrics.jsonl").read_text().splitlines()
    return cfg, [json.loads(line) for line in lines]


def _series(rows: list[dict], key: str) -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in rows if key in r]


def test_tracker_settings_are_checked():
    with pytest.raises(ConfigError, match="'comet'.*expected any of tensorboard, mlflow, wandb"):
        TrackerConfig(report_to=("comet",))
    with pytest.raises(ConfigError, match="wandb_mode"):
        TrackerConfig(wandb_mode="cloud")
    assert TrackerConfig.from_env({"OFFDPO_TRAINER_REPORT_TO": "tensorboard, wandb"}).report_to == (
        "tensorboard",
        "wandb",
    )
    assert open_trackers(TrackerConfig(), TrainerConfig(), None, None) is None  # type: ignore[arg-type]


def test_a_tracker_whose_package_is_missing_is_refused_before_the_model_loads(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: its import fails
    with pytest.raises(ConfigError, match=r"report_to wandb needs the `wandb` package: pip install -e '\.\[wandb\]'"):
        check_installed(TrackerConfig(report_to=("wandb",)))
    with pytest.raises(ConfigError, match="wandb"):
        open_trackers(
            TrackerConfig(report_to=("wandb",)),
            TrainerConfig(log_dir=str(tmp_path)),
            *(train.S3Config(), train.KafkaConfig()),
        )
    for name in list(__import__("os").environ):
        if name.startswith("OFFDPO_"):
            monkeypatch.delenv(name)
    assert train.main(["--model", str(tmp_path / "no-model-needed"), "--report-to", "wandb"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("trainer: report_to wandb needs the `wandb` package") and err.count("\n") == 1


def test_tensorboard_gets_the_scalars_of_metrics_jsonl_and_the_config(fake_store, tiny_model, tmp_path):
    pytest.importorskip(
        "tensorboard", reason="the `tensorboard` package is not installed (extra: pip install -e '.[tensorboard]')"
    )
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    cfg, rows = _train(fake_store, tiny_model, tmp_path, TrackerConfig(report_to=("tensorboard",)))
    events = EventAccumulator(str(tmp_path / "runs" / "tracked" / "tb"))
    events.Reload()
    logged = set(events.Tags()["scalars"])
    expected = {k for r in rows for k in r if k != "step"}
    assert expected >= set(KEYS) | set(EVAL_KEYS) and logged == expected
    assert _series(rows, "eval/loss"), "the run evaluated"
    for key in expected:  # TensorBoard stores float32: equal to metrics.jsonl's value at that precision
        got = [(e.step, e.value) for e in events.Scalars(key)]
        want = [(step, float(np.float32(v))) for step, v in _series(rows, key)]
        assert got == want, key
    # The configuration: hparams (TensorBoard's HParams tab) and the resolved YAML as text.
    content = events.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hparams = start.session_start_info.hparams
    assert hparams["beta"].number_value == cfg.beta and hparams["model"].string_value == cfg.model
    assert hparams["trackers.report_to"].string_value == "tensorboard" and "s3.secret_key" not in hparams
    (text,) = events.Tensors("config/text_summary")
    assert f"run_name: {cfg.run_name}" in text.tensor_proto.string_val[0].decode()


def test_mlflow_gets_the_same_metrics_and_the_config_as_params(fake_store, tiny_model, tmp_path, monkeypatch):
    pytest.importorskip("mlflow", reason="the `mlflow` package is not installed (extra: pip install -e '.[mlflow]')")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for this to use a local folder
    uri = (tmp_path / "mlruns").as_uri()
    trackers = TrackerConfig(report_to=("mlflow",), mlflow_tracking_uri=uri, mlflow_experiment="offdpo-test")
    cfg, rows = _train(fake_store, tiny_model, tmp_path, trackers)
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("offdpo-test")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.tags["offdpo.run_name"] == "tracked" and run.info.status == "FINISHED"
    for key in ("loss", "rewards/margins", "lr", "eval/loss", "eval/rewards/accuracies"):
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        assert history == _series(rows, key), key
    assert run.data.params["beta"] == str(cfg.beta) and run.data.params["kafka.pairs_topic"] == "offdpo.pairs.v1"
    assert "s3.secret_key" not in run.data.params
    (artifact,) = client.list_artifacts(run.info.run_id)
    assert artifact.path == "config-step0.yaml"
