"""Hypothesis over every decoder of untrusted bytes the services use: random, truncated and
bit-flipped input may only ever raise the documented RecordError (never crash another way); and over
the auth layer's untrusted inputs (the `authorization` metadata a caller sends, the auth file), which
may only refuse (no token but a team's own authenticates; a bad file raises ConfigError)."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from offdpo import records
from offdpo.errors import ConfigError
from offdpo.grpc_auth.auth import TokenStore, parse_auth, token_hash
from offdpo.grpc_auth.interceptor import bearer_token
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


# -- the auth layer's untrusted inputs (offdpo/grpc_auth): what a caller sends before it is trusted ----------
_VALID_AUTH = (
    b"teams:\n"
    b"  alignment:\n"
    b"    token_sha256: [" + token_hash("team-token").encode() + b"]\n"
    b"    client_cn: [alignment-trainer]\n"
    b"    methods: [Score, GetModelInfo]\n"
    b"    tokens_per_minute: 1000\n"
    b"    max_concurrent: 2\n"
)
# grpc delivers a text metadata value as printable ASCII (a str) and a -bin value as bytes
_ASCII = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=200)


def test_authorization_metadata_never_authenticates_by_accident(tmp_path, fault_results):
    """`authorization` values as a caller may send them: parsed without error, and no token but the
    team's own authenticates (the interceptor refuses the rest with UNAUTHENTICATED)."""
    auth = tmp_path / "teams.yaml"
    auth.write_bytes(_VALID_AUTH)
    store = TokenStore(str(auth), methods=frozenset({"Score", "ScoreStream", "Generate", "GetModelInfo"}))
    seen = {"examples": 0}

    value = st.one_of(
        _ASCII,
        _ASCII.map(lambda t: f"Bearer {t}"),
        _ASCII.map(lambda t: f"bearer   {t}  "),
        st.binary(max_size=200),
        st.just("Bearer team-token"),
    )
    key = st.one_of(st.just("authorization"), _ASCII.map(str.lower))

    @FUZZ
    @given(st.lists(st.tuples(key, value), max_size=4))
    def run(metadata):
        token = bearer_token(metadata)
        assert token is None or isinstance(token, str)
        team = store.authenticate(token) if token else None
        assert team is None or token == "team-token", f"{token!r} authenticated as {team}"
        seen["examples"] += 1

    run()
    assert store.authenticate("team-token") is not None and store.authenticate("team-token ") is None
    fault_results.add_fuzz({**(fault_results.fuzz or {}), "auth metadata examples": seen["examples"]})


def test_auth_files_only_raise_config_error(fault_results):
    """A corrupt or hostile auth file (a Secret someone edits) is refused with ConfigError, never
    another exception: the server keeps its previous teams (TokenStore.maybe_reload)."""
    seen = {"accepted": 0, "refused": 0}
    flipped = st.tuples(st.integers(0, len(_VALID_AUTH) - 1), st.integers(0, 7)).map(
        lambda t: _VALID_AUTH[: t[0]] + bytes([_VALID_AUTH[t[0]] ^ (1 << t[1])]) + _VALID_AUTH[t[0] + 1 :]
    )
    truncated = st.integers(0, len(_VALID_AUTH)).map(lambda n: _VALID_AUTH[:n])
    yaml_like = st.recursive(
        st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=20)),
        lambda children: st.one_of(
            st.lists(children, max_size=3), st.dictionaries(st.text(max_size=10), children, max_size=3)
        ),
        max_leaves=12,
    ).map(lambda doc: json.dumps({"teams": doc}).encode())

    @FUZZ
    @given(st.one_of(flipped, truncated, yaml_like, st.binary(max_size=300)))
    def run(data):
        try:
            parse_auth(data, "fuzz", frozenset({"Score", "ScoreStream", "Generate", "GetModelInfo"}))
            seen["accepted"] += 1
        except ConfigError as exc:
            assert str(exc).startswith("fuzz"), "the refusal names the file"
            seen["refused"] += 1

    run()
    assert seen["refused"] > 0
    fault_results.add_fuzz({**(fault_results.fuzz or {}), "auth file examples": seen["accepted"] + seen["refused"]})
