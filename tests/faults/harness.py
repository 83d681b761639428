"""Shared machinery of the fault-injection suite: one `Case` per fault, with its own topics, groups
and run name; helpers to produce pairs, run refscore's stream worker and the trainer as
subprocesses, and read back what Kafka and S3 hold, so each case can count pairs in -> trained."""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from kafka import KafkaConsumer

from localdev.process import stop_process, wait_until
from offdpo import records
from offdpo.kafka import ensure_topics, make_producer, next_offsets, read_topic
from offdpo.s3 import ObjectStore
from offdpo.v1 import records_pb2

REPO = Path(__file__).resolve().parents[2]


def wait_for(predicate, timeout_s: float, what: str, diag=lambda: "", every_s: float = 0.5):
    """Poll `predicate` until truthy; TimeoutError naming `what` (and diagnostics) otherwise."""
    return wait_until(predicate, timeout_s, what, every_s=every_s, diag=diag)


@dataclasses.dataclass
class Proc:
    name: str
    proc: subprocess.Popen
    log_path: Path

    def tail(self, n: int = 3000) -> str:
        try:
            return f"--- {self.name} log tail ({self.log_path}) ---\n" + self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout_s: float = 30) -> int:
        return stop_process(self.proc, timeout_s)


class Case:
    """One fault case: its topics, groups, processes and the counts it reports."""

    def __init__(self, name: str, stack, model_dir: Path, workdir: Path, unique: str, partitions: int = 3):
        self.name, self.stack, self.model_dir, self.workdir = name, stack, Path(model_dir), Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        tag = f"{name}.{unique}"
        self.topics = {
            "OFFDPO_TOPIC_PAIRS": f"f.{tag}.pairs",
            "OFFDPO_TOPIC_SHARDS": f"f.{tag}.shards",
            "OFFDPO_TOPIC_DEADLETTER": f"f.{tag}.dead",
            "OFFDPO_TOPIC_CANDIDATES": f"f.{tag}.cands",
        }
        self.refscore_group = f"f-{tag}-refscore"
        self.trainer_group = f"f-{tag}-trainer"
        self.run_name = f"f-{name}-{unique}"
        self.kafka = dataclasses.replace(
            stack.kafka,
            pairs_topic=self.topics["OFFDPO_TOPIC_PAIRS"],
            shards_topic=self.topics["OFFDPO_TOPIC_SHARDS"],
            deadletter_topic=self.topics["OFFDPO_TOPIC_DEADLETTER"],
            candidates_topic=self.topics["OFFDPO_TOPIC_CANDIDATES"],
        )
        ensure_topics(self.kafka, self.topics.values(), partitions)
        self.store = ObjectStore(stack.s3)
        self.env = {
            **os.environ,
            **stack.env(),
            **self.topics,
            "PYTHONPATH": str(REPO),
            "OFFDPO_REFSCORE_GROUP": self.refscore_group,
            "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
        self.procs: list[Proc] = []
        self.events: list[str] = []  # what happened to the services, for the table
        self.produced = 0  # records put on input topics (valid, duplicate and invalid)
        self.valid_ids: set[str] = set()  # distinct valid pair ids that went in
        self.invalid: list[tuple[str, int, int]] = []  # (topic, partition, offset) of each invalid record
        self.trainer_log_dir = self.workdir / "trainer"
        self.started = time.monotonic()

    # -- input --------------------------------------------------------------------------------------
    def produce(self, topic: str, items: list[tuple[bytes | None, bytes]], valid_ids=(), invalid: bool = False):
        producer = make_producer(self.kafka, f"faults-{self.name}")
        try:
            futures = [producer.send(topic, key=k, value=v) for k, v in items]
            producer.flush(timeout=60)
            metas = [f.get(timeout=60) for f in futures]
        finally:
            producer.close(timeout=10)
        self.produced += len(items)
        self.valid_ids |= set(valid_ids)
        if invalid:
            self.invalid += [(m.topic, m.partition, m.offset) for m in metas]
        return metas

    def produce_pairs(self, pairs):
        return self.produce(
            self.kafka.pairs_topic,
            [(p.pair_id.encode(), p.SerializeToString()) for p in pairs],
            valid_ids=[p.pair_id for p in pairs],
        )

    # -- processes ----------------------------------------------------------------------------------
    def _spawn(self, name: str, args: list[str], env: dict) -> Proc:
        log_path = self.workdir / f"{name}-{len(self.procs)}.log"
        proc = subprocess.Popen(args, env=env, cwd=REPO, stdout=open(log_path, "ab"), stderr=subprocess.STDOUT)
        p = Proc(name, proc, log_path)
        self.procs.append(p)
        return p

    def start_worker(self, extra_env: dict | None = None, name: str = "refscore-worker") -> Proc:
        env = {
            **self.env,
            "OFFDPO_REFSCORE_MODEL_DIR": str(self.model_dir),
            "OFFDPO_REFSCORE_ENGINE": "transformers",
            "OFFDPO_REFSCORE_METRICS_PORT": "0",
            "OFFDPO_REFSCORE_MAX_MODEL_LEN": "512",
            "OFFDPO_REFSCORE_BATCH_WAIT_S": "0.3",
            "OFFDPO_REFSCORE_BATCH_PAIRS": "16",
            "OFFDPO_REFSCORE_GRACE_S": "10",
            "OFFDPO_REFSCORE_PLAINTEXT": "true",
            "OFFDPO_REFSCORE_ALLOW_ANONYMOUS": "true",
            **(extra_env or {}),
        }
        return self._spawn(name, [sys.executable, "-m", "services.refscore", "worker"], env)

    def trainer_args(self, *extra: str, idle_s: float = 6) -> list[str]:
        return [
            sys.executable,
            "-m",
            "services.trainer",
            "--model",
            str(self.model_dir),
            "--run-name",
            self.run_name,
            "--mode",
            "continuous",
            "--stop-when-idle-s",
            str(idle_s),
            "--consumer-group",
            self.trainer_group,
            "--global-batch-size",
            "8",
            "--micro-batch-size",
            "8",
            "--lr",
            "1e-4",
            "--warmup-steps",
            "1",
            "--save-every",
            "2",
            "--log-dir",
            str(self.trainer_log_dir),
            "--no-progress",
            "--poll-timeout-ms",
            "300",
            *extra,
        ]

    def start_trainer(self, *extra: str, idle_s: float = 6, name: str = "trainer") -> Proc:
        return self._spawn(name, self.trainer_args(*extra, idle_s=idle_s), self.env)

    def run_trainer(self, *extra: str, idle_s: float = 6, timeout_s: float = 240, expect_rc=0) -> Proc:
        p = self.start_trainer(*extra, idle_s=idle_s)
        try:
            rc = p.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            p.stop()
            raise TimeoutError(f"the trainer did not finish within {timeout_s} s\n{p.tail()}") from None
        if expect_rc is not None:
            assert rc == expect_rc, f"trainer exited {rc}, expected {expect_rc}\n{p.tail()}"
        return p

    def close(self) -> None:
        for p in self.procs:
            p.stop()

    def diag(self) -> str:
        return "\n".join(p.tail() for p in self.procs[-3:])

    # -- read back ----------------------------------------------------------------------------------
    def shard_keys(self) -> list[str]:
        return [k for k in self.store.list_keys("scores/") if f"/{self.kafka.pairs_topic}/" in k]

    def scored_rows(self) -> list[str]:
        rows = []
        for key in self.shard_keys():
            rows += records.read_shard(self.store.get_bytes(key), key).pair_ids
        return rows

    def dead_letters(self, idle_s: float = 1.0) -> list[records_pb2.DeadLetter]:
        return [
            records_pb2.DeadLetter.FromString(r.value)
            for r in read_topic(self.kafka, self.kafka.deadletter_topic, idle_s=idle_s)
        ]

    def committed_all(self, group: str, topic: str) -> bool:
        ends = next_offsets(read_topic(self.kafka, topic, idle_s=0.5))
        consumer = KafkaConsumer(**self.kafka.client_kwargs(), group_id=group, enable_auto_commit=False)
        try:
            return bool(ends) and all((consumer.committed(tp) or 0) == end for tp, end in ends.items())
        finally:
            consumer.close()

    def committed(self, group: str, topic: str) -> dict[int, int]:
        consumer = KafkaConsumer(**self.kafka.client_kwargs(), group_id=group, enable_auto_commit=False)
        try:
            from kafka import TopicPartition

            parts = consumer.partitions_for_topic(topic) or set()
            return {p: consumer.committed(TopicPartition(topic, p)) or 0 for p in sorted(parts)}
        finally:
            consumer.close()

    def wait_scored(self, worker: Proc | None = None, timeout_s: float = 150) -> None:
        """Every valid pair in a shard and the refscore group caught up on the pairs topic."""

        def done():
            if worker is not None and not worker.alive:
                raise AssertionError(f"the refscore worker exited with {worker.proc.returncode}\n{worker.tail()}")
            return self.valid_ids <= set(self.scored_rows()) and self.committed_all(
                self.refscore_group, self.kafka.pairs_topic
            )

        wait_for(
            done,
            timeout_s,
            f"[{self.name}] refscore scoring {len(self.valid_ids)} pairs and committing",
            lambda: worker.tail() if worker else self.diag(),
            every_s=1.0,
        )

    def trained_ids(self) -> list[str]:
        path = self.trainer_log_dir / self.run_name / "trained_pairs.jsonl"
        out = []
        if path.exists():
            for line in path.read_text().splitlines():
                if line.strip():
                    out += json.loads(line)["pair_ids"]
        return out

    def trained_ids_s3(self) -> list[str]:
        key = f"runs/{self.run_name}/trained_pairs.jsonl"
        out = []
        for line in self.store.get_bytes(key).decode().splitlines():
            if line.strip():
                out += json.loads(line)["pair_ids"]
        return out

    # -- verdict ------------------------------------------------------------------------------------
    def verify(
        self,
        *,
        services_ok: bool,
        extra: dict | None = None,
        check_invalid: bool = True,
        check_scored_unique: bool = True,
    ) -> dict:
        """Assert the invariants of every fault case and return the row for the results table."""
        trained = self.trained_ids()
        trained_s3 = self.trained_ids_s3()
        scored = self.scored_rows()
        letters = self.dead_letters()
        origins = {(dl.topic, dl.partition, dl.offset) for dl in letters}
        reasons = collections.Counter(f"{dl.service}/{dl.error_type}" for dl in letters)
        row = {
            "case": self.name,
            "pairs_in": self.produced,
            "distinct_valid_pairs": len(self.valid_ids),
            "pairs_scored": len(set(scored)),
            "scored_rows": len(scored),
            "pairs_trained": len(set(trained)),
            "duplicates_trained": len(trained) - len(set(trained)),
            "invalid_in": len(self.invalid),
            "invalid_dead_lettered": len(set(self.invalid) & origins),
            "dead_letters": dict(sorted(reasons.items())),
            "dead_letter_examples": {},
            "services": "; ".join(self.events) or "all ran to completion",
            "services_ok": services_ok,
            "wall_s": round(time.monotonic() - self.started, 1),
        }
        for dl in letters:
            row["dead_letter_examples"].setdefault(f"{dl.service}/{dl.error_type}", dl.reason[:140])
        row.update(extra or {})
        row["ok"] = (
            set(trained) == self.valid_ids
            and row["duplicates_trained"] == 0
            and trained == trained_s3
            and (not check_invalid or row["invalid_dead_lettered"] == row["invalid_in"])
            and services_ok
        )
        assert set(trained) == self.valid_ids, (
            f"[{self.name}] trained {len(set(trained))} distinct pairs, labelled {len(self.valid_ids)}: "
            f"missing {len(self.valid_ids - set(trained))}, unexpected {len(set(trained) - self.valid_ids)}"
        )
        assert row["duplicates_trained"] == 0, f"[{self.name}] {row['duplicates_trained']} pairs trained twice"
        assert trained == trained_s3, f"[{self.name}] the trained-pairs log in S3 differs from the local one"
        assert set(scored) >= self.valid_ids, f"[{self.name}] a valid pair was never scored"
        assert not check_scored_unique or len(scored) == len(set(scored)), (
            f"[{self.name}] {len(scored)} scored rows, {len(set(scored))} distinct: a row was written twice"
        )
        if check_invalid:
            missing = set(self.invalid) - origins
            assert not missing, f"[{self.name}] invalid records not dead-lettered: {sorted(missing)[:5]}"
            for dl in letters:
                assert dl.reason and dl.error_type and dl.service, f"[{self.name}] a dead letter lacks its reason: {dl}"
        assert services_ok, f"[{self.name}] a service did not run or restart cleanly: {row['services']}"
        return row
