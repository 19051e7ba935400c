"""Mean next-token loss on the response tokens of SFT records, for one or more checkpoints.

    python -m uniattn.tools.loss_eval CKPT [CKPT ...] --data FILE --skip 900 --limit 32 --max-length 320
    python -m uniattn.tools.loss_eval CKPT ... --data FILE --split eval --limit 16   # items no training run sees
    python -m uniattn.tools.loss_eval CKPT --data FILE --limit 0 --json OUT.json --with_kv   # all records, machine-readable

Prints a markdown table (checkpoint, loss, perplexity, tokens). This is the
objective the method's reference figures use (UNIATTN.md section 4). ``--json``
also writes the figures (and with ``--with_kv`` the KV bytes after a prefill and
the parameter count) to a file, which the experiment reads.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch
from tqdm.auto import tqdm

from ..data import collate, load_records, tokenize


def load_model(path, dtype=torch.float32, device="cpu"):
    from transformers import AutoTokenizer

    from ..loading import load_causal_lm

    model = load_causal_lm(path, dtype=dtype).to(device).eval()  # a Gemma-2 base keeps its soft-cap
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


@torch.no_grad()
def response_loss(model, tokenizer, records, max_length=320, batch_size=8, desc="loss") -> tuple[float, int]:
    """Token-weighted mean cross-entropy over response tokens; returns (loss, tokens)."""
    device = next(model.parameters()).device
    examples = [tokenize(r, tokenizer, max_length) for r in records]
    total, count = 0.0, 0
    for start in tqdm(range(0, len(examples), batch_size), desc=desc, leave=False):
        batch = {k: v.to(device) for k, v in collate(examples[start : start + batch_size], tokenizer.pad_token_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        targets = batch["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum"
        )
        total += nll.item()
        count += int((targets != -100).sum())
    return total / max(count, 1), count


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--data", required=True, nargs="+", help="JSON / JSONL SFT records (several: one load each model)")
    parser.add_argument("--split", choices=("all", "train", "eval"), default="all",
                        help="keep only one side of the fixed evaluation split (uniattn.eval.split) first")
    parser.add_argument("--skip", type=int, default=0, help="records to skip first (e.g. the calibration ones)")
    parser.add_argument("--limit", type=int, default=32, help="records to score (0: all)")
    parser.add_argument("--max-length", type=int, default=320)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--json", help="also write {checkpoint: {data file: {loss, tokens, ...}}} here (atomically)")
    parser.add_argument("--with_kv", action="store_true", help="add KV bytes after a 256-token prefill and parameters")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = parser.parse_args(argv)
    sets = {}
    for data in args.data:
        records = load_records(data)
        if args.split != "all":
            from ..eval.split import train_eval_split

            records = train_eval_split(records)[0 if args.split == "train" else 1]
        records = records[args.skip : args.skip + args.limit] if args.limit else records[args.skip :]
        if not records:
            print(f"error: --skip {args.skip} leaves no records in {data}", file=sys.stderr)
            return 2
        sets[data] = records
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = {}
    print("| checkpoint | data | response loss | perplexity | tokens |\n|---|---|---|---|---|")
    for path in args.checkpoints:
        model, tokenizer = load_model(path, dtype=getattr(torch, args.dtype), device=device)
        results[path] = {}
        for data, records in sets.items():
            loss, n = response_loss(model, tokenizer, records, args.max_length, args.batch_size, desc=str(path))
            results[path][data] = {"loss": loss, "tokens": n, "records": len(records), "dtype": args.dtype}
            print(f"| {path} | {data} | {loss:.4f} | {math.exp(loss):.2f} | {n} |", flush=True)
        if args.with_kv:
            from .kv_report import kv_and_params

            results[path]["kv"] = kv_and_params(model)
    if args.json:
        from ..io import write_json

        write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
