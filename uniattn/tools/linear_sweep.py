"""Launch settings of the decode step's product kernels, swept at LLaMA-3.1-8B's weight shapes on this GPU.

    python -m uniattn.tools.linear_sweep [--tokens 8] [--grid block_n=16,32,64 block_k=128,256 ...]
        [--tma] [--pick F.json] [--out F.md] [--workers 8]

A decode step reads each weight once per product, so a product's speed is its weight's bytes over
its time; the short ones (O, the attention's input product) fall furthest below the read bandwidth
(docs/launch_chain_h200.md). This times ``triton_linear``'s product kernel (O, gate+up, down, the
output head) and ``triton_qkv``'s projection (Q+K+V with RoPE and the cache write; a follower's
W_c/V) at every launch setting of ``--grid`` (``triton_linear.TILES``: output columns per program,
K tile, pipeline stages, warps), each as a CUDA graph over 32 layers' copies of the weight (none
read from L2), and prints per shape the default setting's TB/s and the best few. ``--tma`` adds a
plain product whose weight tiles come through Hopper's tensor memory accelerator (a host tensor
descriptor) at the same settings, as a measured alternative. Settings the GPU cannot run (shared
memory) are skipped and counted.

``--pick F.json`` writes the best setting per shape where it beats the default by more than
``--margin`` (default 2%), as ``triton_linear.TILES`` entries, for ``decode_ab --tiles F.json`` to
time in the compiled step. ``--workers`` compile the grid's kernels in parallel processes first
(Triton's on-disk cache then serves the timing process).
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import sys

import torch

from ..io import write_text
from ..modeling import triton_linear, triton_qkv
from .decode_sweep import graph_ms

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

LAYERS = 32
HEAD_DIM, HEADS, KV_HEADS = 128, 32, 8
# (kernel, name, N, K): LLaMA-3.1-8B's products in a step
SHAPES = [("project", "Q+K+V", 6144, 4096), ("project", "W_c/V", 5120, 4096), ("linear", "O", 4096, 4096),
          ("linear", "gate+up", 28672, 4096), ("linear", "down", 4096, 14336),
          ("linear", "output head", 128256, 4096)]
GRID = {"block_n": (16, 32, 64), "block_k": (128, 256, 512), "stages": (3, 4, 5, 6, 8), "warps": (4, 8)}
SMEM = 227 * 1024  # an H100 / H200 block's shared memory: larger stage sets cannot launch

if triton is not None:

    @triton.jit
    def _tma_kernel(X, w_desc, Y, M, K, sx, sy, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        n0 = tl.program_id(0) * BLOCK_N
        m = tl.arange(0, BLOCK_M)
        kk = tl.arange(0, BLOCK_K)
        rows = (m < M)[:, None]
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k in range(0, K, BLOCK_K):
            x = tl.load(X + m[:, None] * sx + (k + kk)[None, :], mask=rows, other=0.0)
            acc += tl.dot(x, tl.trans(w_desc.load([n0, k])))
        n = n0 + tl.arange(0, BLOCK_N)
        tl.store(Y + m[:, None] * sy + n[None, :], acc.to(Y.dtype.element_ty), mask=rows)


def tma_linear(x: torch.Tensor, w: torch.Tensor, tiles: tuple[int, int, int, int]) -> torch.Tensor:
    """``x @ w.T`` with the weight read through a TMA descriptor (``--tma``)."""
    from triton.tools.tensor_descriptor import TensorDescriptor
    block_n, block_k, stages, warps = tiles
    y = torch.empty(x.shape[0], w.shape[0], device=x.device, dtype=x.dtype)
    desc = TensorDescriptor.from_tensor(w, [block_n, block_k])
    _tma_kernel[(w.shape[0] // block_n,)](x, desc, y, x.shape[0], w.shape[1], x.stride(0), y.stride(0),
                                         BLOCK_M=triton_linear.MAX_ROWS, BLOCK_N=block_n, BLOCK_K=block_k,
                                         num_warps=warps, num_stages=stages)
    return y


def grid_settings(grid: dict) -> list[tuple[int, int, int, int]]:
    """The grid's ``(block_n, block_k, stages, warps)`` whose stages fit in shared memory
    (``triton_linear.pipeline_bytes``)."""
    return [(block_n, block_k, stages, warps)
            for block_n, block_k, stages, warps in itertools.product(*(grid[k] for k in GRID))
            if triton_linear.pipeline_bytes(stages, block_n, block_k) <= SMEM]


def _weight_paths(kernel: str, tma: bool) -> list[bool]:
    """Whether each timing reads the weight through TMA: ``--tma`` adds it for the plain products."""
    return [False, True] if tma and kernel == "linear" else [False]


class Product:
    """One shape's weight copies (32: none read from L2) and what its kernel needs; ``ms(tiles)`` times a pass."""

    def __init__(self, kernel: str, n: int, k: int, rows: int, copies: int = LAYERS, device: str = "cuda"):
        self.kernel, self.n, self.k = kernel, n, k
        self.weights = [torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        self.x = torch.randn(rows, k, device=device, dtype=torch.bfloat16)
        if kernel == "project":  # Q, K, V heads (Q+K+V) or W_c, V heads (W_c/V, no keys)
            extra = (n - HEADS * HEAD_DIM) // HEAD_DIM
            self.n_k = KV_HEADS if extra == 2 * KV_HEADS else 0
            kv = extra - self.n_k
            length = 4096  # room for one setting's passes: each call advances its layer's position (reset)
            self.k_cache = torch.zeros(rows, self.n_k, length, HEAD_DIM if self.n_k else 0, device=device,
                                       dtype=torch.bfloat16)
            self.v_cache = torch.zeros(rows, kv, length, HEAD_DIM, device=device, dtype=torch.bfloat16)
            self.counters = [torch.zeros((), device=device, dtype=torch.int64) for _ in range(copies)]
            self.ticket = torch.zeros(1, device=device, dtype=torch.int32)
            self.cos = torch.rand(rows, HEAD_DIM, device=device, dtype=torch.bfloat16)
            self.sin = torch.rand(rows, HEAD_DIM, device=device, dtype=torch.bfloat16)

    def usable(self, tiles) -> bool:
        block_n, block_k = tiles[:2]
        if self.n % block_n or self.k % block_k:
            return False
        return self.kernel != "project" or (HEAD_DIM % block_n == 0 and block_n >= 32)  # tl.dot: 16 columns at least

    def call(self, i: int, tiles, tma: bool = False) -> torch.Tensor:
        w = self.weights[i]
        if tma:
            return tma_linear(self.x, w, tiles)
        triton_linear.TILES[self.kernel, self.n, self.k] = tiles
        if self.kernel == "linear":
            return triton_linear._linear_impl(self.x, w, None)
        return triton_qkv._project_impl(self.x, w, None, None, 0.0, self.cos, self.sin, self.k_cache, self.v_cache,
                                        self.counters[i], self.ticket, HEADS, self.n_k > 0, self.n_k, HEAD_DIM)

    def ms(self, tiles, tma: bool = False) -> float:
        """Milliseconds per pass over the copies (``graph_ms``)."""
        if self.kernel == "project":
            for c in self.counters:  # back to the cache's start: a setting's passes fit in it
                c.zero_()
        return graph_ms(lambda: [self.call(i, tiles, tma) for i in range(len(self.weights))], 2)

    def nbytes(self) -> int:
        return len(self.weights) * self.n * self.k * 2


def _compile(job) -> int:
    """Worker: run each of ``job``'s settings once at one shape, so Triton's disk cache holds the kernels."""
    (kernel, n, k), rows, settings, tma = job
    torch.set_grad_enabled(False)
    product = Product(kernel, n, k, rows, copies=1)
    done = 0
    for tiles in settings:
        for t in _weight_paths(kernel, tma):
            try:
                product.call(0, tiles, t)
                done += 1
            except Exception:  # out of resources and the like: the timing process skips it too
                pass
    torch.cuda.synchronize()
    return done


def _parse_grid(items: list[str]) -> dict:
    grid = dict(GRID)
    for item in items:
        key, _, values = item.partition("=")
        try:
            parsed = tuple(int(v) for v in values.split(","))
        except ValueError:
            parsed = ()
        if key not in GRID or not parsed or min(parsed) < 1:
            raise ValueError(f"--grid {item!r}: write KEY=N,N,... (N >= 1) with KEY one of {', '.join(GRID)}")
        grid[key] = parsed
    return grid


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=8, help="rows per product (the batch), 1-16")
    p.add_argument("--grid", nargs="+", default=[], metavar="KEY=N,N", help=f"replace grid axes (default {GRID})")
    p.add_argument("--shapes", nargs="+", default=[s[1] for s in SHAPES], help="some of the shapes' names")
    p.add_argument("--tma", action="store_true", help="also time the TMA-descriptor product (plain products)")
    p.add_argument("--top", type=int, default=5, help="best settings listed per shape")
    p.add_argument("--margin", type=float, default=0.02, help="--pick keeps a setting this much faster")
    p.add_argument("--pick", help="write the best settings here (JSON of triton_linear.TILES entries)")
    p.add_argument("--out", help="also write the tables here (markdown)")
    p.add_argument("--workers", type=int, default=8, help="processes that compile the kernels first (0: none)")
    args = p.parse_args(argv)
    try:
        grid = _parse_grid(args.grid)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    names = [s[1] for s in SHAPES]
    if not 1 <= args.tokens <= triton_linear.MAX_ROWS or any(s not in names for s in args.shapes):
        print(f"error: --tokens {args.tokens} (1-{triton_linear.MAX_ROWS}) or --shapes {args.shapes} "
              f"(some of {names})", file=sys.stderr)
        return 2
    if not torch.cuda.is_available() or triton is None:
        print("error: the sweep needs a CUDA GPU and Triton", file=sys.stderr)
        return 2
    shapes = [s for s in SHAPES if s[1] in args.shapes]
    settings = grid_settings(grid)
    if args.workers > 0:
        jobs = [((kernel, n, k), args.tokens, settings[i::args.workers], args.tma)
                for kernel, _, n, k in shapes for i in range(args.workers)]
        with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
            pool.map(_compile, jobs, chunksize=1)
    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    lines = [f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; "
             f"{args.tokens} token rows; {len(settings)} settings (block_n, block_k, stages, warps) of {grid}", ""]
    pick = {}
    for kernel, name, n, k in shapes:
        product = Product(kernel, n, k, args.tokens, copies=2 if name == "output head" else LAYERS)
        triton_linear.TILES.pop((kernel, n, k), None)
        default = triton_linear.config(n, k, kernel)
        rates, skipped, wrong = {}, 0, []
        ref = product.call(0, default).float()
        try:
            for tiles in settings:
                for tma in _weight_paths(kernel, args.tma):
                    if not product.usable(tiles):
                        continue
                    try:
                        got = product.call(0, tiles, tma).float()
                    except Exception:
                        skipped += 1
                        continue
                    if ((got - ref).norm() / ref.norm()).item() > 1e-2:  # rounding differs; a broken setting far more
                        wrong.append((tiles, tma))
                        continue
                    rates[tiles, tma] = product.nbytes() / product.ms(tiles, tma) / 1e9
        finally:
            triton_linear.TILES.pop((kernel, n, k), None)
        base = product.nbytes() / product.ms(default) / 1e9  # timed again, last, beside the others
        best = sorted(rates.items(), key=lambda kv: -kv[1])
        lines += [f"**{name}** ({kernel}, {n} x {k}, {product.nbytes() / len(product.weights) / 2**20:.0f} MiB): "
                  f"default {default} {base:.2f} TB/s; {len(rates)} timed, {skipped} could not run, "
                  f"{len(wrong)} gave wrong results{': ' + str(wrong) if wrong else ''}", "",
                  "| setting (block_n, block_k, stages, warps) | weights through | TB/s | vs default |", "|---|---|---|---|"]
        lines += [f"| {t} | {'TMA' if tma else 'pointers'} | {r:.2f} | {r / base - 1:+.1%} |" for (t, tma), r in best[:args.top]]
        lines.append("")
        top = next(((t, r) for (t, tma), r in best if not tma), None)
        if top is not None and top[1] > base * (1 + args.margin) and top[0] != default:
            pick[f"{kernel} {n}x{k}"] = list(top[0])
        del product
        torch.cuda.empty_cache()
    lines += [f"Picked (over {args.margin:.0%} faster than the default): {pick or 'none'}"]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        write_text(args.out, text)
    if args.pick:
        write_text(args.pick, json.dumps(pick, indent=1) + "\n")
    return 0


def load_tiles(path: str) -> dict:
    """A ``--pick`` file as ``triton_linear.TILES`` entries; ValueError naming what is wrong."""
    try:
        with open(path) as f:
            raw = json.load(f)
        out = {}
        for key, tiles in raw.items():
            kernel, _, shape = key.partition(" ")
            n, k = (int(v) for v in shape.split("x"))
            if kernel not in ("linear", "project") or len(tiles) != 4 or min(tiles) < 1:
                raise ValueError(key)
            out[kernel, n, k] = tuple(int(t) for t in tiles)
        return out
    except (OSError, ValueError, AttributeError) as e:
        raise ValueError(f"--tiles {path!r}: not a linear_sweep --pick file ({e}); write it with "
                         "python -m uniattn.tools.linear_sweep --pick FILE") from None


if __name__ == "__main__":
    sys.exit(main())
