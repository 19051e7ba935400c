"""KV-cache bytes of UniAttn against its base model: from two checkpoints, or by context length from a config.

    python -m uniattn.tools.kv_report BASE_DIR UNIATTN_DIR [--tokens 1024 --batch 1]
    python -m uniattn.tools.kv_report MODEL --layouts "4 21 43" [--contexts 4096 16384 32768] [--exact]

The first form prefills the same random prompt through both models with a
``DynamicCache`` and prints cache bytes, parameters and the ratios.

The second form needs no weights: MODEL is a shape preset (gemma2-2b,
gemma2-9b, gemma2-27b, mistral-7b, llama3.1-8b) or a checkpoint directory
(its config only; a UniAttn checkpoint brings its own layout). For the stock
config and each layout it builds the real transformers ``DynamicCache``
(followers made V-only by ``make_value_only``), feeds every layer ``context``
tokens of K/V through ``cache.update`` on the meta device, and counts the bytes
each layer keeps: a sliding layer keeps what its cache class keeps, and a
follower keeps its leader's window. Where a model mixes sliding and global
layers (Gemma-2), each layout whose leaders are all of one type is paired with
the nearest layout whose leaders are of the other type (``--exact``: only the
layouts given). Prints a markdown table of KV bytes per token (bf16 unless
``--dtype``, batch 1).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers import DynamicCache, Gemma2Config, LlamaConfig, MistralConfig

from ..loading import load_causal_lm
from ..modeling.cache import cache_nbytes, make_value_only
from ..modeling.layout import SuperBlockLayout

# superblock_sharing -> the name of the arm in the table
LABELS = {"softmax": "UniAttn", "kv": "CLA", "drop": "drop (LLMDrop)"}
SOFTMAX_ONLY = "softmax-only (no W_c)"  # superblock_compensation=False: Softmax unification only
CONTEXTS = (4096, 16384, 32768)
LIMIT = 1 << 20  # longest context searched for the break-even point
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

# Shapes of the public configs (only what the cache and a config need; no weights exist here).
_GEMMA2 = dict(vocab_size=256000, max_position_embeddings=8192, sliding_window=4096)
PRESETS = {
    "gemma2-2b": (Gemma2Config, dict(_GEMMA2, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                                     num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                                     query_pre_attn_scalar=256)),
    "gemma2-9b": (Gemma2Config, dict(_GEMMA2, hidden_size=3584, intermediate_size=14336, num_hidden_layers=42,
                                     num_attention_heads=16, num_key_value_heads=8, head_dim=256,
                                     query_pre_attn_scalar=256)),
    "gemma2-27b": (Gemma2Config, dict(_GEMMA2, hidden_size=4608, intermediate_size=36864, num_hidden_layers=46,
                                      num_attention_heads=32, num_key_value_heads=16, head_dim=128,
                                      query_pre_attn_scalar=144)),
    # Mistral-7B-v0.1: every layer slides over 4096 tokens (v0.2 / v0.3 dropped the window)
    "mistral-7b": (MistralConfig, dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                       num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                                       sliding_window=4096, max_position_embeddings=32768)),
    "llama3.1-8b": (LlamaConfig, dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                      rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
                                      max_position_embeddings=131072)),
}


def arm_label(sharing: str, compensation: bool = True) -> str:
    if sharing == "softmax" and not compensation:
        return SOFTMAX_ONLY
    return LABELS.get(sharing, "UniAttn")


# ------------------------------------------------------------------ by context, from a config
def filled_cache(config, context: int, dtype=torch.bfloat16, batch: int = 1) -> DynamicCache:
    """The ``DynamicCache`` a model of ``config`` builds (V-only followers for a UniAttn config) after every
    layer's ``update`` with ``context`` tokens; meta tensors, so 32k tokens on 46 layers cost no memory."""
    cache = DynamicCache(config=config)
    layout = getattr(config, "superblock_layout", None)
    if layout is not None:  # what the model's forward does to every cache it gets
        make_value_only(cache, layout, keep_values=config.superblock_sharing == "softmax")
    hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv = torch.empty(batch, config.num_key_value_heads, context, hd, dtype=dtype, device="meta")
    for layer in cache.layers:
        layer.update(kv, kv)
    return cache


def cache_bytes(config, context: int, dtype=torch.bfloat16) -> int:
    """Bytes the transformers cache of ``config`` holds after ``context`` tokens (batch 1)."""
    return cache_nbytes(filled_cache(config, context, dtype))


def sliding_layers(config) -> list[bool]:
    """Which layers of ``config`` get a sliding-window cache layer (the cache class decides, not a formula)."""
    return [bool(getattr(layer, "is_sliding", False)) for layer in DynamicCache(config=config).layers]


def has_window(config) -> bool:
    return any(sliding_layers(config))


def leader_kind(layout: SuperBlockLayout, sliding: list[bool]) -> str:
    n = sum(sliding[i] for i in layout.leaders)
    if n in (0, len(layout.leaders)):
        return "sliding" if n else "global"
    return f"mixed ({len(layout.leaders) - n} global, {n} sliding)"


def counterpart(layout: SuperBlockLayout, sliding: list[bool]) -> SuperBlockLayout | None:
    """The layout with B shifted by one (E with it, capped at layers + 1) whose leaders all have the other
    layer type, keeping the follower count closest (ties: B + 1); None when there is no such choice."""
    kind = leader_kind(layout, sliding)
    if len(set(sliding)) < 2 or kind.startswith("mixed"):
        return None
    best = None
    for d in (1, -1):
        try:
            cand = SuperBlockLayout(layout.size, layout.begin + d, min(layout.end + d, layout.num_layers + 1),
                                    layout.num_layers)
        except ValueError:
            continue
        if leader_kind(cand, sliding) != ("global" if kind == "sliding" else "sliding"):
            continue
        if best is None or abs(len(cand.followers) - len(layout.followers)) < abs(len(best.followers) - len(layout.followers)):
            best = cand
    return best


def break_even(stock_config, uconfig, dtype=torch.bfloat16, limit: int = LIMIT) -> int | None:
    """The shortest context at which the UniAttn cache holds at least the stock bytes (None: not up to
    ``limit``). Within the window UniAttn holds less (followers drop K); past it the difference is linear
    in the context, so it changes sign once at most and bisection finds the crossing."""
    grows = lambda t: cache_bytes(uconfig, t, dtype) >= cache_bytes(stock_config, t, dtype)
    if not grows(limit):
        return None
    lo, hi = 0, limit  # grows(lo) is False (an empty cache counts as not grown), grows(hi) True
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if grows(mid) else (mid, hi)
    return hi


def by_context(stock_config, layouts, contexts=CONTEXTS, dtype=torch.bfloat16) -> list[dict]:
    """One row per layout and context: stock and UniAttn KV bytes per token, measured on the caches."""
    from ..convert import uniattn_config_from

    sliding = sliding_layers(stock_config)
    stock = {t: cache_bytes(stock_config, t, dtype) for t in contexts}
    rows = []
    for layout in layouts:
        uconfig = uniattn_config_from(stock_config, (layout.size, layout.begin, layout.end), "softmax")
        even = break_even(stock_config, uconfig, dtype)
        for t in contexts:
            uni = cache_bytes(uconfig, t, dtype)
            rows.append({"layout": str(layout), "leaders": leader_kind(layout, sliding),
                         "followers": len(layout.followers),
                         "followers_were_sliding": sum(sliding[i] for i in layout.followers),
                         "context": t, "stock": stock[t] / t, "uniattn": uni / t, "ratio": uni / stock[t],
                         "break_even": even})
    return rows


def context_table(name: str, stock_config, rows, dtype=torch.bfloat16) -> str:
    c = stock_config
    sliding = sliding_layers(c)
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    if any(sliding):  # read what a sliding layer keeps off the cache itself
        kept = filled_cache(c, 4 * c.sliding_window, dtype).layers[sliding.index(True)].values.shape[-2]
        window = (f"{sum(sliding)} sliding layers (window {c.sliding_window}; the cache keeps the last {kept} "
                  f"tokens), {len(sliding) - sum(sliding)} global")
    else:
        window = "no sliding window"
    lines = [f"{name}: {len(sliding)} layers, {c.num_key_value_heads} KV heads x {hd}, {window}; "
             f"{str(dtype).replace('torch.', '')}, batch 1", "",
             "| layout | leaders | followers (were sliding) | context | stock KV B/token | UniAttn KV B/token "
             "| UniAttn / stock |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['layout']} | {r['leaders']} | {r['followers']} ({r['followers_were_sliding']}) "
                     f"| {r['context']} | {r['stock']:,.1f} | {r['uniattn']:,.1f} | {r['ratio']:.4f} |")
    lines.append("")
    for layout in dict.fromkeys(r["layout"] for r in rows):
        even = next(r["break_even"] for r in rows if r["layout"] == layout)
        lines.append(f"- {layout}: " + (f"the UniAttn cache is at least stock's from {even:,} tokens on" if even
                                         else f"the UniAttn cache stays below stock's up to {LIMIT:,} tokens"))
    return "\n".join(lines)


def load_config(model: str):
    """(stock config, its own layout or None) from a preset name or a checkpoint directory (config only)."""
    if model in PRESETS:
        cls, kw = PRESETS[model]
        return cls(**kw), None
    if not (Path(model) / "config.json").is_file():
        raise ValueError(f"model {model!r} is neither a checkpoint directory with a config.json "
                         f"nor a preset ({', '.join(PRESETS)})")
    import uniattn  # noqa: F401  (registers the uniattn_* configs)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model)
    layout = getattr(config, "superblock_layout", None)
    if layout is None:
        return config, None
    # A UniAttn checkpoint: its base family's config with the same fields, and its layout.
    fields = {k: v for k, v in config.to_dict().items() if not k.startswith("superblock_")
              and k not in ("model_type", "architectures", "transformers_version", "auto_map")}
    return AutoConfig.for_model(config.base_model_type, **fields), layout


def parse_layout(text: str, num_layers: int) -> SuperBlockLayout:
    parts = text.replace(",", " ").split()
    if len(parts) != 3 or not all(p.lstrip("-").isdigit() for p in parts):
        raise ValueError(f"layout {text!r} must be three integers G B E, e.g. \"4 21 43\"")
    try:
        return SuperBlockLayout(*(int(p) for p in parts), num_layers)
    except ValueError as err:
        raise ValueError(f"layout {text!r}: {err}") from None


# ------------------------------------------------------------------ two checkpoints
@torch.no_grad()
def kv_and_params(model, tokens: int = 256, batch: int = 1) -> dict:
    """KV-cache bytes after prefilling ``batch x tokens`` random ids, and the parameter count."""
    device = next(model.parameters()).device
    ids = torch.randint(3, model.config.vocab_size, (batch, tokens), generator=torch.Generator().manual_seed(0))
    past = model(ids.to(device), past_key_values=DynamicCache(config=model.config), use_cache=True).past_key_values
    return {"cache": cache_nbytes(past), "params": sum(p.numel() for p in model.parameters()),
            "cache_tokens": batch * tokens, "cache_dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "layout": str(getattr(model.config, "superblock_layout", "-")),
            "sharing": getattr(model.config, "superblock_sharing", "-"),
            "compensation": getattr(model.config, "superblock_compensation", None)}


def measure(path, tokens: int, batch: int) -> dict:
    model = load_causal_lm(path, dtype=torch.float32).eval()  # an exact kernel for a Gemma-2 base, as every tool
    return kv_and_params(model, tokens, batch)


def table(base_dir, uni_dir, tokens=256, batch=1) -> str:
    base, uni = measure(base_dir, tokens, batch), measure(uni_dir, tokens, batch)
    rows = [
        "| model | layout | KV cache after prefill | parameters |",
        "|---|---|---|---|",
        f"| base | - | {base['cache'] / 2**20:.2f} MiB | {base['params'] / 1e6:.2f} M |",
        f"| {arm_label(uni['sharing'], uni['compensation'] is not False)} | {uni['layout']} | {uni['cache'] / 2**20:.2f} MiB ({uni['cache'] / base['cache'] - 1:+.2%}) "
        f"| {uni['params'] / 1e6:.2f} M ({uni['params'] / base['params'] - 1:+.2%}) |",
    ]
    return "\n".join(rows) + f"\n\n(fp32, batch {batch}, {tokens} prompt tokens)"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="base checkpoint dir; with --layouts / --contexts also a preset name")
    p.add_argument("uniattn_dir", nargs="?", help="UniAttn checkpoint dir (the two-checkpoint form)")
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--layouts", nargs="+", metavar='"G B E"', help="layouts for the by-context table")
    p.add_argument("--contexts", type=int, nargs="+", metavar="T", help=f"context lengths (default {CONTEXTS})")
    p.add_argument("--exact", action="store_true", help="only the layouts given (no other-leader-type pair)")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="cache dtype of the by-context table")
    args = p.parse_args(argv)
    if args.uniattn_dir is not None:
        if args.layouts or args.contexts:
            p.error("--layouts / --contexts take one MODEL (a preset or a checkpoint dir), not two checkpoints")
        print(table(args.model, args.uniattn_dir, args.tokens, args.batch))
        return 0
    contexts = args.contexts or CONTEXTS
    if any(t < 1 for t in contexts):
        p.error(f"--contexts must be positive token counts, got {contexts}")
    try:
        config, own = load_config(args.model)
        layouts = [parse_layout(t, config.num_hidden_layers) for t in args.layouts or []] or ([own] if own else [])
    except ValueError as err:
        p.error(str(err))
    if not layouts:
        p.error(f"give --layouts \"G B E\": {args.model} is not a UniAttn checkpoint with a layout of its own")
    if not args.exact:
        sliding, wanted = sliding_layers(config), []
        for layout in layouts:
            wanted += [x for x in (layout, counterpart(layout, sliding)) if x is not None and x not in wanted]
        layouts = wanted
    dtype = DTYPES[args.dtype]
    try:
        rows = by_context(config, layouts, contexts, dtype)
    except ValueError as err:  # a family UniAttn does not convert
        p.error(str(err))
    print(context_table(args.model, config, rows, dtype))
    return 0


if __name__ == "__main__":
    sys.exit(main())
