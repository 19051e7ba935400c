"""The fused decode layer's kernels one by one, against the kernels they replace (one GPU).

    python -m uniattn.tools.fusion_sweep [--rows 8] [--out F.md]

At LLaMA-3.1-8B's shapes, bf16, ``--rows`` token rows: each kernel timed as a CUDA graph of 20
calls (``decode_sweep.graph_ms``), cycling through enough copies of its weight that none is served
from L2. Products are given as microseconds per call and TB/s of weight read:

* O and down: the plain product kernel against the same with the residual (and ``W_c u``) added;
* gate+up: the plain kernel (both outputs) against ``SiLU(gate) * up`` with and without the
  RMSNorm, and the norm with and without its operand loaded one tile ahead (``NORM_PREFETCH``);
* Q+K+V and W_c+V: the plain kernel against ``triton_qkv.project`` (RoPE and the cache write, with
  and without the norm);
* attention at batch 8 / 16k: ``decode_attend`` and ``decode_apply`` with their splits merged by a
  second kernel (a PyTorch sum for apply) or by their own last split (TB/s of K/V read).
"""

from __future__ import annotations

import argparse
import itertools
import sys

import torch

from ..io import write_text
from ..modeling import triton_decode, triton_linear, triton_qkv
from .decode_sweep import graph_ms

H, KV_HEADS, D, I = 4096, 8, 128, 14336  # LLaMA-3.1-8B
L2_BYTES = 256 << 20  # cycle through at least this much weight so that none of it stays in L2


def _copies(*shape) -> itertools.cycle:
    nbytes = 2 * torch.Size(shape).numel()
    n = max(2, -(-L2_BYTES // nbytes))
    return itertools.cycle([torch.randn(*shape, device="cuda", dtype=torch.bfloat16) * shape[-1] ** -0.5
                            for _ in range(n)])


def _rate(fn, nbytes: int) -> str:
    try:
        ms = graph_ms(fn)
    except Exception as e:  # one variant that fails is reported in its cell; the others still run
        return f"failed: {type(e).__name__}: {' '.join(str(e).split())[:150]}"
    return f"{ms * 1e3:.1f} µs ({nbytes / ms / 1e9:.2f} TB/s)"


@torch.no_grad()
def product_rows(m: int) -> list[tuple[str, list[tuple[str, str]]]]:
    def rand(*shape):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16)

    x, res, extra, g = rand(m, H), rand(m, H), rand(m, H), 1 + 0.1 * rand(H)
    act = rand(m, I)
    rows = []
    o, down, gu = _copies(H, H), _copies(H, I), _copies(2 * I, H)
    lin = triton_linear.fused_linear
    rows.append(("O 4096 x 4096", [
        ("plain", _rate(lambda: lin(x, next(o)), 2 * H * H)),
        ("+ residual + W_c u", _rate(lambda: lin(x, next(o), residual=res, extra=extra), 2 * H * H))]))
    rows.append(("down 4096 x 14336", [
        ("plain", _rate(lambda: lin(act, next(down)), 2 * H * I)),
        ("+ residual", _rate(lambda: lin(act, next(down), residual=res), 2 * H * I))]))
    cells = [("plain (gate and up out)", _rate(lambda: lin(x, next(gu)), 4 * H * I)),
             ("SiLU(gate) * up", _rate(lambda: lin(x, next(gu), gated=True), 4 * H * I))]
    saved = dict(triton_linear.NORM_PREFETCH)
    try:
        for ahead in (False, True):
            triton_linear.NORM_PREFETCH["on"] = ahead
            cells.append((f"norm + SiLU(gate) * up{', operand ahead' if ahead else ''}",
                          _rate(lambda: lin(x, next(gu), norm=(g, 1e-5), gated=True), 4 * H * I)))
        rows.append(("gate+up 28672 x 4096", cells))
        cos, sin = rand(m, D), rand(m, D)
        for name, n_out, n_k in (("Q+K+V 6144 x 4096", 32, KV_HEADS), ("W_c+V 5120 x 4096", H // D, 0)):
            n = (n_out + n_k + KV_HEADS) * D
            w = _copies(n, H)
            keys = torch.zeros(m, KV_HEADS, 256, D if n_k else 0, device="cuda", dtype=torch.bfloat16)
            values = torch.zeros(m, KV_HEADS, 256, D, device="cuda", dtype=torch.bfloat16)
            ticket = torch.zeros(1, dtype=torch.int32, device="cuda")
            cells = [("plain", _rate(lambda: lin(x, next(w)), 2 * n * H))]
            for norm, ahead, variant in ((None, True, "RoPE, cache write (the fused layer's default)"),
                                         ((g, 1e-5), False, "norm, RoPE, cache write"),
                                         ((g, 1e-5), True, "norm, RoPE, cache write, operand ahead")):
                triton_linear.NORM_PREFETCH["on"] = ahead
                counter = torch.zeros((), dtype=torch.int64, device="cuda")  # ~130 calls: within the 256 slots

                def project():
                    return triton_qkv.project(x, next(w), None, norm, cos, sin, keys, values, counter, ticket,
                                              n_out=n_out, rope_out=n_k > 0, n_k=n_k, head_dim=D)
                cells.append((variant, _rate(project, 2 * n * H)))
            rows.append((name, cells))
    finally:
        triton_linear.NORM_PREFETCH.update(saved)
    return rows


@torch.no_grad()
def attention_rows(batch: int = 8, context: int = 16384) -> list[tuple[str, list[tuple[str, str]]]]:
    q = torch.randn(batch, 32, 1, D, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(batch, KV_HEADS, context, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    tickets = torch.zeros(batch * KV_HEADS, dtype=torch.int32, device="cuda")
    kv = 2 * k.numel() * 2
    attend = triton_decode.decode_attend
    _, rows = attend(q, k, v, None, D ** -0.5, None, write_rows=True)
    return [(f"leader attention, batch {batch} / {context}", [
        ("splits merged by a second kernel", _rate(lambda: attend(q, k, v, None, D ** -0.5, None, True), kv)),
        ("merged by the last split", _rate(lambda: attend(q, k, v, None, D ** -0.5, None, True, tickets), kv))]),
        (f"follower P @ V, batch {batch} / {context}", [
        ("splits summed by PyTorch", _rate(lambda: triton_decode.decode_apply(rows, v), kv // 2)),
        ("summed by the last split", _rate(lambda: triton_decode.decode_apply(rows, v, tickets), kv // 2))])]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=8, help="token rows (the decode batch), 1-16")
    p.add_argument("--out", help="also write the table here (markdown)")
    args = p.parse_args(argv)
    if not 1 <= args.rows <= triton_linear.MAX_ROWS:
        print(f"error: --rows {args.rows}: must be 1-{triton_linear.MAX_ROWS}", file=sys.stderr)
        return 2
    if not torch.cuda.is_available() or triton_linear.triton is None:
        print("error: the sweep needs a CUDA GPU and Triton", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    lines = [f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}, "
             f"triton {triton_linear.triton.__version__}; {args.rows} token rows, bf16, CUDA graphs of 20 calls", "", "| kernel | variant | time (rate) |",
             "|---|---|---|"]
    for name, cells in product_rows(args.rows) + attention_rows():
        for variant, cell in cells:
            lines.append(f"| {name} | {variant} | {cell} |")
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    if args.out:
        write_text(args.out, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
