"""The import layers hold, and a wrong arrow fails `make lint` with a message naming it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("offdpo", "services", "cli", "localdev", "integrations", "bench")
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(root / "pyproject.toml"), "--no-cache"],
        cwd=root,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture
def tree_copy(tmp_path):
    for name in PACKAGES:
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__", "results"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_the_tree_keeps_every_contract(tree_copy):
    result = _lint_imports(tree_copy)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("where", "line", "contract"),
    [
        ("services/labeler/wrong.py", "import services.refscore.scorer", "Services never import each other"),
        ("offdpo/wrong.py", "import services.trainer.losses", "Layers"),
        ("services/trainer/wrong.py", "import localdev.stack", "Services never import the local-development"),
    ],
)
def test_a_wrong_arrow_fails_with_a_message_naming_it(tree_copy, where, line, contract):
    (tree_copy / where).write_text(line + "\n")
    result = _lint_imports(tree_copy)
    assert result.returncode != 0
    module = where.removesuffix(".py").replace("/", ".")
    assert contract in result.stdout and "BROKEN" in result.stdout and module in result.stdout, result.stdout
