"""The labeler's config file (issue 32): `--config labeler.yaml` on every subcommand (and `offdpo labeler`),
typed and validated like the trainer's; defaults < file < environment < flags; `--print-config` prints a
file that reloads to the same configuration; a bad setting is one line and exit 2. Parsing only."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from offdpo.config import ConfigError, KafkaConfig
from services.labeler.__main__ import main, parse_args
from services.labeler.config import CONFIG_FILE, AnnotateConfig, JudgeConfig, LabelerConfig
from services.labeler.server_config import LabelerServerConfig

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "labeler.yaml"
CLASSES = (LabelerConfig, KafkaConfig, JudgeConfig, LabelerServerConfig, AnnotateConfig)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """The developer's or CI's own OFFDPO_* settings must not leak into what a file resolves to."""
    for name in list(os.environ):
        if name.startswith("OFFDPO_"):
            monkeypatch.delenv(name)


def write(tmp_path, text: str, name: str = "labeler.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def settings(*argv: str) -> tuple:
    resolved, _ = parse_args(list(argv))
    return tuple(resolved.of(cls) for cls in CLASSES)


def error(*argv: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse_args(list(argv))
    message = str(info.value)
    assert "\n" not in message
    return message


def test_the_example_loads_with_its_sections():
    cfg, kafka, judge, server, _ = settings("consume", "--config", str(EXAMPLE))
    raw = yaml.safe_load(EXAMPLE.read_text())
    assert (cfg.rules_file, cfg.margin, cfg.state_dir) == (raw["rules_file"], 0.5, "/var/lib/offdpo/labeler")
    assert (judge.model, judge.mode, judge.concurrency) == ("Qwen/Qwen2.5-7B-Instruct", "gsb", 8)
    assert kafka.security_protocol == "SASL_SSL" and server.auth_file.endswith("teams.yaml")
    assert (ROOT / cfg.rules_file).is_file(), "the example's rules file ships with the repository"
    assert cfg.reward_batch_size == LabelerConfig().reward_batch_size, "unset: the default"


def test_an_unknown_key_is_refused_with_the_valid_ones(tmp_path):
    message = error("consume", "--config", str(write(tmp_path, "rules: r.yaml\n")))
    assert "unknown setting 'rules'" in message and "did you mean 'rules_file'" in message
    assert "valid at the top level: strategy, group_id, state_dir, ledger, rules_file" in message
    assert "python -m services.labeler serve --print-config" in message
    message = error("serve", "--config", str(write(tmp_path, "judge:\n  url: http://j/v1\n")))
    assert "unknown setting judge.'url'" in message and "valid under `judge:`: base_url, model" in message
    message = error("serve", "--config", str(write(tmp_path, "rules:\n  callable_packages: [x]\n")))
    assert "unknown setting 'rules'" in message, "the rules allow-list is the environment's only"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("ledger: /some/path", "ledger: expected true or false, got '/some/path'"),
        ("margin: wide", "margin: expected a number, got 'wide'"),
        ("judge:\n  concurrency: 2.5", "judge.concurrency: expected an integer, got 2.5"),
        ("annotate:\n  port: http", "annotate.port: expected an integer, got 'http'"),
    ],
)
def test_a_wrong_value_is_one_line_naming_file_setting_value_and_type(tmp_path, text, expected):
    path = write(tmp_path, text + "\n")
    assert error("consume", "--config", str(path)) == f"{path}: {expected}"


def test_values_a_class_refuses_are_one_line_too(tmp_path):
    path = write(tmp_path, "strategy: human\n")
    assert error("consume", "--config", str(path)).startswith("OFFDPO_LABELER_STRATEGY: unknown strategy 'human'")
    path = write(tmp_path, "annotate:\n  overlap: 0\n")
    assert error("annotate", "--config", str(path)) == "OFFDPO_ANNOTATE_OVERLAP must be at least 1"


def test_precedence_defaults_then_file_then_environment_then_flags(tmp_path, monkeypatch):
    path = write(
        tmp_path,
        "margin: 0.2\nbatch_size: 8\ngrpc_port: 6000\njudge:\n  model: from-file\nkafka:\n  bootstrap_servers: f:9092\n"
        "annotate:\n  port: 7000\n",
    )
    cfg, kafka, judge, _, annotate = settings("serve", "--config", str(path))
    assert (cfg.margin, cfg.batch_size, cfg.grpc_port, judge.model, kafka.bootstrap_servers, annotate.port) == (
        0.2,
        8,
        6000,
        "from-file",
        "f:9092",
        7000,
    )
    monkeypatch.setenv("OFFDPO_LABELER_MARGIN", "0.3")
    monkeypatch.setenv("OFFDPO_LABELER_GRPC_PORT", "6001")
    monkeypatch.setenv("OFFDPO_JUDGE_MODEL", "from-env")
    monkeypatch.setenv("OFFDPO_KAFKA_BOOTSTRAP", "e:9092")
    monkeypatch.setenv("OFFDPO_ANNOTATE_PORT", "7001")
    cfg, kafka, judge, _, annotate = settings("serve", "--config", str(path))
    assert (cfg.margin, cfg.batch_size, cfg.grpc_port, judge.model, kafka.bootstrap_servers, annotate.port) == (
        0.3,
        8,
        6001,
        "from-env",
        "e:9092",
        7001,
    )
    flags = ["--margin", "0.4", "--judge-model", "from-flag", "--bootstrap", "x:9092", "--no-ledger"]
    cfg, kafka, judge, _, annotate = settings("serve", "--config", str(path), "--port", "6002", *flags)
    assert (cfg.margin, cfg.grpc_port, judge.model, kafka.bootstrap_servers, cfg.ledger, annotate.port) == (
        0.4,
        6002,
        "from-flag",
        "x:9092",
        False,
        7001,
    )
    cfg, *_, annotate = settings("annotate", "--config", str(path), "--port", "7002", "--overlap", "3")
    assert (cfg.grpc_port, annotate.port, annotate.overlap) == (6001, 7002, 3), "annotate's --port is the app's"


def test_print_config_reloads_to_the_same_configuration_and_never_shows_secrets(tmp_path, capsys, monkeypatch):
    path = write(
        tmp_path,
        "margin: 1\nrefscore_token: hunter2-token\nstate_dir: '007'\n"
        "judge:\n  api_key: hunter2-judge\n  mode: reference\nkafka:\n  sasl_password: hunter2-kafka\n"
        "server:\n  plaintext: true\nannotate:\n  overlap: 3\n",
    )
    monkeypatch.setenv("OFFDPO_JUDGE_TIMEOUT_S", "9")
    assert main(["consume", "--config", str(path), "--print-config", "--pair-mode", "all"]) == 0
    printed = capsys.readouterr().out
    assert "hunter2" not in printed and "api_key" in printed, "secrets: named in a comment, never the value"
    sections = {"kafka", "judge", "server", "annotate"}
    assert set(yaml.safe_load(printed)) == set(LabelerConfig.__dataclass_fields__) - {"refscore_token"} | sections
    again = write(tmp_path, printed, "printed.yaml")
    first = settings("consume", "--config", str(path), "--pair-mode", "all")  # OFFDPO_JUDGE_TIMEOUT_S=9 still set
    monkeypatch.delenv("OFFDPO_JUDGE_TIMEOUT_S")
    second = settings("consume", "--config", str(again))
    for a, b in zip(first, second, strict=True):
        for field in type(a).__dataclass_fields__.values():
            if not field.metadata["secret"]:
                assert getattr(a, field.name) == getattr(b, field.name), field.name
    assert second[0].state_dir == "007" and second[0].pair_mode == "all" and second[2].timeout_s == 9.0
    assert CONFIG_FILE.dump(parse_args(["serve", "--config", str(again)])[0]) == printed


def _run(args: list[str], env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OFFDPO_")}
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
    )


def test_a_bad_setting_at_start_up_is_one_line_on_stderr_and_exit_2(tmp_path):
    bad = write(tmp_path, "ledger: /some/path\n")
    proc = _run(["-m", "services.labeler", "serve", "--config", str(bad)])
    assert (proc.returncode, proc.stderr) == (2, f"labeler: {bad}: ledger: expected true or false, got '/some/path'\n")
    proc = _run(["-m", "cli", "labeler", "consume", "--config", str(EXAMPLE)], {"OFFDPO_LABELER_MARGIN": "wide"})
    assert (proc.returncode, proc.stderr) == (2, "labeler: OFFDPO_LABELER_MARGIN='wide' is not a valid float\n")
    proc = _run(["-m", "cli", "labeler", "serve", "--config", str(EXAMPLE), "--print-config"])
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(proc.stdout)["judge"]["model"] == "Qwen/Qwen2.5-7B-Instruct"
