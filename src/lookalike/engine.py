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
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import edits, files, finetuned, products, searching
from . import manifest as manifests
from .cache import EmbeddingCache, embed_with_cache
from .imaging import ImageSource
from .manifest import EngineView, IndexMismatchError
from .products import Where
from .records import ProductRecord
from .regions import RegionResult, search_regions
from .settings import Settings
from .store import DataManager
from .stores import VectorStore, search_device
from .tuning import Adaptation

logger = logging.getLogger(__name__)

REFRESH_SECONDS = 1.0  # a running engine looks for another process's commit at most this often
BuildReport, UnknownProductError = edits.BuildReport, edits.UnknownProductError


class ImageSearchEngine:
    """Visual product search over a catalog folder (``data_dir/<product_id>/<images>``).

    ``build_index()`` extracts (with a cache) and indexes the catalog; ``load_index()`` opens a built index without
    touching the images; ``search()`` answers "which products look like this photo?".
    """

    def __init__(self, settings: Settings | None = None, *, extractor=None):
        self.settings = settings if settings is not None else Settings()
        self._extractor = extractor
        self._own_extractor = extractor is None  # made here, so made again when the settings or weights change
        self._weights: Path | None = None  # the fine-tuned checkpoint the index uses (tune: finetune); None: base
        self._store: VectorStore | None = None
        self._adaptation = Adaptation()
        self._counts: dict[str, int] = {}
        self._manifest: dict[str, Any] = {}
        self._table = products.ProductTable()
        self._checked = 0.0

    # --- wiring -----------------------------------------------------------------------------------------

    @property
    def extractor(self):
        """The model, loaded on first use (after the index's recorded settings were adopted), with the fine-tuned
        weights when the index was built with them (``tune: finetune``)."""
        if self._extractor is None:
            from .embedding import FeatureExtractor

            weights = self._weights
            self._extractor = FeatureExtractor(
                self.settings if weights is None else self.settings.replace(weights_path=weights)
            )
            self._own_extractor = True
        return self._extractor

    def _use_weights(self, weights: Path | None) -> None:
        """Extract with ``weights`` (a fine-tuned checkpoint) from now on, or with the settings' own (None)."""
        if weights != self._weights:
            self._weights = weights
            if self._own_extractor:
                self._extractor = None

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
        """Images per product in the latest committed generation (another process's commit included)."""
        self._refresh()
        return dict(self._counts)

    @property
    def records(self) -> dict[str, ProductRecord]:
        """The product records saved with the latest committed generation, by product id (empty without a
        records file); ``lookalike records`` run by another process shows here after the engine's next refresh."""
        self._refresh()
        return dict(self._table.records)

    def record_fields(self) -> dict[str, list[str]]:
        """The record fields the loaded records have values for, with their kinds (``text``, ``number``,
        ``bool``, ``list``): what ``where=`` can filter on usefully (e.g. a search page's filter controls)."""
        self._refresh()
        return self._table.fields()

    @property
    def build_id(self) -> str:
        """The loaded generation's id, as of the last refresh (no store round trip: cheap on every request)."""
        self._require()
        return str(self._manifest.get("build_id") or "")

    @property
    def image_count(self) -> int:
        """Images in the loaded index, as of the last refresh (no store round trip)."""
        self._require()
        return sum(self._counts.values())

    def _fresh_view(self, top_k: int) -> tuple[VectorStore, Adaptation, dict[str, int], Path]:
        """What a search reads (store, adaptation, images per product, catalog root), after checking ``top_k``
        and a refresh. Raises when no index is loaded."""
        searching.check_top_k(top_k)
        self._require()
        self._refresh()
        return self.store, self._adaptation, self._counts, self.data_root

    def _cache(self) -> EmbeddingCache:
        return EmbeddingCache.for_catalog(self.settings.cache_dir, self.extractor.fingerprint, self.data_root)

    @property
    def data_manager(self) -> DataManager:
        """The seed's DataManager, sharing this engine's embedding cache."""
        return DataManager(self.settings, fingerprint=self.extractor.fingerprint)

    def _open(self, manifest_settings: bool, *, rebuild: bool = False) -> VectorStore:
        """Open the configured store; adopt the settings its manifest recorded (the index is the source of truth)."""
        device = self._extractor.device if self._extractor is not None else search_device(self.settings)
        store, adopted = manifests.open_adopting(self.settings, device, adopt=manifest_settings, rebuild=rebuild)
        ours = self._own_extractor or getattr(self._extractor, "settings", None) is self.settings
        if adopted != self.settings and ours:
            self._extractor = None  # made again, from the adopted settings
        self.settings = adopted
        return store

    def _install(self, store: VectorStore, adaptation: Adaptation | None = None) -> None:
        manifest = store.manifest() or {}
        if adaptation is None:
            adaptation = manifests.load_adaptation(manifest, self.settings.index_path, self.settings.metadata_path)
        self._store, self._adaptation, self._manifest = store, adaptation, manifest
        self._counts = store.product_counts()
        self._table = products.load_table(store, self._table)
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
            self._use_weights(finetuned.checkpoint_of(manifest.get("tuning"), self.settings.cache_dir))
            if self._extractor is not None:
                manifests.warn_other_model(manifest, self._extractor.describe(), self.settings.similarity_metric)
            self._install(store)

    @contextlib.contextmanager
    def _changing(self) -> Iterator[None]:
        """The catalog's writer lock, with this engine moved to the latest committed generation first."""
        with files.catalog_lock(self.settings.cache_dir):
            self._refresh(now=True)
            edits.recover(self.settings.cache_dir, self.store)
            yield

    # --- building ---------------------------------------------------------------------------------------

    def build_index(
        self, force_rebuild: bool = False, *, tune: bool | str | None = None, progress: bool | None = None
    ) -> BuildReport:
        """Index every image of the catalog, reusing cached features of unchanged images unless ``force_rebuild``.

        ``tune`` (default: the ``tune`` setting, or what the previous index had) fits a projection on the
        catalog's own product labels first (:mod:`lookalike.tuning`); ``"finetune"`` fine-tunes the backbone's
        last block on them before (:mod:`lookalike.finetuned`: trained once per catalog content, then reused) and
        extracts with it, or falls back to the projection with the reason in the report. Bad images are skipped
        and reported, never fatal. All or nothing: on failure the index and the cache are as before.
        """
        with files.catalog_lock(self.settings.cache_dir):
            store = self._open(manifest_settings=True, rebuild=True)
            edits.recover(self.settings.cache_dir, store)
            settings, weights = self.settings, self._weights
            try:
                return edits.rebuild(self, store, force=force_rebuild, tune=tune, progress=progress)
            except BaseException:  # the index is as before: so is the model that searches it
                self.settings = settings
                self._use_weights(weights)
                raise

    def load_index(self) -> None:
        """Open the saved index (production mode): no catalog scan, no image decoding.

        Adopts the settings the index recorded, then refuses an index whose manifest disagrees with them (model,
        weights, preprocessing, metric: :class:`IndexMismatchError` naming both values) or whose files fail their
        checksums.
        """
        store = self._open(manifest_settings=True)
        where = self.settings.metadata_path
        manifest = manifests.require_index(store, where)
        self._use_weights(finetuned.require_checkpoint(manifest, self.settings.cache_dir, where))
        manifests.check_model(manifest, self.extractor.describe(), self.settings.similarity_metric, where)
        self._install(store)
        logger.info("loaded index %s: %d images", manifest.get("build_id"), store.count())

    @classmethod
    def from_vectors(cls, settings: Settings, extractor, raw: np.ndarray, paths, product_ids, *, tune: bool | str):
        """An engine over already extracted raw vectors, in memory only (evaluation): nothing is written.
        ``paths`` are relative to ``settings.data_dir``."""
        engine = cls(settings, extractor=extractor)
        store, adaptation = edits.in_memory(settings, extractor, raw, paths, product_ids, tune=tune)
        engine._install(store, adaptation)
        return engine

    # --- searching --------------------------------------------------------------------------------------

    def search(
        self,
        query: ImageSource,
        top_k: int = 5,
        *,
        by_product: bool = True,
        min_similarity: float | None = None,
        only_matches: bool = False,
        where: Where = None,
        box: Sequence[float] | str | None = None,
    ) -> list[dict[str, Any]]:
        """The products (or, with ``by_product=False``, the images) that look most like ``query``, best first.

        ``query`` is a path, image bytes or a PIL image. Each result has ``rank``, ``product_id``, ``similarity``
        (higher is more alike), ``image_id`` and ``image_path``. A product's similarity is the mean of its
        best three image similarities (fewer if it has fewer), and its image is the best-matching one
        (``image_similarity``). With the l2 metric results also carry ``distance``. When the index is
        calibrated, each product result says whether it is a ``match``; ``only_matches=True`` keeps only those,
        so an empty list means "not in my catalog".

        Every result carries its product's ``record`` (a dict, None without one). ``where`` keeps only products
        whose record passes (a dict like ``{"category": "dairy", "price": {"lte": 20}}``, clause strings like
        ``"price<=20"``, or a :class:`~lookalike.filters.Filter`; :class:`~lookalike.filters.FilterError` names
        the known fields); ``top_k`` is filled whenever enough such products exist. ``box`` = (x0, y0, x1, y1)
        in pixels searches only that part of the photo (:class:`~lookalike.products.BoxError` when unusable).
        """
        options = {"by_product": by_product, "min_similarity": min_similarity, "only_matches": only_matches}
        return self.search_batch([query], top_k, **options, where=where, boxes=None if box is None else [box])[0]

    def search_batch(
        self,
        queries: Sequence[ImageSource],
        top_k: int = 5,
        *,
        by_product: bool = True,
        min_similarity: float | None = None,
        only_matches: bool = False,
        where: Where = None,
        boxes: Sequence[Sequence[float] | str | None] | None = None,
    ) -> list[list[dict[str, Any]]]:
        """:meth:`search` for many queries in one call (batched extraction and search); one list per query.
        ``boxes``: one box (or None: the whole photo) per query."""
        searching.check_top_k(top_k)
        self._require()
        products.check_where(where, self._table)  # a bad filter fails before any photo is decoded
        queries = products.crop_queries(list(queries), boxes, self.settings.max_image_pixels)
        vectors = searching.extract_queries(self.extractor, queries)
        return self.search_vectors(vectors, top_k, by_product=by_product, min_similarity=min_similarity,
                                   only_matches=only_matches, where=where)  # fmt: skip

    def search_vectors(
        self,
        vectors: np.ndarray,
        top_k: int = 5,
        *,
        by_product: bool = True,
        min_similarity: float | None = None,
        only_matches: bool = False,
        where: Where = None,
    ) -> list[list[dict[str, Any]]]:
        """:meth:`search_batch` for feature vectors from this engine's extractor: (n, dim) embeddings as
        ``extract_batch_features`` returns them, or (n, raw_dim) raw vectors (needed by a tuned index)."""
        view = self._fresh_view(top_k)
        table = self._table
        flt = products.store_filter(where, table, self._counts)
        vectors = searching.check_vectors(self._adaptation, vectors)
        dim = self.extractor.dim if self._adaptation.projection is None else 0
        options = {"by_product": by_product, "min_similarity": min_similarity, "only_matches": only_matches}
        return products.attach(searching.search_vectors(*view, vectors, dim, top_k, **options, where=flt), table)

    def similar_to_product(
        self, product_id: str, top_k: int = 5, *, min_similarity: float | None = None, where: Where = None
    ) -> list[dict[str, Any]]:
        """More like this: the other products that look most like ``product_id`` (which is left out), each with
        its ``record``; ``where`` as in :meth:`search`.

        The product is represented by the mean of its indexed vectors. Raises UnknownProductError.
        """
        view, table = self._fresh_view(top_k), self._table
        flt = products.store_filter(where, table, self._counts)
        hits = searching.similar_to_product(*view, product_id, top_k, min_similarity, flt)
        return products.attach([hits], table)[0]

    def search_regions(
        self,
        image: ImageSource,
        top_k: int = 3,
        max_regions: int = 10,
        min_similarity: float | None = None,
        where: Where = None,
    ) -> list[RegionResult]:
        """Every product in a photo of several: (box, hits) per region, best first (:mod:`lookalike.regions`:
        sliding windows searched in batches, confident non-overlapping matches kept, one region per product)."""
        flt = products.check_where(where, self._table) if self.is_ready else where
        options = {"top_k": top_k, "max_regions": max_regions, "min_similarity": min_similarity}
        return search_regions(self, image, **options, **({"where": flt} if flt is not None else {}))

    def image_file(self, image_id: str) -> Path:
        """The catalog file of an indexed image, looked up by its public id only (never by a path from outside)."""
        return searching.image_file(self.store, self.data_root, image_id)

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

    def update_records(self) -> dict[str, Any]:
        """Re-read the catalog's ``products.csv`` / ``products.jsonl`` and save it with the index, without reading
        any image (``lookalike records``); engines of other processes see it on their next refresh. Returns the
        report: loaded, skipped lines and their issues, records without a folder, products without a record."""
        ready = self.is_ready
        with files.catalog_lock(self.settings.cache_dir):
            if ready:
                self._refresh(now=True)
            store = self.store if ready else self._open(manifest_settings=True)
            try:
                manifests.require_index(store, self.settings.metadata_path)
                edits.recover(self.settings.cache_dir, store)
                report = products.update_records(store, self.data_root)
            finally:
                if not ready:
                    store.close()  # opened for this update only (no model was loaded to search with it)
            if ready:
                self._install(store, self._adaptation)
        return report

    # --- statistics -------------------------------------------------------------------------------------

    def get_statistics(self) -> dict[str, Any]:
        """Catalog and index facts: counts, images per product, formats, skipped files, model, index size."""
        store = self.store
        self._refresh()
        stats = manifests.index_statistics(store, self._adaptation, self._counts, self.data_root)
        return dict(stats, records=len(self._table.records))


__all__ = ["BuildReport", "ImageSearchEngine", "IndexMismatchError", "UnknownProductError", "embed_with_cache"]
