"""Issue 12, item 2: the seed's commands on 1 and 2 GPUs, and whether 2 GPUs give the same model faster.

    python -m uniattn.tools.scale_check --model_dir M --data F --layout 4 14 30 --gpus 1 2 --zero 2 3 \\
        --steps 20 --out DIR [--kill_resume] [--num_samples 64]

Every step runs a script of scripts/ as a user would (MODEL_DIR, DATA_DIR, OUTPUT_DIR, NUM_GPUS, INIT_PATH,
EXTRA_ARGS): init calc for each process count n (W_c compared with the first n's), then plain, softmax and
uniattn fine-tuning for each ZeRO stage and n, fp32, the same effective batch for every n (per-device batch =
effective / n, no gradient accumulation), seed 0. Reported per run: per-step losses against the first n, held-out
loss (uniattn.tools.loss_eval, eval split, 16 items), wall time, records per second and the speed-up against the
first n, and whether the final checkpoint reloads and generates. ``--kill_resume`` SIGKILLs a uniattn run on the
largest n once a stage-2 checkpoint is complete, reruns it and compares the weights with the uninterrupted run.
Results: DIR/scale_check.md (also printed) and DIR/scale_check.json. A rerun skips every finished run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from ..io import write_json, write_text
from ..net import free_port
from ..train.step_stats import summarise
from .bench import gpu_driver
from .experiment import REPO, device_name, run_logged, versions

logger = logging.getLogger(__name__)
SCRIPTS = {"plain": "train_deepspeed-ft.sh", "softmax": "train_deepspeed-ft_softmax.sh",
           "uniattn": "train_deepspeed-ft_uniattn.sh"}
RUNTIME = re.compile(r"'train_runtime': '?([0-9.]+)")  # the Trainer's own figure, one per stage


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_dir", required=True)
    p.add_argument("--data", required=True, help="SFT records, a JSON/JSONL file")
    p.add_argument("--layout", nargs=3, type=int, required=True, metavar=("G", "B", "E"))
    p.add_argument("--gpus", nargs="+", type=int, default=[1, 2], help="process counts; the first is the reference")
    p.add_argument("--zero", nargs="+", type=int, choices=(2, 3), default=[2, 3])
    p.add_argument("--modes", nargs="+", choices=tuple(SCRIPTS), default=list(SCRIPTS))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--effective_batch_size", type=int, default=16, help="records per optimizer step, for every n")
    p.add_argument("--max_length", type=int, default=1024)
    p.add_argument("--num_samples", type=int, default=64, help="init-calc calibration records")
    p.add_argument("--extra_args", default="", help="more uniattn.train flags for every run, e.g. '--warmup_steps 0'")
    p.add_argument("--kill_resume", action="store_true")
    p.add_argument("--peak_tflops", type=float, default=989.0,
                   help="the accelerator's dense peak for MFU (989: H100 / H200 SXM, bf16); MFU = 6 x parameters "
                        "x tokens/s per device / peak, so it means something for bf16 runs (--extra_args '--bf16 True')")
    p.add_argument("--out", required=True)
    return p.parse_args(argv)


def input_error(args) -> str | None:
    """What is wrong with the input, with the fix; None when it can run. Runs before anything is written."""
    from ..modeling.layout import SuperBlockLayout

    config = Path(args.model_dir) / "config.json"
    if not config.is_file():
        return f"--model_dir {args.model_dir} has no config.json; pass a Hugging Face checkpoint folder"
    if not Path(args.data).is_file():
        return f"--data {args.data} is not a file; pass a JSON/JSONL file of SFT records"
    args.num_layers = json.loads(config.read_text())["num_hidden_layers"]
    try:
        SuperBlockLayout(*args.layout, args.num_layers)
    except ValueError as err:
        return f"--layout {' '.join(map(str, args.layout))} does not fit {args.model_dir}: {err}"
    visible = torch.cuda.device_count()
    if visible and max(args.gpus) > visible:
        return f"--gpus {max(args.gpus)} is more than the {visible} visible GPU(s); pass --gpus up to {visible}"
    bad = [n for n in args.gpus if n < 1 or args.effective_batch_size % n]
    if bad:
        return (f"--gpus {bad[0]} does not divide --effective_batch_size {args.effective_batch_size}; "
                f"pick a batch that every process count divides")
    if args.kill_resume and (args.steps < 2 or "uniattn" not in args.modes):
        return "--kill_resume needs --steps >= 2 (a checkpoint before the end) and uniattn in --modes"
    return None


def script_env(args, out: Path, n: int, extra: str = "", init: Path | None = None) -> dict:
    env = {"MODEL_DIR": str(args.model_dir), "DATA_DIR": str(args.data), "OUTPUT_DIR": str(out),
           "NUM_GPUS": str(n), "EXTRA_ARGS": extra, "PYTHON": sys.executable, "MASTER_PORT": str(free_port())}
    return {**env, "INIT_PATH": str(init)} if init else env


def train_flags(args, n: int, zero: int, save_steps: int) -> str:
    return (f"--max_steps {args.steps} --logging_steps 1 --save_steps {save_steps} --seed 0 --bf16 False "
            f"--effective_batch_size {args.effective_batch_size} "
            f"--per_device_train_batch_size {args.effective_batch_size // n} --max_length {args.max_length} "
            f"--deepspeed configs/ds_zero{zero}.json "
            # per-step time, tokens and peak memory of every rank (uniattn.train.step_stats)
            "--trainer_callback uniattn.train.step_stats:StepStats --include_num_input_tokens_seen true "
            f"{args.extra_args}")


def timed_run(cmd, log: Path, env, timing: Path) -> dict:
    """Run once and keep wall time and the Trainer's runtime in ``timing``; a rerun reads them back."""
    if timing.is_file():
        return json.loads(timing.read_text())
    start = log.stat().st_size if log.is_file() else 0
    wall = run_logged(cmd, log, env)
    with open(log, "rb") as f:  # only this invocation's output
        f.seek(start)
        runtimes = [float(v) for v in RUNTIME.findall(f.read().decode(errors="replace"))]
    return json.loads(write_json(timing, {"wall_s": round(wall, 2), "train_s": round(sum(runtimes), 2)
                                          if runtimes else None}).read_text())


def init_calc(args, out: Path, n: int) -> dict:
    folder = out / "init" / f"n{n}"
    cmd = ["bash", str(REPO / "scripts" / "train_deepspeed-init_calc.sh"), *map(str, args.layout), str(args.num_layers)]
    extra = f"--num_samples {args.num_samples} --max_length {args.max_length}"
    t = timed_run(cmd, out / "logs" / f"init_n{n}.log", script_env(args, folder, n, extra), folder / "timing.json")
    return {"n": n, "path": str(folder / "uniattn_init.safetensors"), "wall_s": t["wall_s"]}


def max_rel_diff(a_path, b_path) -> float:
    """max over tensors of max|a - b| / max|b| (norm-wise: elements near zero do not blow it up)."""
    from safetensors.torch import load_file

    a, b = load_file(a_path), load_file(b_path)
    if a.keys() != b.keys():
        return float("inf")
    return max(float((a[k].double() - b[k].double()).abs().max() / b[k].double().abs().max().clamp_min(1e-30))
               for k in b)


def stage_infos(final: Path) -> list[tuple[str, dict]]:
    """(stage, its uniattn_train.json) of every stage of a run: uniattn's stage 1 first, then the last stage."""
    paths = (("stage1", final.parent / "stage1" / "final"), ("final", final))
    return [(stage, json.loads((path / "uniattn_train.json").read_text()))
            for stage, path in paths if (path / "uniattn_train.json").is_file()]


def parameters(final: Path) -> int:
    """Parameter count of a saved checkpoint, from the safetensors headers (nothing is loaded)."""
    import math

    from safetensors import safe_open

    total = 0
    for file in final.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            total += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return total


def stage_stats(args, run: Path, mode: str) -> dict:
    """Per stage: median step time, tokens/s per device, MFU (on a GPU) and the largest rank's peak memory."""
    dirs = {"stage1": run / "stage1", "stage2": run / "stage2"} if mode == "uniattn" else {"train": run}
    n_params = parameters(run / "final")
    out = {}
    for name, folder in dirs.items():
        stats = summarise(folder)
        if stats:
            stats["mfu"] = (6 * n_params * stats["tokens_per_s_per_device"] / (args.peak_tflops * 1e12)
                            if torch.cuda.is_available() else None)
            out[name] = stats
    return out


def train(args, out: Path, mode: str, zero: int, n: int, init: Path) -> dict:
    name = f"{mode}_z{zero}_n{n}"
    run = out / "runs" / name
    cmd = ["bash", str(REPO / "scripts" / SCRIPTS[mode]), *([] if mode == "plain" else map(str, args.layout))]
    env = script_env(args, run, n, train_flags(args, n, zero, args.steps), init if mode == "uniattn" else None)
    row = {"mode": mode, "zero": zero, "n": n, "final": str(run / "final")}
    try:
        if not (run / "final").is_dir():
            logger.info("training %s", name)
        row.update(timed_run(cmd, out / "logs" / f"{name}.log", env, run / "timing.json"))
    except RuntimeError as err:  # one failed run is a finding, not the end of the check
        logger.error("%s failed: %s", name, err)
        return {**row, "error": str(err)[-500:]}
    infos = stage_infos(run / "final")
    row["losses"] = [[stage, step, loss] for stage, info in infos for step, loss in info["logged_losses"]]
    row["stats"] = stage_stats(args, run, mode)
    # the steps each stage took: uniattn's stage 1 takes its --stage1_share, or the whole schedule under 'seed'
    records = sum(info["global_step"] for _, info in infos) * args.effective_batch_size
    seconds = row["train_s"] or row["wall_s"]
    row["records_per_s"] = round(records / seconds, 3)
    return row


def heldout(args, out: Path, finals: list[str]) -> dict:
    """Held-out loss of every final checkpoint, scored once (cached in DIR/heldout.json)."""
    cache = out / "heldout.json"
    known = json.loads(cache.read_text()) if cache.is_file() else {}
    todo = [f for f in finals if f not in known]
    if todo:
        tmp = out / "heldout_new.json"
        run_logged([sys.executable, "-m", "uniattn.tools.loss_eval", *todo, "--data", str(args.data),
                    "--split", "eval", "--limit", "16", "--max-length", str(args.max_length), "--json", str(tmp)],
                   out / "logs" / "loss_eval.log")
        known.update({k: v[str(args.data)]["loss"] for k, v in json.loads(tmp.read_text()).items()})
        write_json(cache, known)
        tmp.unlink()
    return known


def generates(path: str) -> str:
    """'ok' when the checkpoint reloads with trust_remote_code and greedily generates 8 tokens, else the error."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..data import build_prompt

    try:
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
        ids = tokenizer(build_prompt({"instruction": "Name a vitamin.", "input": ""}), return_tensors="pt").input_ids
        got = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False).shape[1] - ids.shape[1]
        return "ok" if got == 8 else f"generated {got} tokens, not 8"
    except Exception as err:  # noqa: BLE001  (the report names whatever went wrong)
        return f"{type(err).__name__}: {err}"[:300]


def kill_then_resume(args, out: Path, zero: int, n: int, init: Path, reference: Path) -> dict:
    """SIGKILL a uniattn run once a stage-2 checkpoint is complete, rerun the same command, compare weights."""
    from safetensors.torch import load_file

    from ..train.resume import check_checkpoint, checkpoints

    run, log = out / "runs" / f"kill_z{zero}_n{n}", out / "logs" / f"kill_z{zero}_n{n}.log"
    result_file = run / "kill_resume.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    cmd = ["bash", str(REPO / "scripts" / SCRIPTS["uniattn"]), *map(str, args.layout)]
    env = script_env(args, run, n, train_flags(args, n, zero, max(1, args.steps // 2)), init)
    killed = False
    if not checkpoints(run / "stage2"):
        logger.info("kill/resume: training until a stage-2 checkpoint, then SIGKILL")
        with open(log, "a") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **env}, cwd=REPO,
                                    start_new_session=True)  # its own process group: the launcher and every rank
            while proc.poll() is None:
                if complete_checkpoint(run / "stage2", n, check_checkpoint, checkpoints):
                    os.killpg(proc.pid, signal.SIGKILL)
                    break
                time.sleep(0.05)
            # the race is lost when the run finished between the check and the kill: report it, claim nothing
            killed = proc.wait() == -signal.SIGKILL and not (run / "final").exists()
        # killed ranks never reach their atexit cleanup of DeepSpeed's CPU all-reduce buffers (this port's only)
        for buf in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_*_{env['MASTER_PORT']}_*"):
            buf.unlink(missing_ok=True)
    start = log.stat().st_size
    result = {"n": n, "zero": zero, "killed": killed}
    try:
        run_logged(cmd, log, {**env, "MASTER_PORT": str(free_port())})
    except RuntimeError as err:
        return {**result, "error": str(err)[-500:]}
    result["resumed"] = "resuming from" in log.read_text(errors="replace")[start:]
    a, b = load_file(run / "final" / "model.safetensors"), load_file(reference / "model.safetensors")
    result["equal"] = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b)
    result["max_abs_diff"] = max(float((a[k] - b[k]).abs().max()) for k in b) if a.keys() == b.keys() else None
    return json.loads(write_json(result_file, result).read_text())


def complete_checkpoint(folder: Path, n: int, check, found) -> bool:
    """Whether ``folder`` holds a checkpoint the restart can resume from (every rank's files written).

    Polled often: a cheap look first (the Trainer writes trainer_state.json last, after each rank's RNG
    state), the repo's full check (resume.check_checkpoint) only once those are there."""
    for path in reversed(found(folder)) if folder.is_dir() else []:
        if (path / "trainer_state.json").is_file() and len(list(path.glob("rng_state*.pth"))) >= n:
            try:
                check(path, n)
                return True
            except Exception:  # noqa: BLE001  (a rank is still writing)
                pass
    return False


def compare(rows: list[dict], gpus: list[int]) -> None:
    """Per (mode, zero): each n's max |loss difference| per step and speed-up against the first n."""
    for row in rows:
        ref = next(r for r in rows if (r["mode"], r["zero"], r["n"]) == (row["mode"], row["zero"], gpus[0]))
        if "losses" in row and "losses" in ref:
            mine, theirs = {tuple(x[:2]): x[2] for x in row["losses"]}, {tuple(x[:2]): x[2] for x in ref["losses"]}
            same = mine.keys() == theirs.keys()
            row["max_abs_loss_diff"] = max(abs(mine[k] - theirs[k]) for k in mine) if same else None
            row["speedup"] = round(row["records_per_s"] / ref["records_per_s"], 3)


def markdown(result: dict) -> str:
    meta = result["meta"]
    lines = [f"# Scale check ({meta['device']}, driver {meta['driver']})", "", f"    {meta['command']}", "",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()), "",
             "| init calc n | seconds | max rel. diff of W_c vs first n |", "|---|---|---|"]
    lines += [f"| {r['n']} | {r['wall_s']:.1f} | {r['max_rel_diff']:.2e} |" for r in result["init"]]
    lines += ["", "Records/s: optimizer steps x effective batch / the Trainer's train_runtime (both stages for "
              "uniattn, each its own steps); speed-up and loss difference against the first n.", "",
              "| mode | ZeRO | n | wall s | records/s | speed-up | max abs loss diff per step | last loss | "
              "held-out loss | reload + generate |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        if "error" in r:
            lines.append(f"| {r['mode']} | {r['zero']} | {r['n']} | failed: {r['error'][-120:]!r} |||||||")
            continue
        diff = r.get("max_abs_loss_diff")
        lines.append(f"| {r['mode']} | {r['zero']} | {r['n']} | {r['wall_s']:.1f} | {r['records_per_s']:.2f} | "
                     f"{r.get('speedup', 0):.2f}x | {'n/a' if diff is None else f'{diff:.2e}'} | "
                     f"{r['losses'][-1][2]:.4f} | {r['heldout_loss']:.4f} | {r['generate']} |")
    lines += ["", "Per stage, steps after the first: median step time, input tokens/s per device (padding included), "
              "MFU = 6 x parameters x tokens/s per device / peak (GPU only), the largest rank's peak memory "
              "(GPU: allocated; CPU: resident).", "",
              "| mode | ZeRO | n | stage | median step s | tokens/s per device | MFU | peak GiB per device |",
              "|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        for stage, st in r.get("stats", {}).items():
            mfu = "-" if st["mfu"] is None else f"{st['mfu']:.1%}"
            lines.append(f"| {r['mode']} | {r['zero']} | {r['n']} | {stage} | {st['median_step_s']:.3f} | "
                         f"{st['tokens_per_s_per_device']:.0f} | {mfu} | {st['peak_gib_per_device']:.2f} |")
    kr = result.get("kill_resume")
    if kr:
        lines += ["", f"Kill and resume (uniattn, ZeRO-{kr['zero']}, n={kr['n']}): killed {kr['killed']}, "
                  f"resumed {kr.get('resumed')}, weights equal to the uninterrupted run {kr.get('equal')} "
                  f"(max abs diff {kr.get('max_abs_diff')}){'; error: ' + kr['error'] if 'error' in kr else ''}"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    problem = input_error(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return check(args, argv)
    except RuntimeError as err:  # init calc or loss eval failed: nothing to compare against
        print(f"error: {err}", file=sys.stderr)
        return 1


def check(args, argv) -> int:
    out = Path(args.out)
    inits = [init_calc(args, out, n) for n in args.gpus]
    for row in inits:
        row["max_rel_diff"] = max_rel_diff(row["path"], inits[0]["path"])
    first_init = Path(inits[0]["path"])  # one W_c for every run, so only the process count differs
    rows = [train(args, out, mode, zero, n, first_init) for zero in args.zero for mode in args.modes for n in args.gpus]
    compare(rows, args.gpus)
    done = [r for r in rows if "error" not in r]
    scores = heldout(args, out, [r["final"] for r in done]) if done else {}
    for row in done:
        row["heldout_loss"], row["generate"] = scores[row["final"]], generates(row["final"])
    result = {"meta": {"device": device_name(), "driver": gpu_driver(), "versions": versions(),
                       "command": "python -m uniattn.tools.scale_check " + " ".join(sys.argv[1:] if argv is None
                                                                                   else argv)},
              "init": inits, "runs": rows}
    if args.kill_resume:
        n, zero = max(args.gpus), args.zero[0]
        ref = [r["final"] for r in done if (r["mode"], r["zero"], r["n"]) == ("uniattn", zero, n)]
        result["kill_resume"] = (kill_then_resume(args, out, zero, n, first_init, Path(ref[0])) if ref else
                                 {"n": n, "zero": zero, "killed": False, "error": "the uninterrupted run failed"})
    write_json(out / "scale_check.json", result)
    text = markdown(result)
    write_text(out / "scale_check.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
