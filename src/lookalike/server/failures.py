"""How the server answers what is not its fault nor the client's: a catalog write that fails (disk full, read-only,
another writer holding the catalog), a client that hangs up mid-upload, and memory left over after big uploads."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os

from fastapi import HTTPException, Request
from starlette.requests import ClientDisconnect
from starlette.responses import Response

logger = logging.getLogger(__name__)

DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
READ_ONLY = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})
BUSY = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.EBUSY, errno.ETIMEDOUT})
NOTHING_CHANGED = "the catalog and the index are as they were before this request"


def write_error_names() -> tuple[type[BaseException], ...]:
    """The exception types a failed catalog write raises: OSError, and the engine's CatalogWriteError wherever it
    is defined (it may not be an OSError subclass; it carries ``.errno``)."""
    found: list[type[BaseException]] = [OSError]
    for module in ("lookalike.errors", "lookalike.engine", "lookalike.store"):
        try:
            cls = getattr(__import__(module, fromlist=["CatalogWriteError"]), "CatalogWriteError", None)
        except ImportError:
            continue
        if isinstance(cls, type) and issubclass(cls, BaseException) and cls not in found:
            found.append(cls)
    return tuple(found)


def write_failed(exc: BaseException, action: str) -> HTTPException:
    """507 for a full disk or quota, 503 (with Retry-After) for a read-only catalog, a busy one or any other write
    failure; the reason without the file paths of the server."""
    code = getattr(exc, "errno", None)
    # the standard text of the errno, never exc.strerror: CatalogWriteError's carries the server's paths
    reason = getattr(exc, "reason", None) or (os.strerror(code) if code else "") or type(exc).__name__
    if isinstance(exc, TimeoutError) or code in BUSY:
        logger.warning("%s: the catalog is busy (%s)", action, reason)
        return HTTPException(
            503, f"cannot {action}: another change of the catalog is in progress; retry", headers={"Retry-After": "2"}
        )
    logger.error("%s failed: %s", action, exc)  # the full message (with paths) only in the log
    if code in DISK_FULL:
        return HTTPException(507, f"cannot {action}: the server's disk is full ({reason}); {NOTHING_CHANGED}")
    if code in READ_ONLY:
        return HTTPException(
            503,
            f"cannot {action}: the catalog is read-only on the server ({reason}); {NOTHING_CHANGED}",
            headers={"Retry-After": "60"},
        )
    return HTTPException(
        503, f"cannot {action}: writing the catalog failed ({reason}); {NOTHING_CHANGED}", headers={"Retry-After": "10"}
    )


async def client_gone(request: Request, exc: Exception) -> Response:
    """A client that hung up mid-upload: one INFO line (no traceback: anyone can cause it), nothing to answer."""
    logger.info("client %s hung up during %s %s", _peer(request), request.method, request.url.path)
    return Response(status_code=499)


def _peer(request: Request) -> str:
    client = request.scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "?"


_libc = None


def trim_memory() -> None:
    """Give freed heap memory back to the system (glibc keeps it otherwise: RSS would stay at its peak after a
    burst of big uploads). A no-op where there is no glibc."""
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        try:
            _libc = ctypes.CDLL(name) if name else False
        except OSError:
            _libc = False
    if _libc and hasattr(_libc, "malloc_trim"):
        _libc.malloc_trim(0)


__all__ = ["ClientDisconnect", "client_gone", "trim_memory", "write_error_names", "write_failed"]
