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
from .imaging import ImageError, ImageSource, describe
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
from .tuning import PRODUCT_TOP, Projection, TuningDeclined, calibrate_no_match, fit_projection

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
    tuning: dict[str, Any] = field(default_factory=dict)  # status "off", "tuned" (with validation) or "declined"


@dataclass(frozen=True)
class Adaptation:
    """How raw features become index vectors for one index: a catalog projection (tuning) or not, plus the
    calibrated "no match" threshold. Travels with the index; add/remove keep it."""

    projection: Projection | None = None
    tuning: dict[str, Any] = field(default_factory=lambda: {"status": "off"})
    calibration: dict[str, Any] | None = None

    def transform(self, raw: np.ndarray, dim: int) -> np.ndarray:
        raw = np.atleast_2d(raw)
        return self.projection.apply(raw) if self.projection is not None else np.ascontiguousarray(raw[:, :dim])

    @property
    def threshold(self) -> float | None:
        return None if self.calibration is None else float(self.calibration["threshold"])


@dataclass(frozen=True)
class IndexSnapshot:
    """One consistent snapshot of the index and its rows; replaced whole, never edited, so searches need no lock."""

    index: VectorIndex
    paths: tuple[str, ...]  # relative to data_dir, POSIX separators
    product_ids: tuple[str, ...]
    formats: tuple[str, ...]
    manifest: dict[str, Any]
    adaptation: Adaptation
    image_ids: tuple[str, ...] = ()
    row_of_image: dict[str, int] = field(default_factory=dict)
    images_per_product: Counter = field(default_factory=Counter)

    @classmethod
    def create(cls, index, paths, product_ids, formats, manifest, adaptation) -> IndexSnapshot:
        ids = tuple(image_id_for(p) for p in paths)
        rows = {i: r for r, i in enumerate(ids)}
        counts = Counter(product_ids)
        return cls(index, tuple(paths), tuple(product_ids), tuple(formats), manifest, adaptation, ids, rows, counts)


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

    @property
    def no_match_threshold(self) -> float | None:
        """The product similarity under which a query counts as "not in my catalog" (None: not calibrated)."""
        return self._require_state().adaptation.threshold

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

    def build_index(
        self, force_rebuild: bool = False, *, tune: bool | None = None, progress: bool | None = None
    ) -> BuildReport:
        """Index every image of the catalog, reusing cached features of unchanged images unless ``force_rebuild``.

        With ``tune`` (default: the ``tune`` setting) a projection is fitted on the catalog's own product labels
        first (see :mod:`lookalike.tuning`). Bad images are skipped and reported (log, report, statistics), never
        fatal. The index is saved atomically.
        """
        start = time.perf_counter()
        tune = self.settings.tune if tune is None else tune
        with self._write:
            images = scan_catalog(self.settings.data_dir)
            extractor = self.extractor
            raw, formats, errors, extracted = embed_with_cache(
                extractor, images, self._cache(), force=force_rebuild, progress=progress
            )
            good = [i for i in range(len(images)) if i not in errors]
            skipped = [{"path": str(images[i].path), "reason": reason} for i, reason in sorted(errors.items())]
            if skipped:
                listing = "; ".join(f"{s['path']}: {s['reason']}" for s in skipped)
                logger.warning("skipped %d bad image(s): %s", len(skipped), listing)
            root = self.data_root
            state = self._install(
                raw[good],
                [images[i].path.relative_to(root).as_posix() for i in good],
                [images[i].product_id for i in good],
                [formats[i] for i in good],
                skipped,
                tune=tune,
            )
        report = BuildReport(
            images=state.index.ntotal,
            products=len(set(state.product_ids)),
            extracted=extracted,
            reused=len(images) - extracted - len(errors),
            skipped=skipped,
            seconds=time.perf_counter() - start,
            tuning=state.adaptation.tuning,
        )
        logger.info(
            "indexed %d images of %d products (%d extracted, %d from cache, %d skipped) in %.1fs",
            report.images, report.products, report.extracted, report.reused, len(skipped), report.seconds,
        )  # fmt: skip
        return report

    def _install(self, raw, paths, product_ids, formats, skipped, *, tune: bool, persist: bool = True) -> IndexSnapshot:
        """Adapt to these catalog rows (raw vectors in catalog order), index them and make that the live state."""
        adaptation = adapt(raw, np.array(product_ids, dtype=object), self.extractor.dim, tune=tune)
        vectors = adaptation.transform(raw, self.extractor.dim)
        index = VectorIndex.build(
            vectors,
            self.settings.similarity_metric,
            index_type=self.settings.index_type,
            exact_below=self.settings.exact_below,
            device=self.extractor.device,
        )
        return self._commit(index, paths, product_ids, formats, skipped, adaptation, persist=persist)

    def _commit(
        self, index: VectorIndex, paths, product_ids, formats, skipped, adaptation: Adaptation, *, persist: bool = True
    ) -> IndexSnapshot:
        """Save a new generation (manifest last, unless not ``persist``) and make it the live state."""
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
            "index": {"type": index.type_name, "factory": index.factory, "ntotal": index.ntotal, "dim": index.dim},
            "projection": None if adaptation.projection is None else dict(adaptation.projection.info),
            "tuning": adaptation.tuning,
            "calibration": adaptation.calibration,
            "data_dir": str(self.data_root),
            "counts": {"images": len(paths), "products": len(set(product_ids)), "skipped": len(skipped)},
            "images": {"path": list(paths), "product_id": list(product_ids), "format": list(formats)},
            "skipped": skipped,
            "settings": self.settings.to_dict(),
        }
        if persist:
            files = {"index": index.to_bytes()}
            if adaptation.projection is not None:
                files["projection"] = adaptation.projection.to_bytes()
            manifest = save_index(self.settings, manifest, files)
        state = IndexSnapshot.create(index, paths, product_ids, formats, manifest, adaptation)
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
        index = VectorIndex.from_bytes(
            stored.files["index"],
            manifest["metric"],
            factory=manifest["index"].get("factory"),
            device=self.extractor.device,
        )
        images = manifest["images"]
        if index.ntotal != len(images["path"]):
            raise IndexFileError(
                f"index file holds {index.ntotal} vectors but its metadata lists {len(images['path'])} images; rebuild"
            )
        projection = None
        if manifest.get("projection") is not None:
            if "projection" not in stored.files:
                raise IndexFileError(f"{self.settings.metadata_path} names a projection but its file is missing")
            projection = Projection.from_bytes(stored.files["projection"], manifest["projection"])
        adaptation = Adaptation(projection, manifest.get("tuning") or {"status": "off"}, manifest.get("calibration"))
        self._state = IndexSnapshot.create(
            index, images["path"], images["product_id"], images["format"], manifest, adaptation
        )
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
        only_matches: bool = False,
    ) -> list[dict[str, Any]]:
        """The products (or, with ``by_product=False``, the images) that look most like ``query``, best first.

        ``query`` is a path, image bytes or a PIL image. Each result has ``rank``, ``product_id``, ``similarity``
        (higher is more alike), ``image_id`` and ``image_path``. A product's similarity is the mean of its
        best three image similarities (fewer if it has fewer), and its image is the best-matching one
        (``image_similarity``). With the l2 metric results also carry ``distance``. When the index is
        calibrated, each product result says whether it is a ``match``; ``only_matches=True`` keeps only those,
        so an empty list means "not in my catalog".
        """
        _check_top_k(top_k)
        state = self._require_state()
        raw = self.extractor.extract([query])
        if raw.errors:
            raise ImageError(describe(query), raw.errors[0])
        return self._search_raw(state, raw.vectors, top_k, by_product, min_similarity, only_matches)[0]

    def search_batch(
        self,
        queries: Sequence[ImageSource],
        top_k: int = 5,
        *,
        by_product: bool = True,
        min_similarity: float | None = None,
        only_matches: bool = False,
    ) -> list[list[dict[str, Any]]]:
        """:meth:`search` for many queries in one call (batched extraction and search); one list per query."""
        _check_top_k(top_k)
        state = self._require_state()
        queries = list(queries)
        raw = self.extractor.extract(queries, progress=False)
        if raw.errors:
            first = min(raw.errors)
            raise ImageError(describe(queries[first]), raw.errors[first])
        return self._search_raw(state, raw.vectors, top_k, by_product, min_similarity, only_matches)

    def search_vectors(
        self, vectors: np.ndarray, top_k: int = 5, *, by_product: bool = True, min_similarity: float | None = None
    ) -> list[list[dict[str, Any]]]:
        """:meth:`search_batch` for feature vectors from this engine's extractor: (n, dim) embeddings as
        ``extract_batch_features`` returns them, or (n, raw_dim) raw vectors (needed by a tuned index)."""
        _check_top_k(top_k)
        state = self._require_state()
        vectors = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
        if state.adaptation.projection is not None and vectors.shape[1] != self.extractor.raw_dim:
            raise ValueError(
                f"this index is tuned: give raw vectors of {self.extractor.raw_dim} values (FeatureExtractor.extract)"
            )
        return self._search_raw(state, vectors, top_k, by_product, min_similarity, False)

    def _search_raw(self, state, raw, top_k, by_product, min_similarity, only_matches) -> list[list[dict[str, Any]]]:
        queries = state.adaptation.transform(raw, self.extractor.dim)
        results = self._rank(state, queries, top_k, by_product, min_similarity)
        if only_matches and state.adaptation.threshold is not None:
            results = [[h for h in hits if h.get("match", True)] for hits in results]
        return results

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
        """Results for query vectors already in index space."""
        n = state.index.ntotal
        if n == 0:
            return [[] for _ in range(len(vectors))]
        if not by_product:
            scores, rows = state.index.search(vectors, top_k)
            return [self._image_hits(state, s, r, min_similarity) for s, r in zip(scores, rows)]
        # Products are scored on their best images, so look deeper than top_k images; widen only where needed.
        out: list[list[dict[str, Any]] | None] = [None] * len(vectors)
        todo = np.arange(len(vectors))
        k = min(n, max(8 * top_k, 64))
        while len(todo):
            scores, rows = state.index.search(vectors[todo], k)
            again = []
            for q, s, r in zip(todo, scores, rows):
                hits, enough = self._product_hits(state, s, r, top_k, min_similarity, complete=k >= n)
                if enough:
                    out[q] = hits
                else:
                    again.append(q)
            todo = np.array(again, dtype=np.int64)
            k = min(n, k * 4)
        return out  # type: ignore[return-value]

    def _hit(self, state, row: int, similarity: float) -> dict[str, Any]:
        return {
            "product_id": state.product_ids[row],
            "similarity": similarity,
            "image_id": state.image_ids[row],
            "image_path": str(self.data_root / state.paths[row]),
        }

    def _image_hits(self, state, scores, rows, min_similarity) -> list[dict[str, Any]]:
        l2 = state.index.metric == METRIC_L2
        hits = []
        for score, row in zip(scores, rows):
            similarity = float(similarity_from_distance(score)) if l2 else float(score)
            if row < 0 or (min_similarity is not None and similarity < min_similarity):
                break  # rows come best first
            hit = {"rank": len(hits) + 1, **self._hit(state, int(row), similarity)}
            if l2:
                hit["distance"] = float(score)
            hits.append(hit)
        return hits

    def _product_hits(self, state, scores, rows, top_k, min_similarity, *, complete) -> tuple[list[dict], bool]:
        """Product results from one query's best images; ``enough`` says whether looking deeper could change them.

        A product scores the mean of its best PRODUCT_TOP images. A product whose best images were not all
        retrieved borrows the last retrieved score for the missing ones: an upper bound, so a product can only
        be ranked too high while the window is too shallow, and the window widens until the top_k are settled.
        """
        l2 = state.index.metric == METRIC_L2
        valid = rows >= 0
        scores, rows = scores[valid], rows[valid]
        if not len(rows):
            return [], True
        per_product: dict[str, list[int]] = {}
        for i, row in enumerate(rows):
            per_product.setdefault(state.product_ids[row], []).append(i)
        counts = state.images_per_product
        floor = float(scores[-1])
        ranked = []
        for product, hits in per_product.items():
            m = min(PRODUCT_TOP, counts[product])
            top = [float(scores[i]) for i in hits[:m]]
            top += [floor] * (m - len(top))  # not retrieved yet: at best as good as the last retrieved
            ranked.append((float(np.mean(top)), product, hits[0], len(hits) >= m))
        ranked.sort(key=lambda t: (t[0], -t[2]) if l2 else (-t[0], t[2]))
        chosen = ranked[:top_k]
        # Settled when every chosen product was fully seen and no unseen product could outrank the last chosen.
        settled = complete or (
            len(chosen) == top_k and all(t[3] for t in chosen) and (
                chosen[-1][0] <= floor if l2 else chosen[-1][0] >= floor
            )
        )  # fmt: skip
        threshold = state.adaptation.threshold
        out = []
        for value, _product, first, _full in chosen:
            similarity = float(similarity_from_distance(value)) if l2 else value
            if min_similarity is not None and similarity < min_similarity:
                break
            best = float(scores[first])
            hit = {
                "rank": len(out) + 1,
                **self._hit(state, int(rows[first]), similarity),
                "image_similarity": float(similarity_from_distance(best)) if l2 else best,
            }
            if l2:
                hit["distance"] = value
            if threshold is not None:
                hit["match"] = similarity >= threshold
            out.append(hit)
        if min_similarity is not None and len(out) < len(chosen):
            settled = True  # the rest fell under min_similarity; deeper rows only score lower
        return out, settled

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
            # A tuned index projects new photos with its existing projection (run `lookalike tune` to refit).
            index.add(state.adaptation.transform(result.vectors[keep], extractor.dim))
            self._update_cache(
                add=[added[i] for i in keep], vectors=result.vectors[keep], formats=[result.formats[i] for i in keep]
            )
            new = self._commit(
                index,
                list(state.paths) + [rel[i] for i in keep],
                list(state.product_ids) + [product_id] * len(keep),
                list(state.formats) + [result.formats[i] for i in keep],
                state.manifest.get("skipped", []),
                state.adaptation,
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
                state.adaptation,
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
            empty = np.zeros((0, self.extractor.raw_dim), np.float32)
            old = cached.vectors[keep] if cached.vectors is not None else empty
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
        per_product = state.images_per_product
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
            "tuning": state.adaptation.tuning.get("status", "off"),
            "no_match_threshold": state.adaptation.threshold,
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

    The cache is then rewritten to hold exactly these images. Returns (raw vectors (n, raw_dim), zero where
    extraction failed; formats; errors by position; how many were extracted successfully).
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


def adapt(raw: np.ndarray, labels: np.ndarray, dim: int, *, tune: bool) -> Adaptation:
    """Fit what a build learns from the catalog: the tuned projection (if asked and possible) and the no-match
    threshold. ``raw`` rows are in catalog order (sorted by product, then file name)."""
    projection, tuning = None, {"status": "off"}
    if tune:
        try:
            projection = fit_projection(raw, labels, dim)
            tuning = {"status": "tuned", **projection.info}
        except TuningDeclined as exc:
            logger.warning("catalog tuning declined: %s", exc)
            tuning = {"status": "declined", "reason": str(exc)}
    calibration = calibrate_no_match(raw, labels, dim, tuned=projection is not None) if len(labels) else None
    return Adaptation(projection, tuning, calibration)


def _check_top_k(top_k: int) -> None:
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise ValueError(f"top_k must be a whole number of at least 1, got {top_k!r}")


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
