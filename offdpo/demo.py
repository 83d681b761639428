"""`make demo`: the main job end to end on the local stack with the local test model.

Current slice (foundation): start the stack, build the test model, publish a preference pair to
Kafka, consume it in a consumer group, store it in S3 and read it back. Later slices replace the
middle with the real pipeline (labeler -> refscore -> trainer).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

from offdpo import records
from offdpo.kafka import make_consumer, make_producer
from offdpo.s3 import ObjectStore
from offdpo.stack import LocalStack
from offdpo.testmodel import ensure_test_model
from offdpo.v1 import records_pb2

log = logging.getLogger("offdpo.demo")


def main(args) -> int:
    workdir = Path(args.workdir)
    stack = LocalStack()
    print(f"[1/4] starting the local stack (S3 {stack.s3.endpoint}, Kafka {stack.kafka.bootstrap_servers})")
    stack.up()
    try:
        print("[2/4] building the tiny test model")
        model_dir = ensure_test_model(workdir / "models" / "tiny", size="tiny")
        print(f"      {model_dir}")

        print("[3/4] publishing a preference pair and consuming it")
        pair = records.make_pair(records.chat_prompt([("user", "What is 2+2?")]), "4", "5",
                                 records_pb2.Provenance(strategy=records_pb2.LABEL_STRATEGY_RULES, source="demo"))
        producer = make_producer(stack.kafka, "demo")
        producer.send(stack.kafka.pairs_topic, key=pair.pair_id.encode(), value=pair.SerializeToString()).get(30)
        producer.close()
        consumer = make_consumer(stack.kafka, f"demo-{int(time.time())}", [stack.kafka.pairs_topic])
        got = None
        deadline = time.monotonic() + 60
        while got is None and time.monotonic() < deadline:
            for recs in consumer.poll(timeout_ms=500).values():
                for rec in recs:
                    candidate = records.decode_pair(rec.value)
                    if candidate.pair_id == pair.pair_id:
                        got = candidate
        if got is None:
            raise TimeoutError("the pair did not come back from Kafka within 60 s")

        print("[4/4] storing it in S3 and reading it back")
        store = ObjectStore(stack.s3)
        key = f"demo/pairs/{got.pair_id}.pb"
        store.put_bytes(key, got.SerializeToString())
        back = records.decode_pair(store.get_bytes(key))
        consumer.commit()
        consumer.close()
        assert back == pair
        print(f"OK: pair {pair.pair_id} went through Kafka ({stack.kafka.pairs_topic}) and S3 (s3://{store.bucket}/{key})")
        return 0
    finally:
        if not args.keep_stack:
            stack.down()
