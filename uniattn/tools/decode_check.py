"""GPU check of the Triton decode kernels against the PyTorch reference path.

    python -m uniattn.tools.decode_check [--out F.md]

1. Kernel level, bf16, fresh random inputs per case: the output, the leader's probability rows and
   a follower's ``P @ V`` against the float64 reference (``grouped_probs`` / ``grouped_apply``), for
   LLaMA / Mistral / Gemma-2 / SmolLM2 head shapes, padded batches, sliding windows, Gemma-2's
   soft-cap and context lengths that are not a multiple of the tile.
   The decode-size product kernel (``triton_linear``) against a float64 ``F.linear`` at LLaMA-3.1-8B
   and Gemma-2-9B product shapes, 1-16 token rows, bf16 and fp16, with and without a bias, and
   launched with PDL (equal to the plain launch, bit for bit).
2. Model level, tiny random models of each family (head_dim 64, float32): token-by-token decode of a
   left-padded batch through a static and a dynamic cache, with the Triton kernels and with the
   PyTorch path, each against one full forward (which never decodes); global and sliding leaders;
   and once more with fused projections (``uniattn.fuse_projections``), the serving path.
3. Compiled: one static-cache decode step under ``torch.compile(mode="reduce-overhead",
   fullgraph=True)`` with the Triton kernels and fused projections, against the eager PyTorch path.

Prints a markdown table and exits 1 if any case misses its tolerance.
"""

from __future__ import annotations

import argparse
import sys

import torch
import transformers
from transformers import AutoModelForCausalLM, DynamicCache, Gemma2Config, LlamaConfig, MistralConfig, StaticCache

import uniattn
from uniattn.convert import uniattn_config_from
from uniattn.io import write_text
from uniattn.modeling import decode_layer, kernels, triton_decode, triton_linear, triton_qkv
from uniattn.modeling.fused import fuse_projections, unfuse_projections
from uniattn.modeling.kernels import grouped_apply, grouped_probs

# (name, batch, heads, kv_heads, kv_len, head_dim, softcap, window, padded)
KERNEL_CASES = [
    ("llama 8/16k", 8, 32, 8, 16384, 128, None, None, False),
    ("llama 1/4k+5", 1, 32, 8, 4101, 128, None, None, False),
    ("llama 4/32k padded", 4, 32, 8, 32768, 128, None, None, True),
    ("mistral window 4k", 2, 32, 8, 6000, 128, None, 4096, True),
    ("gemma2 softcap", 2, 16, 8, 4096, 256, 50.0, None, True),
    ("gemma2 sliding", 3, 16, 8, 4096, 256, 50.0, 4000, False),
    ("smollm2 9/3 heads", 3, 9, 3, 1000, 64, None, None, True),
]
# (name, N, K): product shapes of LLaMA-3.1-8B and Gemma-2-9B
LINEAR_CASES = [("llama q+k+v", 6144, 4096), ("llama o", 4096, 4096), ("llama gate+up", 28672, 4096),
                ("llama down", 4096, 14336), ("llama head", 128256, 4096), ("gemma2 q+k+v", 8192, 3584),
                ("gemma2 o", 3584, 4096), ("gemma2 down", 3584, 14336)]
BF16_TOL = 2e-2  # relative L2 error; bf16 operands land between 1e-3 and 1e-2
MODEL_TOL = 5e-3  # float32 models: the kernel's dots run in tf32


def _mask(batch, kv_len, window, padded, device):
    if window is None and not padded:
        return None
    mask = torch.ones(batch, 1, 1, kv_len, dtype=torch.bool, device=device)
    if window is not None:
        mask[..., : kv_len - window] = False
    if padded:
        for b in range(batch):
            mask[b, ..., : int(torch.randint(0, kv_len // 2, ()))] = False
    return mask


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def kernel_rows():
    rows = []
    for name, b, h, kvh, n, d, cap, window, padded in KERNEL_CASES:
        dev = "cuda"
        q = torch.randn(b, h, 1, d, device=dev, dtype=torch.bfloat16)
        k, v, v2 = (torch.randn(b, kvh, n, d, device=dev, dtype=torch.bfloat16) for _ in range(3))
        mask = _mask(b, n, window, padded, dev)
        scale = d ** -0.5
        out, dec = triton_decode.decode_attend(q, k, v, mask, scale, cap, write_rows=True)
        plain, none = triton_decode.decode_attend(q, k, v, mask, scale, cap, write_rows=False)
        follower = triton_decode.decode_apply(dec, v2)
        # the splits merged by the last split of each KV group (the fused decode layer's way)
        tickets = torch.zeros(b * kvh, dtype=torch.int32, device=dev)
        merged, mdec = triton_decode.decode_attend(q, k, v, mask, scale, cap, write_rows=True, tickets=tickets)
        mfollower = triton_decode.decode_apply(mdec, v2, tickets=tickets)
        ref_p = grouped_probs(q.double(), k.double(), mask, scale, cap, h // kvh)
        errs = {"output": rel(out, grouped_apply(ref_p, v.double())), "rows": rel(dec.dense(), ref_p),
                "follower": rel(follower, grouped_apply(ref_p, v2.double())),
                "no-rows output": rel(plain, grouped_apply(ref_p, v.double())),
                "merged output": rel(merged, grouped_apply(ref_p, v.double())),
                "merged rows": rel(mdec.dense(), ref_p),
                "merged follower": rel(mfollower, grouped_apply(ref_p, v2.double()))}
        ok = (none is None and all(e < BF16_TOL for e in errs.values()) and not out.isnan().any()
              and not merged.isnan().any() and not tickets.any())
        rows.append((f"kernel: {name}", errs, ok))
    return rows


@torch.no_grad()  # the kernel serves inference only
def linear_rows():
    rows = []
    for (name, n, k), m, dtype in zip(LINEAR_CASES, (1, 8, 16, 5, 8, 3, 1, 12),
                                      (torch.bfloat16,) * 6 + (torch.float16,) * 2):
        x = torch.randn(2, m, k, device="cuda", dtype=dtype)[1]  # rows that do not start the storage
        w = torch.randn(n, k, device="cuda", dtype=dtype) * k ** -0.5
        bias = torch.randn(n, device="cuda", dtype=dtype) if name.endswith("o") else None
        ref = torch.nn.functional.linear(x.double(), w.double(), None if bias is None else bias.double())
        saved = dict(triton_linear.PDL)
        try:
            got = triton_linear._linear_op(x, w, bias)  # the kernel itself: linear() takes it only when compiled
            triton_linear.PDL.update(on=True)
            pdl = triton_linear._linear_op(x, w, bias)
        finally:
            triton_linear.PDL.update(saved)
        errs = {"output": rel(got, ref)}
        ok = triton_linear.usable(x, w, bias) and errs["output"] < BF16_TOL and torch.equal(got, pdl)
        rows.append((f"product: {name}, {m} rows, {str(dtype)[6:]}{', bias' if bias is not None else ''}", errs, ok))
    return rows


def rmsnorm64(x, weight, eps):
    """LLaMA's RMSNorm in float64 (the fused kernels' reference)."""
    x = x.double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.double()


def rope64(t, cos, sin):
    """RoPE (``rotate_half``) in float64 of ``t`` ``[rows, heads, head_dim]``, ``cos``/``sin`` ``[rows, head_dim]``."""
    d = t.shape[-1]
    half = torch.cat([-t[..., d // 2:], t[..., :d // 2]], -1)
    return t * cos.double()[:, None] + half * sin.double()[:, None]


@torch.no_grad()
def fused_rows():
    """The fused decode layer's kernels at LLaMA-3.1-8B's shapes (bf16, 8 rows) against float64: the
    products with RMSNorm, SiLU gating and residuals, and the Q/K/V / W_c+V projection with RoPE and
    the static-cache write (which must advance the position counter and leave its ticket at zero)."""
    rows, dev, dt, m = [], "cuda", torch.bfloat16, 8
    hidden, inter, heads, kv_heads, d, max_len = 4096, 14336, 32, 8, 128, 64

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, device=dev, dtype=dt) * scale

    x, res, extra = rand(m, hidden), rand(m, hidden), rand(m, hidden)
    g = 1 + rand(hidden, scale=0.1)
    w_o, w_gu, w_down = rand(hidden, hidden, scale=hidden ** -0.5), rand(2 * inter, hidden, scale=hidden ** -0.5), \
        rand(hidden, inter, scale=inter ** -0.5)
    xn = rmsnorm64(x, g, 1e-5)
    got = triton_linear.fused_linear(x, w_o, None, residual=res, extra=extra)
    errs = {"O + residual + W_c u": rel(got, res.double() + extra.double() + x.double() @ w_o.double().T)}
    gu = xn @ w_gu.double().T
    got = triton_linear.fused_linear(x, w_gu, None, norm=(g, 1e-5), gated=True)
    errs["norm, gate+up, SiLU"] = rel(got, torch.nn.functional.silu(gu[:, :inter]) * gu[:, inter:])
    act = rand(m, inter)
    got = triton_linear.fused_linear(act, w_down, None, residual=res)
    errs["down + residual"] = rel(got, res.double() + act.double() @ w_down.double().T)
    rows.append(("fused products: LLaMA-3.1-8B, 8 rows, bf16", errs, all(e < BF16_TOL for e in errs.values())))

    cos, sin = rand(m, d), rand(m, d)

    def rope(t):
        return rope64(t, cos, sin)

    for name, n_out, n_k in (("Q/K/V", heads, kv_heads), ("follower W_c/V", hidden // d, 0)):
        w = rand((n_out + n_k + kv_heads) * d, hidden, scale=hidden ** -0.5)
        keys = torch.zeros(m, kv_heads, max_len, d if n_k else 0, device=dev, dtype=dt)
        values = torch.zeros(m, kv_heads, max_len, d, device=dev, dtype=dt)
        counter = torch.tensor(37, device=dev)
        ticket = torch.zeros(1, dtype=torch.int32, device=dev)
        out = triton_qkv.project(x, w, None, (g, 1e-5), cos, sin, keys, values, counter, ticket,
                                 n_out=n_out, rope_out=n_k > 0, n_k=n_k, head_dim=d)
        y = (xn @ w.double().T).view(m, -1, d)
        want_out = rope(y[:, :n_out]) if n_k else y[:, :n_out]
        errs = {"out": rel(out.view(m, n_out, d), want_out), "V written": rel(values[:, :, 37], y[:, n_out + n_k:])}
        if n_k:
            errs["K written"] = rel(keys[:, :, 37], rope(y[:, n_out:n_out + n_k]))
        untouched = not values[:, :, :37].any() and not values[:, :, 38:].any()
        ok = all(e < BF16_TOL for e in errs.values()) and untouched and counter.item() == 38 and not ticket.any()
        rows.append((f"projection to the cache: {name}, 8 rows, bf16", errs, ok))
    return rows


def tiny_model(family, layout):
    common = dict(vocab_size=101, hidden_size=256, intermediate_size=512, num_hidden_layers=5,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=512,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg = {"llama": lambda: LlamaConfig(**common),
           "mistral": lambda: MistralConfig(**common, sliding_window=7),
           "gemma2": lambda: Gemma2Config(**common, sliding_window=7, query_pre_attn_scalar=64,
                                          attn_logit_softcapping=3.0, final_logit_softcapping=5.0)}[family]()
    torch.manual_seed(0)
    stock = AutoModelForCausalLM.from_config(cfg)
    ucfg = uniattn_config_from(cfg, layout)
    model = uniattn.UNIATTN_FAMILIES[family][1](ucfg)
    model.load_state_dict(stock.state_dict(), strict=False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.cuda().eval()


def stepwise(model, ids, mask, cache_kind, prefix=3):
    """Logits of a token-by-token decode of a left-padded batch after a ``prefix``-token prefill."""
    b, t = ids.shape
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = StaticCache(config=model.config, max_cache_len=t + 3) if cache_kind == "static" else DynamicCache(
        config=model.config)
    out = model(ids[:, :prefix], attention_mask=mask[:, :prefix], position_ids=pos[:, :prefix],
                past_key_values=cache, use_cache=True)
    steps = [out.logits]
    for i in range(prefix, t):
        out = model(ids[:, i:i + 1], attention_mask=mask[:, :i + 1], position_ids=pos[:, i:i + 1],
                    past_key_values=cache, use_cache=True)
        steps.append(out.logits)
    return torch.cat(steps, 1)


def model_rows():
    rows = []
    ids = torch.randint(3, 101, (3, 24), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :5], mask[2, :11] = 0, 0
    ids[mask == 0] = 0
    real = mask.bool()
    for family in ("llama", "mistral", "gemma2"):
        for layout in ((2, 1, 6), (2, 0, 6)):
            model = tiny_model(family, layout)
            with torch.no_grad():
                full = model(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
                errs = {}
                launches = {"auto": 0, "torch": 0}
                attend = triton_decode.decode_attend
                for cache_kind in ("static", "dynamic"):
                    for kernel in ("auto", "torch"):
                        kernels.set_decode_kernel(kernel)

                        def counted(*a, _kernel=kernel, **kw):
                            launches[_kernel] += 1
                            return attend(*a, **kw)
                        triton_decode.decode_attend = counted
                        try:
                            got = stepwise(model, ids, mask, cache_kind)
                        finally:
                            triton_decode.decode_attend = attend
                        errs[f"{cache_kind} {'triton' if kernel == 'auto' else 'torch'}"] = rel(got[real], full[real])
                kernels.set_decode_kernel("auto")
                fuse_projections(model)  # the serving path: fused projections on top of the kernels
                try:
                    errs["static triton fused"] = rel(stepwise(model, ids, mask, "static")[real], full[real])
                finally:
                    unfuse_projections(model)
            # the Triton runs must have used the kernels, the PyTorch runs never
            ok = all(e < MODEL_TOL for e in errs.values()) and launches["auto"] > 0 and launches["torch"] == 0
            rows.append((f"model: {family} {' '.join(map(str, layout))}", errs, ok))
    return rows


def compiled_rows():
    """One compiled static-cache step with the Triton kernels and fused projections, with the fused
    decode layer (``decode_layer``) and without it, against the eager PyTorch path."""
    model = tiny_model("llama", (2, 1, 6)).to(torch.bfloat16)
    ids = torch.randint(3, 101, (4, 40), device="cuda")
    cache = StaticCache(config=model.config, max_cache_len=48)
    step_ids, step_pos = ids[:, -1:], torch.full((4, 1), 39, device="cuda")
    rows = []
    with torch.no_grad():
        model(ids[:, :39], past_key_values=cache, use_cache=True)

        def step():
            for layer in cache.layers:  # decode the same position again
                layer.cumulative_length.fill_(39)
            return model(input_ids=step_ids, position_ids=step_pos, past_key_values=cache, use_cache=True).logits

        kernels.set_decode_kernel("torch")
        ref = step().clone()
        kernels.set_decode_kernel("auto")
        fuse_projections(model)
        saved = decode_layer._mode
        try:
            for mode, name in (("auto", "fused decode layer"), ("torch", "stock layer forward")):
                decode_layer._mode = mode
                torch._dynamo.reset()
                compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)
                for _ in range(3):
                    got = compiled().clone()
                err = rel(got, ref)
                counters = {int(layer.cumulative_length) for layer in cache.layers}
                tickets = any(t.any() for n, t in model.named_buffers() if "ticket" in n)
                rows.append((f"compiled static decode, fused projections, {name} (bf16)", {"logits": err},
                             err < BF16_TOL and counters == {40} and not tickets))
        finally:
            decode_layer._mode = saved
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="also write the table here (markdown)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available() or triton_decode.triton is None:
        print("error: the check needs a CUDA GPU and Triton", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    rows = []
    for part in (kernel_rows, linear_rows, fused_rows, model_rows, compiled_rows):
        try:
            got = part()
        except Exception as e:  # report the part as failed and go on with the others
            got = [(part.__name__, {f"error {type(e).__name__}: {str(e)[:200]}": float("nan")}, False)]
        for row in got:
            print(row, flush=True)
        rows += got
    lines = [f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}, transformers "
             f"{transformers.__version__}, triton {triton_decode.triton.__version__}", "",
             "| case | relative L2 errors | pass |", "|---|---|---|"]
    for name, errs, ok in rows:
        lines.append(f"| {name} | {', '.join(f'{k} {v:.1e}' for k, v in errs.items())} | {'yes' if ok else 'NO'} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        write_text(args.out, text)
    return 0 if all(ok for _, _, ok in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
