"""Writes the fault suite's results: bench/results/faults.json and a Markdown table, faults.md."""

from __future__ import annotations

import datetime
import json
import platform
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"

ORDER = [
    "refscore_kill",
    "trainer_kill",
    "broker_kill",
    "s3_outage",
    "duplicate_delivery",
    "malformed_input",
    "grpc_fuzz",
    "load",
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
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError):
            old = {}
        cases = {r["case"]: r for r in old.get("cases", [])}
        cases.update(self.rows)
        data = {
            "suite": "tests/faults (pytest -m faults tests/faults)",
            "machine": f"{platform.machine()} {platform.node()}, python {platform.python_version()}",
            "cases": sorted(cases.values(), key=lambda r: ORDER.index(r["case"]) if r["case"] in ORDER else 99),
            "grpc_fuzz": self.fuzz or old.get("grpc_fuzz"),
            "load": self.load or old.get("load"),
        }
        path.write_text(json.dumps(data, indent=2) + "\n")
        (self.dir / "faults.md").write_text(render_markdown(data))


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def render_markdown(data: dict) -> str:
    out = [
        "# Fault-injection suite results",
        "",
        "Written by `tests/faults` (`.venv/bin/python -m pytest -m faults tests/faults`). "
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
