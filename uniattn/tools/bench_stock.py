"""Plain stock compiled decode, in a process of its own: the benchmark's stock column.

    python -m uniattn.tools.bench_stock --shape llama3.1-8b --points 1x4096 8x16384 4x32768

A stock transformers model (``bench.random_stock``: the shape's class, random bf16 weights) decodes
one token per sequence from a static cache that already holds the context, under
``torch.compile(mode="reduce-overhead", fullgraph=True)`` with static shapes, compiled afresh
for each point. LLaMA and Mistral run transformers' own SDPA path, none of UniAttn's kernels (a
Gemma-2 shape gets ``bench.stock_kernels``' exact kernel), and no other model shares the process
or the GPU's memory: the fastest stock configuration we know of.
Prints one JSON line per point: ``{"batch", "context", "ms"}``.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama3.1-8b")
    p.add_argument("--points", nargs="+", required=True, metavar="BxCONTEXT")
    args = p.parse_args(argv)
    from .bench import DECODE_STEPS, cuda_median_ms, parse_point, random_stock, static_decode_step

    points = []
    for text in args.points:
        try:
            points.append(parse_point(text))
        except ValueError:
            print(f"error: point {text!r} is not BATCHxCONTEXT (e.g. 8x16384)", file=sys.stderr)
            return 2
    model = random_stock(args.shape)
    for batch, ctx in points:
        step = static_decode_step(model, batch, ctx, compiled=True)
        with torch.no_grad():
            ms = cuda_median_ms(step, repeat=10, warmup=5, inner=DECODE_STEPS)
        print(json.dumps({"batch": batch, "context": ctx, "ms": ms}), flush=True)
        del step
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
