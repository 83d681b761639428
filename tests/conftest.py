"""Session fixtures: one local stack (real SeaweedFS S3 + real Tansu broker on free ports) and one
tiny test model per test session, built by the same code that `make demo` uses."""

from __future__ import annotations

import os
import uuid

import pytest

from localdev.stack import LocalStack
from localdev.testmodel import ensure_test_model

# Keep BLAS/torch from oversubscribing the 2 CI cores when several processes run.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def stack(tmp_path_factory):
    with LocalStack.for_tests(tmp_path_factory.mktemp("stack")) as local:
        yield local


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return ensure_test_model(tmp_path_factory.mktemp("models") / "tiny", size="tiny")


@pytest.fixture
def unique():
    """A short unique suffix for topics, groups and object keys, so tests never see each other's data."""
    return uuid.uuid4().hex[:10]


# Fixtures that start a real broker, S3 server or engine. A test that needs one (directly or
# through another fixture), or carries the `stack`/`vllm`/`faults` marker, is an integration test;
# everything else is the fast tier (`make test-fast`: `pytest -m "not integration"`).
_REAL_PARTS = {"stack", "vllm_server", "vllm_client", "vllm_topics", "kcfg"}
_REAL_MARKERS = {"stack", "vllm", "engine", "faults", "browser"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _REAL_PARTS & set(getattr(item, "fixturenames", ())) or _REAL_MARKERS & {
            m.name for m in item.iter_markers()
        }:
            item.add_marker(pytest.mark.integration)
