"""End-to-end fine-tuning through the shell scripts and DeepSpeed on CPU, in one and in two processes.

Each run is a tiny random model (5 layers, hidden 48; LLaMA, plus one Mistral and one
Gemma-2 run) for 3 optimizer steps with a checkpoint after every step, so the training
takes seconds; launching it (DeepSpeed launcher, imports) takes longer. The first run on a fresh machine
also builds DeepSpeed's small CPU communication op (~70 s on 2 cores, cached in
~/.cache/torch_extensions afterwards). ZeRO-2 and ZeRO-3 are both exercised.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import LAYOUT, make_checkpoint, make_init, run_script, state_dict, write_data
from transformers import AutoModelForCausalLM, AutoTokenizer

from uniattn.data import build_prompt, load_records
from uniattn.train import main as train_main

G, B, E = (str(v) for v in LAYOUT)
FOLLOWERS = (2, 4)
STEPS = 3
COMMON = (f"--max_steps {STEPS} --save_steps 1 --logging_steps 1 --per_device_train_batch_size 2 "
          "--effective_batch_size 4 --max_length 256 --learning_rate 1e-3")
ZERO = {2: "configs/ds_zero2.json", 3: "configs/ds_zero3.json"}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    base = make_checkpoint(root / "base")
    return {"root": root, "base": base, "llama": base, "data": write_data(root / "data.json"),
            "init": make_init(root / "init.safetensors", base)}


def base_of(work, family):
    if family not in work:
        work[family] = make_checkpoint(work["root"] / f"base-{family}", family=family)
    return work[family]


def shm_buffers() -> set[Path]:
    return set(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*"))


def train(work, script, out, nproc, zero, layout=True, env=None, extra="", family="llama", seed_protocol=True):
    args = [G, B, E] if layout else []
    if script == "train_deepspeed-ft_uniattn.sh" and seed_protocol:
        extra = f"--stage1_share seed {extra}"  # both stages the whole schedule: STEPS each
    env = {"MODEL_DIR": str(base_of(work, family)), "DATA_DIR": str(work["data"]), "OUTPUT_DIR": str(out),
           "NUM_GPUS": str(nproc), "INIT_PATH": str(work["init"]),
           "EXTRA_ARGS": f"{COMMON} --deepspeed {ZERO[zero]} {extra}", **(env or {})}
    before = shm_buffers()
    proc = run_script(script, args, env)
    proc.leaked_shm = shm_buffers() - before  # ok() checks that a finished run removed its all-reduce buffers
    return proc


def train_argv(work, out):
    """The flags the UniAttn script passes, for calling uniattn.train in this process (checks only)."""
    return ["--mode", "uniattn", "--model_dir", str(work["base"]), "--data", str(work["data"]),
            "--superblock", G, B, E, "--init_path", str(work["init"]), "--output_dir", str(out),
            "--deepspeed", ZERO[2], *COMMON.split(), "--stage1_share", "seed"]


def ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert not getattr(proc, "leaked_shm", None), f"left in /dev/shm: {sorted(proc.leaked_shm)}"
    return proc


def reload_and_generate(path: Path, uniattn: bool, family: str = "llama"):
    config = json.loads((path / "config.json").read_text())
    assert config["use_cache"] is True  # training turns the cache off per batch, not in the saved config
    if uniattn:
        assert config["model_type"] == f"uniattn_{family}"
        assert "AutoModelForCausalLM" in config["auto_map"] and (path / "modeling_uniattn.py").is_file()
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompt = build_prompt({"instruction": "Name a vitamin.", "input": ""})
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 4
    return model


def changed(a: torch.Tensor, b: torch.Tensor) -> bool:
    return not torch.equal(a, b)


@pytest.fixture(scope="module")
def uniattn_run(work):
    """One uninterrupted single-process UniAttn run (ZeRO-2); the resume test compares against it."""
    out = work["root"] / "uniattn-1p"
    ok(train(work, "train_deepspeed-ft_uniattn.sh", out, 1, zero=2))
    return out


@pytest.mark.parametrize("mode,nproc,zero,family", [
    ("plain", 1, 2, "llama"), ("plain", 2, 3, "mistral"), ("softmax", 1, 3, "gemma2"), ("softmax", 2, 2, "llama"),
])
def test_plain_and_softmax_train_and_reload(work, mode, nproc, zero, family):
    out = work["root"] / f"{mode}-{nproc}p-{family}"
    script = "train_deepspeed-ft.sh" if mode == "plain" else "train_deepspeed-ft_softmax.sh"
    ok(train(work, script, out, nproc, zero, layout=mode != "plain", family=family))
    # the presets keep the two newest checkpoints (save_total_limit 2)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [f"checkpoint-{STEPS - 1}", f"checkpoint-{STEPS}"]
    reload_and_generate(out / f"checkpoint-{STEPS - 1}", mode != "plain", family)  # a mid-run checkpoint loads too
    reload_and_generate(out / "final", mode != "plain", family)
    info = json.loads((out / "final" / "uniattn_train.json").read_text())
    assert info["global_step"] == STEPS and info["world_size"] == nproc and len(info["logged_losses"]) == STEPS
    base, final = state_dict(base_of(work, family)), state_dict(out / "final")
    if mode == "softmax":
        # Softmax unification only: followers without W_c (no tensor, no matmul), only their Q/K gone
        assert not [k for k in final if ".compensation." in k], "softmax mode builds followers without W_c"
        assert json.loads((out / "final" / "config.json").read_text())["superblock_compensation"] is False
        assert set(final) <= set(base)
        assert set(base) - set(final) == {f"model.layers.{i}.self_attn.{p}_proj.{w}" for i in FOLLOWERS
                                          for p in "qk" for w in ("weight", "bias")} & set(base)
        assert info["trainable"] == "all"
        assert json.loads((out / "uniattn_run.json").read_text())["compensation"] is False
    assert all(changed(final[k], base[k]) for k in final)


def test_softmax_run_begun_with_wc_resumes_with_it(work, tmp_path):
    # A softmax run begun when its followers still had a frozen zero W_c (its run file records no
    # "compensation") keeps that W_c, so its checkpoints still resume; a new run has none.
    from uniattn.train import build_model, check_everything, parse_args, plan_stages

    def built(out):
        argv = train_argv(work, out)
        argv[argv.index("uniattn")] = "softmax"
        for flag in ("--init_path", "--stage1_share"):  # uniattn's own
            i = argv.index(flag)
            del argv[i:i + 2]
        script, targs, config = parse_args(argv)
        checked = check_everything(script, targs, config)
        stages = plan_stages("softmax", out, softmax_compensation=checked.softmax_compensation)
        return checked, stages[0], build_model(script, stages[0], stages, torch.float32, None)

    checked, stage, model = built(tmp_path / "new")
    assert checked.identity["compensation"] is False and stage.trainable == "all"
    assert not any(".compensation." in n for n, _ in model.named_parameters())
    assert all(p.requires_grad for p in model.parameters()) and model.config.superblock_compensation is False
    old = tmp_path / "old"
    old.mkdir()
    (old / "uniattn_run.json").write_text(json.dumps({k: v for k, v in checked.identity.items() if k != "compensation"}))
    checked, stage, model = built(old)
    assert checked.softmax_compensation and checked.identity["compensation"] is True
    assert stage.trainable == "all_but_compensation"
    wc = {n: p for n, p in model.named_parameters() if ".compensation." in n}
    assert len(wc) >= len(FOLLOWERS) and all(not p.requires_grad and torch.count_nonzero(p) == 0 for p in wc.values())
    assert all(p.requires_grad for n, p in model.named_parameters() if n not in wc)
    new_run = tmp_path / "resumed"
    new_run.mkdir()
    (new_run / "uniattn_run.json").write_text(json.dumps({**checked.identity, "compensation": False}))
    assert built(new_run)[0].softmax_compensation is False


def test_uniattn_stage1_trains_only_wc_and_stage2_everything(work, uniattn_run):
    base, init = state_dict(work["base"]), load_file(work["init"])
    stage1 = state_dict(uniattn_run / "stage1" / "final")
    final = state_dict(uniattn_run / "final")
    wc = sorted(k for k in stage1 if ".compensation." in k)
    assert wc == sorted(init)
    for k in stage1:
        if k in init:
            assert changed(stage1[k], init[k]), f"stage 1 did not train {k}"
            # started from the init file, not from zero: a few small steps stay close to it
            assert torch.allclose(stage1[k], init[k], atol=STEPS * 1e-3 * 1.5)
        else:
            assert torch.equal(stage1[k], base[k]), f"stage 1 changed {k}, which must be frozen"
    assert set(final) == set(stage1)
    assert [k for k in final if not changed(final[k], stage1[k])] == [], "stage 2 must train every tensor"
    # Every checkpoint is a loadable UniAttn model; stage 2 starts where stage 1 ended.
    reload_and_generate(uniattn_run / "stage1" / f"checkpoint-{STEPS}", uniattn=True)
    reload_and_generate(uniattn_run / "final", uniattn=True)
    assert json.loads((uniattn_run / "final" / "uniattn_train.json").read_text())["stage"] == "stage2"


def test_uniattn_two_processes_zero3(work):
    out = work["root"] / "uniattn-2p"
    # the default share: stage 1 gets 1 of the 3 steps, which the preset's warmup would spend at learning rate 0
    ok(train(work, "train_deepspeed-ft_uniattn.sh", out, 2, zero=3, seed_protocol=False, extra="--warmup_steps 0"))
    stage1, final, base = state_dict(out / "stage1" / "final"), state_dict(out / "final"), state_dict(work["base"])
    init = load_file(work["init"])
    assert all(torch.equal(stage1[k], base[k]) for k in stage1 if k not in init)
    # ZeRO-3 partitions W_c as it loads; the init file must still land in it (gathered, then written)
    assert all(changed(stage1[k], init[k]) and torch.allclose(stage1[k], init[k], atol=STEPS * 1.5e-3) for k in init)
    assert all(changed(final[k], stage1[k]) for k in final)
    info = json.loads((out / "final" / "uniattn_train.json").read_text())
    assert info["world_size"] == 2
    # the default --stage1_share 0.1: stage 1 at least one of the STEPS, stage 2 the rest, disjoint records
    plan = info["stage_plan"]
    assert info["stage1_share"] == 0.1 and (plan["stage1"]["max_steps"], plan["stage2"]["max_steps"]) == (1, STEPS - 1)
    total = plan["stage1"]["records"] + plan["stage2"]["records"]
    assert plan["stage1"]["records"] == max(1, round(0.1 * total)) and plan["stage2"]["records"] >= 1
    reload_and_generate(out / "final", uniattn=True)


def test_cla_trains_and_reloads(work):
    out = work["root"] / "cla-1p-mistral"
    ok(train(work, "train_deepspeed-ft_cla.sh", out, 1, zero=2, family="mistral"))
    model = reload_and_generate(out / "final", uniattn=True, family="mistral")
    assert model.config.superblock_sharing == "kv"
    base, final = state_dict(base_of(work, "mistral")), state_dict(out / "final")
    assert set(base) - set(final) == {f"model.layers.{i}.self_attn.{p}_proj.weight" for i in FOLLOWERS for p in "kv"}
    assert set(final) <= set(base)  # no compensation, nothing new
    assert all(changed(final[k], base[k]) for k in final)


def test_uniattn_zero_init_starts_wc_at_zero(work):
    out = work["root"] / "uniattn-zero-init"
    ok(train(work, "train_deepspeed-ft_uniattn.sh", out, 1, zero=2, env={"INIT_PATH": "zero"}))
    base, stage1 = state_dict(work["base"]), state_dict(out / "stage1" / "final")
    wc = [k for k in stage1 if ".compensation." in k]
    assert wc and all(torch.count_nonzero(stage1[k]) > 0 for k in wc)  # trained away from zero ...
    assert all(stage1[k].abs().max() <= STEPS * 1e-3 * 1.5 for k in wc)  # ... by a few small steps from zero
    assert all(torch.equal(stage1[k], base[k]) for k in stage1 if k not in wc)
    assert json.loads((out / "final" / "uniattn_train.json").read_text())["zero_init"] is True


def test_sigkill_then_restart_resumes_to_the_same_weights(work, uniattn_run, capsys):
    out = work["root"] / "uniattn-killed"
    tests = str(Path(__file__).resolve().parent)
    killed = train(work, "train_deepspeed-ft_uniattn.sh", out, 1, zero=2,
                   env={"UNIATTN_KILL_STAGE": "stage2", "UNIATTN_KILL_STEP": "2",
                        "PYTHONPATH": os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")]))},
                   extra="--trainer_callback kill_callback:KillAfterSave")
    assert killed.returncode != 0
    assert (out / "stage1" / "final").is_dir() and not (out / "final").exists()
    assert sorted(p.name for p in (out / "stage2").glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    stage1_mtime = (out / "stage1" / "final" / "model.safetensors").stat().st_mtime_ns

    # A damaged newest checkpoint is reported, with the fix, before anything runs or is written.
    broken = work["root"] / "uniattn-broken"
    shutil.copytree(out, broken)
    argv = train_argv(work, broken)
    state = broken / "stage2" / "checkpoint-2" / "trainer_state.json"
    state.write_text(state.read_text()[:40])
    assert train_main(argv) == 2
    err = capsys.readouterr().err
    assert "checkpoint-2" in err and "trainer_state.json" in err and "resume from checkpoint-1" in err
    shutil.rmtree(broken / "stage2" / "checkpoint-2")
    weights = broken / "stage2" / "checkpoint-1" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert train_main(argv) == 2
    err = capsys.readouterr().err
    assert "checkpoint-1" in err and "model.safetensors" in err and "start this stage again" in err

    restarted = ok(train(work, "train_deepspeed-ft_uniattn.sh", out, 1, zero=2))
    log = restarted.stdout + restarted.stderr
    assert "stage1 already finished" in log and "resuming from" in log and "checkpoint-2" in log
    assert (out / "stage1" / "final" / "model.safetensors").stat().st_mtime_ns == stage1_mtime
    resumed, reference = state_dict(out / "final"), state_dict(uniattn_run / "final")
    assert resumed.keys() == reference.keys()
    for k in reference:
        assert torch.equal(resumed[k], reference[k]), f"{k} differs after resuming"

    assert train_main(train_argv(work, out)) == 0  # a third start has nothing left to do
    assert "already finished" in capsys.readouterr().out


def test_fixture_records_keep_response_tokens(work):
    # Guard for the fixtures above: the shortened records still have response tokens within 256 tokens.
    from uniattn.data import tokenize

    tokenizer = AutoTokenizer.from_pretrained(work["base"])
    labels = [tokenize(r, tokenizer, 256).labels for r in load_records(work["data"])]
    assert all(any(t != -100 for t in lab) for lab in labels)


def test_two_processes_through_a_localhost_hostfile(work):
    # What one machine allows of a multi-node launch: DeepSpeed's hostfile path, with this host's two slots.
    out = work["root"] / "hostfile"
    hostfile = work["root"] / "hostfile.txt"
    hostfile.write_text("localhost slots=2\n")
    proc = ok(train(work, "train_deepspeed-ft.sh", out, 2, zero=2, layout=False,
                    env={"HOSTFILE": str(hostfile), "NUM_GPUS": ""}))
    assert f"launching on the nodes of {hostfile}" in proc.stderr
    info = json.loads((out / "final" / "uniattn_train.json").read_text())
    assert info["world_size"] == 2 and info["global_step"] == STEPS
    bad = train(work, "train_deepspeed-ft.sh", work["root"] / "nohost", 2, zero=2, layout=False,
                env={"HOSTFILE": str(work["root"] / "missing.txt")})
    assert bad.returncode == 2 and "is not a file" in bad.stderr and not (work["root"] / "nohost").exists()


def test_a_rank_that_dies_ends_the_launch_with_an_error_and_no_final_model(work):
    import time

    out = work["root"] / "one-rank-killed"
    tests = str(Path(__file__).resolve().parent)
    start = time.monotonic()
    proc = train(work, "train_deepspeed-ft.sh", out, 2, zero=2, layout=False,
                 env={"UNIATTN_KILL_STAGE": out.name, "UNIATTN_KILL_STEP": "1", "UNIATTN_KILL_RANK": "1",
                      "PYTHONPATH": os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")]))},
                 extra="--trainer_callback kill_callback:KillAfterSave")
    assert proc.returncode != 0 and time.monotonic() - start < 240
    assert not (out / "final").exists() and not list(out.glob(".final*"))
