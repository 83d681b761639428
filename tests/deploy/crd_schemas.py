"""Validate custom resources against their CRDs' OpenAPI schemas, offline.

- Strimzi, Kueue, Kubeflow Trainer: their published CRDs, vendored as JSON under tests/deploy/schemas/
  (each file's `_source` names the release and commit it was cut from; descriptions removed), checked
  with jsonschema. Stricter than the API server in one way on purpose: an object with `properties` and
  no `x-kubernetes-preserve-unknown-fields` rejects unknown fields (the API server would prune them
  silently, which hides a misspelt field). CEL rules (`x-kubernetes-validations`) are not evaluated.
- cert-manager, KEDA, prometheus-operator: the npm registry's @kubernetes-models/* packages
  (tests/deploy/crd_models/package.json, pinned), installed into .cache/node on first use and run with
  node (tests/deploy/crd_models/validate.mjs): each class's .validate() checks an object against the
  CRD's schema (types, required fields, enums, patterns; unknown fields are not refused there).
"""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
SCHEMAS = Path(__file__).resolve().parent / "schemas"
MODELS = Path(__file__).resolve().parent / "crd_models"
NODE_DIR = ROOT / ".cache" / "node"  # gitignored (.cache/)
NPM_GROUPS = ("cert-manager.io/", "keda.sh/", "monitoring.coreos.com/")


class SetupError(RuntimeError):
    """node/npm missing or the packages could not be installed."""


@functools.cache
def _vendored() -> dict[str, dict]:
    kinds: dict[str, dict] = {}
    for path in sorted(SCHEMAS.glob("*.json")):
        kinds.update(json.loads(path.read_text())["kinds"])
    return kinds


def _strict(schema: Any) -> Any:
    """The schema with additionalProperties: false wherever it lists properties and keeps no unknowns."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def vendored_kind(obj: dict) -> str:
    return f"{obj['apiVersion']}/{obj['kind']}"


def has_vendored_schema(obj: dict) -> bool:
    return vendored_kind(obj) in _vendored()


def vendored_errors(obj: dict) -> list[str]:
    """Errors of obj against its vendored CRD schema (metadata is the API server's, not checked here)."""
    import jsonschema

    schema = _strict(_vendored()[vendored_kind(obj)])
    schema = {**schema, "properties": {**schema.get("properties", {}), "metadata": {"type": "object"}}}
    validator = jsonschema.Draft7Validator(schema)
    return [
        f"{'/'.join(str(p) for p in e.absolute_path) or '(root)'}: {e.message}"
        for e in sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path))
    ]


def is_npm_modelled(obj: dict) -> bool:
    return obj["apiVersion"].startswith(NPM_GROUPS)


def _install() -> Path:
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        raise SetupError("node and npm are needed to validate cert-manager/KEDA/prometheus-operator objects")
    NODE_DIR.mkdir(parents=True, exist_ok=True)
    wanted = (MODELS / "package.json").read_text()
    stamp = NODE_DIR / "node_modules" / ".offdpo-package.json"
    if not stamp.exists() or stamp.read_text() != wanted:
        (NODE_DIR / "package.json").write_text(wanted)
        out = subprocess.run(
            [npm, "install", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=NODE_DIR,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if out.returncode:
            raise SetupError(f"npm install in {NODE_DIR} failed:\n{out.stderr[-4000:]}")
        stamp.write_text(wanted)
    script = NODE_DIR / "validate.mjs"  # next to node_modules, so its imports resolve there
    script.write_text((MODELS / "validate.mjs").read_text())
    return script


def npm_errors(objs: list[dict]) -> dict[tuple[str, str], str | None]:
    """(kind, name) -> the error of each object against its CRD schema, or None when valid."""
    if not objs:
        return {}
    script = _install()
    out = subprocess.run(
        [shutil.which("node") or "node", str(script)],
        input=json.dumps(objs),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=NODE_DIR,
    )
    if out.returncode:
        raise SetupError(f"node {script} failed:\n{out.stderr[-4000:]}")
    return {(r["kind"], r["name"]): r["error"] for r in json.loads(out.stdout)}
