"""What rank 0 broadcasts each step: a batch, a stop (data ran out, or a signal), or a refusal."""

from __future__ import annotations

import signal

import pytest

from offdpo.shutdown import StopOnSignals
from services.trainer.examples import Example
from services.trainer.messages import Batch, Failure, Plan, Stop, as_setup, as_step
from services.trainer.shards import DataError
from services.trainer.train import next_message

PAIR = Example("p", [1], [2], [3], [-1.0], [-1.0], "k")


class _Source:
    def __init__(self, batches):
        self.batches = list(batches)

    def next_batch(self, size):
        item = self.batches.pop(0)
        if isinstance(item, Exception):
            raise item
        return item


def test_next_message_names_what_happened():
    stop = StopOnSignals("stopping")
    source = _Source([[PAIR], None, DataError("shard k refused")])
    assert next_message(source, 4, stop) == Batch([PAIR])
    assert next_message(source, 4, stop) == Stop(None)  # the data ran out
    assert next_message(source, 4, stop) == Failure("shard k refused")
    stop.signum = signal.SIGTERM
    stop.requested.set()
    assert next_message(_Source([]), 4, stop) == Stop("SIGTERM")  # no batch is taken once a signal came


def test_received_messages_are_checked():
    assert as_step(Stop("SIGINT")) == Stop("SIGINT")
    assert as_setup(Plan(3, "fp", None)) == Plan(3, "fp", None)
    with pytest.raises(TypeError, match="expected a Batch"):
        as_step({"stop": "SIGTERM"})
    with pytest.raises(TypeError, match="expected a Plan"):
        as_setup(Batch([PAIR]))
