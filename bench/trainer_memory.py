"""Peak memory of the trainer's data path: a backlog of shard-ready events, and a long replay.

    python -m bench.trainer_memory                 # both cases (--impls current,head: also git HEAD's code)
    python -m bench.trainer_memory --events 500 --pairs-per-event 64 --replay-pairs 100000

What runs: the trainer's own data sources (services/trainer/data.py) in-process, without a model, each
case in a fresh subprocess so its peak RSS (getrusage ru_maxrss) is its own:
  stream  StreamSource drains a backlog of N shard-ready events (in-memory Kafka from tests/fakes.py),
          taking batches of --batch pairs, marking them trained, and writing its checkpoint state
          every 10 batches, as the training loop does;
  replay  ReplaySource over a prefix of --replay-pairs pairs in shards of --replay-shard pairs, one
          epoch, batches of --batch.
Shards are real Parquet files made with offdpo.records (small synthetic rows: prompt 8 tokens,
answers 8 tokens) and read from a local folder through the ObjectStore methods the sources use, so
the store itself holds nothing in memory. `--impl head` loads data.py as committed at git HEAD (the
code before bounded memory) for comparison. The model's own memory is not included: it is the same
for both, and bench/trainer.py measures it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.machine import stamp

REPO = Path(__file__).resolve().parents[1]


class DirStore:
    """The ObjectStore methods the sources use, over files in a folder."""

    def __init__(self, root: Path):
        self.root, self.bucket = Path(root), "local"

    def get_bytes(self, key: str, max_bytes: int | None = None) -> bytes:
        path = self.root / key
        if max_bytes is not None and path.stat().st_size > max_bytes:
            raise ValueError(f"object {key} is {path.stat().st_size} bytes, over the limit of {max_bytes}")
        return path.read_bytes()

    def list_keys(self, prefix: str) -> list[str]:
        return sorted(
            str(p.relative_to(self.root))
            for p in self.root.rglob("*")
            if p.is_file() and str(p.relative_to(self.root)).startswith(prefix)
        )

    def put_bytes(self, key: str, data: bytes) -> None:
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def _fingerprint():
    from offdpo.records import ReferenceFingerprint, with_fingerprint_id

    return with_fingerprint_id(
        ReferenceFingerprint(model_id="mem", weights_hash="w", tokenizer_hash="t", dtype="float32")
    )


def write_shards(store: DirStore, topic: str, shards: int, per_shard: int, seed: int) -> list[tuple[str, list[str]]]:
    """`shards` Parquet shards of `per_shard` distinct small pairs; returns (key, pair ids) of each."""
    import random

    from offdpo.records import ScoredPair, make_pair, scored_pairs_to_parquet, shard_key, text_prompt

    fp = _fingerprint()
    rng = random.Random(seed)
    out = []
    for s in range(shards):
        rows = []
        for i in range(per_shard):
            n = s * per_shard + i
            c, r = [rng.randrange(100, 200) for _ in range(8)], [rng.randrange(300, 400) for _ in range(8)]
            row = ScoredPair(
                prompt_token_ids=[1] + [rng.randrange(400, 900) for _ in range(7)],
                chosen_token_ids=c,
                rejected_token_ids=r,
                chosen_logprobs=[-1.5] * 8,
                rejected_logprobs=[-2.5] * 8,
                chosen_logprob_sum=-12.0,
                rejected_logprob_sum=-20.0,
            )
            row.pair.CopyFrom(make_pair(text_prompt(f"{topic} prompt {n}"), f"chosen {n}", f"rejected {n}"))
            row.fingerprint.CopyFrom(fp)
            rows.append(row)
        key = shard_key(fp.fingerprint_id, topic, 0, s * per_shard, (s + 1) * per_shard - 1)
        store.put_bytes(key, scored_pairs_to_parquet(rows, fp))
        out.append((key, [r.pair.pair_id for r in rows]))
    return out


def _data_module(impl: str):
    if impl == "current":
        from services.trainer import data

        return data
    src = subprocess.run(
        ["git", "show", "HEAD:services/trainer/data.py"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    path = Path(tempfile.mkdtemp()) / "data_head.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("data_head", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["data_head"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(args) -> dict:
    data = _data_module(args.impl)
    import pyarrow  # noqa: F401 - imported before the baseline, as the trainer has it loaded

    from offdpo.config import KafkaConfig
    from offdpo.kafka import DeadLetterSink
    from offdpo.records import ShardReady
    from tests.fakes import FakeBroker, FakeConsumer, FakeProducer

    store = DirStore(Path(args.dir))
    fp = _fingerprint()
    baseline = _rss_now()
    t0 = time.perf_counter()
    trained, state_bytes = 0, 0
    if args.child == "stream":
        index = json.loads((Path(args.dir) / "stream-index.json").read_text())
        broker = FakeBroker()
        for key, pair_ids in index:
            event = ShardReady(bucket=store.bucket, object_key=key, row_count=len(pair_ids), pair_ids=pair_ids)
            event.fingerprint.CopyFrom(fp)
            broker.append("shards", event.SerializeToString(), key.encode(), partition=0)
        del index
        baseline = _rss_now()  # the backlog itself (in the fake broker) is not the trainer's memory
        consumer = FakeConsumer(broker, "shards", group="mem")
        sink = DeadLetterSink(FakeProducer(broker), KafkaConfig(deadletter_topic="dead"), "trainer")
        source = data.StreamSource(store, consumer, sink, fp, set(), 64, "refuse", 0, 0.01, "shards")
        if args.impl == "current":
            source.max_poll_records = args.max_poll_records
        batches = 0
        while (batch := source.next_batch(args.batch)) is not None:
            source.mark_trained(batch)
            trained += len(batch)
            batches += 1
            if batches % 10 == 0:
                state_bytes = len(json.dumps(source.state()))
        state_bytes = len(json.dumps(source.state()))
    else:
        source = data.ReplaySource(store, "scores/", 1, 0, fp, set(), 64, "refuse")
        while (batch := source.next_batch(args.batch)) is not None:
            trained += len(batch)
        state_bytes = len(json.dumps(source.state()))
    return {
        "case": args.child,
        "impl": args.impl,
        "pairs_trained": trained,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rss_before_bytes": baseline,
        "checkpoint_state_bytes": state_bytes,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", choices=("stream", "replay"), help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    p.add_argument("--impl", choices=("current", "head"), default="current", help=argparse.SUPPRESS)
    p.add_argument("--events", type=int, default=500, help="shard-ready events in the backlog")
    p.add_argument("--pairs-per-event", type=int, default=64)
    p.add_argument("--replay-pairs", type=int, default=100_000)
    p.add_argument("--replay-shard", type=int, default=1000, help="pairs per shard in the replay prefix")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--max-poll-records", type=int, default=16)
    p.add_argument(
        "--impls",
        default="current",
        help="comma-separated: current, head (git HEAD's data.py, for comparison: its replay takes minutes)",
    )
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "trainer-memory.json"))
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        store = DirStore(Path(tmp))
        t0 = time.perf_counter()
        index = write_shards(store, "backlog", args.events, args.pairs_per_event, seed=1)
        (Path(tmp) / "stream-index.json").write_text(json.dumps(index))
        # The replay prefix is scores/<fp>/replay/...; the backlog's shards are under another topic.
        replay_root = Path(tmp) / "replay-store"
        write_shards(DirStore(replay_root), "replay", args.replay_pairs // args.replay_shard, args.replay_shard, 2)
        print(f"shards written in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        results = []
        for impl in args.impls.split(","):
            for case, folder in (("stream", tmp), ("replay", str(replay_root))):
                cmd = [sys.executable, "-m", "bench.trainer_memory", "--child", case, "--dir", folder, "--impl", impl]
                cmd += ["--batch", str(args.batch), "--max-poll-records", str(args.max_poll_records)]
                proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=3600)
                if proc.returncode != 0:
                    print(proc.stderr[-3000:], file=sys.stderr)
                    return 1
                res = json.loads(proc.stdout.strip().splitlines()[-1])
                results.append(res)
                print(
                    f"{case:6s} {impl:7s} peak RSS {res['peak_rss_bytes'] / 2**20:7.1f} MiB "
                    f"(+{(res['peak_rss_bytes'] - res['rss_before_bytes']) / 2**20:6.1f} MiB over the start), "
                    f"state {res['checkpoint_state_bytes'] / 1024:8.1f} KiB, {res['pairs_trained']} pairs, "
                    f"{res['seconds']} s",
                    file=sys.stderr,
                )
    out = {
        **stamp(),
        "workload": {
            "stream": f"{args.events} shard-ready events x {args.pairs_per_event} pairs, batches of {args.batch}, "
            f"max_poll_records {args.max_poll_records} (current code; HEAD polled up to 500)",
            "replay": f"{args.replay_pairs} pairs in shards of {args.replay_shard}, 1 epoch, batches of {args.batch}",
            "rows": "prompt 8 tokens, chosen 8, rejected 8 (offdpo.records Parquet shards, zstd)",
        },
        "method": "each case in a fresh subprocess; peak = getrusage ru_maxrss; the data source only, no model",
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
