"""The seed's DataManager, and (for callers of the seed era) the names that moved to :mod:`lookalike.files`,
:mod:`lookalike.cache` and :mod:`lookalike.stores`.

Formats are safe to load from an untrusted disk (``.npz`` without pickle, JSON, FAISS' own format); every write
is atomic (:mod:`lookalike.files`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .cache import CachedEmbeddings, EmbeddingCache
from .catalog import CatalogError, scan_catalog
from .files import atomic_write_bytes, atomic_write_json, sha256_bytes
from .files import folder_lock as write_lock  # noqa: F401 - the seed-era name
from .settings import Settings
from .stores.base import IndexFileError
from .stores.faiss_files import INDEX_FORMAT, INDEX_FORMAT_VERSION, new_build_id, utc_now  # noqa: F401

logger = logging.getLogger(__name__)


class DataManager:
    """Loads the catalog and keeps the embedding cache (the seed's API, on the formats above)."""

    def __init__(self, settings: Settings | None = None, *, fingerprint: str | None = None):
        self.settings = settings if settings is not None else Settings()
        # The engine passes its extractor's fingerprint; standalone use keys the cache by model and input size.
        self.fingerprint = fingerprint or f"{self.settings.model_name}-{self.settings.input_size}"

    @property
    def cache(self) -> EmbeddingCache:
        return EmbeddingCache.for_catalog(self.settings.cache_dir, self.fingerprint, self.settings.data_dir)

    def load_dataset(self) -> tuple[list[str], list[str]]:
        """(image_paths, product_ids) of every image under ``data_dir``, sorted; raises CatalogError if none."""
        images = scan_catalog(self.settings.data_dir)
        return [str(im.path) for im in images], [im.product_id for im in images]

    def save_embeddings(self, embeddings: np.ndarray, image_paths: list[str], product_ids: list[str]) -> None:
        """Cache ``embeddings`` (n, dim) for these images, keyed by each file's current size and mtime."""
        if len(embeddings) != len(image_paths) or len(image_paths) != len(product_ids):
            raise ValueError(
                f"embeddings ({len(embeddings)}), image_paths ({len(image_paths)}) and product_ids "
                f"({len(product_ids)}) must have the same length"
            )
        entries = CachedEmbeddings(vectors=np.asarray(embeddings, dtype=np.float32))
        for p in image_paths:
            path = Path(p).resolve()
            st = path.stat()
            entries.paths.append(str(path))
            entries.sizes.append(st.st_size)
            entries.mtimes.append(st.st_mtime_ns)
            entries.formats.append("")
        self.cache.save(entries)

    def load_embeddings(self) -> tuple[np.ndarray, list[str], list[str]] | None:
        """(embeddings, image_paths, product_ids) from the cache for images still unchanged on disk, or None."""
        cached = self.cache.load()
        if cached.vectors is None or not cached.paths:
            return None
        try:
            current = {im.key: im for im in scan_catalog(self.settings.data_dir)}
        except CatalogError:
            return None
        rows = [i for i, key in enumerate(zip(cached.paths, cached.sizes, cached.mtimes)) if key in current]
        if not rows:
            return None
        keys = [(cached.paths[i], cached.sizes[i], cached.mtimes[i]) for i in rows]
        return cached.vectors[rows], [k[0] for k in keys], [current[k].product_id for k in keys]

    def load_metadata(self) -> tuple[list[str], list[str]] | None:
        """(image_paths, product_ids) of the built index, from the metadata file, or None if there is none."""
        from .stores.faiss_files import read_manifest

        try:
            manifest = read_manifest(self.settings.metadata_path)
            images = manifest["images"]
            paths, products = list(images["path"]), list(images["product_id"])
        except (IndexFileError, KeyError, TypeError):
            return None
        root = Path(self.settings.data_dir).expanduser().resolve()
        return [str(root / p) for p in paths], products


__all__ = [
    "CachedEmbeddings",
    "DataManager",
    "EmbeddingCache",
    "IndexFileError",
    "atomic_write_bytes",
    "atomic_write_json",
    "sha256_bytes",
]
