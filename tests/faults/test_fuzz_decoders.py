"""Hypothesis over every decoder of untrusted bytes the services use: random, truncated and
bit-flipped input may only ever raise the documented RecordError (never crash another way)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from offdpo import records
from offdpo.kafka import MAX_RECORD_BYTES
from offdpo.v1 import labeler_pb2, records_pb2
from services.labeler import inputs
from tests.pairs import make_pairs

pytestmark = pytest.mark.faults

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
STATS: dict[str, int] = {}


def _valid_samples() -> list[bytes]:
    pair = make_pairs(1, "fuzz")[0]
    event = records_pb2.ShardReady(
        bucket="b",
        object_key="scores/x/t/p0000-000000000000-000000000003.parquet",
        row_count=2,
        pair_ids=["a", "b"],
        sha256="0" * 64,
    )
    cs = labeler_pb2.CandidateSet(set_id="s", answers=["4", "5"], reference="4")
    cs.prompt.CopyFrom(records.chat_prompt([("user", "2+2?")]))
    return [pair.SerializeToString(), event.SerializeToString(), cs.SerializeToString()]


def _mutations():
    samples = _valid_samples()
    raw = st.binary(max_size=2048)
    truncated = st.tuples(st.sampled_from(samples), st.floats(0, 1)).map(lambda t: t[0][: int(len(t[0]) * t[1])])
    flipped = st.tuples(st.sampled_from(samples), st.integers(0, 10_000), st.integers(0, 7)).map(
        lambda t: (
            t[0][: t[1] % len(t[0])] + bytes([t[0][t[1] % len(t[0])] ^ (1 << t[2])]) + t[0][t[1] % len(t[0]) + 1 :]
        )
    )
    spliced = st.tuples(st.sampled_from(samples), raw).map(lambda t: t[0] + t[1])
    return st.one_of(raw, truncated, flipped, spliced)


def _decode_shard_event(data: bytes):
    # exactly what services/trainer/data.py StreamSource._handle does with a record value
    return records.decode(records.ShardReady, data, MAX_RECORD_BYTES, "shard-ready event t[0]@0")


DECODERS = {
    "offdpo.records.decode_pair (refscore worker)": records.decode_pair,
    "ShardReady decode (trainer StreamSource)": _decode_shard_event,
    "labeler inputs.candidate_set_from_record": lambda d: inputs.candidate_set_from_record(d, 4 * 1024 * 1024),
    "offdpo.records.read_shard (trainer)": records.read_shard,
}


@pytest.mark.parametrize("name", list(DECODERS))
def test_decoders_only_raise_record_error(name, fault_results):
    decode = DECODERS[name]
    seen = {"accepted": 0, "refused": 0}

    @FUZZ
    @given(_mutations())
    def run(data):
        try:
            decode(data)
            seen["accepted"] += 1
        except records.RecordError as exc:
            assert str(exc), "a refusal says why"
            seen["refused"] += 1

    run()
    assert seen["refused"] > 0
    STATS[name] = seen["accepted"] + seen["refused"]
    fault_results.add_fuzz({**(fault_results.fuzz or {}), f"decoder examples: {name}": STATS[name]})


def test_oversized_and_empty_inputs_are_refused_with_a_reason():
    for decode in (records.decode_pair, _decode_shard_event):
        for data in (None, b"", b"\x0a" + b"\x00" * (MAX_RECORD_BYTES + 1)):
            with pytest.raises(records.RecordError, match="empty|over the limit"):
                decode(data)
