"""GPU benchmark of refscore's transformers engine: tokens/s and fraction of the GPU's measured peak.

The lent GPU machines have torch and transformers but not vLLM, gRPC or the local stack, so this
runs the engine in-process (what refscore's engine thread runs) next to (c), the padded
transformers forward of TRL's precompute, on the same items as bench/refscore.py, plus the GEMM
peak measured on the same GPU. It needs only torch, transformers and tokenizers. It runs on the CPU
too (a small check that it works; the figures that count come from a GPU).

    python -m bench.gpu --size gpu --dtype bfloat16      # ~0.5B model; writes bench/results/refscore-gpu.json
    python -m bench.gpu --size tiny --pairs 8 --out /tmp/gpu.json   # a quick check anywhere
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the GPU machine runs this from a plain checkout, not an installed package


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="gpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--pairs", type=int, default=128)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "refscore-gpu.json"))
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoTokenizer

    from bench.ceiling import measure
    from bench.refscore import items_of, make_pairs, model_flops, padded_forward_logprobs, timed
    from localdev.testmodel import ensure_test_model
    from services.refscore.engines import EngineSettings, TransformersEngine

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model_dir = ensure_test_model(REPO / ".cache" / "models" / args.size, size=args.size)
    tok = AutoTokenizer.from_pretrained(model_dir)
    seqs = []  # refscore's rule: the rendered chat prompt, then the answer, tokenised separately
    for prompt, answer in items_of(make_pairs(tok, args.pairs)):
        text = tok.apply_chat_template(
            [{"role": r, "content": c} for r, c in prompt], tokenize=False, add_generation_prompt=True
        )
        seqs.append((tok(text, add_special_tokens=False).input_ids, tok(answer, add_special_tokens=False).input_ids))
    tokens = sum(len(p) + len(a) for p, a in seqs)
    params, _, flop_of = model_flops(model_dir)
    flop = sum(flop_of(len(p) + len(a)) for p, a in seqs)
    peak = measure(device=device)
    peak_flops = peak["bf16" if args.dtype == "bfloat16" else "fp32"] * 1e9

    engine = TransformersEngine(
        str(model_dir),
        args.dtype,
        4096,
        settings=EngineSettings(transformers_batch_tokens=65536 if device == "cuda" else 16384),
    )
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    engine.score(seqs[:8])
    engine_s, scored = timed(lambda: (engine.score(seqs), sync())[0])

    def padded_forward():  # (c): the same weights, padded batches of 8, full log-softmax
        logprobs = padded_forward_logprobs(engine.model, seqs, device=device)
        sync()
        return logprobs

    padded_forward()
    forward_s, forward_lps = timed(padded_forward)
    worst = max(abs(x - y) for a, b in zip(scored, forward_lps) for x, y in zip(a, b))
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    result = {
        "device": name,
        "model": f"localdev.testmodel size={args.size}: Qwen2, {params / 1e6:.1f}M parameters",
        "dtype": args.dtype,
        "items": len(seqs),
        "tokens": tokens,
        "tokens_per_s": {"refscore_transformers_engine": tokens / engine_s, "transformers": tokens / forward_s},
        "fraction_of_peak": {
            "refscore_transformers_engine": flop / engine_s / peak_flops,
            "transformers": flop / forward_s / peak_flops,
        },
        "peak_gflops": {"fp32": peak["fp32"], "bf16": peak["bf16"]},
        "peak_detail": peak,
        "max_abs_token_diff_engine_vs_forward": worst,
        "note": "engine in-process (no gRPC: the GPU machine has no vLLM or local stack); FLOP as in bench/refscore.py",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(
        json.dumps(
            {k: result[k] for k in ("device", "model", "tokens_per_s", "fraction_of_peak", "peak_gflops")}, indent=2
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
