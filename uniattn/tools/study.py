"""The quality study: where does UniAttn keep the quality of plain fine-tuning?

    bash scripts/build_pool.sh                     # the offline instruction pool (outputs/pool)
    python -m uniattn.tools.study --pool outputs/pool --out outputs/study --jobs 8      # on a GPU
    python -m uniattn.tools.study_report outputs/study/results.json                     # tables + frontier plot

Every arm starts from the same base checkpoint and trains the same number of
optimizer steps (``--steps``) on records of the pool it never sees twice; each
arm's learning rate is chosen on the pool's validation slices (domain + general)
from a grid that is widened until the chosen rate is interior; then every arm
runs with ``--seeds``. Scores: response loss on the pool's held-out domain
(PMC-LLaMA) and general records, KV bytes after a prefill, parameters; with
``--lm_eval`` also every item of the shipped lm-eval tasks.

Arms at each frontier point, a UniAttn layout with F followers (``--frontier``):

* ``softmax``: Softmax unification, no compensation (followers without W_c; the published
  runs carried a frozen, all-zero W_c, which computes the same);
* ``uniattn``: init calc, then stage 1 (W_c only) on a share ``--stage1_share``
  of the steps and of the records, stage 2 (everything) on the rest: the equal-steps
  protocol, the main comparison;
* ``uniattn_seed``: the seed's protocol beside it: two stages of ``--steps`` each
  on the same records (twice the optimizer steps);
* ``uniattn_wc0``: the equal-steps recipe from W_c = 0 (is the init worth having?);
* ``uniattn_kl``: stage 1 as distillation from the base model (KL), equal steps;
* ``uniattn_kl_vo``: the same, stage 1 also training the followers' V / O projections;
* ``uniattn_ridge``: equal steps from an init whose ridge init calc chose on held-out error
  (``--ridge auto``, init calc's default since the study measured it);
* ``uniattn_short``: that init with a short stage 1 (a tenth of the steps and records): the
  study found stage 1's steps worth less than the full fine-tuning they replace;
* ``cla`` and ``drop``: cross-layer KV sharing and layer dropping on a layout with
  F / 2 followers, which saves the same KV bytes (each of their followers drops K
  and V, a UniAttn follower only K).

``plain`` (full fine-tuning) and ``base`` are the references. Arms of
``--grid_arms`` search their own rate at the main point (``--main``); the
ablations take uniattn's rate and the other frontier points each arm's rate from
the main point. Runs go ``--jobs`` at a time (a 135M model leaves a GPU mostly
idle, so several share one), spread round-robin over ``--gpus`` (default: every
visible GPU). Each arm goes on as soon as its own rate is chosen, so one arm's
search never holds up another arm's seeds. Every result is cached under
``--out``: rerunning the command resumes, and ``--stop_after`` pauses cleanly (exit 3).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from .experiment import Paused, device_name, exit_code, run_logged, versions
from ..io import write_json
from ..modeling.layout import SuperBlockLayout
from ..net import free_port

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
ARMS = ("base", "plain", "softmax", "uniattn", "uniattn_seed", "uniattn_wc0", "uniattn_kl", "uniattn_kl_vo",
        "uniattn_ridge", "uniattn_short", "cla", "drop")
HALF_LAYOUT_ARMS = ("cla", "drop")  # their followers drop K and V: half as many save the same bytes
INIT_ARMS = ("uniattn", "uniattn_seed", "uniattn_kl", "uniattn_kl_vo", "uniattn_ridge", "uniattn_short")
RIDGE_AUTO_ARMS = ("uniattn_ridge", "uniattn_short")
SHORT_STAGE1_SHARE = 0.1  # init calc with the ridge chosen on held-out error (--ridge auto)
POOL_FILES = ("train.jsonl", "val_domain.jsonl", "val_general.jsonl", "heldout_domain.jsonl", "heldout_general.jsonl")


def arm_flags(arm: str, init: Path | None, share: float) -> list[str]:
    equal = ["--stage1_share", f"{share:g}"]
    return {
        "plain": ["--mode", "plain"],
        "softmax": ["--mode", "softmax"],
        "uniattn": ["--mode", "uniattn", "--init_path", str(init), *equal],
        "uniattn_seed": ["--mode", "uniattn", "--init_path", str(init), "--stage1_share", "seed"],
        "uniattn_wc0": ["--mode", "uniattn", "--zero_init", *equal],
        "uniattn_kl": ["--mode", "uniattn", "--init_path", str(init), "--stage1_objective", "kl", *equal],
        "uniattn_kl_vo": ["--mode", "uniattn", "--init_path", str(init), "--stage1_objective", "kl",
                          "--stage1_trainable", "compensation_vo", *equal],
        "uniattn_ridge": ["--mode", "uniattn", "--init_path", str(init), *equal],
        "uniattn_short": ["--mode", "uniattn", "--init_path", str(init), "--stage1_share", f"{SHORT_STAGE1_SHARE:g}"],
        "cla": ["--mode", "cla"],
        "drop": ["--mode", "drop"],
    }[arm]


@dataclass(frozen=True)
class Run:
    arm: str
    followers: int       # the frontier point (UniAttn followers); 0 for plain
    lr: float
    seed: int
    layout: tuple | None = None  # another layout than the point's (the layout-advisor check)

    @property
    def name(self) -> str:
        where = f"l{'_'.join(map(str, self.layout))}" if self.layout else f"f{self.followers}"
        return f"{self.arm}_{where}_lr{self.lr:g}_seed{self.seed}"


class NotDone(Exception):
    """``--collect``: this step has no cached result and is not run."""


class Slots:
    """``jobs`` places to run in, dealt round-robin over ``gpus``; a place is an environment for the child."""

    def __init__(self, jobs: int, gpus: list[str]):
        self.free: queue.Queue = queue.Queue()
        for i in range(jobs):
            self.free.put({"CUDA_VISIBLE_DEVICES": gpus[i % len(gpus)]} if gpus else {})

    @contextmanager
    def take(self):
        env = self.free.get()
        try:
            yield env
        finally:
            self.free.put(env)


def visible_gpus() -> list[str]:
    """The physical ids a child may be given: CUDA_VISIBLE_DEVICES's entries if set, else every device."""
    if not torch.cuda.is_available():
        return []
    listed = [g.strip() for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
    return listed or [str(i) for i in range(torch.cuda.device_count())]


def parse_points(items: list[str], layers: int) -> dict[int, tuple[int, int, int]]:
    """``F=G,B,E`` items -> {F: (G, B, E)}, each checked to have exactly F followers on ``layers`` layers."""
    points = {}
    for item in items:
        try:
            count, layout = item.split("=", 1)
            g, b, e = (int(v) for v in layout.split(","))
            count = int(count)
        except ValueError:
            raise ValueError(f"--points item {item!r} is not F=G,B,E (e.g. 12=4,14,30)") from None
        got = len(SuperBlockLayout(g, b, e, layers).followers)
        if got != count:
            raise ValueError(f"--points {item}: layout {g} {b} {e} has {got} followers on {layers} layers, not {count}; "
                             "pick a layout with `python -m uniattn.tools.layout_search --followers N`")
        points[count] = (g, b, e)
    return points


class Study:
    def __init__(self, args, layers: int):
        self.args, self.out, self.py = args, Path(args.out), sys.executable
        self.pool = Path(args.pool)
        self.points = parse_points(args.points, layers)
        for f in args.frontier:
            need = [f] + ([f // 2] if set(HALF_LAYOUT_ARMS) & set(args.arms) else [])
            missing = [n for n in need if n not in self.points]
            if f % 2 and set(HALF_LAYOUT_ARMS) & set(args.arms):
                raise ValueError(f"--frontier {f}: CLA / drop need F / 2 followers for the same KV saving; use even F")
            if missing:
                raise ValueError(f"--frontier {f} needs layouts for {missing} followers in --points (F=G,B,E)")
        if args.main not in args.frontier:
            raise ValueError(f"--main {args.main} is not one of --frontier {args.frontier}")
        for g, b, e in args.alt_layouts:
            got = len(SuperBlockLayout(g, b, e, layers).followers)
            if got != args.main:
                raise ValueError(f"--alt_layouts {g},{b},{e} has {got} followers on {layers} layers; the advisor check "
                                 f"compares layouts with --main {args.main} followers")
        self.deadline = None if args.stop_after is None else time.monotonic() + args.stop_after
        self.lock = threading.Lock()
        self.failed: list[str] = []
        self.slots = Slots(args.jobs, args.gpus if args.gpus is not None else visible_gpus())
        self.workers = ThreadPoolExecutor(max_workers=args.jobs)
        self.init_locks: dict[Path, threading.Lock] = {}
        self.chosen: dict[str, float] = {}
        self.decided: dict[str, threading.Event] = {}
        self.search_results: dict[str, dict] = {}
        self.validation: dict[str, dict] = {}

    def _may_start(self, what: str, finishing: bool = False) -> None:
        """Raise unless ``what`` may run now. ``finishing``: the last step of a run already trained (its
        scoring), which --stop_after lets through, so that no trained model is left unscored."""
        if self.args.collect:
            raise NotDone(what)
        if not finishing and self.deadline is not None and time.monotonic() > self.deadline:
            raise Paused(f"--stop_after {self.args.stop_after:g} s reached before {what}")

    def layout_of(self, arm: str, followers: int, layout=None) -> tuple[int, int, int] | None:
        if layout:
            return tuple(layout)
        if arm == "plain":
            return None
        return self.points[followers // 2 if arm in HALF_LAYOUT_ARMS else followers]

    # ------------------------------------------------------------ steps
    def init_calc(self, followers: int, layout=None, ridge_auto: bool = False, env: dict | None = None) -> Path:
        """The init file of a layout (cached). ``env``: the slot the caller holds, else one is taken."""
        g, b, e = layout or self.points[followers]
        path = self.out / "init" / f"init_{g}_{b}_{e}{'_ridgeauto' if ridge_auto else ''}.safetensors"
        with self.lock:
            lock = self.init_locks.setdefault(path, threading.Lock())
        with lock:  # runs of one layout wait for a single init calc instead of each computing it
            if not path.exists():
                self._may_start(f"init calc {g} {b} {e}")
                if env is None:
                    with self.slots.take() as slot:
                        self._compute_init(path, (g, b, e), ridge_auto, slot)
                else:
                    self._compute_init(path, (g, b, e), ridge_auto, env)
        return path

    def _compute_init(self, path: Path, layout: tuple, ridge_auto: bool, env: dict) -> None:
        g, b, e = layout
        cmd = [self.py, "-m", "uniattn.init_calc", "--model_dir", self.args.model_dir,
               "--data", str(self.pool / "train.jsonl"), "--include_eval_items", "--superblock", str(g), str(b), str(e),
               "--output", str(path), "--num_samples", str(self.args.init_samples),
               # the seed's fixed ridge unless asked: the arms keep the recipe they were measured with
               "--max_length", str(self.args.max_length), "--ridge", "auto" if ridge_auto else "0.0001"]
        seconds = run_logged(cmd, self.out / "logs" / f"{path.stem}.log", env)
        write_json(path.with_suffix(".timing.json"), {"seconds": round(seconds, 1)})

    def train_and_score(self, run: Run) -> dict:
        """Train ``run`` (cached) and score it on validation and held-out records (cached), in one slot."""
        scores = self.out / "runs" / run.name / "scores.json"
        if scores.exists():
            cached = json.loads(scores.read_text())
            if not self.args.lm_eval or "lm_eval" in cached:
                return cached
            # scored before --lm_eval was asked for: a kept model is scored again, a removed one trained again
        with self.slots.take() as env:
            return self._train_and_score(run, env)

    def _train_and_score(self, run: Run, env: dict) -> dict:
        folder = self.out / "runs" / run.name
        scores = folder / "scores.json"
        final = folder / "final"
        if not final.is_dir():
            self._may_start(f"training {run.name}")
            (self.out / "scores" / f"{run.name}.json").unlink(missing_ok=True)  # an earlier model's, if any
            init = (self.init_calc(run.followers, run.layout, run.arm in RIDGE_AUTO_ARMS, env)
                    if run.arm in INIT_ARMS else None)
            launcher = ([self.py, "-m", "uniattn.train", "--deepspeed", ""] if self.args.launcher == "python" else
                        [self.py, "-m", "deepspeed.launcher.runner",
                         # the launcher takes the slot's CUDA_VISIBLE_DEVICES as its --include when no count is given
                         *([] if env.get("CUDA_VISIBLE_DEVICES") else ["--num_gpus", "1"]),
                         "--master_port", str(free_port()), "--module", "uniattn.train"])
            cmd = [*launcher, *arm_flags(run.arm, init, self.args.stage1_share), "--model_dir", self.args.model_dir,
                   "--data", str(self.pool / "train.jsonl"), "--include_eval_items", "--output_dir", str(folder),
                   "--seed", str(run.seed), "--learning_rate", f"{run.lr:g}", "--max_steps", str(self.args.steps),
                   "--per_device_train_batch_size", str(self.args.batch), "--effective_batch_size", str(self.args.batch),
                   "--max_length", str(self.args.max_length), "--warmup_steps", "0.03", "--lr_scheduler_type", "cosine",
                   "--weight_decay", "0", "--logging_steps", "10", "--save_steps", str(max(1, self.args.steps // 4)),
                   "--save_total_limit", "1", "--report_to", "none", *self._precision(), *self.args.train_args]
            layout = self.layout_of(run.arm, run.followers, run.layout)
            if layout:
                cmd += ["--superblock", *map(str, layout)]
            logger.info("training %s", run.name)
            # Several runs share a GPU: expandable segments keep the allocator from fragmenting it.
            seconds = run_logged(cmd, self.out / "logs" / f"{run.name}.log",
                                 {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True", **env})
            write_json(folder / "timing.json", {"seconds": round(seconds, 1)})
            for ckpt in [*folder.glob("checkpoint-*"), *folder.glob("stage*/checkpoint-*")]:
                shutil.rmtree(ckpt)  # resumability is only needed while the run is unfinished
        result = {"run": run.__dict__, "layout": self.layout_of(run.arm, run.followers, run.layout),
                  **self.score(final, f"{run.name}", env), "train": _train_info(folder),
                  "device": device_name(), "versions": versions()}
        write_json(scores, result)
        if not self.args.keep_models:
            shutil.rmtree(final)
            for stage_final in folder.glob("stage*/final"):
                shutil.rmtree(stage_final)
        return result

    def _precision(self) -> list[str]:
        # float32 throughout, with TF32 matmuls on a GPU: the precision of the published study (docs/results.md).
        # `--train_args --bf16 True` switches to bf16 autocast over float32 weights (uniattn.train without DeepSpeed).
        if self.args.launcher != "python":
            return []
        return ["--bf16", "False"] + (["--tf32", "True"] if torch.cuda.is_available() else [])

    def score(self, model: Path, tag: str, env: dict | None = None) -> dict:
        files = [str(self.pool / f) for f in POOL_FILES[1:]]
        out = self.out / "scores" / f"{tag}.json"
        if not out.exists():
            self._may_start(f"scoring {tag}", finishing=True)
            cmd = [self.py, "-m", "uniattn.tools.loss_eval", str(model), "--data", *files, "--limit", "0",
                   "--max-length", str(self.args.max_length), "--batch-size", "16", "--json", str(out), "--with_kv"]
            run_logged(cmd, self.out / "logs" / f"score_{tag}.log", env)
        raw = json.loads(out.read_text())[str(model)]
        losses = {Path(f).stem: raw[f]["loss"] for f in files}
        losses["val"] = (losses["val_domain"] + losses["val_general"]) / 2
        result = {"loss": losses, "kv": raw["kv"]}
        if self.args.lm_eval:
            result["lm_eval"] = self.lm_eval(model, tag, env)
        return result

    def lm_eval(self, model: Path, tag: str, env: dict | None = None) -> dict:
        """Every item of the shipped lm-eval tasks (uniattn/eval/tasks), through ``uniattn.eval.run``:
        per task the accuracy, its standard error and the number of items."""
        folder = self.out / "lm_eval" / tag
        limit = self.args.lm_eval_limit
        path = folder / (f"results_limit{limit}.json" if limit else "results.json")
        if not path.exists():
            self._may_start(f"lm-eval on {tag}", finishing=True)
            # float32, as the study trains and scores; lm-eval's own device choice follows the slot's GPU. A fixed
            # batch: lm-eval's "auto" probes for all free memory, which the other jobs on that GPU are using.
            run_logged([self.py, "-m", "uniattn.eval.run", *(["--limit", str(limit)] if limit else []), str(model)],
                       self.out / "logs" / f"lm_eval_{tag}.log",
                       {**(env or {}), "OUT_DIR": str(folder), "DTYPE": "float32",
                        "BATCH_SIZE": os.environ.get("BATCH_SIZE") or "32"})
        results = json.loads(path.read_text())
        counts = results.get("n-samples", {})
        return {task: {"acc": r["acc,none"], "acc_stderr": r.get("acc_stderr,none"), "n": counts[task]["effective"]}
                for task, r in results["results"].items() if task in counts}  # tasks, not their group averages

    # ------------------------------------------------------------ the whole study
    def parallel(self, runs: list[Run]) -> dict[Run, dict]:
        """Run ``runs`` in the shared slots; the finished ones' results (a failed or uncached run is left out)."""
        futures = {run: self.workers.submit(self._maybe, run) for run in runs}
        done = {run: f.result() for run, f in futures.items()}
        return {run: res for run, res in done.items() if res is not None}

    def _maybe(self, run: Run) -> dict | None:
        try:
            return self.train_and_score(run)
        except NotDone:
            return None
        except RuntimeError as err:  # one failed run (e.g. out of GPU memory) must not stop the others
            logger.error("%s failed; a rerun of the same command retries it: %s", run.name, str(err)[-600:])
            with self.lock:
                self.failed.append(run.name)
            return None

    def search(self, arm: str) -> float | None:
        """``arm``'s rate at the main point: the grid, widened until the chosen rate is interior."""
        seed, main = self.args.seeds[0], self.args.main
        lrs = sorted(self.args.lrs)
        grid, factor = list(lrs), (lrs[1] / lrs[0] if len(lrs) > 1 else 3.0)
        tried: dict[float, float] = {}
        for _ in range(self.args.max_widen + 1):
            todo = [Run(arm, 0 if arm == "plain" else main, lr, seed) for lr in grid if lr not in tried]
            for run, res in self.parallel(todo).items():
                tried[run.lr] = res["loss"]["val"]
                with self.lock:
                    self.search_results[run.name] = res
            if len(tried) < 2:  # one rate (or none: --collect before any of its runs finished) has no edge
                break
            done, best = sorted(tried), min(tried, key=tried.get)
            if best not in (done[0], done[-1]):
                break
            grid = done + [float(f"{best / factor if best == done[0] else best * factor:.3g}")]
        with self.lock:
            self.validation[arm] = {f"{lr:g}": round(v, 4) for lr, v in sorted(tried.items())}
        return min(tried, key=tried.get) if tried else None

    def rate(self, arm: str, grid_arms: list[str]) -> float | None:
        """The rate ``arm`` trains at: fixed by --lr_for, searched, or (ablations) uniattn's once it is chosen."""
        if arm in self.args.lr_for:
            return self.args.lr_for[arm]
        if arm in grid_arms:
            return self.search(arm)
        if "uniattn" in grid_arms:
            self.decided["uniattn"].wait()
            return self.chosen.get("uniattn")
        return self.args.lr_for.get("uniattn", self.args.lrs[len(self.args.lrs) // 2])

    def drive(self, arm: str, grid_arms: list[str]) -> dict[str, dict]:
        """One arm from start to end: its rate, then its seeds at every frontier point it runs at."""
        args = self.args
        try:
            lr = self.rate(arm, grid_arms)
            with self.lock:
                if lr is not None:
                    self.chosen[arm] = lr
        finally:
            self.decided[arm].set()
        if lr is None:  # --collect before its search finished
            logger.warning("no learning rate chosen yet for %s; leaving it out", arm)
            return {}
        points = [args.main] if arm == "plain" or arm not in args.frontier_arms else args.frontier
        runs = [Run(arm, 0 if arm == "plain" else f, lr, seed) for seed in args.seeds for f in points]
        if arm == "uniattn":  # the advisor's check: other layouts, first seed
            runs += [Run(arm, args.main, lr, args.seeds[0], tuple(l)) for l in args.alt_layouts]
        return {run.name: res for run, res in self.parallel(runs).items()}

    def seed_cache(self, results_file: Path) -> int:
        """Put the runs of an earlier results.json into this study's cache, so they are not trained again
        (e.g. docs/results_pool.json on a fresh GPU machine). Returns how many were added."""
        added = 0
        for res in json.loads(Path(results_file).read_text())["results"].values():
            run = dict(res["run"])
            if run["arm"] == "base":
                continue
            run["layout"] = tuple(run["layout"]) if run.get("layout") else None
            scores = self.out / "runs" / Run(**run).name / "scores.json"
            if self.args.lm_eval and "lm_eval" not in res:
                continue  # trained again, to be scored on lm-eval too
            if not scores.exists():
                write_json(scores, res)
                added += 1
        return added

    def run(self) -> Path:
        start = time.perf_counter()
        args = self.args
        if args.seed_from:
            logger.info("%d finished runs taken from %s", self.seed_cache(args.seed_from), args.seed_from)
        arms = [a for a in args.arms if a != "base"]
        grid_arms = [a for a in arms if a in args.grid_arms and a not in args.lr_for]
        self.decided = {arm: threading.Event() for arm in arms}
        # One driver per arm, so an arm whose rate is known trains its seeds while another still searches.
        with ThreadPoolExecutor(max_workers=max(1, len(arms))) as drivers:
            results = {}
            for done in [f.result() for f in [drivers.submit(self.drive, arm, grid_arms) for arm in arms]]:
                results.update(done)
        self.workers.shutdown()
        # Every run, the learning-rate search's too, so that --seed_from can resume from this file alone;
        # the report keeps each arm's chosen rate.
        results = {**self.search_results, **results}
        if "base" in args.arms and not (args.collect and not (self.out / "scores" / "base.json").exists()):
            with self.slots.take() as env:
                results["base"] = {"run": {"arm": "base", "followers": 0, "lr": 0, "seed": None, "layout": None},
                                   "layout": None, **self.score(Path(args.model_dir), "base", env), "train": {}}
        summary = {
            "pool": str(self.pool), "pool_manifest": _manifest(self.pool), "model_dir": args.model_dir,
            "points": {str(k): v for k, v in self.points.items()}, "frontier": args.frontier, "main": args.main,
            "seeds": args.seeds, "lr_grid": args.lrs, "chosen_lr": self.chosen, "validation_loss": self.validation,
            "steps": args.steps, "batch": args.batch, "max_length": args.max_length, "stage1_share": args.stage1_share,
            "launcher": args.launcher, "train_args": args.train_args, "init_samples": args.init_samples,
            "results": results, "failed": sorted(self.failed), "versions": versions(), "device": device_name(),
            "run_devices": sorted({r.get("device", "unrecorded") for r in results.values()}),
            "this_call_seconds": round(time.perf_counter() - start, 1),
        }
        path = self.out / "results.json"
        write_json(path, summary)
        if self.failed:
            raise RuntimeError(f"{len(self.failed)} runs failed ({', '.join(sorted(self.failed))}); their logs are in "
                               f"{self.out / 'logs'}; {path} holds the rest; rerun the same command to retry them")
        return path


def _train_info(folder: Path) -> dict:
    """Optimizer steps and records per stage, and the logged losses, from each stage's uniattn_train.json."""
    info = {}
    for path in sorted(folder.glob("**/uniattn_train.json")):
        data = json.loads(path.read_text())
        info[data.get("stage", path.parent.name)] = {
            k: data[k] for k in ("global_step", "logged_losses", "stage_records", "trainable", "stage1_objective")
            if k in data}
    timing = folder / "timing.json"
    if timing.exists():
        info["seconds"] = json.loads(timing.read_text())["seconds"]
    return info


def _manifest(pool: Path) -> dict:
    path = pool / "MANIFEST.json"
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    return {k: data[k] for k in ("counts", "outputs") if k in data}


def _layout(text: str) -> tuple[int, int, int]:
    try:
        g, b, e = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not G,B,E (e.g. 4,14,30)") from None
    return g, b, e


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pool", default=str(REPO / "outputs" / "pool"), help="folder made by scripts/build_pool.sh")
    p.add_argument("--out", default=str(REPO / "outputs" / "study"))
    p.add_argument("--model_dir", help="base checkpoint (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--points", nargs="+", metavar="F=G,B,E",
                   default=["12=3,12,30", "8=4,19,30", "6=3,20,29", "4=3,24,30", "2=3,27,30"],
                   help="the layout used for F followers (default: the layout advisor's first choice for SmolLM2, "
                        "`python -m uniattn.tools.layout_search --followers F`)")
    p.add_argument("--frontier", nargs="+", type=int, default=[4, 8, 12], help="UniAttn follower counts")
    p.add_argument("--main", type=int, default=12, help="the frontier point of the learning-rate search and the ablations")
    p.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    p.add_argument("--grid_arms", nargs="+", choices=ARMS, default=["plain", "softmax", "uniattn", "cla", "drop"],
                   help="arms that search their own rate (others take uniattn's)")
    p.add_argument("--frontier_arms", nargs="+", choices=ARMS, default=["softmax", "uniattn", "cla", "drop"],
                   help="arms run at every frontier point (others only at --main)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--lrs", nargs="+", type=float, default=[3e-5, 1e-4, 3e-4])
    p.add_argument("--max_widen", type=int, default=2, help="times the grid may grow past an edge")
    p.add_argument("--lr_for", nargs="+", default=[], metavar="ARM=LR", help="fix an arm's rate, no search")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps of every arm (UniAttn: both stages together)")
    p.add_argument("--batch", type=int, default=8, help="records per optimizer step")
    p.add_argument("--max_length", type=int, default=512)
    p.add_argument("--stage1_share", type=float, default=0.5, help="UniAttn's stage-1 share of steps and records")
    p.add_argument("--init_samples", type=int, default=256)
    p.add_argument("--jobs", type=int, default=1,
                   help="runs at a time on one GPU. SmolLM2 at batch 8 x 512 tokens takes up to ~11.5 GiB a run in "
                        "fp32: 15 at once ran out of memory on an H200, and the 10 that ran made only ~1.7 steps/s each "
                        "(time-slicing), so prefer a few (2-4); docs/results.md")
    p.add_argument("--gpus", nargs="*", metavar="ID",
                   help="GPU ids the --jobs slots are dealt over, round-robin (default: every visible GPU)")
    p.add_argument("--launcher", choices=("python", "deepspeed"), default="python",
                   help="python: one plain Trainer process per run; deepspeed: the launcher with ZeRO-2")
    p.add_argument("--keep_models", action="store_true", help="keep every trained model (default: scores only)")
    p.add_argument("--lm_eval", action="store_true",
                   help="also score every model on every item of the shipped lm-eval tasks (uniattn/eval/tasks); "
                        "needs lm-eval: bash scripts/setup_env.sh eval")
    p.add_argument("--lm_eval_limit", type=int, metavar="N",
                   help="with --lm_eval, only the first N items of each task: a smoke check, not a figure")
    p.add_argument("--alt_layouts", nargs="+", type=_layout, default=[], metavar="G,B,E",
                   help="UniAttn (equal steps, first seed) on these layouts too: checks the layout advisor's ranking")
    p.add_argument("--seed_from", type=Path, metavar="RESULTS_JSON",
                   help="take the finished runs of an earlier results.json (e.g. docs/results_pool.json) as cached")
    p.add_argument("--collect", action="store_true",
                   help="run nothing: write results.json from what earlier calls finished")
    p.add_argument("--stop_after", type=float, metavar="SECONDS", help="start nothing new after this long (exit 3)")
    p.add_argument("--train_args", nargs=argparse.REMAINDER, default=[], help="more uniattn.train flags (last)")
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    try:
        args.lr_for = {a: float(v) for a, v in (item.split("=", 1) for item in args.lr_for)}
    except ValueError:
        p.error(f"--lr_for takes ARM=LR pairs such as plain=1e-4, got {args.lr_for}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.model_dir is None:
        from .smollm2 import ensure_smollm2

        args.model_dir = str(ensure_smollm2())
    config = Path(args.model_dir) / "config.json"
    if not config.is_file():
        print(f"error: --model_dir {args.model_dir} has no config.json; pass a Hugging Face checkpoint", file=sys.stderr)
        return 2
    missing = [f for f in POOL_FILES if not (Path(args.pool) / f).is_file()]
    if missing:
        print(f"error: --pool {args.pool} lacks {missing}; build it with `bash scripts/build_pool.sh`", file=sys.stderr)
        return 2
    if not 0 < args.stage1_share < 1 or args.steps < 2 or args.jobs < 1 or not args.seeds:
        print(f"error: need 0 < --stage1_share < 1 (got {args.stage1_share}), --steps >= 2 (got {args.steps}), "
              f"--jobs >= 1 (got {args.jobs}) and at least one seed", file=sys.stderr)
        return 2
    if args.lm_eval:
        import importlib.util

        if importlib.util.find_spec("lm_eval") is None:
            print(f"error: --lm_eval needs lm-eval, which {sys.executable} cannot import; "
                  "run bash scripts/setup_env.sh eval", file=sys.stderr)
            return 2
    layers = json.loads(config.read_text())["num_hidden_layers"]
    return exit_code(lambda: Study(args, layers).run())


if __name__ == "__main__":
    sys.exit(main())
