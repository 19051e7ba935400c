"""uniattn.io: the one atomic writer (text, JSON and, through atomic_path, any writer that wants a file name)."""

from __future__ import annotations

import pytest

from uniattn.io import atomic_path, write_json, write_text


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = write_text(tmp_path / "a.txt", "old\n")
    with pytest.raises(RuntimeError, match="writer failed"):
        with atomic_path(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("writer failed")
    assert path.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_files_get_the_permissions_of_a_plain_open(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    written = write_json(tmp_path / "sub" / "b.json", {"b": 1, "a": "\u00e9"})
    assert written.read_text(encoding="utf-8") == '{\n  "a": "\u00e9",\n  "b": 1\n}\n'
    assert written.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777  # not mkstemp's private 0600
    assert write_json(tmp_path / "c.json", {"a": "\u00e9"}, ensure_ascii=True).read_text() == '{\n  "a": "\\u00e9"\n}\n'


def test_atomic_path_keeps_the_extension_for_writers_that_read_it(tmp_path):
    with atomic_path(tmp_path / "plot.png") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".plot.png.") and tmp.suffix == ".png"
        tmp.write_bytes(b"\x89PNG")
    assert (tmp_path / "plot.png").read_bytes() == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plot.png"]


def test_atomic_dir_appears_whole_replaces_and_leaves_nothing_on_error(tmp_path):
    import os

    from uniattn.io import atomic_dir

    out = tmp_path / "ckpt"
    with atomic_dir(out) as staged:
        (staged / "a.txt").write_text("one")
        assert not out.exists()  # nothing visible until the block ends
    assert (out / "a.txt").read_text() == "one"
    (tmp_path / "plain").mkdir()
    assert out.stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777  # as mkdir would make it
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as staged:
            (staged / "a.txt").write_text("half")
            raise RuntimeError("writer died")
    assert (out / "a.txt").read_text() == "one"
    with atomic_dir(out) as staged:
        (staged / "b.txt").write_text("two")
    assert sorted(os.listdir(out)) == ["b.txt"] and sorted(os.listdir(tmp_path)) == ["ckpt", "plain"]
