"""Crash-safe writers (purify_fast.fileio): the old file or the whole new one, never a part, and
no temporary file left behind on failure."""

import os

import pytest

from purify_fast import fileio


def test_atomic_write_bytes_replaces_whole_file(tmp_path):
    path = tmp_path / "a.json"
    fileio.atomic_write_bytes(path, b"old")
    fileio.atomic_write_bytes(path, b"new contents")
    assert path.read_bytes() == b"new contents"
    assert os.listdir(tmp_path) == ["a.json"]


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "a.json"
    fileio.atomic_write_bytes(path, b"old")

    def no_rename(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fileio.os, "replace", no_rename)
    with pytest.raises(OSError, match="No space"):
        fileio.atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["a.json"]


def test_atomic_save_dir_swaps_in_complete_directory(tmp_path):
    out = tmp_path / "model"
    fileio.atomic_save_dir(out, lambda d: (d / "w.bin").write_bytes(b"1"))
    fileio.atomic_save_dir(out, lambda d: (d / "v.bin").write_bytes(b"2"))
    assert sorted(os.listdir(out)) == ["v.bin"]  # the old directory was replaced, not merged

    def broken(d):
        (d / "half.bin").write_bytes(b"x")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        fileio.atomic_save_dir(out, broken)
    assert sorted(os.listdir(out)) == ["v.bin"] and os.listdir(tmp_path) == ["model"]
