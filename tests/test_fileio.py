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


def _model(payload):
    def write(d):
        (d / "config.json").write_text("{}")
        (d / payload).write_bytes(b"1")
    return write


def test_atomic_save_dir_swaps_in_complete_directory(tmp_path):
    out = tmp_path / "model"
    fileio.atomic_save_dir(out, _model("w.bin"))
    fileio.atomic_save_dir(out, _model("v.bin"))
    # the old directory was replaced, not merged
    assert sorted(os.listdir(out)) == ["config.json", "v.bin"]

    def broken(d):
        (d / "half.bin").write_bytes(b"x")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        fileio.atomic_save_dir(out, broken)
    assert sorted(os.listdir(out)) == ["config.json", "v.bin"]
    assert os.listdir(tmp_path) == ["model"]


def test_atomic_save_dir_never_swaps_away_what_is_not_an_output(tmp_path):
    """A mistyped output path naming a file or an unrelated directory is refused before anything
    is written; an empty directory or an earlier output (config.json / report.json) is replaced."""
    a_file = tmp_path / "notes.txt"
    a_file.write_text("precious")
    with pytest.raises(FileExistsError, match="notes.txt exists and is not a directory"):
        fileio.atomic_save_dir(a_file, _model("w.bin"))
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("precious")
    with pytest.raises(FileExistsError, match="is not an output directory"):
        fileio.atomic_save_dir(home, _model("w.bin"))
    assert a_file.read_text() == "precious" and (home / "thesis.tex").read_text() == "precious"
    assert sorted(os.listdir(tmp_path)) == ["home", "notes.txt"]  # no temp directory left
    empty = tmp_path / "empty"
    empty.mkdir()
    fileio.atomic_save_dir(empty, _model("w.bin"))
    report = tmp_path / "report"
    report.mkdir()
    (report / "report.json").write_text("{}")
    fileio.atomic_save_dir(report, _model("w.bin"))
    assert (empty / "w.bin").is_file() and (report / "w.bin").is_file()


def test_atomic_save_dir_output_has_the_normal_directory_mode(tmp_path):
    mask = os.umask(0o022)
    try:
        out = fileio.atomic_save_dir(tmp_path / "m", _model("w.bin"))
    finally:
        os.umask(mask)
    assert (out.stat().st_mode & 0o777) == 0o755  # not mkdtemp's private 0700
    for f in out.iterdir():
        assert (f.stat().st_mode & 0o777) == 0o644, f


def test_signals_are_held_through_the_swap(tmp_path):
    """A signal that arrives while the old output is being swapped out and deleted runs its
    handler only afterwards: the new output is complete and no old copy is left beside it."""
    import signal

    seen = []

    def handler(signum, frame):
        seen.append(sorted(os.listdir(tmp_path)))

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        fileio.atomic_save_dir(tmp_path / "m", _model("w.bin"))
        real_rmtree = fileio.shutil.rmtree

        def rmtree_with_a_signal(path, *a, **k):
            os.kill(os.getpid(), signal.SIGTERM)  # arrives in the middle of the clean-up
            assert seen == []  # held
            return real_rmtree(path, *a, **k)

        fileio.shutil.rmtree = rmtree_with_a_signal
        try:
            fileio.atomic_save_dir(tmp_path / "m", _model("v.bin"))
        finally:
            fileio.shutil.rmtree = real_rmtree
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert seen == [["m"]]  # ran after the old copy was gone
    assert sorted(os.listdir(tmp_path / "m")) == ["config.json", "v.bin"]
