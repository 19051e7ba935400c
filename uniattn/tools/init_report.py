"""Measure what closed-form init buys: the table of docs/init_calc.md.

    python -m uniattn.tools.init_report --layouts "4 14 30" --samples 64 256 --heldout 32

For each layout and calibration size: held-out per-follower residual-stream
error and mean response-token loss for (a) the base model, (b) the unified
model without ``W_c``, (c) with the closed-form ``W_c``; the share of the loss
gap that (c) recovers; and the wall time of init calc against one forward pass
of the base model over the same calibration data. Calibration records are
taken from the start of the data file, held-out records from ``--heldout_start``.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

import torch
import transformers
from transformers import AutoTokenizer

from ..convert import load_converted
from ..loading import load_causal_lm
from ..data import default_data_file, load_records
from ..init_calc import make_batches, propagate
from .loss_eval import response_loss
from .smollm2 import ensure_smollm2


@torch.no_grad()
def forward_seconds(model, batches) -> float:
    start = time.perf_counter()
    for b in batches:
        model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    return time.perf_counter() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_dir", default=None, help="base checkpoint (default: SmolLM2-135M-Instruct)")
    p.add_argument("--data", default=str(default_data_file("pmc")))
    p.add_argument("--layouts", nargs="+", default=["4 14 30"])
    p.add_argument("--samples", nargs="+", type=int, default=[64, 256])
    p.add_argument("--heldout", type=int, default=32)
    p.add_argument("--heldout_start", type=int, default=900)
    p.add_argument("--max_length", type=int, default=320)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--ridge", type=float, default=1e-4)
    p.add_argument("--tokens", choices=("all", "response"), default="all")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model_dir = args.model_dir or ensure_smollm2()
    records = load_records(args.data)
    held_out = records[args.heldout_start : args.heldout_start + args.heldout]
    if max(args.samples) > args.heldout_start:
        print(f"error: --samples {max(args.samples)} would overlap the held-out records from {args.heldout_start}", file=sys.stderr)
        return 2
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = load_causal_lm(model_dir, dtype=torch.float32).eval()
    test_batches = make_batches(held_out, tokenizer, args.max_length, args.batch_size)
    loss_base, n_tok = response_loss(base, tokenizer, held_out, args.max_length, args.batch_size)

    print(f"command: python -m uniattn.tools.init_report {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; "
          f"torch {torch.__version__}, transformers {transformers.__version__}; fp32")
    print(f"held-out: records {args.heldout_start}-{args.heldout_start + len(held_out) - 1} of {args.data}, "
          f"{n_tok} response tokens, max_length {args.max_length}\n")
    summary = ["| layout | calib. samples | tokens | loss base | loss W_c=0 | loss init | gap recovered "
               "| mean stream err. W_c=0 | mean stream err. init | init calc s | 1 forward s |",
               "|---|---|---|---|---|---|---|---|---|---|---|"]
    for layout_text in args.layouts:
        layout = tuple(int(v) for v in layout_text.split())
        uni, _ = load_converted(model_dir, layout, dtype=torch.float32)
        uni.eval()
        without = propagate(base, uni, test_batches, fit=False)
        loss_zero, _ = response_loss(uni, tokenizer, held_out, args.max_length, args.batch_size)
        for n in args.samples:
            uni, _ = load_converted(model_dir, layout, dtype=torch.float32)
            uni.eval()
            calib = make_batches(records[:n], tokenizer, args.max_length, args.batch_size)
            fwd = forward_seconds(base, calib)
            start = time.perf_counter()
            fit = propagate(base, uni, calib, tokens=args.tokens, fit=True, ridge=args.ridge)
            seconds = time.perf_counter() - start
            with_wc = propagate(base, uni, test_batches, fit=False)
            loss_init, _ = response_loss(uni, tokenizer, held_out, args.max_length, args.batch_size)
            recovered = (loss_zero - loss_init) / (loss_zero - loss_base)
            e0 = sum(r["stream_rel_error"] for r in without) / len(without)
            e1 = sum(r["stream_rel_error"] for r in with_wc) / len(with_wc)
            summary.append(f"| {layout_text} | {n} | {fit[0]['tokens']} | {loss_base:.3f} | {loss_zero:.3f} | {loss_init:.3f} "
                           f"| {recovered:.0%} | {e0:.4f} | {e1:.4f} | {seconds:.0f} | {fwd:.0f} |")
            print(f"### layout {layout_text}, {n} calibration samples: held-out residual-stream error per follower\n")
            print("| follower | leader | W_c = 0 | closed-form W_c | fit MSE / target MSE (calib.) |\n|---|---|---|---|---|")
            for a, b, f in zip(without, with_wc, fit):
                print(f"| {a['layer']} | {a['leader']} | {a['stream_rel_error']:.4f} | {b['stream_rel_error']:.4f} "
                      f"| {f['fit_mse'] / f['target_mse']:.3f} |")
            print(flush=True)
    print("\n".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
