"""`offdpo plan`: will a model train and serve on these GPUs, and with which settings?

Reads only the model's config.json (offdpo/memplan.py has the arithmetic and what it counts):

    offdpo plan --model DIR|config.json --gpus 8 --gpu-mem 80GiB [--nodes 2] [--lora 16] [--seq 4096]
                [--micro-batch 2] [--json]

Prints per-GPU bytes of weights, gradients, optimizer state, wrapper buffers and activations for the
trainer (DDP and FSDP, gradient checkpointing off and on) and, for refscore's vLLM engine, the weights
per GPU and the KV cache left at each tensor-parallel size; then the layout it recommends, or what is
missing. Exit status 0 when both fit, 1 when one does not, 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import sys

from offdpo.errors import ConfigError
from offdpo.memplan import DEFAULT_CHUNK_BYTES, ModelShape, format_plan, parse_bytes, plan


def main(args) -> int:
    try:
        shape = ModelShape.load(args.model)
        result = plan(
            shape,
            gpus=args.gpus,
            gpu_mem_bytes=parse_bytes(args.gpu_mem),
            nodes=args.nodes,
            lora_r=args.lora,
            seq=args.seq,
            micro_batch=args.micro_batch,
            precision=args.precision,
            chunk_bytes=args.chunk_bytes,
            ref_dtype=args.ref_dtype,
            ref_utilization=args.ref_utilization,
        )
    except ConfigError as exc:
        print(f"offdpo plan: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result.as_dict(), indent=1))
    else:
        print(format_plan(result, shape))
    return 0 if result.trainer_choice and result.refscore_choice else 1


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="a model folder with config.json, or the config.json itself")
    p.add_argument("--gpus", type=int, required=True, help="GPUs per node")
    p.add_argument("--gpu-mem", required=True, help="memory of one GPU: 80GiB, 80GB, 141G, 81920MiB")
    p.add_argument("--nodes", type=int, default=1, help="nodes (the trainer uses gpus x nodes ranks)")
    p.add_argument("--lora", type=int, default=0, metavar="R", help="LoRA rank (0: full fine-tuning)")
    p.add_argument("--seq", type=int, default=4096, help="tokens of prompt + longer answer (trainer max length)")
    p.add_argument(
        "--micro-batch",
        type=int,
        default=0,
        help="pairs per forward pass on one rank (0: the table at 1, the recommendation up to 32)",
    )
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16", help="trainer precision on GPU")
    p.add_argument(
        "--chunk-bytes",
        type=int,
        default=DEFAULT_CHUNK_BYTES,
        help="float32 logits per LM-head chunk (OFFDPO_TRAINER_LOGPROB_CHUNK_BYTES)",
    )
    p.add_argument("--ref-dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument("--ref-utilization", type=float, default=0.9, help="vLLM gpu_memory_utilization")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "plan",
        help="per-GPU memory of the trainer and refscore for a model, and the settings that fit",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    p.set_defaults(fn=main)
