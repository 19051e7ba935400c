"""Decode-size matrix products in Triton: ``x @ W.T (+ b)`` for 1-16 token rows, one pass over W.

At decode every product reads its weight once, so its speed is the weight's bytes over its time.
cuBLAS reads the short ones slowly: on an H200 at 8 tokens, LLaMA-3.1-8B's 32 MB O projection at
2.53 TB/s, where this kernel reads it at 2.93, and a 32-layer chain of a step's products
(Q+K+V, O, gate+up, down) runs 3% faster (``python -m uniattn.tools.launch_chain``,
docs/launch_chain_h200.md). Each program owns ``block_n`` output columns for all the token rows
and walks the whole K dimension (no split-K, so no reduction kernel after it); the 16-row tile is
what the matrix units take, so 1-16 rows cost the same. The launch settings per weight shape are
``config``'s rule, from ``tools.linear_sweep``; ``TILES`` overrides it.

``linear(x, weight, bias)`` takes the kernel only in code that ``torch.compile`` traces, and only
where it serves (``usable``); ``F.linear`` everywhere else. Eager decode is bound by the host, and
there each launch of this kernel (an opaque op started by Triton's launcher from Python) cost far
more than cuBLAS's: with it, eager static-cache decode at batch 8 / 16k took 60 ms per step
against 32 (docs/bench_h200_linear.md). Under CUDA graphs (``mode="reduce-overhead"``) launches
cost nothing. Compiled without CUDA graphs, each product is still launched from Python: not
measured; ``UNIATTN_DECODE_LINEAR=torch`` turns the kernel off.

``fused_linear`` adds what surrounds a product in a decoder layer, for A/Bs of the fused decode
layer (``decode_layer.FUSE``): an RMSNorm of ``x`` (its sums of squares gathered in the same pass
over ``x``, the 1/rms factor applied to the product), ``SiLU(gate) * up`` from gate rows over up
rows, a residual and a second addend. Measured on an H200, each cost more than the separate kernel
it removes (``python -m uniattn.tools.fusion_sweep``, docs/fusion_sweep_h200.md). A normed operand
is computed on, so Triton's pipeliner does not load it ahead; ``NORM_PREFETCH`` loads it one tile
ahead by hand, which halved the normed gate+up product's time (202.6 to 102.0 us).

``PDL["on"]`` launches it as a programmatic dependent launch (Hopper and later): it may start
while the kernel before it finishes, reads its first weight tile, and waits for that kernel's
writes only before it reads ``x``. Measured, it did not pay (``launch_chain``; docs/BENCHMARK.md),
so it is off; it stays for that measurement.

``next_weight`` names the weight the step reads after this product; with ``L2_AHEAD["mb"]`` > 0 the
last wave of programs, done with its own weight, asks L2 for that many MB of it (``to_l2``: one
Hopper bulk prefetch per thread, not waited for), so that the next product could start on L2 hits
while the bandwidth would idle between kernels. Measured, it made a 32-layer chain of the products
slower at every size, 4 to 32 MB (``launch_chain``; docs/BENCHMARK.md), so it is off; it stays for
that measurement, as PDL does.

Shipped inside saved checkpoints: only relative imports of sibling files; Triton is optional.
"""

import functools
import os
from typing import Optional

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: linear() is F.linear
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
MAX_ROWS = 16
PDL = {"on": False, "early": True, "trigger": "wait"}
# MB of the next weight that a kernel's last programs ask L2 to fetch (0: off): "mb" the products'
# (``next_weight``), "o_mb" the attention's, of the O weight (``triton_decode``)
L2_AHEAD = {"mb": 0.0, "o_mb": 0.0}
LANES = 128  # threads of a program (4 warps): one bulk prefetch each
if triton is not None:
    _LANES = tl.constexpr(LANES)
NORM_PREFETCH = {"on": True}  # with an RMSNorm applied to x: load x's tiles one ahead (module docstring)
_mode = os.environ.get("UNIATTN_DECODE_LINEAR", "auto")
if _mode not in ("auto", "torch"):
    raise ValueError(f"UNIATTN_DECODE_LINEAR={_mode!r} is not one of ('auto', 'torch')")


if triton is not None:

    @triton.jit
    def _x_tile(xp, k, rows, NW, kk, NORM: tl.constexpr):
        """A K tile of the token rows; with ``NORM`` times the RMSNorm weight, and the rows' sums of squares
        (the 1 / rms factor is applied to the product at the end: one pass over ``x``)."""
        x = tl.load(xp + k, mask=rows, other=0.0)
        if NORM:
            xf = x.to(tl.float32)
            return (xf * tl.load(NW + k + kk).to(tl.float32)[None, :]).to(x.dtype), tl.sum(xf * xf, 1)
        return x, tl.zeros([x.shape[0]], tl.float32)

    @triton.jit
    def _normed(x, g):
        """``x`` times the RMSNorm weight ``g`` (the operand of the product), and the rows' sums of squares."""
        xf = x.to(tl.float32)
        return (xf * g.to(tl.float32)[None, :]).to(x.dtype), tl.sum(xf * xf, 1)

    @triton.jit
    def to_l2(P, start, chunk, LANES: tl.constexpr, PURE: tl.constexpr = False):
        """Ask L2 for ``LANES`` runs of ``chunk`` elements of ``P`` from element ``start``, one bulk prefetch
        (Hopper's ``cp.async.bulk.prefetch.L2``) per thread; nothing waits for them. Returns the asm's dummy
        result. ``PURE`` marks the asm free of effects, as Inductor's mutation analysis of a ``triton_op``'s
        kernels needs (it takes an impure one to write every argument); the caller must then use the
        result (``sink``), or the compiler drops the prefetch."""
        lane = tl.arange(0, LANES)
        addr = (P + start + lane * chunk).to(tl.int64)
        size = (lane * 0 + chunk * 2).to(tl.int32)  # 16-bit weights (ahead_plan)
        return tl.inline_asm_elementwise("cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0;", "=r,l,r",
                                         [addr, size], dtype=tl.int32, is_pure=PURE, pack=1)

    @triton.jit
    def sink(dummy, OUT, chunk, LANES: tl.constexpr):
        """A store of ``to_l2``'s result that never happens (``chunk`` > 0) but that the compiler cannot drop."""
        lane = tl.arange(0, LANES)
        tl.store(OUT + lane, dummy.to(OUT.dtype.element_ty), mask=(lane * 0 + chunk) < 0)

    @triton.jit
    def _linear_kernel(X, W, B, Y, NW, R, E, NXT, M, K, sx, sw, sy, sr, se, up_rows, eps, ahead_from, ahead_chunk,
                       HAS_BIAS: tl.constexpr, NORM: tl.constexpr, GATED: tl.constexpr, RESIDUAL: tl.constexpr,
                       EXTRA: tl.constexpr, PREFETCH: tl.constexpr, PDL: tl.constexpr, EARLY: tl.constexpr,
                       LATE_TRIGGER: tl.constexpr, AHEAD: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        m = tl.arange(0, BLOCK_M)
        kk = tl.arange(0, BLOCK_K)
        wp = W + n[:, None] * sw + kk[None, :]
        up = wp + up_rows * sw  # GATED: the up projection's rows, `up_rows` below the gate's
        xp = X + m[:, None] * sx + kk[None, :]
        rows = (m < M)[:, None]
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        ss = tl.zeros([BLOCK_M], tl.float32)
        start = 0
        if EARLY:  # the weight does not depend on the kernel before: read a tile while it finishes
            w0 = tl.load(wp)
        if PDL:
            tl.extra.cuda.gdc_wait()
            if not LATE_TRIGGER:
                tl.extra.cuda.gdc_launch_dependents()
        if EARLY:
            x, sq = _x_tile(xp, 0, rows, NW, kk, NORM)
            acc += tl.dot(x, tl.trans(w0))
            if GATED:
                acc_up += tl.dot(x, tl.trans(tl.load(up)))
            ss += sq
            start = BLOCK_K
        if NORM and PREFETCH:
            x_next = tl.load(xp + start, mask=rows, other=0.0)
            g_next = tl.load(NW + start + kk)
        for k in range(start, K, BLOCK_K):
            if NORM and PREFETCH:
                # The operand is computed on, so the pipeliner does not load it ahead: this does, one
                # tile ahead (the last fetch wraps to the first tile: in bounds, unused).
                x, sq = _normed(x_next, g_next)
                ahead = (k + BLOCK_K) % K
                x_next = tl.load(xp + ahead, mask=rows, other=0.0)
                g_next = tl.load(NW + ahead + kk)
            else:
                x, sq = _x_tile(xp, k, rows, NW, kk, NORM)
            acc += tl.dot(x, tl.trans(tl.load(wp + k)))
            if GATED:
                acc_up += tl.dot(x, tl.trans(tl.load(up + k)))
            ss += sq
        if PDL and LATE_TRIGGER:
            tl.extra.cuda.gdc_launch_dependents()
        if AHEAD:  # the last wave, done with its weight: the next product's first bytes, while this one drains
            pid = tl.program_id(0)
            if pid >= ahead_from:
                to_l2(NXT, (pid - ahead_from) * ahead_chunk * _LANES, ahead_chunk, _LANES)
        if NORM:
            r = tl.rsqrt(ss / K + eps)[:, None]
            acc = acc * r
            acc_up = acc_up * r
        if HAS_BIAS:
            acc += tl.load(B + n).to(tl.float32)[None, :]
            if GATED:
                acc_up += tl.load(B + up_rows + n).to(tl.float32)[None, :]
        if GATED:  # SiLU(gate) * up
            acc = acc * tl.sigmoid(acc) * acc_up
        if RESIDUAL:
            acc += tl.load(R + m[:, None] * sr + n[None, :], mask=rows, other=0.0).to(tl.float32)
        if EXTRA:
            acc += tl.load(E + m[:, None] * se + n[None, :], mask=rows, other=0.0).to(tl.float32)
        tl.store(Y + m[:, None] * sy + n[None, :], acc.to(Y.dtype.element_ty), mask=rows)


# (kernel, N, K) -> (block_n, block_k, stages, warps) that replace ``config``'s rule for that weight
# shape: "linear" for this module's products, "project" for ``triton_qkv``'s. Set by sweeps
# (``tools.linear_sweep`` times candidates; ``decode_ab --tiles`` runs its pick in the step).
TILES: dict[tuple[str, int, int], tuple[int, int, int, int]] = {}


def config(n: int, k: int, kernel: str = "linear") -> Optional[tuple[int, int, int, int]]:
    """``(block_n, block_k, stages, warps)`` for an ``n x k`` weight, or ``None`` where the tiles do not
    divide it; ``TILES`` first.

    The rule, from sweeps on an H200 at LLaMA-3.1-8B's shapes (``tools.linear_sweep``,
    docs/linear_sweep_h200.md): 4 warps; K tiles 256 wide, 128 for the widest products (gate+up, the
    output head); for the products, 5 stages of 256-wide tiles (O and down read 2-4% faster than in 4:
    more of the weight in flight per program, one program per SM), 3 of 128-wide, 4 for the output
    head with 64 output columns per program (4.4 against 4.25 TB/s); 64 columns where that still makes
    about one program per SM (Q+K+V), else 32. For ``triton_qkv``'s projection 64 columns wherever
    they divide, in 4 stages: a follower's W_c/V read at 2.9 TB/s against 1.9 with 32 (80 programs
    rather than 160)."""
    tiles = TILES.get((kernel, n, k))
    if tiles is not None:
        return tiles if n % tiles[0] == 0 and k % tiles[1] == 0 else None
    wide = n >= 16384
    block_k = next((b for b in ((128, 256) if wide else (256, 128)) if k % b == 0), None)
    if kernel == "project":
        block_n, stages = (64 if n % 64 == 0 else 32), 4
    elif n >= 65536:  # a vocabulary
        block_n, stages = 64, 4
    else:  # 5 stages measured only with 32 columns (O, down); 64 (Q+K+V) keeps the 4 it was measured in
        block_n = 64 if n % 64 == 0 and 96 <= n // 64 and not wide else 32
        stages = 3 if block_k == 128 else 4 if block_n == 64 else 5
    if block_k is None or n % block_n:
        return None
    return block_n, block_k, stages, 4


@functools.lru_cache(maxsize=None)  # asked on every decode call
def shared_memory(device: torch.device) -> int:
    """Bytes of shared memory one program may take on ``device`` (as much as it wants off CUDA)."""
    if device.type != "cuda":
        return 1 << 30
    return getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", 1 << 30)


def pipeline_bytes(stages: int, block_n: int, block_k: int) -> int:
    """Shared memory a product program's pipeline takes: Triton's pipeliner keeps ``stages - 1`` tiles
    of the weight (``block_n`` rows) and of ``x`` (``MAX_ROWS``) in flight, 16-bit."""
    return (stages - 1) * (block_n + MAX_ROWS) * block_k * 2


def fitted_stages(stages: int, block_n: int, block_k: int, device: torch.device) -> int:
    """``stages`` less those whose tiles would outgrow ``device``'s shared memory (``pipeline_bytes``)."""
    while stages > 2 and pipeline_bytes(stages, block_n, block_k) > shared_memory(device):
        stages -= 1
    return stages


def usable(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> bool:
    """Whether the kernel can serve ``F.linear(x, weight, bias)``: no gradient, at most ``MAX_ROWS`` token
    rows, 16-bit floats on a device Triton runs on, matching shapes, rows of ``x`` and ``weight``
    contiguous, tiles that divide."""
    if triton is None or _mode != "auto" or torch.is_grad_enabled() or not (x.is_cuda or INTERPRET):
        return False
    if x.dtype not in (torch.bfloat16, torch.float16) or weight.dtype != x.dtype or weight.dim() != 2:
        return False
    if x.shape[-1] != weight.shape[1]:
        return False  # F.linear names the mismatch
    if bias is not None and (bias.dtype != x.dtype or bias.shape != weight.shape[:1] or bias.stride(0) != 1):
        return False
    rows = x.numel() // max(1, x.shape[-1])
    return (0 < rows <= MAX_ROWS and x.stride(-1) == 1 and weight.stride(1) == 1
            and config(*weight.shape) is not None)


# Asked on every decode call (the attention's plan, the prefetch). torch.compile traces through the
# cache (and says so): as verified on the GPU.
@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    """Multiprocessors of ``device`` (8 off CUDA, where the interpreter runs the kernels)."""
    if device.type != "cuda":
        return 8
    return torch.cuda.get_device_properties(device).multi_processor_count


def prefetch_chunk(mb: float, nxt: Optional[torch.Tensor], programs: int) -> int:
    """Elements each of ``programs`` programs' ``LANES`` threads asks L2 for, so that together they fetch
    the first ``mb`` MB of ``nxt`` (16-byte runs); 0 where there is nothing to do: ``mb`` 0, no 16-bit
    contiguous CUDA weight, under the interpreter, or a weight too small."""
    if nxt is None or mb <= 0 or INTERPRET or triton is None or nxt.device.type != "cuda":
        return 0
    if not nxt.is_contiguous() or nxt.dtype not in (torch.bfloat16, torch.float16):
        return 0
    return min(nxt.numel(), int(mb * 2**20) // 2) // (programs * LANES) // 8 * 8


def ahead_plan(programs: int, nxt: Optional[torch.Tensor]) -> tuple[int, int]:
    """``(first program, elements per lane)`` of the products' prefetch of ``nxt`` (``L2_AHEAD["mb"]``) by
    the last of a kernel's ``programs``, one SM's worth; ``(programs, 0)`` where there is none (also a
    weight not 16-byte aligned)."""
    if nxt is None or L2_AHEAD["mb"] <= 0 or nxt.data_ptr() % 16:
        return programs, 0
    last = min(programs, sm_count(nxt.device))
    chunk = prefetch_chunk(L2_AHEAD["mb"], nxt, last)
    return (programs - last, chunk) if chunk else (programs, 0)


def _linear_impl(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 norm_weight: Optional[torch.Tensor] = None, eps: float = 0.0, residual: Optional[torch.Tensor] = None,
                 extra: Optional[torch.Tensor] = None, gated: bool = False,
                 next_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    n, k = weight.shape
    block_n, block_k, stages, warps = config(n, k)
    stages = fitted_stages(stages, block_n, block_k, x.device)
    if gated:  # two half-width tiles per program: the launch and the bytes per program stay as tuned
        block_n //= 2
    out = n // 2 if gated else n
    y = torch.empty(x.shape[0], out, device=x.device, dtype=x.dtype)
    ahead_from, ahead_chunk = ahead_plan(out // block_n, next_weight)
    pdl = PDL["on"] and not INTERPRET
    launch = {"launch_pdl": True} if pdl else {}
    _linear_kernel[(out // block_n,)](
        x, weight, bias if bias is not None else weight, y,
        norm_weight if norm_weight is not None else weight, residual if residual is not None else y,
        extra if extra is not None else y, next_weight if ahead_chunk else weight, x.shape[0], k, x.stride(0),
        weight.stride(0), y.stride(0), residual.stride(0) if residual is not None else 0,
        extra.stride(0) if extra is not None else 0, out if gated else 0, float(eps), ahead_from, ahead_chunk,
        AHEAD=ahead_chunk > 0, HAS_BIAS=bias is not None, NORM=norm_weight is not None, GATED=gated,
        RESIDUAL=residual is not None, EXTRA=extra is not None, PREFETCH=NORM_PREFETCH["on"], PDL=pdl,
        EARLY=PDL["early"] and pdl,
        LATE_TRIGGER=PDL["trigger"] == "loop", BLOCK_M=MAX_ROWS,
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages, **launch)
    return y


# Whether the kernels' Python entry points become opaque custom ops. Under the interpreter they stay plain
# functions, unless UNIATTN_INTERPRET_OPS=1: then a CPU test can compile code that calls them.
OPAQUE = (triton is not None and hasattr(torch.library, "custom_op")
          and (not INTERPRET or os.environ.get("UNIATTN_INTERPRET_OPS") == "1"))

if OPAQUE:
    # Opaque to torch.compile, so that Triton's own launcher starts it (a programmatic dependent
    # launch needs a launch attribute that Inductor's launcher of user kernels does not pass).
    _linear_op = torch.library.custom_op("uniattn::decode_linear", mutates_args=())(_linear_impl)

    @_linear_op.register_fake
    def _(x, weight, bias, norm_weight=None, eps=0.0, residual=None, extra=None, gated=False, next_weight=None):
        return x.new_empty(x.shape[0], weight.shape[0] // 2 if gated else weight.shape[0])
else:
    _linear_op = _linear_impl


def fusable(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
            *others: Optional[torch.Tensor]) -> bool:
    """Whether ``fused_linear`` serves these operands: ``usable``, and ``others`` (a norm weight, a
    residual, ...) of ``x``'s dtype and contiguous in their last dimension."""
    return usable(x, weight, bias) and all(t is None or (t.dtype == x.dtype and t.stride(-1) == 1) for t in others)


def fused_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                 norm: Optional[tuple[torch.Tensor, float]] = None, gated: bool = False,
                 residual: Optional[torch.Tensor] = None, extra: Optional[torch.Tensor] = None,
                 next_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One decode-size product with what surrounds it in a decoder layer, for 2-D ``x`` ``[rows, K]``:
    ``residual + extra + act(rmsnorm(x) @ W.T + b)``, where ``norm=(weight, eps)`` applies an RMSNorm
    (LLaMA's: ``x / rms(x) * weight``) to ``x`` first and ``gated`` reads ``W`` as gate rows over up
    rows and returns ``SiLU(gate) * up``. ``next_weight``, the weight the step reads next, has its first
    ``L2_AHEAD`` MB fetched into L2 as this product ends (a hint: results do not depend on it). The
    caller checks ``fusable`` first."""
    nw, eps = norm if norm is not None else (None, 0.0)
    return _linear_op(x, weight, bias, nw, eps, residual, extra, gated, next_weight)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; through the Triton kernel in code that torch.compile traces, where
    the kernel serves (``usable``)."""
    if not (torch.compiler.is_compiling() and usable(x, weight, bias)):
        return F.linear(x, weight, bias)
    y = _linear_op(x.reshape(-1, x.shape[-1]), weight, bias)
    return y.view(*x.shape[:-1], weight.shape[0])
