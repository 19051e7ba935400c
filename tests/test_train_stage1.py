"""Stage-1 options of ``--mode uniattn`` (ablations of the seed's recipe; the defaults are the recipe itself).

``--stage1_objective kl`` (distillation from the base model, optionally on ``--stage1_data``),
``--stage1_trainable compensation_vo``, ``--stage1_share F`` (equal total steps, disjoint records) and
``--init_scale S``. The two training runs are single processes without DeepSpeed (a preset of this file),
on the tiny random LLaMA of ``train_helpers``, a few steps each; everything else runs in this process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from train_helpers import LAYOUT, REPO, fails, make_checkpoint, make_init, state_dict, write_data

from uniattn.data import collate, load_records, tokenize
from uniattn.eval.split import train_eval_split
from uniattn.train.distill import DistillTrainer, distill_kl, load_teacher
from uniattn.train import (build_model, check_everything, parse_args,
                           plan_stages, split_records)
from uniattn.train import main as train_main

G, B, E = (str(v) for v in LAYOUT)
FOLLOWERS = (2, 4)
PRESET = """training:
  learning_rate: 1.0e-3
  lr_scheduler_type: constant
  weight_decay: 0.0
  bf16: false
  per_device_train_batch_size: 2
  effective_batch_size: 2
  logging_steps: 1
  save_strategy: "no"
  report_to: none
"""
LAUNCH_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage1")
    base = make_checkpoint(root / "base")
    data = write_data(root / "data.json", n=24)
    # unlabelled distillation text: other records than the training data
    other = [{"instruction": r["instruction"], "input": r.get("input", ""), "output": r["output"]}
             for r in json.loads(write_data(root / "other_full.json", n=40).read_text())[24:]]
    (root / "other.json").write_text(json.dumps(other))
    (root / "preset.yaml").write_text(PRESET)
    return {"root": root, "base": base, "data": data, "other": root / "other.json",
            "init": make_init(root / "init.safetensors", base), "preset": root / "preset.yaml"}


def argv(work, out, *extra, init=True):
    args = ["--mode", "uniattn", "--model_dir", str(work["base"]), "--data", str(work["data"]),
            "--superblock", G, B, E, "--output_dir", str(out), "--preset", str(work["preset"]),
            "--max_length", "256"]
    if init:
        args += ["--init_path", str(work["init"])]
    return args + [str(a) for a in extra]


def run(work, out, *extra):
    """``python -m uniattn.train`` in a fresh process (one process, no DeepSpeed), as a user would start it."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    proc = subprocess.run([sys.executable, "-m", "uniattn.train", *argv(work, out, *extra)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return out


def info(path):
    return json.loads((path / "uniattn_train.json").read_text())


def training_records(work):
    return train_eval_split(load_records(work["data"]))[0]


@pytest.fixture(scope="module")
def kl_run(work):
    """Distillation, W_c only, equal-steps protocol: 6 steps split 3 + 3."""
    return run(work, work["root"] / "kl", "--stage1_objective", "kl", "--max_steps", 6, "--stage1_share", 0.5)


@pytest.fixture(scope="module")
def vo_run(work):
    """Distillation on other text, W_c + followers' V/O, 2 steps split 1 + 1."""
    return run(work, work["root"] / "kl-vo", "--stage1_objective", "kl", "--stage1_trainable", "compensation_vo",
               "--stage1_data", work["other"], "--max_steps", 2, "--stage1_share", 0.5)


def changed_tensors(stage1: dict, base: dict, init: dict) -> set[str]:
    """Names whose stage-1 value differs from where stage 1 started (W_c: the init file; the rest: the base)."""
    assert not set(stage1) - set(base) - set(init), "stage 1 saved tensors that are neither the base's nor W_c"
    return {k for k, v in stage1.items() if not torch.equal(v, init[k] if k in init else base[k])}


def test_kl_stage1_trains_only_wc(work, kl_run):
    base, init, stage1 = state_dict(work["base"]), load_file(work["init"]), state_dict(kl_run / "stage1" / "final")
    assert set(init) <= set(stage1)
    assert changed_tensors(stage1, base, init) == set(init)  # every W_c moved, every other tensor bit-identical
    meta = info(kl_run / "stage1" / "final")
    assert meta["objective"] == "kl" and meta["trainable"] == "compensation"
    assert all(loss >= 0 for _, loss in meta["logged_losses"])  # a KL divergence
    assert info(kl_run / "final")["objective"] == "lm"  # stage 2 is the SFT loss as always


def test_kl_vo_trains_wc_and_follower_vo(work, vo_run):
    base, init, stage1 = state_dict(work["base"]), load_file(work["init"]), state_dict(vo_run / "stage1" / "final")
    vo = {f"model.layers.{i}.self_attn.{p}_proj.{w}" for i in FOLLOWERS for p in "vo" for w in ("weight", "bias")}
    assert vo <= set(stage1)
    assert changed_tensors(stage1, base, init) == set(init) | vo
    meta = info(vo_run / "stage1" / "final")
    assert meta["trainable"] == "compensation_vo" and meta["stage1_data"] == str(work["other"].resolve())
    # stage 1 read the other file (unlabelled); stage 2 all training records; the steps still add up
    assert meta["records"] == len(train_eval_split(load_records(work["other"]))[0])
    assert info(vo_run / "final")["records"] == len(training_records(work))
    assert meta["global_step"] == 1 and info(vo_run / "final")["global_step"] == 1


def test_equal_steps_accounting(work, kl_run):
    one, two = info(kl_run / "stage1" / "final"), info(kl_run / "final")
    assert one["global_step"] == 3 and two["global_step"] == 3
    assert one["global_step"] + two["global_step"] == 6
    plan = one["stage_plan"]
    assert plan == two["stage_plan"]
    assert plan["stage1"]["max_steps"] + plan["stage2"]["max_steps"] == 6
    n = len(training_records(work))
    assert one["records"] + two["records"] == n
    first, second = split_records(n, 0.5, 42)  # the Trainer's default --seed
    assert len(first) == one["records"] and len(second) == two["records"]
    assert not set(first) & set(second) and sorted(first + second) == list(range(n))
    assert split_records(n, 0.5, 42) == (first, second)  # deterministic
    assert split_records(n, 0.5, 7) != (first, second)   # and seeded


def test_stage_plan_records_are_the_split(work, tmp_path):
    records = training_records(work)
    script, targs, config = parse_args(argv(work, tmp_path / "out", "--stage1_share", 0.3, "--max_steps", 10,
                                            "--seed", 5))
    plan = check_everything(script, targs, config).plan
    first, second = split_records(len(records), 0.3, 5)
    assert plan["stage1"]["records"] == [records[i] for i in first]
    assert plan["stage2"]["records"] == [records[i] for i in second]
    assert (plan["stage1"]["max_steps"], plan["stage2"]["max_steps"]) == (3, 7)
    # with epochs each stage runs them over its own part; without a share both stages get everything
    script, targs, config = parse_args(argv(work, tmp_path / "out", "--stage1_share", 0.3, "--max_steps", -1))
    plan = check_everything(script, targs, config).plan
    assert plan["stage1"]["max_steps"] is None and len(plan["stage1"]["records"]) == len(first)
    # 'seed': the seed's protocol, both stages every record and the whole schedule
    script, targs, config = parse_args(argv(work, tmp_path / "out", "--stage1_share", "seed", "--max_steps", 10))
    plan = check_everything(script, targs, config).plan
    assert plan["stage1"]["records"] == plan["stage2"]["records"] == records
    assert plan["stage1"]["max_steps"] is plan["stage2"]["max_steps"] is None and script.stage1_share is None
    # the default, 0.1, gives each stage at least one step and one record even where 0.1 rounds to 0
    for steps, want in ((10, (1, 9)), (4, (1, 3)), (30, (3, 27))):
        script, targs, config = parse_args(argv(work, tmp_path / "out", "--max_steps", steps, "--seed", 5))
        plan = check_everything(script, targs, config).plan
        assert script.stage1_share == 0.1 and (plan["stage1"]["max_steps"], plan["stage2"]["max_steps"]) == want
    first, second = split_records(len(records), 0.1, 5, exact=False)
    assert len(first) == max(1, round(0.1 * len(records))) and plan["stage1"]["records"] == [records[i] for i in first]
    assert plan["stage2"]["records"] == [records[i] for i in second]
    assert not (tmp_path / "out").exists()


def reference_kl(student_logits, teacher_logits, mask):
    """Independent: torch's kl_div per position, averaged over the real tokens."""
    log_student = torch.log_softmax(student_logits.double(), -1)
    log_teacher = torch.log_softmax(teacher_logits.double(), -1)
    per_position = F.kl_div(log_student, log_teacher, reduction="none", log_target=True).sum(-1)
    return per_position[mask.bool()].mean()


def test_kl_loss_matches_reference_and_is_zero_for_equal_models():
    g = torch.Generator().manual_seed(0)
    student = torch.randn(3, 7, 13, generator=g, requires_grad=True)
    teacher = torch.randn(3, 7, 13, generator=g) * 2
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, 2:] = 0
    want = reference_kl(student, teacher, mask)
    (grad_want,) = torch.autograd.grad(want, student)
    for chunk in (None, 1, 3):  # one chunk, and chunked with recomputation in the backward pass
        got = distill_kl(student, teacher, mask, chunk_positions=chunk)
        (grad_got,) = torch.autograd.grad(got, student)
        assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-7), (chunk, got, want)
        assert torch.allclose(grad_got, grad_want, rtol=1e-4, atol=1e-7)
    # padded positions do not count, whatever their logits
    noisy = student.detach().clone()
    noisy[2, 2:] += 100
    assert torch.allclose(distill_kl(noisy, teacher, mask), distill_kl(student.detach(), teacher, mask))
    # KL(p || p) = 0
    assert distill_kl(teacher, teacher, mask).abs() < 1e-6
    assert reference_kl(teacher, teacher, mask).abs() < 1e-12


def test_compute_loss_is_kl_from_the_base_model(work, tmp_path):
    script, targs, config = parse_args(argv(work, tmp_path / "out", "--stage1_objective", "kl"))
    checked = check_everything(script, targs, config)
    stages = plan_stages("uniattn", tmp_path / "out")
    student = build_model(script, stages[0], stages, torch.float32, checked.init_tensors)
    teacher = load_teacher(script, torch.float32, torch.device("cpu"))
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert teacher.config.model_type == "llama"  # the plain base checkpoint, not the UniAttn model
    examples = [tokenize(r, checked.tokenizer, 256) for r in checked.records[:3]]
    assert len({len(e.input_ids) for e in examples}) > 1  # the batch is padded
    batch = collate(examples, checked.tokenizer.pad_token_id)
    batch["use_cache"] = False
    loss = DistillTrainer.compute_loss(SimpleNamespace(teacher=teacher), student, dict(batch))
    with torch.no_grad():
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        want = reference_kl(student(**inputs).logits, teacher(**inputs).logits, batch["attention_mask"])
    assert loss.requires_grad and torch.allclose(loss.double(), want, rtol=1e-5)
    assert loss > 0  # the followers' shared softmax changes the distribution


def test_init_scale_scales_the_init_file(work, tmp_path, capsys):
    out = tmp_path / "out"
    assert train_main(argv(work, out, "--init_scale", 0.5, "--check_only")) == 0
    assert "ok:" in capsys.readouterr().out and not out.exists()
    script, targs, config = parse_args(argv(work, out, "--init_scale", 0.5))
    checked = check_everything(script, targs, config)
    assert checked.identity["init_scale"] == 0.5
    stages = plan_stages("uniattn", out)
    params = dict(build_model(script, stages[0], stages, torch.float32, checked.init_tensors).named_parameters())
    init = load_file(work["init"])
    for k, v in init.items():
        assert torch.equal(params[k].detach(), 0.5 * v), k
    assert not out.exists()


def test_bad_stage1_arguments(work, tmp_path, capsys):
    out = tmp_path / "out"
    softmax = ["--mode", "softmax", "--model_dir", str(work["base"]), "--data", str(work["data"]),
               "--superblock", G, B, E, "--output_dir", str(out), "--preset", str(work["preset"])]
    fails(capsys, softmax + ["--stage1_objective", "kl"], "--stage1_objective", "of --mode uniattn, not --mode softmax")
    fails(capsys, softmax + ["--init_scale", "0.5", "--stage1_share", "0.5"], "--init_scale --stage1_share",
          "not --mode softmax")
    for share in ("0", "1", "1.5", "-0.2", "nan"):
        fails(capsys, argv(work, out, "--stage1_share", share), f"--stage1_share {float(share)} is outside (0, 1)")
    for scale in ("0", "-1", "inf"):
        fails(capsys, argv(work, out, "--init_scale", scale),
              f"--init_scale {float(scale)} must be a finite number > 0")
    fails(capsys, argv(work, out, "--zero_init", "--init_scale", "0.5", init=False),
          "--init_scale 0.5 scales the init-calc W_c, but --zero_init")
    fails(capsys, argv(work, out, "--stage1_share", "0.1", "--max_steps", "4"),
          "--stage1_share 0.1 of --max_steps 4 gives stage 1 0 and stage 2 4", "at least 1")
    fails(capsys, argv(work, out, "--stage1_share", "0.01"), "gives stage 1 0 and stage 2", "records")
    with pytest.raises(SystemExit) as exit_info:  # argparse's own exit: usage line, then the message
        train_main(argv(work, out, "--stage1_share", "half"))
    assert exit_info.value.code == 2 and "'half' is neither a share in (0, 1) such as 0.1 nor 'seed'" in capsys.readouterr().err
    fails(capsys, argv(work, out, "--max_steps", "1"), "--stage1_share 0.1 of --max_steps 1", "--stage1_share seed")
    fails(capsys, argv(work, out, "--stage1_objective", "kl", "--stage1_data", str(work["other"]), "--max_steps", "-1"),
          "(the default)", "needs --max_steps N", "--stage1_share seed")
    fails(capsys, argv(work, out, "--stage1_data", str(work["other"])), "--stage1_data", "add --stage1_objective kl")
    fails(capsys, argv(work, out, "--stage1_objective", "kl", "--stage1_data", str(work["other"]), "--stage1_share",
                       "0.5", "--max_steps", "-1"), "needs --max_steps N")
    missing = tmp_path / "nope.json"
    fails(capsys, argv(work, out, "--stage1_objective", "kl", "--stage1_data", missing, "--max_steps", 4), str(missing), "does not exist")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "input": "", "output": "b"}\n{"instruction": \n')
    fails(capsys, argv(work, out, "--stage1_objective", "kl", "--stage1_data", bad, "--max_steps", 4), str(bad), "line 2",
          "not valid JSON")
    with pytest.raises(SystemExit) as exit_info:  # argparse: the choices are listed
        train_main(argv(work, out, "--stage1_objective", "mse"))
    assert exit_info.value.code == 2 and "invalid choice: 'mse'" in capsys.readouterr().err
    assert not out.exists()
    # distillation does not need the init file: kl with --zero_init is fine
    assert train_main(argv(work, out, "--stage1_objective", "kl", "--zero_init", "--check_only", init=False)) == 0
    assert not out.exists()


def test_resume_refuses_other_stage1_settings(work, kl_run, tmp_path, capsys):
    same = argv(work, kl_run, "--stage1_objective", "kl", "--max_steps", 6, "--stage1_share", 0.5)
    assert train_main(same) == 0 and "already finished" in capsys.readouterr().out
    fails(capsys, argv(work, kl_run, "--max_steps", 6, "--stage1_share", 0.5), "holds another run",
          "stage1_objective: there 'kl', now 'lm'")
    fails(capsys, same + ["--stage1_trainable", "compensation_vo"],
          "stage1_trainable: there 'compensation', now 'compensation_vo'")
    fails(capsys, same + ["--init_scale", "0.5"], "init_scale: there 1.0, now 0.5")
    fails(capsys, same + ["--seed", "7"], "stage1_split")
    fails(capsys, argv(work, kl_run, "--stage1_objective", "kl", "--max_steps", 8, "--stage1_share", 0.5),
          "stage1_split")
    # A run file written before these options existed holds the seed's recipe: it resumes with the defaults only.
    old = tmp_path / "old"
    old.mkdir()
    saved = {k: info(kl_run / "final")[k] for k in ("mode", "model_dir", "data", "superblock", "init_path")}
    (old / "uniattn_run.json").write_text(json.dumps(saved))
    assert train_main(argv(work, old, "--check_only")) == 0  # the default share does not apply to it
    fails(capsys, argv(work, old, "--stage1_share", "0.1", "--check_only"), "stage1_share: there None, now 0.1")
    fails(capsys, argv(work, old, "--stage1_objective", "kl"), "stage1_objective: there 'lm', now 'kl'")
