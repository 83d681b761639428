import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from localdev.testmodel import build_test_model, tree_digest


def test_builder_is_deterministic(tmp_path, tiny_model):
    again = build_test_model(tmp_path / "again", size="tiny")
    assert tree_digest(again) == tree_digest(tiny_model)
    assert "model.safetensors" in tree_digest(again)


def test_transformers_loads_it_with_a_real_chat_template(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    text = tok.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False, add_generation_prompt=True)
    assert text.startswith(tok.bos_token) and text.endswith("<|im_start|>assistant\n")
    ids = tok(text, add_special_tokens=False).input_ids
    assert ids.count(tok.bos_token_id) == 1
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), len(tok))
    assert torch.isfinite(logits).all()


@pytest.mark.vllm
def test_vllm_loads_it_and_agrees_with_transformers(tiny_model):
    # In its own process, as refscore runs it: the engine spawns workers, and its exit code must be 0
    # (an abort at interpreter exit comes from vLLM's unjoined output thread; see VLLMEngine.shutdown).
    script = textwrap.dedent(f"""
        import json
        from services.refscore.engines import VLLMEngine
        if __name__ == "__main__":
            engine = VLLMEngine({str(tiny_model)!r}, "float32", 256, 0.08)
            ids = [1, 2, 88, 86, 268, 202, 326, 409, 3, 202, 2, 68, 440, 361]
            lps = engine.score([(ids[:1], ids[1:])])[0]
            print("RESULT" + json.dumps({{"ids": ids, "logprobs": [None] + lps}}))
            engine.shutdown()
    """)
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).resolve().parent.parent,
    )
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    assert proc.returncode == 0 and line, f"vLLM failed to load the model:\n{proc.stderr[-3000:]}"
    result = json.loads(line[0][len("RESULT") :])

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    ids = torch.tensor([result["ids"]])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
    expected = logp.gather(-1, ids[0, 1:, None])[:, 0].tolist()
    got = result["logprobs"][1:]
    assert max(abs(a - b) for a, b in zip(got, expected)) < 1e-5


def test_sizes_have_the_parameter_counts_the_benchmarks_name():
    from localdev.testmodel import parameter_count

    assert 20e6 < parameter_count("bench") < 30e6  # bench: ~25M (issue: 8 layers, hidden 512, head_dim 64)
    assert 0.4e9 < parameter_count("gpu") < 0.6e9  # gpu: ~0.5B for GPU runs


def test_a_folder_the_builder_does_not_own_is_never_overwritten(tmp_path):
    from localdev.testmodel import ensure_test_model

    user_model = tmp_path / "my-qwen"
    user_model.mkdir()
    (user_model / "config.json").write_text('{"model_type": "qwen2", "vocab_size": 151936}')
    (user_model / "model.safetensors").write_bytes(b"real weights")
    before = {p.name: p.read_bytes() for p in user_model.iterdir()}
    with pytest.raises(FileExistsError, match="not built by `offdpo model build`"):
        ensure_test_model(user_model, size="tiny")
    assert {p.name: p.read_bytes() for p in user_model.iterdir()} == before
