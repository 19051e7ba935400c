"""Bad input to the fine-tuning entry points fails before training: clear message, exit 2, nothing written.

All checks of ``uniattn.train`` run before DeepSpeed or the process group starts,
so most cases call its ``main`` in this process; one case goes through the
shell script and the DeepSpeed launcher to pin the exit code users see.
"""

from __future__ import annotations

import json
import os

import pytest
from train_helpers import LAYOUT, REPO, fails, make_checkpoint, make_init, run_script, write_data

from uniattn.train import main as train_main

G, B, E = (str(v) for v in LAYOUT)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_errors")
    base = make_checkpoint(root / "base")
    return {"root": root, "base": base, "data": write_data(root / "data.json", n=8),
            "init": make_init(root / "init.safetensors", base)}


def argv(work, out, mode="uniattn", layout=LAYOUT, init=None, data=None, extra=()):
    args = ["--mode", mode, "--model_dir", str(work["base"]), "--data", str(data or work["data"]),
            "--output_dir", str(out), "--max_length", "256", *extra]
    if layout is not None:
        args += ["--superblock", *(str(v) for v in layout)]
    if mode == "uniattn":
        args += ["--init_path", str(init or work["init"])]
    return args


def test_malformed_json_line(work, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "input": "", "output": "b"}\n{"instruction": "c", "output": \n')
    out = tmp_path / "out"
    fails(capsys, argv(work, out, data=bad), str(bad), "line 2", "not valid JSON")
    assert not out.exists()


def test_record_without_output(work, tmp_path, capsys):
    bad = tmp_path / "no_output.json"
    bad.write_text(json.dumps([{"instruction": "a", "input": "", "output": "b"}, {"instruction": "c", "input": ""}]))
    out = tmp_path / "out"
    fails(capsys, argv(work, out, data=bad), str(bad), "record 1", "'output'")
    assert not out.exists()


def test_missing_init_file(work, tmp_path, capsys):
    out = tmp_path / "out"
    fails(capsys, argv(work, out, init=tmp_path / "nope.safetensors"), "nope.safetensors", "does not exist",
          "train_deepspeed-init_calc.sh")
    assert not out.exists()


def test_init_file_for_another_layout(work, tmp_path, capsys):
    other = make_init(tmp_path / "other.safetensors", work["base"], layout=(2, 0, 5))
    out = tmp_path / "out"
    fails(capsys, argv(work, out, init=other), "another model or layout", "superblock", "'2 0 5'", "'2 1 6'")
    assert not out.exists()


def test_init_file_for_another_model(work, tmp_path, capsys):
    mistral = make_checkpoint(tmp_path / "mistral", family="mistral")
    other = make_init(tmp_path / "mistral.safetensors", mistral)
    out = tmp_path / "out"
    fails(capsys, argv(work, out, init=other), "another model or layout", "base_model_type", "'mistral'")
    assert not out.exists()


@pytest.mark.parametrize("layout,needle", [
    ((2, 1, 9), "superblock end 9 is past the 5 layers"),
    ((1, 1, 6), "superblock size 1 is too small"),
    ((2, 5, 6), "has no follower layer"),
])
def test_layout_that_does_not_fit_the_model(work, tmp_path, capsys, layout, needle):
    out = tmp_path / "out"
    fails(capsys, argv(work, out, mode="softmax", layout=layout), needle)
    assert not out.exists()


def test_argument_combinations(work, tmp_path, capsys):
    out = tmp_path / "out"
    fails(capsys, argv(work, out, mode="plain"), "--superblock is for --mode softmax / uniattn / cla")
    fails(capsys, argv(work, out, mode="softmax", layout=None), "--mode softmax needs --superblock G B E")
    args = argv(work, out)
    i = args.index("--init_path")
    fails(capsys, args[:i] + args[i + 2:], "--mode uniattn needs --init_path", "or --zero_init")
    fails(capsys, argv(work, out, extra=["--zero_init"]), "--zero_init is for --mode uniattn without --init_path")
    fails(capsys, argv(work, out, mode="cla", extra=["--zero_init"]), "--zero_init is for --mode uniattn")
    fails(capsys, argv(work, out, mode="cla", layout=None), "--mode cla needs --superblock G B E")
    fails(capsys, argv(work, out, mode="cla", layout=(2, 4, 6)), "has no follower")
    fails(capsys, argv(work, out, mode="plain", layout=None, extra=["--max_length", "8"]),
          "--max_length 8 leaves no response token")
    fails(capsys, argv(work, out, mode="plain", layout=None, extra=["--deepspeed", "nope.json"]),
          "DeepSpeed config nope.json does not exist")
    bad_model = tmp_path / "empty"
    bad_model.mkdir()
    args = argv(work, out, mode="plain", layout=None)
    args[args.index("--model_dir") + 1] = str(bad_model)
    fails(capsys, args, f"MODEL_DIR {bad_model} has no config.json")
    assert not out.exists()


def test_output_dir_of_another_run_or_tool(work, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    fails(capsys, argv(work, out, mode="plain", layout=None), "not empty and holds no uniattn_run.json")
    (out / "notes.txt").unlink()
    (out / "uniattn_run.json").write_text(json.dumps({"mode": "softmax"}))
    fails(capsys, argv(work, out, mode="plain", layout=None), "holds another run", "mode: there 'softmax', now 'plain'")
    assert sorted(p.name for p in out.iterdir()) == ["uniattn_run.json"]


def test_check_only_accepts_good_arguments(work, tmp_path, capsys):
    out = tmp_path / "out"
    assert train_main(argv(work, out) + ["--check_only"]) == 0
    assert "ok:" in capsys.readouterr().out
    assert not out.exists()


def test_script_reports_the_error_and_writes_nothing(work, tmp_path):
    out = tmp_path / "out"
    env = {"MODEL_DIR": str(work["base"]), "DATA_DIR": str(work["data"]), "OUTPUT_DIR": str(out),
           "NUM_GPUS": "1", "INIT_PATH": str(tmp_path / "missing.safetensors")}
    proc = run_script("train_deepspeed-ft_uniattn.sh", [G, B, E], env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "error: init file" in proc.stderr and "missing.safetensors does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()

    proc = run_script("train_deepspeed-ft_softmax.sh", ["4", "14"], env)  # caught by the script itself
    assert proc.returncode == 2 and "expected 3 numbers G B E" in proc.stderr
    proc = run_script("train_deepspeed-ft_softmax.sh", ["4", "x", "30"], env)
    assert proc.returncode == 2 and "got 'x'" in proc.stderr
    proc = run_script("train_deepspeed-ft.sh", ["4"], env)
    assert proc.returncode == 2 and "takes no arguments" in proc.stderr
    assert not out.exists()


@pytest.mark.parametrize("script,args,name,value", [
    ("train_deepspeed-ft_softmax.sh", ["4", "-1", "30"], "B", "-1"),
    ("train_deepspeed-ft_uniattn.sh", ["4", "14", "3.5"], "E", "3.5"),
    ("train_deepspeed-init_calc.sh", ["-4", "14", "30", "30"], "G", "-4"),
])
def test_scripts_reject_negative_or_fractional_layout_numbers(tmp_path, script, args, name, value):
    # scripts/common.sh's require_int, before any default is resolved: no model is needed to be refused.
    out = tmp_path / "out"
    proc = run_script(script, args, {"MODEL_DIR": str(tmp_path / "no_model"), "OUTPUT_DIR": str(out), "NUM_GPUS": "1"})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"{script}: error: {name} must be a non-negative integer, got '{value}'" in proc.stderr
    assert not out.exists()


def test_a_trainer_callback_that_is_not_one_is_named(tmp_path, capsys):
    from train_helpers import make_checkpoint, write_data

    from uniattn.train import main as train_main

    base = make_checkpoint(tmp_path / "base")
    data = write_data(tmp_path / "data.json")
    common = ["--mode", "plain", "--model_dir", str(base), "--data", str(data), "--output_dir", str(tmp_path / "o"),
              "--check_only", "--max_length", "256"]
    assert train_main(common + ["--trainer_callback", "json:dumps"]) == 2
    assert "not MODULE:NAME of a transformers TrainerCallback" in capsys.readouterr().err
    assert train_main(common + ["--trainer_callback", "no_such_module_x:Cb"]) == 2
    assert "no_such_module_x" in capsys.readouterr().err
    assert train_main(common + ["--trainer_callback", "transformers:PrinterCallback"]) == 0
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("script, args", [("train_deepspeed-init_calc.sh", ["2", "1", "5", "6"]),
                                          ("train_deepspeed-ft.sh", [])])
def test_seed_script_without_an_environment_names_the_setup_command(tmp_path, script, args):
    import subprocess
    import sys

    bare = tmp_path / "bare"  # an interpreter with nothing installed, as on a fresh clone without .venv
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True)
    proc = subprocess.run(["bash", str(REPO / "scripts" / script), *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHON": str(bare / "bin" / "python"), "OUTPUT_DIR": str(tmp_path / "o")})
    assert proc.returncode == 2, proc.stderr
    assert "bash scripts/setup_env.sh train" in proc.stderr and not (tmp_path / "o").exists()
