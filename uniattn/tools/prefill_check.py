"""Prefill, stock against UniAttn, in paired rounds: is UniAttn's prefill slower than stock's?

    python -m uniattn.tools.prefill_check [--contexts 1024 4096 16384] [--rounds 7] [--out F.md]

The benchmark's LLaMA-3.1-8B-shaped pair (``bench.build_pair``, layout 4 16 33, random bf16
weights, one process) prefills one sequence per context. Each round times stock (SDPA), stock on
UniAttn's serving path and UniAttn (``bench.run_variants``: fused projections for the latter two)
back to back, each the median of 5 timings after 2 warm-ups, so drifts of the card's clock hit the
variants of a round alike. Prints per context the median over rounds of each variant and the
per-round ratio UniAttn / stock: median, min and max.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from ..io import write_text
from . import bench


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--out", help="also write the table here (markdown)")
    args = p.parse_args(argv)
    if args.rounds < 1 or any(c < 1 for c in args.contexts):
        print(f"error: --rounds {args.rounds} and --contexts {args.contexts} must be positive", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("error: the check needs a CUDA GPU", file=sys.stderr)
        return 2
    stock, uni = bench.build_pair("llama3.1-8b", (4, 16, 33))
    lines = [f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}; LLaMA-3.1-8B shapes, layout 4 16 33, "
             f"bf16, batch 1; {args.rounds} rounds", "",
             "| context | stock ms | stock on UniAttn's path ms | UniAttn ms | UniAttn / stock per round: median (min-max) |",
             "|---|---|---|---|---|"]
    for n in args.contexts:
        ids = torch.randint(0, 1000, (1, n), device="cuda")

        def prefill(model):
            with torch.no_grad():
                return bench.cuda_median_ms(lambda: model(ids, use_cache=True, logits_to_keep=1), repeat=5, warmup=2)

        rounds = [bench.run_variants(stock, uni, prefill) for _ in range(args.rounds)]
        med = {k: statistics.median(r[k] for r in rounds) for k in bench.VARIANTS}
        ratios = [r["uniattn"] / r["stock"] for r in rounds]
        lines.append(f"| {n} | {med['stock']:.1f} | {med['stock_grouped']:.1f} | {med['uniattn']:.1f} | "
                     f"{statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f}) |")
        print(lines[-1], flush=True)
    if args.out:
        write_text(args.out, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
