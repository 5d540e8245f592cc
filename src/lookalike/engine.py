"""ImageSearchEngine: the seed's public API, a facade over the catalog, the extractor, a vector store
(:mod:`lookalike.stores`), ranking (:mod:`lookalike.ranking`) and all-or-nothing edits (:mod:`lookalike.edits`).

Several processes may share one catalog: every change (build, add, remove, tune) holds the catalog's writer lock
(``<cache_dir>/.write.lock``) across load -> change -> save and starts from the latest committed generation. A
running engine notices a generation committed by another process on its next search, at most
``REFRESH_SECONDS`` (1 s) after the commit (a ``stat`` of the manifest between checks).
"""

from __future__ import annotations

import contextlib
import logging
import statistics
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from . import edits, files
from .cache import EmbeddingCache, embed_with_cache
from .catalog import scan_catalog
from .ids import image_id_for
from .imaging import ImageError, ImageSource, describe
from .manifest import IndexMismatchError, build_manifest, check_model, load_adaptation, save_projection
from .ranking import score_products, similarity_from_distance, widening_search
from .settings import Settings
from .store import DataManager
from .stores import VectorStore, open_store
from .stores.base import IndexFileError, StoreInfo
from .tuning import Adaptation, adapt

logger = logging.getLogger(__name__)

REFRESH_SECONDS = 1.0  # a running engine looks for another process's commit at most this often
UnknownProductError = edits.UnknownProductError


def _adopt_recorded_settings(settings: Settings, recorded: dict[str, Any]) -> Settings:
    """The settings to use with an index that recorded ``recorded`` (its ``manifest["settings"]``)."""
    return settings  # merge: replaced by settings.adopt_recorded


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
class EngineView:
    """What is loaded: the manifest, the adaptation and the store's description (read-only)."""

    manifest: dict[str, Any]
    adaptation: Adaptation
    info: StoreInfo

    @property
    def index(self) -> SimpleNamespace:  # the seed-era ``snapshot.index.ntotal`` the server reads
        info = self.info
        return SimpleNamespace(ntotal=info.count, dim=info.dim, type_name=info.index_type, **dict(info.extra))


class ImageSearchEngine:
    """Visual product search over a catalog folder (``data_dir/<product_id>/<images>``).

    ``build_index()`` extracts (with a cache) and indexes the catalog; ``load_index()`` opens a built index without
    touching the images; ``search()`` answers "which products look like this photo?".
    """

    def __init__(self, settings: Settings | None = None, *, extractor=None):
        self.settings = settings if settings is not None else Settings()
        self._extractor = extractor
        self._store: VectorStore | None = None
        self._adaptation = Adaptation()
        self._counts: dict[str, int] = {}
        self._checked = 0.0

    # --- wiring -----------------------------------------------------------------------------------------

    @property
    def extractor(self):
        """The model, loaded on first use (after the index's recorded settings were adopted)."""
        if self._extractor is None:
            from .embedding import FeatureExtractor

            self._extractor = FeatureExtractor(self.settings)
        return self._extractor

    @property
    def data_root(self) -> Path:
        return Path(self.settings.data_dir).expanduser().resolve()

    @property
    def store(self) -> VectorStore:
        if self._store is None or self._store.manifest() is None:
            raise RuntimeError("no index is loaded: call build_index() or load_index() first (CLI: lookalike index)")
        return self._store

    @property
    def snapshot(self) -> EngineView:
        """The loaded manifest, adaptation and store description. Raises if no index is loaded."""
        store = self.store
        return EngineView(store.manifest() or {}, self._adaptation, store.describe())

    @property
    def is_ready(self) -> bool:
        return self._store is not None and self._store.manifest() is not None

    @property
    def no_match_threshold(self) -> float | None:
        """The product similarity under which a query counts as "not in my catalog" (None: not calibrated)."""
        return self._adaptation.threshold if self.store is not None else None

    def _require(self) -> None:
        self.store  # noqa: B018 - raises when no index is loaded

    def images_per_product(self) -> dict[str, int]:
        return dict(self._counts)

    def _cache(self) -> EmbeddingCache:
        return EmbeddingCache.for_catalog(self.settings.cache_dir, self.extractor.fingerprint, self.data_root)

    @property
    def data_manager(self) -> DataManager:
        """The seed's DataManager, sharing this engine's embedding cache."""
        return DataManager(self.settings, fingerprint=self.extractor.fingerprint)

    def _open(self, manifest_settings: bool) -> VectorStore:
        """Open the configured store; adopt the settings its manifest recorded (the index is the source of truth)."""
        device = self._extractor.device if self._extractor is not None else _search_device(self.settings)
        store = open_store(self.settings, metric=self.settings.similarity_metric, device=device)
        recorded = (store.manifest() or {}).get("settings")
        if manifest_settings and recorded:
            adopted = _adopt_recorded_settings(self.settings, recorded)
            if adopted != self.settings and getattr(self._extractor, "settings", None) is self.settings:
                self._extractor = None  # made again, from the adopted settings
            self.settings = adopted
        return store

    def _install(self, store: VectorStore, adaptation: Adaptation | None = None) -> None:
        manifest = store.manifest() or {}
        if adaptation is None:
            adaptation = load_adaptation(manifest, self.settings.index_path, self.settings.metadata_path)
        self._store, self._adaptation = store, adaptation
        self._counts = store.product_counts()
        self._checked = time.monotonic()

    def _refresh(self, *, now: bool = False) -> None:
        """Serve the generation another process committed (at most every REFRESH_SECONDS unless ``now``)."""
        store = self._store
        if store is None or (not now and time.monotonic() - self._checked < REFRESH_SECONDS):
            return
        self._checked = time.monotonic()
        if store.refresh():
            manifest = store.manifest() or {}
            logger.info("serving generation %s committed by another process", manifest.get("build_id"))
            self._install(store)

    @contextlib.contextmanager
    def _changing(self) -> Iterator[None]:
        """The catalog's writer lock, with this engine moved to the latest committed generation first."""
        with files.catalog_lock(self.settings.cache_dir):
            self._refresh(now=True)
            yield

    # --- building ---------------------------------------------------------------------------------------

    def build_index(
        self, force_rebuild: bool = False, *, tune: bool | None = None, progress: bool | None = None
    ) -> BuildReport:
        """Index every image of the catalog, reusing cached features of unchanged images unless ``force_rebuild``.

        ``tune`` (default: the ``tune`` setting, or on when the previous index was tuned) fits a projection on the
        catalog's own product labels first (:mod:`lookalike.tuning`). Bad images are skipped and reported, never
        fatal. All or nothing: on failure the index and the cache are as before.
        """
        start = time.perf_counter()
        with files.catalog_lock(self.settings.cache_dir):
            store = self._open(manifest_settings=True)
            previous = store.manifest() or {}
            if tune is None:
                tune = self.settings.tune
                if not tune and (previous.get("tuning") or {}).get("status") == "tuned":
                    tune = True
                    logger.info("keeping catalog tuning: the previous index was tuned (tune=False drops it)")
            images = scan_catalog(self.settings.data_dir)
            cache = self._cache()
            emb = embed_with_cache(self.extractor, images, cache, force=force_rebuild, progress=progress, save=False)
            good = emb.good
            skipped = [{"path": str(images[i].path), "reason": reason} for i, reason in sorted(emb.errors.items())]
            if skipped:
                listing = "; ".join(f"{s['path']}: {s['reason']}" for s in skipped)
                logger.warning("skipped %d bad image(s): %s", len(skipped), listing)
            rel = [images[i].path.relative_to(self.data_root).as_posix() for i in good]
            labels = [images[i].product_id for i in good]
            adaptation = adapt(emb.vectors[good], np.array(labels, dtype=object), self.extractor.dim, tune=tune)
            fields = [{"product_id": p, "path": r, "format": emb.formats[i]} for p, r, i in zip(labels, rel, good)]
            before = cache.read_bytes()
            try:
                cache.save(emb.entries)
                projection = save_projection(self.settings.index_path, adaptation.projection)
                store.set_manifest(build_manifest(self.settings, self.extractor, adaptation, skipped, projection))
                store.replace_all(
                    [image_id_for(r) for r in rel], adaptation.transform(emb.vectors[good], self.extractor.dim), fields
                )
            except BaseException:
                edits.undo(lambda: cache.restore(before))
                raise
            self._install(store, adaptation)
        report = BuildReport(
            images=store.count(),
            products=len(self._counts),
            extracted=emb.extracted,
            reused=len(images) - emb.extracted - len(emb.errors),
            skipped=skipped,
            seconds=time.perf_counter() - start,
            tuning=adaptation.tuning,
        )
        logger.info(
            "indexed %d images of %d products (%d extracted, %d from cache, %d skipped) in %.1fs",
            report.images, report.products, report.extracted, report.reused, len(skipped), report.seconds,
        )  # fmt: skip
        return report

    def load_index(self) -> None:
        """Open the saved index (production mode): no catalog scan, no image decoding.

        Adopts the settings the index recorded, then refuses an index whose manifest disagrees with them (model,
        weights, preprocessing, metric: :class:`IndexMismatchError` naming both values) or whose files fail their
        checksums.
        """
        store = self._open(manifest_settings=True)
        manifest = store.manifest()
        if manifest is None:
            raise IndexFileError(
                f"no index at {self.settings.metadata_path}: build the index first (`lookalike index` or build_index())"
            )
        check_model(manifest, self.extractor.describe(), self.settings.similarity_metric, self.settings.metadata_path)
        self._install(store)
        logger.info("loaded index %s: %d images", manifest.get("build_id"), store.count())

    @classmethod
    def from_vectors(cls, settings: Settings, extractor, raw: np.ndarray, paths, product_ids, *, tune: bool):
        """An engine over already extracted raw vectors, in memory only (evaluation): nothing is written.
        ``paths`` are relative to ``settings.data_dir``."""
        from .stores.faiss import FaissStore

        engine = cls(settings, extractor=extractor)
        adaptation = adapt(raw, np.array(product_ids, dtype=object), extractor.dim, tune=tune)
        store = FaissStore(
            None, metric=settings.similarity_metric, index_type=settings.index_type, exact_below=settings.exact_below
        )
        store.set_manifest(build_manifest(settings, extractor, adaptation, [], None))
        fields = [{"product_id": p, "path": r, "format": ""} for p, r in zip(product_ids, paths)]
        store.replace_all([image_id_for(r) for r in paths], adaptation.transform(raw, extractor.dim), fields)
        engine._install(store, adaptation)
        return engine

    # --- searching --------------------------------------------------------------------------------------

    def search(self, query: ImageSource, top_k: int = 5, **options) -> list[dict[str, Any]]:
        """The products (or, with ``by_product=False``, the images) that look most like ``query``, best first.

        ``query`` is a path, image bytes or a PIL image. Each result has ``rank``, ``product_id``, ``similarity``
        (higher is more alike), ``image_id`` and ``image_path``. A product's similarity is the mean of its
        best three image similarities (fewer if it has fewer), and its image is the best-matching one
        (``image_similarity``). With the l2 metric results also carry ``distance``. When the index is
        calibrated, each product result says whether it is a ``match``; ``only_matches=True`` keeps only those,
        so an empty list means "not in my catalog". Options: ``by_product``, ``min_similarity``, ``only_matches``.
        """
        return self.search_batch([query], top_k, **options)[0]

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
        self._require()
        queries = list(queries)
        raw = self.extractor.extract(queries, progress=False)
        if raw.errors:
            first = min(raw.errors)
            raise ImageError(describe(queries[first]), raw.errors[first])
        return self.search_vectors(raw.vectors, top_k, by_product=by_product, min_similarity=min_similarity,
                                   only_matches=only_matches)  # fmt: skip

    def search_vectors(
        self,
        vectors: np.ndarray,
        top_k: int = 5,
        *,
        by_product: bool = True,
        min_similarity: float | None = None,
        only_matches: bool = False,
    ) -> list[list[dict[str, Any]]]:
        """:meth:`search_batch` for feature vectors from this engine's extractor: (n, dim) embeddings as
        ``extract_batch_features`` returns them, or (n, raw_dim) raw vectors (needed by a tuned index)."""
        _check_top_k(top_k)
        self._require()
        self._refresh()
        adaptation = self._adaptation
        vectors = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
        if adaptation.projection is not None and vectors.shape[1] != adaptation.projection.raw_dim:
            raise ValueError(
                f"this index is tuned: give raw vectors of {adaptation.projection.raw_dim} values "
                "(FeatureExtractor.extract)"
            )
        queries = adaptation.transform(vectors, self.extractor.dim if adaptation.projection is None else 0)
        results = self._rank(queries, top_k, by_product, min_similarity)
        if only_matches and adaptation.threshold is not None:
            results = [[h for h in hits if h.get("match", True)] for hits in results]
        return results

    def similar_to_product(
        self, product_id: str, top_k: int = 5, *, min_similarity: float | None = None
    ) -> list[dict[str, Any]]:
        """More like this: the other products that look most like ``product_id`` (which is left out).

        The product is represented by the mean of its indexed vectors. Raises UnknownProductError.
        """
        _check_top_k(top_k)
        store = self.store
        self._refresh()
        rows = store.fetch(store.ids(product_id=product_id), with_vectors=True)
        if not rows:
            raise UnknownProductError(product_id)
        query = np.mean([r["vector"] for r in rows.values()], axis=0, keepdims=True)
        others = len(self._counts) - 1
        hits = self._rank(query, min(top_k + 1, max(others + 1, 1)), True, min_similarity)[0]
        hits = [h for h in hits if h["product_id"] != product_id][:top_k]
        for rank, hit in enumerate(hits, start=1):
            hit["rank"] = rank
        return hits

    def image_file(self, image_id: str) -> Path:
        """The catalog file of an indexed image, looked up by its public id only (never by a path from outside)."""
        found = self.store.fetch([image_id]).get(image_id)
        if found is None:
            raise LookupError(f"unknown image id {image_id!r}")
        return self.data_root / found["path"]

    def _rank(self, vectors: np.ndarray, top_k: int, by_product: bool, min_similarity) -> list[list[dict[str, Any]]]:
        """Results for query vectors already in index space."""
        store, counts = self.store, self._counts
        total = store.count()
        if total == 0:
            return [[] for _ in range(len(vectors))]
        if not by_product:
            return [self._image_hits(hits, min_similarity) for hits in store.search(vectors, top_k)]
        l2 = store.describe().metric == "l2"
        threshold = self._adaptation.threshold

        def settle(hits, complete: bool):
            values = [h.distance if l2 else h.score for h in hits]
            chosen, settled = score_products(
                values, [h.product_id for h in hits], counts, top_k, lower_is_better=l2, complete=complete
            )
            out = []
            for product in chosen:
                similarity = float(similarity_from_distance(product.value)) if l2 else product.value
                if min_similarity is not None and similarity < min_similarity:
                    return out, True  # the rest score lower; deeper rows only score lower still
                best = hits[product.first]
                hit = {"rank": len(out) + 1, **self._hit(best, similarity), "image_similarity": best.score}
                if l2:
                    hit["distance"] = product.value
                if threshold is not None:
                    hit["match"] = similarity >= threshold
                out.append(hit)
            return out, settled

        return widening_search(lambda pos, k: store.search(vectors[pos], k), len(vectors), total, top_k, settle)

    def _hit(self, hit, similarity: float) -> dict[str, Any]:
        path = str(self.data_root / hit.path)
        return {"product_id": hit.product_id, "similarity": similarity, "image_id": hit.image_id, "image_path": path}

    def _image_hits(self, hits, min_similarity) -> list[dict[str, Any]]:
        out = []
        for h in hits:
            if min_similarity is not None and h.score < min_similarity:
                break  # hits come best first
            out.append({"rank": len(out) + 1, **self._hit(h, h.score)})
            if h.distance is not None:
                out[-1]["distance"] = h.distance
        return out

    # --- live catalog changes ---------------------------------------------------------------------------

    def add_images(self, product_id: str, paths: Sequence[str | Path]) -> dict[str, Any]:
        """Add photos to a product (new or existing): copied into ``data_dir/<product_id>/``, indexed and saved.

        All or nothing: if any photo cannot be used or anything cannot be written, nothing changes and the error
        says why (:class:`~lookalike.errors.CatalogWriteError` for a full disk or a read-only folder).
        """
        sources = edits.check_add(product_id, paths)
        with self._changing():
            out = edits.add_images(self, edits.normalize_product_id(product_id), sources)
        logger.info("added %d image(s) to product %s", out["added"], out["product_id"])
        return out

    def remove_product(self, product_id: str) -> dict[str, Any]:
        """Remove a product from the index and the cache; its folder moves to ``data_dir/.removed/``.

        Moving (not deleting) keeps the photos recoverable and stops the next build from indexing them again.
        All or nothing, like :meth:`add_images`.
        """
        with self._changing():
            out = edits.remove_product(self, edits.normalize_product_id(product_id))
        logger.info("removed product %s (%d images)", out["product_id"], out["removed"])
        return out

    # --- statistics -------------------------------------------------------------------------------------

    def get_statistics(self) -> dict[str, Any]:
        """Catalog and index facts: counts, images per product, formats, skipped files, model, index size."""
        store = self.store
        self._refresh()
        manifest, info, adaptation = store.manifest() or {}, store.describe(), self._adaptation
        counts = sorted(self._counts.values())
        skipped = manifest.get("skipped", [])
        formats = Counter(f.get("format", "") for f in store.fetch(store.ids()).values())
        return {
            "products": len(counts),
            "images": info.count,
            "images_per_product": {
                "min": counts[0] if counts else 0,
                "median": float(statistics.median(counts)) if counts else 0.0,
                "max": counts[-1] if counts else 0,
            },
            "formats": dict(sorted(formats.items())),
            "skipped": len(skipped),
            "skipped_files": skipped,
            "model": manifest["model"]["model_name"],
            "weights": manifest["model"]["weights"],
            "embedding_dim": info.dim,
            "similarity_metric": info.metric,
            "index_type": info.index_type,
            "store": info.backend,
            "tuning": adaptation.tuning.get("status", "off"),
            "no_match_threshold": adaptation.threshold,
            "index_size_bytes": info.nbytes,
            "last_build": manifest.get("created_at"),
            "build_id": manifest.get("build_id"),
            "data_dir": str(self.data_root),
        }


def _search_device(settings: Settings) -> str:
    """Where exact searches run: a CUDA device when the settings ask for one (then a torch matmul), else the CPU."""
    if settings.device.startswith("cuda"):
        return settings.device
    if settings.device == "auto":
        from .embedding import resolve_device

        return resolve_device("auto")
    return "cpu"


def _check_top_k(top_k: int) -> None:
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise ValueError(f"top_k must be a whole number of at least 1, got {top_k!r}")


__all__ = ["BuildReport", "ImageSearchEngine", "IndexMismatchError", "UnknownProductError", "embed_with_cache"]
