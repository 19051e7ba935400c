"""A checkpoint with a real model's shapes and random weights, for timing and memory runs at scale.

    python -m uniattn.tools.random_checkpoint --shape llama3.1-8b --tokenizer DIR --out DIR

The shapes are ``kv_report``'s presets (LLaMA-3.1-8B, Mistral-7B, Gemma-2-9B); weights are drawn
from N(0, 0.02) in bf16 (on the GPU when there is one), norms stay at their initial values, and
the tokenizer of ``--tokenizer`` (any checkpoint folder; its vocabulary must fit the shape's) is
saved beside them. Nothing trained: figures from such a checkpoint speak for speed and
memory, never for quality. The folder appears complete or not at all.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..convert import save_checkpoint
from .kv_report import PRESETS

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(PRESETS), required=True)
    p.add_argument("--tokenizer", required=True, help="a checkpoint folder whose tokenizer files are copied")
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    args = p.parse_args(argv)
    try:
        AutoTokenizer.from_pretrained(args.tokenizer)
    except (OSError, ValueError) as err:
        print(f"error: --tokenizer {args.tokenizer} holds no tokenizer transformers can load ({err}); "
              "pass a checkpoint folder with tokenizer.json or tokenizer.model", file=sys.stderr)
        return 2
    if Path(args.out).exists():
        print(f"error: --out {args.out} exists; remove it or pick another folder", file=sys.stderr)
        return 2
    cls, kw = PRESETS[args.shape]
    dtype = getattr(torch, args.dtype)
    config = cls(**kw, dtype=dtype)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config)
    finally:
        torch.set_default_dtype(torch.float32)
    with torch.no_grad():
        for name, prm in model.named_parameters():
            if "norm" not in name:
                prm.normal_(0, 0.02)
    save_checkpoint(model, args.out, tokenizer_from=args.tokenizer)
    print(f"wrote {args.out}: {args.shape}, {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
