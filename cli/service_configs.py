"""Which configuration classes each service reads (its `services/<name>/config.py: CONFIG_CLASSES`).

Used by `offdpo config` and by the deploy tests, which check that the environment variables each
container gets are exactly the ones its service reads.
"""

from __future__ import annotations

import importlib

SERVICES = ("labeler", "refscore", "trainer")


def service_config_classes() -> dict[str, tuple]:
    out = {}
    for name in SERVICES:
        try:
            module = importlib.import_module(f"services.{name}.config")
        except ModuleNotFoundError as exc:
            if exc.name in (f"services.{name}", f"services.{name}.config"):
                continue  # service not built yet
            raise
        out[name] = tuple(module.CONFIG_CLASSES)
    return out


def service_env_vars(name: str) -> set[str]:
    return {var for cls in service_config_classes()[name] for var in cls.env_vars()}
