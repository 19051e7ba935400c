"""Per-batch activations that init calc carries from one layer to the next, kept where memory allows.

Init calc walks both models layer by layer over the whole calibration set (a follower's ``W_c``
needs every batch before any batch may pass that follower), so each batch's residual streams
and its leaders' states wait between layers. ``ActivationStore`` holds them:

* ``device``: where they were computed (fastest; memory grows with the calibration set);
* ``cpu``: in host memory, one batch on the device at a time (device memory bounded). From a
  GPU the copies go to page-locked memory without waiting: the stream orders them before the
  batch's next use, and page-locked copies run several times faster than pageable ones (each
  layer moves every batch out and back);
* ``disk``: one file per batch in a temporary folder, one batch in memory at a time (device and
  host memory bounded: peak memory does not depend on the number of calibration samples).

A leader's state is stored without its materialised attention probabilities (Gemma-2 under
eager): a follower recomputes them from the stored post-RoPE query and key, the same arithmetic.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
from collections import UserDict
from pathlib import Path

import torch

OFFLOAD_MODES = ("auto", "device", "cpu", "disk")
logger = logging.getLogger(__name__)
_pinning = {"ok": True}  # cleared, with one warning, where page-locked memory cannot be had


def _to_host(t: torch.Tensor, pinned: bool) -> torch.Tensor:
    if pinned and _pinning["ok"] and t.is_cuda:
        try:
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        except RuntimeError as e:
            _pinning["ok"] = False
            logger.warning("page-locked host memory unavailable (%s); offloading through pageable memory", e)
        else:
            return host.copy_(t, non_blocking=True)
    return t.to("cpu")


def _move(value, device, pinned: bool = False):
    """``value`` (tensors, dicts, dataclasses of them) on ``device``; ``pinned``: to page-locked host memory."""
    if isinstance(value, torch.Tensor):
        if torch.device(device).type == "cpu":
            return _to_host(value, pinned)
        return value.to(device, non_blocking=value.is_pinned())
    if isinstance(value, (dict, UserDict)):
        out = UserDict() if isinstance(value, UserDict) else {}
        for k, v in value.items():
            out[k] = _move(v, device, pinned)
        return out
    if dataclasses.is_dataclass(value):
        fields = {f.name: _move(getattr(value, f.name), device, pinned) for f in dataclasses.fields(value)}
        if "probs" in fields:
            fields["probs"] = None  # recomputed by the follower from query and key: never stored
        return dataclasses.replace(value, **fields)
    return value


class ActivationStore:
    """``put(k, **items)`` / ``get(k)`` for batch ``k``; ``mode`` is one of device, cpu, disk."""

    def __init__(self, mode: str, device: torch.device, folder: str | Path | None = None):
        if mode not in OFFLOAD_MODES[1:]:
            raise ValueError(f"offload mode {mode!r} is not one of {OFFLOAD_MODES[1:]}")
        self.mode, self.device = mode, torch.device(device)
        self.items: dict[int, dict] = {}
        self._tmp = None
        if mode == "disk":
            self._tmp = tempfile.mkdtemp(prefix="uniattn-init-", dir=folder)
            self.folder = Path(self._tmp)

    def put(self, k: int, **items) -> None:
        if self.mode == "device":
            self.items[k] = items
        elif self.mode == "cpu":
            self.items[k] = _move(items, "cpu", pinned=self.device.type == "cuda")
        else:  # a private folder that only this process reads, and removes: no need for atomic writes
            torch.save(_move(items, "cpu"), self.folder / f"{k}.pt")

    def get(self, k: int) -> dict:
        if self.mode == "device":
            return self.items[k]
        if self.mode == "cpu":
            return _move(self.items[k], self.device)
        # Our own files, written above in this process: they hold dataclasses, so not weights_only.
        return _move(torch.load(self.folder / f"{k}.pt", map_location="cpu", weights_only=False), self.device)

    def close(self) -> None:
        self.items.clear()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def choose_mode(mode: str, device: torch.device, estimate_bytes: int, budget_bytes: int) -> str:
    """``auto``: keep activations where they are computed while they fit ``budget_bytes``; beyond that,
    host memory for a GPU run, files for a CPU run."""
    if mode != "auto":
        return mode
    if estimate_bytes <= budget_bytes:
        return "device"
    return "cpu" if torch.device(device).type == "cuda" else "disk"


def estimate_bytes(batches, hidden: int, element_size: int, leader_width: int) -> int:
    """Bytes the stored activations take at once: two residual streams plus one leader's state per token."""
    tokens = sum(int(b["input_ids"].numel()) for b in batches)
    return tokens * (2 * hidden + leader_width) * element_size
