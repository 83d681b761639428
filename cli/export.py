"""`offdpo export`: a shareable Hugging Face model folder, with its model card, from a trainer checkpoint.

    offdpo export --checkpoint s3://BUCKET/runs/<run>/checkpoints/step-<N> --out DIR [--dtype bfloat16]
    offdpo export --checkpoint path/to/step-<N> --out DIR --dtype float32 --hub-ready

The weights come from the checkpoint's float32 resumable state (a sharded checkpoint's dcp/ shards,
a full one's weights/ or float32 model/), one tensor at a time, in one process and without a GPU, so
any dtype can be exported from any checkpoint. The card (README.md) is built from the checkpoint's
state.json and the run's metrics.jsonl / trained_pairs.jsonl next to its checkpoints
(services/trainer/model_card.py). `--hub-ready` refuses to write a folder the Hugging Face Hub would
show without a card, config or tokenizer; nothing is uploaded. Exit 0 on success, 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from offdpo import errors
from offdpo.s3 import safe_key_part


class DirStore:
    """The read methods checkpoints use, over a local folder that holds a checkpoint (and maybe its run)."""

    def __init__(self, root: Path):
        self.root = root.resolve()

    def get_bytes(self, key: str, max_bytes: int | None = None) -> bytes:
        return (self.root / key).read_bytes()

    def exists(self, key: str) -> bool:
        return (self.root / key).is_file()

    def list_keys(self, prefix: str) -> list[str]:
        base = self.root / prefix
        if not base.is_dir():
            return []
        return sorted(str(p.relative_to(self.root)) for p in base.rglob("*") if p.is_file())

    def put_bytes(self, key: str, data: bytes, content_type: str = "") -> None:
        raise errors.BadInput("offdpo export never writes to the checkpoint")


def open_checkpoint(spec: str) -> tuple[Any, str]:
    """(a store, the checkpoint's prefix in it) for `s3://bucket/prefix/step-N` or a local step-N folder."""
    if spec.startswith("s3://"):
        from offdpo.config import S3Config
        from offdpo.s3 import ObjectStore

        bucket, _, prefix = spec[len("s3://") :].partition("/")
        prefix = prefix.strip("/").removesuffix("/model")
        try:
            safe_key_part(bucket, "bucket")
            for part in prefix.split("/"):
                safe_key_part(part, "prefix segment")
        except ValueError as exc:
            raise errors.BadInput(
                f"--checkpoint {spec!r}: {exc} (expected s3://BUCKET/runs/<run>/checkpoints/step-N)"
            ) from None
        return ObjectStore(S3Config.from_env(os.environ), bucket=bucket), prefix
    folder = Path(spec).resolve()
    if folder.name == "model":
        folder = folder.parent
    if not (folder / "state.json").is_file():
        raise errors.BadInput(
            f"--checkpoint {spec!r}: no state.json there; give a checkpoint folder (.../checkpoints/step-N) "
            "or s3://BUCKET/runs/<run>/checkpoints/step-N"
        )
    # The run's logs sit two levels up (runs/<run>/metrics.jsonl) when the whole run was copied.
    return DirStore(folder.parent.parent), f"{folder.parent.name}/{folder.name}"


def _run_logs(store: Any, prefix: str) -> dict[str, str | None]:
    """The run's metrics.jsonl, trained_pairs.jsonl, skipped_pairs.jsonl next to its checkpoints/ (the
    trainer publishes them there at the end of a run), None where absent."""
    parts = prefix.split("/")
    run_dir = "/".join(parts[: len(parts) - 1 - parts[::-1].index("checkpoints")]) if "checkpoints" in parts else ""
    out: dict[str, str | None] = {}
    for name in ("metrics.jsonl", "trained_pairs.jsonl", "skipped_pairs.jsonl"):
        key = f"{run_dir}/{name}" if run_dir else name
        out[name] = store.get_bytes(key).decode() if store.exists(key) else None
    return out


def card_for(store: Any, prefix: str, dtype: str) -> Any:
    """state.json -> README.md text, from the checkpoint's state and the run's logs."""
    from services.trainer.checkpoint import _shards_topic
    from services.trainer.model_card import card_facts, model_card, offdpo_build

    def build(state: dict[str, Any]) -> str:
        logs = _run_logs(store, prefix)
        config_yaml = store.get_bytes(f"{prefix}/config.yaml").decode() if store.exists(f"{prefix}/config.yaml") else ""
        version, commit = offdpo_build()
        facts = card_facts(
            state,
            metrics_jsonl=logs["metrics.jsonl"],
            trained_pairs_jsonl=logs["trained_pairs.jsonl"],
            skipped_pairs_jsonl=logs["skipped_pairs.jsonl"],
            save_dtype=dtype,
            topic=_shards_topic(config_yaml),
            license=_license_of(store, prefix),
            offdpo_version=version,
            offdpo_commit=commit,
        )
        return model_card(facts)

    return build


def _license_of(store: Any, prefix: str) -> str | None:
    """The license the card the trainer wrote into the checkpoint's model/ names (from the base model)."""
    key = f"{prefix}/model/README.md"
    if not store.exists(key):
        return None
    import tempfile

    from services.trainer.model_card import base_model_license

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "README.md").write_bytes(store.get_bytes(key))
        return base_model_license(tmp)


def main(args: argparse.Namespace) -> int:
    from services.trainer.checkpoint import SAVE_DTYPES, export_checkpoint

    out = Path(args.out)
    try:
        if args.dtype not in SAVE_DTYPES:
            raise errors.BadInput(f"--dtype {args.dtype!r}: use one of {', '.join(SAVE_DTYPES)}")
        if out.exists() and any(out.iterdir()):
            raise errors.BadInput(f"--out {out} is not empty: give a new folder")
        store, prefix = open_checkpoint(args.checkpoint)
        result = export_checkpoint(
            store,
            prefix,
            out,
            dtype=args.dtype,
            shard_bytes=args.shard_bytes,
            card=card_for(store, prefix, args.dtype),
            hub_ready=args.hub_ready,
        )
    except (errors.BadInput, FileNotFoundError, KeyError) as exc:
        print(f"offdpo export: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "export",
        help="write a shareable model folder (+ README.md model card) from a trainer checkpoint",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--checkpoint", required=True, help="s3://BUCKET/runs/<run>/checkpoints/step-N or a local step-N folder"
    )
    p.add_argument("--out", required=True, help="the folder to write (new or empty)")
    p.add_argument("--dtype", default="bfloat16", help="bfloat16 (default), float32 or float16")
    p.add_argument(
        "--shard-bytes", type=int, default=2 << 30, help="largest safetensors file (default 2 GiB; an index above one)"
    )
    p.add_argument(
        "--hub-ready",
        action="store_true",
        help="refuse to write a folder without the card, config and tokenizer files the Hub expects (no upload)",
    )
    p.set_defaults(fn=main)
