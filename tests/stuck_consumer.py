"""A make_consumer stand-in whose first consumer is stuck in kafka-python's client-side rebalancing
state: every commit refused by a rebalance that never completes. Later consumers are real."""

from __future__ import annotations

from kafka.errors import RebalanceInProgressError


class FirstConsumerStuck:
    def __init__(self, real_make_consumer):
        self.real = real_make_consumer
        self.consumers: list = []
        self.refusals = 0

    def __call__(self, *args, **kwargs):
        consumer = self.real(*args, **kwargs)
        self.consumers.append(consumer)
        if len(self.consumers) == 1:
            consumer.commit = self._refuse
        return consumer

    def _refuse(self, *args, **kwargs):
        self.refusals += 1
        raise RebalanceInProgressError("injected: the group is rebalancing")
