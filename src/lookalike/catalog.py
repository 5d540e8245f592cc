"""Find products and their images in a catalog folder: ``data_dir/<product_id>/<image>``.

Knows nothing of models. The order is deterministic (sorted by product, then file name) so two scans of the
same folder give the same index.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp"})


class CatalogError(ValueError):
    """The catalog folder is missing, unreadable or holds no images."""


@dataclass(frozen=True)
class CatalogImage:
    product_id: str
    path: Path  # absolute
    size: int  # bytes
    mtime_ns: int

    @property
    def key(self) -> tuple[str, int, int]:
        """What the embedding cache is keyed by: the same path, size and mtime means the same pixels."""
        return (str(self.path), self.size, self.mtime_ns)


def is_image_name(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def scan_catalog(data_dir: str | Path) -> list[CatalogImage]:
    """All images of all products, sorted. Hidden entries and files of other types are ignored."""
    root = Path(data_dir).expanduser()
    if not root.exists():
        raise CatalogError(f"catalog folder {root} does not exist (set data_dir or LOOKALIKE_DATA_DIR)")
    if not root.is_dir():
        raise CatalogError(f"catalog folder {root} is not a folder")
    root = root.resolve()
    images: list[CatalogImage] = []
    loose = 0
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError as exc:
        raise CatalogError(f"cannot list catalog folder {root}: {exc.strerror or exc}") from exc
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if not entry.is_dir():
            loose += entry.is_file() and is_image_name(entry.name)
            continue
        images.extend(scan_product(root, entry.name))
    if loose:
        logger.warning(
            "%d image(s) lie directly in %s and are ignored: put each product's images in a folder named after it",
            loose,
            root,
        )
    if not images:
        raise CatalogError(
            f"no images found in {root}: expected {root}/<product_id>/<image> with extensions "
            f"{', '.join(sorted(IMAGE_EXTENSIONS))}"
        )
    return images


def scan_product(root: Path, product_id: str) -> list[CatalogImage]:
    """The images of one product folder, sorted by file name."""
    folder = root / product_id
    out = []
    try:
        files = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as exc:
        logger.warning("cannot list %s: %s", folder, exc.strerror or exc)
        return out
    for f in files:
        if not is_image_name(f.name):
            continue
        try:
            if not f.is_file():
                continue
            st = f.stat()
        except OSError:
            continue
        out.append(CatalogImage(product_id, Path(f.path), st.st_size, st.st_mtime_ns))
    return out


def stat_image(product_id: str, path: Path) -> CatalogImage:
    st = path.stat()
    return CatalogImage(product_id, path.resolve(), st.st_size, st.st_mtime_ns)
