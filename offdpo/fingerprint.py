"""The fingerprint of a reference model: what produced a score.

refscore stamps every score with it; the trainer computes the same fingerprint for the reference
it expects (by default its own initial policy weights) and refuses records that differ.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from offdpo.records import with_fingerprint_id
from offdpo.v1 import records_pb2

# Tokenizer settings that change which ids a text becomes.
_TOKENIZER_CONFIG_KEYS = (
    "bos_token",
    "eos_token",
    "pad_token",
    "unk_token",
    "add_bos_token",
    "add_eos_token",
    "clean_up_tokenization_spaces",
    "tokenizer_class",
    "added_tokens_decoder",
)


def _hash_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for path in paths:
        h.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def weights_hash(model_dir: str | Path) -> str:
    root = Path(model_dir)
    files = sorted(root.glob("*.safetensors")) or sorted(root.glob("*.bin"))
    if not files:
        raise FileNotFoundError(f"no weight files (*.safetensors) in {root}")
    return _hash_files(files)


def tokenizer_hash(model_dir: str | Path) -> str:
    root = Path(model_dir)
    h = hashlib.sha256()
    vocab_files = [
        p
        for p in (root / "tokenizer.json", root / "vocab.json", root / "merges.txt", root / "tokenizer.model")
        if p.exists()
    ]
    if not vocab_files:
        raise FileNotFoundError(f"no tokenizer files in {root}")
    h.update(_hash_files(vocab_files).encode())
    cfg_path = root / "tokenizer_config.json"
    if cfg_path.exists():
        cfg = json.loads(cfg_path.read_text())
        h.update(json.dumps({k: cfg.get(k) for k in _TOKENIZER_CONFIG_KEYS}, sort_keys=True, default=str).encode())
    return h.hexdigest()


def chat_template_hash(chat_template: str | None) -> str:
    return hashlib.sha256((chat_template or "").encode()).hexdigest() if chat_template else ""


def model_fingerprint(
    model_dir: str | Path,
    *,
    dtype: str,
    engine: str,
    engine_version: str,
    model_id: str | None = None,
    chat_template: str | None = None,
    parallel_layout: str = "",
) -> records_pb2.ReferenceFingerprint:
    """Fingerprint of the model in `model_dir` as run by `engine` in `dtype` (split over GPUs as
    `parallel_layout` says: "tp=2,pp=1"; "" on one device).

    `chat_template` defaults to the tokenizer's own template (chat_template.jinja or tokenizer_config).
    """
    root = Path(model_dir)
    if chat_template is None:
        jinja = root / "chat_template.jinja"
        if jinja.exists():
            chat_template = jinja.read_text()
        elif (root / "tokenizer_config.json").exists():
            chat_template = json.loads((root / "tokenizer_config.json").read_text()).get("chat_template")
    fp = records_pb2.ReferenceFingerprint(
        model_id=model_id or root.resolve().name,
        weights_hash=weights_hash(root),
        tokenizer_hash=tokenizer_hash(root),
        chat_template_hash=chat_template_hash(chat_template),
        dtype=dtype,
        engine=engine,
        engine_version=engine_version,
        parallel_layout=parallel_layout,
    )
    return with_fingerprint_id(fp)
