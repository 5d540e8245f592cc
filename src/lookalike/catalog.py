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
    """All images of all products, sorted. Hidden entries and files of other types are ignored; folders inside a
    product folder belong to that product."""
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
    """The images of one product folder, nested folders included (they belong to the product), sorted by their
    path inside the product folder. Hidden files and folders are skipped; symbolic links to folders are not
    followed (a loop would never end). A flat product folder gives exactly what it always gave."""
    folder = root / product_id
    out: list[CatalogImage] = []
    nested: list[str] = []
    _scan_folder(folder, product_id, out, nested, top=True)
    if nested:
        logger.info("product %s: images in nested folder(s) %s belong to it", product_id, ", ".join(sorted(nested)))
    out.sort(key=lambda im: im.path.relative_to(folder).as_posix())
    return out


def _scan_folder(folder: Path, product_id: str, out: list[CatalogImage], nested: list[str], *, top: bool) -> None:
    try:
        entries = list(os.scandir(folder))
    except OSError as exc:
        logger.warning("cannot list %s: %s", folder, exc.strerror or exc)
        return
    found = 0
    for f in entries:
        if f.name.startswith("."):
            continue
        try:
            if f.is_dir(follow_symlinks=False):
                _scan_folder(Path(f.path), product_id, out, nested, top=False)
                continue
            if not is_image_name(f.name) or not f.is_file():
                continue
            st = f.stat()
        except OSError:
            continue
        out.append(CatalogImage(product_id, Path(f.path), st.st_size, st.st_mtime_ns))
        found += 1
    if found and not top:
        nested.append(folder.name)


def find_duplicates(images: list[CatalogImage]) -> list[list[CatalogImage]]:
    """Groups of byte-identical photos filed under two or more products, each group sorted by path, with a
    warning naming the files of each group. A photo filed twice under one product is harmless and not reported.

    Only files of equal size are read and hashed, so a catalog without such coincidences costs a ``stat``.
    """
    import hashlib

    by_size: dict[int, list[CatalogImage]] = {}
    for im in images:
        by_size.setdefault(im.size, []).append(im)
    groups: list[list[CatalogImage]] = []
    for same_size in by_size.values():
        if len({im.product_id for im in same_size}) < 2:
            continue
        by_hash: dict[str, list[CatalogImage]] = {}
        for im in same_size:
            try:
                digest = hashlib.sha256(im.path.read_bytes()).hexdigest()
            except OSError as exc:
                logger.warning("cannot read %s to look for duplicates: %s", im.path, exc.strerror or exc)
                continue
            by_hash.setdefault(digest, []).append(im)
        for group in by_hash.values():
            if len({im.product_id for im in group}) > 1:
                groups.append(sorted(group, key=lambda im: str(im.path)))
    groups.sort(key=lambda g: str(g[0].path))
    for group in groups:
        logger.warning(
            "the same photo is filed under %d products: %s",
            len({im.product_id for im in group}),
            ", ".join(f"{im.path} ({im.product_id})" for im in group),
        )
    return groups


def stat_image(product_id: str, path: Path) -> CatalogImage:
    st = path.stat()
    return CatalogImage(product_id, path.resolve(), st.st_size, st.st_mtime_ns)
