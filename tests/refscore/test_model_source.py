"""refscore's reference from a trainer checkpoint in S3 (services/refscore/model_source.py), against
the real local S3 server: downloaded once into the cache (keyed by the listing's etags), again when
the checkpoint changes, refused when unsafe or without a tokenizer; its fingerprint is the
checkpoint's, not the base model's; and the Scorer loads it (transformers engine)."""

from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path

import pytest

from offdpo.fingerprint import model_fingerprint, weights_hash
from offdpo.s3 import ObjectStore
from services.refscore.model_source import (
    COMPLETE,
    ModelSourceIncomplete,
    UnsafeModelSource,
    fetch_model,
    parse_s3_uri,
    resolve_model,
)


def _upload(store: ObjectStore, src: Path, prefix: str, skip: tuple[str, ...] = ()) -> None:
    for path in sorted(src.rglob("*")):
        if path.is_file() and path.name not in skip and not path.name.startswith("."):
            store.put_bytes(f"{prefix}{path.relative_to(src)}", path.read_bytes())


def _perturbed_copy(tiny_model: Path, out: Path) -> Path:
    """The tiny model with other weights (a trained checkpoint, as far as refscore can tell)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(out)
    return out


@pytest.fixture
def store(stack):
    s = ObjectStore(stack.s3)
    s.ensure_bucket()
    return s


def test_uri_parsing_refuses_traversal_and_names_the_checkpoint():
    uri = parse_s3_uri("s3://offdpo/runs/r1/checkpoints/step-00000004/model/")
    assert (uri.bucket, uri.prefix) == ("offdpo", "runs/r1/checkpoints/step-00000004/model/")
    assert uri.default_model_id() == "r1@step-00000004"
    for bad in ("s3://offdpo/runs/../x/model/", "s3://offdpo/", "s3:///runs/x/", "s3://b/runs//x", "s3://b/.hidden/m"):
        with pytest.raises(UnsafeModelSource):
            parse_s3_uri(bad)


def test_checkpoint_downloaded_once_then_again_when_it_changes(stack, store, tiny_model, tmp_path):
    prefix = f"runs/src-{uuid.uuid4().hex[:6]}/checkpoints/step-00000002/model/"
    _upload(store, Path(tiny_model), prefix)
    uri = parse_s3_uri(f"s3://{store.bucket}/{prefix}")
    cache = tmp_path / "cache"
    fetched: list[str] = []
    first = fetch_model(uri, cache, store=store, on_download=fetched.append)
    assert (first / COMPLETE).is_file() and (first / "config.json").is_file()
    assert weights_hash(first) == weights_hash(tiny_model)
    n = len(fetched)
    assert n >= 3
    again = fetch_model(uri, cache, store=store, on_download=fetched.append)
    assert again == first and len(fetched) == n  # cached: nothing downloaded
    assert not [p for p in cache.iterdir() if p.name.startswith(".partial-")]

    # The same key rewritten with other weights (other etag): a new cache folder, the new bytes.
    other = _perturbed_copy(Path(tiny_model), tmp_path / "other")
    store.put_bytes(f"{prefix}model.safetensors", (other / "model.safetensors").read_bytes())
    changed = fetch_model(uri, cache, store=store, on_download=fetched.append)
    assert changed != first and len(fetched) > n
    assert weights_hash(changed) == weights_hash(other) != weights_hash(first)


def test_checkpoint_without_tokenizer_is_refused_before_download(stack, store, tiny_model, tmp_path):
    prefix = f"runs/notok-{uuid.uuid4().hex[:6]}/checkpoints/step-00000001/model/"
    _upload(store, Path(tiny_model), prefix, skip=("tokenizer.json", "vocab.json", "tokenizer.model"))
    with pytest.raises(ModelSourceIncomplete, match="no a tokenizer|tokenizer") as info:
        fetch_model(parse_s3_uri(f"s3://{store.bucket}/{prefix}"), tmp_path / "cache", store=store)
    assert prefix in str(info.value)
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())
    with pytest.raises(ModelSourceIncomplete, match="no objects"):
        fetch_model(parse_s3_uri(f"s3://{store.bucket}/runs/none/checkpoints/x/model/"), tmp_path / "c", store=store)


def test_unsafe_object_key_is_refused_before_anything_is_written(stack, store, tiny_model, tmp_path):
    prefix = f"runs/evil-{uuid.uuid4().hex[:6]}/checkpoints/step-00000001/model/"
    _upload(store, Path(tiny_model), prefix)
    store.put_bytes(f"{prefix}sub/.hidden", b"x")
    with pytest.raises(UnsafeModelSource, match="not a plain relative file name"):
        fetch_model(parse_s3_uri(f"s3://{store.bucket}/{prefix}"), tmp_path / "cache", store=store)
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())


def test_scorer_serves_the_checkpoint_under_its_own_fingerprint(stack, store, tiny_model, tmp_path, monkeypatch):
    from services.refscore.config import RefscoreConfig
    from services.refscore.scorer import Scorer

    run = f"ckpt-{uuid.uuid4().hex[:6]}"
    prefix = f"runs/{run}/checkpoints/step-00000003/model/"
    trained = _perturbed_copy(Path(tiny_model), tmp_path / "trained")
    _upload(store, trained, prefix)
    for k, v in stack.env().items():
        monkeypatch.setenv(k, v)
    base = dataclasses.replace(
        RefscoreConfig.from_env({}), engine="transformers", max_model_len=256, model_cache=str(tmp_path / "cache")
    )
    resolved = resolve_model(f"s3://{store.bucket}/{prefix}", base.model_cache, stack.s3)
    assert resolved.model_id == f"{run}@step-00000003"
    scorer = Scorer(dataclasses.replace(base, model_dir=f"s3://{store.bucket}/{prefix}"))
    scorer.load()
    try:
        assert scorer.load_error is None, scorer.load_error
        fp = scorer.fingerprint
        assert fp is not None
        assert fp.model_id == f"{run}@step-00000003"
        assert fp.weights_hash == weights_hash(trained)
        base_fp = model_fingerprint(
            tiny_model, dtype="float32", engine="transformers", engine_version=fp.engine_version
        )
        assert fp.fingerprint_id != base_fp.fingerprint_id and fp.weights_hash != base_fp.weights_hash
        # What the trainer computes for the same checkpoint downloaded elsewhere (--reference-model-id).
        same = model_fingerprint(
            resolved.path, dtype="float32", engine="transformers", engine_version="x", model_id=fp.model_id
        )
        assert same.fingerprint_id == fp.fingerprint_id
    finally:
        scorer.shutdown()


def test_serve_refuses_a_bad_s3_model_uri_before_starting(monkeypatch):
    from services.refscore.__main__ import main

    monkeypatch.setenv("OFFDPO_REFSCORE_MODEL_DIR", "s3://offdpo/runs/../other/checkpoints/step-1/model/")
    monkeypatch.setenv("OFFDPO_REFSCORE_METRICS_PORT", "0")
    assert main(["serve"]) == 2
