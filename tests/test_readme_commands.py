"""The README's commands that fit on a CPU, run as a user runs them (the other documented commands are
checked to exist and answer --help in test_docs_commands.py)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from uniattn.tools.smollm2 import ensure_smollm2

REPO = Path(__file__).resolve().parent.parent


def _run(cmd: str, tmp_path, timeout: int, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", cmd], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OUTPUT_DIR": str(tmp_path / "out"), **env})


def test_readme_starts_with_the_quick_start_and_the_tests():
    block = (REPO / "README.md").read_text().split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
    assert [line.split("#")[0].strip() for line in block[:2]] == ["bash scripts/quickstart.sh", "bash scripts/test.sh"]


def test_quick_start_runs_and_prints_its_summary(tmp_path):
    proc = _run("bash scripts/quickstart.sh", tmp_path, timeout=1500, MODEL_DIR=str(ensure_smollm2()))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    losses = [float(x) for x in re.findall(r"\| (\d\.\d{4}) \| [\d.]+ \| \d+ \|", out)]
    assert len(losses) == 4, out[-2000:]
    base, zero, init, trained = losses
    assert base < init < zero and trained < zero  # W_c = 0 hurts, the init repairs part of it, training more
    assert "-20.00%" in out and f"checkpoint: {tmp_path / 'out' / 'train' / 'final'}" in out
    assert (tmp_path / "out" / "train" / "final" / "model.safetensors").is_file()
