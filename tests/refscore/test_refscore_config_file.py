"""refscore's config file (issue 32): `serve`/`worker --config refscore.yaml` (and `offdpo refscore`), typed
and validated like the trainer's; defaults < file < environment < flags; `--print-config` prints a file that
reloads to the same configuration; a bad setting is one line and exit 2. Parsing only: no server starts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from offdpo.config import ConfigError, KafkaConfig, S3Config
from services.refscore.__main__ import main, parse_args
from services.refscore.config import CONFIG_FILE, RefscoreConfig, RefscoreQuotaConfig

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "refscore.yaml"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """The developer's or CI's own OFFDPO_* settings must not leak into what a file resolves to."""
    for name in list(os.environ):
        if name.startswith("OFFDPO_"):
            monkeypatch.delenv(name)


def write(tmp_path, text: str, name: str = "refscore.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def settings(*argv: str):
    resolved, _ = parse_args(["serve", *argv])
    return (
        resolved.of(RefscoreConfig),
        resolved.of(KafkaConfig),
        resolved.of(S3Config),
        resolved.of(RefscoreQuotaConfig),
    )


def error(*argv: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse_args(["serve", *argv])
    message = str(info.value)
    assert "\n" not in message
    return message


def test_the_example_loads_with_its_sections():
    cfg, kafka, s3, quota = settings("--config", str(EXAMPLE))
    raw = yaml.safe_load(EXAMPLE.read_text())
    assert cfg.model_dir == raw["model_dir"] and (cfg.engine, cfg.dtype) == ("vllm", "bfloat16")
    assert cfg.worker_enabled and cfg.tls_cert and cfg.auth_file and not cfg.plaintext
    assert (kafka.security_protocol, s3.secure, quota.replicas) == ("SASL_SSL", True, 2)
    assert cfg.batch_wait_s == RefscoreConfig().batch_wait_s, "unset: the default"


def test_an_unknown_key_is_refused_with_the_valid_ones(tmp_path):
    message = error("--config", str(write(tmp_path, "model_dri: /models/m\n")))
    assert "unknown setting 'model_dri'" in message and "did you mean 'model_dir'" in message
    assert "valid at the top level: model_dir, extra_model_dirs, model_cache" in message
    assert "python -m services.refscore serve --print-config" in message
    message = error("--config", str(write(tmp_path, "quota:\n  replica: 2\n")))
    assert "unknown setting quota.'replica'" in message and "valid under `quota:`: replicas;" in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("port: high", "port: expected an integer, got 'high'"),
        ("share_prompts: 'no'", "share_prompts: expected true or false, got 'no'"),
        ("kafka:\n  request_timeout_ms: 1.5", "kafka.request_timeout_ms: expected an integer, got 1.5"),
        ("quota:\n  replicas: many", "quota.replicas: expected an integer, got 'many'"),
    ],
)
def test_a_wrong_value_is_one_line_naming_file_setting_value_and_type(tmp_path, text, expected):
    path = write(tmp_path, text + "\n")
    assert error("--config", str(path)) == f"{path}: {expected}"


def test_values_a_class_refuses_are_one_line_too(tmp_path):
    assert error("--engine", "vlm") == "OFFDPO_REFSCORE_ENGINE='vlm': expected one of vllm, transformers"
    path = write(tmp_path, "dtype: fp8\n")
    assert "OFFDPO_REFSCORE_DTYPE='fp8'" in error("--config", str(path))
    assert "OFFDPO_REFSCORE_REPLICAS=0 must be >= 1" in error("--replicas", "0")


def test_precedence_defaults_then_file_then_environment_then_flags(tmp_path, monkeypatch):
    path = write(
        tmp_path,
        "port: 6000\nbatch_pairs: 64\nextra_model_dirs: [/m/b]\nkafka:\n  pairs_topic: from-file\n"
        "quota:\n  replicas: 3\n",
    )
    cfg, kafka, _, quota = settings("--config", str(path))
    assert (cfg.port, cfg.batch_pairs, cfg.extra_model_dirs, kafka.pairs_topic, quota.replicas) == (
        6000,
        64,
        ("/m/b",),
        "from-file",
        3,
    )
    monkeypatch.setenv("OFFDPO_REFSCORE_PORT", "7000")
    monkeypatch.setenv("OFFDPO_REFSCORE_BATCH_PAIRS", "32")
    monkeypatch.setenv("OFFDPO_TOPIC_PAIRS", "from-env")
    monkeypatch.setenv("OFFDPO_REFSCORE_REPLICAS", "4")
    cfg, kafka, _, quota = settings("--config", str(path))
    assert (cfg.port, cfg.batch_pairs, kafka.pairs_topic, quota.replicas) == (7000, 32, "from-env", 4)
    cfg, _, _, quota = settings(
        "--config", str(path), "--port", "8000", "--replicas", "5", "--extra-model-dirs", "/m/c"
    )
    assert (cfg.port, cfg.batch_pairs, cfg.extra_model_dirs, quota.replicas) == (8000, 32, ("/m/c",), 5)
    cfg, *_ = settings("--config", str(path), "--worker")
    assert cfg.worker_enabled, "`serve --worker` is the worker_enabled setting"


def test_an_environment_variable_with_a_bad_value_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setenv("OFFDPO_REFSCORE_PLAINTEXT", "sometimes")
    assert error("--config", str(write(tmp_path, "port: 1\n"))) == (
        "OFFDPO_REFSCORE_PLAINTEXT='sometimes' is not a valid bool"
    )


def test_print_config_reloads_to_the_same_configuration_and_never_shows_secrets(tmp_path, capsys, monkeypatch):
    path = write(
        tmp_path,
        "model_dir: /models/ref\nmodel_id: '007'\nengine: transformers\nextra_model_dirs: [/models/b]\n"
        "kafka:\n  sasl_password: hunter2-kafka\n  broker_profile: tansu\n"
        "s3:\n  secret_key: hunter2-s3\n  retry_max_s: 12\nquota:\n  replicas: 3\n",
    )
    monkeypatch.setenv("OFFDPO_REFSCORE_GRACE_S", "5")
    assert main(["worker", "--config", str(path), "--print-config", "--port", "6001"]) == 0
    printed = capsys.readouterr().out
    assert "hunter2" not in printed and "secret_key" in printed, "secrets: named in a comment, never the value"
    assert set(yaml.safe_load(printed)) == set(RefscoreConfig.__dataclass_fields__) | {"kafka", "s3", "quota"}
    again = write(tmp_path, printed, "printed.yaml")
    monkeypatch.delenv("OFFDPO_REFSCORE_GRACE_S")
    first, second = settings("--config", str(path), "--port", "6001"), settings("--config", str(again))
    assert first[0] != second[0], "the environment's grace_s is not in `first`"  # the test can fail
    first = settings("--config", str(path), "--port", "6001", "--grace-s", "5")
    for a, b in zip(first, second, strict=True):
        for field in type(a).__dataclass_fields__.values():
            if not field.metadata["secret"]:
                assert getattr(a, field.name) == getattr(b, field.name), field.name
    assert second[0].model_id == "007" and second[0].grace_s == 5.0 and second[0].port == 6001
    assert first[0] == second[0] and first[3] == second[3]
    assert CONFIG_FILE.dump(parse_args(["serve", "--config", str(again)])[0]) == printed


def test_a_model_in_s3_refuses_s3_settings_it_would_not_use(tmp_path, capsys):
    """The download of an s3:// model reads the OFFDPO_S3_* variables (Scorer.load), not the file's `s3:`."""
    model = "model_dir: s3://offdpo/runs/r/checkpoints/step-1/model/\n"
    assert main(["serve", "--print-config", "--config", str(write(tmp_path, model))]) == 0
    capsys.readouterr()
    with_s3 = write(tmp_path, model + "s3:\n  endpoint: minio:9000\n", "with-s3.yaml")
    assert main(["serve", "--print-config", "--config", str(with_s3)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("refscore: s3://offdpo/runs/r/") and "OFFDPO_S3_*" in err and len(err.splitlines()) == 1
    local = write(tmp_path, "model_dir: /models/m\ns3:\n  endpoint: minio:9000\n", "local.yaml")
    assert main(["serve", "--print-config", "--config", str(local)]) == 0, "the worker's shards use `s3:`"


def _run(args: list[str], env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OFFDPO_")}
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
    )


def test_a_bad_setting_at_start_up_is_one_line_on_stderr_and_exit_2(tmp_path):
    bad = write(tmp_path, "port: high\n")
    proc = _run(["-m", "services.refscore", "serve", "--config", str(bad)])
    assert (proc.returncode, proc.stderr) == (2, f"refscore: {bad}: port: expected an integer, got 'high'\n")
    proc = _run(["-m", "cli", "refscore", "worker", "--config", str(EXAMPLE)], {"OFFDPO_REFSCORE_ENGINE": "vlm"})
    assert (proc.returncode, proc.stderr) == (
        2,
        "refscore: OFFDPO_REFSCORE_ENGINE='vlm': expected one of vllm, transformers\n",
    )
    proc = _run(["-m", "cli", "refscore", "serve", "--config", str(EXAMPLE), "--print-config"])
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(proc.stdout)["model_dir"] == "/models/llama-3.1-8b-instruct"
