"""Crash-safe file output shared by every writer in the package: a reader (or a resumed run) sees
the old file or directory or the complete new one, never a half-written one.

The pattern everywhere: write to a temporary name beside the target, ``fsync`` it, ``os.replace``
it over the target (atomic on POSIX within one filesystem), then ``fsync`` the parent directory so
the rename itself survives a power loss.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Collection
from pathlib import Path


def fsync_path(path: str | os.PathLike) -> None:
    """``fsync`` a file or directory by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir_if_possible(path: str | os.PathLike) -> None:
    try:
        fsync_path(path)
    except OSError:  # some filesystems refuse fsync on directories
        pass


def _write_temp(directory: Path, data: bytes) -> Path:
    """``data`` in a new fsynced file of a short unique name in ``directory``. The name is not
    derived from the target's: a target name near the 255-byte limit would overflow it."""
    while True:
        # O_EXCL with mode 0666: unique, and the umask applies as to any new file (mkstemp's
        # 0600 would need a chmod, and reading the umask means changing it)
        tmp = directory / f".tmp-{os.getpid()}-{secrets.token_hex(6)}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically, through a temporary file of a short unique name
    (pid and a random suffix: two writers beside each other never share one) in the same
    directory."""
    path = Path(path)
    tmp = _write_temp(path.parent, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir_if_possible(path.parent)
    return path


def atomic_write_files(directory: str | os.PathLike, files: dict[str, bytes],
                       remove: Collection[str] = ()) -> None:
    """Write a set of files (``{name: data}``) into ``directory``: every file is first written
    to a temporary beside its target (a failure there leaves the directory as it was and no
    temporary behind), then the files named in ``remove`` are deleted and the temporaries are
    renamed over their targets, with signals held so Ctrl-C cannot stop the set halfway."""
    directory = Path(directory)
    temps: dict[str, Path] = {}
    try:
        for name, data in files.items():
            temps[name] = _write_temp(directory, data)
        with signals_deferred():
            for name in remove:
                (directory / name).unlink(missing_ok=True)
            for name in list(temps):
                os.replace(temps.pop(name), directory / name)
    finally:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
    fsync_dir_if_possible(directory)


def fsync_tree(root: str | os.PathLike) -> None:
    """``fsync`` every file under ``root``, then ``root`` itself."""
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as fh:
                os.fsync(fh.fileno())
    fsync_dir_if_possible(root)


# Files whose presence marks a directory as an earlier output (a model checkpoint or a report),
# which replacing as a whole loses nothing the user did not ask to replace.
OUTPUT_MARKERS = ("config.json", "report.json")


def check_replaceable_dir(out_dir: str | os.PathLike) -> None:
    """Raise FileExistsError unless ``out_dir`` is absent, empty, or an earlier output directory
    (it holds one of :data:`OUTPUT_MARKERS`). Replacing is whole-directory, so a mistyped
    ``--out`` naming a file or some unrelated directory must be refused, not swapped away."""
    out = Path(out_dir)
    if not out.exists():
        return
    if not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory; choose another output path")
    names = os.listdir(out)
    if names and not any(m in names for m in OUTPUT_MARKERS):
        raise FileExistsError(
            f"{out} exists and is not an output directory (it has no {' or '.join(OUTPUT_MARKERS)}); "
            f"it would be replaced as a whole, so choose a new output path or remove it first")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def signals_deferred():
    """Hold SIGINT and SIGTERM until the block ends, then act on the first one as its handler
    would have: for the few renames and deletions that must not be cut in half. The Python
    handlers are swapped for a recorder (masking the signal would not do: the kernel hands a
    process-directed signal to any thread that does not block it, and torch runs many). A no-op
    outside the main thread, where handlers cannot be set."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in held}
    try:
        yield
    finally:
        for s, handler in previous.items():
            if handler is not None:  # None: a handler not set from Python, nothing to restore
                signal.signal(s, handler)
        if caught:
            handler = previous[caught[0]]
            if callable(handler):
                handler(caught[0], None)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(caught[0])


def atomic_save_dir(out_dir: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Run ``write(tmp_dir)`` into a temp directory beside ``out_dir``, fsync it, then swap it in
    with ``os.replace``: readers see the old directory or the complete new one, never a half-written
    one. An existing ``out_dir`` is replaced only after the new one is fully on disk, and only if
    :func:`check_replaceable_dir` allows it; if ``write`` fails, the temp directory is removed and
    ``out_dir`` is left as it was. The swap and the removal of the old directory run with signals
    held, so Ctrl-C there cannot leave the old directory half-deleted beside the new one."""
    out = Path(out_dir).absolute()
    check_replaceable_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # The temporaries' names hold at most 32 characters of the target's (recognisable, and a
    # valid name near the 255-byte limit plus a suffix would overflow it).
    stem = out.name[:32]
    tmp = Path(tempfile.mkdtemp(prefix=f".{stem}.tmp-", dir=out.parent))
    try:
        write(tmp)
        # mkdtemp makes the directory private (0700) and some writers make private files; the
        # output gets the modes any new file or directory of this user gets (the umask's).
        mask = _umask()
        os.chmod(tmp, 0o777 & ~mask)
        for dirpath, dirs, files in os.walk(tmp):
            for name in dirs:
                os.chmod(os.path.join(dirpath, name), 0o777 & ~mask)
            for name in files:
                os.chmod(os.path.join(dirpath, name), 0o666 & ~mask)
        fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    with signals_deferred():
        old = None
        try:
            if out.exists():
                # os.replace cannot overwrite a non-empty directory: move the old one aside first.
                old = Path(tempfile.mkdtemp(prefix=f".{stem}.old-", dir=out.parent))
                os.rmdir(old)
                os.replace(out, old)
            os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            if old is not None and old.exists() and not out.exists():
                os.replace(old, out)
            raise
        fsync_dir_if_possible(out.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return out
