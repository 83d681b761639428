"""The machine's matmul ceiling: GEMM GFLOP/s in float32 and bfloat16, measured, not quoted.

Takes the best of torch's default matmul and oneDNN (mkldnn) at a square 2048 GEMM, on every core
torch uses. The best kernel matters: on AMD EPYC, torch's default float32 matmul ran at about half
of oneDNN's (measured 202 vs 442 GFLOP/s on the 2-core dev machine), and vLLM's CPU linears use oneDNN.

    python -m bench.ceiling [cuda]     # prints JSON
"""

from __future__ import annotations

import json
import sys
import time


def _gflops(fn, flop: float, min_s: float = 1.5) -> float:
    for _ in range(3):
        fn()
    best = float("inf")
    deadline = time.perf_counter() + min_s
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return flop / best / 1e9


def measure(size: int = 2048, device: str = "cpu") -> dict:
    """On a GPU: an 8192^3 GEMM, float32 with TF32 off (true float32) and bfloat16."""
    import torch

    on_gpu = device.startswith("cuda")
    if on_gpu:
        size = max(size, 8192)
        torch.backends.cuda.matmul.allow_tf32 = False
    sync = torch.cuda.synchronize if on_gpu else (lambda: None)
    result = {"threads": torch.get_num_threads(), "shape": [size, size, size], "kernels": {}, "device": device}
    flop = 2.0 * size**3
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        x = torch.randn(size, size, dtype=dtype, device=device)
        w = torch.randn(size, size, dtype=dtype, device=device)

        def linear(x=x, w=w):
            torch.nn.functional.linear(x, w)
            sync()

        kernels = {"aten": _gflops(linear, flop)}
        if not on_gpu and torch.backends.mkldnn.is_available():
            xm, wm = x.to_mkldnn(), w.to_mkldnn()
            try:
                kernels["onednn"] = _gflops(lambda xm=xm, wm=wm: torch._C._nn.mkldnn_linear(xm, wm, None), flop)
            except RuntimeError as exc:  # oneDNN refuses bf16 on CPUs without the instructions it needs
                result.setdefault("unavailable", {})[f"onednn_{name}"] = str(exc).splitlines()[0]
        result["kernels"][name] = kernels
        result[name] = max(kernels.values())
    return result


if __name__ == "__main__":
    json.dump(measure(device=sys.argv[1] if len(sys.argv) > 1 else "cpu"), sys.stdout)
    print()
