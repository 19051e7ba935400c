"""Gemma-2 init calc: held-out residual-stream error of W_c = 0, the drift-free target and the stream target.

    python -m uniattn.tools.gemma2_init_report [--seeds 0 1 2] [--layout 4 1 9]

There are no real Gemma-2 weights here, so the models are tiny and random (tests/conftest.py's, with 8 layers:
Gemma-2's soft-caps, sliding window and pre/post norms) and the text is random token ids. Each model is run with
the post-attention gains near 1 (random init, as a fresh Gemma-2) and spread over about (0, 2) ("wide").
For each, init calc (``--ridge auto``, the default) fits ``W_c`` on the calibration set with the old
drift-free target ``a_b - a_u`` and with the spec's stream objective (uniattn.init_calc), and the
per-follower error ``sum |r_base - r_uni|^2 / sum |r_base|^2`` after each follower's attention is measured
on separate held-out sequences. Prints one markdown row per model: the mean over followers and the last
follower's error.
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch
from transformers import Gemma2Config, Gemma2ForCausalLM

from ..convert import uniattn_config_from
from ..init_calc import holdout_flags, propagate
from ..modeling import UNIATTN_FAMILIES


def tiny_pair(seed: int, layout, wide_gains: bool):
    """A random tiny Gemma-2 and its UniAttn twin (W_c = 0); every weight perturbed so no norm is an identity."""
    torch.manual_seed(seed)
    # tests/conftest.py's tiny Gemma-2 (small soft-cap and window, so both act), with 8 layers
    config = Gemma2Config(vocab_size=97, hidden_size=48, intermediate_size=96, num_hidden_layers=8,
                          num_attention_heads=6, num_key_value_heads=2, head_dim=8, sliding_window=5,
                          query_pre_attn_scalar=8, attn_logit_softcapping=3.0, final_logit_softcapping=5.0,
                          pad_token_id=0, attn_implementation="eager")
    base = Gemma2ForCausalLM(config).eval()
    with torch.no_grad():
        for p in base.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        if wide_gains:
            for layer in base.model.layers:
                layer.post_attention_layernorm.weight.add_(torch.randn(48) * 0.5)
    uni_config = uniattn_config_from(base.config, layout)
    uni_config._attn_implementation = "eager"
    uni = UNIATTN_FAMILIES["gemma2"][1](uni_config).eval()
    uni.load_state_dict(base.state_dict(), strict=False)  # followers have no q/k_proj; W_c stays 0
    return base, uni


def random_batches(n: int, length: int, seed: int, holdout_fraction: float | None = None, batch: int = 8):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (n, length), generator=g)
    flags = holdout_flags([{"instruction": str(r.tolist())} for r in ids], holdout_fraction) if holdout_fraction else None
    out = []
    for s in range(0, n, batch):
        b = {"input_ids": ids[s : s + batch], "attention_mask": torch.ones_like(ids[s : s + batch])}
        b["labels"] = b["input_ids"].clone()
        if flags:
            b["holdout"] = torch.tensor(flags[s : s + batch])
        out.append(b)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--layout", nargs=3, type=int, default=[4, 1, 9], metavar=("G", "B", "E"))
    p.add_argument("--calibration", type=int, default=256, help="calibration sequences")
    p.add_argument("--heldout", type=int, default=64, help="held-out sequences")
    p.add_argument("--length", type=int, default=32)
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    calib = random_batches(args.calibration, args.length, seed=1000, holdout_fraction=0.25)
    held = random_batches(args.heldout, args.length, seed=2000)
    print("command: python -m uniattn.tools.gemma2_init_report " + " ".join(argv if argv is not None else sys.argv[1:]))
    print(f"tiny random Gemma-2, layout {' '.join(map(str, args.layout))}; {args.calibration} x {args.length} "
          f"calibration tokens (ridge auto), {args.heldout} x {args.length} held-out; held-out stream error "
          "mean over followers / last follower\n")
    print("| gains | seed | W_c = 0 | drift-free target | stream target |\n|---|---|---|---|---|")
    for wide in (False, True):
        for seed in args.seeds:
            base, uni = tiny_pair(seed, tuple(args.layout), wide)
            cells = []
            for objective in (None, "attention", "stream"):
                model = copy.deepcopy(uni)
                if objective:
                    propagate(base, model, calib, fit=True, ridge="auto", progress=False, gemma2_objective=objective)
                errors = [r["stream_rel_error"] for r in propagate(base, model, held, fit=False, progress=False)]
                cells.append(f"{sum(errors) / len(errors):.4f} / {errors[-1]:.4f}")
            print(f"| {'wide' if wide else 'near 1'} | {seed} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
