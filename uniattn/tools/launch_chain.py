"""A decode step's matrix products back to back on this GPU: cuBLAS against ``triton_linear``, with
and without programmatic dependent launch (PDL).

    python -m uniattn.tools.launch_chain [--out F.md] [--tokens 8 1]

``matmul_sweep`` times each product alone; a step runs 32 layers of them in a row, each reading
the one before's output, and loses time wherever one kernel ends and the next starts. This times
that chain at LLaMA-3.1-8B's shapes (Q+K+V, O, gate+up, down per layer, each layer its own weights
so that none is read from L2) as one CUDA graph, and prints TB/s of weight read and µs per layer:

* cuBLAS (``torch.mm``) and ``triton_linear``'s kernel;
* the kernel launched with PDL, so that it can start while the one before finishes: waiting for it
  before reading ``x`` and releasing the next kernel right after that wait, or only after its own
  loop over the weight; each with its first weight tile read before the wait;
* the kernel asking L2 for the first MB of the next product's weight as its last programs finish
  (``triton_linear.L2_AHEAD``, ``next_weight``), at a few sizes;
* each of those with a small elementwise kernel between the products (same launch mode), as the
  norms and activations sit between them in the model.

Also: each product and the output head alone, and the device copy timed eagerly and as a graph.
"""

from __future__ import annotations

import argparse
import sys

import torch

from ..io import write_text
from ..modeling import triton_linear
from . import bench
from .decode_sweep import graph_ms
from .matmul_sweep import SHAPES as PRODUCTS, graph_rates

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

# a layer's products in order, as (name, N, K)
SHAPES = [(name, *PRODUCTS[key]) for name, key in (("Q+K+V", "q+k+v"), ("O", "q or o or W_c"),
                                                   ("gate+up", "gate+up"), ("down", "down"))]
HEAD = PRODUCTS["lm_head"]
LAYERS = 32
# name: (PDL settings or None for cuBLAS)
VARIANTS = {
    "cuBLAS": None,
    "kernel": {"on": False, "early": False, "trigger": "wait"},
    "kernel, PDL, release after the wait": {"on": True, "early": True, "trigger": "wait"},
    "kernel, PDL, release after the loop": {"on": True, "early": True, "trigger": "loop"},
}
AHEAD_MB = (4, 8, 16, 32)  # sizes of the prefetch of the next weight into L2

if triton is not None:

    @triton.jit
    def _scale_kernel(X, Y, n, PDL: tl.constexpr, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        if PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        tl.store(Y + i, (tl.load(X + i, mask=i < n).to(tl.float32) * 0.999).to(Y.dtype.element_ty), mask=i < n)


def _chain(weights, x0, pdl, between, ahead=False):
    """One pass of the chain; ``pdl`` None runs cuBLAS; ``ahead`` passes each product the next one's weight."""
    flat = [w for layer in weights for w in layer]
    pairs = list(zip(flat, (flat[1:] + [None]) if ahead else [None] * len(flat)))

    def fn():
        x = x0
        on = bool(pdl and pdl["on"])
        for w, after in pairs:
            xi = x[:, :w.shape[1]]
            x = torch.mm(xi, w.t()) if pdl is None else triton_linear._linear_impl(xi, w, None, next_weight=after)
            if between:
                y = torch.empty_like(x)
                _scale_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), PDL=on, BLOCK=1024, launch_pdl=on)
                x = y
        return x
    return fn


def copy_rates() -> dict:
    read, copy = graph_rates()
    return {"copy, eager": bench.copy_bandwidth() / 1e12, "copy, as a CUDA graph": copy,
            "read (float32 sum), as a CUDA graph": read}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="also write the tables here (markdown)")
    p.add_argument("--tokens", type=int, nargs="+", default=[8, 1], help="rows per product (the batch), 1-16")
    args = p.parse_args(argv)
    if any(not 1 <= t <= triton_linear.MAX_ROWS for t in args.tokens):
        print(f"error: --tokens {args.tokens}: each must be 1-{triton_linear.MAX_ROWS}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available() or triton is None:
        print("error: the chain needs a CUDA GPU and Triton", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    lines = [f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}", "",
             "| device copy and read | TB/s |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in copy_rates().items()]
    weights = [[torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _, n, k in SHAPES]
               for _ in range(LAYERS)]
    nbytes = sum(w.numel() * 2 for layer in weights for w in layer)
    saved, saved_ahead = dict(triton_linear.PDL), dict(triton_linear.L2_AHEAD)
    try:
        for m in args.tokens:
            x0 = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
            lines += ["", f"**{m} token rows.** Each product alone, over the {LAYERS} layers' weights in turn:", "",
                      "| product | N x K | cuBLAS TB/s | kernel TB/s | kernel tiles (block_n, block_k, stages, warps) |",
                      "|---|---|---|---|---|"]
            triton_linear.PDL.update(VARIANTS["kernel"])
            triton_linear.L2_AHEAD["mb"] = 0
            for i, (name, n, k) in enumerate(SHAPES):
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                ref = torch.mm(x.float(), weights[0][i].float().t())
                got = triton_linear._linear_impl(x, weights[0][i], None).float()
                if ((got - ref).norm() / ref.norm()).item() > 2e-2:
                    raise AssertionError(f"kernel wrong at {name}")
                total = LAYERS * n * k * 2
                cub = graph_ms(lambda: [torch.mm(x, layer[i].t()) for layer in weights], 3)
                ker = graph_ms(lambda: [triton_linear._linear_impl(x, layer[i], None) for layer in weights], 3)
                lines.append(f"| {name} | {n} x {k} | {total / cub / 1e9:.2f} | {total / ker / 1e9:.2f} | "
                             f"{triton_linear.config(n, k)} |")
            heads = [torch.randn(*HEAD, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(2)]
            x = torch.randn(m, HEAD[1], device="cuda", dtype=torch.bfloat16)
            cub = graph_ms(lambda: [torch.mm(x, h.t()) for h in heads], 3)
            ker = graph_ms(lambda: [triton_linear._linear_impl(x, h, None) for h in heads], 3)
            hb = 2 * heads[0].numel() * 2
            lines.append(f"| output head | {HEAD[0]} x {HEAD[1]} | {hb / cub / 1e9:.2f} | {hb / ker / 1e9:.2f} | "
                         f"{triton_linear.config(*HEAD)} |")
            del heads
            torch.cuda.empty_cache()
            lines += ["", f"The {LAYERS}-layer chain ({nbytes / 1e9:.1f} GB of weights), one CUDA graph:", "",
                      "| launch | products only: ms, TB/s, µs/layer | with an elementwise kernel between: ms, TB/s, µs/layer |",
                      "|---|---|---|"]
            outs = {}
            runs = [(name, pdl, 0) for name, pdl in VARIANTS.items()]
            runs += [(f"kernel, next weight's first {mb} MB to L2", VARIANTS["kernel"], mb) for mb in AHEAD_MB]
            for name, pdl, mb in runs:
                if pdl is not None:
                    triton_linear.PDL.update(pdl)
                triton_linear.L2_AHEAD["mb"] = mb
                cells = []
                for between in (False, True):
                    fn = _chain(weights, x0, pdl, between, ahead=mb > 0)
                    outs[(name, between)] = fn().clone()
                    ms = graph_ms(fn, 1)
                    cells.append(f"{ms:.3f}, {nbytes / ms / 1e9:.2f}, {ms * 1e3 / LAYERS:.1f}")
                lines.append(f"| {name} | {cells[0]} | {cells[1]} |")
            same = all(torch.equal(outs[("kernel", b)], outs[(n, b)]) for n, _, _ in runs if n.startswith("kernel")
                       for b in (False, True))
            lines += ["", "Outputs of every PDL or prefetching launch equal the plain kernel's, bit for bit: "
                      + ("yes" if same else "NO")]
    finally:
        triton_linear.PDL.update(saved)
        triton_linear.L2_AHEAD.update(saved_ahead)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        write_text(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
