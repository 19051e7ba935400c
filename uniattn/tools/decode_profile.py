"""Where a compiled decode step's GPU time goes: torch.profiler's kernel table for one model.

    python -m uniattn.tools.decode_profile --batch 8 --context 16384 [--variant uniattn|stock_grouped]

Builds the benchmark's LLaMA-3.1-8B-shaped pair (``bench.build_pair``, layout 4 16 33), compiles one
static-cache decode step like ``bench`` does (fused projections unless ``--no_fuse``), profiles
5 steps, and prints the kernels by total GPU time; ``--attention KEY=N ...`` first sets those of the
attention kernels' launch shape (``triton_decode.CONFIG``), as ``decode_ab --attention`` does. Matrix products show as cuBLAS kernels
(``nvjet``/``gemm``), the attention as ``_decode_attend_kernel`` / ``_decode_merge_kernel`` /
``_decode_apply_kernel``, and the rest as Inductor's fused kernels.
"""

from __future__ import annotations

import argparse
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from ..modeling import triton_decode
from ..modeling.fused import fuse_projections
from . import bench
from .decode_ab import attention_settings


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--context", type=int, default=16384)
    p.add_argument("--variant", choices=("uniattn", "stock_grouped"), default="uniattn")
    p.add_argument("--rows", type=int, default=18, help="kernels to list")
    p.add_argument("--no_fuse", action="store_true", help="without fused projections (uniattn.fuse_projections)")
    p.add_argument("--attention", nargs="+", default=[], metavar="KEY=N",
                   help=f"these of the attention kernels' launch shape {triton_decode.CONFIG}")
    args = p.parse_args(argv)
    try:
        triton_decode.CONFIG.update(attention_settings(args.attention))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("error: the profile needs a CUDA GPU", file=sys.stderr)
        return 2
    stock, uni = bench.build_pair("llama3.1-8b", (4, 16, 33))
    model = uni
    if args.variant == "stock_grouped":
        model = stock
        stock.set_attn_implementation(bench.stock_kernels(stock.config)["stock_grouped"])
    if not args.no_fuse:
        fuse_projections(model)
    b, n = args.batch, args.context
    step = bench.static_decode_step(model, b, n, compiled=True)

    with torch.no_grad():
        ms = bench.cuda_median_ms(step, repeat=10, warmup=5, inner=bench.DECODE_STEPS)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                step()
            torch.cuda.synchronize()
    print(f"{args.variant}, batch {b}, context {n}, attention {triton_decode.CONFIG}: {ms:.2f} ms per step "
          "(back to back); kernels over 5 steps:")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=70))
    return 0


if __name__ == "__main__":
    sys.exit(main())
