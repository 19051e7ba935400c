"""Mean next-token loss on the response tokens of SFT records, for one or more checkpoints.

    python -m uniattn.loss_eval CKPT [CKPT ...] --data FILE --skip 900 --limit 32 --max-length 320
    python -m uniattn.loss_eval CKPT ... --data FILE --split eval --limit 16   # items no training run sees

Prints a markdown table (checkpoint, loss, perplexity, tokens). This is the
objective the method's reference figures use (UNIATTN.md section 4).
"""

from __future__ import annotations

import argparse
import math
import sys

import torch
from tqdm.auto import tqdm

from .data import collate, load_records, tokenize


def load_model(path, dtype=torch.float32, device="cpu"):
    import uniattn  # noqa: F401  (registers UniAttn classes)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
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
    parser.add_argument("--data", required=True, help="JSON / JSONL SFT records")
    parser.add_argument("--split", choices=("all", "train", "eval"), default="all",
                        help="keep only one side of the fixed evaluation split (uniattn.eval.split) first")
    parser.add_argument("--skip", type=int, default=0, help="records to skip first (e.g. the calibration ones)")
    parser.add_argument("--limit", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=320)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    records = load_records(args.data)
    if args.split != "all":
        from .eval.split import train_eval_split

        records = train_eval_split(records)[0 if args.split == "train" else 1]
    records = records[args.skip : args.skip + args.limit]
    if not records:
        print(f"error: --skip {args.skip} leaves no records in {args.data}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    print("| checkpoint | response loss | perplexity | tokens |\n|---|---|---|---|")
    for path in args.checkpoints:
        model, tokenizer = load_model(path)
        loss, n = response_loss(model, tokenizer, records, args.max_length, args.batch_size, desc=str(path))
        print(f"| {path} | {loss:.4f} | {math.exp(loss):.2f} | {n} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
