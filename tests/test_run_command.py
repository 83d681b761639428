"""`offdpo run` (cli/run.py on localdev/pipeline.py): a user's model folder and a TRL-format preference
file through labeler -> Kafka -> refscore -> S3 -> trainer on the real local stack.

The file mixes plain rows, conversational rows (explicit and implicit prompt; refscore renders them
with the model's chat template) and one malformed row, which must come back as one dead letter with
its reason, never be dropped. The counts are read back by the test from Kafka, S3 and the trainer's
logs, not taken from the report alone."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

from cli.main import main as offdpo
from offdpo import records
from offdpo.kafka import read_topic
from offdpo.s3 import ObjectStore
from offdpo.v1.records_pb2 import DeadLetter
from services.trainer.examples import is_heldout

EVAL_FRACTION = 0.3

PLAIN = [
    ("the film was", " great fun .", " a dull mess ."),
    ("the plot is", " clever and tight .", " thin and slow ."),
    ("i would call it", " a delight .", " a chore ."),
    ("the actors were", " superb .", " wooden ."),
    ("the music felt", " warm .", " cheap ."),
]
CHATS = [
    ("how was the ending ?", "it was moving .", "it was flat ."),
    ("would you watch it again ?", "yes , gladly .", "no , never ."),
    ("what about the camera work ?", "it is beautiful .", "it is shaky ."),
]


def _rows() -> list[dict]:
    rows: list[dict] = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PLAIN]
    for i, (q, c, r) in enumerate(CHATS):
        user = [{"role": "user", "content": q}]
        if i % 2 == 0:  # explicit prompt: chosen/rejected hold the assistant turn
            rows.append(
                {
                    "prompt": user,
                    "chosen": [{"role": "assistant", "content": c}],
                    "rejected": [{"role": "assistant", "content": r}],
                }
            )
        else:  # implicit prompt: chosen/rejected hold the whole conversation
            rows.append(
                {
                    "chosen": user + [{"role": "assistant", "content": c}],
                    "rejected": user + [{"role": "assistant", "content": r}],
                }
            )
    return rows


MALFORMED = {"prompt": "the sound was", "chosen": " crisp ."}  # no 'rejected'


@pytest.mark.stack
@pytest.mark.timeout(300)  # a hang guard; the run takes well under a minute
def test_offdpo_run_imports_scores_trains_and_reports(stack, tiny_model, tmp_path, monkeypatch, capsys):
    data = tmp_path / "prefs.jsonl"
    rows = _rows()
    lines = [json.dumps(r) for r in rows]
    lines.insert(3, json.dumps(MALFORMED))
    data.write_text("\n".join(lines) + "\n")
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "beta": 0.5,
                "lr": 1e-3,
                "warmup_steps": 1,
                "global_batch_size": 2,
                "micro_batch_size": 2,
                "eval_fraction": EVAL_FRACTION,
                "save_every": 1000,
                "run_name": "ignored-by-offdpo-run",
                "trackers": {"report_to": ["tensorboard"]},
            }
        )
    )
    # The command finds the session's stack already up (its state file and ports) and leaves it running.
    monkeypatch.setenv("OFFDPO_STACK_DIR", str(stack.data_dir))
    monkeypatch.setenv("OFFDPO_STACK_S3_PORT", str(stack.stack.s3_port))
    monkeypatch.setenv("OFFDPO_STACK_KAFKA_PORT", str(stack.stack.kafka_port))
    monkeypatch.setenv("OFFDPO_STACK_WEED_PORT_BASE", str(stack.stack.weed_port_base))
    out_dir = tmp_path / "out"
    started = time.monotonic()
    code = offdpo(
        ["run", "--model", str(tiny_model), "--data", str(data), "--config", str(config), "--steps", "2"]
        + ["--out", str(out_dir), "--engine", "transformers"]
    )
    elapsed = time.monotonic() - started
    printed = capsys.readouterr()
    assert code == 0, printed.out[-4000:] + printed.err[-4000:]
    print(f"offdpo run took {elapsed:.1f} s")

    reports = list(out_dir.glob("run-*/report.json"))
    assert len(reports) == 1
    report = json.loads(reports[0].read_text())
    run = report["run_name"]

    # Imported: every row but the malformed one, read back from the run's pairs topic.
    pairs = [records.PreferencePair.FromString(r.value) for r in read_topic(stack.kafka, f"{run}.pairs")]
    ids = {p.pair_id for p in pairs}
    assert len(ids) == len(rows) == report["pairs_imported"] == report["rows"] - 1
    assert sum(p.prompt.WhichOneof("kind") == "chat" for p in pairs) == len(CHATS)
    # One dead letter, from the labeler, with the reason and the row's line.
    letters = [DeadLetter.FromString(r.value) for r in read_topic(stack.kafka, f"{run}.deadletter")]
    assert [(dl.service, dl.error_type) for dl in letters] == [("labeler", "decode_error")]
    assert "rejected" in letters[0].reason and f"{data}:4" in letters[0].reason
    assert report["dead_letters"] == {"labeler/decode_error": 1}
    assert report["dead_letter_reasons"][0]["reason"] == letters[0].reason
    # Scored: every pair (chat rows through the model's chat template), under the model's fingerprint.
    store = ObjectStore(stack.s3)
    prefix = f"scores/{report['fingerprint']}/{run}.pairs/"
    scored = [pid for key in store.list_keys(prefix) for pid in records.read_shard(store.get_bytes(key)).pair_ids]
    assert sorted(scored) == sorted(ids) and report["pairs_scored"] == len(ids)
    # Trained: --steps 2 steps of 2 pairs, none of them held out; the held-out pairs evaluated.
    heldout = {pid for pid in ids if is_heldout(pid, EVAL_FRACTION)}
    assert heldout and heldout != ids, "the data should hold out some pairs and train the others"
    assert report["steps"] == 2
    assert 0 < report["pairs_trained"] <= 4 and report["heldout_pairs"] == len(heldout)
    assert 0.0 <= report["heldout_accuracy"] <= 1.0

    # The model folder loads with transformers; the config reruns; TensorBoard has events.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(report["model_dir"])
    assert type(AutoModelForCausalLM.from_pretrained(model_dir)).__name__ == "Qwen2ForCausalLM"
    assert AutoTokenizer.from_pretrained(model_dir).chat_template
    saved = yaml.safe_load(Path(report["config_yaml"]).read_text())
    assert saved["run_name"] == run and saved["max_steps"] == 2 and saved["eval_fraction"] == EVAL_FRACTION
    assert report["ignored_config_settings"] == ["run_name"]
    assert list(Path(report["tensorboard"]).glob("events.out.tfevents.*"))
    assert report["checkpoint"].startswith(f"s3://{store.bucket}/runs/{run}/checkpoints/step-")
    for line in ("pairs imported", "dead-lettered", "held-out", "checkpoint", "model", "tensorboard", "config"):
        assert line in printed.out
    # The stack was already up: the command left it running.
    assert stack.is_up() and report["stack_left_running"]


def test_offdpo_run_refuses_bad_arguments_in_one_line_before_starting_anything(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    data = tmp_path / "prefs.jsonl"
    data.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    bad = tmp_path / "run.yaml"
    bad.write_text("beta: 0.5\nbetta: 0.1\n")
    cases = [
        (["--model", str(tmp_path), "--data", str(data)], "no config.json"),
        (["--model", str(model), "--data", str(tmp_path / "missing.jsonl")], "no such file"),
        (["--model", str(model), "--data", str(data), "--config", str(bad)], "betta"),
        (["--model", str(model), "--data", str(data), "--labels", "reward_model"], "--reward-model"),
    ]
    for argv, expected in cases:
        assert offdpo(["run", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("offdpo run: ") and expected in err and len(err.splitlines()) == 1, err
