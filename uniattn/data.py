"""Supervised fine-tuning records: loading, the Alpaca prompt, response-only labels.

Records are Alpaca-style objects with ``instruction``, ``input`` and ``output``
(PMC-LLaMA instructions), or ``input`` / ``output`` only (the Tulu-3
single-turn sample), in a JSON list or a JSONL file. The prompt is the Stanford
Alpaca template the seed used; the loss (and the init-calc statistics of
response tokens, when asked) covers the response and the EOS token only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

IGNORE_INDEX = -100

PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


class DataError(ValueError):
    """A data file that cannot be used; the message names the file, the record and the fix."""


def load_records(path: str | Path) -> list[dict]:
    """Read a JSON list or a JSONL file of SFT records and check every one has the needed fields."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist; pass a JSON or JSONL file of instruction records")
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path} is not valid JSON ({err}); expected a list of records or JSON lines") from err
    else:
        records = []
        for n, line in enumerate(text.split("\n"), 1):  # JSONL breaks only at newlines; str.splitlines also splits at U+2028
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataError(f"{path} line {n} is not valid JSON ({err.msg}): {line[:80]!r}") from err
    if not records:
        raise DataError(f"{path} holds no records; it needs at least one {{instruction, input, output}} object")
    for n, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise DataError(f"{path} record {n} is a {type(rec).__name__}, not an object with instruction/input/output")
        if not isinstance(rec.get("output"), str) or not rec["output"].strip():
            raise DataError(f"{path} record {n} has no non-empty 'output' field (keys: {sorted(rec)})")
        if not (rec.get("instruction") or rec.get("input")):
            raise DataError(f"{path} record {n} has neither 'instruction' nor 'input'")
    return records


def build_prompt(record: dict) -> str:
    instruction = (record.get("instruction") or "").strip()
    extra = (record.get("input") or "").strip()
    if not instruction:  # Tulu-3 single-turn records carry the request in `input`
        instruction, extra = extra, ""
    if extra:
        return PROMPT_INPUT.format(instruction=instruction, input=extra)
    return PROMPT_NO_INPUT.format(instruction=instruction)


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


def tokenize(record: dict, tokenizer, max_length: int) -> Example:
    """Prompt + response + EOS, truncated to ``max_length``; labels mask the prompt with -100."""
    prompt_ids = tokenizer(build_prompt(record), add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(record["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = (prompt_ids + response_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:max_length]
    return Example(ids, labels)


def collate(examples: list[Example], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest example (dynamic padding)."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def default_data_file(name: str = "pmc") -> Path:
    """The calibration samples shipped in ``dataset/`` (the seed's 1,000 examples per dataset)."""
    files = {"pmc": "pmc_llama_instructions_1000.json", "tulu3": "tulu3_sft_filtered_1000.json"}
    return Path(__file__).resolve().parent.parent / "dataset" / files[name]
