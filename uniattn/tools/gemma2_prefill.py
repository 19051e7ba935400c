"""Gemma-2 prefill and training step on the GPU: stock against UniAttn, both soft-capped, both on flex.

    python -m uniattn.tools.gemma2_prefill [--shape gemma2-9b] [--layout 4 21 43] [--lengths 1024 4096 16384]

Random bf16 weights of the shape's dimensions (no real weights needed: time and memory depend on
shapes only). Prefill is one forward of batch 1 with a DynamicCache, as ``generate()`` starts;
memory is the peak allocated above the weights, which must grow O(T) (a T x T matrix per layer
would grow O(T^2): 16k x 16k x 16 heads x 4 bytes = 16 GiB). The training step is forward +
backward of one sequence with gradient checkpointing, as bench.py times it. Prints a markdown
table, one row as each point finishes, and stops starting points after ``--minutes``.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

import torch
import transformers
from transformers import DynamicCache

from .bench import SHAPES, build_pair, cuda_median_ms, free, gpu_driver, train_step_ms


def prefill_point(model, tokens: int) -> tuple[float, float]:
    ids = torch.randint(0, 1000, (1, tokens), device="cuda")

    def run():
        with torch.no_grad():
            model(ids, past_key_values=DynamicCache(config=model.config), use_cache=True)

    run()  # compile flex for this length outside the timing and the memory peak
    free()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    return cuda_median_ms(run, repeat=5, warmup=1), peak


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="gemma2-9b", choices=[s for s in SHAPES if s.startswith("gemma2")])
    p.add_argument("--layout", type=int, nargs=3, default=(4, 21, 43), metavar=("G", "B", "E"))
    p.add_argument("--lengths", type=int, nargs="+", default=(1024, 4096, 16384))
    p.add_argument("--train_length", type=int, default=4096, help="0: no training step")
    p.add_argument("--minutes", type=float, default=4.0)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: this benchmark needs a CUDA GPU", file=sys.stderr)
        return 2
    deadline = time.monotonic() + 60 * args.minutes
    stock, uni = build_pair(args.shape, tuple(args.layout))
    print(f"{torch.cuda.get_device_name()}, driver {gpu_driver()}, "
          f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}; "
          f"{args.shape} shapes, layout {' '.join(map(str, args.layout))}, bf16, random weights")
    print(f"kernels: stock {stock.config._attn_implementation}, UniAttn {uni.config._attn_implementation}\n")
    print("| what | tokens | stock ms | UniAttn ms | UniAttn / stock | stock peak GiB | UniAttn peak GiB |  (prefill: above the weights; train: all)")
    print("|---|---|---|---|---|---|---|", flush=True)
    points = [("prefill", t) for t in args.lengths] + ([("train step", args.train_length)] if args.train_length else [])
    for what, tokens in points:
        if time.monotonic() > deadline:
            print(f"| {what} | {tokens} | skipped: past --minutes {args.minutes} | | | | |", flush=True)
            continue
        res = {}
        for name, model in (("stock", stock), ("uniattn", uni)):
            if what == "prefill":
                res[name] = prefill_point(model, tokens)
            else:
                torch.cuda.reset_peak_memory_stats()
                ms = train_step_ms(model, tokens)
                res[name] = (ms, torch.cuda.max_memory_allocated() / 2**30)
                model.eval()
            free()
        (s_ms, s_mem), (u_ms, u_mem) = res["stock"], res["uniattn"]
        print(f"| {what} | {tokens} | {s_ms:.1f} | {u_ms:.1f} | {u_ms / s_ms:.2f}x | {s_mem:.2f} | {u_mem:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
