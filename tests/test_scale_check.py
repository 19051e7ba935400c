"""uniattn.tools.scale_check on the CPU: 1 vs 2 processes (gloo) of the seed's scripts, a tiny random model.

One run of the tool (plain + uniattn, ZeRO-2, 4 steps, kill/resume; softmax left out for time, it goes through
the same launcher and Trainer) is most of the file's time, nearly all of it DeepSpeed launches: about 2 minutes
on an idle 2-core machine, more when other jobs share the cores. The first DeepSpeed start on a fresh machine
also builds its CPU op (~70 s, cached in TORCH_EXTENSIONS_DIR afterwards).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from train_helpers import make_checkpoint, write_data

from uniattn import net
from uniattn.tools import scale_check
from uniattn.tools.scale_check import main

# Measured on this machine (2 cores, torch 2.13 CPU, fp32, 4 steps at lr 1e-3): W_c of 1 and 2 init-calc
# processes are bitwise equal (0.0), and the per-step losses of 1 and 2 training processes differ by at most
# 1.4e-6 for uniattn (both stages; 4.8e-7 for plain): float32 rounding, as two ranks reduce the same records'
# gradients in another order. LOSS_ATOL leaves ~14x margin and is still far below a real difference (a lost
# or repeated batch moves the loss by ~1e-2 here).
WC_RTOL = 1e-4
LOSS_ATOL = 2e-5


def shm_buffers(ports) -> set[Path]:
    # only the rendezvous ports the tool handed out: other jobs on this machine have buffers of their own
    found = Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*")
    return {p for p in found if p.name.split("_")[-2] in ports}


def record(ports: set) -> int:
    port = net.free_port()
    ports.add(str(port))
    return port


def argv(model, data, out, *more):
    return ["--model_dir", str(model), "--data", str(data), "--layout", "2", "1", "6", "--gpus", "1", "2",
            "--zero", "2", "--modes", "plain", "uniattn", "--steps", "4", "--effective_batch_size", "4",
            "--max_length", "256", "--num_samples", "8", "--out", str(out),
            "--extra_args", "--learning_rate 1e-3 --warmup_steps 0", *more]


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    model, data = make_checkpoint(root / "base"), write_data(root / "data.json", n=64)
    ports = set()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(scale_check, "free_port", lambda: record(ports))
        assert main(argv(model, data, root / "out", "--kill_resume")) == 0
    return {"root": root, "model": model, "data": data, "out": root / "out", "leaked": shm_buffers(ports)}


def test_one_and_two_processes_agree(checked):
    result = json.loads((checked["out"] / "scale_check.json").read_text())
    rows = {(r["mode"], r["zero"], r["n"]): r for r in result["runs"]}
    assert set(rows) == {(m, 2, n) for m in ("plain", "uniattn") for n in (1, 2)}
    assert [r["n"] for r in result["init"]] == [1, 2]
    assert all(r["max_rel_diff"] <= WC_RTOL for r in result["init"])
    for row in rows.values():
        assert "error" not in row, row
        assert row["generate"] == "ok"
        assert row["max_abs_loss_diff"] is not None and row["max_abs_loss_diff"] <= LOSS_ATOL, row
        assert row["heldout_loss"] > 0 and row["records_per_s"] > 0 and row["wall_s"] > 0
        # uniattn under the default --stage1_share 0.1: stage 1 gets 1 of the 4 steps, stage 2 the other 3
        steps = {"stage1": 1, "final": 3} if row["mode"] == "uniattn" else {"final": 4}
        assert [(stage, step) for stage, step, _ in row["losses"]] == [(s, i) for s, n in steps.items()
                                                                       for i in range(1, n + 1)]
        assert all(loss > 0 for _, _, loss in row["losses"])  # every batch had response tokens
        # uniattn.train.step_stats through --trainer_callback: every stage's throughput and peak memory
        stages_run = {"stage1", "stage2"} if row["mode"] == "uniattn" else {"train"}
        assert set(row["stats"]) == stages_run, row["stats"]
        for st in row["stats"].values():
            assert st["steps"] == steps["stage1" if st is row["stats"].get("stage1") else "final"]
            assert st["tokens_per_s_per_device"] > 0 and st["median_step_s"] > 0 and st["mfu"] is None
            assert 0.1 < st["peak_gib_per_device"] < 24 and st["peak_kind"] == "peak_rss_gib"
    kill = result["kill_resume"]
    assert kill["killed"] and kill["resumed"] and kill["equal"], kill
    assert not checked["leaked"], f"left in /dev/shm: {sorted(checked['leaked'])}"
    md = (checked["out"] / "scale_check.md").read_text()
    assert "| uniattn | 2 | 2 |" in md and "resumed True" in md and "| uniattn | 2 | 2 | stage2 |" in md


def test_a_rerun_skips_finished_runs(checked):
    import time

    start = time.monotonic()
    assert main(argv(checked["model"], checked["data"], checked["out"], "--kill_resume")) == 0
    assert time.monotonic() - start < 60  # only loss eval of nothing new, and the reload checks


def test_bad_input_exits_2_before_writing(tmp_path, capsys):
    model, data, out = make_checkpoint(tmp_path / "base"), write_data(tmp_path / "data.json"), tmp_path / "never"
    assert main(argv(model, data, out, "--layout", "2", "1", "9")) == 2  # the model has 5 layers
    assert "--layout 2 1 9 does not fit" in capsys.readouterr().err and not out.exists()
    assert main(argv(model, tmp_path / "missing.json", out)) == 2
    assert "missing.json is not a file" in capsys.readouterr().err and not out.exists()
    assert main(argv(model, data, out, "--effective_batch_size", "3")) == 2
    assert "--gpus 2 does not divide" in capsys.readouterr().err and not out.exists()
