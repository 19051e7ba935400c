"""KV-cache bytes and parameter counts of a UniAttn (softmax-only, CLA or drop) checkpoint against its base model.

    python -m uniattn.tools.kv_report BASE_DIR UNIATTN_DIR [--tokens 1024 --batch 1]

Prefills the same random prompt through both models with a ``DynamicCache`` and
prints a markdown table (cache bytes, parameters, and the ratios).
"""

from __future__ import annotations

import argparse
import sys

import torch
from transformers import AutoModelForCausalLM, DynamicCache

from ..modeling.cache import cache_nbytes

# superblock_sharing -> the name of the arm in the table
LABELS = {"softmax": "UniAttn", "kv": "CLA", "drop": "drop (LLMDrop)"}
SOFTMAX_ONLY = "softmax-only (no W_c)"  # superblock_compensation=False: Softmax unification only


def arm_label(sharing: str, compensation: bool = True) -> str:
    if sharing == "softmax" and not compensation:
        return SOFTMAX_ONLY
    return LABELS.get(sharing, "UniAttn")


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
    import uniattn  # noqa: F401

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
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
    p.add_argument("base_dir")
    p.add_argument("uniattn_dir")
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--batch", type=int, default=1)
    args = p.parse_args(argv)
    print(table(args.base_dir, args.uniattn_dir, args.tokens, args.batch))
    return 0


if __name__ == "__main__":
    sys.exit(main())
