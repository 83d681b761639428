"""Writes the fault suite's results: faults.json and a Markdown table, faults.md.

A test run writes them under the ignored `.cache/results/` so `make test` never rewrites checked-in
files; `make faults` publishes to bench/results/ (OFFDPO_RESULTS_DIR). Each run rewrites both files
whole, with the commit, the date and the machine on top: a table never mixes rows of two commits.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RESULTS = Path(os.environ.get("OFFDPO_RESULTS_DIR") or REPO / ".cache" / "results")

ORDER = [
    "refscore_kill",
    "trainer_kill",
    "broker_kill",
    "s3_outage",
    "duplicate_delivery",
    "malformed_input",
    "grpc_fuzz",
    "load",
    "trainer_s3_down",
    "trainer_s3_access_denied",
    "trainer_poisoned_shards",
    "trainer_kill_before_commit",
    "oversized_record",
    "topic_recreated",
    "engine_thread_killed",
    "replica_paused",
]


class ResultsWriter:
    def __init__(self, directory: Path = RESULTS):
        self.dir = directory
        self.rows: dict[str, dict] = {}
        self.load: dict | None = None
        self.fuzz: dict | None = None

    def add(self, row: dict) -> None:
        self.rows[row["case"]] = {**row, "recorded_at": _now()}

    def add_load(self, figures: dict) -> None:
        self.load = {**figures, "recorded_at": _now()}

    def add_fuzz(self, figures: dict) -> None:
        self.fuzz = {**figures, "recorded_at": _now()}

    def write(self) -> None:
        if not (self.rows or self.load or self.fuzz):
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / "faults.json"
        data = {
            "suite": "tests/faults (pytest -m faults tests/faults)",
            "commit": _commit(),
            "date": _now(),
            "machine": _machine(),
            "cases": sorted(self.rows.values(), key=lambda r: ORDER.index(r["case"]) if r["case"] in ORDER else 99),
            "grpc_fuzz": self.fuzz,
            "load": self.load,
        }
        path.write_text(json.dumps(data, indent=2) + "\n")
        (self.dir / "faults.md").write_text(render_markdown(data))


def _commit() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head.stdout.strip() + ("+uncommitted" if dirty.stdout.strip() else "") if head.returncode == 0 else "unknown"


def _machine() -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores visible, {platform.machine()}, python {platform.python_version()}"


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def render_markdown(data: dict) -> str:
    out = [
        "# Fault-injection suite results",
        "",
        f"Commit {data['commit']}, {data['date']}, on {data['machine']}.",
        "",
        "Written by `tests/faults` (`make faults` publishes here; `make test` writes to .cache/results/). "
        "Each case has its own topics, groups and run; counts are read back from Kafka, S3 and the "
        "trainer's trained_pairs.jsonl. Invariant: pairs trained == distinct valid pairs, no pair trained "
        "twice, every invalid record dead-lettered with a reason, services running or restarted cleanly.",
        "",
        "| case | pairs in | distinct valid | scored | trained | dup. trained | invalid in / dead-lettered "
        "| dead letters (reason: n) | services | ok | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["cases"]:
        letters = ", ".join(f"{k}: {v}" for k, v in r.get("dead_letters", {}).items()) or "none"
        out.append(
            f"| {r['case']} | {r['pairs_in']} | {r['distinct_valid_pairs']} | {r['pairs_scored']} | "
            f"{r['pairs_trained']} | {r['duplicates_trained']} | {r['invalid_in']} / "
            f"{r['invalid_dead_lettered']} | {letters} | {r['services']} | "
            f"{'yes' if r['ok'] else 'NO'} | {r['wall_s']} |"
        )
    fuzz = data.get("grpc_fuzz")
    if fuzz:
        out += ["", "## Decoder and gRPC fuzzing", ""]
        out += [f"- {k}: {v}" for k, v in fuzz.items() if k != "recorded_at"]
    load = data.get("load")
    if load:
        out += [
            "",
            "## Load: concurrent gRPC clients against `refscore serve --worker` while pairs stream",
            "",
            "| clients | requests | ok | errors by code | p50 ms | p95 ms | p99 ms | max ms | RSS warm MiB | "
            "RSS after MiB | growth | stream pairs scored |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        errs = ", ".join(f"{k}: {v}" for k, v in load["errors"].items()) or "none"
        out.append(
            f"| {load['clients']} | {load['requests']} | {load['ok']} | {errs} | {load['p50_ms']} | "
            f"{load['p95_ms']} | {load['p99_ms']} | {load['max_ms']} | {load['rss_warm_mib']} | "
            f"{load['rss_after_mib']} | {load['rss_growth']}x | {load['stream_scored']} / "
            f"{load['stream_pairs']} |"
        )
    return "\n".join(out) + "\n"
