"""The fixed train / held-out split of PMC-LLaMA instruction records.

The medical evaluation tasks are built from PMC-LLaMA records, the same data
the medical post-training uses, so the two must never share an item. The rule
is a pure function of one record, with no state, file or random seed: a record
is held out for evaluation when a salted SHA-256 of its *question* falls in
the lowest ``EVAL_FRACTION`` of the hash range. Training code calls
``train_eval_split`` (or ``is_eval_record``) and keeps the ``train`` part; the
evaluation data prep keeps the ``eval`` part. Because the rule looks only at
the record, it gives the same answer on the 1,000-record sample and on the
full 513k-record dataset, on any machine, in any order.

The key is the question, not the whole prompt: PMC-LLaMA repeats a question
under up to ten paraphrased instruction openings ("As a doctor, ...",
"Being a doctor, ..."), and a key over the instruction would send copies of
one question to both sides.

    from uniattn.eval.split import train_eval_split
    train, held_out = train_eval_split(records)      # records: dicts with instruction/input
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from typing import Iterable, Mapping

# Changing either constant reshuffles the split: the committed evaluation data
# and every training run made with the old rule would then overlap.
SPLIT_SALT = "uniattn-eval-split-v1"
EVAL_FRACTION = 0.25

_QUESTION = re.compile(r"###\s*Question:(.*?)(?=\n\s*###|\Z)", re.S | re.I)


def split_key(record: Mapping) -> str:
    """The normalised text that decides which side a record is on.

    The ``###Question:`` section of ``input`` when there is one (PMC-LLaMA's
    format), otherwise the whole ``input``, otherwise the ``instruction``;
    case, Unicode form and whitespace are normalised so trivial re-renderings
    of one question share a key.
    """
    text = (record.get("input") or "").strip() or (record.get("instruction") or "").strip()
    if not text:
        raise ValueError(
            f"record has neither input nor instruction text, so it cannot be assigned to a split: {dict(record)!r}; "
            "drop empty records before splitting"
        )
    match = _QUESTION.search(text)
    if match and match.group(1).strip():
        text = match.group(1)
    return " ".join(unicodedata.normalize("NFKC", text).lower().split())


def hash_fraction(key: str, salt: str) -> float:
    """A number in [0, 1), uniform over keys and fixed for each: SHA-256 of ``salt + "\\0" + key`` (UTF-8),
    its first 8 bytes read big-endian, over 2**64.

    Every salted split of the project goes through here, each with a salt of its own (this module's
    ``SPLIT_SALT``, the experiment's validation slice, init calc's ridge hold-out, the pool's cap and order),
    so that no two of them pick the same low-hash records. Changing this function reshuffles all of them.
    """
    digest = hashlib.sha256((salt + "\0" + key).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def eval_score(record: Mapping) -> float:
    """A number in [0, 1) that is uniform over records and fixed for each one."""
    return hash_fraction(split_key(record), SPLIT_SALT)


def is_eval_record(record: Mapping, eval_fraction: float = EVAL_FRACTION) -> bool:
    """True if the record is held out for evaluation and must not be trained on."""
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction {eval_fraction} is outside [0, 1); use the default {EVAL_FRACTION}")
    return eval_score(record) < eval_fraction


def train_eval_split(records: Iterable[Mapping], eval_fraction: float = EVAL_FRACTION) -> tuple[list, list]:
    """Split records into ``(train, eval)`` lists, each in input order.

    Pass the same ``eval_fraction`` in training and in data prep (the default
    in both): a smaller fraction in training would train on evaluation items.
    """
    train, held_out = [], []
    for record in records:
        (held_out if is_eval_record(record, eval_fraction) else train).append(record)
    return train, held_out
