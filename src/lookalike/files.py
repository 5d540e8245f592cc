"""Atomic files and the advisory locks every writer of a cache folder uses.

Every write is atomic: written to a temporary file in the same folder, fsynced, then renamed over the target, so
a crash at any moment leaves either the old or the new content. Callers reach these functions through this module
(``files.atomic_write_bytes``) so that tests can inject a failure at any write.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import CatalogWriteError

# errno values that mean "this folder cannot take the write": reported as CatalogWriteError, never a bare OSError.
WRITE_ERRNOS = {
    errno.ENOSPC: "disk full",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied (read-only)",
    errno.EPERM: "operation not permitted (read-only)",
}


def atomic_write_bytes(path: Path, data: bytes) -> None:
    commit_temp(write_temp(path, data), path)


def write_temp(path: Path, data: bytes) -> Path:
    """Write ``data`` to a fsynced temporary file beside ``path`` (the step that needs disk space); put it in place
    with :func:`commit_temp` (a rename) or drop it with :func:`discard_temp`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise as_write_error(exc, path) from exc
    try:
        # mkstemp makes the file private (0600); keep the mode of the file replaced, else the usual 0644
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as exc:
        discard_temp(Path(tmp))
        if isinstance(exc, OSError):
            raise as_write_error(exc, path) from exc
        raise
    return Path(tmp)


def commit_temp(tmp: Path, path: Path) -> None:
    """Rename a file from :func:`write_temp` over ``path`` (atomic), then make the rename durable."""
    try:
        os.replace(tmp, path)
    except BaseException as exc:
        discard_temp(Path(tmp))
        if isinstance(exc, OSError):
            raise as_write_error(exc, path) from exc
        raise
    _fsync_dir(Path(path).parent)


def discard_temp(tmp: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(tmp)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform can open a directory
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """One short writer at a time per folder (advisory; readers never wait)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a+b") as f:
        try:
            import fcntl

            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover - Windows: no advisory lock
            pass
        yield


_THREAD_LOCKS: dict[str, threading.RLock] = {}
_THREAD_LOCKS_GUARD = threading.Lock()


@contextlib.contextmanager
def catalog_lock(cache_dir: Path) -> Iterator[None]:
    """The catalog's writer lock, ``<cache_dir>/.write.lock``: held across the whole load -> change -> save of a
    catalog change, by threads of this process (a re-entrant thread lock) and by other processes (``flock``)."""
    folder = Path(cache_dir).expanduser().resolve()
    with _THREAD_LOCKS_GUARD:
        thread_lock = _THREAD_LOCKS.setdefault(str(folder), threading.RLock())
    with thread_lock:
        depth = getattr(_HELD, str(folder), 0)
        if depth:  # re-entered by the thread that holds it: the flock is already ours
            setattr(_HELD, str(folder), depth + 1)
            try:
                yield
            finally:
                setattr(_HELD, str(folder), depth)
            return
        try:
            folder.mkdir(parents=True, exist_ok=True)
            f = open(folder / ".write.lock", "a+b")  # noqa: SIM115 - held across the yield
        except OSError as exc:
            raise as_write_error(exc, folder) from exc
        with f:
            try:
                import fcntl

                fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            except ImportError:  # pragma: no cover - Windows: no advisory lock
                pass
            setattr(_HELD, str(folder), 1)
            try:
                yield
            finally:
                setattr(_HELD, str(folder), 0)


_HELD = threading.local()


def as_write_error(exc: OSError, path: Path | str | None = None) -> OSError:
    """``exc`` as a :class:`CatalogWriteError` when it means the disk is full or read-only; else ``exc`` itself."""
    if isinstance(exc, CatalogWriteError) or exc.errno not in WRITE_ERRNOS:
        return exc
    where = path if path is not None else (exc.filename or "?")
    return CatalogWriteError(exc.errno, WRITE_ERRNOS[exc.errno], str(where), exc.strerror or "")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode("utf-8")
