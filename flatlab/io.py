"""Crash-safe file writes and one writer per directory.

Writes go to a temporary file beside the target, are fsynced, then atomically renamed over it.
A process killed at any point leaves either the previous version of the file or the new one,
never a truncated mix. A write that fails (disk full, file-size limit, permissions) removes its
temporary file, leaves the previous version untouched, and raises :class:`WriteError` (a
:class:`FlatlabError`: one line, exit status 2 in the CLIs).

:func:`lock_directory` gives one process at a time a directory (a run, an analysis output):
an exclusive ``fcntl.flock`` on ``DIR/.lock``. The kernel drops the lock when its holder exits,
however it exits (SIGKILL included), so a crash never leaves a stale lock behind.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from flatlab.errors import FlatlabError

LOCK_NAME = ".lock"

_UMASK = os.umask(0)
os.umask(_UMASK)

_HINTS = {errno.ENOSPC: "disk full", errno.EFBIG: "over the file-size limit (ulimit -f)",
          errno.EDQUOT: "disk quota exceeded"}


class WriteError(FlatlabError):
    """A file could not be written; the previous version (if any) is intact."""

    def __init__(self, path: Path, err: OSError) -> None:
        self.path, self.errno = path, err.errno
        reason = err.strerror or str(err)
        hint = f", {_HINTS[err.errno]}" if err.errno in _HINTS else ""
        super().__init__(f"cannot write {path}: {reason} (errno {err.errno}{hint}); "
                         f"nothing was replaced")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it and rename it over ``path``.

    Use for writers that want a file name (``safetensors.torch.save_file``, ``savefig``).
    On any error the temporary file is removed and ``path`` is untouched; an ``OSError``
    (ENOSPC, EFBIG, EACCES, ...) becomes a :class:`WriteError`.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as err:
        raise WriteError(path, err) from None
    tmp_path = Path(tmp)
    try:
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; give what open() would
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        os_error = err if isinstance(err, OSError) else _os_error_in(err)
        if os_error is not None:
            raise WriteError(path, os_error) from None
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def _os_error_in(err: BaseException) -> OSError | None:
    """The OS error inside a foreign writer's exception (safetensors reports "... (os error
    28)" in a ``SafetensorError``), or None."""
    if not isinstance(err, Exception):
        return None
    match = re.search(r"\(os error (\d+)\)", str(err))
    if match is None:
        return None
    code = int(match.group(1))
    return OSError(code, os.strerror(code))


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# --------------------------------------------------------------------------- directory lock

_held: dict[Path, tuple[int, int]] = {}  # directory -> (lock file descriptor, nesting depth)
_held_guard = threading.Lock()


@contextlib.contextmanager
def lock_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Hold ``path`` (created if missing) for this process; yields the directory.

    Another process that tries to lock it meanwhile gets, at once, ``FlatlabError("<dir> is in
    use by pid N")``. The holder's pid is written to ``DIR/.lock`` (the file stays; only the
    lock matters). Nested calls in the same process on the same directory are allowed.
    """
    directory = Path(path).expanduser()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        directory = directory.resolve()
    except OSError as err:
        raise WriteError(directory, err) from None
    with _held_guard:
        if directory in _held:
            fd, depth = _held[directory]
            _held[directory] = (fd, depth + 1)
        else:
            _held[directory] = (_acquire(directory), 1)
    try:
        yield directory
    finally:
        with _held_guard:
            fd, depth = _held[directory]
            if depth > 1:
                _held[directory] = (fd, depth - 1)
            else:
                del _held[directory]
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, 0)
                os.close(fd)  # closing the last descriptor releases the flock


def _acquire(directory: Path) -> int:
    lock_file = directory / LOCK_NAME
    try:
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666 & ~_UMASK)
    except OSError as err:
        raise WriteError(lock_file, err) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_pid(fd)
        os.close(fd)
        who = f"pid {holder}" if holder else "another process"
        raise FlatlabError(f"{directory} is in use by {who} (one process writes a directory "
                           f"at a time; wait for it to finish or stop it)") from None
    except OSError as err:
        os.close(fd)
        raise WriteError(lock_file, err) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _read_pid(fd: int) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int(os.pread(fd, 32, 0).decode().strip())
    return None
