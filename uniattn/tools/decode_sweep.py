"""Launch-shape sweep of the Triton decode kernels on this GPU: which ``triton_decode.CONFIG`` is fastest.

    python -m uniattn.tools.decode_sweep [--out F.md] [--grid programs_per_sm=8,16 stages=3,4]

For each configuration (programs per SM, tile positions, warps, pipeline stages) and each shape
(LLaMA-3.1-8B heads at batch 8 / 16k and batch 1 / 4k, Gemma-2-9B heads at batch 2 / 8k), times
``decode_attend`` without and with the leader's rows, and ``decode_apply``, each as a CUDA graph of
20 calls (launch gaps out, the split merge in), over two K/V sets so that no call finds the last
one's bytes in L2. Prints the K/V bytes each call reads per second and, per shape and kernel, the
best configuration. ``--grid`` replaces the swept values of the keys it names.

It also ranks the configurations for the benchmark's LLaMA-3.1-8B step (layout ``4 16 33``: per
step 16 ``decode_attend`` calls without rows, 4 with them, 12 ``decode_apply``): at each of the two
LLaMA shapes a configuration's attention time per step, over the best one's there, summed over
the two. ``--pick F`` writes the first as ``KEY=V`` words (``decode_ab --attention $(cat F)``).
Set the winner in ``uniattn/modeling/triton_decode.py``'s ``CONFIG``.
"""

from __future__ import annotations

import argparse
import itertools
import sys

import torch

from ..io import write_text
from ..modeling import triton_decode as td

SHAPES = ((8, 16384, 128, 32, 8), (1, 4096, 128, 32, 8), (2, 8192, 256, 16, 8))  # batch, context, head_dim, heads, kv
GRID = {"programs_per_sm": (2, 4, 8), "block_n": (64, 128), "warps": (4, 8), "stages": (2, 3), "min_tiles": (1, 4)}
STEP_CALLS = {"attend": 16, "leader": 4, "apply": 12}  # per LLaMA-3.1-8B step at layout 4 16 33


def graph_ms(fn, calls: int = 20) -> float:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return sorted(times)[2]


def rank(step_us: dict) -> list:
    """``(score, values, {shape: us})`` best first: a configuration's time at each shape over the best
    time there, summed over the shapes."""
    shapes = sorted({shape for _, shape in step_us})
    low = {shape: min(us for (_, s), us in step_us.items() if s == shape) for shape in shapes}
    configs = sorted({values for values, _ in step_us})
    ranked = [(sum(step_us[v, s] / low[s] for s in shapes), v, {s: step_us[v, s] for s in shapes}) for v in configs]
    return sorted(ranked)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="also write the table here (markdown)")
    p.add_argument("--pick", help="write the best configuration for the LLaMA step here, as KEY=V words")
    p.add_argument("--grid", nargs="*", default=[], metavar="KEY=V1,V2",
                   help=f"swept values to use instead of the defaults {GRID}")
    args = p.parse_args(argv)
    grid = dict(GRID)
    for item in args.grid:
        key, _, values = item.partition("=")
        if key not in GRID or not values:
            print(f"error: --grid {item!r}: write KEY=V1,V2 with KEY one of {', '.join(GRID)}", file=sys.stderr)
            return 2
        try:
            grid[key] = tuple(int(v) for v in values.split(","))
        except ValueError:
            print(f"error: --grid {item!r}: the values must be integers", file=sys.stderr)
            return 2
    if not torch.cuda.is_available() or td.triton is None:
        print("error: the sweep needs a CUDA GPU and Triton", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    inputs = {}
    for b, n, d, h, kvh in SHAPES:
        q = torch.randn(b, h, 1, d, device="cuda", dtype=torch.bfloat16)
        kvs = [tuple(torch.randn(b, kvh, n + 64, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
               for _ in range(2)]
        mask = torch.ones(b, 1, 1, n + 64, dtype=torch.bool, device="cuda")
        mask[..., n + 1:] = False  # a static cache's unfilled tail
        inputs[b, n, d] = (q, kvs, mask)
    default = dict(td.CONFIG)
    lines = [f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {td.triton.__version__}; "
             "TB/s of K/V read per call", "",
             f"| {', '.join(grid)} | shape (batch, context, head_dim) | attend | leader (rows) | apply |",
             "|---|---|---|---|---|"]
    best = {}
    step_us = {}  # (values, shape) -> the LLaMA step's attention time, us
    try:
        for values in itertools.product(*grid.values()):
            td.CONFIG.update(zip(grid, values))
            for shape, (q, kvs, mask) in inputs.items():
                kv_bytes = 2 * kvs[0][0].numel() * kvs[0][0].element_size()
                turn = itertools.cycle(kvs)
                scale = shape[2] ** -0.5
                rates = {"attend": kv_bytes / graph_ms(lambda: td.decode_attend(q, *next(turn), mask, scale, None, False)),
                         "leader": kv_bytes / graph_ms(lambda: td.decode_attend(q, *next(turn), mask, scale, None, True))}
                rows = td.decode_attend(q, *kvs[0], mask, scale, None, True)[1]
                rates["apply"] = kv_bytes / 2 / graph_ms(lambda: td.decode_apply(rows, next(turn)[1]))
                rates = {k: v / 1e9 for k, v in rates.items()}  # bytes per ms -> TB/s
                lines.append(f"| {values} | {shape} | " + " | ".join(f"{rates[k]:.2f}" for k in rates) + " |")
                print(lines[-1], flush=True)
                if shape[2] == 128:
                    step_us[values, shape] = sum(calls * kv_bytes / (2 if kernel == "apply" else 1) / rates[kernel] / 1e6
                                                 for kernel, calls in STEP_CALLS.items())
                for kernel, rate in rates.items():
                    if rate > best.get((shape, kernel), (0.0,))[0]:
                        best[shape, kernel] = (rate, values)
    finally:
        td.CONFIG.update(default)
    lines += ["", f"Best per shape and kernel ({', '.join(grid)}):", ""]
    lines += [f"- {shape} {kernel}: {rate:.2f} TB/s at {values}" for (shape, kernel), (rate, values) in sorted(best.items())]
    ranked = rank(step_us)
    lines += ["", "For the LLaMA step (attention us per step at each LLaMA shape; score: the sum of each over the "
              "best there):", "", "| " + ", ".join(grid) + " | " + " | ".join(
                  str(s) for s in ranked[0][2]) + " | score |", "|---|" + "---|" * (len(ranked[0][2]) + 1)]
    lines += [f"| {values} | " + " | ".join(f"{us:.1f}" for us in per.values()) + f" | {score:.3f} |"
              for score, values, per in ranked[:8]]
    text = "\n".join(lines) + "\n"
    print("\n".join(lines[-len(best) - 16:]))
    if args.pick:
        write_text(args.pick, " ".join(f"{k}={v}" for k, v in zip(grid, ranked[0][1])) + "\n")
    if args.out:
        write_text(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
