"""The protos as a governed API: scripts/lint-protos.sh (`make lint`) runs `buf lint` and `buf breaking`
against protos/v1-baseline.binpb. It passes on the protos as they are, and fails, naming the field,
when a copy of them deletes or renumbers a field."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "lint-protos.sh"
REFSCORE = "protos/offdpo/v1/refscore.proto"
NPM_UNREACHABLE_RC = 3  # lint-protos.sh: buf could not be installed from the npm registry


def _npm_reachable() -> bool:
    try:
        return subprocess.run(["npm", "ping"], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="module")
def buf_installed() -> None:
    """buf from the npm registry (the script installs it on first use); skipped only without npm."""
    run = subprocess.run(["bash", str(SCRIPT), "--print-buf"], capture_output=True, text=True, timeout=600)
    if run.returncode == NPM_UNREACHABLE_RC and not _npm_reachable():
        pytest.skip(f"the npm registry is unreachable, so buf cannot be installed: {run.stderr.strip()}")
    assert run.returncode == 0, run.stderr
    assert Path(run.stdout.strip()).is_file()


def _api_copy(tmp_path: Path) -> Path:
    """buf.yaml, protos/ and the baseline image, as the repository has them, in a scratch directory."""
    shutil.copyfile(REPO / "buf.yaml", tmp_path / "buf.yaml")
    shutil.copytree(REPO / "protos", tmp_path / "protos")
    return tmp_path


def _edit(root: Path, rel: str, old: str, new: str) -> None:
    path = root / rel
    text = path.read_text()
    assert text.count(old) == 1, f"{rel} no longer has exactly one {old!r}: update this test"
    path.write_text(text.replace(old, new))


def _lint(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), "--root", str(root)], capture_output=True, text=True, timeout=300, cwd=REPO
    )


def test_the_repository_protos_pass(buf_installed):
    run = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "buf lint and buf breaking" in run.stdout


def test_an_unmodified_copy_passes(buf_installed, tmp_path):
    run = _lint(_api_copy(tmp_path))
    assert run.returncode == 0, run.stdout + run.stderr


def test_removing_a_field_fails_naming_it(buf_installed, tmp_path):
    root = _api_copy(tmp_path)
    _edit(root, REFSCORE, "  string item_id = 4;   // optional, echoed back\n", "")
    run = _lint(root)
    assert run.returncode != 0
    assert 'field "4" with name "item_id" on message "ScoreItem" was deleted' in run.stdout, run.stdout + run.stderr


def test_renumbering_a_field_fails_naming_it(buf_installed, tmp_path):
    root = _api_copy(tmp_path)
    _edit(root, REFSCORE, "double logprob_sum = 6;", "double logprob_sum = 16;")
    run = _lint(root)
    assert run.returncode != 0
    assert 'field "6" with name "logprob_sum" on message "ScoredItem" was deleted' in run.stdout, (
        run.stdout + run.stderr
    )


def test_adding_a_field_is_compatible(buf_installed, tmp_path):
    # The promise (docs/api-compatibility.md): new fields with new numbers are allowed in v1.
    root = _api_copy(tmp_path)
    _edit(root, REFSCORE, "  string item_id = 4;", "  string trace_id = 5;\n  string item_id = 4;")
    run = _lint(root)
    assert run.returncode == 0, run.stdout + run.stderr


def test_lint_exceptions_cover_only_the_published_files(buf_installed, tmp_path):
    # buf.yaml exempts the released services from the naming rules; a new file must follow them.
    root = _api_copy(tmp_path)
    (root / "protos/offdpo/v1/extra.proto").write_text(
        'syntax = "proto3";\n\npackage offdpo.v1;\n\nmessage PingRequest {}\n\nmessage PingResponse {}\n\n'
        "service Extra {\n  rpc Ping(PingRequest) returns (PingResponse);\n}\n"
    )
    run = _lint(root)
    assert run.returncode != 0
    assert 'Service name "Extra" should be suffixed with "Service"' in run.stdout, run.stdout + run.stderr
