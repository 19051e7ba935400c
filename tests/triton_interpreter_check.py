"""Run by tests/test_triton_decode.py in a process of its own, under ``TRITON_INTERPRET=1`` with the
Triton interpreter kit on ``PYTHONPATH`` (Triton's interpreter runs the kernels on CPU tensors
through numpy; bf16 is not emulated there, so the checks run in float32 and float16).

Checks the decode kernels against the float64 PyTorch reference (their splits merged by a second
kernel and by their own last split); the decode-size product kernel (``triton_linear``) against a
float64 ``F.linear`` and its dispatch (the kernel only where torch.compile traces); the fused
decode layer's kernels (``fused_linear``'s norm, gating and residuals, ``triton_qkv.project``) and
the layer itself in tiny LLaMA / Mistral models; then a tiny model of each family
decoding a left-padded batch token by token with the kernels against one full forward.
Exits non-zero, naming the case, on the first miss.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import conftest  # noqa: E402

from unittest import mock  # noqa: E402

from uniattn.modeling import kernels, triton_decode, triton_linear, triton_qkv  # noqa: E402
from uniattn.modeling.kernels import grouped_apply, grouped_probs  # noqa: E402
from uniattn.tools.decode_check import rel, rmsnorm64, rope64, stepwise  # noqa: E402  (the GPU check's helpers)

assert triton_decode.INTERPRET and triton_decode.triton is not None, "needs TRITON_INTERPRET=1 and Triton"


def kernel_cases():
    g = torch.Generator().manual_seed(0)
    # (batch, heads, kv_heads, kv_len, head_dim, softcap, window, padded, dtype, tolerance)
    cases = [(2, 8, 2, 100, 64, None, None, False, torch.float32, 1e-5),
             (3, 9, 3, 200, 64, None, None, True, torch.float32, 1e-5),
             (1, 4, 2, 70, 256, 50.0, 40, False, torch.float32, 1e-5),
             (2, 8, 8, 129, 128, None, None, True, torch.float16, 2e-3)]
    for b, h, kvh, n, d, cap, window, padded, dtype, tol in cases:
        q = torch.randn(b, h, 1, d, generator=g).to(dtype)
        k, v, v2 = (torch.randn(b, kvh, n, d, generator=g).to(dtype) for _ in range(3))
        mask = torch.ones(b, 1, 1, n, dtype=torch.bool)
        if window:
            mask[..., : n - window] = False
        if padded:
            for i in range(b):
                mask[i, ..., : int(torch.randint(0, n // 2, (), generator=g))] = False
        out, rows = triton_decode.decode_attend(q, k, v, mask, d ** -0.5, cap, write_rows=True)
        tickets = torch.zeros(b * kvh, dtype=torch.int32)  # the splits merged by each group's last split
        merged, mrows = triton_decode.decode_attend(q, k, v, mask, d ** -0.5, cap, write_rows=True, tickets=tickets)
        ref_p = grouped_probs(q.double(), k.double(), mask, d ** -0.5, cap, h // kvh)
        ref_o, ref_f = grouped_apply(ref_p, v.double()), grouped_apply(ref_p, v2.double())
        errs = (rel(out, ref_o), rel(rows.dense(), ref_p), rel(triton_decode.decode_apply(rows, v2), ref_f),
                rel(merged, ref_o), rel(mrows.dense(), ref_p),
                rel(triton_decode.decode_apply(mrows, v2, tickets), ref_f))
        assert max(errs) < tol, f"kernel case {(b, h, kvh, n, d, cap, window, padded, dtype)}: errors {errs}"
        assert not tickets.any(), "tickets left non-zero"
    # min_tiles: on the interpreter's 8 "SMs", 200 positions at head_dim 64 are 4 tiles, planned as one
    # per split; at least 3 per split makes 2 splits, the second partial.
    saved = dict(triton_decode.CONFIG)
    try:
        triton_decode.CONFIG.update(programs_per_sm=8, block_n=64, min_tiles=1)
        assert triton_decode.plan(3, 3, 200, 64, torch.device("cpu")) == (64, 1, 4)
        triton_decode.CONFIG["min_tiles"] = 3
        assert triton_decode.plan(3, 3, 200, 64, torch.device("cpu")) == (64, 3, 2)
        assert triton_decode.plan(1, 1, 100, 64, torch.device("cpu")) == (64, 2, 1)  # fewer tiles than that: one split
        q, k, v = (torch.randn(3, 9 if i == 0 else 3, 1 if i == 0 else 200, 64, generator=g) for i in range(3))
        mask = torch.ones(3, 1, 1, 200, dtype=torch.bool)
        mask[1, ..., :70] = False
        out, rows = triton_decode.decode_attend(q, k, v, mask, 0.125, None, write_rows=True)
        ref_p = grouped_probs(q.double(), k.double(), mask, 0.125, None, 3)
        errs = (rel(out, grouped_apply(ref_p, v.double())), rel(rows.dense(), ref_p),
                rel(triton_decode.decode_apply(rows, v), grouped_apply(ref_p, v.double())))
        assert max(errs) < 1e-5, f"min_tiles 3: errors {errs}"
    finally:
        triton_decode.CONFIG.update(saved)
    # A query that may attend to nothing (a padding position) gets zeros, never NaN.
    q, k = torch.randn(2, 4, 1, 16), torch.randn(2, 2, 70, 16)
    mask = torch.ones(2, 1, 1, 70, dtype=torch.bool)
    mask[1] = False
    out, rows = triton_decode.decode_attend(q, k, k, mask, 0.25, None, write_rows=True)
    assert torch.isfinite(out).all() and not out[1].any() and not rows.dense()[1].any(), "fully masked row"
    print("kernels: ok", flush=True)


def linear_cases():
    g = torch.Generator().manual_seed(1)
    # (rows, N, K, bias, row stride of x): 1-16 rows, a 64-column and a 128-wide-K tiling, strided rows
    for m, n, k, bias, stride in ((1, 512, 256, False, 256), (5, 6144, 512, True, 512), (16, 256, 384, False, 400),
                                  (3, 16384, 128, True, 128)):
        x = torch.randn(m, stride, generator=g).half()[:, :k]
        w = (torch.randn(n, k, generator=g) * k ** -0.5).half()
        b = torch.randn(n, generator=g).half() if bias else None
        ref = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
        assert triton_linear.usable(x, w, b), (m, n, k)
        err = rel(triton_linear._linear_op(x, w, b), ref)
        assert err < 2e-3, f"linear kernel {m} rows {n} x {k}: {err:.2e}"
        with torch.no_grad():
            # eager: F.linear itself; where torch.compile traces: the kernel
            assert torch.equal(triton_linear.linear(x, w, b), torch.nn.functional.linear(x, w, b))
            with mock.patch("torch.compiler.is_compiling", return_value=True):
                got = triton_linear.linear(x[None], w, b)
            assert got.shape == (1, m, n) and rel(got[0], ref) < 2e-3, (m, n, k)
    # launch settings of triton_linear.TILES (tools.linear_sweep's picks) for the product and the projection
    x, w = torch.randn(3, 256, generator=g).half(), (torch.randn(512, 256, generator=g) / 16).half()
    triton_linear.TILES["linear", 512, 256] = (16, 128, 2, 8)
    try:
        assert rel(triton_linear._linear_op(x, w, None), x.double() @ w.double().T) < 2e-3, "TILES override"
    finally:
        triton_linear.TILES.clear()
    # shapes the tiles do not divide, float32 and more than 16 rows stay on F.linear
    half = torch.randn(4, 256).half()
    assert not triton_linear.usable(half, torch.randn(100, 256).half())
    assert not triton_linear.usable(half.float(), torch.randn(256, 256))
    assert not triton_linear.usable(torch.randn(17, 256).half(), torch.randn(256, 256).half())
    assert not triton_linear.usable(half, torch.randn(256, 128).half())  # K mismatch: F.linear raises
    assert not triton_linear.usable(half, torch.randn(256, 256).half(), torch.randn(128).half())
    print("linear: ok", flush=True)


def fused_cases():
    """``triton_linear.fused_linear``'s norm, gating and residuals, and ``triton_qkv.project``."""
    g = torch.Generator().manual_seed(2)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).half()

    m, k, n = 5, 512, 512
    x, res, extra, nw = rand(m, k), rand(m, n), rand(m, n), 1 + rand(k, scale=0.1)
    w, wg, bias, bias_g = rand(n, k, scale=k ** -0.5), rand(2 * n, k, scale=k ** -0.5), rand(n), rand(2 * n)
    xn = rmsnorm64(x, nw, 1e-5)
    got = triton_linear.fused_linear(x, w, bias, residual=res, extra=extra)
    assert rel(got, res.double() + extra.double() + x.double() @ w.double().T + bias.double()) < 2e-3, "residual"
    gu = xn @ wg.double().T + bias_g.double()
    want = torch.nn.functional.silu(gu[:, :n]) * gu[:, n:]
    for ahead in (True, False):
        triton_linear.NORM_PREFETCH["on"] = ahead
        got = triton_linear.fused_linear(x, wg, bias_g, norm=(nw, 1e-5), gated=True)
        assert got.shape == (m, n) and rel(got, want) < 2e-3, f"norm + gated, operand ahead {ahead}: {rel(got, want)}"
    triton_linear.NORM_PREFETCH["on"] = True
    # Q/K/V and a follower's W_c/V: RoPE on Q and K, K and V written at the counter, which advances
    b, heads, kv_heads, max_len, hidden = 3, 4, 2, 10, 256
    x, nw = rand(b, hidden), 1 + rand(hidden, scale=0.1)
    tables = {d: (rand(b, d), rand(b, d)) for d in (64, 32)}

    def rope(t):
        return rope64(t, cos, sin)

    # head 64: programs of 64 columns (two 32-column halves); head 32: config's tile halved to fit it
    for d, n_out, n_k, norm in ((64, heads, kv_heads, (nw, 1e-6)), (64, hidden // 64, 0, (nw, 1e-6)),
                                (64, heads, kv_heads, None), (32, heads, kv_heads, None)):
        cos, sin = tables[d]
        w = rand((n_out + n_k + kv_heads) * d, hidden, scale=hidden ** -0.5)
        bias = rand(w.shape[0])
        keys = torch.zeros(b, kv_heads, max_len, d if n_k else 0).half()
        values = torch.zeros(b, kv_heads, max_len, d).half()
        counter, ticket = torch.tensor(4), torch.zeros(1, dtype=torch.int32)
        out = triton_qkv.project(x, w, bias, norm, cos, sin, keys, values, counter, ticket, n_out=n_out,
                                 rope_out=n_k > 0, n_k=n_k, head_dim=d)
        y = ((rmsnorm64(x, *norm) if norm else x.double()) @ w.double().T + bias.double()).view(b, -1, d)
        case = (d, n_out, n_k, norm is not None)
        assert rel(out.view(b, n_out, d), rope(y[:, :n_out]) if n_k else y[:, :n_out]) < 2e-3, f"project out {case}"
        assert rel(values[:, :, 4], y[:, n_out + n_k:]) < 2e-3, f"project V {case}"
        if n_k:
            assert rel(keys[:, :, 4], rope(y[:, n_out:n_out + n_k])) < 2e-3, f"project K {case}"
        assert not values[:, :, :4].any() and not values[:, :, 5:].any(), f"project wrote elsewhere {case}"
        assert counter.item() == 5 and not ticket.any(), f"project counter / ticket {case}"
    assert not triton_qkv.usable(x.float(), w.float(), d, keys.float(), values.float())  # 16-bit only
    assert not triton_qkv.usable(x, w, 48, keys, values)  # head halves the tiles do not divide
    print("fused: ok", flush=True)


def layer_cases():
    """The fused decode layer (``decode_layer``), taken as where torch.compile traces, decoding a
    left-padded batch token by token in float16: as close to a float32 decode as the float16 stock
    forward is, and every layer of every step through ``triton_qkv.project``."""
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig

    import uniattn
    from uniattn.convert import uniattn_config_from
    from uniattn.modeling import decode_layer, triton_qkv
    from uniattn.modeling.fused import fuse_projections

    common = dict(vocab_size=101, hidden_size=256, intermediate_size=512, num_hidden_layers=5,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=512,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    ids = torch.randint(3, 101, (3, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :2], mask[2, :4] = 0, 0
    ids[mask == 0] = 0
    real = mask.bool()
    cases = [("llama, biases, UniAttn 2 1 6", LlamaConfig(**common, attention_bias=True, mlp_bias=True), (2, 1, 6), {}),
             ("mistral, UniAttn 2 0 6, every fusion", MistralConfig(**common, sliding_window=None), (2, 0, 6),
              {"norm": True, "gated": True, "residual": True, "merge": True}),
             ("llama, stock", LlamaConfig(**common), None, {})]
    saved = dict(decode_layer.FUSE)
    for name, cfg, layout, fuse in cases:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg)
        if layout is not None:
            uni = uniattn.UNIATTN_FAMILIES[cfg.model_type][1](uniattn_config_from(cfg, layout))
            uni.load_state_dict(model.state_dict(), strict=False)
            model = uni
        else:
            model.set_attn_implementation(kernels.GROUPED_SDPA)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        model.eval()
        calls = []
        project = triton_qkv.project
        try:
            with torch.no_grad():
                ref32 = stepwise(model, ids, mask, "static", prefix=4)
                ref16 = stepwise(model.half(), ids, mask, "static", prefix=4)
                fuse_projections(model)
                decode_layer.FUSE.update(fuse)
                triton_qkv.project = lambda *a, **k: calls.append(1) or project(*a, **k)
                with mock.patch.object(decode_layer, "_traced", return_value=True):
                    got = stepwise(model, ids, mask, "static", prefix=4)
        finally:
            triton_qkv.project = project
            decode_layer.FUSE.update(saved)
        stock_err, err = rel(ref16[real], ref32[real]), rel(got[real], ref32[real])
        assert err < max(1.5 * stock_err, 1e-3), f"{name}: fused layer {err:.2e}, float16 stock {stock_err:.2e}"
        assert len(calls) == 5 * 5, f"{name}: {len(calls)} projections for 5 steps of 5 layers"
    print("layers: ok", flush=True)


def model_cases():
    conftest._COMMON["head_dim"] = 16  # the kernels need a power-of-two head_dim of at least 16
    ids, mask = conftest.random_batch(batch=3, length=14, padding="left", seed=10)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    real = mask.bool()
    for family in conftest.FAMILIES:
        for layout in ((2, 1, 6), (2, 0, 6)):
            _, uni = conftest.make_pair(family, attn="sdpa", seed=9, layout=layout)
            calls = {"rows": 0, "apply": 0}
            attend, apply = triton_decode.decode_attend, triton_decode.decode_apply

            def counted_attend(*a, **kw):
                calls["rows"] += bool(kw.get("write_rows"))
                return attend(*a, **kw)

            def counted_apply(*a, **kw):
                calls["apply"] += 1
                return apply(*a, **kw)

            triton_decode.decode_attend, triton_decode.decode_apply = counted_attend, counted_apply
            try:
                with torch.no_grad():
                    full = uni(ids, attention_mask=mask, position_ids=pos).logits
                    for kind in ("static", "dynamic"):
                        err = rel(stepwise(uni, ids, mask, kind, prefix=3)[real], full[real])
                        assert err < 1e-5, f"{family} {layout} {kind} cache: decode vs full forward {err:.2e}"
            finally:
                triton_decode.decode_attend, triton_decode.decode_apply = attend, apply
            # 11 decode steps x 2 caches: each leader with followers writes rows, each follower reads them.
            lay = uni.config.superblock_layout
            leaders = {lay.leader_of(f) for f in lay.followers}
            assert calls["rows"] == 22 * len(leaders) and calls["apply"] == 22 * len(lay.followers), (
                family, layout, calls)
    print("models: ok", flush=True)


if __name__ == "__main__":
    kernels.set_decode_kernel("auto")
    kernel_cases()
    with torch.no_grad():
        linear_cases()
        fused_cases()
    layer_cases()
    model_cases()
