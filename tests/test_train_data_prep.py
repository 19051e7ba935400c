"""dataset/prepare_pmc.py, prepare_tulu3.py and sample.py on local files (the real loading path, no hub)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from uniattn.data import build_prompt, load_records

DATASET = Path(__file__).resolve().parent.parent / "dataset"


def load(name):
    spec = importlib.util.spec_from_file_location(f"dataset_{name}", DATASET / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_prepare_pmc_from_local(tmp_path, capsys):
    rows = [{"instruction": f"Answer {i}.", "input": f"Question {i}?", "output": f"Answer {i}", "source": "medqa",
             "sample_id": i} for i in range(5)]
    rows.append({"instruction": "No answer", "input": "", "output": "  ", "source": "x", "sample_id": None})
    src = write_jsonl(tmp_path / "pmc.jsonl", rows)
    out = tmp_path / "pmc.json"
    assert load("prepare_pmc").main(["--from-local", str(src), "--output", str(out), "--sample", "3"]) == 0
    assert "wrote 5 records" in capsys.readouterr().out
    records = load_records(out)
    assert [r["output"] for r in records] == [f"Answer {i}" for i in range(5)]
    assert set(records[0]) == {"instruction", "input", "output", "source", "sample_id"}
    assert len(load_records(tmp_path / "pmc_3.json")) == 3
    assert not list(tmp_path.glob(".*.tmp"))


def test_prepare_tulu3_keeps_single_turn_conversations(tmp_path, capsys):
    def msg(role, text):
        return {"role": role, "content": text}

    rows = [
        {"id": "keep", "source": "s", "messages": [msg("user", "Write a haiku."), msg("assistant", "Leaves fall.")]},
        {"id": "system", "source": "s", "messages": [msg("system", "Be brief."), msg("user", "Hi"), msg("assistant", "Hi")]},
        {"id": "multi", "source": "s", "messages": [msg("user", "a"), msg("assistant", "b"), msg("user", "c"),
                                                    msg("assistant", "d")]},
        {"id": "empty", "source": "s", "messages": [msg("user", "  "), msg("assistant", "x")]},
        {"id": "no_reply", "source": "s", "messages": [msg("user", "x"), msg("assistant", "")]},
        {"id": "order", "source": "s", "messages": [msg("assistant", "x"), msg("user", "y")]},
    ]
    src = write_jsonl(tmp_path / "tulu.jsonl", rows)
    out = tmp_path / "tulu.json"
    assert load("prepare_tulu3").main(["--from-local", str(src), "--output", str(out)]) == 0
    assert "wrote 1 single-turn records" in capsys.readouterr().out
    (record,) = load_records(out)
    assert record == {"id": "keep", "instruction": "", "input": "Write a haiku.", "output": "Leaves fall.", "source": "s"}
    assert "### Instruction:\nWrite a haiku.\n\n### Response:" in build_prompt(record)


def test_prepare_errors_are_clear(tmp_path, capsys):
    assert load("prepare_pmc").main(["--from-local", str(tmp_path / "none.jsonl"), "--output", str(tmp_path / "o.json")]) == 2
    assert "none.jsonl does not exist" in capsys.readouterr().err
    src = write_jsonl(tmp_path / "wrong.jsonl", [{"text": "a"}])
    assert load("prepare_tulu3").main(["--from-local", str(src), "--output", str(tmp_path / "o.json")]) == 2
    assert "no `messages` column" in capsys.readouterr().err
    assert not (tmp_path / "o.json").exists()


def test_sample(tmp_path, capsys):
    sample = load("sample")
    records = [{"instruction": str(i), "input": "", "output": str(i)} for i in range(50)]
    src = tmp_path / "all.json"
    src.write_text(json.dumps(records))
    assert sample.main([str(src), "-n", "10", "--seed", "3"]) == 0
    got = load_records(tmp_path / "all_10.json")
    ids = [int(r["output"]) for r in got]
    assert len(ids) == 10 and ids == sorted(ids) and len(set(ids)) == 10
    assert sample.sample_records(records, 10, seed=3) == got  # seeded: the same draw every time
    assert sample.main([str(src), str(tmp_path / "x.json"), "-n", "51"]) == 2
    assert "cannot sample 51 records from 50" in capsys.readouterr().err
    with pytest.raises(ValueError):
        sample.sample_records(records, 0)
