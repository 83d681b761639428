"""offdpo-client as another team gets it: the wheel built from clients/python, installed into a fresh
virtual environment without torch (Python 3.9 where this machine has one: the oldest it supports),
scoring against the real refscore server. Its results equal the in-tree client's exactly."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from offdpo.refscore_client import score_item
from offdpo.v1 import records_pb2

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.vllm

# (prompt, answer) as both clients take them: chat, plain text, several messages, token ids.
PAIRS = [
    ([("user", "What is 2+2?")], "4"),
    ("The capital of France is", [3, 17, 42]),
    ([("system", "Be brief."), ("user", "Name a colour.")], "Blue, like the sky."),
    ("plain prompt", "a plain answer"),
]

# Runs in the fresh environment, from a directory outside the checkout: only the wheel is importable.
SCRIPT = r"""
import json, sys
from offdpo_client import RefscoreClient, token_prompt
assert sys.version_info >= (3, 9)
pairs = json.loads(sys.argv[2])
def out(items):
    return [dict(index=i.index, prompt=list(i.prompt_token_ids), answer=list(i.answer_token_ids),
                 logprobs=list(i.token_logprobs), sum=i.logprob_sum) for i in items]
with RefscoreClient(sys.argv[1]) as client:
    client.wait_serving(60)
    result = client.score([(p if isinstance(p, str) else [tuple(m) for m in p], a) for p, a in pairs])
    many = client.score_many([(p if isinstance(p, str) else [tuple(m) for m in p], a) for p, a in pairs],
                             batch_size=2, max_in_flight=1)
    stream = sorted(client.score_stream([(p if isinstance(p, str) else [tuple(m) for m in p], a) for p, a in pairs],
                                        batch_size=len(pairs)), key=lambda i: i.index)
    tokens = client.score([(token_prompt(result.items[0].prompt_token_ids), result.items[0].answer_token_ids)])
    info = client.model_info()
print(json.dumps(dict(python=sys.version.split()[0], score=out(result.items), many=out(many),
                      stream=out(stream), tokens=out(tokens.items), fingerprint=vars(result.fingerprint),
                      info_fingerprint=vars(info.fingerprint), torch="torch" in sys.modules)))
"""


def _oldest_python() -> str:
    """OFFDPO_CLIENT_TEST_PYTHON, else a working Python 3.9 on this machine (PATH or pyenv; a pyenv shim
    for a version not activated exists but fails), else python3."""
    if os.environ.get("OFFDPO_CLIENT_TEST_PYTHON"):
        return os.environ["OFFDPO_CLIENT_TEST_PYTHON"]
    candidates = [
        shutil.which("python3.9"),
        *sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.9*/bin/python3.9"))),
    ]
    for candidate in filter(None, candidates):
        if subprocess.run([candidate, "-c", "import venv"], capture_output=True).returncode == 0:
            return candidate
    return shutil.which("python3") or sys.executable


def _run(args, **kw) -> subprocess.CompletedProcess:
    run = subprocess.run(args, capture_output=True, text=True, **kw)
    assert run.returncode == 0, f"{' '.join(map(str, args))} failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    return run


def _in_tree(items) -> list[dict]:
    return [
        dict(
            index=i.item_index,
            prompt=list(i.prompt_token_ids),
            answer=list(i.answer_token_ids),
            logprobs=list(i.token_logprobs),
            sum=i.logprob_sum,
        )
        for i in items
    ]


def test_the_wheel_in_a_fresh_environment_scores_as_the_in_tree_client(vllm_server, vllm_client, tmp_path):
    # Build from a copy, so nothing (build/, *.egg-info) is left in the checkout.
    source = tmp_path / "client-src"
    shutil.copytree(
        REPO / "clients/python", source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__")
    )
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", str(source), "-w", str(tmp_path / "wheels")], timeout=600)
    (wheel,) = (tmp_path / "wheels").glob("offdpo_client-*.whl")

    env_dir = tmp_path / "venv"
    _run([_oldest_python(), "-m", "venv", str(env_dir)], timeout=300)
    python = str(env_dir / "bin" / "python")
    _run([python, "-m", "pip", "install", "--quiet", str(wheel)], timeout=600)  # grpcio, protobuf from the index
    installed = _run([python, "-m", "pip", "list", "--format=freeze"], timeout=120).stdout
    assert not any(line.lower().startswith(("torch==", "offdpo==")) for line in installed.splitlines()), installed

    clean_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    run = _run([python, "-c", SCRIPT, vllm_server.target, json.dumps(PAIRS)], timeout=300, cwd=tmp_path, env=clean_env)
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["torch"] is False

    # The same requests through the in-tree client: equal to the last bit (float32 values, as Python floats).
    items = [score_item(p, a) for p, a in PAIRS]
    expected = vllm_client.score(items)
    assert got["score"] == _in_tree(expected.items)
    assert got["many"] == _in_tree(vllm_client.score(items[:2]).items) + [
        dict(row, index=row["index"] + 2) for row in _in_tree(vllm_client.score(items[2:]).items)
    ]
    first = expected.items[0]
    by_tokens = vllm_client.score(
        [
            score_item(
                records_pb2.Prompt(token_ids=records_pb2.TokenIds(ids=first.prompt_token_ids)), first.answer_token_ids
            )
        ]
    )
    assert got["tokens"] == _in_tree(by_tokens.items)
    fp = expected.fingerprint
    want_fp = {name: getattr(fp, name) for name in got["fingerprint"]}
    assert got["fingerprint"] == want_fp and got["info_fingerprint"] == want_fp and fp.fingerprint_id

    # The stream (its own request; the engine may batch it otherwise): the same ids, values within the
    # batch-invariance bound of tests/refscore/test_parity.py.
    for streamed, scored in zip(got["stream"], got["score"], strict=True):
        assert {k: streamed[k] for k in ("index", "prompt", "answer")} == {
            k: scored[k] for k in ("index", "prompt", "answer")
        }
        assert max(abs(a - b) for a, b in zip(streamed["logprobs"], scored["logprobs"], strict=True)) <= 1e-6
    print(f"offdpo-client wheel on Python {got['python']}: {len(PAIRS)} items scored as the in-tree client does")
