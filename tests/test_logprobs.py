import torch

from offdpo.fingerprint import model_fingerprint
from offdpo.logprobs import gather_token_logprobs


def test_chunked_gather_matches_full_log_softmax_with_grads():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    hidden = torch.randn(2, 7, 16, requires_grad=True)
    targets = torch.randint(0, 50, (2, 7))
    full = torch.log_softmax(head(hidden).float(), -1).gather(-1, targets[..., None])[..., 0]
    (g_full,) = torch.autograd.grad(full.sum(), hidden)
    for chunk, ckpt in ((3, False), (5, True), (100, False)):
        got = gather_token_logprobs(hidden, head, targets, chunk_size=chunk, checkpoint=ckpt)
        assert torch.allclose(got, full, atol=1e-6)
        (g,) = torch.autograd.grad(got.sum(), hidden)
        assert torch.allclose(g, g_full, atol=1e-6)


def test_fingerprint_changes_with_weights_dtype_and_template(tiny_model, tmp_path):
    import shutil

    a = model_fingerprint(tiny_model, dtype="float32", engine="vllm", engine_version="x")
    b = model_fingerprint(tiny_model, dtype="float32", engine="transformers", engine_version="y")
    assert a.fingerprint_id == b.fingerprint_id, "engine is not part of identity"
    assert (
        model_fingerprint(tiny_model, dtype="bfloat16", engine="vllm", engine_version="x").fingerprint_id
        != a.fingerprint_id
    )
    assert (
        model_fingerprint(
            tiny_model, dtype="float32", engine="vllm", engine_version="x", chat_template="{{ messages }}"
        ).fingerprint_id
        != a.fingerprint_id
    )
    copy = tmp_path / tiny_model.name
    shutil.copytree(tiny_model, copy)
    assert (
        model_fingerprint(copy, dtype="float32", engine="vllm", engine_version="x").fingerprint_id == a.fingerprint_id
    )
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (copy / "model.safetensors").write_bytes(bytes(data))
    assert model_fingerprint(copy, dtype="float32", engine="vllm", engine_version="x").weights_hash != a.weights_hash
