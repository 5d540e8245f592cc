"""Catalog images by public id: the engine maps the id to its file, nothing from the request is ever a path; the
file must still lie inside the catalog folder. Thumbnails are decoded with the library's safe decoder and cached."""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from pathlib import Path

from ..imaging import open_image

MEDIA_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".webp": "image/webp"}
EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp"}  # decoded format -> catalog file extension


class NotInCatalog(LookupError):
    pass


def catalog_file(engine, image_id: str) -> Path:
    """The file of an indexed image, looked up by id only; raises LookupError for an unknown id, and
    :class:`NotInCatalog` if the index points outside the catalog folder (a tampered or stale manifest)."""
    path = engine.image_file(image_id)
    root = Path(engine.settings.data_dir).expanduser().resolve()
    try:
        real = Path(path).resolve(strict=True)
    except (OSError, RuntimeError):
        raise NotInCatalog(f"image {image_id!r} is no longer on disk") from None
    if not real.is_relative_to(root) or not real.is_file():
        raise NotInCatalog(f"image {image_id!r} is not a file inside the catalog")
    return real


def media_type(path: Path) -> str:
    return MEDIA_TYPES.get(path.suffix.lower(), "application/octet-stream")


class Thumbnails:
    """JPEG thumbnails, keyed by (file, size, mtime) so that a changed file is never served stale; LRU-bounded."""

    def __init__(self, max_entries: int = 512):
        self.max_entries = max_entries
        self._cache: OrderedDict[tuple[str, int, int], bytes] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: Path, size: int, max_pixels: int) -> bytes:
        key = (str(path), size, path.stat().st_mtime_ns)
        with self._lock:
            data = self._cache.get(key)
            if data is not None:
                self._cache.move_to_end(key)
                return data
        img = open_image(path, max_pixels, draft_size=size).image
        img.thumbnail((size, size))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=85)
        data = buf.getvalue()
        with self._lock:
            self._cache[key] = data
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
        return data
