"""Training metrics: a progress bar, metrics.jsonl, Prometheus gauges and a PNG of the curves."""

from __future__ import annotations

import json
import math
from pathlib import Path

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
)


class MetricsLog:
    def __init__(self, log_dir: Path, resume_step: int, port: int = 0, progress: bool = True, total: int | None = None):
        self.dir = Path(log_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / "metrics.jsonl"
        self.pairs_path = self.dir / "trained_pairs.jsonl"
        # After a crash the lines past the checkpoint describe steps that are redone: drop them.
        for path in (self.path, self.pairs_path):
            if path.exists():
                lines = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= resume_step]
                path.write_text("".join(ln + "\n" for ln in lines))
        self.gauges = None
        if port:
            from prometheus_client import CollectorRegistry, Gauge, start_http_server

            registry = CollectorRegistry()
            self.gauges = {k: Gauge("offdpo_trainer_" + k.replace("/", "_"), k, registry=registry) for k in KEYS}
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

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def plot(self) -> Path | None:
        rows = [json.loads(ln) for ln in self.path.read_text().splitlines() if ln] if self.path.exists() else []
        if not rows:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        panels = [
            ("loss", ["loss"]),
            ("rewards", ["rewards/chosen", "rewards/rejected", "rewards/margins"]),
            ("accuracy", ["rewards/accuracies"]),
            ("log-probs", ["logps/chosen", "logps/rejected"]),
            ("grad norm", ["grad_norm"]),
            ("learning rate", ["lr"]),
            ("tokens/s", ["tokens_per_s"]),
        ]
        cols = 4
        fig, axes = plt.subplots(math.ceil(len(panels) / cols), cols, figsize=(16, 7))
        steps = [r["step"] for r in rows]
        for ax, (title, keys) in zip(axes.flat, panels):
            for k in keys:
                ax.plot(steps, [r[k] for r in rows], label=k)
            ax.set_title(title)
            ax.set_xlabel("step")
            if len(keys) > 1:
                ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(panels) :]:
            ax.axis("off")
        fig.tight_layout()
        out = self.dir / "curves.png"
        fig.savefig(out, dpi=80)
        plt.close(fig)
        return out
