"""Decode-size matrix products on this GPU: how fast a weight is read, apart and fused.

    python -m uniattn.tools.matmul_sweep [--out F.md] [--tokens 8 1 16] [--triton]

A decode step multiplies 1-16 token rows by each weight once, so each product is a pass over its
weight and its speed is the weight's bytes over the time. For LLaMA-3.1-8B's projections, apart
(Q, K/V, O, gate, down) and fused as ``uniattn.fuse_projections`` fuses them (Q+K+V, V+W_c,
gate+up), and the output head, this times cuBLAS (``F.linear``) as CUDA graphs of 20 calls over
enough weight copies that none is read from L2, and prints TB/s. With ``--triton`` it also sweeps
a split-K Triton kernel (tiles of output rows, the K dimension split across programs) and prints its
best configuration per shape. Baselines: a pure read (a float32 sum over 4 GiB) and a copy.
"""

from __future__ import annotations

import argparse
import itertools
import sys

import torch
import torch.nn.functional as F

from ..io import write_text
from .decode_sweep import graph_ms

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

H, KV, I, VOCAB = 4096, 1024, 14336, 128256  # LLaMA-3.1-8B: hidden, K/V width, MLP width, vocabulary
SHAPES = {"k or v": (KV, H), "q or o or W_c": (H, H), "v+W_c": (KV + H, H), "q+k+v": (H + 2 * KV, H),
          "gate": (I, H), "gate+up": (2 * I, H), "down": (H, I), "lm_head": (VOCAB, H)}  # name: (N, K)
TRITON_GRID = {"block_n": (16, 32, 64), "block_k": (128, 256), "split_k": (1, 4, 8), "stages": (3, 4)}

if triton is not None:

    @triton.jit
    def _split_k_kernel(X, W, Y, M, N, k_per_split, sx, sw,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_n = tl.program_id(0)
        split = tl.program_id(1)
        m = tl.arange(0, BLOCK_M)
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        kk = tl.arange(0, BLOCK_K)
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k in range(split * k_per_split, (split + 1) * k_per_split, BLOCK_K):
            x = tl.load(X + m[:, None] * sx + (k + kk)[None, :], mask=(m < M)[:, None], other=0.0)
            w = tl.load(W + n[:, None] * sw + (k + kk)[None, :])
            acc += tl.dot(x, tl.trans(w))
        tl.store(Y + split * M * N + m[:, None] * N + n[None, :], acc.to(Y.dtype.element_ty), mask=(m < M)[:, None])


def split_k_linear(x, w, block_n, block_k, split_k, stages):
    """``x @ w.T`` for ``x`` of at most 16 rows; N and K must divide by the tiles."""
    m, k = x.shape
    n = w.shape[0]
    y = torch.empty((split_k, m, n), device=x.device, dtype=torch.float32 if split_k > 1 else x.dtype)
    _split_k_kernel[(n // block_n, split_k)](x, w, y, m, n, k // split_k, x.stride(0), w.stride(0), BLOCK_M=16,
                                             BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4, num_stages=stages)
    return y[0] if split_k == 1 else y.sum(0).to(x.dtype)


def _triton_best(x, weights, nbytes):
    n, k = weights[0].shape
    ref = F.linear(x.float(), weights[0].float())
    best = (0.0, None)
    for cfg in itertools.product(*TRITON_GRID.values()):
        block_n, block_k, split_k, _ = cfg
        if n % block_n or k % (block_k * split_k) or not 132 <= n // block_n * split_k <= 132 * 64:
            continue
        out = split_k_linear(x, weights[0], *cfg)
        if ((out.float() - ref).norm() / ref.norm()).item() > 1e-2:
            raise AssertionError(f"split-K kernel wrong at {cfg}")
        turn = itertools.cycle(weights)
        rate = nbytes / graph_ms(lambda: split_k_linear(x, next(turn), *cfg)) / 1e9
        best = max(best, (rate, cfg), key=lambda r: r[0])
    return best


def graph_rates() -> tuple[float, float]:
    """TB/s of a pure read (a float32 sum over 4 GiB of bf16) and of a copy (read + write), each timed
    as a CUDA graph of 5 calls."""
    big = torch.randn(2**31, dtype=torch.bfloat16, device="cuda")
    read = big.numel() * 2 / graph_ms(lambda: big.sum(dtype=torch.float32), 5) / 1e9
    dst = torch.empty_like(big)
    copy = 2 * big.numel() * 2 / graph_ms(lambda: dst.copy_(big), 5) / 1e9
    del big, dst
    torch.cuda.empty_cache()
    return read, copy


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="also write the table here (markdown)")
    p.add_argument("--tokens", type=int, nargs="+", default=[8, 1, 16], help="rows per product (the batch)")
    p.add_argument("--triton", action="store_true", help="also sweep the split-K Triton kernel")
    args = p.parse_args(argv)
    if any(not 1 <= t <= 16 for t in args.tokens):
        print(f"error: --tokens {args.tokens}: each must be 1-16 (decode batches)", file=sys.stderr)
        return 2
    if not torch.cuda.is_available() or (args.triton and triton is None):
        print("error: the sweep needs a CUDA GPU (and Triton for --triton)", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    read, copy = graph_rates()
    lines = [f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}"
             + (f", triton {triton.__version__}" if args.triton else "") + "; TB/s of weight read per product",
             "", f"Pure read (float32 sum over 4 GiB of bf16): {read:.2f} TB/s; copy (read + write): {copy:.2f} TB/s "
             "(both as CUDA graphs of 5 calls)", "",
             "| tokens | product | N x K | MB | cuBLAS TB/s |" + (" split-K Triton best TB/s (config) |" if args.triton else ""),
             "|---|---|---|---|---|" + ("---|" if args.triton else "")]
    print("\n".join(lines), flush=True)
    for m in args.tokens:
        for name, (n, k) in SHAPES.items():
            nbytes = n * k * 2
            copies = max(2, -(-400 * 2**20 // nbytes))  # 400 MB of weights in turn: far past L2
            weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            turn = itertools.cycle(weights)
            cublas = nbytes / graph_ms(lambda: F.linear(x, next(turn))) / 1e9
            row = f"| {m} | {name} | {n} x {k} | {nbytes / 2**20:.0f} | {cublas:.2f} |"
            if args.triton:
                rate, cfg = _triton_best(x, weights, nbytes)
                row += f" {rate:.2f} ({', '.join(f'{a} {b}' for a, b in zip(TRITON_GRID, cfg))}) |"
            lines.append(row)
            print(row, flush=True)
            del weights
    if args.out:
        write_text(args.out, "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
