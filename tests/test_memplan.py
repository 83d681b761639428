"""The memory planner (offdpo/memplan.py, `offdpo plan`): parameter counts against real models,
state bytes against a real AdamW step, the FSDP and vLLM arithmetic, and the command line."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from cli.main import main as offdpo_main
from offdpo.errors import ConfigError
from offdpo.memplan import (
    GIB,
    ModelShape,
    activation_bytes,
    estimate_trainer,
    fits_vllm,
    measure_state_bytes,
    measured_vs_planned,
    parse_bytes,
    plan,
)

LLAMA3_8B = {
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "tie_word_embeddings": False,
}
QWEN2_72B = {
    "model_type": "qwen2",
    "hidden_size": 8192,
    "intermediate_size": 29568,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "vocab_size": 152064,
    "tie_word_embeddings": False,
}
# ~25M parameters, tied embeddings, Qwen2 (q/k/v biases): the real-step check stays under a few seconds.
SMALL_QWEN2 = {
    "model_type": "qwen2",
    "hidden_size": 512,
    "intermediate_size": 1408,
    "num_hidden_layers": 6,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "vocab_size": 16000,
    "tie_word_embeddings": True,
}


def _meta_params(config) -> int:
    """Parameters of the real transformers model, built on the meta device (no memory), tied ones once."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def test_known_model_sizes():
    assert ModelShape.from_config(LLAMA3_8B).params() == pytest.approx(8.03e9, rel=0.002)
    assert ModelShape.from_config(QWEN2_72B).params() == pytest.approx(72.7e9, rel=0.002)


@pytest.mark.parametrize(
    "config",
    [
        Qwen2Config(**{k: v for k, v in SMALL_QWEN2.items() if k != "model_type"}),
        # untied, no biases, head_dim not hidden / heads (Qwen3-like)
        LlamaConfig(
            hidden_size=256,
            intermediate_size=704,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=96,
            vocab_size=5000,
            tie_word_embeddings=False,
        ),
        LlamaConfig(**{k: v for k, v in LLAMA3_8B.items() if k != "model_type"}),
    ],
    ids=["qwen2-small-tied", "llama-head-dim", "llama3-8b"],
)
def test_param_count_equals_transformers(config):
    shape = ModelShape.from_config(config.to_dict())
    assert shape.params() == _meta_params(config)


def test_state_bytes_match_a_real_adamw_step():
    """World 1, float32, no mixed precision: the planner's weights + gradients + AdamW state against
    the storage bytes a real forward/backward/step leaves (tied weights counted once)."""
    result = measured_vs_planned(SMALL_QWEN2)
    shape = ModelShape.from_config(SMALL_QWEN2)
    assert 20e6 < shape.params() < 60e6
    # the measurement itself is plausible: 4 bytes of weights, 4 of gradient, 8 of AdamW per parameter
    assert result.measured.params == pytest.approx(4 * shape.params(), rel=0.01)
    assert result.measured.grads == result.measured.params
    assert result.measured.optimizer == pytest.approx(2 * result.measured.params, rel=0.01)
    assert result.rel_error <= 0.15, result.as_dict()


def test_measure_counts_a_tied_weight_once():
    torch.manual_seed(0)
    emb = torch.nn.Embedding(100, 8)
    head = torch.nn.Linear(8, 100, bias=False)
    head.weight = emb.weight
    model = torch.nn.ModuleList([emb, head])
    opt = torch.optim.AdamW(model.parameters())
    head(emb(torch.tensor([1, 2]))).sum().backward()
    opt.step()
    got = measure_state_bytes(model, opt)
    assert got.params == got.grads == 100 * 8 * 4
    assert got.optimizer >= 2 * 100 * 8 * 4  # exp_avg, exp_avg_sq (+ the step counter)


def test_fsdp_shards_state_over_the_world():
    shape = ModelShape.from_config(LLAMA3_8B)
    one = estimate_trainer(shape, world=1, strategy="fsdp", precision="fp32")
    four = estimate_trainer(shape, world=4, strategy="fsdp", precision="fp32")
    ddp = estimate_trainer(shape, world=4, strategy="ddp", precision="fp32")
    assert four.state / one.state == pytest.approx(0.25, rel=1e-3)
    assert ddp.state == one.state  # DDP replicates
    assert four.activations == one.activations  # activations are per rank's own micro-batch
    assert one.state == 16 * shape.params()


def test_checkpointing_and_lora_shrink_what_they_should():
    shape = ModelShape.from_config(LLAMA3_8B)
    off = estimate_trainer(shape, world=8, checkpointing=False)
    on = estimate_trainer(shape, world=8, checkpointing=True)
    assert on.activations < off.activations / 5
    assert on.state == off.state
    lora = estimate_trainer(shape, world=8, lora_r=16)
    # r=16 on all seven projections of Llama-3-8B: 42M adapters (peft reports 41,943,040)
    assert lora.trainable_params == 41_943_040
    assert lora.state < off.state / 7  # frozen bf16 base: 2 bytes per parameter instead of 16


def test_fits_vllm_refuses_too_big_with_bytes_and_settings():
    r = fits_vllm(QWEN2_72B, tp=1, pp=1, gpu_mem_bytes=80 * GIB, utilization=0.9, dtype="bfloat16")
    assert not r.fits and r.needed_bytes > r.available_bytes == int(0.9 * 80 * GIB)
    for words in ("needs", "have 72.0 GiB", "OFFDPO_REFSCORE_TENSOR_PARALLEL_SIZE", "OFFDPO_REFSCORE_MAX_MODEL_LEN"):
        assert words in r.message
    assert f"{r.needed_bytes / GIB:.1f} GiB" in r.message
    ok = fits_vllm(QWEN2_72B, tp=4, pp=1, gpu_mem_bytes=80 * GIB, utilization=0.9, dtype="bfloat16")
    assert ok.fits and ok.weights_bytes == pytest.approx(72.7e9 * 2 / 4, rel=0.01)
    # KV per token per GPU: 2 (K, V) x 80 layers x 2 KV heads x 128 x 2 bytes
    assert ok.kv_tokens == ok.kv_cache_bytes // (2 * 80 * 2 * 128 * 2)
    bad = fits_vllm(QWEN2_72B, tp=3, pp=1, gpu_mem_bytes=80 * GIB, utilization=0.9, dtype="bfloat16")
    assert not bad.fits and "not divisible by tensor-parallel size 3" in bad.message


def test_plan_recommends_the_simplest_layout_that_fits():
    small = plan(ModelShape.from_config(SMALL_QWEN2), gpus=8, gpu_mem_bytes=80 * GIB, seq=2048)
    assert small.trainer_choice is not None
    assert small.trainer_choice.strategy == "ddp" and not small.trainer_choice.checkpointing
    assert small.refscore_choice is not None and small.refscore_choice.tp == 1

    big = plan(ModelShape.from_config(QWEN2_72B), gpus=8, gpu_mem_bytes=80 * GIB)
    assert big.trainer_choice is None
    assert big.trainer_advice.startswith("does not fit: needs") and "have 68.0 GiB" in big.trainer_advice
    lora = plan(ModelShape.from_config(QWEN2_72B), gpus=8, gpu_mem_bytes=80 * GIB, lora_r=16)
    assert lora.trainer_choice is not None and lora.trainer_choice.strategy == "fsdp"
    assert lora.trainer_choice.total <= lora.usable_bytes


def test_parse_bytes():
    assert parse_bytes("80GiB") == 80 * GIB
    assert parse_bytes("80GB") == 80 * 10**9
    assert parse_bytes("141G") == 141 * GIB
    assert parse_bytes("81920MiB") == 80 * GIB
    with pytest.raises(ConfigError, match="80GiB"):
        parse_bytes("eighty")


def test_cli_plan_table_and_json(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA3_8B))
    assert offdpo_main(["plan", "--model", str(tmp_path), "--gpus", "8", "--gpu-mem", "80GiB"]) == 0
    table = capsys.readouterr().out
    assert "8.03B parameters" in table and "FSDP x8, ckpt on" in table and "recommended:" in table

    rc = offdpo_main(["plan", "--model", str(tmp_path / "config.json"), "--gpus", "1", "--gpu-mem", "24GiB", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 1 and out["trainer_choice"] is None and out["trainer_advice"].startswith("does not fit")

    assert offdpo_main(["plan", "--model", str(tmp_path / "nope"), "--gpus", "1", "--gpu-mem", "80GiB"]) == 2
    assert "no model config" in capsys.readouterr().err


def test_activation_estimate_matches_what_autograd_saves():
    """float32 on the CPU: the bytes autograd saves in a real forward of the decoder layers (counted by a
    saved-tensors hook, each storage once, parameters excluded) against the planner's per-layer figure.
    With checkpointing the forward keeps only each layer's input; the planner adds the one layer that
    backward recomputes, taken here from the measured run without checkpointing."""
    torch.manual_seed(0)
    config = Qwen2Config(**{k: v for k, v in SMALL_QWEN2.items() if k != "model_type"})
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").float().train()
    shape = ModelShape.from_config(SMALL_QWEN2)
    tokens = 512
    ids = torch.randint(0, shape.vocab_size, (1, tokens))
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def saved_bytes() -> int:
        sizes: dict[int, int] = {}  # storage -> bytes: a tensor saved twice (or a view) counts once

        def pack(t):
            storage = t.untyped_storage()
            if storage.data_ptr() not in weights:
                sizes[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.model(input_ids=ids)
        return sum(sizes.values())

    def planned_body(checkpointing: bool) -> int:
        # the decoder layers only: drop the LM head chunk (chunk_bytes=0 -> none here) and the stream terms
        head_and_stream = tokens * shape.vocab_size * 12 + tokens * shape.hidden_size * 16
        return activation_bytes(shape, tokens, 4, checkpointing, chunk_bytes=0) - head_and_stream

    full = saved_bytes()
    assert full == pytest.approx(planned_body(False), rel=0.15)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    kept = saved_bytes()
    assert kept < full / 4
    assert kept + full / shape.num_layers == pytest.approx(planned_body(True), rel=0.15)
