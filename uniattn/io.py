"""Atomic file writes: a reader sees the old file or the whole new one, never a half-written one.

Every output file of the project goes through here: it is written under a
hidden temporary name in the same folder, then renamed over the target. Text
and JSON go through ``write_text`` / ``write_json`` / ``write_jsonl``; a writer
that wants a file name of its own (matplotlib's ``savefig``, safetensors'
``save_file``) writes to the path that ``atomic_path`` yields:

    with atomic_path(png) as tmp:
        fig.savefig(tmp)          # tmp ends in ".png" too, so the format is inferred as before

The file gets the permissions a plain ``open(path, "w")`` would give it (0666
less the umask), not the private 0600 of a temporary file. Whole directories
(checkpoints, the pool) go through ``atomic_dir``:

    with atomic_dir(out) as staged:
        model.save_pretrained(staged)   # out appears only now, complete; an old out is replaced

Training's final model is the one exception: every rank writes into its staged folder and rank 0
renames it (``uniattn.train.stages.publish_final``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)  # the only way to read the umask; done once, at import, before any writer thread starts
    os.umask(mask)
    return mask


_FILE_MODE, _DIR_MODE = 0o666 & ~_umask(), 0o777 & ~_umask()


@contextmanager
def atomic_path(path, suffix: str | None = None):
    """Yield a temporary path next to ``path``; when the block ends without an error it replaces ``path``.

    On an error the temporary file is removed and the old ``path`` (if any) is left as it was. ``suffix`` ends
    the temporary name; by default ``.tmp`` plus the target's own extension, for writers that pick a format by it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".tmp" + path.suffix if suffix is None else suffix
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        tmp.chmod(_FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path, text: str) -> Path:
    path = Path(path)
    with atomic_path(path, suffix=".tmp") as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    return path


def write_json(path, obj, indent: int | None = 2, ensure_ascii: bool = False) -> Path:
    return write_text(path, json.dumps(obj, indent=indent, sort_keys=True, ensure_ascii=ensure_ascii) + "\n")


def _line(row) -> str:
    # Line separators inside strings stay escaped: readers that split on them (str.splitlines) see one record a line.
    text = json.dumps(row, ensure_ascii=False, sort_keys=True)
    return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029").replace("\x85", "\\u0085") + "\n"


def write_jsonl(path, rows) -> Path:
    return write_text(path, "".join(_line(r) for r in rows))


@contextmanager
def atomic_dir(path):
    """Yield a temporary folder next to ``path``; when the block ends without an error it becomes ``path``
    (an existing ``path`` is replaced). On an error the temporary folder is removed and ``path`` left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        yield staged
        staged.chmod(_DIR_MODE)  # what a plain mkdir gives, not mkdtemp's private 0700
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        if path.exists():
            path.rename(old)
        staged.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
