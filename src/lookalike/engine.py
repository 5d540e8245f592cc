"""ImageSearchEngine: wires catalog -> embeddings -> index -> results. The seed's public API."""

from __future__ import annotations

import hashlib
import logging
import shutil
import statistics
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .catalog import IMAGE_EXTENSIONS, CatalogImage, scan_catalog, stat_image
from .embedding import FeatureExtractor
from .imaging import ImageError, ImageSource
from .index import METRIC_L2, VectorIndex, similarity_from_distance
from .settings import Settings
from .store import (
    INDEX_FORMAT,
    INDEX_FORMAT_VERSION,
    CachedEmbeddings,
    DataManager,
    EmbeddingCache,
    IndexFileError,
    new_build_id,
    read_index,
    save_index,
    utc_now,
    write_lock,
)

logger = logging.getLogger(__name__)

REMOVED_FOLDER = ".removed"  # where remove_product moves a product's folder (hidden: scans skip it)


class IndexMismatchError(IndexFileError):
    """The index on disk was built with a model, weights, preprocessing or metric other than the settings'."""


class UnknownProductError(LookupError):
    def __init__(self, product_id: str):
        super().__init__(f"unknown product {product_id!r}: it is not in the index")
        self.product_id = product_id


def image_id_for(relative_path: str) -> str:
    """A stable public id of a catalog image (its path is never exposed as an id)."""
    return hashlib.sha1(relative_path.encode("utf-8")).hexdigest()[:16]


@dataclass
class BuildReport:
    images: int
    products: int
    extracted: int  # images whose features were computed in this build
    reused: int  # images whose features came from the cache
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"path", "reason"}
    seconds: float = 0.0


@dataclass(frozen=True)
class IndexSnapshot:
    """One consistent snapshot of the index and its rows; replaced whole, never edited, so searches need no lock."""

    index: VectorIndex
    paths: tuple[str, ...]  # relative to data_dir, POSIX separators
    product_ids: tuple[str, ...]
    formats: tuple[str, ...]
    manifest: dict[str, Any]
    image_ids: tuple[str, ...] = ()
    row_of_image: dict[str, int] = field(default_factory=dict)

    @classmethod
    def create(cls, index, paths, product_ids, formats, manifest) -> IndexSnapshot:
        ids = tuple(image_id_for(p) for p in paths)
        return cls(
            index, tuple(paths), tuple(product_ids), tuple(formats), manifest, ids, {i: r for r, i in enumerate(ids)}
        )


class ImageSearchEngine:
    """Visual product search over a catalog folder (``data_dir/<product_id>/<images>``).

    ``build_index()`` extracts (with a cache) and indexes the catalog; ``load_index()`` opens a built index without
    touching the images; ``search()`` answers "which products look like this photo?".
    """

    def __init__(self, settings: Settings | None = None, *, extractor: FeatureExtractor | None = None):
        self.settings = settings if settings is not None else Settings()
        self._extractor = extractor
        self._state: IndexSnapshot | None = None
        self._write = threading.Lock()

    # --- wiring -----------------------------------------------------------------------------------------

    @property
    def extractor(self) -> FeatureExtractor:
        """The model, loaded on first use (building and searching need it; statistics do not)."""
        if self._extractor is None:
            self._extractor = FeatureExtractor(self.settings)
        return self._extractor

    @property
    def data_root(self) -> Path:
        return Path(self.settings.data_dir).expanduser().resolve()

    @property
    def snapshot(self) -> IndexSnapshot:
        """The live index and its rows (read-only; replaced whole by every change). Raises if none is loaded."""
        return self._require_state()

    @property
    def is_ready(self) -> bool:
        return self._state is not None

    def _require_state(self) -> IndexSnapshot:
        if self._state is None:
            raise RuntimeError("no index is loaded: call build_index() or load_index() first (CLI: lookalike index)")
        return self._state

    def _cache(self) -> EmbeddingCache:
        return EmbeddingCache.for_catalog(self.settings.cache_dir, self.extractor.fingerprint, self.data_root)

    @property
    def data_manager(self) -> DataManager:
        """The seed's DataManager, sharing this engine's embedding cache."""
        return DataManager(self.settings, fingerprint=self.extractor.fingerprint)

    # --- building ---------------------------------------------------------------------------------------

    def build_index(self, force_rebuild: bool = False, *, progress: bool | None = None) -> BuildReport:
        """Index every image of the catalog, reusing cached features of unchanged images unless ``force_rebuild``.

        Bad images are skipped and reported (log, report, statistics), never fatal. The index is saved atomically.
        """
        start = time.perf_counter()
        with self._write:
            images = scan_catalog(self.settings.data_dir)
            extractor = self.extractor
            vectors, formats, errors, extracted = embed_with_cache(
                extractor, images, self._cache(), force=force_rebuild, progress=progress
            )
            good = [i for i in range(len(images)) if i not in errors]
            root = self.data_root
            skipped = [{"path": str(images[i].path), "reason": reason} for i, reason in sorted(errors.items())]
            if skipped:
                listing = "; ".join(f"{s['path']}: {s['reason']}" for s in skipped)
                logger.warning("skipped %d bad image(s): %s", len(skipped), listing)
            index = VectorIndex.build(vectors[good], self.settings.similarity_metric)
            state = self._commit(
                index,
                [images[i].path.relative_to(root).as_posix() for i in good],
                [images[i].product_id for i in good],
                [formats[i] for i in good],
                skipped,
            )
        report = BuildReport(
            images=state.index.ntotal,
            products=len(set(state.product_ids)),
            extracted=extracted,
            reused=len(images) - extracted - len(errors),
            skipped=skipped,
            seconds=time.perf_counter() - start,
        )
        logger.info(
            "indexed %d images of %d products (%d extracted, %d from cache, %d skipped) in %.1fs",
            report.images,
            report.products,
            report.extracted,
            report.reused,
            len(skipped),
            report.seconds,
        )
        return report

    def _commit(
        self, index: VectorIndex, paths, product_ids, formats, skipped, *, persist: bool = True
    ) -> IndexSnapshot:
        """Save a new generation (manifest last) and make it the live state."""
        extractor = self.extractor
        manifest = {
            "format": INDEX_FORMAT,
            "version": INDEX_FORMAT_VERSION,
            "build_id": new_build_id(),
            "created_at": utc_now(),
            "model": extractor.describe(),
            "model_fingerprint": extractor.fingerprint,
            "metric": index.metric,
            "normalized": index.normalized,
            "index": {"type": index.type_name, "ntotal": index.ntotal, "dim": index.dim},
            "data_dir": str(self.data_root),
            "counts": {"images": len(paths), "products": len(set(product_ids)), "skipped": len(skipped)},
            "images": {"path": list(paths), "product_id": list(product_ids), "format": list(formats)},
            "skipped": skipped,
            "settings": self.settings.to_dict(),
        }
        if persist:
            manifest = save_index(self.settings, manifest, index.to_bytes())
        state = IndexSnapshot.create(index, paths, product_ids, formats, manifest)
        self._state = state
        return state

    def load_index(self) -> None:
        """Open the saved index (production mode): no catalog scan, no image decoding.

        Refuses an index whose manifest disagrees with the settings (model, weights, preprocessing, metric) or
        whose files fail their checksums.
        """
        stored = read_index(self.settings)
        manifest = stored.manifest
        self._check_manifest(manifest)
        index = VectorIndex.from_bytes(stored.index_bytes, manifest["metric"])
        images = manifest["images"]
        if index.ntotal != len(images["path"]):
            raise IndexFileError(
                f"index file holds {index.ntotal} vectors but its metadata lists {len(images['path'])} images; rebuild"
            )
        self._state = IndexSnapshot.create(index, images["path"], images["product_id"], images["format"], manifest)
        logger.info("loaded index %s: %d images", manifest["build_id"], index.ntotal)

    def _check_manifest(self, manifest: dict[str, Any]) -> None:
        expected = dict(self.extractor.describe(), metric=self.settings.similarity_metric)
        found = dict(manifest.get("model", {}), metric=manifest.get("metric"))
        diffs = [
            f"{k}: index has {found.get(k)!r}, settings give {v!r}" for k, v in expected.items() if found.get(k) != v
        ]
        if diffs:
            raise IndexMismatchError(
                f"the index at {self.settings.metadata_path} was built with other settings ({'; '.join(diffs)}). "
                "Rebuild it (`lookalike index` / build_index()) or use the settings it was built with."
            )

    # --- searching --------------------------------------------------------------------------------------

    def search(
        self,
        query: ImageSource,
        top_k: int = 5,
        *,
        by_product: bool = True,
        min_similarity: float | None = None,
    ) -> list[dict[str, Any]]:
        """The products (or, with ``by_product=False``, the images) that look most like ``query``, best first.

        ``query`` is a path, image bytes or a PIL image. Each result has ``rank``, ``product_id``, ``similarity``
        (higher is more alike), ``image_id`` and ``image_path`` (the product's best-matching image); with the l2
        metric also ``distance``. Products appear once each, ranked by their best image.
        """
        _check_top_k(top_k)
        state = self._require_state()
        vector = self.extractor.extract_features(query)
        return self._rank(state, vector[None], top_k, by_product, min_similarity)[0]

    def search_batch(
        self,
        queries: Sequence[ImageSource],
        top_k: int = 5,
        *,
        by_product: bool = True,
        min_similarity: float | None = None,
    ) -> list[list[dict[str, Any]]]:
        """:meth:`search` for many queries in one call (batched extraction and search); one list per query."""
        _check_top_k(top_k)
        state = self._require_state()
        vectors = self.extractor.extract_batch_features(list(queries))
        return self._rank(state, vectors, top_k, by_product, min_similarity)

    def search_vectors(
        self, vectors: np.ndarray, top_k: int = 5, *, by_product: bool = True, min_similarity: float | None = None
    ) -> list[list[dict[str, Any]]]:
        """:meth:`search_batch` for raw feature vectors (n, dim) from this engine's extractor."""
        _check_top_k(top_k)
        return self._rank(self._require_state(), np.atleast_2d(vectors), top_k, by_product, min_similarity)

    def similar_to_product(
        self, product_id: str, top_k: int = 5, *, min_similarity: float | None = None
    ) -> list[dict[str, Any]]:
        """More like this: the other products that look most like ``product_id`` (which is left out).

        The product is represented by the mean of its indexed vectors. Raises UnknownProductError.
        """
        _check_top_k(top_k)
        state = self._require_state()
        rows = [i for i, p in enumerate(state.product_ids) if p == product_id]
        if not rows:
            raise UnknownProductError(product_id)
        query = state.index.reconstruct(rows).mean(axis=0, keepdims=True)
        others = len(set(state.product_ids)) - 1
        hits = self._rank(state, query, min(top_k + 1, max(others + 1, 1)), True, min_similarity)[0]
        hits = [h for h in hits if h["product_id"] != product_id][:top_k]
        for rank, hit in enumerate(hits, start=1):
            hit["rank"] = rank
        return hits

    def image_file(self, image_id: str) -> Path:
        """The catalog file of an indexed image, looked up by its public id only (never by a path from outside)."""
        state = self._require_state()
        row = state.row_of_image.get(image_id)
        if row is None:
            raise LookupError(f"unknown image id {image_id!r}")
        return self.data_root / state.paths[row]

    def _rank(self, state, vectors, top_k, by_product, min_similarity) -> list[list[dict[str, Any]]]:
        n = state.index.ntotal
        if n == 0:
            return [[] for _ in range(len(vectors))]
        l2 = state.index.metric == METRIC_L2
        if not by_product:
            scores, rows = state.index.search(vectors, top_k)
            return [self._hits(state, s, r, top_k, l2, min_similarity, per_product=False) for s, r in zip(scores, rows)]
        # Each product must appear once, so look deeper than top_k images; widen only for queries that need it.
        out: list[list[dict[str, Any]] | None] = [None] * len(vectors)
        todo = np.arange(len(vectors))
        k = min(n, max(8 * top_k, 64))
        while len(todo):
            scores, rows = state.index.search(vectors[todo], k)
            again = []
            for q, s, r in zip(todo, scores, rows):
                hits = self._hits(state, s, r, top_k, l2, min_similarity, per_product=True)
                if len(hits) < top_k and k < n and _could_have_more(s, l2, min_similarity):
                    again.append(q)
                else:
                    out[q] = hits
            todo = np.array(again, dtype=np.int64)
            k = min(n, k * 4)
        return out  # type: ignore[return-value]

    def _hits(self, state, scores, rows, top_k, l2, min_similarity, *, per_product) -> list[dict[str, Any]]:
        hits: list[dict[str, Any]] = []
        seen: set[str] = set()
        for score, row in zip(scores, rows):
            if row < 0:
                break
            similarity = float(similarity_from_distance(score)) if l2 else float(score)
            if min_similarity is not None and similarity < min_similarity:
                break  # rows come best first
            product = state.product_ids[row]
            if per_product:
                if product in seen:
                    continue
                seen.add(product)
            hit = {
                "rank": len(hits) + 1,
                "product_id": product,
                "similarity": similarity,
                "image_id": state.image_ids[row],
                "image_path": str(self.data_root / state.paths[row]),
            }
            if l2:
                hit["distance"] = float(score)
            hits.append(hit)
            if len(hits) == top_k:
                break
        return hits

    # --- live catalog changes ---------------------------------------------------------------------------

    def add_images(self, product_id: str, paths: Sequence[str | Path]) -> dict[str, Any]:
        """Add photos to a product (new or existing): copied into ``data_dir/<product_id>/``, indexed and saved.

        All or nothing: if any photo cannot be used, nothing changes and the error names it.
        """
        _check_product_id(product_id)
        sources = list(dict.fromkeys(Path(p).expanduser().resolve() for p in paths))  # each file once
        if not sources:
            raise ValueError("add_images needs at least one image path")
        for src in sources:
            if src.suffix.lower() not in IMAGE_EXTENSIONS:
                raise ImageError(
                    str(src), f"unsupported extension {src.suffix!r}; use {', '.join(sorted(IMAGE_EXTENSIONS))}"
                )
        with self._write:
            state = self._require_state()
            extractor = self.extractor
            result = extractor.extract([str(s) for s in sources], progress=False)
            if result.errors:
                first = min(result.errors)
                raise ImageError(str(sources[first]), result.errors[first])
            folder = self.data_root / product_id
            folder.mkdir(parents=True, exist_ok=True)
            added = [stat_image(product_id, _copy_into(src, folder)) for src in sources]
            rel = [im.path.relative_to(self.data_root).as_posix() for im in added]
            indexed = set(state.paths)
            keep = [i for i, p in enumerate(rel) if p not in indexed]  # a file already indexed is not added twice
            index = state.index.copy()
            index.add(result.vectors[keep])
            self._update_cache(
                add=[added[i] for i in keep], vectors=result.vectors[keep], formats=[result.formats[i] for i in keep]
            )
            new = self._commit(
                index,
                list(state.paths) + [rel[i] for i in keep],
                list(state.product_ids) + [product_id] * len(keep),
                list(state.formats) + [result.formats[i] for i in keep],
                state.manifest.get("skipped", []),
            )
        logger.info("added %d image(s) to product %s", len(keep), product_id)
        return {
            "product_id": product_id,
            "added": len(keep),
            "images": new.index.ntotal,
            "image_ids": [image_id_for(rel[i]) for i in keep],
        }

    def remove_product(self, product_id: str) -> dict[str, Any]:
        """Remove a product from the index and the cache; its folder moves to ``data_dir/.removed/``.

        Moving (not deleting) keeps the photos recoverable and stops the next build from indexing them again.
        """
        with self._write:
            state = self._require_state()
            rows = [i for i, p in enumerate(state.product_ids) if p == product_id]
            if not rows:
                raise UnknownProductError(product_id)
            index = state.index.copy()
            index.remove(np.array(rows))
            drop = set(rows)
            keep = [i for i in range(len(state.paths)) if i not in drop]
            folder = self.data_root / product_id
            moved_to = None
            if folder.is_dir():
                trash = self.data_root / REMOVED_FOLDER
                trash.mkdir(exist_ok=True)
                stamp = time.strftime("%Y%m%dT%H%M%S")
                moved_to = trash / f"{product_id}-{stamp}"
                n = 1
                while moved_to.exists():
                    n += 1
                    moved_to = trash / f"{product_id}-{stamp}-{n}"
                folder.rename(moved_to)
            self._update_cache(remove={str(self.data_root / state.paths[i]) for i in rows})
            new = self._commit(
                index,
                [state.paths[i] for i in keep],
                [state.product_ids[i] for i in keep],
                [state.formats[i] for i in keep],
                [s for s in state.manifest.get("skipped", []) if Path(s["path"]).parent.name != product_id],
            )
        logger.info("removed product %s (%d images)", product_id, len(rows))
        return {
            "product_id": product_id,
            "removed": len(rows),
            "images": new.index.ntotal,
            "moved_to": str(moved_to) if moved_to else None,
        }

    def _update_cache(self, *, add: Sequence[CatalogImage] = (), vectors=None, formats=(), remove=frozenset()) -> None:
        cache = self._cache()
        with write_lock(Path(self.settings.cache_dir)):
            cached = cache.load()
            keep = [i for i, p in enumerate(cached.paths) if p not in remove]
            old = cached.vectors[keep] if cached.vectors is not None else np.zeros((0, self.extractor.dim), np.float32)
            merged = CachedEmbeddings(
                [cached.paths[i] for i in keep] + [str(im.path) for im in add],
                [cached.sizes[i] for i in keep] + [im.size for im in add],
                [cached.mtimes[i] for i in keep] + [im.mtime_ns for im in add],
                [cached.formats[i] for i in keep] + list(formats),
                np.concatenate([old, vectors]) if vectors is not None and len(vectors) else old,
            )
            cache.save(merged)

    # --- statistics -------------------------------------------------------------------------------------

    def get_statistics(self) -> dict[str, Any]:
        """Catalog and index facts: counts, images per product, formats, skipped files, model, index size."""
        state = self._require_state()
        per_product = Counter(state.product_ids)
        counts = sorted(per_product.values())
        manifest = state.manifest
        skipped = manifest.get("skipped", [])
        return {
            "products": len(per_product),
            "images": state.index.ntotal,
            "images_per_product": {
                "min": counts[0] if counts else 0,
                "median": float(statistics.median(counts)) if counts else 0.0,
                "max": counts[-1] if counts else 0,
            },
            "formats": dict(sorted(Counter(state.formats).items())),
            "skipped": len(skipped),
            "skipped_files": skipped,
            "model": manifest["model"]["model_name"],
            "weights": manifest["model"]["weights"],
            "embedding_dim": state.index.dim,
            "similarity_metric": state.index.metric,
            "index_type": state.index.type_name,
            "index_size_bytes": manifest.get("index", {}).get("bytes", 0),
            "last_build": manifest["created_at"],
            "build_id": manifest["build_id"],
            "data_dir": str(self.data_root),
        }


def embed_with_cache(
    extractor: FeatureExtractor,
    images: Sequence[CatalogImage],
    cache: EmbeddingCache,
    *,
    force: bool = False,
    progress: bool | None = None,
) -> tuple[np.ndarray, list[str], dict[int, str], int]:
    """Vectors for ``images``: from ``cache`` where the file is unchanged (unless ``force``), extracted otherwise.

    The cache is then rewritten to hold exactly these images. Returns (vectors (n, dim), whose rows are zero where
    extraction failed; formats; errors by position; how many were extracted successfully).
    """
    cached = CachedEmbeddings() if force else cache.load()
    lookup = cached.lookup()
    vectors = np.zeros((len(images), extractor.dim), np.float32)
    formats = [""] * len(images)
    todo = []
    for i, im in enumerate(images):
        row = lookup.get(im.key)
        if row is None or cached.vectors is None or cached.vectors.shape[1] != extractor.dim:
            todo.append(i)
        else:
            vectors[i] = cached.vectors[row]
            formats[i] = cached.formats[row]
    errors: dict[int, str] = {}
    if todo:
        result = extractor.extract([images[i].path for i in todo], progress=progress)
        for j, pos in enumerate(result.ok):
            vectors[todo[pos]] = result.vectors[j]
            formats[todo[pos]] = result.formats[j]
        errors = {todo[pos]: reason for pos, reason in result.errors.items()}
    good = [i for i in range(len(images)) if i not in errors]
    cache.save(
        CachedEmbeddings(
            [str(images[i].path) for i in good],
            [images[i].size for i in good],
            [images[i].mtime_ns for i in good],
            [formats[i] for i in good],
            vectors[good],
        )
    )
    return vectors, formats, errors, len(todo) - len(errors)


def _check_top_k(top_k: int) -> None:
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise ValueError(f"top_k must be a whole number of at least 1, got {top_k!r}")


def _could_have_more(scores: np.ndarray, l2: bool, min_similarity: float | None) -> bool:
    if min_similarity is None or not len(scores):
        return True
    last = float(similarity_from_distance(scores[-1])) if l2 else float(scores[-1])
    return last >= min_similarity


def _check_product_id(product_id: str) -> None:
    if (
        not isinstance(product_id, str)
        or not product_id.strip()
        or product_id in {".", ".."}
        or product_id.startswith(".")
        or any(c in product_id for c in "/\\\0")
    ):
        raise ValueError(f"invalid product id {product_id!r}: it becomes a folder name, so no '/', '\\' or leading '.'")


def _copy_into(src: Path, folder: Path) -> Path:
    """Copy ``src`` into ``folder`` (no copy if it is already there); never overwrites a different file."""
    src = src.resolve()
    if src.parent == folder.resolve():
        return src
    dest = folder / src.name
    if dest.exists():
        if dest.read_bytes() == src.read_bytes():
            return dest
        digest = hashlib.sha1(src.read_bytes()).hexdigest()[:8]
        dest = folder / f"{src.stem}-{digest}{src.suffix}"
    tmp = folder / f".{dest.name}.tmp"
    shutil.copyfile(src, tmp)
    tmp.replace(dest)
    return dest


__all__ = ["BuildReport", "ImageSearchEngine", "IndexMismatchError", "UnknownProductError"]
