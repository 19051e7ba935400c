"""The shipped lm-eval tasks, their data, the train/held-out split, the prep and compare tools.

No model runs here (see test_eval_lm_eval.py for that): these tests check that
lm-eval's task manager loads every task and group, that every item has one
correct choice, that no evaluation item can be in the training split, that
``prepare`` rebuilds the files deterministically from sources, and that
``scripts/eval.sh`` refuses bad input with a clear message.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from uniattn.eval import TASKS_DIR
from uniattn.eval import compare, prepare
from uniattn.eval.split import EVAL_FRACTION, eval_score, is_eval_record, split_key, train_eval_split

REPO = Path(__file__).resolve().parents[1]
DATA = TASKS_DIR / "data"
MANIFEST = json.loads((DATA / "MANIFEST.json").read_text())["tasks"]
# The PMC sample the committed medical data was built from, when this machine has it.
PMC_SAMPLE = Path(os.environ.get("UNIATTN_PMC_SAMPLE", "/work/shared/data/pmc_llama_instructions_1000.json"))


def _docs(name: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / f"{name}.jsonl").read_text().splitlines()]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_manifest_lists_every_data_file():
    assert set(MANIFEST) == {p.stem for p in DATA.glob("*.jsonl")}
    assert {"pubmedqa", "medmcqa"} <= set(MANIFEST)
    assert {e["group"] for e in MANIFEST.values()} == {"medical", "general"}
    for name, entry in MANIFEST.items():
        assert entry["items"] == len(_docs(name)), name


def test_task_manager_loads_every_task(monkeypatch):
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(TASKS_DIR))
    ours = {e["task"] for e in MANIFEST.values()}
    assert ours | {"uniattn", "uniattn_medical", "uniattn_general"} <= set(manager.all_tasks)
    # data_files are relative to the task directory, as scripts/eval.sh runs lm_eval.
    monkeypatch.chdir(TASKS_DIR)
    loaded_all = manager.load(["uniattn"])
    loaded = loaded_all["tasks"]
    assert set(loaded) == ours
    assert set(loaded_all["group_map"]["uniattn"]) == {"uniattn_medical", "uniattn_general"}
    for name, task in loaded.items():
        docs = list(task.test_docs())
        entry = next(e for e in MANIFEST.values() if e["task"] == name)
        assert len(docs) == entry["items"]
        doc = docs[0]
        # What lm-eval will score: the prompt, then each choice with its own leading space.
        assert task.doc_to_text(doc) == doc["query"]
        assert task.doc_to_choice(doc) == doc["choices"]
        assert task.doc_to_target(doc) == doc["gold"]
        assert task.config.target_delimiter == ""


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_every_item_has_exactly_one_correct_choice(name):
    docs = _docs(name)
    ids = [d["id"] for d in docs]
    assert len(set(ids)) == len(ids)
    assert len({d["query"] for d in docs}) == len(docs), "duplicate prompts"
    for doc in docs:
        choices = doc["choices"]
        assert len(choices) >= 2
        assert len({c.strip().lower() for c in choices}) == len(choices), doc["id"]
        assert isinstance(doc["gold"], int) and 0 <= doc["gold"] < len(choices), doc["id"]
        assert not doc["query"].endswith((" ", "\n")) and all(c.startswith(" ") and c.strip() for c in choices)
    if name == "medmcqa":
        for doc in docs:
            assert doc["choices"] == [" A", " B", " C", " D"]
            options = [line[3:].strip().lower() for line in doc["query"].splitlines() if line[:3] in ("A. ", "B. ", "C. ", "D. ")]
            assert len(options) == 4 and len(set(options)) == 4, doc["id"]
    if name == "pubmedqa":
        assert all(doc["choices"] == [" yes", " no", " maybe"] for doc in docs)


@pytest.mark.parametrize("name", ["pubmedqa", "medmcqa"])
def test_held_out_items_are_not_in_the_training_split(name):
    for doc in _docs(name):
        record = {"instruction": doc["pmc_instruction"], "input": doc["pmc_input"]}
        assert is_eval_record(record), f"{doc['id']} would be trained on"
        # The same question under another instruction opening or other spacing stays held out.
        assert is_eval_record({"instruction": "Being a doctor, answer.", "input": "  " + doc["pmc_input"].upper() + "\n"})


@pytest.mark.skipif(not PMC_SAMPLE.is_file(), reason=f"PMC sample {PMC_SAMPLE} not on this machine")
def test_held_out_items_do_not_occur_in_the_pmc_training_records():
    records = json.loads(PMC_SAMPLE.read_text())
    train, held_out = train_eval_split(records)
    assert len(train) + len(held_out) == len(records) and held_out
    train_questions = {split_key(r) for r in train}
    train_inputs = {" ".join(r["input"].split()) for r in train}
    for name in ("pubmedqa", "medmcqa"):
        for doc in _docs(name):
            assert split_key({"input": doc["pmc_input"]}) not in train_questions
            assert " ".join(doc["pmc_input"].split()) not in train_inputs


def test_split_rule_is_deterministic_and_keyed_on_the_question():
    a = {"instruction": "As a doctor, answer.", "input": "###Question: Is X Y?\n###Context: some text", "output": ""}
    b = {"instruction": "Being a doctor, reply.", "input": "###Question:  is x y?\n###Context: other text", "output": "z"}
    assert split_key(a) == split_key(b) == "is x y?"
    assert eval_score(a) == eval_score(b)
    # No ###Question section: the whole input, else the instruction.
    assert split_key({"instruction": "Say hi", "input": ""}) == "say hi"
    records = [{"instruction": "q", "input": f"question number {i}"} for i in range(4000)]
    train, held_out = train_eval_split(records)
    assert abs(len(held_out) / len(records) - EVAL_FRACTION) < 0.03
    assert train_eval_split(list(reversed(records)))[1] == list(reversed(held_out))
    with pytest.raises(ValueError, match="neither input nor instruction"):
        split_key({"instruction": " ", "input": ""})
    with pytest.raises(ValueError, match="eval_fraction 1.5"):
        is_eval_record(a, eval_fraction=1.5)


# Every salted split of the project (salt, 0 byte, key; SHA-256; first 8 bytes big-endian / 2**64), pinned at
# values computed before the splitters shared one function: a change here moves records across the train /
# held-out, validation, ridge hold-out or pool boundaries and silently invalidates earlier results.
_PINNED = [  # record, eval_score (split.SPLIT_SALT), experiment validation (VAL_SALT), init calc ridge hold-out
    ({"instruction": "Answer.", "input": "###Question: Is aspirin an NSAID?\n###Options: A yes"},
     0.0487160889279507, 0.06783669615614744, 0.10474349528571884),
    ({"instruction": "Say hi", "input": ""}, 0.21343185593396544, 0.9138953607951964, 0.11756700165859452),
    ({"instruction": "x", "input": "\u00dcn\u00efcode  Question?"}, 0.4904035446384196, 0.8357119341459508,
     0.47608361390748805),
]


@pytest.mark.parametrize("record,split,val,ridge", _PINNED)
def test_salted_splits_are_pinned(record, split, val, ridge):
    from uniattn.eval.split import SPLIT_SALT, hash_fraction
    from uniattn.tools.experiment import VAL_SALT, is_validation
    from uniattn.init_calc import holdout_score

    assert eval_score(record) == split == hash_fraction(split_key(record), SPLIT_SALT)
    assert hash_fraction(split_key(record), VAL_SALT) == val
    assert is_validation(record, fraction=val + 1e-12) and not is_validation(record, fraction=val)
    assert holdout_score(record) == ridge


def test_pool_scores_are_pinned():
    from uniattn.pool import _score

    assert _score("is aspirin an nsaid?", "split") == 0.4213631216696001
    assert _score("say hi", "cap") == 0.97721897121762


def test_splits_of_the_shipped_pmc_sample_are_pinned():
    from uniattn.tools.experiment import is_validation
    from uniattn.init_calc import holdout_score

    records = json.loads((REPO / "dataset" / "pmc_llama_instructions_1000.json").read_text())  # the shipped sample
    train, held_out = train_eval_split(records)
    assert (len(records), len(train), len(held_out)) == (1000, 757, 243)
    assert sum(is_validation(r) for r in train) == 81
    assert sum(holdout_score(r) < 0.2 for r in records) == 209


# ----------------------------------------------------------------------------- prepare


def _pmc_records(n: int) -> list[dict]:
    records = []
    for i in range(n):
        records.append(
            {
                "instruction": "As a doctor, answer.\nAnalyze the question given its context. Give both long answer and yes/no decision.",
                "input": f"###Question: Does drug {i} work?\n###Context: A trial of drug {i} in {i + 10} patients.",
                "output": f"It did.\n\n###Answer: {'yes' if i % 3 else 'no'}",
                "source": "pubmedqa.ori_pqaa",
            }
        )
        options = [f"opt{i}a", f"opt{i}b", f"opt{i}c", f"opt{i}{'b' if i % 7 == 0 else 'd'}"]  # every 7th: repeated option
        records.append(
            {
                "instruction": "As a doctor, answer.\nAnalyze the question and answer with the best option.",
                "input": f"###Question: Which is right for case {i}?\n###Options:\n"
                + "".join(f"{letter}. {o}\n" for letter, o in zip("ABCD", options)),
                "output": f"###Rationale: because.\n\n###Answer: OPTION {'ABCD'[i % 4]} IS CORRECT.",
                "source": "medmcqa",
            }
        )
    records.append({"instruction": "Explain the term.", "input": "###Question: What is X?", "output": "###Answer: a thing"})
    return records


def _bigbench_sdist(path: Path) -> Path:
    tasks = {
        "strategyqa": {
            "canary": "CANARY",
            "append_choices_to_input": False,
            "examples": [{"input": f"Is {i} even?", "target_scores": {"Yes": int(i % 2 == 0), "No": int(i % 2 == 1)}} for i in range(30)]
            + [{"input": "Two right answers?", "target_scores": {"Yes": 1, "No": 1}}]
            + [{"input": "Free text only", "target": "x"}],
        },
        "social_iqa": {
            "examples": [
                {"input": f"Sam did thing {i}. Why? ", "target_scores": {"Because": 0, "For fun": 1, "No reason": 0}}
                for i in range(12)
            ]
            + [{"input": "Repeated choices?", "target_scores": {"Same": 1, " Same ": 0}}],
        },
    }
    with tarfile.open(path, "w:gz") as tar:
        for name, body in tasks.items():
            data = json.dumps(body).encode()
            info = tarfile.TarInfo(f"bigbench-1.0.0/bigbench/benchmark_tasks/{name}/task.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_prepare_builds_tasks_from_sources(tmp_path):
    pmc = tmp_path / "pmc.json"
    records = _pmc_records(400)
    pmc.write_text(json.dumps(records))
    sdist = _bigbench_sdist(tmp_path / "bigbench-1.0.0.tar.gz")
    out = tmp_path / "tasks"
    (out).mkdir()
    (out / "_template_yaml").write_text((TASKS_DIR / "_template_yaml").read_text())
    argv = ["--pmc", str(pmc), "--bigbench", str(sdist), "--bigbench-tasks", "strategyqa,social_iqa", "--out", str(out), "--max-items", "50"]
    assert prepare.main(argv) == 0
    first = {p.name: p.read_bytes() for p in (out / "data").iterdir()}
    assert prepare.main(argv) == 0
    assert first == {p.name: p.read_bytes() for p in (out / "data").iterdir()}, "prep is not deterministic"

    manifest = json.loads((out / "data" / "MANIFEST.json").read_text())["tasks"]
    assert set(manifest) == {"pubmedqa", "medmcqa", "strategyqa", "social_iqa"}
    med = [json.loads(line) for line in (out / "data" / "medmcqa.jsonl").read_text().splitlines()]
    # Items with a repeated option (every 7th) are dropped; everything kept is held out.
    case = lambda r: int(r["input"].split("case ")[1].split("?")[0])  # noqa: E731
    expected = [r for r in records if "###Options" in r["input"] and is_eval_record(r) and case(r) % 7]
    assert len(med) == min(50, len(expected)) > 0
    for doc in med:
        assert is_eval_record({"input": doc["pmc_input"]})
        i = int(doc["pmc_input"].split("case ")[1].split("?")[0])
        assert i % 7 != 0 and doc["gold"] == i % 4
    pub = [json.loads(line) for line in (out / "data" / "pubmedqa.jsonl").read_text().splitlines()]
    assert pub and all(d["gold"] == (0 if int(d["pmc_input"].split("drug ")[1].split(" ")[0]) % 3 else 1) for d in pub)
    strategy = [json.loads(line) for line in (out / "data" / "strategyqa.jsonl").read_text().splitlines()]
    assert len(strategy) == 30  # the two-correct and free-text examples are dropped
    doc = next(d for d in strategy if d["query"] == "Q: Is 4 even?\nA:")
    assert doc["choices"] == [" No", " Yes"] and doc["gold"] == 1 and doc["canary"] == "CANARY"
    social = [json.loads(line) for line in (out / "data" / "social_iqa.jsonl").read_text().splitlines()]
    assert len(social) == 12
    for d in social:
        assert "\n  choice: " in d["query"] and d["choices"][d["gold"]] == " For fun"
    assert manifest["strategyqa"]["chance"] == 0.5 and manifest["social_iqa"]["majority"] is None
    # The YAMLs were regenerated and lm-eval can index them.
    assert {p.name for p in out.glob("*.yaml")} >= {"uniattn.yaml", "uniattn_medical.yaml", "uniattn_strategyqa.yaml"}
    from lm_eval.tasks import TaskManager

    assert "uniattn_social_iqa" in TaskManager(include_path=str(out)).all_tasks


@pytest.mark.skipif(not PMC_SAMPLE.is_file(), reason=f"PMC sample {PMC_SAMPLE} not on this machine")
def test_committed_medical_data_matches_a_rebuild(tmp_path):
    out = tmp_path / "tasks"
    out.mkdir()
    assert prepare.main(["--pmc", str(PMC_SAMPLE), "--out", str(out)]) == 0
    for name in ("pubmedqa", "medmcqa"):
        assert (out / "data" / f"{name}.jsonl").read_text() == (DATA / f"{name}.jsonl").read_text()


def test_prepare_rejects_missing_sources(tmp_path, capsys):
    with pytest.raises(SystemExit):
        prepare.main(["--pmc", str(tmp_path / "nope.json")])
    assert "nope.json does not exist" in capsys.readouterr().err
    sdist = _bigbench_sdist(tmp_path / "bb.tar.gz")
    with pytest.raises(ValueError, match=r"no bigbench/benchmark_tasks/<task>/task.json for \['winowhy'\]"):
        prepare.read_bigbench_tasks(sdist, ["winowhy"])


# ----------------------------------------------------------------------------- eval.sh and compare


def _eval_sh(*args, **env):
    return subprocess.run(
        ["bash", str(REPO / "scripts" / "eval.sh"), *args],
        capture_output=True, text=True, env={**os.environ, **env}, timeout=60,
    )


def test_eval_sh_rejects_a_missing_checkpoint(tmp_path):
    result = _eval_sh(str(tmp_path / "missing"))
    assert result.returncode == 2
    assert f"checkpoint directory '{tmp_path / 'missing'}' does not exist" in result.stderr


def test_eval_sh_rejects_unknown_tasks_and_bad_limits(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    result = _eval_sh(str(tmp_path), "uniattn_pubmedqa,hellaswagg")
    assert result.returncode == 2
    assert "unknown task 'hellaswagg'" in result.stderr and "uniattn_medmcqa" in result.stderr
    result = _eval_sh(str(tmp_path), "pubmedqa", LIMIT="0")
    assert result.returncode == 2 and "limit '0'" in result.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    result = _eval_sh(str(empty))
    assert result.returncode == 2 and "has no config.json" in result.stderr


def _fake_results(acc: dict[str, float], n: int) -> dict:
    return {
        "results": {t: {"alias": t, "acc,none": a, "acc_stderr,none": 0.05, "acc_norm,none": a} for t, a in acc.items()},
        "groups": {},
        "group_subtasks": {"uniattn_medical": sorted(acc)},
        "n-samples": {t: {"original": 100, "effective": n} for t in acc},
    }


def test_compare_prints_a_table_and_writes_a_plot(tmp_path, capsys):
    base = tmp_path / "base" / "eval"
    base.mkdir(parents=True)
    (base / "results.json").write_text(json.dumps(_fake_results({"uniattn_pubmedqa": 0.6, "uniattn_medmcqa": 0.3}, 100)))
    other = tmp_path / "other.json"
    other.write_text(json.dumps(_fake_results({"uniattn_pubmedqa": 0.7, "uniattn_medmcqa": 0.25}, 5)))
    png = tmp_path / "plots" / "cmp.png"
    md = tmp_path / "cmp.md"
    assert compare.main([str(tmp_path / "base"), f"ua={other}", "--plot", str(png), "--out", str(md)]) == 0
    table = capsys.readouterr().out
    assert "| task (acc) | base | ua | chance |" in table
    assert "uniattn_pubmedqa* | 0.6000 ± 0.0500 | 0.7000 ± 0.0500 | 0.333 |" in table  # * : item counts differ
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and md.read_text() in table
    assert not list(png.parent.glob(".*")), "temporary plot file left behind"
    with pytest.raises(SystemExit):
        compare.main([str(tmp_path / "nothing-here")])
