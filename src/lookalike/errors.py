"""Errors a caller may want to tell apart, under one root (httpx: one ``HTTPError`` root)."""

from __future__ import annotations

import errno


class LookalikeError(Exception):
    """The root of lookalike's own errors."""


class CatalogWriteError(LookalikeError, OSError):
    """A write failed because the disk is full or a folder is read-only; a catalog change that raises it changed
    nothing.

    An ``OSError`` with the original ``errno`` (ENOSPC, EROFS, EACCES, ...), the ``filename`` that failed and a
    message saying why; the server answers 507 for a full disk and 503 otherwise.
    """

    def __init__(self, code: int, reason: str, path: str, detail: str = ""):
        more = f" ({detail})" if detail and detail.lower() != reason else ""
        OSError.__init__(self, code, f"cannot write {path}: {reason}{more}", path)
        self.reason = reason
        self.path = path

    @property
    def disk_full(self) -> bool:
        return self.errno in (errno.ENOSPC, errno.EDQUOT)


__all__ = ["CatalogWriteError", "LookalikeError"]
