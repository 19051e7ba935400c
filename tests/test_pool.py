"""The offline instruction pool (uniattn.pool), built from a tiny fake bigbench sdist: fast, CPU, no download.

Checked: no question on two sides, no shipped evaluation item outside the
domain test set, the evaluation tasks excluded, byte-identical rebuilds, a
manifest that matches its files, and bad input refused with status 2 and
nothing written.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from uniattn import pool
from uniattn.data import load_records
from uniattn.eval import TASKS_DIR
from uniattn.eval.split import is_eval_record, split_key

DATA = TASKS_DIR / "data"
SPLITS = ("train", "val_domain", "val_general", "heldout_domain", "heldout_general")


def _first_doc(name: str) -> dict:
    return json.loads((DATA / f"{name}.jsonl").read_text().splitlines()[0])


STRATEGYQA_Q = _first_doc("strategyqa")["query"].removeprefix("Q: ").rsplit("\nA:", 1)[0]  # "Q: <question>\nA:"
SOCIAL_IQA_Q = _first_doc("social_iqa")["query"].removeprefix("Q: ").split("\n", 1)[0]
MEDMCQA = _first_doc("medmcqa")
PUBMEDQA_Q = split_key({"input": _first_doc("pubmedqa")["pmc_input"]})  # its ###Question section


def _task(examples, **extra) -> dict:
    return {"canary": "test", "name": "t", "description": "A test task.", "keywords": [], "examples": examples, **extra}


def _write_sdist(path: Path, tasks: dict[str, dict]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        members = {"bigbench-1.0.0/setup.py": b"# not a task\n"}
        members.update({f"bigbench-1.0.0/bigbench/benchmark_tasks/{name}/task.json": json.dumps(task).encode()
                        for name, task in tasks.items()})
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("inputs")
    gen = [{"input": f"What is {i} plus {i}?", "target": [str(2 * i), "other"]} for i in range(60)]
    gen += [{"input": "", "target": "x"}, {"input": "Empty target", "target": ""}, {"input": "Long", "target": "y" * 5000}]
    mc = [{"input": f"Which colour is item {i}?", "target_scores": {"red": int(i % 2 == 0), "blue": int(i % 2 == 1)}}
          for i in range(40)]
    mc.append({"input": "A tie", "target_scores": {"a": 1, "b": 1}})
    tasks = {
        "strategyqa": _task([{"input": f"Eval question {i}?", "target_scores": {"Yes": 1, "No": 0}} for i in range(20)]),
        "arith_gen": _task(gen, task_prefix="Add the numbers."),
        "colours/sub_a": _task(mc[:25]),
        "colours/sub_b": _task(mc[15:]),  # overlaps sub_a: duplicates across subtasks
        "leaky": _task([
            {"input": STRATEGYQA_Q, "target_scores": {"Yes": 1, "No": 0}},
            {"input": f"Story time. {SOCIAL_IQA_Q} Explain.", "target": "Because."},
            {"input": "An innocent question?", "target": "Yes."},
        ]),
    }
    pmc = [{"instruction": f"As doctor number {i % 3}, answer.", "input": f"###Question: Medical question {i // 2}?\n"
            "###Options:\nA. a\nB. b\nC. c\nD. d\n", "output": "###Answer: OPTION A IS CORRECT."} for i in range(160)]
    pmc.append({"instruction": MEDMCQA["pmc_instruction"], "input": MEDMCQA["pmc_input"], "output": "###Answer: OPTION B IS CORRECT."})
    tulu = [{"input": f"Write a haiku about topic {i}.", "output": f"Haiku\u2028line {i}\x85"} for i in range(40)]
    tulu += [{"input": STRATEGYQA_Q, "output": "No"}, {"input": PUBMEDQA_Q, "output": "yes"},
             {"input": "Probenecid interacts with :", "output": "Ampicillin"},  # a copy of the held-out PMC record
             {"input": "What is 3 plus 3?", "output": "6"}]  # a copy of a bigbench question
    (tmp / "tulu.json").write_text(json.dumps(tulu))
    (tmp / "pmc.json").write_text(json.dumps(pmc))
    return {"sdist": _write_sdist(tmp / "bigbench-1.0.0.tar.gz", tasks), "tulu": tmp / "tulu.json", "pmc": tmp / "pmc.json"}


def _argv(inputs, out: Path, *extra: str) -> list[str]:
    return ["--bigbench", str(inputs["sdist"]), "--out", str(out), "--tulu", str(inputs["tulu"]), "--pmc", str(inputs["pmc"]),
            "--per_task", "30", "--heldout_general", "10", "--val_general", "10", "--val_domain", "8",
            "--min_train", "20", *extra]


@pytest.fixture(scope="module")
def built(inputs, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pool") / "pool"
    assert pool.main(_argv(inputs, out)) == 0
    return out


def _read(out: Path) -> dict[str, list[dict]]:
    return {s: [json.loads(line) for line in (out / f"{s}.jsonl").read_text().split("\n") if line] for s in SPLITS}


def test_no_question_on_two_sides_and_records_load(built):
    sides: dict[str, str] = {}
    for split, rows in _read(built).items():
        assert rows, split
        for rec in rows:
            key = split_key(rec)
            assert key not in sides, f"{key!r} in {sides.get(key)} and {split}"
            sides[key] = split
            assert set(rec) == {"instruction", "input", "output", "source", "domain"}
        assert load_records(built / f"{split}.jsonl") == rows  # str.splitlines' extra line breaks are escaped


def test_eval_items_and_eval_tasks_kept_out(built):
    questions, _ = pool.eval_questions(DATA)
    splits = _read(built)
    for split, rows in splits.items():
        for rec in rows:
            assert rec["source"] != "bigbench/strategyqa"
            if split == "heldout_domain":  # the held-out side of uniattn.eval.split, where the medical eval items live
                assert rec["source"] == "pmc" and is_eval_record(rec)
                continue
            text = pool._norm(rec["instruction"] + "\n" + rec["input"])
            assert split_key(rec) not in questions
            assert not any(q in text for q in questions if len(q) >= 30), (split, rec)
    assert any(r["input"] == MEDMCQA["pmc_input"].strip() for r in splits["heldout_domain"])
    assert any(r["input"].startswith("An innocent question?") for r in splits["train"] + splits["val_general"]
               + splits["heldout_general"])
    dropped = json.loads((built / "MANIFEST.json").read_text())["counts"]["dropped"]
    assert dropped["eval_task"] == 20
    assert dropped["eval_overlap_exact"] == 3  # leaky item, tulu copy of it, tulu copy of the pubmedqa question
    assert dropped["eval_overlap_contained"] == 1
    assert dropped["empty"] == 2 and dropped["too_long"] == 1 and dropped["ambiguous"] == 1
    assert dropped["duplicate"] >= 80  # PMC paraphrases of one question, plus copies across subtasks and sources


def test_manifest_matches_files(inputs, built):
    manifest = json.loads((built / "MANIFEST.json").read_text())
    splits = _read(built)
    for split, rows in splits.items():
        entry = manifest["files"][f"{split}.jsonl"]
        data = (built / f"{split}.jsonl").read_bytes()
        assert entry == {"records": len(rows), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        assert manifest["counts"]["splits"][split] == len(rows)
    assert manifest["counts"]["splits"]["val_domain"] == 8 and manifest["counts"]["splits"]["heldout_general"] == 10
    for name in ("sdist", "tulu", "pmc"):
        source = manifest["sources"]["bigbench" if name == "sdist" else name.replace("tulu", "tulu3")]
        assert source["sha256"] == hashlib.sha256(inputs[name].read_bytes()).hexdigest()
    assert manifest["counts"]["per_source"]["train"]["pmc"] == manifest["counts"]["per_domain"]["train"]["medical"]
    assert len({r["source"] for r in splits["train"][:20]}) > 1  # shuffled: the first records are a mix


def test_rebuild_is_byte_identical(inputs, built, tmp_path):
    out = tmp_path / "again"
    assert pool.main(_argv(inputs, out)) == 0
    for name in [f"{s}.jsonl" for s in SPLITS]:
        assert (out / name).read_bytes() == (built / name).read_bytes(), name
    first, second = (json.loads((d / "MANIFEST.json").read_text()) for d in (built, out))
    for m in (first, second):
        m["builder"].pop("command")
        m["builder"]["params"].pop("out")
    assert first == second


def _assert_nothing_written(out: Path):
    assert not out.exists()
    assert [p.name for p in out.parent.iterdir()] == []  # no half-built temporary folder either


def test_min_train_not_reached_exits_2(inputs, tmp_path, caplog):
    out = tmp_path / "pools" / "pool"
    out.parent.mkdir()
    assert pool.main(_argv(inputs, out, "--min_train", "100000")) == 2
    assert "--min_train 100000" in caplog.text
    _assert_nothing_written(out)


@pytest.mark.parametrize("content", [b"this is not a tar.gz", None])
def test_corrupt_sdist_exits_2(inputs, tmp_path, caplog, content):
    bad = tmp_path / "bigbench-1.0.0.tar.gz"
    data = inputs["sdist"].read_bytes()
    bad.write_bytes(content if content is not None else data[: len(data) // 2])  # None: truncated
    out = tmp_path / "pools" / "pool"
    out.parent.mkdir()
    assert pool.main(_argv({**inputs, "sdist": bad}, out)) == 2
    assert str(bad) in caplog.text and "build_pool.sh" in caplog.text
    _assert_nothing_written(out)


@pytest.mark.parametrize("which", ["sdist", "tulu", "pmc"])
def test_missing_input_exits_2(inputs, tmp_path, caplog, which):
    out = tmp_path / "pools" / "pool"
    out.parent.mkdir()
    missing = tmp_path / "nowhere.json"
    assert pool.main(_argv({**inputs, which: missing}, out)) == 2
    assert str(missing) in caplog.text
    _assert_nothing_written(out)


def test_existing_out_needs_force(inputs, tmp_path, caplog):
    out = tmp_path / "pool"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert pool.main(_argv(inputs, out)) == 2
    assert "--force" in caplog.text and (out / "keep.txt").read_text() == "mine"
    assert pool.main(_argv(inputs, out, "--force")) == 0
    assert not (out / "keep.txt").exists() and (out / "train.jsonl").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pool"]
