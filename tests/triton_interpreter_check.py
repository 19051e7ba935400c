"""Run by tests/test_triton_decode.py in a process of its own, under ``TRITON_INTERPRET=1`` with the
Triton interpreter kit on ``PYTHONPATH`` (Triton's interpreter runs the kernels on CPU tensors
through numpy; bf16 is not emulated there, so the checks run in float32 and float16).

Checks the decode kernels against the float64 PyTorch reference; the decode-size product kernel
(``triton_linear``) against a float64 ``F.linear`` and its dispatch (the kernel only where
torch.compile traces); then a tiny model of each family
decoding a left-padded batch token by token with the kernels against one full forward.
Exits non-zero, naming the case, on the first miss.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import conftest  # noqa: E402

from unittest import mock  # noqa: E402

from uniattn.modeling import kernels, triton_decode, triton_linear  # noqa: E402
from uniattn.modeling.kernels import grouped_apply, grouped_probs  # noqa: E402
from uniattn.tools.decode_check import rel, stepwise  # noqa: E402  (the GPU check's decode loop and error)

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
        ref_p = grouped_probs(q.double(), k.double(), mask, d ** -0.5, cap, h // kvh)
        errs = (rel(out, grouped_apply(ref_p, v.double())), rel(rows.dense(), ref_p),
                rel(triton_decode.decode_apply(rows, v2), grouped_apply(ref_p, v2.double())))
        assert max(errs) < tol, f"kernel case {(b, h, kvh, n, d, cap, window, padded, dtype)}: errors {errs}"
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
    # shapes the tiles do not divide, float32 and more than 16 rows stay on F.linear
    half = torch.randn(4, 256).half()
    assert not triton_linear.usable(half, torch.randn(100, 256).half())
    assert not triton_linear.usable(half.float(), torch.randn(256, 256))
    assert not triton_linear.usable(torch.randn(17, 256).half(), torch.randn(256, 256).half())
    assert not triton_linear.usable(half, torch.randn(256, 128).half())  # K mismatch: F.linear raises
    assert not triton_linear.usable(half, torch.randn(256, 256).half(), torch.randn(128).half())
    print("linear: ok", flush=True)


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
    model_cases()
