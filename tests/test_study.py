"""The quality study (uniattn.tools.study) end to end on a tiny model: arms, equal steps, KV savings, report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from train_helpers import make_checkpoint

from uniattn.data import default_data_file, load_records
from uniattn.io import write_jsonl
from uniattn.tools.study import POOL_FILES
from uniattn.tools.study import main as study_main
from uniattn.tools.study_report import main as report_main

LAYERS = 5
# 2 UniAttn followers (layers 2, 4) and, for CLA / drop at the same KV saving, 1 follower (layer 4).
POINTS = ["--points", "2=2,1,6", "1=2,3,5", "--frontier", "2", "--main", "2"]
STEPS = 4
ARMS_NO_BASE = ["plain", "softmax", "uniattn", "uniattn_seed", "cla", "drop"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("study") / "base")


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    records = [{k: (v[:120] if isinstance(v, str) else v) for k, v in r.items()}
               for r in load_records(default_data_file("pmc"))[:60]]
    out = tmp_path_factory.mktemp("pool")
    parts = {"train.jsonl": records[:40], "val_domain.jsonl": records[40:45], "val_general.jsonl": records[45:50],
             "heldout_domain.jsonl": records[50:55], "heldout_general.jsonl": records[55:60]}
    for name, rows in parts.items():
        write_jsonl(out / name, rows)
    return out


def test_study_runs_every_arm_with_equal_steps_and_reports(base, pool, tmp_path):
    out = tmp_path / "study"
    argv = ["--pool", str(pool), "--out", str(out), "--model_dir", str(base), *POINTS,
            "--arms", "base", "plain", "softmax", "uniattn", "uniattn_seed", "cla", "drop",
            "--seeds", "0", "--lrs", "1e-3", "--steps", str(STEPS), "--batch", "2", "--max_length", "128",
            "--init_samples", "8", "--jobs", "2", "--launcher", "python", "--alt_layouts", "3,2,5"]
    assert study_main([*argv, "--stop_after", "0"]) == 3  # pauses before any step, writes no run
    assert not (out / "runs").exists()
    assert study_main(argv) == 0
    data = json.loads((out / "results.json").read_text())
    res = {r["run"]["arm"]: r for r in data["results"].values() if not r["run"].get("layout")}
    alt = [r for r in data["results"].values() if r["run"].get("layout")]
    assert [(r["run"]["arm"], r["layout"]) for r in alt] == [("uniattn", [3, 2, 5])]
    assert set(res) == {"base", "plain", "softmax", "uniattn", "uniattn_seed", "cla", "drop"}
    base_kv = res["base"]["kv"]["cache"]
    # Equal KV saving: UniAttn / softmax drop K of 2 of 5 layers, CLA / drop K and V of 1.
    for arm in ("softmax", "uniattn", "cla", "drop"):
        assert res[arm]["kv"]["cache"] * 2 * LAYERS == base_kv * (2 * LAYERS - 2), arm
    assert res["plain"]["kv"]["cache"] == base_kv
    # Equal-steps accounting: UniAttn's two stages together take the single-stage arms' steps; the seed's
    # protocol takes twice as many.
    steps = {arm: sum(v["global_step"] for k, v in res[arm]["train"].items() if isinstance(v, dict))
             for arm in ("plain", "softmax", "uniattn", "uniattn_seed", "cla", "drop")}
    assert steps == {"plain": STEPS, "softmax": STEPS, "uniattn": STEPS, "uniattn_seed": 2 * STEPS,
                     "cla": STEPS, "drop": STEPS}
    assert res["uniattn"]["train"]["stage1"]["global_step"] == STEPS // 2
    for arm, r in res.items():
        assert set(r["loss"]) == {"val_domain", "val_general", "heldout_domain", "heldout_general", "val"}, arm
    # Models are removed once scored; a rerun trains nothing again.
    assert not list((out / "runs").glob("*/final"))
    stamp = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/scores.json")}
    assert study_main(argv) == 0
    assert stamp == {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/scores.json")}
    # --collect rebuilds the same results from the cache without running anything.
    assert study_main([*argv, "--collect"]) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["results"] == data["results"] and again["chosen_lr"] == data["chosen_lr"]
    # A fresh folder seeded from that results file trains nothing either (how a new GPU machine resumes).
    fresh = tmp_path / "fresh"
    assert study_main([*argv[:argv.index("--out") + 1], str(fresh), *argv[argv.index("--out") + 2:],
                       "--seed_from", str(out / "results.json"), "--collect", "--arms", *ARMS_NO_BASE]) == 0
    seeded = json.loads((fresh / "results.json").read_text())["results"]
    assert seeded == {k: v for k, v in data["results"].items() if k != "base"}
    assert report_main([str(out / "results.json"), "--md", str(tmp_path / "r.md"), "--png", str(tmp_path / "f.png")]) == 0
    text = (tmp_path / "r.md").read_text()
    assert "UniAttn (equal steps)" in text and "layer drop" in text and "seed spread" in text
    lines = text.splitlines()
    for i, line in enumerate(lines):  # a delimiter row with another cell count than its header breaks the table
        if line.startswith("|---"):
            assert line.count("|") == lines[i - 1].count("|"), lines[i - 1]
    assert (tmp_path / "f.png").stat().st_size > 1000


@pytest.mark.parametrize("bad, message", [
    (["--points", "3=2,1,6", "--frontier", "3", "--main", "3", "--arms", "uniattn"], "has 2 followers"),
    (["--points", "2=2,1,6", "--frontier", "2", "--main", "2", "--arms", "cla"], "needs layouts for [1]"),
    (["--points", "2=2,1,6", "--frontier", "2", "--main", "4", "--arms", "uniattn"], "--main 4"),
    (["--points", "2=2,1", "--frontier", "2", "--main", "2"], "not F=G,B,E"),
    (["--points", "2=2,1,6", "--frontier", "2", "--main", "2", "--arms", "uniattn", "--alt_layouts", "2,3,5"],
     "has 1 followers"),
])
def test_bad_layouts_exit_2_and_write_nothing(base, pool, tmp_path, capsys, bad, message):
    out = tmp_path / "study"
    assert study_main(["--pool", str(pool), "--out", str(out), "--model_dir", str(base), *bad]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_missing_pool_file_exits_2(base, pool, tmp_path, capsys):
    partial = tmp_path / "pool"
    partial.mkdir()
    (partial / POOL_FILES[0]).write_text((pool / POOL_FILES[0]).read_text())
    assert study_main(["--pool", str(partial), "--out", str(tmp_path / "o"), "--model_dir", str(base)]) == 2
    assert "build_pool.sh" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_ablation_arms_get_their_init_and_flags(base, pool, tmp_path, monkeypatch):
    import uniattn.tools.study as study

    calls = []

    def fake_run(cmd, log, env=None):  # init calc is tested in test_init_calc; here only what the study asks for
        calls.append(cmd)
        out = tmp_path / "o" / "init" / cmd[cmd.index("--output") + 1].rsplit("/", 1)[-1]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(b"x")
        return 0.0

    monkeypatch.setattr(study, "run_logged", fake_run)
    args = study.build_parser().parse_args(["--pool", str(pool), "--out", str(tmp_path / "o"),
                                            "--model_dir", str(base), *POINTS])
    s = study.Study(args, LAYERS)
    fixed, auto = s.init_calc(2), s.init_calc(2, ridge_auto=True)
    assert fixed != auto and len(calls) == 2
    assert calls[0][calls[0].index("--ridge") + 1] == "0.0001" and calls[1][calls[1].index("--ridge") + 1] == "auto"
    assert s.init_calc(2, ridge_auto=True) == auto and len(calls) == 2  # cached
    flags = study.arm_flags("uniattn_kl_vo", auto, 0.5)
    assert flags[flags.index("--stage1_objective") + 1] == "kl"
    assert flags[flags.index("--stage1_trainable") + 1] == "compensation_vo"
    assert flags[flags.index("--stage1_share") + 1] == "0.5"
    ridge = study.arm_flags("uniattn_ridge", auto, 0.5)
    assert ridge[ridge.index("--init_path") + 1] == str(auto) and "--stage1_share" in ridge
    seed_flags = study.arm_flags("uniattn_seed", fixed, 0.5)
    assert seed_flags[seed_flags.index("--stage1_share") + 1] == "seed"  # the default is a share now
    short = study.arm_flags("uniattn_short", auto, 0.5)
    assert short[short.index("--stage1_share") + 1] == "0.1" and "uniattn_short" in study.RIDGE_AUTO_ARMS


def test_slots_deal_gpus_round_robin_and_come_back():
    from uniattn.tools.study import Slots

    slots = Slots(4, ["2", "5"])
    with slots.take() as a, slots.take() as b, slots.take() as c:
        assert [a, b, c] == [{"CUDA_VISIBLE_DEVICES": g} for g in ("2", "5", "2")]
    assert slots.free.qsize() == 4
    with Slots(1, []).take() as env:
        assert env == {}  # no GPU: the child keeps the parent's environment


def test_each_arm_searches_alone_and_ablations_take_uniattns_rate(base, pool, tmp_path, monkeypatch):
    import uniattn.tools.study as study

    best = {"plain": 2e-5, "uniattn": 5e-4, "drop": 1e-4}  # plain's and uniattn's optimum lie past the grid's edges
    seen = []

    def fake(self, run):
        seen.append(run)
        val = abs(__import__("math").log10(run.lr / best.get(run.arm, 1e-4)))
        return {"loss": {"val": val}, "kv": {}, "run": run.__dict__}

    monkeypatch.setattr(study.Study, "train_and_score", fake)
    argv = ["--pool", str(pool), "--out", str(tmp_path / "o"), "--model_dir", str(base), *POINTS,
            "--arms", "plain", "uniattn", "uniattn_wc0", "drop", "softmax", "--lr_for", "softmax=2e-4",
            "--seeds", "0", "1", "--lrs", "3e-5", "1e-4", "3e-4", "--max_widen", "2"]
    assert study.main(argv) == 0
    data = json.loads((tmp_path / "o" / "results.json").read_text())
    assert data["chosen_lr"] == {"plain": 3e-5, "uniattn": 3e-4, "drop": 1e-4, "uniattn_wc0": 3e-4, "softmax": 2e-4}
    assert set(data["validation_loss"]["plain"]) == {"9e-06", "3e-05", "0.0001", "0.0003"}  # widened once (x 10/3)
    assert set(data["validation_loss"]["uniattn"]) == {"3e-05", "0.0001", "0.0003", "0.001"}
    assert not {r.lr for r in seen if r.arm == "softmax"} - {2e-4}  # a fixed rate is not searched
    assert {(r.arm, r.seed) for r in seen if r.arm == "uniattn_wc0"} == {("uniattn_wc0", 0), ("uniattn_wc0", 1)}


def test_stop_after_still_scores_a_trained_model(base, pool, tmp_path, monkeypatch):
    import uniattn.tools.study as study

    def fake_score(cmd, log, env=None):
        model = cmd[cmd.index("uniattn.tools.loss_eval") + 1]
        files = cmd[cmd.index("--data") + 1:cmd.index("--limit")]
        out = Path(cmd[cmd.index("--json") + 1])
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({model: {"kv": {"cache": 1}, **{f: {"loss": 2.0} for f in files}}}))
        return 0.0

    monkeypatch.setattr(study, "run_logged", fake_score)
    args = study.build_parser().parse_args(["--pool", str(pool), "--out", str(tmp_path / "o"), "--model_dir", str(base),
                                            *POINTS, "--stop_after", "0"])
    s = study.Study(args, LAYERS)
    run = study.Run("plain", 0, 1e-4, 0)
    (tmp_path / "o" / "runs" / run.name / "final").mkdir(parents=True)  # trained before the deadline passed
    assert s.train_and_score(run)["loss"]["val"] == 2.0
    with pytest.raises(study.Paused):  # but nothing new starts
        s.train_and_score(study.Run("plain", 0, 3e-4, 0))


def test_lm_eval_scores_every_arm_and_the_report_shows_them(base, pool, tmp_path, capsys):
    # A real lm-eval run per model (3 items per task here; the study's figures use every item).
    out = tmp_path / "study"
    argv = ["--pool", str(pool), "--out", str(out), "--model_dir", str(base), *POINTS, "--arms", "base", "plain",
            "--seeds", "0", "--lrs", "1e-3", "--steps", str(STEPS), "--batch", "2", "--max_length", "128",
            "--launcher", "python"]
    assert study_main(argv) == 0  # scored without lm-eval first: a later --lm_eval call must train plain again
    before = json.loads((out / "results.json").read_text())["results"]
    assert all("lm_eval" not in r for r in before.values())
    assert study_main([*argv, "--lm_eval", "--lm_eval_limit", "3"]) == 0
    data = json.loads((out / "results.json").read_text())
    for key, res in data["results"].items():
        scores = res["lm_eval"]
        assert {"uniattn_pubmedqa", "uniattn_medmcqa", "uniattn_winowhy"} <= set(scores), (key, scores)
        assert all(s["n"] == 3 and 0 <= s["acc"] <= 1 for s in scores.values()), scores
    assert report_main([str(out / "results.json"), "--md", str(tmp_path / "r.md"), "--png", str(tmp_path / "f.png")]) == 0
    text = (tmp_path / "r.md").read_text()
    assert "### lm-eval" in text and "pubmedqa (n=3)" in text


def test_lm_eval_without_lm_eval_installed_exits_2(base, pool, tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    code = study_main(["--pool", str(pool), "--out", str(tmp_path / "s"), "--model_dir", str(base), *POINTS,
                       "--arms", "plain", "--lm_eval"])
    assert code == 2 and "setup_env.sh eval" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_lm_eval_tables_average_tasks_and_pair_by_seed():
    from uniattn.tools import study_report

    def res(arm, f, seed, accs, layout=(3, 12, 30)):
        return {"run": {"arm": arm, "followers": f, "lr": 1e-4, "seed": seed, "layout": None},
                "layout": None if arm == "plain" else list(layout), "kv": {"cache": 80 if f else 100},
                "lm_eval": {t: {"acc": a, "n": 10} for t, a in zip(("uniattn_a", "uniattn_b"), accs)}}
    results = {"p0": res("plain", 0, 0, (0.5, 0.7)), "p1": res("plain", 0, 1, (0.4, 0.6)),
               "u0": res("uniattn", 12, 0, (0.5, 0.5)), "u1": res("uniattn", 12, 1, (0.3, 0.5))}
    data = {"main": 12, "results": results}
    groups = study_report.group(results)
    table = study_report.lm_eval_table(data, groups)
    plain_row = next(r for r in table if r.startswith("| plain FT"))
    uni_row = next(r for r in table if r.startswith("| UniAttn (equal steps)"))
    # plain's task means 0.6 and 0.5; UniAttn's 0.5 and 0.4: paired -0.1 on both seeds, so spread 0
    assert "| 0.550 ± 0.071 | - |" in plain_row and "| 0.450 ± 0.071 | -0.100 ± 0.000 (n=2) |" in uni_row
    frontier = study_report.lm_eval_frontier(data, groups, base_kv=100)
    assert frontier[2] == "| UniAttn (equal steps) | 12 | 3 12 30 | 20.0% | 0.450 ± 0.071 | -0.100 ± 0.000 (n=2) |"
