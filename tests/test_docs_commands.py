"""Every command the README and docs/ show still exists: each ``python -m uniattn...`` module answers
``--help`` and each ``bash scripts/...`` script is there and parses (after the layout move, say)."""

from __future__ import annotations

import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
TEXT = "\n".join(p.read_text() for p in DOCS)
# placeholders such as ``uniattn.tools.NAME`` are not commands
MODULES = sorted({m for m in re.findall(r"python -m (uniattn(?:\.[A-Za-z0-9_]+)+)", TEXT) if not m.split(".")[-1].isupper()})
SCRIPTS = sorted(set(re.findall(r"(?:bash )?scripts/([A-Za-z0-9_.-]+\.sh)", TEXT)))


def test_the_docs_name_commands():
    assert len(MODULES) >= 15 and "uniattn.tools.study" in MODULES and "uniattn.train" in MODULES
    assert "quickstart.sh" in SCRIPTS and "train_deepspeed-init_calc.sh" in SCRIPTS


@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")  # runpy of an imported module
@pytest.mark.parametrize("module", MODULES)
def test_module_answers_help(module, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [module, "--help"])
    with pytest.raises(SystemExit) as done:
        runpy.run_module(module, run_name="__main__", alter_sys=False)
    assert done.value.code in (0, None), module
    assert "usage" in capsys.readouterr().out.lower() or module.endswith(".run")


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_exists_and_parses(script):
    path = REPO / "scripts" / script
    assert path.is_file(), f"docs name scripts/{script}, which does not exist"
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
