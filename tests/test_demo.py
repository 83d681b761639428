"""The README's main command (`make demo` = `offdpo demo`) end to end, on free ports in a temporary dir."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from offdpo.stack import free_port, free_port_block

REPO = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.vllm, pytest.mark.stack]


def test_demo_runs_the_whole_pipeline_and_reports_consistent_counts(tmp_path):
    env = dict(os.environ, OFFDPO_STACK_DIR=str(tmp_path / "stack"), OFFDPO_STACK_S3_PORT=str(free_port()),
               OFFDPO_STACK_KAFKA_PORT=str(free_port()), OFFDPO_STACK_WEED_PORT_BASE=str(free_port_block(11)),
               OFFDPO_TRAINER_PROGRESS="false")
    proc = subprocess.run([sys.executable, "-m", "offdpo.cli", "demo", "--workdir", str(tmp_path / "demo")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    for step in ("[1/6]", "[2/6]", "[3/6]", "[4/6]", "[5/6]", "[6/6]"):
        assert step in proc.stdout, f"progress line {step} missing"
    reports = list((tmp_path / "demo").glob("demo-*/report.json"))
    assert len(reports) == 1
    report = json.loads(reports[0].read_text())
    labelled = report["labelled"]["distinct_pairs_on_topic"]
    assert labelled > 10
    assert report["scored"]["distinct"] == report["scored"]["rows"] == labelled
    assert report["trained"]["distinct"] == report["trained"]["pairs"] == labelled
    assert all(report["consistency"].values()), report["consistency"]
    # The shipped sample has malformed lines: they are dead-lettered with reasons, not dropped.
    assert report["dead_letters"].get("labeler/decode_error", 0) > 0
    assert report["checkpoint_loaded_by_transformers"] == "Qwen2ForCausalLM"
    assert Path(report["plot"]).stat().st_size > 10_000
    assert not (tmp_path / "stack" / "stack.json").exists(), "the demo must stop the stack it started"
