"""Offline evaluation of base and UniAttn checkpoints with lm-evaluation-harness.

Everything needed at evaluation time ships in the repository: the task
definitions and their small JSONL data live in ``uniattn/eval/tasks/``, so an
evaluation never downloads anything and never needs ``uniattn`` to be
importable (a UniAttn checkpoint loads through ``trust_remote_code``).

    split.py    the fixed train / held-out rule for PMC-LLaMA records (training uses it too)
    prepare.py  rebuilds ``tasks/data/*.jsonl`` from the real sources (PMC-LLaMA, BIG-bench sdist)
    report.py   lm-eval results JSON -> markdown table, shared by ``scripts/eval.sh`` and compare
    compare.py  several checkpoints side by side, as a markdown table and a PNG bar plot

See ``docs/eval.md`` for the commands and the reference scores.
"""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
