"""The embedding cache: raw feature vectors of catalog images, keyed by (path, size, mtime) per model fingerprint,
and :func:`embed_with_cache`, the one extraction path of builds, evaluations and (``executor: ray``) Ray Data."""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import files
from .catalog import CatalogImage

logger = logging.getLogger(__name__)


@dataclass
class CachedEmbeddings:
    """Raw feature vectors keyed by image (path, size, mtime) for one model fingerprint."""

    paths: list[str] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    mtimes: list[int] = field(default_factory=list)
    formats: list[str] = field(default_factory=list)
    vectors: np.ndarray | None = None

    def lookup(self) -> dict[tuple[str, int, int], int]:
        return {(p, s, m): i for i, (p, s, m) in enumerate(zip(self.paths, self.sizes, self.mtimes))}


class EmbeddingCache:
    """``<cache_dir>/embeddings/<fingerprint>-<folder>.npz``: one file per model fingerprint and catalog folder,
    so models never mix and one catalog never evicts another's vectors."""

    def __init__(self, cache_dir: Path, name: str):
        self.path = Path(cache_dir) / "embeddings" / f"{name}.npz"

    @classmethod
    def for_catalog(cls, cache_dir: Path, fingerprint: str, root: Path) -> EmbeddingCache:
        """The cache of one catalog folder: evaluating another folder never evicts this one's vectors."""
        folder = hashlib.sha256(str(Path(root).expanduser().resolve()).encode()).hexdigest()[:8]
        return cls(cache_dir, f"{fingerprint}-{folder}")

    def load(self) -> CachedEmbeddings:
        """The cache, or an empty one if there is none or it cannot be read (it is only a cache)."""
        if not self.path.is_file():
            return CachedEmbeddings()
        try:
            with np.load(self.path, allow_pickle=False) as z:
                vectors = z["vectors"].astype(np.float32, copy=False)
                out = CachedEmbeddings(
                    [str(p) for p in z["paths"]],
                    [int(s) for s in z["sizes"]],
                    [int(m) for m in z["mtimes"]],
                    [str(f) for f in z["formats"]],
                    vectors,
                )
            if not (len(out.paths) == len(out.sizes) == len(out.mtimes) == len(out.formats) == len(vectors)):
                raise ValueError("columns of different lengths")
            return out
        except Exception as exc:
            logger.warning(
                "ignoring unreadable embedding cache %s (%s); images will be extracted again", self.path, exc
            )
            return CachedEmbeddings()

    def save(self, entries: CachedEmbeddings) -> None:
        files.atomic_write_bytes(self.path, self.to_bytes(entries))

    def prepare(self, entries: CachedEmbeddings) -> Path:
        """The new cache written beside the current one (a catalog change renames it in place after its commit:
        :func:`lookalike.files.commit_temp`)."""
        return files.write_temp(self.path, self.to_bytes(entries))

    @staticmethod
    def to_bytes(entries: CachedEmbeddings) -> bytes:
        buf = io.BytesIO()
        dim = entries.vectors.shape[1] if entries.vectors is not None and entries.vectors.ndim == 2 else 0
        np.savez(
            buf,
            paths=np.array(entries.paths, dtype=str),
            sizes=np.array(entries.sizes, dtype=np.int64),
            mtimes=np.array(entries.mtimes, dtype=np.int64),
            formats=np.array(entries.formats, dtype=str),
            vectors=entries.vectors if entries.vectors is not None else np.zeros((0, dim), np.float32),
        )
        return buf.getvalue()

    def merged(self, *, add: Sequence[CatalogImage] = (), vectors=None, formats=(), remove=frozenset()):
        """The cache with ``remove`` (absolute paths) dropped and ``add`` (with their raw vectors) appended."""
        cached = self.load()
        keep = [i for i, p in enumerate(cached.paths) if p not in remove]
        dim = vectors.shape[1] if vectors is not None else getattr(cached.vectors, "shape", (0, 0))[1]
        old = cached.vectors[keep] if cached.vectors is not None and len(cached.paths) else np.zeros((0, dim), "f4")
        new = old if vectors is None or not len(vectors) else np.concatenate([old, vectors])
        return CachedEmbeddings(
            [cached.paths[i] for i in keep] + [str(im.path) for im in add],
            [cached.sizes[i] for i in keep] + [im.size for im in add],
            [cached.mtimes[i] for i in keep] + [im.mtime_ns for im in add],
            [cached.formats[i] for i in keep] + list(formats),
            new,
        )


@dataclass
class Embedded:
    """What :func:`embed_with_cache` produced for a list of images."""

    vectors: np.ndarray  # (n, raw_dim); zero rows where extraction failed
    formats: list[str]
    errors: dict[int, str]  # position -> reason
    extracted: int  # images whose features were computed now (successfully)
    entries: CachedEmbeddings = field(default_factory=CachedEmbeddings)  # the cache holding exactly these images

    @property
    def good(self) -> list[int]:
        return [i for i in range(len(self.formats)) if i not in self.errors]


def embed_with_cache(
    extractor: Any,
    images: Sequence[CatalogImage],
    cache: EmbeddingCache,
    *,
    force: bool = False,
    progress: bool | None = None,
    save: bool = True,
) -> Embedded:
    """Vectors for ``images``: from ``cache`` where the file is unchanged (unless ``force``), extracted otherwise.

    With ``save`` the cache is then rewritten to hold exactly these images (a catalog change passes False and
    saves ``entries`` itself, inside its all-or-nothing edit). With the setting ``executor: ray`` the images to
    extract go through :func:`lookalike.distributed.extract_with_ray` (same vectors, many workers).
    """
    cached = CachedEmbeddings() if force else cache.load()
    lookup = cached.lookup()
    vectors = np.zeros((len(images), extractor.raw_dim), np.float32)
    formats = [""] * len(images)
    todo = []
    for i, im in enumerate(images):
        row = lookup.get(im.key)
        if row is None or cached.vectors is None or cached.vectors.shape[1] != extractor.raw_dim:
            todo.append(i)
        else:
            vectors[i] = cached.vectors[row]
            formats[i] = cached.formats[row]
    errors: dict[int, str] = {}
    if todo:
        result = _extract(extractor, [images[i].path for i in todo], progress)
        for j, pos in enumerate(result.ok):
            vectors[todo[pos]] = result.vectors[j]
            formats[todo[pos]] = result.formats[j]
        errors = {todo[pos]: reason for pos, reason in result.errors.items()}
    good = [i for i in range(len(images)) if i not in errors]
    entries = CachedEmbeddings(
        [str(images[i].path) for i in good],
        [images[i].size for i in good],
        [images[i].mtime_ns for i in good],
        [formats[i] for i in good],
        vectors[good],
    )
    if save:
        cache.save(entries)
    return Embedded(vectors, formats, errors, len(todo) - len(errors), entries)


def _extract(extractor: Any, paths: list[Path], progress: bool | None):
    settings = getattr(extractor, "settings", None)
    if settings is not None and getattr(settings, "executor", "local") == "ray":
        from .distributed import extract_with_ray  # written beside this module; needs ray[data]

        return extract_with_ray(settings, paths, progress=progress)
    return extractor.extract(paths, progress=progress)


__all__ = ["CachedEmbeddings", "Embedded", "EmbeddingCache", "embed_with_cache"]
