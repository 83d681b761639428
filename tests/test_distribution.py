"""The main distribution as a library (#30 item 3): its dependencies are ranges, the lock file the
set-up installs satisfies them, and the refscore client comes from offdpo-client, not a copy."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
LOCK = REPO / "scripts" / "requirements-cpu.lock"


def _locked(lock: Path = LOCK) -> dict[str, Version]:
    out = {}
    for line in lock.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"{lock.name}: {line!r} is not an exact 'name==version' line"
            out[canonicalize_name(name)] = Version(version)
    return out


def test_library_dependencies_are_ranges_not_pins():
    pinned = [d for d in PROJECT["dependencies"] if "==" in d]
    assert pinned == [], (
        f"pyproject.toml [project].dependencies must be ranges (exact versions go to the lock): {pinned}"
    )


def test_the_lock_satisfies_every_range():
    locked = _locked()
    wanted = [Requirement(d) for d in PROJECT["dependencies"]]
    for extra in ("stack", "dev", "trl", "lora"):
        wanted += [Requirement(d) for d in PROJECT["optional-dependencies"][extra]]
    problems = []
    for req in wanted:
        name = canonicalize_name(req.name)
        if name == "offdpo-client":  # installed from clients/python by the set-up, never from the lock
            continue
        if name not in locked:
            problems.append(f"{req.name}: not in the lock")
        elif not req.specifier.contains(locked[name], prereleases=True):
            problems.append(f"{req.name}: locked {locked[name]} is outside {req.specifier}")
    assert problems == [], "scripts/requirements-cpu.lock disagrees with pyproject.toml (make lock): " + "; ".join(
        problems
    )


def test_the_lock_check_can_fail(tmp_path):
    lock = tmp_path / "requirements-cpu.lock"
    lock.write_text("grpcio==1.70.0\n")
    locked = _locked(lock)
    assert not Requirement("grpcio>=1.85.1,<2").specifier.contains(locked["grpcio"])


def test_the_refscore_client_is_offdpo_clients():
    """offdpo depends on offdpo-client and its refscore_client builds on it: no second channel,
    TLS, token or retry implementation in the main distribution."""
    assert any(canonicalize_name(Requirement(d).name) == "offdpo-client" for d in PROJECT["dependencies"])
    tree = ast.parse((REPO / "offdpo" / "refscore_client.py").read_text())
    defined = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.ClassDef)}
    assert not defined & {"channel_credentials", "_PlaintextBearer", "channel_options"}, defined
    imports = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | {
        a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
    }
    assert "offdpo_client" in imports

    import offdpo_client

    from offdpo.refscore_client import RefscoreClient

    client = RefscoreClient("127.0.0.1:1")
    try:
        assert isinstance(client.client, offdpo_client.RefscoreClient)
    finally:
        client.close()
