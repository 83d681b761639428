"""`python -m services.labeler annotate` as a process on the local stack: it starts, queues a file,
serves the pages with plain http only under the dev flag, and stops cleanly on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from localdev.process import free_port

from .conftest import SAMPLES, wait_until

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.stack


def test_annotate_cli_serves_a_file_and_stops_on_sigterm(stack, kcfg, tmp_path, annotator_tokens):
    port = free_port()
    env = {
        **os.environ,
        **stack.env(),
        "OFFDPO_TOPIC_PAIRS": kcfg.pairs_topic,
        "OFFDPO_TOPIC_DEADLETTER": kcfg.deadletter_topic,
        "OFFDPO_LABELER_STATE_DIR": str(tmp_path / "state"),
        "OFFDPO_ANNOTATE_TOKENS": annotator_tokens[0],
        "OFFDPO_ANNOTATE_INSECURE_COOKIES": "true",  # plain http on loopback (tests and local use only)
        "OFFDPO_ANNOTATE_HOST": "127.0.0.1",
    }
    cmd = [sys.executable, "-m", "services.labeler", "annotate", "--file", str(SAMPLES / "candidates.jsonl")]
    proc = subprocess.Popen(
        [*cmd, "--port", str(port)], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    base = f"http://127.0.0.1:{port}"
    try:

        def up():
            assert proc.poll() is None, f"annotate exited {proc.returncode}: {proc.stderr.read()[-3000:]}"
            try:
                return httpx.get(f"{base}/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(up, 60, "the annotate process to answer /healthz")
        with httpx.Client(base_url=base, timeout=10) as client:
            assert client.get("/").status_code == 401
            login = client.get("/login")
            csrf = login.text.split('name="csrf" value="')[1].split('"')[0]
            token = annotator_tokens[1]["alice"]
            assert client.post("/login", data={"csrf": csrf, "token": token}).status_code in (200, 303)
            page = client.get("/")
            assert page.status_code == 200 and 'id="judge-form"' in page.text
            metrics = client.get("/metrics").text
            open_line = next(
                line for line in metrics.splitlines() if line.startswith('offdpo_annotate_items{state="open"}')
            )
            assert float(open_line.split()[-1]) > 0
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert rc == 0, proc.stderr.read()[-3000:]
