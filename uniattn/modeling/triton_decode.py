"""Grouped decode attention in Triton: one new token per sequence, split over the context.

Two kernels, both launched per (sequence, KV head, context split), so a batch of one still fills
the GPU and each K/V row is read once for all the query heads of its group:

* ``decode_attend``: the scores of the group's query heads against K, softmax over the context
  (online within a split, merged across splits), and the output ``P @ V``. For a UniAttn leader it
  also writes the probability rows its followers need, tile by tile: ``rows = exp(s - tile max)``
  in V's dtype and one factor per (head, tile), ``exp(tile max - row max) / row sum``. A
  probability is ``rows * factor``: no second pass over the scores is needed to normalise them.
* ``decode_apply``: a follower's ``P @ V`` from those rows and its own V cache; it never reads K.

A third kernel, ``_decode_merge_kernel``, merges ``decode_attend``'s splits (and writes the leader's
factors) in one launch, where the same merge in PyTorch ops compiles to two or three. Given
``tickets`` (int32 zeros, one per sequence and KV head), the last split of each group to finish does
that merge (a follower's sum) inside the attention kernel instead; on an H200 that serial tail made
the decode step slower (``decode_layer.FUSE["merge"]``), so nothing takes it by default.

With ``L2_AHEAD["o_mb"]`` > 0 (``triton_linear``) the merge kernel and the follower's kernel also ask L2
for the first megabytes of the layer's O weight (``next_weight``), read next; measured on an H200 it
did not make the step faster, so it is off.

Masks are SDPA's boolean masks (``True`` = attend), ``[batch, 1, 1, kv_len]`` or broadcastable,
so padding, sliding windows and a static cache's unfilled tail are all honoured; ``None`` attends
to every position, as SDPA does. ``kernels.py`` calls these for decode on CUDA and keeps its
PyTorch path (``grouped_probs`` / ``grouped_apply``) as the reference and the CPU fallback.
Under ``TRITON_INTERPRET=1`` the kernels also run on CPU tensors (the tests use that).

Shipped inside saved checkpoints: only relative imports of sibling files; Triton is optional.
"""

import os
from typing import NamedTuple, Optional

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: kernels.py then keeps the PyTorch path
    triton = None

try:
    from torch.library import triton_op, wrap_triton
except ImportError:  # torch < 2.6: launch the kernels directly (torch.compile then graph-breaks)
    triton_op = wrap_triton = None

from .triton_linear import L2_AHEAD, OPAQUE, prefetch_chunk  # noqa: E402  (`from .x import` form: saved checkpoints ship x.py)
from .triton_linear import shared_memory as _device_shared_memory  # noqa: E402
from .triton_linear import sm_count as _sm_count  # noqa: E402
if triton is not None:
    from .triton_linear import _LANES, sink, to_l2  # noqa: E402,F401  (used by the kernels)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Launch shape. programs_per_sm: enough independent loads in flight to keep HBM busy. Tiles of
# block_n positions (half that above head_dim 128, where a tile of K is twice the bytes).
# min_tiles: the fewest tiles a context split walks (1: as many splits as programs_per_sm asks).
# The best for the LLaMA-3.1-8B step of `python -m uniattn.tools.decode_sweep` on an H200
# (docs/decode_sweep_h200.md): few long splits of large tiles, two stages deep. It needs about
# 128 KiB of shared memory per program; a GPU with less gets smaller tiles (settings()).
CONFIG = {"programs_per_sm": 2, "block_n": 128, "warps": 4, "stages": 2, "min_tiles": 1}
# The ops take these settings as an argument, read where torch.compile traces the call: so that
# they are part of the captured graph and of its cache key. Read inside a traced op, a changed
# CONFIG was invisible to that key, and a later compile (in another process too) took the
# cached kernels of the old one: measured on an H200, two launch shapes timed the same.
SETTINGS = tuple(CONFIG)


@torch.compiler.assume_constant_result  # settings() runs where dynamo traces: this runs eagerly there
def _shared_memory(device: torch.device) -> int:
    """Bytes of shared memory one program may take on ``device`` (as much as it wants off CUDA)."""
    return _device_shared_memory(device)


def settings(device: Optional[torch.device] = None) -> list[int]:
    """``CONFIG`` as the ops' argument. On ``device``, ``block_n`` is halved (down to 32) while the
    pipeline's K and V tiles (``stages`` of each, 256 bytes a position) outgrow its shared memory."""
    config = {key: int(CONFIG[key]) for key in SETTINGS}
    if device is not None:
        while config["block_n"] > 32 and config["stages"] * config["block_n"] * 512 + (16 << 10) > _shared_memory(device):
            config["block_n"] //= 2
    return [config[key] for key in SETTINGS]


def _named(launch: list[int]) -> dict:
    """``settings()``'s list as ``CONFIG``'s keys."""
    return dict(zip(SETTINGS, launch))


def available(query: torch.Tensor) -> bool:
    """Whether the Triton kernels can run on ``query``'s device."""
    return triton is not None and (query.is_cuda or INTERPRET)


class DecodeRows(NamedTuple):
    """A leader's decode probabilities, tile-factored: ``P[..., n] = rows[..., n] * factor[..., n // block]``."""

    rows: torch.Tensor  # [batch, heads, kv_len], V's dtype
    factor: torch.Tensor  # [batch, heads, tiles], float32
    block: int

    def dense(self) -> torch.Tensor:
        """The probabilities as ``[batch, heads, 1, kv_len]`` (what the PyTorch path hands on)."""
        kv_len = self.rows.shape[-1]
        per_position = self.factor.repeat_interleave(self.block, dim=-1)[..., :kv_len]
        return (self.rows.float() * per_position)[:, :, None].to(self.rows.dtype)


def block_size(head_dim: int, launch: Optional[list[int]] = None) -> int:
    """Positions per tile (``launch``: ``settings()``, by default the current ones)."""
    block_n = _named(launch or settings())["block_n"]
    return block_n if head_dim <= 128 else block_n // 2


def plan(batch: int, kv_heads: int, kv_len: int, head_dim: int, device: torch.device,
         launch: Optional[list[int]] = None) -> tuple[int, int, int]:
    """``(block, tiles_per_split, splits)``: tiles of ``block_size`` positions, split so that about
    ``CONFIG["programs_per_sm"]`` programs run per multiprocessor, each walking at least
    ``CONFIG["min_tiles"]`` tiles (all of them where the context has fewer)."""
    launch = launch or settings(device)
    config = _named(launch)
    block = block_size(head_dim, launch)
    tiles = triton.cdiv(kv_len, block)
    want = max(1, triton.cdiv(config["programs_per_sm"] * _sm_count(device), batch * kv_heads))
    per_split = min(tiles, max(triton.cdiv(tiles, min(want, tiles)), config["min_tiles"]))
    return block, per_split, triton.cdiv(tiles, per_split)


def _bool_mask(mask: Optional[torch.Tensor], batch: int, kv_len: int):
    """SDPA's mask as a ``[batch, kv_len]`` view (stride 0 where it broadcasts)."""
    if mask is None:
        return None
    return mask[:, 0, -1, :kv_len].expand(batch, kv_len)


if triton is not None:

    @triton.jit
    def _tanh(x):
        return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)

    @triton.jit
    def _last_split(ticket, n_splits):
        """True in the last of a group's ``n_splits`` programs to get here (its ticket is then left at zero):
        every other split's partial results are written and visible to it."""
        tl.debug_barrier()
        done = tl.atomic_add(ticket, 1, sem="acq_rel")
        last = done == n_splits - 1
        if last:
            tl.store(ticket, 0)
        return last

    @triton.jit
    def _merge_row(PART, ML, TMAX, OUT, FACTOR, row, n_splits, n_tiles,
                   D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr, WRITE_ROWS: tl.constexpr):
        # One (sequence, head): the splits' partial outputs, weighted by exp(m - top), over the total
        # weight; and, for a leader, each tile's factor exp(tile max - top) / total. Loads bypass L1
        # (.cg): in the attention kernel's own merge they read other programs' writes.
        d = tl.arange(0, D)
        top = tl.full([BLOCK_S], float("-inf"), tl.float32)
        for s0 in range(0, n_splits, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            top = tl.maximum(top, tl.load(ML + (row * n_splits + s) * 2, mask=s < n_splits, other=float("-inf"),
                                          cache_modifier=".cg"))
        top_all = tl.max(top, 0)
        total = tl.zeros([BLOCK_S], tl.float32)
        acc = tl.zeros([D], tl.float32)
        for s0 in range(0, n_splits, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            live = s < n_splits
            m = tl.load(ML + (row * n_splits + s) * 2, mask=live, other=float("-inf"), cache_modifier=".cg")
            w = tl.where(live, tl.exp(m - top_all), 0.0)
            total += tl.load(ML + (row * n_splits + s) * 2 + 1, mask=live, other=0.0, cache_modifier=".cg") * w
            part = tl.load(PART + (row * n_splits + s)[:, None] * D + d[None, :], mask=live[:, None], other=0.0,
                           cache_modifier=".cg")
            acc += tl.sum(part * w[:, None], 0)
        total_all = tl.sum(total, 0)
        # A query that may attend to nothing (a padding position) gets zeros, not 0/0: its value would
        # otherwise enter later layers' caches, where even a zero probability times NaN is NaN.
        total_all = tl.where(total_all > 0, total_all, 1.0)
        tl.store(OUT + row * D + d, (acc / total_all).to(OUT.dtype.element_ty))
        if WRITE_ROWS:
            for t0 in range(0, n_tiles, BLOCK_T):
                t = t0 + tl.arange(0, BLOCK_T)
                tmax = tl.load(TMAX + row * n_tiles + t, mask=t < n_tiles, other=0.0)
                tl.store(FACTOR + row * n_tiles + t, tl.exp(tmax - top_all) / total_all, mask=t < n_tiles)

    @triton.jit
    def _decode_attend_kernel(
        Q, K, V, MASK, O, ML, ROWS, TMAX, TICKETS, OUT, FACTOR,
        sq_b, sq_h, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sm_b, sm_n, sr_b, sr_h,
        kv_len, kv_heads, per_split, n_tiles_total, scale, softcap,
        G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr,
        HAS_MASK: tl.constexpr, SOFTCAP: tl.constexpr, WRITE_ROWS: tl.constexpr, MERGE: tl.constexpr,
        BLOCK_S: tl.constexpr,
    ):
        pid = tl.program_id(0)
        split = tl.program_id(1)
        n_splits = tl.num_programs(1)
        b = pid // kv_heads
        kh = pid % kv_heads
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, D)
        heads = kh * G + g
        in_group = g < G
        q = tl.load(Q + b * sq_b + heads[:, None] * sq_h + d[None, :], mask=in_group[:, None], other=0.0)
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, D], tl.float32)
        k_base = K + b * sk_b + kh * sk_h
        v_base = V + b * sv_b + kh * sv_h
        for i in range(0, per_split):
            t = split * per_split + i
            n = t * BLOCK_N + tl.arange(0, BLOCK_N)
            live = n < kv_len
            k = tl.load(k_base + n[:, None] * sk_n + d[None, :], mask=live[:, None], other=0.0)
            # Under torch.compile the float arguments arrive as float64: keep the loop in float32.
            s = (tl.dot(q, tl.trans(k)) * scale).to(tl.float32)
            if SOFTCAP:
                s = (softcap * _tanh(s / softcap)).to(tl.float32)
            if HAS_MASK:
                live = live & (tl.load(MASK + b * sm_b + n * sm_n, mask=live, other=0) != 0)
            s = tl.where(live[None, :], s, float("-inf"))
            m_t = tl.max(s, 1)
            m_t = tl.where(m_t == float("-inf"), 0.0, m_t)  # an all-masked tile: p = 0 below
            p = tl.exp(s - m_t[:, None])
            if WRITE_ROWS:
                tl.store(ROWS + b * sr_b + heads[:, None] * sr_h + n[None, :], p.to(ROWS.dtype.element_ty),
                         mask=in_group[:, None] & (n < kv_len)[None, :])
                tl.store(TMAX + (b * kv_heads * G + heads) * n_tiles_total + t, m_t, mask=in_group)
            m_new = tl.maximum(m_i, m_t)
            alpha = tl.exp(m_i - m_new)
            beta = tl.exp(m_t - m_new)
            v = tl.load(v_base + n[:, None] * sv_n + d[None, :], mask=live[:, None], other=0.0)
            acc = acc * alpha[:, None] + tl.dot((p * beta[:, None]).to(v.dtype), v)
            l_i = l_i * alpha + tl.sum(p, 1) * beta
            m_i = m_new
        row = (b * kv_heads * G + heads) * n_splits + split
        tl.store(O + row[:, None] * D + d[None, :], acc, mask=in_group[:, None])
        tl.store(ML + row * 2, m_i, mask=in_group)
        tl.store(ML + row * 2 + 1, l_i, mask=in_group)
        if MERGE:  # the last split of this KV group merges the group's splits (what _decode_merge_kernel does)
            if _last_split(TICKETS + pid, n_splits):
                for gi in tl.static_range(G):  # not `i`: the name of the loop above, which Triton keeps
                    _merge_row(O, ML, TMAX, OUT, FACTOR, b * kv_heads * G + kh * G + gi, n_splits, n_tiles_total,
                               D, BLOCK_S, 256, WRITE_ROWS)

    @triton.jit
    def _decode_apply_kernel(
        ROWS, FACTOR, V, O, TICKETS, OUT, NXT,
        sr_b, sr_h, sv_b, sv_h, sv_n,
        kv_len, kv_heads, per_split, n_tiles_total, ahead_chunk,
        G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, MERGE: tl.constexpr,
        BLOCK_S: tl.constexpr, AHEAD: tl.constexpr,
    ):
        pid = tl.program_id(0)
        split = tl.program_id(1)
        n_splits = tl.num_programs(1)
        b = pid // kv_heads
        kh = pid % kv_heads
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, D)
        heads = kh * G + g
        in_group = g < G
        acc = tl.zeros([BLOCK_G, D], tl.float32)
        v_base = V + b * sv_b + kh * sv_h
        for i in range(0, per_split):
            t = split * per_split + i
            n = t * BLOCK_N + tl.arange(0, BLOCK_N)
            live = n < kv_len
            e = tl.load(ROWS + b * sr_b + heads[:, None] * sr_h + n[None, :],
                        mask=in_group[:, None] & live[None, :], other=0.0)
            f = tl.load(FACTOR + (b * kv_heads * G + heads) * n_tiles_total + t, mask=in_group, other=0.0)
            v = tl.load(v_base + n[:, None] * sv_n + d[None, :], mask=live[:, None], other=0.0)
            acc += tl.dot((e.to(tl.float32) * f[:, None]).to(v.dtype), v)
        row = (b * kv_heads * G + heads) * n_splits + split
        tl.store(O + row[:, None] * D + d[None, :], acc, mask=in_group[:, None])
        if AHEAD:  # done with V: the O product's weight, read next (triton_linear.L2_AHEAD)
            sink(to_l2(NXT, (pid * n_splits + split) * ahead_chunk * _LANES, ahead_chunk, _LANES, True), O,
                 ahead_chunk, _LANES)
        if MERGE:  # the last split of this KV group sums the group's splits
            if _last_split(TICKETS + pid, n_splits):
                for gi in tl.static_range(G):
                    r = b * kv_heads * G + kh * G + gi
                    total = tl.zeros([D], tl.float32)
                    for s0 in range(0, n_splits, BLOCK_S):
                        s = s0 + tl.arange(0, BLOCK_S)
                        total += tl.sum(tl.load(O + (r * n_splits + s)[:, None] * D + d[None, :],
                                                mask=(s < n_splits)[:, None], other=0.0, cache_modifier=".cg"), 0)
                    tl.store(OUT + r * D + d, total.to(OUT.dtype.element_ty))

    @triton.jit
    def _decode_merge_kernel(
        PART, ML, TMAX, OUT, FACTOR, NXT, n_splits, n_tiles, ahead_chunk,
        D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr, WRITE_ROWS: tl.constexpr, AHEAD: tl.constexpr,
    ):
        if AHEAD:  # a short, latency-bound kernel: the O product's weight, read next, comes meanwhile
            sink(to_l2(NXT, tl.program_id(0) * ahead_chunk * _LANES, ahead_chunk, _LANES, True), OUT, ahead_chunk,
                 _LANES)
        _merge_row(PART, ML, TMAX, OUT, FACTOR, tl.program_id(0), n_splits, n_tiles, D, BLOCK_S, BLOCK_T, WRITE_ROWS)


def ahead_chunk(programs, nxt: Optional[torch.Tensor]) -> int:
    """``prefetch_chunk`` of ``L2_AHEAD["o_mb"]`` MB of ``nxt`` (the O weight) over ``programs()`` programs,
    called only where there is a prefetch to plan. Read where torch.compile traces, so it is in the
    graph's key (as ``settings()``); ``nxt`` is a weight of its own, which the allocator aligns (dynamo
    cannot trace ``storage_offset()`` to check)."""
    if prefetch_chunk(L2_AHEAD["o_mb"], nxt, 1) == 0:
        return 0
    return prefetch_chunk(L2_AHEAD["o_mb"], nxt, programs())


def _split_block(splits: int) -> int:
    """Context splits a merge reads at once."""
    return min(64, triton.next_power_of_2(splits))


def _launch(kernel):
    return wrap_triton(kernel) if wrap_triton is not None and not INTERPRET else kernel


def _shape_constants(group: int, head_dim: int, block: int, launch: list[int]) -> dict:
    """Both kernels' compile-time shape and launch arguments (a KV group padded to the matrix units' 16 rows)."""
    config = _named(launch)
    return dict(G=group, BLOCK_G=max(16, triton.next_power_of_2(group)), D=head_dim, BLOCK_N=block,
                num_warps=config["warps"], num_stages=config["stages"])


def _attend_launch(query, key, value, mask, scale, softcap, write_rows, tickets, launch):
    b, h, _, d = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    g = h // kv_heads
    block, per_split, splits = plan(b, kv_heads, kv_len, d, query.device, launch)
    tiles = per_split * splits
    partial = torch.empty(b, h, splits, d, device=query.device, dtype=torch.float32)
    ml = torch.empty(b, h, splits, 2, device=query.device, dtype=torch.float32)
    rows = torch.empty(b, h, kv_len if write_rows else 0, device=query.device, dtype=value.dtype)
    tmax = torch.empty(b, h, tiles if write_rows else 0, device=query.device, dtype=torch.float32)
    merge = tickets is not None
    out = torch.empty(b, h, d if merge else 0, device=query.device, dtype=query.dtype)
    factor = torch.empty_like(tmax) if merge else tmax
    q = query[:, :, 0]
    m = _bool_mask(mask, b, kv_len)
    # The merged kernel is launched from an opaque op (below): directly, never through wrap_triton.
    (_decode_attend_kernel if merge else _launch(_decode_attend_kernel))[(b * kv_heads, splits)](
        q, key, value, m if m is not None else q, partial, ml, rows, tmax,
        tickets if merge else ml, out, factor,
        q.stride(0), q.stride(1), key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2),
        m.stride(0) if m is not None else 0, m.stride(1) if m is not None else 0,
        rows.stride(0), rows.stride(1),
        kv_len, kv_heads, per_split, tiles, scale, softcap,
        HAS_MASK=m is not None, SOFTCAP=softcap > 0, WRITE_ROWS=write_rows, MERGE=merge,
        BLOCK_S=_split_block(splits), **_shape_constants(g, d, block, launch),
    )
    return partial, ml, rows, tmax, out, factor


def _attend_impl(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Optional[torch.Tensor],
                 scale: float, softcap: float, write_rows: bool,
                 launch: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _attend_launch(query, key, value, mask, scale, softcap, write_rows, None, launch)[:4]


def _attend_merged_impl(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: Optional[torch.Tensor],
                        scale: float, softcap: float, write_rows: bool,
                        tickets: torch.Tensor, launch: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _, _, rows, _, out, factor = _attend_launch(query, key, value, mask, scale, softcap, write_rows, tickets, launch)
    return out, rows, factor


def _apply_launch(rows, factor, value, tickets, launch, nxt=None, chunk=0):
    b, h, kv_len = rows.shape
    kv_heads, d = value.shape[1], value.shape[3]
    g = h // kv_heads
    block, per_split, splits = plan(b, kv_heads, kv_len, d, value.device, launch)
    partial = torch.empty(b, h, splits, d, device=value.device, dtype=torch.float32)
    merge = tickets is not None
    out = torch.empty(b, h, d if merge else 0, device=value.device, dtype=value.dtype)
    (_decode_apply_kernel if merge else _launch(_decode_apply_kernel))[(b * kv_heads, splits)](
        rows, factor, value, partial, tickets if merge else partial, out, nxt if chunk else partial,
        rows.stride(0), rows.stride(1), value.stride(0), value.stride(1), value.stride(2),
        kv_len, kv_heads, per_split, factor.shape[-1], chunk, MERGE=merge, BLOCK_S=_split_block(splits),
        AHEAD=chunk > 0,
        **_shape_constants(g, d, block, launch),
    )
    return out if merge else partial


def _apply_impl(rows: torch.Tensor, factor: torch.Tensor, value: torch.Tensor, launch: list[int],
                nxt: Optional[torch.Tensor] = None, chunk: int = 0) -> torch.Tensor:
    return _apply_launch(rows, factor, value, None, launch, nxt, chunk)


def _apply_merged_impl(rows: torch.Tensor, factor: torch.Tensor, value: torch.Tensor,
                       tickets: torch.Tensor, launch: list[int]) -> torch.Tensor:
    return _apply_launch(rows, factor, value, tickets, launch)


def _merge_impl(partial: torch.Tensor, ml: torch.Tensor, tmax: torch.Tensor, dtype: torch.dtype,
                nxt: Optional[torch.Tensor] = None, chunk: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    b, h, splits, d = partial.shape
    out = torch.empty(b, h, d, device=partial.device, dtype=dtype)
    factor = torch.empty_like(tmax)
    _launch(_decode_merge_kernel)[(b * h,)](
        partial, ml, tmax, out, factor, nxt if chunk else partial, splits, tmax.shape[-1], chunk,
        D=d, BLOCK_S=_split_block(splits), BLOCK_T=256, WRITE_ROWS=tmax.shape[-1] > 0, AHEAD=chunk > 0,
        num_warps=4,
    )
    return out, factor


if triton is not None and triton_op is not None and not INTERPRET:
    _attend_op = triton_op("uniattn::decode_attend", mutates_args=())(_attend_impl)
    _apply_op = triton_op("uniattn::decode_apply", mutates_args=())(_apply_impl)
    _merge_op = triton_op("uniattn::decode_merge", mutates_args=())(_merge_impl)
else:
    _attend_op, _apply_op, _merge_op = _attend_impl, _apply_impl, _merge_impl

if OPAQUE:
    # Opaque to torch.compile (Triton's own launcher starts them): traced as user kernels, Inductor's
    # analysis of the merge took every argument for mutated and failed on the boolean mask.
    _attend_merged_op = torch.library.custom_op("uniattn::decode_attend_merged",
                                                mutates_args=("tickets",))(_attend_merged_impl)
    _apply_merged_op = torch.library.custom_op("uniattn::decode_apply_merged",
                                               mutates_args=("tickets",))(_apply_merged_impl)

    @_attend_merged_op.register_fake
    def _(query, key, value, mask, scale, softcap, write_rows, tickets, launch):
        b, h, _, d = query.shape
        tiles = plan(b, key.shape[1], key.shape[2], d, query.device, launch)
        return (query.new_empty(b, h, d), value.new_empty(b, h, key.shape[2] if write_rows else 0),
                query.new_empty(b, h, tiles[1] * tiles[2] if write_rows else 0, dtype=torch.float32))

    @_apply_merged_op.register_fake
    def _(rows, factor, value, tickets, launch):
        return value.new_empty(rows.shape[0], rows.shape[1], value.shape[3])
else:
    _attend_merged_op, _apply_merged_op = _attend_merged_impl, _apply_merged_impl


def usable(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask) -> bool:
    """Whether ``decode_attend`` serves this call: one query per sequence, a power-of-two head dimension
    from 16 to 256 (the matrix units' smallest tile), rows contiguous in it, a boolean mask or none,
    and a device the kernels run on."""
    if triton is None or query.shape[2] != 1 or not available(query):
        return False
    if mask is not None and (mask.dtype != torch.bool or mask.dim() != 4):
        return False
    d = key.shape[-1]
    return all(t.stride(-1) == 1 for t in (query, key, value)) and 16 <= d <= 256 and d & (d - 1) == 0


def decode_attend(query, key, value, mask, scale: float, softcap: Optional[float], write_rows: bool,
                  tickets: Optional[torch.Tensor] = None, next_weight: Optional[torch.Tensor] = None):
    """Attention of one query per sequence; ``query`` ``[batch, heads, 1, head_dim]``, ``key``/``value``
    ``[batch, kv_heads, kv_len, head_dim]`` (heads of one KV group adjacent, as in transformers).

    Returns ``(output [batch, 1, heads, head_dim], rows)``; ``rows`` is a ``DecodeRows`` when
    ``write_rows`` (what ``decode_apply`` takes), else ``None``. With ``tickets`` (``batch * kv_heads``
    int32 zeros, left at zero) the last split of each KV group merges the splits in the same kernel.
    ``next_weight`` (the O weight) has its first ``L2_AHEAD["o_mb"]`` MB fetched into L2 by the merge.
    """
    launch = settings(query.device)
    if tickets is not None:
        out, rows, factor = _attend_merged_op(query, key, value, mask, float(scale), float(softcap or 0.0),
                                              bool(write_rows), tickets, launch)
    else:
        partial, ml, rows, tmax = _attend_op(query, key, value, mask, float(scale), float(softcap or 0.0),
                                             bool(write_rows), launch)
        b, h = query.shape[:2]
        out, factor = _merge_op(partial, ml, tmax, query.dtype, next_weight, ahead_chunk(lambda: b * h, next_weight))
    out = out[:, None]
    if not write_rows:
        return out, None
    return out, DecodeRows(rows, factor, block_size(key.shape[3], launch))


def decode_apply(rows: DecodeRows, value: torch.Tensor, tickets: Optional[torch.Tensor] = None,
                 next_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """A follower's ``P @ V`` from a leader's ``decode_attend`` rows; returns ``[batch, 1, heads, head_dim]``.
    With ``tickets`` (as for ``decode_attend``) the splits are summed in the same kernel. ``next_weight``
    (the O weight) has its first ``L2_AHEAD["o_mb"]`` MB fetched into L2 as each program ends."""
    if value.shape[2] != rows.rows.shape[-1]:
        raise ValueError(f"the follower's V cache holds {value.shape[2]} positions but its leader's rows "
                         f"{rows.rows.shape[-1]}: the cache layers of a SuperBlock are out of step")
    launch = settings(value.device)
    if tickets is not None:
        return _apply_merged_op(rows.rows, rows.factor, value, tickets, launch)[:, None]
    b, kv_heads, kv_len = rows.rows.shape[0], value.shape[1], rows.rows.shape[-1]
    chunk = ahead_chunk(lambda: b * kv_heads * plan(b, kv_heads, kv_len, value.shape[3], value.device, launch)[2],
                        next_weight)
    partial = _apply_op(rows.rows, rows.factor, value, launch, next_weight, chunk)
    return partial.sum(2).to(value.dtype)[:, None]
