"""The README.md model card of an exported model folder (issue 32 item 4).

`card_facts` gathers what a card says from a checkpoint's own records (state.json: the resolved
configuration, the reference fingerprint id, the world size, the data position; the run's
metrics.jsonl and trained_pairs.jsonl lines up to the checkpoint's step); `model_card` turns those
facts into markdown with the YAML front matter the Hugging Face Hub reads. Both are pure: the trainer
(at every checkpoint) and `offdpo export` (from a checkpoint in S3 or on disk) read the records their
own way and get the same card.
"""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# A Hub repo id (`org/name`): the only form of base_model the Hub links; a local path is not one.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# The settings a reader needs to judge or reproduce the run, in the order shown.
SETTING_KEYS = (
    "loss_type",
    "beta",
    "label_smoothing",
    "reference_free",
    "sft_weight",
    "lr",
    "warmup_steps",
    "min_lr_ratio",
    "weight_decay",
    "global_batch_size",
    "max_length",
    "epochs",
    "seed",
    "precision",
    "distributed",
    "save_dtype",
)


@dataclass(frozen=True)
class CardFacts:
    """Everything a card states; None where it is not known (the card says so rather than guess)."""

    step: int
    base_model: str  # the initial policy as the run named it (a directory or a Hub id)
    reference_fingerprint: str  # fingerprint id the scores were checked against
    reference_model: str  # the reference's directory or id ("" when it is the base model)
    reference_dtype: str
    save_dtype: str
    world_size: int | None
    mode: str  # replay | continuous
    data_source: str  # replay: the S3 prefix of the scored shards; continuous: the shard-ready topic
    pairs_trained: int | None
    pairs_held_out: int | None
    pairs_skipped: int | None  # pairs of steps not applied (non-finite loss or gradient)
    dead_letters: int | None
    settings: dict[str, Any] = field(default_factory=dict)
    eval_metrics: dict[str, float] = field(default_factory=dict)
    eval_step: int | None = None
    train_metrics: dict[str, float] = field(default_factory=dict)
    license: str | None = None
    offdpo_version: str | None = None
    offdpo_commit: str | None = None
    run_name: str = ""


def _jsonl(text: str | None) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (text or "").splitlines() if line.strip()]


def card_facts(
    state: dict[str, Any],
    *,
    metrics_jsonl: str | None = None,
    trained_pairs_jsonl: str | None = None,
    skipped_pairs_jsonl: str | None = None,
    save_dtype: str,
    topic: str = "",
    license: str | None = None,
    offdpo_version: str | None = None,
    offdpo_commit: str | None = None,
    dead_letters: int | None = None,
) -> CardFacts:
    """The facts of the checkpoint whose state.json is `state` (its "config" is the run's resolved
    TrainerConfig as a dict). Log lines past the checkpoint's step are ignored: they describe steps
    the checkpoint does not hold (a later checkpoint, or steps redone after a crash)."""
    cfg: dict[str, Any] = dict(state.get("config") or {})
    step = int(state["step"])
    rows = [r for r in _jsonl(metrics_jsonl) if int(r.get("step", 0)) <= step]
    evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
    trains = [r for r in rows if not any(k.startswith("eval/") for k in r)]
    last_eval = evals[-1] if evals else {}
    last_train = trains[-1] if trains else {}
    pairs = [r for r in _jsonl(trained_pairs_jsonl) if int(r.get("step", 0)) <= step]
    skipped = [r for r in _jsonl(skipped_pairs_jsonl) if int(r.get("step", 0)) <= step]
    mode = str(cfg.get("mode") or state.get("data", {}).get("mode") or "")
    return CardFacts(
        step=step,
        run_name=str(cfg.get("run_name", "")),
        base_model=str(cfg.get("model", "")),
        reference_fingerprint=str(state.get("fingerprint", "")),
        reference_model=str(cfg.get("reference_model_id") or cfg.get("reference_model") or ""),
        reference_dtype=str(cfg.get("reference_dtype") or ""),
        save_dtype=save_dtype,
        world_size=state.get("world_size"),
        mode=mode,
        data_source=topic if mode == "continuous" else str(cfg.get("prefix", "")),
        # counted from the per-step logs when the run's logs are at hand (None: not known here)
        pairs_trained=sum(len(r.get("pair_ids", [])) for r in pairs) if trained_pairs_jsonl is not None else None,
        pairs_held_out=int(last_eval["eval/pairs"]) if "eval/pairs" in last_eval else None,
        pairs_skipped=sum(len(r.get("pair_ids", [])) for r in skipped) if skipped_pairs_jsonl is not None else None,
        dead_letters=dead_letters,
        settings={k: cfg[k] for k in SETTING_KEYS if k in cfg} | {"steps": step, "save_dtype": save_dtype},
        eval_metrics={k: v for k, v in last_eval.items() if k.startswith("eval/")},
        eval_step=int(last_eval["step"]) if last_eval else None,
        train_metrics={k: v for k, v in last_train.items() if k != "step"},
        license=license,
        offdpo_version=offdpo_version,
        offdpo_commit=offdpo_commit,
    )


def _yaml_scalar(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid YAML scalar, quoted and escaped


def _fmt(value: Any) -> str:
    if value is None:
        return "not recorded"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def model_card(facts: CardFacts) -> str:
    """The README.md of an exported model folder: YAML front matter (library_name, base_model when it
    is a Hub id, tags, license when known) and what the model was trained from, on, how, and with
    which results."""
    front = ["---", "library_name: transformers"]
    if _HUB_ID.match(facts.base_model) and not facts.base_model.startswith((".", "/")):
        front.append(f"base_model: {_yaml_scalar(facts.base_model)}")
    front += ["tags:", "- dpo", "- offdpo"]
    if facts.license:
        front.append(f"license: {_yaml_scalar(facts.license)}")
    front.append("---")

    title = f"{facts.run_name or 'offdpo run'}, step {facts.step}"
    lines = [*front, "", f"# {title}", ""]
    lines += [
        "A causal language model fine-tuned with offline DPO by offdpo from stored "
        "reference log-probabilities (the reference model never ran next to the policy).",
        "",
        "## Models",
        "",
        "| | |",
        "| --- | --- |",
        f"| base model (initial policy) | `{facts.base_model or 'not recorded'}` |",
        f"| reference fingerprint | `{facts.reference_fingerprint or 'not recorded'}` |",
        f"| reference model | `{facts.reference_model or facts.base_model or 'not recorded'}`"
        + (" (the base model)" if not facts.reference_model else "")
        + " |",
        f"| reference dtype | {facts.reference_dtype or 'from its config'} |",
        f"| weights in this folder | {facts.save_dtype} (trained with float32 master weights) |",
        "",
        "The reference fingerprint is the id refscore stamped on every score trained on (model, weights hash, "
        "tokenizer, chat template, dtype, engine); the trainer refused any score with another one.",
        "",
        "## Data",
        "",
        "| | |",
        "| --- | --- |",
        f"| mode | {facts.mode or 'not recorded'} |",
        f"| {'shard-ready topic' if facts.mode == 'continuous' else 'scored shards (S3 prefix)'} | "
        f"`{facts.data_source or 'not recorded'}` |",
        f"| pairs trained | {_fmt(facts.pairs_trained)} |",
        f"| pairs held out (evaluated) | {_fmt(facts.pairs_held_out)} |",
        f"| pairs in skipped steps (non-finite) | {_fmt(facts.pairs_skipped)} |",
        f"| dead letters | {_fmt(facts.dead_letters)} |",
        "",
        "## Training settings",
        "",
        "| setting | value |",
        "| --- | --- |",
    ]
    settings = dict(facts.settings)
    if facts.world_size is not None:
        settings["world_size"] = facts.world_size
    lines += [f"| {k} | {_fmt(v)} |" for k, v in settings.items()]
    lines += ["", "## Evaluation", ""]
    if facts.eval_metrics:
        lines += [f"On the held-out pairs at step {facts.eval_step} (never trained on):", "", "| metric | value |"]
        lines += ["| --- | --- |"] + [f"| {k} | {_fmt(v)} |" for k, v in facts.eval_metrics.items()]
    else:
        lines.append(
            "No held-out evaluation was recorded up to this step (eval_fraction 0, no pair held out, or no "
            "evaluation step reached yet)."
        )
    if facts.train_metrics:
        lines += ["", f"Last training step's metrics (step {facts.step}):", "", "| metric | value |", "| --- | --- |"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in facts.train_metrics.items()]
    version = facts.offdpo_version or "unknown"
    commit = f", commit `{facts.offdpo_commit}`" if facts.offdpo_commit else ""
    lines += [
        "",
        "## How to load",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'model = AutoModelForCausalLM.from_pretrained("PATH")',
        'tokenizer = AutoTokenizer.from_pretrained("PATH")',
        "```",
        "",
        f"Written by offdpo {version}{commit}.",
        "",
    ]
    return "\n".join(lines)


# -- facts that come from the machine, not the run (impure; kept out of the builders above) ---------
def base_model_license(model_dir: str | Path) -> str | None:
    """`license:` from the front matter of the base model's own README.md, if it has one."""
    readme = Path(model_dir) / "README.md"
    try:
        text = readme.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    if not text.startswith("---"):
        return None
    for line in text.split("\n---", 1)[0].splitlines()[1:]:
        key, _, value = line.partition(":")
        if key.strip() == "license" and value.strip():
            return value.strip().strip("'\"")
    return None


def offdpo_build() -> tuple[str, str | None]:
    """(offdpo's version, the git commit of the source it runs from, when it runs from a checkout)."""
    import offdpo

    try:
        out = subprocess.run(
            ["git", "-C", str(Path(offdpo.__file__).resolve().parent), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
        commit = out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return offdpo.__version__, commit or None
