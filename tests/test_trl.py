"""Export to TRL and the DPOTrainer drop-in (issue 11), on the local stack.

Shards are written by refscore's real stream worker (Kafka pairs topic -> transformers engine ->
Parquet shards in S3 -> shard-ready events), in this process with the transformers engine so the
session never starts a second vLLM engine. Then: export them (function and CLI), train TRL's real
DPOTrainer on them, count forwards, and compare step 0 with our trainer's own loss code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import threading
import time

import pytest
import torch

# The `trl` extra; scripts/setup.sh installs it (an ImportError here means the venv lacks it).
from trl import DPOConfig
from trl.trainer import dpo_trainer as trl_dpo_module

from integrations.trl_dpo import ExportedDataError, FingerprintMismatchError, OfflineRefDPOTrainer
from integrations.trl_export import (
    TRL_COLUMNS,
    ExportError,
    ShardSource,
    dataset_fingerprint,
    export_trl,
    iter_trl_tables,
    load_trl_dataset,
)
from offdpo import records
from offdpo.kafka import ensure_topics, make_producer, read_topic
from offdpo.s3 import ObjectStore
from offdpo.v1 import records_pb2
from tests.pairs import make_pairs

pytestmark = pytest.mark.stack
N_PAIRS = 8
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def scored(stack, tiny_model):
    """Pairs scored by refscore's stream worker into S3: (store, prefix, fingerprint, pairs, shard keys)."""
    import uuid

    from services.refscore.config import RefscoreConfig
    from services.refscore.scorer import Scorer
    from services.refscore.worker import StreamWorker

    tag = uuid.uuid4().hex[:8]
    kafka = dataclasses.replace(
        stack.kafka,
        pairs_topic=f"trl.pairs.{tag}",
        shards_topic=f"trl.shards.{tag}",
        deadletter_topic=f"trl.dead.{tag}",
    )
    ensure_topics(stack.kafka, [kafka.pairs_topic, kafka.shards_topic, kafka.deadletter_topic], partitions=3)
    pairs = make_pairs(N_PAIRS, tag)
    producer = make_producer(kafka, "test-trl")
    for pair in pairs:
        producer.send(kafka.pairs_topic, key=pair.pair_id.encode(), value=pair.SerializeToString())
    producer.flush()
    producer.close()

    cfg = RefscoreConfig(
        model_dir=str(tiny_model),
        engine="transformers",
        dtype="float32",
        max_model_len=512,
        batch_wait_s=0.3,
        group_id=f"trl-{tag}",
    )
    scorer = Scorer(cfg)
    scorer.load()
    stop = threading.Event()
    worker = StreamWorker(scorer, cfg, kafka, stack.s3)
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 120
        while True:
            events = [
                records_pb2.ShardReady.FromString(r.value) for r in read_topic(kafka, kafka.shards_topic, idle_s=0.5)
            ]
            if sorted({pid for e in events for pid in e.pair_ids}) == sorted(p.pair_id for p in pairs):
                break
            assert time.monotonic() < deadline, "refscore's worker did not announce every pair within 120 s"
            time.sleep(0.5)
    finally:
        stop.set()
        thread.join(timeout=60)
        scorer.shutdown()
    fp = scorer.fingerprint
    prefix = f"scores/{fp.fingerprint_id}/{kafka.pairs_topic}/"
    store = ObjectStore(stack.s3)
    keys = store.list_keys(prefix)
    assert len(keys) >= 2, f"want several shards to show shard-by-shard streaming, got {keys}"
    return store, prefix, fp, pairs, keys


@pytest.fixture(scope="module")
def exported(scored, tmp_path_factory):
    store, prefix, fp, pairs, keys = scored
    out = tmp_path_factory.mktemp("trl-export") / "pairs"
    result = export_trl(ShardSource.from_store(store, prefix), out)
    assert (result.shards, result.pairs, result.duplicates) == (len(keys), N_PAIRS, 0)
    return load_trl_dataset(out)


@pytest.fixture(scope="module")
def other_policy(tmp_path_factory):
    """Same architecture and tokenizer as the reference, other random weights."""
    from localdev.testmodel import build_test_model

    return build_test_model(tmp_path_factory.mktemp("models") / "tiny-seed1", size="tiny", seed=1)


# -- export -------------------------------------------------------------------------------------------
def test_export_streams_shard_by_shard_and_keeps_ids_and_sums(scored):
    store, prefix, fp, pairs, keys = scored
    fetched = []
    source = ShardSource.from_store(store, prefix)
    inner = source.fetch
    source.fetch = lambda key: fetched.append(key) or inner(key)
    tables = iter_trl_tables(source)
    assert fetched == [], "nothing is fetched before the first shard is asked for"
    seen = []
    for n, (key, table, shard_fp) in enumerate(tables, start=1):
        assert fetched == keys[:n], "one shard fetched at a time, in order"
        assert shard_fp.fingerprint_id == fp.fingerprint_id
        shard = records.read_shard(store.get_bytes(key))
        assert table.column_names == ["pair_id", *TRL_COLUMNS]
        # Token ids exactly as refscore scored them: no BOS/EOS added, nothing cut.
        assert table.column("prompt_ids").to_pylist() == shard.table.column("prompt_token_ids").to_pylist()
        assert table.column("chosen_ids").to_pylist() == shard.table.column("chosen_token_ids").to_pylist()
        assert table.column("rejected_ids").to_pylist() == shard.table.column("rejected_token_ids").to_pylist()
        # TRL's convention: the sum of the answer's per-token reference log-probs.
        for side in ("chosen", "rejected"):
            per_token = shard.table.column(f"{side}_logprobs").to_pylist()
            stored_sum = shard.table.column(f"{side}_logprob_sum").to_pylist()
            got = table.column(f"ref_{side}_logps").to_pylist()
            assert got == [sum(float(x) for x in row) for row in per_token]
            assert max(abs(a - b) for a, b in zip(got, stored_sum)) < 1e-4
        seen += table.column("pair_id").to_pylist()
    assert sorted(seen) == sorted(p.pair_id for p in pairs)


def test_export_cli_parquet_and_disk_agree(scored, exported, stack, tmp_path, monkeypatch):
    from cli.main import main

    store, prefix, fp, pairs, keys = scored
    for name, value in stack.env().items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "parquet"
    assert main(["export-trl", f"s3://{store.bucket}/{prefix}", str(out), "--format", "parquet"]) == 0
    from_parquet = load_trl_dataset(out, cache_dir=tmp_path / "hf-cache")
    assert dataset_fingerprint(from_parquet) == fp == dataset_fingerprint(exported)
    meta = json.loads(exported.info.description)
    assert meta["offdpo.pairs"] == N_PAIRS and meta["offdpo.source"] == f"s3://{store.bucket}/{prefix}"
    assert from_parquet.to_list() == exported.to_list()
    assert sorted(exported["pair_id"]) == sorted(p.pair_id for p in pairs)
    # A second export onto the same path is refused, not silently mixed; --overwrite replaces it.
    assert main(["export-trl", f"s3://{store.bucket}/{prefix}", str(out), "--format", "parquet"]) == 2
    (out / "unrelated.txt").write_text("x")
    assert main(["export-trl", f"s3://{store.bucket}/{prefix}", str(out), "--format", "parquet"]) == 2
    (out / "unrelated.txt").unlink()
    assert main(["export-trl", f"s3://{store.bucket}/{prefix}", str(out), "--format", "parquet", "--overwrite"]) == 0
    assert load_trl_dataset(out, cache_dir=tmp_path / "hf-cache-2").to_list() == exported.to_list()
    # --overwrite never deletes a folder that holds something else (a model, a checkpoint).
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    (model_dir / "model.safetensors").write_bytes(b"weights")
    with pytest.raises(ExportError, match="holds files an export does not write .config.json, model.safetensors"):
        export_trl(ShardSource.from_store(store, prefix), model_dir, overwrite=True)
    assert sorted(p.name for p in model_dir.iterdir()) == ["config.json", "model.safetensors"]
    # A local folder of shards works too, and a shard seen twice exports its pairs once.
    local = tmp_path / "shards"
    local.mkdir()
    for i, key in enumerate(keys + keys[:1]):
        (local / f"{i:02d}.parquet").write_bytes(store.get_bytes(key))
    again = export_trl(str(local), tmp_path / "local")
    assert (again.pairs, again.duplicates) == (N_PAIRS, len(records.read_shard(store.get_bytes(keys[0]))))
    with pytest.raises(ExportError, match="neither s3://"):
        export_trl(str(tmp_path / "missing"), tmp_path / "x")


# -- TRL ----------------------------------------------------------------------------------------------
def _dpo_args(tmp_path, **kw) -> DPOConfig:
    base = dict(
        output_dir=str(tmp_path / "trl-run"),
        max_length=None,
        per_device_train_batch_size=N_PAIRS,
        max_steps=3,
        learning_rate=1e-3,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )  # bf16: TRL defaults to True
    base.update(kw)
    return DPOConfig(**base)


def _our_step0(policy_dir, scored, allowed_ids=()) -> dict:
    """Our trainer's own code (data.py checks, losses.py via train.py's train_step), float32, one batch."""
    from transformers import AutoTokenizer

    from services.trainer.config import TrainerConfig
    from services.trainer.shards import examples_from_shard
    from services.trainer.train import load_policy, step_metrics, train_step, wrap

    store, prefix, fp, pairs, keys = scored
    cfg = TrainerConfig(model=str(policy_dir), micro_batch_size=64, loss_type="sigmoid", beta=0.1)
    examples = []
    for key in keys:
        got, refused = examples_from_shard(store.get_bytes(key), key, fp, allowed_ids, cfg.max_length, "refuse")
        assert not refused
        examples += got
    assert len(examples) == N_PAIRS
    pad_id = AutoTokenizer.from_pretrained(policy_dir).pad_token_id or 0
    module = wrap(load_policy(policy_dir, cfg, "cpu"), cfg, 1, "cpu")
    sums = train_step(module, examples, cfg, 0, 1, "cpu", contextlib.nullcontext, pad_id=pad_id)
    return step_metrics(sums, len(examples), 0.0, 0.0, 1.0)


@pytest.mark.parametrize("policy", ["reference", "other_init"])
def test_trl_trains_on_export_without_reference_forward_and_matches_our_step0(
    policy, scored, exported, tiny_model, other_policy, tmp_path, monkeypatch
):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    fp = scored[2]
    # other_init: a policy that is not the reference, so step-0 rewards are far from 0 and the comparison
    # tests the reference values themselves (accepted deliberately, as our trainer's --allow-fingerprint).
    policy_dir, allowed = (tiny_model, ()) if policy == "reference" else (other_policy, (fp.fingerprint_id,))
    ours = _our_step0(policy_dir, scored, allowed)

    calls = {"ref_log_probs": 0, "ref_model_loads": 0, "policy_forward": 0, "backbone_forward": 0, "loss": []}

    def count(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapped

    # Every way TRL 1.16.0 gets reference log-probs: its reference forward, and loading a reference model.
    monkeypatch.setattr(
        trl_dpo_module.DPOTrainer,
        "compute_ref_log_probs",
        count("ref_log_probs", trl_dpo_module.DPOTrainer.compute_ref_log_probs),
    )
    monkeypatch.setattr(
        OfflineRefDPOTrainer,
        "compute_ref_log_probs",
        count("ref_log_probs", OfflineRefDPOTrainer.compute_ref_log_probs),
    )
    monkeypatch.setattr(
        trl_dpo_module, "create_model_from_path", count("ref_model_loads", trl_dpo_module.create_model_from_path)
    )

    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    model = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
    model.register_forward_pre_hook(lambda *_: calls.__setitem__("policy_forward", calls["policy_forward"] + 1))
    model.get_decoder().register_forward_pre_hook(
        lambda *_: calls.__setitem__("backbone_forward", calls["backbone_forward"] + 1)
    )
    trainer = OfflineRefDPOTrainer(
        model=model,
        args=_dpo_args(tmp_path),
        train_dataset=exported,
        processing_class=tokenizer,
        allow_fingerprint_id=allowed,
    )
    assert trainer.ref_model is None and trainer.precompute_ref_logps
    assert calls["policy_forward"] == 0, "building the trainer ran no forward (no reference precompute)"

    real_compute_loss = trainer.compute_loss

    def compute_loss(*args, **kwargs):
        loss = real_compute_loss(*args, **kwargs)
        calls["loss"].append((loss.item(), {k: v[-1] for k, v in trainer._metrics["train"].items()}))
        return loss

    trainer.compute_loss = compute_loss
    trainer.train()

    steps = trainer.state.global_step
    assert steps == 3 and len(calls["loss"]) == steps
    assert calls["ref_log_probs"] == 0 and calls["ref_model_loads"] == 0
    assert calls["policy_forward"] == steps and calls["backbone_forward"] == steps, (
        f"one policy forward per step and nothing else: {calls}"
    )
    assert trainer.ref_model is None

    loss0, trl0 = calls["loss"][0]
    trl_step0 = {
        "loss": loss0,
        "rewards/chosen": trl0["rewards/chosen"],
        "rewards/rejected": trl0["rewards/rejected"],
        "rewards/margins": trl0["rewards/margins"],
    }
    diffs = {k: abs(v - ours[k]) for k, v in trl_step0.items()}
    assert max(diffs.values()) < TOLERANCE, f"TRL step 0 {trl_step0} vs ours {ours}: {diffs}"
    # The policy's summed log-probs (|sum| up to ~150 here, where one float32 ulp is 1.5e-5): relative.
    for key in ("logps/chosen", "logps/rejected"):
        assert trl0[key] == pytest.approx(ours[key], rel=1e-6, abs=TOLERANCE), key
    if policy == "other_init":
        assert abs(ours["rewards/chosen"]) > 1e-2, "the other policy really differs from the reference"
    else:
        assert abs(ours["rewards/chosen"]) < 1e-5, "the reference as policy: step-0 rewards are 0"
    assert calls["loss"][-1][0] < loss0, "training moves the loss"


# -- refusals -----------------------------------------------------------------------------------------
@pytest.fixture
def no_trl_init(monkeypatch):
    """Records whether TRL's own constructor (which loads, prepares and could train) was reached."""
    reached = []
    real = trl_dpo_module.DPOTrainer.__init__
    monkeypatch.setattr(
        trl_dpo_module.DPOTrainer, "__init__", lambda self, *a, **kw: reached.append(1) or real(self, *a, **kw)
    )
    return reached


def test_fingerprint_mismatch_is_refused_before_training(exported, tiny_model, other_policy, tmp_path, no_trl_init):
    from transformers import AutoTokenizer

    args = _dpo_args(tmp_path)
    # Other weights (a path: nothing is loaded before the refusal).
    with pytest.raises(FingerprintMismatchError, match=r"weights hash: data \w+, policy \w+") as err:
        OfflineRefDPOTrainer(model=str(other_policy), args=args, train_dataset=exported)
    assert "OFFDPO_REFSCORE_MODEL_DIR" in str(err.value) and "tokenizer hash" not in str(err.value)
    # Another chat template.
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.chat_template = tokenizer.chat_template + "{# changed #}"
    with pytest.raises(FingerprintMismatchError, match="chat template hash") as err:
        OfflineRefDPOTrainer(model=str(tiny_model), args=args, train_dataset=exported, processing_class=tokenizer)
    assert "weights hash" not in str(err.value)
    # Another tokenizer (same files but a changed special-token setting).
    tok_dir = tmp_path / "tokenizer"
    shutil.copytree(tiny_model, tok_dir)
    conf = json.loads((tok_dir / "tokenizer_config.json").read_text())
    conf["add_bos_token"] = not conf.get("add_bos_token", False)
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(conf))
    with pytest.raises(FingerprintMismatchError, match="tokenizer hash"):
        OfflineRefDPOTrainer(
            model=str(tiny_model),
            args=args,
            train_dataset=exported,
            processing_class=AutoTokenizer.from_pretrained(tok_dir),
        )
    assert no_trl_init == [], "refused before TRL's trainer was built"
    assert not (tmp_path / "trl-run").exists(), "nothing trained, nothing written"


def test_bad_datasets_are_refused_with_what_to_fix(exported, tiny_model, tmp_path, no_trl_init):
    from datasets import Dataset

    args = _dpo_args(tmp_path)
    with pytest.raises(ExportedDataError, match="lacks column.*ref_rejected_logps.*offdpo export-trl"):
        OfflineRefDPOTrainer(
            model=str(tiny_model), args=args, train_dataset=exported.remove_columns("ref_rejected_logps")
        )
    with pytest.raises(ExportedDataError, match="carries no reference fingerprint"):
        OfflineRefDPOTrainer(model=str(tiny_model), args=args, train_dataset=Dataset.from_list(exported.to_list()))
    longest = max(len(r["prompt_ids"]) + max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in exported)
    with pytest.raises(ExportedDataError, match=f"up to {longest} tokens.*max_length=None"):
        OfflineRefDPOTrainer(
            model=str(tiny_model), args=_dpo_args(tmp_path, max_length=longest - 1), train_dataset=exported
        )
    with pytest.raises(ValueError, match="no ref_model"):
        OfflineRefDPOTrainer(model=str(tiny_model), args=args, train_dataset=exported, ref_model=object())
    assert no_trl_init == []
