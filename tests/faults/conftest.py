"""Fixtures of the fault-injection suite (`pytest -m faults tests/faults`).

Each test builds a `harness.Case` with its own topics, consumer groups and run name, injects one
fault, and records a row (pairs in, distinct valid pairs, scored, trained, duplicates trained, dead
letters by reason, what happened to the services). At the end of the session the rows are written
to faults.json and faults.md, whole (see results.py for where).
"""

from __future__ import annotations

import pytest

from .harness import Case
from .results import ResultsWriter


@pytest.fixture(scope="session")
def fault_results():
    writer = ResultsWriter()
    yield writer
    writer.write()


@pytest.fixture
def make_case(tmp_path, tiny_model, unique):
    cases = []

    def make(name: str, stack, **kw) -> Case:
        case = Case(name, stack, tiny_model, tmp_path / name, unique, **kw)
        cases.append(case)
        return case

    yield make
    for case in cases:
        case.close()
