"""Records a Kafka consumer never reads on the local broker, with and without OffsetHoleGuard.

Tansu's S3 storage reserves a batch's offsets before it writes the batch object, so while several
producers write one partition a fetch can return a later batch first, and a plain consumer's position
moves past the earlier one for good (the demo's scoring stalled on it in a CI run, 2026-11-30). Each round: a fresh
local stack, one single-partition topic, `--producers` producers sending `--records` records each
(flushing every 3, so many produce requests overlap), and two consumer groups reading at the same time,
one polling plainly and one through the guard. Written to bench/results/offset_holes.json:
per round, the records each group read and the holes the guard waited for.

    python -m bench.offset_holes                 # 4 rounds of 8 producers x 400 records
    python -m bench.offset_holes --rounds 10
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import threading
import time
from pathlib import Path

from bench.machine import stamp
from localdev.stack import LocalStack
from offdpo.broker_profile import OffsetHoleGuard
from offdpo.kafka import ensure_topics, make_consumer, make_producer

TOPIC = "bench.holes"


class _CountHoles(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.holes = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "not readable yet" in record.getMessage():
            self.holes += 1


def one_round(producers: int, records: int, workdir: Path) -> dict:
    holes = _CountHoles()
    logging.getLogger("offdpo.kafka").addHandler(holes)
    logging.getLogger("offdpo.kafka").setLevel(logging.INFO)
    try:
        with LocalStack.for_tests(workdir) as stack:
            ensure_topics(stack.kafka, [TOPIC], partitions=1)
            guard = OffsetHoleGuard(wait_s=60)
            groups = {
                "plain": make_consumer(stack.kafka, "plain", [TOPIC]),
                "guarded": make_consumer(stack.kafka, "guarded", [TOPIC]),
            }

            def poll(name: str) -> dict:
                consumer = groups[name]
                return guard.poll(consumer, timeout_ms=100) if name == "guarded" else consumer.poll(timeout_ms=100)

            for name, consumer in groups.items():  # both hold the partition before anything is written
                deadline = time.monotonic() + 60
                while not consumer.assignment():
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"consumer group {name} got no partition within 60 s")
                    poll(name)
            seen: dict[str, set[bytes]] = {name: set() for name in groups}

            def produce(i: int) -> None:
                producer = make_producer(stack.kafka, f"bench-{i}")
                for j in range(records):
                    producer.send(TOPIC, value=f"{i}-{j}".encode(), partition=0)
                    if j % 3 == 0:
                        producer.flush()
                producer.close()

            threads = [threading.Thread(target=produce, args=(i,)) for i in range(producers)]
            started = time.monotonic()
            for t in threads:
                t.start()
            done_at: float | None = None
            while done_at is None or time.monotonic() - done_at < 10:  # then 10 s to read what is left
                for name in groups:
                    for recs in poll(name).values():
                        seen[name].update(r.value for r in recs)
                if done_at is None and not any(t.is_alive() for t in threads):
                    done_at = time.monotonic()
            for consumer in groups.values():
                consumer.close()
    finally:
        logging.getLogger("offdpo.kafka").removeHandler(holes)
    return {
        "sent": producers * records,
        "read_plain": len(seen["plain"]),
        "read_guarded": len(seen["guarded"]),
        "holes_waited_for": holes.holes,
        "produce_s": round(done_at - started, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--producers", type=int, default=8)
    parser.add_argument("--records", type=int, default=400, help="records per producer")
    parser.add_argument("--out", default="bench/results/offset_holes.json")
    args = parser.parse_args(argv)
    logging.getLogger("kafka").setLevel(logging.CRITICAL)  # the stack's start-up connection noise
    rounds = []
    for n in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="offdpo-holes-") as tmp:
            result = one_round(args.producers, args.records, Path(tmp))
        rounds.append(result)
        print(f"round {n + 1}/{args.rounds}: {json.dumps(result)}", flush=True)
    summary = {
        **stamp(),
        "settings": vars(args),
        "rounds": rounds,
        "lost_plain": sum(r["sent"] - r["read_plain"] for r in rounds),
        "lost_guarded": sum(r["sent"] - r["read_guarded"] for r in rounds),
        "rounds_plain_lost_records": sum(r["read_plain"] < r["sent"] for r in rounds),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1) + "\n")
    print(
        f"plain consumer lost {summary['lost_plain']} records in {summary['rounds_plain_lost_records']} of "
        f"{args.rounds} rounds; through OffsetHoleGuard {summary['lost_guarded']} -> {out}"
    )
    return 0 if summary["lost_guarded"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
