"""The broker profile (offdpo.broker_profile): the local broker's workarounds apply only where the
profile says `tansu`; the production profile carries none of them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from localdev.stack import LocalStack
from offdpo import broker_profile
from offdpo.config import ConfigError, KafkaConfig
from offdpo.kafka import make_consumer, make_producer

REPO = Path(__file__).resolve().parent.parent


def test_production_profile_is_plain_kafka():
    cfg = KafkaConfig()
    assert cfg.broker_profile == "kafka"
    assert broker_profile.producer_settings(cfg) == {"enable_idempotence": True}
    assert broker_profile.consumer_settings(cfg) == {"isolation_level": "read_committed"}
    assert isinstance(broker_profile.poller(cfg), broker_profile.PlainPoller)
    watch = broker_profile.assignment_watch(cfg, ["t"])
    assert isinstance(watch, broker_profile.AssignmentWatch) and watch.after_s == float("inf")  # never replaces


def test_tansu_profile_turns_on_each_workaround():
    cfg = KafkaConfig(broker_profile="tansu", offset_hole_wait_ms=7000)
    assert broker_profile.producer_settings(cfg) == {"enable_idempotence": False}
    assert broker_profile.consumer_settings(cfg) == {}
    guard = broker_profile.poller(cfg)
    assert isinstance(guard, broker_profile.OffsetHoleGuard) and guard.wait_s == 7.0
    watch = broker_profile.assignment_watch(cfg, ["t"])
    assert isinstance(watch, broker_profile.AssignmentWatch) and watch.after_s == 60.0
    off = KafkaConfig(broker_profile="tansu", offset_hole_wait_ms=0)
    assert isinstance(broker_profile.poller(off), broker_profile.PlainPoller)


def test_unknown_profile_is_a_config_error_naming_the_choices():
    with pytest.raises(ConfigError, match=r"OFFDPO_KAFKA_BROKER_PROFILE='redpanda': expected one of kafka, tansu"):
        KafkaConfig.from_env({"OFFDPO_KAFKA_BROKER_PROFILE": "redpanda"})


def test_the_local_stack_runs_the_tansu_profile(tmp_path):
    local = LocalStack.for_tests(tmp_path)
    assert local.kafka.broker_profile == "tansu"
    # Services started on the stack read their config from this environment.
    assert KafkaConfig.from_env(local.env()).broker_profile == "tansu"


def test_client_factories_apply_the_profile():
    # Built without a broker to reach (kafka-python connects lazily with api_version given).
    common = {"bootstrap_servers": "127.0.0.1:1"}
    for profile, idempotent, isolation in (("kafka", True, "read_committed"), ("tansu", False, "read_uncommitted")):
        cfg = KafkaConfig(broker_profile=profile, **common)
        producer = make_producer(cfg, "t", api_version=(3, 7))
        consumer = make_consumer(cfg, "g", api_version=(3, 7))
        try:
            assert producer.config["enable_idempotence"] is idempotent
            assert consumer.config["isolation_level"] == isolation
        finally:
            producer.close(timeout=0)
            consumer.close()


def test_no_broker_workaround_outside_the_profile():
    # The workarounds are named here and nowhere else in the product (offdpo, services, cli).
    names = re.compile(r"OffsetHoleGuard|AssignmentWatch|enable_idempotence|read_(un)?committed")
    offenders = [
        f"{path.relative_to(REPO)}:{n}"
        for top in ("offdpo", "services", "cli")
        for path in sorted((REPO / top).rglob("*.py"))
        if path.name != "broker_profile.py" and "/v1/" not in str(path)
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if names.search(line)
    ]
    assert offenders == []
