"""Per-step time, tokens and peak memory of a training run, for throughput, MFU and memory figures.

    python -m uniattn.train ... --trainer_callback uniattn.train.step_stats:StepStats \\
        --include_num_input_tokens_seen true

Every rank writes TRAINER_OUTPUT_DIR/step_stats/rank{R}.json when its training ends (each stage of a UniAttn
run has its own): the wall time of every optimizer step (the GPU synchronised at both ends), the input tokens the
Trainer had counted after each step (all ranks together; with ``true`` padding is included, which is what the
accelerator computes), and this rank's peak allocated and reserved GPU memory, or its peak resident memory on a
CPU. ``summarise`` turns one stage's files into tokens/s per device, median step time and peak memory.
"""

from __future__ import annotations

import json
import resource
import statistics
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from ..io import write_json

STATS_DIR = "step_stats"


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StepStats(TrainerCallback):
    def on_train_begin(self, args, state, control, **kwargs):
        self.times, self.tokens, self.start = [], [], None
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def on_step_begin(self, args, state, control, **kwargs):
        _sync()
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        _sync()
        if self.start is not None:
            self.times.append(time.perf_counter() - self.start)
            self.tokens.append(int(state.num_input_tokens_seen or 0))

    def on_train_end(self, args, state, control, **kwargs):
        memory = ({"peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
                   "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}
                  if torch.cuda.is_available() else
                  # ru_maxrss is in KiB on Linux
                  {"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20})
        write_json(Path(args.output_dir) / STATS_DIR / f"rank{args.process_index}.json",
                   {"world_size": args.world_size, "step_seconds": self.times, "tokens_seen": self.tokens, **memory})


def summarise(trainer_dir: Path, skip: int = 1) -> dict | None:
    """One stage's figures from its ranks' files: steps after the first ``skip`` (compilation, allocator
    warm-up) give tokens/s; the peak is the largest rank's. None if no rank wrote one."""
    ranks = [json.loads(p.read_text()) for p in sorted((trainer_dir / STATS_DIR).glob("rank*.json"))]
    if not ranks:
        return None
    first = ranks[0]
    times, tokens = first["step_seconds"], first["tokens_seen"]
    skip = min(skip, max(len(times) - 1, 0))
    steady = times[skip:]
    counted = tokens[-1] - (tokens[skip - 1] if skip else 0) if tokens else 0
    per_s = counted / sum(steady) if steady and sum(steady) > 0 else 0.0
    peak_key = "peak_allocated_gib" if "peak_allocated_gib" in first else "peak_rss_gib"
    return {"steps": len(times), "median_step_s": statistics.median(steady) if steady else None,
            "tokens_per_s": per_s, "tokens_per_s_per_device": per_s / first["world_size"],
            "peak_gib_per_device": max(r[peak_key] for r in ranks), "peak_kind": peak_key}
