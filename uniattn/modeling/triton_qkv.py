"""A decode step's attention input in one Triton kernel: RMSNorm, the fused Q/K/V (or V/W_c) product,
RoPE and the write into a static cache.

Unfused, this part of a LLaMA layer is five to seven kernels of a few microseconds each (the norm,
the product, RoPE of Q and of K, the two ``index_copy_`` into the cache and the cache's position
counter), more than the product itself at a decode batch. Here each program owns ``2 * half``
columns of one head: ``half`` from its first half and the same ``half`` from its second, the pairs
``rotate_half`` mixes, so RoPE is applied to the product in registers. The weight's rows are head
after head, in three regions:

* ``n_out`` heads written to a ``[rows, n_out * head_dim]`` output (Q, RoPE'd with ``rope_out``; or
  a follower's ``W_c u``, not rotated);
* ``n_k`` heads RoPE'd and written into the K cache at the layer's position;
* the rest written into the V cache at that position.

The position is the cache layer's own counter (``StaticLayer.cumulative_length``), read by every
program; the last program to finish (an atomic ticket, left at zero again) advances it, as
``StaticLayer.update`` does.

Shipped inside saved checkpoints: only relative imports of sibling files; Triton is optional.
"""

from typing import Optional

import torch

from .triton_linear import INTERPRET, MAX_ROWS, NORM_PREFETCH, OPAQUE, config, fitted_stages, triton

if triton is not None:
    import triton.language as tl

    from .triton_linear import _normed, _x_tile

    @triton.jit
    def _project_kernel(X, W, B, NW, COS, SIN, OUT, KC, VC, POS, TICKET,
                        M, K, sx, sw, s_out, s_cos, s_sin, skb, skh, skn, svb, svh, svn, eps,
                        N_OUT: tl.constexpr, ROPE_OUT: tl.constexpr, N_K: tl.constexpr, D: tl.constexpr,
                        HALF: tl.constexpr, NORM: tl.constexpr, HAS_BIAS: tl.constexpr, PREFETCH: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
        pid = tl.program_id(0)
        per_head: tl.constexpr = D // (2 * HALF)
        head = pid // per_head
        c = (pid % per_head) * HALF + tl.arange(0, HALF)  # columns of the head's first half
        lo = head * D + c
        hi = lo + D // 2
        m = tl.arange(0, BLOCK_M)
        kk = tl.arange(0, BLOCK_K)
        rows = (m < M)[:, None]
        xp = X + m[:, None] * sx + kk[None, :]
        wlo = W + lo[:, None] * sw + kk[None, :]
        whi = W + hi[:, None] * sw + kk[None, :]
        acc_lo = tl.zeros([BLOCK_M, HALF], tl.float32)
        acc_hi = tl.zeros([BLOCK_M, HALF], tl.float32)
        ss = tl.zeros([BLOCK_M], tl.float32)
        if NORM and PREFETCH:
            x_next = tl.load(xp, mask=rows, other=0.0)
            g_next = tl.load(NW + kk)
        for k in range(0, K, BLOCK_K):
            if NORM and PREFETCH:  # as in triton_linear's kernel: the normed operand loaded one tile ahead
                x, sq = _normed(x_next, g_next)
                ahead = (k + BLOCK_K) % K
                x_next = tl.load(xp + ahead, mask=rows, other=0.0)
                g_next = tl.load(NW + ahead + kk)
            else:
                x, sq = _x_tile(xp, k, rows, NW, kk, NORM)
            acc_lo += tl.dot(x, tl.trans(tl.load(wlo + k)))
            acc_hi += tl.dot(x, tl.trans(tl.load(whi + k)))
            ss += sq
        if NORM:
            r = tl.rsqrt(ss / K + eps)[:, None]
            acc_lo = acc_lo * r
            acc_hi = acc_hi * r
        if HAS_BIAS:
            acc_lo += tl.load(B + lo).to(tl.float32)[None, :]
            acc_hi += tl.load(B + hi).to(tl.float32)[None, :]
        pos = tl.load(POS)
        rope = (head >= N_OUT) & (head < N_OUT + N_K)
        if ROPE_OUT:
            rope = head < N_OUT + N_K
        if rope:  # x * cos + rotate_half(x) * sin, rotate_half(x) = (-x_hi, x_lo)
            cos_lo = tl.load(COS + m[:, None] * s_cos + c[None, :], mask=rows, other=0.0).to(tl.float32)
            cos_hi = tl.load(COS + m[:, None] * s_cos + D // 2 + c[None, :], mask=rows, other=0.0).to(tl.float32)
            sin_lo = tl.load(SIN + m[:, None] * s_sin + c[None, :], mask=rows, other=0.0).to(tl.float32)
            sin_hi = tl.load(SIN + m[:, None] * s_sin + D // 2 + c[None, :], mask=rows, other=0.0).to(tl.float32)
            new_lo = acc_lo * cos_lo - acc_hi * sin_lo
            acc_hi = acc_hi * cos_hi + acc_lo * sin_hi
            acc_lo = new_lo
        if head < N_OUT:
            dst = OUT + m[:, None] * s_out + head * D
        else:
            if head < N_OUT + N_K:
                dst = KC + m[:, None] * skb + (head - N_OUT) * skh + pos * skn
            else:
                dst = VC + m[:, None] * svb + (head - N_OUT - N_K) * svh + pos * svn
        tl.store(dst + c[None, :], acc_lo.to(OUT.dtype.element_ty), mask=rows)
        tl.store(dst + D // 2 + c[None, :], acc_hi.to(OUT.dtype.element_ty), mask=rows)
        # Every program has read the position: the last one to get here advances it.
        tl.debug_barrier()
        done = tl.atomic_add(TICKET, 1, sem="acq_rel")
        if done == tl.num_programs(0) - 1:
            tl.store(POS, pos + 1)
            tl.store(TICKET, 0)


def _half(n: int, k: int, head_dim: int) -> Optional[int]:
    """Columns of a head's half per program: ``config``'s tile, halved until it divides the head."""
    tiles = config(n, k, "project")
    if tiles is None:
        return None
    half = tiles[0] // 2
    while half > 16 and head_dim % (2 * half):
        half //= 2
    return half if half >= 16 and head_dim % (2 * half) == 0 else None


def usable(x: torch.Tensor, weight: torch.Tensor, head_dim: int, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Whether ``project`` serves: 16-bit ``x`` of at most ``MAX_ROWS`` rows, one per cache row, a weight
    whose tiles divide it into head halves, caches in ``x``'s dtype and contiguous in ``head_dim``."""
    if triton is None or not (x.is_cuda or INTERPRET) or x.dtype not in (torch.bfloat16, torch.float16):
        return False
    half = _half(*weight.shape, head_dim)
    if half is None or weight.shape[0] % head_dim or weight.dtype != x.dtype:
        return False
    caches = [t for t in (k_cache, v_cache) if t.numel()]
    return (x.dim() == 2 and 0 < x.shape[0] <= MAX_ROWS and x.stride(-1) == 1 and weight.stride(-1) == 1
            and x.shape[1] == weight.shape[1]
            and all(t.dtype == x.dtype and t.shape[0] == x.shape[0] and t.stride(-1) == 1 for t in caches))


def _project_impl(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  norm_weight: Optional[torch.Tensor], eps: float, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  counter: torch.Tensor, ticket: torch.Tensor, n_out: int, rope_out: bool, n_k: int,
                  head_dim: int) -> torch.Tensor:
    n, k = weight.shape
    _, block_k, stages, warps = config(n, k, "project")
    half = _half(n, k, head_dim)
    stages = fitted_stages(stages, 2 * half, block_k, x.device)
    out = torch.empty(x.shape[0], n_out * head_dim, device=x.device, dtype=x.dtype)
    _project_kernel[(n // (2 * half),)](
        x, weight, bias if bias is not None else weight, norm_weight if norm_weight is not None else weight, cos, sin,
        out, k_cache, v_cache, counter,
        ticket, x.shape[0], k, x.stride(0), weight.stride(0), out.stride(0), cos.stride(0), sin.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), float(eps), N_OUT=n_out, ROPE_OUT=rope_out, N_K=n_k, D=head_dim, HALF=half,
        NORM=norm_weight is not None, HAS_BIAS=bias is not None, PREFETCH=NORM_PREFETCH["on"], BLOCK_M=MAX_ROWS,
        BLOCK_K=block_k, num_warps=warps, num_stages=stages)
    return out


if OPAQUE:
    _project_op = torch.library.custom_op("uniattn::decode_project", mutates_args=("k_cache", "v_cache", "counter",
                                                                                  "ticket"))(_project_impl)

    @_project_op.register_fake
    def _(x, weight, bias, norm_weight, eps, cos, sin, k_cache, v_cache, counter, ticket, n_out, rope_out, n_k,
          head_dim):
        return x.new_empty(x.shape[0], n_out * head_dim)
else:
    _project_op = _project_impl


def project(x, weight, bias, norm: Optional[tuple[torch.Tensor, float]], cos, sin, k_cache, v_cache, counter, ticket, *,
            n_out: int, rope_out: bool, n_k: int, head_dim: int) -> torch.Tensor:
    """``rmsnorm(x) @ weight.T (+ bias)`` (``norm=(weight, eps)``; ``None``: ``x`` as it is) for ``x``
    ``[rows, hidden]`` (one decode token per cache row), split by heads (module docstring): returns the
    ``n_out`` heads as ``[rows, n_out * head_dim]`` and writes the others into ``k_cache`` / ``v_cache``
    (``[rows, kv_heads, max_len, head_dim]``) at position ``counter``, which it then advances by one.
    ``cos`` / ``sin``: ``[rows, head_dim]``. ``ticket``: one int32 zero, left at zero. The caller checks
    ``usable`` first."""
    nw, eps = norm if norm is not None else (None, 0.0)
    return _project_op(x, weight, bias, nw, float(eps), cos, sin, k_cache, v_cache, counter, ticket,
                       n_out, rope_out, n_k, head_dim)
