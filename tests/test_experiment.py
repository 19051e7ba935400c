"""The comparison recipe (uniattn.tools.experiment) end to end on a tiny model: runs, resumes, reports."""

from __future__ import annotations

import json

import pytest
from train_helpers import make_checkpoint

from uniattn.tools.experiment import main as experiment_main
from uniattn.tools.experiment_report import main as report_main

TINY = ["--superblock", "2", "1", "6", "--seeds", "0", "--lrs", "1e-3", "--skip_lm_eval",
        "--train_args", "--max_steps", "1", "--max_length", "256", "--save_steps", "1"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("experiment") / "base")


def test_experiment_runs_resumes_and_reports(base, tmp_path):
    out = tmp_path / "exp"
    argv = ["--out", str(out), "--model_dir", str(base), "--arms", "base", "uniattn", "cla", *TINY]
    assert experiment_main([*argv[:-len(TINY)], "--stop_after", "0", *TINY]) == 3  # pauses before any step
    assert not (out / "init").exists() and not (out / "runs").exists()
    assert experiment_main(argv) == 0
    summary = json.loads((out / "results.json").read_text())
    results = summary["results"]
    assert set(results) == {"base", "uniattn_seed0", "cla_seed0"}
    # The held-out items are the evaluation side of the fixed split; training never saw them.
    assert summary["records"]["heldout"] == 243 and summary["heldout_scored"] == 48
    assert (out / "init" / "uniattn_init.safetensors").is_file()
    layout_layers, followers = 5, 2
    base_kv = results["base"]["cache"]
    assert results["uniattn_seed0"]["cache"] * 2 * layout_layers == base_kv * (2 * layout_layers - followers)
    assert results["cla_seed0"]["cache"] * layout_layers == base_kv * (layout_layers - followers)
    for name in ("uniattn_seed0", "cla_seed0"):
        assert results[name]["loss"] > 0 and len(results[name]["train_losses"]) >= 1
    # Only the final models are kept once a run has finished.
    assert not list(out.glob("runs/*/checkpoint-*")) and not list(out.glob("runs/*/stage*/checkpoint-*"))

    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/timing.json")}
    assert experiment_main(argv) == 0  # a rerun trains and evaluates nothing again
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/timing.json")} == stamps

    assert report_main([str(out / "results.json")]) == 0
    text = (out / "results.md").read_text()
    assert "CLA (cross-layer KV sharing)" in text and "(-40%)" in text and "(-20%)" in text
    assert "One seed only" in text
    assert (out / "results.png").stat().st_size > 10_000


def test_too_little_data_is_a_clear_error(base, tmp_path, capsys):
    data = tmp_path / "few.json"
    data.write_text(json.dumps([{"instruction": "Say hi.", "input": "", "output": "hi"}]))
    out = tmp_path / "exp"
    assert experiment_main(["--out", str(out), "--model_dir", str(base), "--data", str(data), *TINY]) == 2
    assert "too few records" in capsys.readouterr().err
    assert not out.exists() or not any(out.rglob("*.safetensors"))
