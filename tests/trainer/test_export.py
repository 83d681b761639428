"""Models people share (issue 32 item 4, issue 28 item 3): the exported model/ folder in save_dtype
(bfloat16 by default) with a model card, the float32 resumable state untouched, and `offdpo export`
writing the same folder from a real checkpoint of either layout. Real short training runs in-process
over an in-memory store (replay mode needs no broker), the tiny model, transformers loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from cli.main import main as offdpo
from services.trainer import checkpoint as ckpt
from services.trainer import train
from services.trainer.config import TrainerConfig
from tests.fakes import FakeObjectStore

from .conftest import reference_fingerprint, scored_pairs, synthetic_tokens, upload_shards

# bfloat16 keeps 8 bits of mantissa: each weight is rounded by at most 2^-9 of itself. Measured on the
# tiny model after 4 steps (2 layers, 128 wide; logits' standard deviation 0.59): max |logit difference|
# 0.0102 (2-core CPU). The bound below is 5x that and a tenth of the logits' spread.
BF16_LOGIT_BOUND = 0.05


def _run(tmp_path: Path, model: Path, store: FakeObjectStore, monkeypatch, run: str, **kw) -> str:
    """A real 4-step training run (25% of pairs held out and evaluated) -> its final checkpoint's prefix."""
    monkeypatch.setattr(train, "ObjectStore", lambda cfg: store)
    cfg = TrainerConfig(
        model=str(model),
        run_name=run,
        prefix="scores/",
        log_dir=str(tmp_path / "runs"),
        progress=False,
        warmup_steps=0,
        min_lr_ratio=1.0,
        global_batch_size=8,
        micro_batch_size=4,
        lr=1e-3,
        eval_fraction=0.25,
        eval_every=2,
        max_steps=4,
        **kw,
    )
    train.run(cfg)
    prefix = ckpt.latest_checkpoint(store, run)
    assert prefix is not None
    return prefix


@pytest.fixture(scope="module")
def shards(tiny_model):
    store = FakeObjectStore()
    fp = reference_fingerprint(tiny_model)
    upload_shards(store, scored_pairs(tiny_model, synthetic_tokens(48, seed=5), fp), fp, "exporttopic", per_shard=12)
    return dict(store.objects)


def _store(shards) -> FakeObjectStore:
    store = FakeObjectStore()
    store.objects.update(shards)
    return store


def _dump(store: FakeObjectStore, root: Path) -> None:
    """The bucket as a folder (what `aws s3 sync` of a run would give)."""
    for key, data in store.objects.items():
        path = root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def _dtypes(folder: Path) -> set[torch.dtype]:
    out = set()
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            out |= {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118
    return out


@torch.no_grad()
def _logits(folder: Path, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    ids = torch.tensor([[1, 500, 501, 100, 101, 102, 300, 301], [1, 700, 702, 110, 111, 112, 113, 114]])
    return model(input_ids=ids).logits.float()


def test_training_exports_bf16_with_a_card_and_keeps_float32_state(shards, tiny_model, tmp_path, monkeypatch):
    """Full layout (one process): model/ in bfloat16 (safetensors and config.json), README.md with the
    run's facts; weights/ holds the float32 weights a resume reads; both load in transformers and the
    bfloat16 logits are within BF16_LOGIT_BOUND of the trained float32 policy's."""
    store = _store(shards)
    prefix = _run(tmp_path, tiny_model, store, monkeypatch, "bf16run")
    folder = ckpt.download_model(store, prefix, tmp_path / "model")
    weights = ckpt.download_weights(store, prefix, tmp_path / "weights")
    assert weights != folder and _dtypes(weights) == {"F32"} and _dtypes(folder) == {"BF16"}
    conf = json.loads((folder / "config.json").read_text())
    assert conf["dtype"] == conf["torch_dtype"] == "bfloat16" and conf["use_cache"] is True
    assert (folder / "tokenizer.json").is_file() and (folder / "generation_config.json").is_file()

    trained, shared = _logits(weights), _logits(folder)
    worst = float((trained - shared).abs().max())
    assert 0 < worst <= BF16_LOGIT_BOUND, worst
    assert float(trained.std()) / 10 > BF16_LOGIT_BOUND  # the bound is small next to the logits' spread
    # bfloat16 compute on the CPU (refscore's --dtype bfloat16 with the transformers engine) runs too
    assert torch.isfinite(_logits(folder, torch.bfloat16)).all()

    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n") and "- dpo\n- offdpo\n" in card
    state = ckpt.read_state(store, prefix)
    assert state["fingerprint"] in card and "| save_dtype | bfloat16 |" in card
    metrics = [json.loads(ln) for ln in (tmp_path / "runs" / "bf16run" / "metrics.jsonl").read_text().splitlines()]
    last_eval = [r for r in metrics if "eval/loss" in r][-1]
    assert f"| eval/rewards/accuracies | {last_eval['eval/rewards/accuracies']:.6g} |" in card
    assert f"| pairs held out (evaluated) | {int(last_eval['eval/pairs'])} |" in card
    assert "| pairs trained | 32 |" in card  # 4 steps x 8 pairs


def test_float32_export_is_exact_and_resume_dtype_is_float32(shards, tiny_model, tmp_path, monkeypatch):
    """save_dtype float32: model/ is the float32 weights (no weights/ copy), logits equal exactly."""
    store = _store(shards)
    prefix = _run(tmp_path, tiny_model, store, monkeypatch, "f32run", save_dtype="float32")
    assert not store.list_keys(f"{prefix}/{ckpt.WEIGHTS}/")
    folder = ckpt.download_model(store, prefix, tmp_path / "model")
    assert _dtypes(folder) == {"F32"}
    assert json.loads((folder / "config.json").read_text())["dtype"] == "float32"
    # the same run in bfloat16 trains the same float32 weights (save_dtype touches only the export)
    other = _store(shards)
    bf16_prefix = _run(tmp_path / "b", tiny_model, other, monkeypatch, "f32run")
    assert torch.equal(_logits(folder), _logits(ckpt.download_weights(other, bf16_prefix, tmp_path / "w")))


@pytest.mark.parametrize("layout", ["sharded", "full"])
def test_offdpo_export_from_a_real_checkpoint(shards, tiny_model, tmp_path, monkeypatch, layout, capsys):
    """`offdpo export` from a local copy of a real run: float32 equal to the trained weights exactly,
    bfloat16 equal to the trainer's own bfloat16 export; --hub-ready has card, config, tokenizer and
    generation config; a bad dtype or a folder that is not a checkpoint is exit 2 with the fix."""
    store = _store(shards)
    prefix = _run(tmp_path, tiny_model, store, monkeypatch, f"cli-{layout}", checkpoint_format=layout)
    assert ckpt.read_state(store, prefix).get("checkpoint_format", "full") == layout
    root = tmp_path / "bucket"
    _dump(store, root)
    step_dir = root / prefix

    f32, bf16 = tmp_path / "f32", tmp_path / "bf16"
    assert offdpo(["export", "--checkpoint", str(step_dir), "--out", str(f32), "--dtype", "float32"]) == 0
    assert offdpo(["export", "--checkpoint", str(step_dir), "--out", str(bf16), "--hub-ready"]) == 0
    trainer_export = ckpt.download_model(store, prefix, tmp_path / "trainer-model")
    assert _dtypes(f32) == {"F32"} and _dtypes(bf16) == {"BF16"}
    if layout == "full":
        trained = _logits(ckpt.download_weights(store, prefix, tmp_path / "weights"))
        assert torch.equal(_logits(f32), trained)
    else:  # the trained float32 weights are only in dcp/: the float32 export rounds to the trainer's bf16
        from safetensors.torch import load_file

        for name, t in load_file(str(f32 / "model.safetensors")).items():
            assert torch.equal(t.to(torch.bfloat16), load_file(str(trainer_export / "model.safetensors"))[name]), name
    assert torch.equal(_logits(bf16), _logits(trainer_export))
    for name in ("README.md", "config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (bf16 / name).is_file(), name
    card = (bf16 / "README.md").read_text()
    assert "| pairs trained | 32 |" in card and "eval/rewards/margins" in card and "| save_dtype | bfloat16 |" in card

    capsys.readouterr()
    assert offdpo(["export", "--checkpoint", str(step_dir), "--out", str(tmp_path / "x"), "--dtype", "int8"]) == 2
    assert "use one of bfloat16, float32, float16" in capsys.readouterr().err
    assert offdpo(["export", "--checkpoint", str(root), "--out", str(tmp_path / "y")]) == 2
    assert "no state.json there" in capsys.readouterr().err
