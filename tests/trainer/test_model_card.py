"""The model card builder (services/trainer/model_card.py): pure, from a checkpoint's records."""

from __future__ import annotations

import json

import yaml

from services.trainer.model_card import base_model_license, card_facts, model_card

STATE = {
    "step": 4,
    "fingerprint": "fp-abc123",
    "world_size": 2,
    "data": {"mode": "replay", "epoch": 0, "index": 32},
    "config": {
        "model": "Qwen/Qwen2.5-0.5B-Instruct",
        "run_name": "demo",
        "mode": "replay",
        "prefix": "scores/fp-abc123/",
        "loss_type": "sigmoid",
        "beta": 0.1,
        "lr": 5e-7,
        "reference_model": "",
        "reference_model_id": "",
        "reference_dtype": "bfloat16",
        "global_batch_size": 8,
    },
}
METRICS = "\n".join(
    json.dumps(r)
    for r in [
        {"step": 2, "loss": 0.69, "rewards/accuracies": 0.5},
        {"step": 2, "eval/loss": 0.68, "eval/rewards/accuracies": 0.55, "eval/rewards/margins": 0.01, "eval/pairs": 12},
        {"step": 4, "loss": 0.61, "rewards/accuracies": 0.75},
        {"step": 4, "eval/loss": 0.60, "eval/rewards/accuracies": 0.75, "eval/rewards/margins": 0.2, "eval/pairs": 12},
        # past the checkpoint (a later checkpoint's, or redone after a crash): never on this card
        {"step": 6, "eval/loss": 0.1, "eval/rewards/accuracies": 0.99, "eval/rewards/margins": 9.0, "eval/pairs": 12},
    ]
)
PAIRS = "\n".join(json.dumps({"step": s, "pair_ids": [f"p{s}-{i}" for i in range(8)]}) for s in (1, 2, 3, 4, 5))


def _card(**kw):
    base = dict(metrics_jsonl=METRICS, trained_pairs_jsonl=PAIRS, save_dtype="bfloat16", license="apache-2.0")
    return model_card(card_facts(STATE, **{**base, **kw}))


def _front(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_front_matter_is_what_the_hub_reads():
    front = _front(_card(offdpo_version="0.1.0", offdpo_commit="abc1234"))
    assert front == {
        "library_name": "transformers",
        "base_model": "Qwen/Qwen2.5-0.5B-Instruct",
        "tags": ["dpo", "offdpo"],
        "license": "apache-2.0",
    }


def test_a_local_base_model_and_an_unknown_license_are_left_out_of_the_front_matter():
    state = {**STATE, "config": {**STATE["config"], "model": "/models/tiny"}}
    card = model_card(card_facts(state, save_dtype="float32"))
    assert _front(card) == {"library_name": "transformers", "tags": ["dpo", "offdpo"]}
    assert "`/models/tiny`" in card  # still named in the body
    assert "| pairs trained | not recorded |" in card and "No held-out evaluation" in card


def test_the_body_has_models_data_settings_and_the_checkpoints_own_eval():
    card = _card(offdpo_version="0.1.0", offdpo_commit="abc1234")
    assert "| reference fingerprint | `fp-abc123` |" in card
    assert "(the base model)" in card and "| reference dtype | bfloat16 |" in card
    assert "| scored shards (S3 prefix) | `scores/fp-abc123/` |" in card
    assert "| pairs trained | 32 |" in card  # steps 1-4 of 8 pairs; step 5 is past the checkpoint
    assert "| pairs held out (evaluated) | 12 |" in card
    for row in ("| loss_type | sigmoid |", "| beta | 0.1 |", "| lr | 5e-07 |", "| steps | 4 |", "| world_size | 2 |"):
        assert row in card, row
    assert "| save_dtype | bfloat16 |" in card
    assert "held-out pairs at step 4" in card and "| eval/rewards/margins | 0.2 |" in card
    assert "| eval/rewards/margins | 9 |" not in card and "0.99" not in card
    assert "offdpo 0.1.0, commit `abc1234`" in card


def test_a_continuous_run_names_its_topic():
    state = {**STATE, "config": {**STATE["config"], "mode": "continuous"}}
    card = model_card(card_facts(state, save_dtype="bfloat16", topic="offdpo.shards.v1", dead_letters=3))
    assert "| shard-ready topic | `offdpo.shards.v1` |" in card and "| dead letters | 3 |" in card


def test_the_base_models_license_comes_from_its_readme(tmp_path):
    assert base_model_license(tmp_path) is None
    (tmp_path / "README.md").write_text("---\nlicense: mit\ntags: [x]\n---\n# model\nlicense: not this\n")
    assert base_model_license(tmp_path) == "mit"
    (tmp_path / "README.md").write_text("# no front matter\nlicense: mit\n")
    assert base_model_license(tmp_path) is None
