"""Atomic file writes: a reader sees the old file or the whole new one, never a half-written one.

Every output of the project goes through here: the text is written to a hidden
temporary name in the same folder, then renamed over the target.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def write_text(path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path, obj, indent: int | None = 2) -> Path:
    return write_text(path, json.dumps(obj, indent=indent, sort_keys=True, ensure_ascii=False) + "\n")


def _line(row) -> str:
    # Line separators inside strings stay escaped: readers that split on them (str.splitlines) see one record a line.
    text = json.dumps(row, ensure_ascii=False, sort_keys=True)
    return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029").replace("\x85", "\\u0085") + "\n"


def write_jsonl(path, rows) -> Path:
    return write_text(path, "".join(_line(r) for r in rows))
