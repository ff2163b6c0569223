"""Atomic file writes."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from basalt.machinery import fileio
from basalt.machinery.fileio import replacing, write_atomic


def test_write_atomic_creates_directories_and_sets_the_mode(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "file"
    write_atomic(path, "hello", mode=0o640)
    assert path.read_text() == "hello"
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_write_atomic_replaces_and_leaves_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "file"
    write_atomic(path, b"one")
    write_atomic(path, b"two")
    assert path.read_bytes() == b"two"
    assert os.listdir(tmp_path) == ["file"]


def test_failed_write_keeps_the_old_file_and_cleans_up(tmp_path: Path) -> None:
    path = tmp_path / "file"
    write_atomic(path, "old")
    with pytest.raises(TypeError):
        write_atomic(path, ["not", "bytes"])  # type: ignore[arg-type]  # fails mid-write
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["file"]


def test_mode_none_sets_no_mode_for_filesystems_without_modes(tmp_path: Path) -> None:
    """vfat (the ESP) refuses a chmod it cannot represent: mode=None makes none."""
    path = tmp_path / "entry.conf"
    write_atomic(path, b"linux /x\n", mode=None)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # as mkstemp made it, untouched
    assert path.read_bytes() == b"linux /x\n"


def test_replacing_streams_and_replaces_only_a_complete_write(tmp_path: Path) -> None:
    path = tmp_path / "vmlinuz"
    with replacing(path, mode=None) as handle:
        for chunk in (b"a" * 10, b"b" * 10):
            handle.write(chunk)
    assert path.read_bytes() == b"a" * 10 + b"b" * 10
    with pytest.raises(ValueError), replacing(path, mode=None) as handle:
        handle.write(b"half")
        raise ValueError("the hash did not match")
    assert path.read_bytes() == b"a" * 10 + b"b" * 10
    assert os.listdir(tmp_path) == ["vmlinuz"]


def test_a_temporary_name_in_use_is_never_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """replacing() creates its temporary file exclusively: a name that exists (here every
    name it draws) is not opened, and the existing file is left as it was."""
    taken = tmp_path / ".f.000000000000"
    taken.write_text("someone else's")
    monkeypatch.setattr(fileio.os, "urandom", lambda n: b"\0" * n)
    with pytest.raises(FileExistsError), replacing(tmp_path / "f") as handle:
        handle.write(b"new")
    assert taken.read_text() == "someone else's" and not (tmp_path / "f").exists()
    monkeypatch.undo()
    write_atomic(tmp_path / "f", "new")
    assert (tmp_path / "f").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".f.000000000000", "f"]
