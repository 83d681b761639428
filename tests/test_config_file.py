"""The trainer's config file (issue 32): `--config run.yaml` for python -m services.trainer and
`offdpo train`, typed and validated; defaults < file < environment < flags; `--print-config` prints a
file that reloads to the same configuration; a bad setting is one line and exit 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from offdpo.config import ConfigError, KafkaConfig, S3Config, resolved_config_yaml
from services.trainer.config import TrainerConfig
from services.trainer.trackers import TrackerConfig
from services.trainer.train import parse_args

ROOT = Path(__file__).resolve().parents[1]
# examples/refscore.yaml and labeler.yaml are the services' files (tests/refscore, tests/labeler load them);
# every other example is a trainer run.
SERVICE_EXAMPLES = {"refscore.yaml", "labeler.yaml"}
EXAMPLES = sorted(p for p in (ROOT / "examples").glob("*.yaml") if p.name not in SERVICE_EXAMPLES)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """The developer's or CI's own OFFDPO_* settings must not leak into what a file resolves to."""
    for name in list(os.environ):
        if name.startswith("OFFDPO_"):
            monkeypatch.delenv(name)


def write(tmp_path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def load(path, *flags: str):
    cfg, ns = parse_args(["--config", str(path), *flags])
    return cfg, ns


def configs(path, *flags: str) -> tuple:
    cfg, ns = load(path, *flags)
    return cfg, ns.kafka_config, ns.s3_config, ns.tracker_config


def error(path, *flags: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(path, *flags)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_the_examples_load_and_say_what_they_are_for():
    assert {p.name for p in EXAMPLES} >= {"demo.yaml", "fsdp-8b.yaml", "lora.yaml"}
    for path in EXAMPLES:
        cfg, kafka, s3, trackers = configs(path)
        raw = yaml.safe_load(path.read_text())
        assert cfg.model and cfg.run_name == raw["run_name"], path.name
    fsdp, kafka, s3, trackers = configs(ROOT / "examples" / "fsdp-8b.yaml")
    assert (fsdp.distributed, fsdp.precision, fsdp.gradient_checkpointing) == ("fsdp", "bf16", True)
    assert kafka.security_protocol == "SASL_SSL" and s3.secure and trackers.report_to == ("tensorboard", "mlflow")
    demo, kafka, _, _ = configs(ROOT / "examples" / "demo.yaml")
    assert (demo.mode, demo.beta, demo.lr, kafka.broker_profile) == ("continuous", 0.5, 2e-4, "tansu")


@pytest.mark.parametrize("name", sorted(SERVICE_EXAMPLES))
def test_the_services_examples_load_with_their_own_command_and_not_the_trainers(name):
    from services.labeler import __main__ as labeler
    from services.refscore import __main__ as refscore

    path = ROOT / "examples" / name
    service, key = {"refscore.yaml": (refscore, "model_dir"), "labeler.yaml": (labeler, "rules_file")}[name]
    settings, _ = service.parse_args(["serve", "--config", str(path)])
    assert getattr(settings[service.CONFIG_FILE.top], key) == yaml.safe_load(path.read_text())[key]
    with pytest.raises(ConfigError, match="unknown setting"):
        load(path)  # a service's file is not a trainer run (and says so)


def test_file_values_are_typed_and_sections_map_to_their_classes(tmp_path):
    path = write(
        tmp_path,
        """
model: /models/m
beta: 1               # a float setting takes an integer
epochs: 3
pack: false
allow_fingerprint: [fp-a, fp-b]
kafka:
  bootstrap_servers: k1:9092,k2:9092
  session_timeout_ms: 6000
s3:
  bucket: mine
  secret_key: from-the-file   # allowed in a file; never printed
trackers:
  report_to: tensorboard,mlflow   # a comma string, as the environment variable
""",
    )
    cfg, kafka, s3, trackers = configs(path)
    assert cfg.beta == 1.0 and isinstance(cfg.beta, float)
    assert (cfg.model, cfg.epochs, cfg.pack, cfg.allow_fingerprint) == ("/models/m", 3, False, ("fp-a", "fp-b"))
    assert (kafka.bootstrap_servers, kafka.session_timeout_ms) == ("k1:9092,k2:9092", 6000)
    assert (s3.bucket, s3.secret_key) == ("mine", "from-the-file")
    assert trackers.report_to == ("tensorboard", "mlflow")
    assert cfg.lr == TrainerConfig().lr, "unset: the default"


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("beta: high", "beta: expected a number, got 'high'"),
        ("pack: 'yes'", "pack: expected true or false, got 'yes'"),
        ("epochs: true", "epochs: expected an integer, got True"),
        ("epochs: 1.5", "epochs: expected an integer, got 1.5"),
        ("run_name: 42", "run_name: expected a string, got 42 (quote it)"),
        ("beta:", "beta: expected a number, got nothing"),
        ("allow_fingerprint: [1, 2]", "allow_fingerprint: expected a list of strings, got [1, 2]"),
        ("kafka:\n  session_timeout_ms: soon", "kafka.session_timeout_ms: expected an integer, got 'soon'"),
    ],
)
def test_a_wrong_value_is_one_line_naming_file_setting_value_and_type(tmp_path, line, expected):
    path = write(tmp_path, f"model: m\n{line}\n")
    assert error(path) == f"{path}: {expected}"


def test_an_unknown_key_is_refused_with_the_closest_name_and_where_the_list_is(tmp_path):
    message = error(write(tmp_path, "model: m\nbetaa: 0.2\n"))
    assert "unknown setting 'betaa'" in message and "did you mean 'beta'" in message
    assert "offdpo train --print-config" in message
    message = error(write(tmp_path, "model: m\nkafka:\n  bootstrap: x:9092\n"))
    assert "unknown setting kafka.'bootstrap'" in message and "'bootstrap_servers'" in message
    message = error(write(tmp_path, "model: m\ntrackers:\n  report_to: [tensorbord]\n"))
    assert "report_to" in message and "'tensorbord'" in message and "tensorboard" in message


def test_unreadable_or_malformed_files_are_one_line_errors(tmp_path):
    assert "cannot read" in error(tmp_path / "missing.yaml")
    assert "not valid YAML" in error(write(tmp_path, "model: [unclosed\n")) and "line" in error(
        write(tmp_path, "model: [unclosed\n")
    )
    assert "top level" in error(write(tmp_path, "- a\n- b\n"))
    assert "kafka: expected a section" in error(write(tmp_path, "kafka: 3\n"))


def test_precedence_defaults_then_file_then_environment_then_flags(tmp_path, monkeypatch):
    path = write(tmp_path, "model: m\nbeta: 0.2\nepochs: 2\nlr: 3.0e-6\nkafka:\n  pairs_topic: from-file\n")
    cfg, kafka, _, _ = configs(path)
    assert (cfg.beta, cfg.epochs, cfg.lr, cfg.seed, kafka.pairs_topic) == (0.2, 2, 3e-6, 0, "from-file")
    monkeypatch.setenv("OFFDPO_TRAINER_BETA", "0.3")
    monkeypatch.setenv("OFFDPO_TRAINER_EPOCHS", "5")
    monkeypatch.setenv("OFFDPO_TOPIC_PAIRS", "from-env")
    monkeypatch.setenv("OFFDPO_TRAINER_REPORT_TO", "mlflow")
    cfg, kafka, _, trackers = configs(path, "--beta", "0.4", "--report-to", "tensorboard")
    assert (cfg.beta, cfg.epochs, cfg.lr, kafka.pairs_topic) == (0.4, 5, 3e-6, "from-env")
    assert trackers.report_to == ("tensorboard",)


def test_an_environment_variable_with_a_bad_value_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setenv("OFFDPO_TRAINER_BETA", "high")
    assert "OFFDPO_TRAINER_BETA='high'" in error(write(tmp_path, "model: m\n"))


def test_settings_that_cannot_work_are_a_config_error_not_an_exit(tmp_path):
    message = error(write(tmp_path, "model: m\nmode: streaming\nbeta: -1.0\n"))
    assert "'streaming'" in message and "--beta must be positive" in message
    with pytest.raises(ConfigError, match="model is required"):
        parse_args([])


def test_print_config_reloads_to_the_same_configuration_and_never_shows_secrets(tmp_path, capsys):
    from services.trainer.train import main

    path = write(
        tmp_path,
        "model: /models/m\nbeta: 0.25\nallow_fingerprint: [fp-a]\nrun_name: '007'\nreference_dtype: 'null'\n"
        "kafka:\n  sasl_password: hunter2-kafka\n  broker_profile: tansu\n"
        "s3:\n  secret_key: hunter2-s3\n  retry_max_s: 12\n"
        "trackers:\n  report_to: [tensorboard]\n",
    )
    assert main(["--config", str(path), "--print-config", "--epochs", "4"]) == 0
    printed = capsys.readouterr().out
    assert "hunter2" not in printed and "secret_key" in printed, "secrets: named in a comment, never the value"
    again = write(tmp_path, printed, "printed.yaml")
    first, second = configs(path, "--epochs", "4"), configs(again)
    for a, b in zip(first, second, strict=True):
        for field in type(a).__dataclass_fields__.values():
            if not field.metadata["secret"]:
                assert getattr(a, field.name) == getattr(b, field.name), field.name
    assert second[0].run_name == "007" and second[0].reference_dtype == "null", "strings stay strings"
    # a secret taken from the environment on both sides: the round trip is exact
    assert first[0] == second[0] and first[3] == second[3]
    assert resolved_config_yaml(first[0], first[1], first[2], trackers=first[3]) == printed


def test_print_config_of_the_defaults_lists_every_setting():
    printed = resolved_config_yaml(TrainerConfig(), KafkaConfig(), S3Config(), trackers=TrackerConfig())
    raw = yaml.safe_load(printed)
    assert set(raw) == set(TrainerConfig.__dataclass_fields__) | {"kafka", "s3", "trackers"}
    secrets = {n for n, f in S3Config.__dataclass_fields__.items() if f.metadata["secret"]}
    assert set(raw["s3"]) == set(S3Config.__dataclass_fields__) - secrets


def _run(args: list[str], env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OFFDPO_")}
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
    )


def test_a_bad_setting_at_start_up_is_one_line_on_stderr_and_exit_2(tmp_path):
    bad = write(tmp_path, "model: m\nbeta: high\n")
    proc = _run(["-m", "services.trainer", "--config", str(bad)])
    assert (proc.returncode, proc.stderr) == (2, f"trainer: {bad}: beta: expected a number, got 'high'\n")
    proc = _run(["-m", "cli", "train", "--model", "m"], {"OFFDPO_TRAINER_BETA": "high"})
    assert proc.returncode == 2 and proc.stderr == "trainer: OFFDPO_TRAINER_BETA='high' is not a valid float\n"
    proc = _run(["-m", "cli", "train", "--config", str(ROOT / "examples" / "demo.yaml"), "--print-config"])
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(proc.stdout)["run_name"] == "demo"


def test_the_labelers_bad_variable_is_one_line_and_exit_2():
    proc = _run(["-m", "services.labeler", "serve"], {"OFFDPO_LABELER_LEDGER": "/some/path"})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("labeler: OFFDPO_LABELER_LEDGER='/some/path' is not a valid bool"), proc.stderr
    assert "Traceback" not in proc.stderr
