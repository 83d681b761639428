"""Training metrics: a progress bar, metrics.jsonl, Prometheus gauges, a PNG of the curves and the
experiment trackers of `report_to` (trackers.py), which get the same scalars as metrics.jsonl."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from services.trainer.trackers import Trackers

KEYS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
    "grad_norm",
    "lr",
    "tokens_per_s",
    "skipped_nonfinite_steps",
)
# Held-out evaluation (lines of their own in metrics.jsonl, as TRL logs its eval_* entries).
EVAL_KEYS = (
    "eval/loss",
    "eval/rewards/chosen",
    "eval/rewards/rejected",
    "eval/rewards/margins",
    "eval/rewards/accuracies",
    "eval/logps/chosen",
    "eval/logps/rejected",
    "eval/pairs",
)


class _InfraCollector:
    """Prometheus view of a data source's InfraStatus, read at scrape time: the main thread may be
    blocked in a backoff exactly when someone looks."""

    def __init__(self, status: Any):
        self.status = status

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        st = self.status
        yield CounterMetricFamily(
            "offdpo_trainer_infra_errors",
            "failed attempts to reach S3 or Kafka that the trainer retried (never dead-lettered)",
            value=st.errors_total,
        )
        yield GaugeMetricFamily(
            "offdpo_trainer_backoff_seconds", "the backoff in progress (0: not waiting)", value=st.backoff_s
        )
        since = st.waiting_since
        yield GaugeMetricFamily(
            "offdpo_trainer_waiting_on_infra_seconds",
            "how long progress has been stopped by an outage (0: not stopped)",
            value=0.0 if since is None else getattr(st, "clock", time.monotonic)() - since,
        )


class MetricsLog:
    def __init__(
        self,
        log_dir: Path,
        resume_step: int,
        port: int = 0,
        progress: bool = True,
        total: int | None = None,
        trackers: Trackers | None = None,
    ):
        self.trackers = trackers
        self.dir = Path(log_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "metrics.jsonl"
        self.pairs_path = self.dir / "trained_pairs.jsonl"
        self.skipped_path = self.dir / "skipped_pairs.jsonl"
        # After a crash the lines past the checkpoint describe steps that are redone: drop them.
        for path in (self.path, self.pairs_path, self.skipped_path):
            if path.exists():
                lines = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= resume_step]
                path.write_text("".join(ln + "\n" for ln in lines))
        self.gauges = None
        self.registry: Any = None
        if port:
            from prometheus_client import CollectorRegistry, Gauge, start_http_server

            self.registry = registry = CollectorRegistry()
            self.gauges = {
                k: Gauge("offdpo_trainer_" + k.replace("/", "_"), k, registry=registry) for k in KEYS + EVAL_KEYS
            }
            self.gauges["step"] = Gauge("offdpo_trainer_step", "optimizer steps done", registry=registry)
            start_http_server(port, registry=registry)
        self.bar = None
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=resume_step, unit="step", dynamic_ncols=True)

    def log(self, step: int, values: dict, pair_ids: list[str]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        with self.pairs_path.open("a") as f:
            f.write(json.dumps({"step": step, "pair_ids": pair_ids}) + "\n")
        if self.trackers is not None:
            self.trackers.log_scalars(step, values)
        if self.gauges:
            for k in KEYS:
                self.gauges[k].set(values[k])
            self.gauges["step"].set(step)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(
                loss=f"{values['loss']:.4f}",
                acc=f"{values['rewards/accuracies']:.2f}",
                margin=f"{values['rewards/margins']:.3f}",
                tok_s=f"{values['tokens_per_s']:.0f}",
            )

    def watch_infra(self, status: Any) -> None:
        """Export a data source's InfraStatus (errors, backoff) with the other gauges."""
        if self.registry is not None:
            self.registry.register(_InfraCollector(status))

    def log_eval(self, step: int, values: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.trackers is not None:
            self.trackers.log_scalars(step, values)
        if self.gauges:
            for k in EVAL_KEYS:
                self.gauges[k].set(values[k])

    def log_skipped(self, step: int, pair_ids: list[str], reason: str) -> None:
        """Pairs of a step that was not applied (non-finite loss or gradient): neither trained nor lost."""
        with self.skipped_path.open("a") as f:
            f.write(json.dumps({"step": step, "reason": reason, "pair_ids": pair_ids}) + "\n")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.trackers is not None:
            self.trackers.close()

    def plot(self) -> Path | None:
        rows = [json.loads(ln) for ln in self.path.read_text().splitlines() if ln] if self.path.exists() else []
        if not rows:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        panels = [
            ("loss", ["loss", "eval/loss"]),
            ("rewards", ["rewards/chosen", "rewards/rejected", "rewards/margins", "eval/rewards/margins"]),
            ("accuracy", ["rewards/accuracies", "eval/rewards/accuracies"]),
            ("log-probs", ["logps/chosen", "logps/rejected", "eval/logps/chosen", "eval/logps/rejected"]),
            ("grad norm", ["grad_norm"]),
            ("learning rate", ["lr"]),
            ("tokens/s", ["tokens_per_s"]),
        ]
        cols = 4
        fig, axes = plt.subplots(math.ceil(len(panels) / cols), cols, figsize=(16, 7))
        for ax, (title, keys) in zip(axes.flat, panels):
            drawn = 0
            for k in keys:
                points = [(r["step"], r[k]) for r in rows if k in r]  # eval lines carry only eval/ keys
                if points:
                    style = "o--" if k.startswith("eval/") else "-"
                    ax.plot([p[0] for p in points], [p[1] for p in points], style, label=k, markersize=3)
                    drawn += 1
            ax.set_title(title)
            ax.set_xlabel("step")
            if drawn > 1:
                ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(panels) :]:
            ax.axis("off")
        fig.tight_layout()
        out = self.dir / "curves.png"
        fig.savefig(out, dpi=80)
        plt.close(fig)
        return out
