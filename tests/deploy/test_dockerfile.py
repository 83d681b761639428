"""Static checks of deploy/docker/Dockerfile (no Docker on CI): pinned bases, non-root users, one
target per image the manifests use, entrypoints that are this repository's modules."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

DOCKERFILE = Path(__file__).resolve().parents[2] / "deploy" / "docker" / "Dockerfile"
IMAGES = {"labeler", "refscore", "trainer", "cpu"}  # offdpo/<target> in deploy/base/kustomization.yaml


def stages():
    text = DOCKERFILE.read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.M))
    out, current = {}, None
    for line in text.splitlines():
        m = re.match(r"FROM (\S+)(?: AS (\S+))?", line)
        if m:
            base = re.sub(r"\$\{(\w+)\}", lambda v: args[v.group(1)], m.group(1))
            current = m.group(2)
            out[current] = {"base": base, "lines": []}
        elif current:
            out[current]["lines"].append(line)
    return out, args


def final_user(name, all_stages):
    """USER of a stage, following FROM <stage> chains."""
    while name in all_stages:
        users = [ln.split()[1] for ln in all_stages[name]["lines"] if ln.startswith("USER ")]
        if users:
            return users[-1]
        name = all_stages[name]["base"]
    return None


def entrypoint(name, all_stages):
    while name in all_stages:
        eps = [ln for ln in all_stages[name]["lines"] if ln.startswith("ENTRYPOINT ")]
        if eps:
            return json.loads(eps[-1].split(" ", 1)[1])
        name = all_stages[name]["base"]
    return None


def test_bases_are_pinned():
    all_stages, args = stages()
    for name, st in all_stages.items():
        base = st["base"]
        if base in all_stages:
            continue
        assert "@sha256:" in base or re.search(r":\d+\.\d+\.\d+", base), f"stage {name}: base {base} is not pinned"
        assert not base.endswith(":latest")
    for key in ("TORCH_VERSION", "VLLM_VERSION"):
        assert re.fullmatch(r"\d+\.\d+\.\d+", args[key]), key


def test_one_target_per_image_each_non_root():
    all_stages, _ = stages()
    assert set(all_stages) >= IMAGES
    for target in IMAGES:
        user = final_user(target, all_stages)
        assert user and user.split(":")[0].isdigit() and int(user.split(":")[0]) >= 1000, f"{target}: USER {user}"


def test_entrypoints_are_this_distributions_modules():
    all_stages, _ = stages()
    expected = {"labeler": "services.labeler", "refscore": "services.refscore", "cpu": "cli.main"}
    for target, module in expected.items():
        ep = entrypoint(target, all_stages)
        assert ep[:3] == ["python", "-m", module], (target, ep)
        assert importlib.util.find_spec(module) is not None
    assert entrypoint("trainer", all_stages) == ["torchrun"]
    cmd = [ln for ln in all_stages["trainer"]["lines"] if ln.startswith("CMD ")][-1]
    assert "services.trainer" in cmd
    # the images install the one distribution (a wheel of this repository), no per-service copies
    text = DOCKERFILE.read_text()
    assert "pip wheel --no-cache-dir --no-deps -w /wheels ." in text
    assert not re.search(r"^COPY (?!--from)\S*services/\w+", text, re.M)


def test_image_context_leaves_out_caches_and_local_state():
    # On a developer's machine Python writes __pycache__ next to every imported module and the set-up
    # leaves .venv, .cache and .stack: none of it belongs in an image. The context is an allow-list
    # ("*" first, then the source folders), with the caches inside those folders excluded again.
    lines = [
        ln for ln in (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().splitlines() if ln and ln[0] != "#"
    ]
    assert lines[0] == "*"
    allowed = [ln[1:] for ln in lines if ln.startswith("!")]
    assert not any(a.startswith((".venv", ".cache", ".stack")) for a in allowed)
    last_allow = max(i for i, ln in enumerate(lines) if ln.startswith("!"))
    assert {"**/__pycache__", "**/*.pyc"} <= set(lines[last_allow + 1 :])  # after the allows, so they win
