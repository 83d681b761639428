"""Each strategy end to end through the real local broker (Tansu): inputs in, pairs and dead letters out."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import grpc
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from offdpo import records
from offdpo.kafka import make_producer
from offdpo.v1 import labeler_pb2, labeler_pb2_grpc, records_pb2, refscore_pb2, refscore_pb2_grpc
from services.labeler import inputs
from services.labeler.runner import build_labeler, close_labeler, run_file, run_kafka
from tests.stuck_consumer import FirstConsumerStuck

from .conftest import SAMPLES, read_deadletters, read_pair_records, read_pairs

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.stack


def run_cli(stack, kcfg, tmp_path, *args, timeout=180):
    env = {
        **os.environ,
        **stack.env(),
        "OFFDPO_TOPIC_PAIRS": kcfg.pairs_topic,
        "OFFDPO_TOPIC_DEADLETTER": kcfg.deadletter_topic,
        "OFFDPO_TOPIC_CANDIDATES": kcfg.candidates_topic,
        "OFFDPO_LABELER_STATE_DIR": str(tmp_path / "state"),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "services.labeler", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"CLI failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return proc


def test_cli_rules_on_sample_file(stack, kcfg, tmp_path):
    sample = SAMPLES / "candidates.jsonl"
    proc = run_cli(
        stack, kcfg, tmp_path, "label", str(sample), "--strategy", "rules", "--rules", str(SAMPLES / "rules.yaml")
    )
    assert "[labeler] " in proc.stderr and "24 inputs" in proc.stderr  # progress
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["summary"]["rules"] == {
        "inputs": 24,
        "pairs": 18,
        "duplicates": 1,
        "ties": 2,
        "inconsistent": 0,
        "unparseable": 0,
        "rejects": 3,
    }
    assert summary["dead_letters"] == 3
    assert proc.stdout.splitlines()[0].split()[:3] == ["strategy", "inputs", "pairs"]

    recs = read_pair_records(kcfg)
    pairs = [records.decode_pair(r.value) for r in recs]
    assert len(pairs) == 18 == len({p.pair_id for p in pairs})
    assert all(r.key.decode() == p.pair_id for r, p in zip(recs, pairs))
    by_set = {p.provenance.metadata["set_id"]: p for p in pairs}
    arith = by_set["arith-1"]
    assert (arith.chosen, arith.rejected) == ("4", "Sorry, I cannot do math.")
    assert arith.provenance.strategy == records_pb2.LABEL_STRATEGY_RULES
    assert arith.provenance.source == str(sample)
    assert "matches_reference" in arith.provenance.chosen_rule_hits
    assert "no_apology" not in arith.provenance.rejected_rule_hits
    assert arith.provenance.chosen_score > arith.provenance.rejected_score
    assert by_set["meta-1"].provenance.metadata["team"] == "math"
    assert "tie-1" not in by_set and "dup-1" not in by_set

    letters = sorted(read_deadletters(kcfg), key=lambda d: d.offset)
    assert [(d.topic, d.offset, d.error_type) for d in letters] == [
        (str(sample), 6, "decode_error"),
        (str(sample), 13, "invalid_candidate_set"),
        (str(sample), 19, "decode_error"),
    ]
    assert "not valid JSON" in letters[0].reason and "at least 2 answers" in letters[1].reason
    assert "missing 'prompt'" in letters[2].reason
    assert letters[0].original_value.startswith(b'{"id": "broken-json"') and letters[0].service == "labeler"

    # A rerun publishes nothing new: every pair id was acknowledged before (ledger), Kafka has 18 still.
    again = json.loads(
        run_cli(stack, kcfg, tmp_path, "label", str(sample), "--rules", str(SAMPLES / "rules.yaml"))
        .stdout.strip()
        .splitlines()[-1]
    )
    assert again["summary"]["rules"]["pairs"] == 0 and again["summary"]["rules"]["duplicates"] == 19
    assert len(read_pairs(kcfg)) == 18


def _labeler(lcfg, kcfg, **kw):
    return build_labeler(lcfg, kcfg, **kw)


def test_human_annotations_jsonl_and_csv(kcfg, lcfg, tmp_path):
    jl = tmp_path / "ann.jsonl"
    jl.write_text(
        "\n".join(
            [
                json.dumps({"prompt": "2+2?", "chosen": "4", "rejected": "5", "annotator": "alice"}),
                json.dumps(
                    {
                        "prompt": [{"role": "user", "content": "hi"}],
                        "answer_a": "hello",
                        "answer_b": "go away",
                        "verdict": "Good",
                        "annotator": "bob",
                    }
                ),
                json.dumps({"prompt": "x", "answer_a": "p", "answer_b": "q", "verdict": "Same", "annotator": "bob"}),
                json.dumps({"prompt": "x", "chosen": "p", "rejected": "q"}),  # no annotator
                json.dumps({"prompt": "2+2?", "chosen": "4", "rejected": "5", "annotator": "carol"}),  # duplicate pair
            ]
        )
        + "\n"
    )
    csv_path = tmp_path / "ann.csv"
    csv_path.write_text(
        'prompt,answer_a,answer_b,verdict,annotator\n"What is 3+3?",5,6,Bad,dave\n"What is 3+3?",6,7,Maybe,dave\n'
    )
    lab = _labeler(lcfg, kcfg)
    try:
        run_file(lab, jl, "annotations")
        summary = run_file(lab, csv_path, "annotations")
    finally:
        close_labeler(lab)
    assert summary["human"] == {
        "inputs": 7,
        "pairs": 3,
        "duplicates": 1,
        "ties": 1,
        "inconsistent": 0,
        "unparseable": 0,
        "rejects": 2,
    }
    pairs = {(p.chosen, p.rejected): p for p in read_pairs(kcfg)}
    assert set(pairs) == {("4", "5"), ("hello", "go away"), ("6", "5")}
    assert pairs[("4", "5")].provenance.annotator == "alice"
    assert pairs[("6", "5")].provenance.annotator == "dave"
    assert pairs[("6", "5")].provenance.verdicts[0].verdict == "Bad"
    assert all(p.provenance.strategy == records_pb2.LABEL_STRATEGY_HUMAN for p in pairs.values())
    letters = sorted((d.topic, d.offset) for d in read_deadletters(kcfg))
    assert letters == sorted([(str(jl), 4), (str(csv_path), 3)])


def test_imported_trl_jsonl_and_ultrafeedback_parquet(kcfg, lcfg, tmp_path):
    uf_rows = [
        {
            "prompt": f"q{i}",
            "prompt_id": f"id{i}",
            "score_chosen": 9.0,
            "score_rejected": float(i),
            "chosen": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"good {i}"}],
            "rejected": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"bad {i}"}],
        }
        for i in range(3)
    ]
    uf_rows.append(
        {
            "prompt": "q9",
            "prompt_id": "id9",
            "score_chosen": 1.0,
            "score_rejected": 1.0,
            "chosen": [{"role": "user", "content": "q9"}, {"role": "assistant", "content": "same"}],
            "rejected": [{"role": "user", "content": "q9"}, {"role": "assistant", "content": "same"}],
        }
    )
    parquet = tmp_path / "uf.parquet"
    pq.write_table(pa.Table.from_pylist(uf_rows), parquet)
    jl = tmp_path / "std.jsonl"
    jl.write_text(
        "\n".join(
            [
                json.dumps(
                    {
                        "prompt": [{"role": "user", "content": "q0"}],
                        "chosen": [{"role": "assistant", "content": "good 0"}],
                        "rejected": [{"role": "assistant", "content": "bad 0"}],
                    }
                ),  # same pair as parquet row 0
                json.dumps({"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}),
                "not json",
            ]
        )
        + "\n"
    )
    lab = _labeler(lcfg, kcfg)
    try:
        run_file(lab, parquet, "preferences")
        summary = run_file(lab, jl, "preferences")
    finally:
        close_labeler(lab)
    assert summary["imported"] == {
        "inputs": 7,
        "pairs": 4,
        "duplicates": 1,
        "ties": 0,
        "inconsistent": 0,
        "unparseable": 0,
        "rejects": 2,
    }
    pairs = read_pairs(kcfg)
    assert all(p.provenance.strategy == records_pb2.LABEL_STRATEGY_IMPORTED for p in pairs)
    uf1 = next(p for p in pairs if p.chosen == "good 1")
    assert uf1.prompt.chat.messages[0].content == "q1" and uf1.provenance.rejected_score == 1.0
    assert uf1.provenance.source == str(parquet) and uf1.provenance.metadata["prompt_id"] == "id1"
    assert any(p.prompt.text == "The sky is" for p in pairs)
    letters = {(d.topic, d.offset): d.reason for d in read_deadletters(kcfg)}
    assert set(letters) == {(str(parquet), 3), (str(jl), 3)}
    assert "identical" in letters[(str(parquet), 3)]


def test_reward_model_strategy(kcfg, lcfg, tmp_path, reward_model_dir):
    from services.labeler.reward import RewardModel

    cfg = dataclasses.replace(lcfg, strategy="reward_model", reward_model=str(reward_model_dir), reward_batch_size=3)
    path = tmp_path / "c.jsonl"
    sets = [
        {
            "id": f"s{i}",
            "prompt": [{"role": "user", "content": f"What is {i} + {i}?"}],
            "answers": [str(2 * i), f"{2 * i + 1}", f"The answer is {2 * i}."],
        }
        for i in range(4)
    ]
    sets.append({"id": "text", "prompt": "Hello", "answers": [" world", " there"]})
    sets.append({"id": "bad", "prompt": "x", "answers": ["only one"]})
    path.write_text("\n".join(json.dumps(s) for s in sets) + "\n")
    lab = _labeler(cfg, kcfg)
    try:
        summary = run_file(lab, path)
    finally:
        close_labeler(lab)
    assert summary["reward_model"]["pairs"] == 5 and summary["reward_model"]["rejects"] == 1
    model = RewardModel(reward_model_dir, batch_size=1)  # one at a time: batching must not change scores
    pairs = read_pairs(kcfg)
    assert len(pairs) == 5
    for p in pairs:
        prov = p.provenance
        assert prov.strategy == records_pb2.LABEL_STRATEGY_REWARD_MODEL
        assert prov.reward_model.startswith("tiny-reward@")
        assert prov.chosen_score > prov.rejected_score
        all_scores = json.loads(prov.metadata["reward_scores"])
        assert max(all_scores) == pytest.approx(prov.chosen_score, abs=1e-5)
        assert min(all_scores) == pytest.approx(prov.rejected_score, abs=1e-5)
        solo = model.score_texts([model.render(p.prompt, p.chosen), model.render(p.prompt, p.rejected)])
        assert solo == pytest.approx([prov.chosen_score, prov.rejected_score], abs=1e-4)
    (letter,) = read_deadletters(kcfg)
    assert letter.offset == 6 and "at least 2 answers" in letter.reason


def test_kafka_input_mode_commits_after_publishing(kcfg, lcfg):
    producer = make_producer(kcfg, "test-cands")
    good = []
    for i in range(6):
        cs = inputs.candidate_set_from_json(
            {
                "id": f"k{i}",
                "prompt": f"What is {i}*2? ",
                "answers": [str(i * 2), "Sorry, I cannot."],
                "reference": str(i * 2),
            }
        )
        good.append(cs)
        producer.send(kcfg.candidates_topic, key=cs.set_id.encode(), value=cs.SerializeToString())
    producer.send(kcfg.candidates_topic, key=b"junk", value=b"\xff\xfe not a protobuf")
    producer.send(
        kcfg.candidates_topic,
        key=b"one",
        value=labeler_pb2.CandidateSet(prompt=records.text_prompt("q"), answers=["a"]).SerializeToString(),
    )
    producer.flush(30)
    producer.close()

    cfg = dataclasses.replace(lcfg, group_id=f"lab-{kcfg.pairs_topic}")
    lab = _labeler(cfg, kcfg)
    try:
        summary = run_kafka(lab, kcfg, idle_exit_s=4)
    finally:
        close_labeler(lab)
    assert summary["rules"]["inputs"] == 8 and summary["rules"]["pairs"] == 6 and summary["rules"]["rejects"] == 2
    pairs = read_pairs(kcfg)
    assert sorted(p.chosen for p in pairs) == sorted(str(i * 2) for i in range(6))
    assert all(p.provenance.source == kcfg.candidates_topic for p in pairs)
    letters = read_deadletters(kcfg)
    assert sorted(d.original_key for d in letters) == [b"junk", b"one"]
    assert all(d.topic == kcfg.candidates_topic and d.partition >= 0 for d in letters)
    junk = next(d for d in letters if d.original_key == b"junk")
    assert "not a valid offdpo.v1.CandidateSet" in junk.reason or "unknown" in junk.reason

    # Offsets were committed: the same group sees nothing the second time.
    lab2 = _labeler(dataclasses.replace(cfg, ledger=False), kcfg)
    try:
        again = run_kafka(lab2, kcfg, idle_exit_s=4)
    finally:
        close_labeler(lab2)
    assert again.get("total", {}).get("inputs", 0) == 0


def test_kafka_input_mode_replaces_a_consumer_whose_commits_a_rebalance_keeps_refusing(kcfg, lcfg, monkeypatch, caplog):
    """A commit refused by a group rebalance neither ends the run nor loses the batch: it is redone
    (the ledger keeps each pair published once), and a consumer stuck refusing (kafka-python can stay
    in its client-side rebalancing state) is replaced after GROUP_REFUSALS_BEFORE_NEW_CONSUMER refusals in a row."""
    import logging

    from offdpo.kafka import GROUP_REFUSALS_BEFORE_NEW_CONSUMER
    from services.labeler import runner

    producer = make_producer(kcfg, "test-cands")
    for i in range(6):
        cs = inputs.candidate_set_from_json(
            {
                "id": f"r{i}",
                "prompt": f"What is {i}+1? ",
                "answers": [str(i + 1), "Sorry, I cannot."],
                "reference": str(i + 1),
            }
        )
        producer.send(kcfg.candidates_topic, key=cs.set_id.encode(), value=cs.SerializeToString())
    producer.flush(30)
    producer.close()

    make = FirstConsumerStuck(runner.make_consumer)
    monkeypatch.setattr(runner, "make_consumer", make)
    caplog.set_level(logging.WARNING, logger="services.labeler.runner")
    cfg = dataclasses.replace(lcfg, group_id=f"lab-rebal-{kcfg.pairs_topic}", batch_size=64)
    lab = _labeler(cfg, kcfg)
    try:
        run_kafka(lab, kcfg, idle_exit_s=4)
    finally:
        close_labeler(lab)
    assert make.refusals == GROUP_REFUSALS_BEFORE_NEW_CONSUMER
    assert len(make.consumers) == 2, "the stuck consumer was not replaced exactly once"
    assert any("replacing the Kafka consumer" in r.getMessage() for r in caplog.records)
    pairs = read_pairs(kcfg)
    assert sorted(p.chosen for p in pairs) == sorted(str(i + 1) for i in range(6)), "a pair lost or published twice"

    monkeypatch.setattr(runner, "make_consumer", make.real)
    lab2 = _labeler(dataclasses.replace(cfg, ledger=False), kcfg)
    try:
        again = run_kafka(lab2, kcfg, idle_exit_s=4)
    finally:
        close_labeler(lab2)
    assert again.get("total", {}).get("inputs", 0) == 0, "the replacement consumer did not commit"


def test_consume_cli_stops_cleanly_on_sigterm(stack, kcfg, lcfg, tmp_path):
    """`consume` as Kubernetes runs it: its health port answers SERVING for the liveness probe while the
    loop runs; SIGTERM ends it with exit 0 after its batch is committed (Python's default would kill it
    mid-batch with -15), and the summary is printed."""
    import signal
    import time

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from localdev.stack import free_port

    health_port = free_port()

    producer = make_producer(kcfg, "test-cands")
    for i in range(6):
        cs = inputs.candidate_set_from_json(
            {
                "id": f"t{i}",
                "prompt": f"What is {i}*3? ",
                "answers": [str(i * 3), "Sorry, I cannot."],
                "reference": str(i * 3),
            }
        )
        producer.send(kcfg.candidates_topic, key=cs.set_id.encode(), value=cs.SerializeToString())
    producer.flush(30)
    producer.close()
    group = f"lab-term-{kcfg.pairs_topic}"
    env = {
        **os.environ,
        **stack.env(),
        "OFFDPO_TOPIC_PAIRS": kcfg.pairs_topic,
        "OFFDPO_TOPIC_DEADLETTER": kcfg.deadletter_topic,
        "OFFDPO_TOPIC_CANDIDATES": kcfg.candidates_topic,
        "OFFDPO_LABELER_STATE_DIR": str(tmp_path / "state"),
        "OFFDPO_LABELER_GROUP": group,
        "OFFDPO_LABELER_GRPC_HOST": "127.0.0.1",
        "OFFDPO_LABELER_HEALTH_PORT": str(health_port),
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.labeler",
            "consume",
            "--strategy",
            "rules",
            "--rules",
            str(SAMPLES / "rules.yaml"),
            "--idle-exit-s",
            "600",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while len(read_pairs(kcfg)) < 6:
            assert proc.poll() is None, f"consume exited {proc.returncode}: {proc.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "consume did not publish the 6 pairs within 120 s"
            time.sleep(1)
        with grpc.insecure_channel(f"127.0.0.1:{health_port}") as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, f"exit {proc.returncode}\n{err[-3000:]}"
    assert "SIGTERM: finishing the batch in hand" in err
    assert json.loads(out.strip().splitlines()[-1])["summary"]["rules"]["pairs"] == 6
    lab = _labeler(dataclasses.replace(lcfg, group_id=group, ledger=False), kcfg)
    try:
        again = run_kafka(lab, kcfg, idle_exit_s=4)
    finally:
        close_labeler(lab)
    assert again.get("total", {}).get("inputs", 0) == 0, "the batch before SIGTERM was not committed"


class FakeRefScore(refscore_pb2_grpc.RefScoreServicer):
    def Generate(self, request, context):
        assert request.n == 2
        # The labeler authenticates as its team (refscore's auth interceptor reads this header).
        assert ("authorization", "Bearer labeler-team-token") in context.invocation_metadata()
        return refscore_pb2.GenerateResponse(
            answers=[refscore_pb2.GeneratedAnswer(text="Sorry, I cannot."), refscore_pb2.GeneratedAnswer(text="42")]
        )


def test_on_policy_candidates_from_refscore_generate(kcfg, lcfg, tmp_path):
    from services.labeler.runner import RefScoreGenerator

    server = grpc.server(futures.ThreadPoolExecutor(2))
    refscore_pb2_grpc.add_RefScoreServicer_to_server(FakeRefScore(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        gen = RefScoreGenerator(
            dataclasses.replace(
                lcfg,
                refscore_address=f"127.0.0.1:{port}",
                generate_max_tokens=32,
                generate_timeout_s=10,
                refscore_token="labeler-team-token",
            )
        )
        path = tmp_path / "gen.jsonl"
        path.write_text(
            json.dumps({"id": "g", "prompt": "6*7=", "answers": [], "generate_n": 2, "reference": "42"}) + "\n"
        )
        lab = _labeler(lcfg, kcfg, generator=gen)
        try:
            summary = run_file(lab, path)
        finally:
            close_labeler(lab)
            gen.close()
    finally:
        server.stop(0)
    assert summary["rules"]["pairs"] == 1
    (pair,) = read_pairs(kcfg)
    assert (pair.chosen, pair.rejected) == ("42", "Sorry, I cannot.")


def test_grpc_server(kcfg, lcfg):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    from services.labeler.server import SERVICE_NAME, start_server

    lab = _labeler(lcfg, kcfg)

    async def scenario():
        server, port = await start_server(lab, "127.0.0.1", 0)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub = labeler_pb2_grpc.LabelerStub(ch)
                sets = [
                    labeler_pb2.CandidateSet(
                        set_id="g1",
                        prompt=records.chat_prompt([("user", "2+2?")]),
                        answers=["Sorry, I cannot.", "4"],
                        reference="4",
                    ),
                    labeler_pb2.CandidateSet(
                        set_id="g2", prompt=records.text_prompt("Name a color:"), answers=[" red", " blue"]
                    ),
                ]
                resp = await stub.SubmitCandidates(
                    labeler_pb2.SubmitCandidatesRequest(sets=sets, strategy="rules"), timeout=60
                )
                again = await stub.SubmitCandidates(labeler_pb2.SubmitCandidatesRequest(sets=sets[:1]), timeout=60)
                bad = labeler_pb2.SubmitCandidatesRequest(
                    sets=[
                        sets[0],
                        labeler_pb2.CandidateSet(set_id="x", prompt=records.text_prompt("q"), answers=["a", "a"]),
                    ]
                )
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.SubmitCandidates(bad, timeout=30)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert err.value.details() == "sets[1] ('x'): answers contain duplicates: each answer must be distinct"
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.SubmitCandidates(labeler_pb2.SubmitCandidatesRequest(), timeout=30)
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "at least one" in err.value.details()

                j = labeler_pb2.HumanJudgement(
                    prompt=records.text_prompt("Best fruit?"),
                    answer_a="apple",
                    answer_b="rock",
                    verdict="Good",
                    annotator="erin",
                )
                jr = await stub.SubmitJudgement(j, timeout=30)
                jr2 = await stub.SubmitJudgement(j, timeout=30)
                same = await stub.SubmitJudgement(
                    labeler_pb2.HumanJudgement(
                        prompt=records.text_prompt("q"), answer_a="x", answer_b="y", verdict="Same", annotator="erin"
                    )
                )
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.SubmitJudgement(
                        labeler_pb2.HumanJudgement(
                            prompt=records.text_prompt("q"), answer_a="x", answer_b="y", verdict="Good"
                        ),
                        timeout=30,
                    )
                assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "annotator is required" in err.value.details()

                health = await health_pb2_grpc.HealthStub(ch).Check(
                    health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=10
                )
                refl = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
                    iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
                )
                services = [s.name async for r in refl for s in r.list_services_response.service]
                return resp, again, jr, jr2, same, health, services
        finally:
            await server.stop(grace=1)

    try:
        resp, again, jr, jr2, same, health, services = asyncio.run(scenario())
    finally:
        close_labeler(lab)
    r1, r2 = resp.results
    assert r1.set_id == "g1" and len(r1.pair_ids) == 1 and r1.error == ""
    assert r2.ties == 1 and not r2.pair_ids
    assert list(again.results[0].duplicate_pair_ids) == list(r1.pair_ids) and not again.results[0].pair_ids
    assert jr.published and not jr.duplicate and jr2.duplicate and not jr2.published and jr.pair_id == jr2.pair_id
    assert same.pair_id == "" and not same.published
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert SERVICE_NAME in services and "grpc.health.v1.Health" in services
    pairs = {p.pair_id: p for p in read_pairs(kcfg)}
    assert set(pairs) == {r1.pair_ids[0], jr.pair_id}
    assert pairs[r1.pair_ids[0]].chosen == "4" and pairs[jr.pair_id].provenance.annotator == "erin"
    assert pairs[r1.pair_ids[0]].provenance.source.startswith("grpc:")
