"""The paper's claim in miniature: UniAttn post-training against plain FT and the cheaper baselines.

    bash scripts/experiment_pmc.sh                       # CPU size: ~1.5 h on 2 cores (+45 min with --search_lr)
    SIZE=full bash scripts/experiment_pmc.sh             # full size, on GPUs
    python -m uniattn.tools.experiment --out outputs/experiment_pmc [--size cpu|full] [--seeds 0 1] [--lrs 1e-4 3e-4]

Arms (UNIATTN.md section 5), all from the same base checkpoint, data, steps and seeds:
``base`` (no fine-tuning), ``plain`` (full FT), ``softmax`` (Softmax unification,
followers without W_c; runs before that carried a frozen zero W_c), ``uniattn``
(init calc + two stages), ``uniattn_wc0`` (two stages from W_c = 0) and ``cla``
(cross-layer KV sharing on the same layout).

Data: the training side of the fixed evaluation split (uniattn.eval.split)
minus a validation slice; the held-out side is never trained or calibrated on.
Learning-rate search (``--search_lr``, or any ``--lrs``): every arm trains at
each rate of the grid with the first seed, the lowest validation loss picks the
arm's rate, and the other seeds run at that rate; every arm gets the same grid.
The CPU size otherwise uses the rates its search chose (``SIZES["cpu"].lr_for``).
Metrics per model: response loss on held-out PMC items, the shipped lm-eval
tasks (medical and general), KV-cache bytes after a prefill and parameters.

Every step writes its result under ``--out`` and is skipped when rerun, so a
stopped experiment resumes where it stopped (an unfinished training run
resumes from its newest checkpoint). ``uniattn.tools.experiment_report`` turns the
results into the markdown table and plot.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data import load_records
from ..eval.split import hash_fraction, split_key, train_eval_split
from ..io import write_json as _write_json
from ..net import free_port

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
ARMS = ("base", "plain", "softmax", "uniattn", "uniattn_wc0", "cla")
ARM_FLAGS = {
    "plain": ["--mode", "plain"],
    "softmax": ["--mode", "softmax"],
    # the seed's protocol (two full stages), as this miniature was measured
    "uniattn": ["--mode", "uniattn", "--stage1_share", "seed"],  # + --init_path
    "uniattn_wc0": ["--mode", "uniattn", "--zero_init", "--stage1_share", "seed"],
    "cla": ["--mode", "cla"],
}
VAL_SALT = "uniattn-experiment-validation-v1"


@dataclass
class Size:
    train_flags: list[str]     # uniattn.train flags beyond mode, data, seed and learning rate
    lrs: list[float]
    seeds: list[int]
    init_samples: int
    heldout: int | None        # held-out PMC items for the loss (None: all)
    val_limit: int | None      # validation records that pick the learning rate (None: all)
    eval_limit: int | None     # lm-eval items per task (None: all)
    max_length: int
    note: str = ""
    lr_for: dict = field(default_factory=dict)  # the search's choice, used unless --search_lr


SIZES = {
    # Sized from measured CPU speeds (2 cores, fp32): training ~150 tokens/s, forward ~480 tokens/s.
    # 12 steps x 8 records x ~325 tokens per arm and seed; docs/results.md gives the measured times.
    "cpu": Size(
        train_flags=["--max_steps", "12", "--per_device_train_batch_size", "4", "--effective_batch_size", "8",
                     "--max_length", "512", "--warmup_steps", "0", "--lr_scheduler_type", "cosine",
                     "--save_steps", "6", "--save_total_limit", "1", "--logging_steps", "1"],
        lrs=[1e-4, 3e-4], seeds=[0, 1], init_samples=64, heldout=48, val_limit=32, eval_limit=20, max_length=512,
        # The grid search of this recipe (H100, float32, docs/results.md) chose these; on 2 CPU cores the
        # search alone takes ~80 min, so it runs only with --search_lr.
        lr_for={"plain": 1e-4, "softmax": 3e-4, "uniattn": 3e-4, "uniattn_wc0": 3e-4, "cla": 3e-4},
        note="12 steps x 8 records of <= 512 tokens, 2 seeds, lm-eval 20 items per task, "
             "lr from the grid 1e-4 3e-4 (searched with --search_lr)"),
    # The model's preset (configs/): 1 epoch, effective batch 48, 1024 tokens, bf16 on GPU.
    "full": Size(
        train_flags=["--logging_steps", "1"], lrs=[1e-5, 2e-5, 5e-5], seeds=[0, 1, 2], init_samples=256,
        heldout=None, val_limit=None, eval_limit=None, max_length=1024,
        note="preset schedule (1 epoch, batch 48, 1024 tokens), lr grid 1e-5 2e-5 5e-5, 3 seeds, all eval items"),
}


class Paused(Exception):
    """``--stop_after`` was reached; rerunning the same command continues."""


def is_validation(record, fraction: float = 0.1) -> bool:
    return hash_fraction(split_key(record), VAL_SALT) < fraction


def write_json(path: Path, obj) -> None:
    _write_json(path, obj, ensure_ascii=True)  # ASCII-escaped, as this tool's files always were


def prepare_data(data: Path, out: Path) -> dict:
    """Training records (training split minus the validation slice), validation and held-out records."""
    records = load_records(data)
    train, heldout = train_eval_split(records)
    val = [r for r in train if is_validation(r)]
    train = [r for r in train if not is_validation(r)]
    if not train or not val or not heldout:
        raise ValueError(f"{data} has too few records for a training / validation / held-out split "
                         f"({len(train)} / {len(val)} / {len(heldout)}); use the 1,000-record sample or more")
    paths = {"train": out / "data" / "train.json", "val": out / "data" / "val.json"}
    for name, rows in (("train", train), ("val", val)):
        if not paths[name].exists():
            write_json(paths[name], rows)
    return {"train": paths["train"], "val": val, "heldout": heldout, "counts": (len(train), len(val), len(heldout))}


def run_logged(cmd: list[str], log: Path, env: dict | None = None) -> float:
    """Run ``cmd`` with its output in ``log``; raise with the log's tail on failure. Returns seconds."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, cwd=REPO)
    if proc.returncode != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"{cmd[2:6]} failed (exit {proc.returncode}); log {log}:\n{tail}")
    return time.perf_counter() - start


class Experiment:
    def __init__(self, args):
        self.args, self.out = args, Path(args.out)
        self.size = SIZES[args.size]
        self.seeds = args.seeds or self.size.seeds
        self.lrs = args.lrs or self.size.lrs
        searching = args.search_lr or args.lrs
        self.lr_for = {**({} if searching else self.size.lr_for), **args.lr_for}
        if args.eval_limit is not None:
            self.size.eval_limit = args.eval_limit or None
        self.py = sys.executable
        self.superblock = [str(v) for v in args.superblock]
        self.deadline = None if args.stop_after is None else time.monotonic() + args.stop_after

    def _may_start(self, what: str) -> None:
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise Paused(f"--stop_after {self.args.stop_after:g} s reached before {what}")

    # ------------------------------------------------------------ steps
    def init_calc(self, data) -> Path:
        path = self.out / "init" / "uniattn_init.safetensors"
        if not path.exists():
            self._may_start("init calc")
            cmd = [self.py, "-m", "uniattn.init_calc", "--model_dir", self.args.model_dir, "--data", str(data["train"]),
                   "--superblock", *self.superblock, "--output", str(path),
                   "--num_samples", str(self.size.init_samples), "--max_length", str(self.size.max_length),
                   "--ridge", "0.0001"]  # the recipe docs/results.md section 2 was measured with
            if torch.cuda.is_available() and self.args.size == "full":
                cmd += ["--dtype", "bfloat16"]  # the cpu recipe stays float32 wherever it runs
            seconds = run_logged(cmd, self.out / "logs" / "init_calc.log")
            write_json(self.out / "init" / "timing.json", {"seconds": round(seconds, 1)})
        return path

    def train(self, arm: str, lr: float, seed: int, data, init_path: Path) -> Path:
        run = self.out / "runs" / f"{arm}_lr{lr:g}_seed{seed}"
        final = run / "final"
        if final.is_dir():
            return final
        self._may_start(f"training {run.name}")
        cmd = [self.py, "-m", "deepspeed.launcher.runner", "--num_gpus", str(self.args.num_gpus),
               "--master_port", str(free_port()), "--module", "uniattn.train", *ARM_FLAGS[arm],
               "--model_dir", self.args.model_dir, "--data", str(data["train"]), "--output_dir", str(run),
               "--seed", str(seed), "--learning_rate", f"{lr:g}", *self.size.train_flags, *self.args.train_args]
        if arm != "plain":
            cmd += ["--superblock", *self.superblock]
        if arm == "uniattn":
            cmd += ["--init_path", str(init_path)]
        logger.info("training %s", run.name)
        seconds = run_logged(cmd, self.out / "logs" / f"{run.name}.log")
        write_json(run / "timing.json", {"seconds": round(seconds, 1)})
        for ckpt in [*run.glob("checkpoint-*"), *run.glob("stage*/checkpoint-*")]:
            shutil.rmtree(ckpt)  # resumability is only needed while the run is unfinished
        return final

    def loss(self, path: Path, records, tag: str, with_kv: bool = False) -> dict:
        """Response loss of ``path`` on ``records`` (+ KV bytes and parameters), cached under ``tag``."""
        cache = self.out / "eval" / f"{tag}.json"
        if cache.exists():
            return json.loads(cache.read_text())
        self._may_start(f"scoring {tag}")
        from .loss_eval import load_model, response_loss

        device = "cuda" if torch.cuda.is_available() else "cpu"
        model, tokenizer = load_model(path, device=device)
        loss, tokens = response_loss(model, tokenizer, records, self.size.max_length, desc=tag)
        result = {"loss": loss, "tokens": tokens, "model": str(path)}
        if with_kv:
            from .kv_report import kv_and_params

            result.update(kv_and_params(model))
        write_json(cache, result)
        return result

    def lm_eval(self, path: Path, name: str, run: bool = True) -> dict | None:
        """lm-eval scores of ``path`` (cached); with ``run=False`` only what an earlier call left."""
        out_dir = self.out / "eval" / f"lm_eval_{name}"
        stem = f"results_limit{self.size.eval_limit}" if self.size.eval_limit else "results"
        result = out_dir / f"{stem}.json"
        if not result.exists() and not run:
            return None
        if not result.exists():
            self._may_start(f"lm-eval of {name}")
            env = {"OUT_DIR": str(out_dir), "PYTHON": self.py}
            if self.size.eval_limit:
                env["LIMIT"] = str(self.size.eval_limit)
            run_logged(["bash", str(REPO / "scripts" / "eval.sh"), str(path)], self.out / "logs" / f"lm_eval_{name}.log", env)
        raw = json.loads(result.read_text())["results"]
        return {task: {k.split(",")[0]: v for k, v in metrics.items() if "," in k and isinstance(v, (int, float))}
                for task, metrics in raw.items()}

    # ------------------------------------------------------------ the whole table
    def run(self) -> Path:
        start = time.perf_counter()
        data = prepare_data(Path(self.args.data), self.out)
        heldout = data["heldout"][: self.size.heldout] if self.size.heldout else data["heldout"]
        val = data["val"][: self.size.val_limit]
        logger.info("records: %d train, %d validation, %d held out (%d scored)", *data["counts"], len(heldout))
        arms = [a for a in self.args.arms if a != "base"]
        init_path = self.init_calc(data) if "uniattn" in arms else None
        chosen, validation = {}, {}
        for arm in arms:
            if arm in self.lr_for:  # chosen by an earlier search of the same grid
                chosen[arm] = self.lr_for[arm]
                continue
            if len(self.lrs) == 1:
                chosen[arm] = self.lrs[0]
                continue
            scores = {}
            for lr in self.lrs:
                final = self.train(arm, lr, self.seeds[0], data, init_path)
                scores[lr] = self.loss(final, val, f"val_{arm}_lr{lr:g}_seed{self.seeds[0]}")["loss"]
            chosen[arm] = min(scores, key=scores.get)
            validation[arm] = {f"{lr:g}": round(v, 4) for lr, v in scores.items()}
            logger.info("%s: validation losses %s -> lr %g", arm, scores, chosen[arm])
        models = {"base": ("base", None, Path(self.args.model_dir))} if "base" in self.args.arms else {}
        for seed in self.seeds:
            for arm in arms:
                models[f"{arm}_seed{seed}"] = (arm, seed, self.train(arm, chosen[arm], seed, data, init_path))
        results = {}
        for name, (arm, seed, path) in models.items():
            entry = {"arm": arm, "seed": seed, "path": str(path), **self.loss(path, heldout, f"heldout_{name}", with_kv=True)}
            scores = self.lm_eval(path, name, run=not self.args.skip_lm_eval)
            if scores is not None:
                entry["lm_eval"] = scores
            timing = path.parent / "timing.json"
            if timing.exists():
                entry["train_seconds"] = json.loads(timing.read_text())["seconds"]
            info = path / "uniattn_train.json"
            if info.exists():
                entry["train_losses"] = json.loads(info.read_text())["logged_losses"]
            results[name] = entry
        summary = {
            "size": self.args.size, "size_note": self.size.note, "seeds": self.seeds, "lr_grid": self.lrs,
            "lr_fixed": sorted(self.lr_for), "chosen_lr": chosen, "validation_loss": validation, "validation_records": len(val), "superblock": self.superblock, "model_dir": self.args.model_dir,
            "data": self.args.data, "records": dict(zip(("train", "validation", "heldout"), data["counts"])),
            "heldout_scored": len(heldout), "eval_limit": self.size.eval_limit,
            "train_flags": self.size.train_flags + self.args.train_args, "results": results,
            "versions": versions(), "device": device_name(),
            "init_seconds": _read_seconds(self.out / "init" / "timing.json"),
            "this_call_seconds": round(time.perf_counter() - start, 1),
        }
        path = self.out / "results.json"
        write_json(path, summary)
        return path


def _read_seconds(path: Path):
    return json.loads(path.read_text())["seconds"] if path.exists() else None


def versions() -> dict:
    import transformers

    out = {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__}
    for name in ("deepspeed", "lm_eval"):
        try:
            out[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001  (a missing optional package is reported as such)
            out[name] = "not installed"
    return out


def device_name() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return f"CPU, {os.cpu_count()} cores"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(REPO / "outputs" / "experiment_pmc"), help="where every result goes")
    p.add_argument("--size", choices=sorted(SIZES), default="cpu", help="cpu: ~1.5 h on 2 cores (docs/results.md); full: GPUs")
    p.add_argument("--eval_limit", type=int, help="lm-eval items per task (default: the size's; 0: all)")
    p.add_argument("--model_dir", default=None, help="base checkpoint (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--data", default=str(REPO / "dataset" / "pmc_llama_instructions_1000.json"))
    p.add_argument("--superblock", nargs=3, type=int, default=[4, 14, 30], metavar=("G", "B", "E"))
    p.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    p.add_argument("--seeds", nargs="+", type=int, help="default: the size's (cpu: 0 1; full: 0 1 2)")
    p.add_argument("--lrs", nargs="+", type=float, help="learning-rate grid, the same for every arm")
    p.add_argument("--search_lr", action="store_true",
                   help="search the size's lr grid here instead of using its recorded choice (cpu size)")
    p.add_argument("--lr_for", nargs="+", default=[], metavar="ARM=LR",
                   help="fix an arm's learning rate instead of searching, e.g. plain=1e-4 cla=3e-4")
    p.add_argument("--num_gpus", type=int, default=max(1, torch.cuda.device_count()), help="processes per training run")
    p.add_argument("--stop_after", type=float, default=None, metavar="SECONDS",
                   help="start no new step after this long (exit 3); rerun the command to continue")
    p.add_argument("--skip_lm_eval", action="store_true",
                   help="run no lm-eval (scores an earlier run left are still reported)")
    p.add_argument("--train_args", nargs=argparse.REMAINDER, default=[],
                   help="more uniattn.train flags for every run, e.g. --train_args --max_steps 2 (must come last)")
    args = p.parse_args(argv)
    try:
        args.lr_for = {arm: float(lr) for arm, lr in (item.split("=", 1) for item in args.lr_for)}
    except ValueError:
        p.error(f"--lr_for takes ARM=LR pairs such as plain=1e-4, got {args.lr_for}")
    if set(args.lr_for) - set(ARMS):
        p.error(f"--lr_for names unknown arms {sorted(set(args.lr_for) - set(ARMS))}; arms: {', '.join(ARMS)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.model_dir is None:
        from .smollm2 import ensure_smollm2

        args.model_dir = str(ensure_smollm2())
    if not (Path(args.model_dir) / "config.json").is_file():
        print(f"error: --model_dir {args.model_dir} has no config.json; pass a Hugging Face checkpoint", file=sys.stderr)
        return 2
    return exit_code(lambda: Experiment(args).run())


def exit_code(run) -> int:
    """Call ``run()`` (which returns the results path) and map its outcome to the CLI's exit status."""
    try:
        path = run()
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Paused as err:
        print(f"paused: {err}; run the same command again to continue", file=sys.stderr)
        return 3
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
