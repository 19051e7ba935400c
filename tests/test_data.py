"""Tokenisation and batching of SFT records: response-only labels, EOS, truncation, padding."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from train_helpers import make_tokenizer

from uniattn.data import IGNORE_INDEX, build_prompt, collate, tokenize

RECORDS = [
    {"instruction": "Name the longest bone of the human body.", "input": "", "output": "The femur is the longest bone."},
    {"instruction": "Classify the finding.", "input": "Fever and a stiff neck.", "output": "Suspected meningitis."},
    {"instruction": "", "input": "Say hello in French.", "output": "Bonjour."},  # Tulu-3: the request in `input`
]


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer([build_prompt(r) + r["output"] for r in RECORDS] * 3, vocab_size=300)


@pytest.mark.parametrize("record", RECORDS)
def test_prompt_is_masked_and_the_response_ends_with_eos(tok, record):
    ex = tokenize(record, tok, 4096)
    assert len(ex.input_ids) == len(ex.labels)
    masked = [i for i, label in zip(ex.input_ids, ex.labels) if label == IGNORE_INDEX]
    learned = [label for label in ex.labels if label != IGNORE_INDEX]
    # The masked part is exactly the prompt text, the learned part exactly the response and one EOS.
    assert tok.decode(masked, skip_special_tokens=True) == build_prompt(record)
    assert learned[-1] == tok.eos_token_id and learned.count(tok.eos_token_id) == 1
    assert tok.decode(learned[:-1]) == record["output"]
    assert ex.labels[len(masked):] == ex.input_ids[len(masked):]  # labels are the inputs (the model shifts them)
    assert ex.labels[: len(masked)] == [IGNORE_INDEX] * len(masked)  # the prompt comes first, all of it masked


def test_truncation_keeps_the_start_and_can_cut_the_response_away(tok):
    record = RECORDS[0]
    full = tokenize(record, tok, 4096)
    n_prompt = full.labels.count(IGNORE_INDEX)
    cut = tokenize(record, tok, len(full.input_ids) - 3)
    assert cut.input_ids == full.input_ids[:-3] and cut.labels == full.labels[:-3]
    assert tok.eos_token_id not in cut.labels  # the cut removed the EOS with the end of the response
    gone = tokenize(record, tok, n_prompt - 1)
    assert len(gone.input_ids) == n_prompt - 1 and set(gone.labels) == {IGNORE_INDEX}


def test_collate_pads_right_and_masks_the_padding(tok):
    examples = [tokenize(r, tok, 4096) for r in RECORDS]
    batch = collate(examples, pad_token_id=tok.pad_token_id)
    width = max(len(e.input_ids) for e in examples)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, width)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        assert batch["input_ids"][row, :n].tolist() == e.input_ids and batch["labels"][row, :n].tolist() == e.labels
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)
        assert torch.all(batch["input_ids"][row, n:] == tok.pad_token_id)
        assert torch.all(batch["labels"][row, n:] == IGNORE_INDEX)


def test_a_record_whose_response_is_cut_entirely_is_reported(tok, caplog):
    from uniattn.train import UsageError, _check_lengths

    lengths = [tokenize(r, tok, 4096).labels.count(IGNORE_INDEX) for r in RECORDS]
    # Long enough for every prompt but the second's: only that record loses its whole response.
    script = SimpleNamespace(max_length=lengths[1], data="records.json")
    assert max(lengths[0], lengths[2]) < lengths[1]
    with caplog.at_level(logging.WARNING, logger="uniattn.train"):
        _check_lengths(RECORDS, tok, script)
    assert "1 of the first 3 records" in caplog.text
    with pytest.raises(UsageError, match="leaves no response token"):
        _check_lengths(RECORDS, tok, SimpleNamespace(max_length=min(lengths) - 1, data="records.json"))
