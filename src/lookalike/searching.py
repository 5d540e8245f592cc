"""Searching a loaded index for the engine: query checks, the adaptation, ranking, more-like-this, image lookup."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import ranking
from .edits import UnknownProductError
from .imaging import ImageError, ImageSource, describe
from .stores import StoreFilter, VectorStore
from .tuning import Adaptation


def check_top_k(top_k: int) -> None:
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise ValueError(f"top_k must be a whole number of at least 1, got {top_k!r}")


def extract_queries(extractor: Any, queries: Sequence[ImageSource]) -> np.ndarray:
    """The raw vectors of query images; the first one that cannot be read raises :class:`ImageError`."""
    raw = extractor.extract(queries, progress=False)
    if raw.errors:
        first = min(raw.errors)
        raise ImageError(describe(queries[first]), raw.errors[first])
    return raw.vectors


def rank(
    store: VectorStore,
    adaptation: Adaptation,
    counts: Mapping[str, int],
    root: Path,
    vectors: np.ndarray,
    top_k: int,
    by_product: bool,
    min_similarity: float | None,
    where: StoreFilter | None = None,
) -> list[list[dict[str, Any]]]:
    """:func:`lookalike.ranking.rank` over the loaded index (already adapted query vectors); ``where`` limits it
    to the filter's products (``where.images`` of them)."""
    if where is not None:
        options = {"where": where, "total": where.images if where.images is not None else store.count()}
    else:
        options = {}
    return ranking.rank(
        store,
        vectors,
        top_k,
        by_product=by_product,
        min_similarity=min_similarity,
        images_per_product=counts,
        threshold=adaptation.threshold,
        root=root,
        image_threshold=adaptation.image_threshold,
        **options,
    )


def check_vectors(adaptation: Adaptation, vectors: np.ndarray) -> np.ndarray:
    """``vectors`` as a float32 (n, d) array; a tuned index needs raw vectors (ValueError otherwise)."""
    vectors = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
    if adaptation.projection is not None and vectors.shape[1] != adaptation.projection.raw_dim:
        raise ValueError(
            f"this index is tuned: give raw vectors of {adaptation.projection.raw_dim} values "
            "(FeatureExtractor.extract)"
        )
    return vectors


def search_vectors(
    store: VectorStore,
    adaptation: Adaptation,
    counts: Mapping[str, int],
    root: Path,
    vectors: np.ndarray,
    dim: int,
    top_k: int,
    *,
    by_product: bool,
    min_similarity: float | None,
    only_matches: bool,
    where: StoreFilter | None = None,
) -> list[list[dict[str, Any]]]:
    """The engine's ``search_vectors`` on checked vectors; ``dim`` is the extractor's (unused by a tuned index)."""
    queries = adaptation.transform(vectors, dim if adaptation.projection is None else 0)
    results = rank(store, adaptation, counts, root, queries, top_k, by_product, min_similarity, where)
    if only_matches:  # results carry "match" when their kind (product or image) is calibrated
        results = [[h for h in hits if h.get("match", True)] for hits in results]
    return results


def similar_to_product(
    store: VectorStore,
    adaptation: Adaptation,
    counts: Mapping[str, int],
    root: Path,
    product_id: str,
    top_k: int,
    min_similarity: float | None,
    where: StoreFilter | None = None,
) -> list[dict[str, Any]]:
    """More like this: the mean of the product's indexed vectors, ranked, with the product itself left out
    (and, with ``where``, only the filter's products)."""
    rows = store.fetch(store.ids(product_id=product_id), with_vectors=True)
    if not rows:
        raise UnknownProductError(product_id)
    query = np.mean([r["vector"] for r in rows.values()], axis=0, keepdims=True)
    others = len(counts) - 1
    k = min(top_k + 1, max(others + 1, 1))
    hits = rank(store, adaptation, counts, root, query, k, True, min_similarity, where)[0]
    hits = [h for h in hits if h["product_id"] != product_id][:top_k]
    for position, hit in enumerate(hits, start=1):
        hit["rank"] = position
    return hits


def image_file(store: VectorStore, root: Path, image_id: str) -> Path:
    """The catalog file of an indexed image, looked up by its public id only (never by a path from outside)."""
    found = store.fetch([image_id]).get(image_id)
    if found is None:
        raise LookupError(f"unknown image id {image_id!r}")
    return root / found["path"]
