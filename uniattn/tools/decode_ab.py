"""A/B of launch settings on the compiled UniAttn decode step (one GPU).

    python -m uniattn.tools.decode_ab [--points 1x4096 8x16384] [--variants NAME ...]

The benchmark's LLaMA-3.1-8B-shaped UniAttn model (random bf16 weights, layout ``4 16 33``, fused
projections), compiled afresh for every variant and point as ``bench`` compiles it
(``static_decode_step``), timed as ``bench`` times it: the median of 15 timings of 10 steps queued
back to back. Variants (``VARIANTS``): the products on cuBLAS or on ``triton_linear``'s kernel, with the
stock layer forward or the fused decode layer (``decode_layer``, the serving path's default), the
latter also with the further fusions it leaves off (``decode_layer.FUSE``); Inductor's programmatic dependent launch for its own kernels (``torch._inductor.config.triton.
enable_pdl``) and the product kernel's (``triton_linear.PDL``). Each variant runs once per point, so
differences of 1-2% are within the spread between runs (docs/BENCHMARK.md). ``--attention KEY=V ...``
adds the fused layer with those ``triton_decode.CONFIG`` settings (the attention kernels' launch shape,
e.g. ``decode_sweep --pick``'s) as one more variant; ``--ahead MB[:OMB] ...`` one more per item, the
fused layer with each product asking L2 for MB of the next weight as it ends, and each attention for OMB
of the O weight (``triton_linear.L2_AHEAD``; 0 off); ``--tiles F.json`` one more, the fused layer with
the product kernels' launch settings of a ``linear_sweep --pick`` file (``triton_linear.TILES``).

Each cell also gives the step's share of ``bench``'s byte-model limit (bytes a step reads over the
copy bandwidth measured at the start of the run) and the relative L2 error of the compiled step's logits against the same step run
eagerly with the products on cuBLAS and no PDL (same seeded cache and tokens); bf16 steps land
near 1e-2 (``decode_check``'s compiled row), so a launch setting that breaks an ordering shows
as an error far above that.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from ..modeling import decode_layer, triton_decode, triton_linear
from ..modeling.fused import fuse_projections
from . import bench
from .linear_sweep import load_tiles

# name: (products on the kernel, Inductor PDL, the kernel's PDL release point or None, fused decode layer:
# False, True, or True with these of decode_layer.FUSE changed)
VARIANTS = {
    "cuBLAS": (False, False, None, False),
    "kernel": (True, False, None, False),
    "fused layer": (True, False, None, True),
    "fused layer, splits merged by the last split": (True, False, None, {"merge": True}),
    "fused layer, everything fused": (True, False, None, {"norm": True, "gated": True, "residual": True,
                                                          "merge": True}),
    "kernel + Inductor PDL": (True, True, None, False),
    "kernel PDL (release after the wait)": (True, False, "wait", False),
    "kernel PDL (release after the wait) + Inductor PDL": (True, True, "wait", False),
    "kernel PDL (release after the loop) + Inductor PDL": (True, True, "loop", False),
}


def _point(text: str) -> tuple[int, int]:
    try:
        return bench.parse_point(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: a point is BATCHxCONTEXT, e.g. 8x16384") from None


def _ahead(text: str) -> tuple[float, float]:
    """``MB[:OMB]`` as ``(products' MB, attention's MB)``."""
    try:
        sizes = [float(t) for t in text.split(":")]
    except ValueError:
        sizes = []
    if len(sizes) not in (1, 2) or min(sizes) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: write MB or MB:OMB, sizes >= 0 (e.g. 0:8)")
    return sizes[0], sizes[-1]


def attention_settings(items: list[str]) -> dict:
    """``--attention KEY=N ...`` as ``triton_decode.CONFIG`` updates; ValueError naming a bad item."""
    settings = {}
    for item in items:
        key, _, value = item.partition("=")
        if key not in triton_decode.CONFIG or not value.isdigit() or int(value) < 1:
            raise ValueError(f"--attention {item!r}: write KEY=N (N >= 1) with KEY one of "
                             f"{', '.join(triton_decode.CONFIG)}")
        settings[key] = int(value)
    return settings


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--points", type=_point, nargs="+", default=[(1, 4096), (8, 16384)], help="BATCHxCONTEXT")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), metavar="NAME",
                   help=f"some of: {'; '.join(VARIANTS)}")
    p.add_argument("--attention", nargs="+", default=[], metavar="KEY=V",
                   help=f"one more variant: the fused layer with these of triton_decode.CONFIG {triton_decode.CONFIG}")
    p.add_argument("--ahead", nargs="+", type=_ahead, default=[], metavar="MB[:OMB]",
                   help=f"more variants: the fused layer with triton_linear.L2_AHEAD's products' size MB and "
                        f"the attention's OMB (MB where not given; default {triton_linear.L2_AHEAD}; 0 off)")
    p.add_argument("--tiles", help="one more variant: the fused layer with these product launch settings "
                                    "(a linear_sweep --pick file)")
    args = p.parse_args(argv)
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        print(f"error: --variants {unknown}: not among {list(VARIANTS)}", file=sys.stderr)
        return 2
    try:
        attention = attention_settings(args.attention)
        tiles = load_tiles(args.tiles) if args.tiles else {}
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ahead_mb, own_tiles = dict(triton_linear.L2_AHEAD), dict(triton_linear.TILES)
    variants = [(name, VARIANTS[name], {}, ahead_mb, own_tiles) for name in args.variants]
    if attention:
        variants.append((f"fused layer, attention {' '.join(args.attention)}", VARIANTS["fused layer"], attention,
                         ahead_mb, own_tiles))
    variants += [(f"fused layer, next weight to L2: {mb:g} MB after products, {o_mb:g} after attention",
                  VARIANTS["fused layer"], {}, {"mb": mb, "o_mb": o_mb}, own_tiles) for mb, o_mb in args.ahead]
    if tiles:
        variants.append((f"fused layer, product tiles {tiles}", VARIANTS["fused layer"], {}, ahead_mb,
                         {**own_tiles, **tiles}))
    if not torch.cuda.is_available():
        print("error: the A/B needs a CUDA GPU", file=sys.stderr)
        return 2
    import torch._inductor.config as inductor_config
    if not hasattr(inductor_config.triton, "enable_pdl"):
        print(f"note: torch {torch.__version__} has no Inductor PDL switch; those variants run without it",
              file=sys.stderr)
    torch.set_grad_enabled(False)
    stock, uni = bench.build_pair("llama3.1-8b", (4, 16, 33))
    del stock
    bench.free()
    fuse_projections(uni)
    saved = (triton_linear._mode, dict(triton_linear.PDL), getattr(inductor_config.triton, "enable_pdl", False),
             decode_layer._mode)
    fuse = dict(decode_layer.FUSE)
    launch = dict(triton_decode.CONFIG)
    try:
        triton_linear._mode = "torch"
        reference = {}
        for batch, context in args.points:
            torch.manual_seed(0)  # the cache's contents and the tokens, the same for every variant
            reference[batch, context] = bench.static_decode_step(uni, batch, context, compiled=False)().logits.float()
            bench.free()
        bw = bench.copy_bandwidth()
        limit = {(b, n): (bench.read_weight_bytes(uni) + b * n * bench.kv_bytes_per_token(uni, n)) / bw * 1e3
                 for b, n in args.points}
        print(f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}, copy bandwidth {bw / 1e12:.3f} TB/s; "
              "a cell: ms per step (share of the byte-model limit, bench's; logits error)\n\n| variant | "
              + " | ".join(f"batch {b}, context {n} (limit {limit[b, n]:.2f} ms)" for b, n in args.points)
              + " |\n|---|" + "---|" * len(args.points), flush=True)
        for name, (on_kernel, inductor_pdl, release, layer), shape, mb, products in variants:
            triton_linear.TILES.clear()
            triton_linear.TILES.update(products)
            triton_decode.CONFIG.update(launch, **shape)
            triton_linear.L2_AHEAD.update(mb)
            triton_linear._mode = "auto" if on_kernel else "torch"
            decode_layer._mode = "auto" if layer else "torch"
            decode_layer.FUSE.update(fuse, **(layer if isinstance(layer, dict) else {}))
            triton_linear.PDL.update(on=release is not None, early=True, trigger=release or "wait")
            if hasattr(inductor_config.triton, "enable_pdl"):
                inductor_config.triton.enable_pdl = inductor_pdl
            cells = []
            for batch, context in args.points:
                start = time.time()
                torch.manual_seed(0)
                step = bench.static_decode_step(uni, batch, context, compiled=True)
                ms = bench.cuda_median_ms(step, repeat=15, warmup=5, inner=bench.DECODE_STEPS)
                ref = reference[batch, context]
                err = ((step().logits.float() - ref).norm() / ref.norm()).item()
                cells.append(f"{ms:.3f} ({limit[batch, context] / ms:.0%}; {err:.1e})")
                print(f"  ({name}, {batch}x{context}: {time.time() - start:.0f} s)", file=sys.stderr, flush=True)
                del step
                bench.free()
            print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    finally:
        triton_linear._mode, pdl, enable, decode_layer._mode = saved
        decode_layer.FUSE.update(fuse)
        triton_decode.CONFIG.update(launch)
        triton_linear.PDL.update(pdl)
        triton_linear.L2_AHEAD.update(ahead_mb)
        triton_linear.TILES.clear()
        triton_linear.TILES.update(own_tiles)
        if hasattr(inductor_config.triton, "enable_pdl"):
            inductor_config.triton.enable_pdl = enable
    return 0


if __name__ == "__main__":
    sys.exit(main())
