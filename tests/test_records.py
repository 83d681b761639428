import pytest

from offdpo import records
from offdpo.v1 import records_pb2


def _fingerprint():
    return records.with_fingerprint_id(
        records_pb2.ReferenceFingerprint(
            model_id="tiny",
            weights_hash="w",
            tokenizer_hash="t",
            chat_template_hash="c",
            dtype="float32",
            engine="vllm",
            engine_version="0.32.0",
        )
    )


def _scored(i: int) -> records_pb2.ScoredPair:
    pair = records.make_pair(records.text_prompt(f"q{i}"), f"good {i}", f"bad {i}")
    return records_pb2.ScoredPair(
        pair=pair,
        prompt_token_ids=[1, 2, i],
        chosen_token_ids=[5, 6],
        rejected_token_ids=[7],
        chosen_logprobs=[-0.5, -1.25],
        rejected_logprobs=[-2.0],
        chosen_logprob_sum=-1.75,
        rejected_logprob_sum=-2.0,
    )


def test_parquet_shard_round_trip_and_determinism():
    fp = _fingerprint()
    rows = [_scored(i) for i in range(5)]
    data = records.scored_pairs_to_parquet(rows, fp)
    assert data == records.scored_pairs_to_parquet(rows, fp), "same rows must give the same bytes"
    shard = records.read_shard(data)
    assert shard.fingerprint == fp
    back = list(shard.rows())
    assert [r.pair for r in back] == [r.pair for r in rows]
    assert list(back[3].prompt_token_ids) == [1, 2, 3]
    assert list(back[0].chosen_logprobs) == [-0.5, -1.25]
    assert back[0].fingerprint.fingerprint_id == fp.fingerprint_id


def test_shard_writer_refuses_misaligned_logprobs():
    row = _scored(0)
    del row.chosen_logprobs[-1]
    with pytest.raises(records.RecordError, match="1 chosen log-probs for 2 chosen tokens"):
        records.scored_pairs_to_parquet([row], _fingerprint())


@pytest.mark.parametrize("damage", ["truncate", "garbage", "flip"])
def test_corrupt_shard_is_refused(damage):
    data = records.scored_pairs_to_parquet([_scored(0)], _fingerprint())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "garbage":
        data = b"not parquet at all" * 10
    else:
        data = data[:4] + bytes(b ^ 0xFF for b in data[4:40]) + data[40:]
    with pytest.raises(records.RecordError):
        records.read_shard(data)


def test_decode_pair_rejects_bad_input_with_reasons():
    good = records.make_pair(records.chat_prompt([("user", "hi")]), "hello", "go away")
    assert records.decode_pair(good.SerializeToString()) == good
    with pytest.raises(records.RecordError, match="empty"):
        records.decode_pair(b"")
    with pytest.raises(records.RecordError, match="not a valid offdpo.v1.PreferencePair"):
        records.decode_pair(b"\xff\xff\xff\xff")
    with pytest.raises(records.RecordError, match="over the limit"):
        records.decode_pair(b"x" * 100, max_bytes=10)
    # A different message type parses as unknown fields: refused, not silently half-read.
    other = records_pb2.DeadLetter(reason="x", offset=5).SerializeToString()
    with pytest.raises(records.RecordError):
        records.decode_pair(other)
    tampered = records_pb2.PreferencePair()
    tampered.CopyFrom(good)
    tampered.chosen = "something else"
    with pytest.raises(records.RecordError, match="does not match its content"):
        records.decode_pair(tampered.SerializeToString())
    same = records_pb2.PreferencePair()
    same.CopyFrom(good)
    same.rejected = same.chosen
    same.pair_id = records.pair_id(same.prompt, same.chosen, same.rejected)
    with pytest.raises(records.RecordError, match="identical"):
        records.decode_pair(same.SerializeToString())


def test_shard_keys_are_derived_from_positions_and_validated():
    key = records.shard_key("abc123", "offdpo.pairs.v1", 2, 100, 199)
    assert key == "scores/abc123/offdpo.pairs.v1/p0002-000000000100-000000000199.parquet"
    assert records.parse_shard_key(key) == (2, 100, 199)
    with pytest.raises(ValueError, match="not allowed"):
        records.shard_key("../etc", "t", 0, 0, 1)
    with pytest.raises(ValueError, match="not allowed"):
        records.shard_key("abc", "a/b", 0, 0, 1)
