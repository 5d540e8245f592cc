"""Ranking: how image similarities become product results. ONE implementation, used by the engine (live
searches), tuning (held-out checks) and evaluation (metrics).

- A product scores the mean of its best ``PRODUCT_TOP`` image similarities (fewer if it has fewer images); for
  the l2 metric the mean of its best distances, reported as :func:`similarity_from_distance`.
- A store returns images, not products, so :func:`widening_search` over-fetches images and widens the window
  (x4 each round) until the top-k products are settled: no product outside the window could still outrank them.
- :func:`average_precision_at_r` is MAP@R's per-query term (Musgrave et al. 2020).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

PRODUCT_TOP = 3  # a product's score is the mean of its best PRODUCT_TOP image similarities

T = TypeVar("T")


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (all-zero rows stay zero)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def similarity_from_distance(distance: np.ndarray) -> np.ndarray:
    """The monotone similarity reported for l2: 1 / (1 + distance), in (0, 1], 1 for identical vectors."""
    return 1.0 / (1.0 + distance)


@dataclass(frozen=True)
class ProductScore:
    product_id: str
    value: float  # mean of the best images' values: a similarity, or (lower is better) a distance
    first: int  # position of the product's best image among the hits


def score_products(
    values: Sequence[float] | np.ndarray,
    product_ids: Sequence[str],
    images_per_product: Mapping[str, int],
    top_k: int,
    *,
    lower_is_better: bool = False,
    complete: bool = False,
) -> tuple[list[ProductScore], bool]:
    """The best ``top_k`` products from one query's best images (``values`` best first), and whether they are
    settled (looking deeper could not change them).

    A product whose best images were not all retrieved borrows the last retrieved value for the missing ones: an
    upper bound, so a product can only be ranked too high while the window is too shallow. ``complete``: the
    hits are every image of the catalog.
    """
    values = np.asarray(values, dtype=np.float64)
    if not len(values):
        return [], True
    positions: dict[str, list[int]] = {}
    for i, product in enumerate(product_ids):
        positions.setdefault(product, []).append(i)
    floor = float(values[-1])
    ranked = []
    for product, hits in positions.items():
        m = min(PRODUCT_TOP, images_per_product.get(product, len(hits)))
        m = max(m, 1)
        top = [float(values[i]) for i in hits[:m]]
        top += [floor] * (m - len(top))  # not retrieved yet: at best as good as the last retrieved
        ranked.append((float(np.mean(top)), product, hits[0], len(hits) >= m))
    ranked.sort(key=lambda t: (t[0], t[2]) if lower_is_better else (-t[0], t[2]))
    chosen = ranked[:top_k]
    # Settled when every chosen product was fully seen and no unseen product could outrank the last chosen.
    settled = complete or (
        len(chosen) == top_k
        and all(t[3] for t in chosen)
        and (chosen[-1][0] <= floor if lower_is_better else chosen[-1][0] >= floor)
    )
    return [ProductScore(p, v, first) for v, p, first, _ in chosen], settled


def widening_search(
    search: Callable[[np.ndarray, int], list[T]],
    n_queries: int,
    total: int,
    top_k: int,
    settle: Callable[[T, bool], tuple[Any, bool]],
) -> list[Any]:
    """Results for ``n_queries`` queries: ``search(query_positions, k)`` returns each query's best ``k`` images;
    ``settle(hits, complete)`` turns one query's hits into (result, settled). Queries not settled are searched
    again with four times the window, up to every image (``total``)."""
    out: list[Any] = [None] * n_queries
    todo = np.arange(n_queries)
    k = min(total, max(8 * top_k, 64))
    while len(todo):
        again = []
        for q, hits in zip(todo, search(todo, k)):
            result, settled = settle(hits, k >= total)
            if settled:
                out[q] = result
            else:
                again.append(q)
        todo = np.array(again, dtype=np.int64)
        k = min(total, k * 4)
    return out


def rank(
    store: Any,
    vectors: np.ndarray,
    top_k: int,
    *,
    by_product: bool,
    min_similarity: float | None,
    images_per_product: Mapping[str, int],
    threshold: float | None,
    root: Path,
    where: Any = None,
    total: int | None = None,
    image_threshold: float | None = None,
) -> list[list[dict[str, Any]]]:
    """The engine's results for query vectors already in index space, from any VectorStore: images, or products
    scored as above (over-fetching until settled). Each result is a dict with ``rank``, ``product_id``,
    ``similarity``, ``image_id``, ``image_path`` (under ``root``); products add ``image_similarity`` and, when
    ``threshold`` is known, ``match``; images add ``match`` when ``image_threshold`` (calibrated on the best
    single image similarity, not on the product score) is known; l2 adds ``distance``. ``where`` (a
    :class:`~lookalike.stores.StoreFilter`) limits the search to its products' images, ``total`` of them (default:
    the whole store)."""
    total = store.count() if total is None else total
    if total == 0:
        return [[] for _ in range(len(vectors))]

    def hit(h: Any, similarity: float) -> dict[str, Any]:
        return {
            "product_id": h.product_id,
            "similarity": similarity,
            "image_id": h.image_id,
            "image_path": str(root / h.path),
        }

    if not by_product:
        out = []
        for hits in store.search(vectors, top_k, where=where):
            kept = hits if min_similarity is None else list(_while_above(hits, min_similarity))
            results = [{"rank": r, **hit(h, h.score)} for r, h in enumerate(kept, start=1)]
            for res, h in zip(results, kept):
                if h.distance is not None:
                    res["distance"] = h.distance
                if image_threshold is not None:
                    res["match"] = bool(h.score >= image_threshold)
            out.append(results)
        return out

    def settle(hits: list, complete: bool) -> tuple[list[dict[str, Any]], bool]:
        l2 = bool(hits) and hits[0].distance is not None
        values = [h.distance if l2 else h.score for h in hits]
        pids = [h.product_id for h in hits]
        chosen, settled = score_products(values, pids, images_per_product, top_k, lower_is_better=l2, complete=complete)
        out = []
        for product in chosen:
            similarity = float(similarity_from_distance(product.value)) if l2 else product.value
            if min_similarity is not None and similarity < min_similarity:
                return out, True  # the rest score lower, and deeper images lower still
            best = hits[product.first]
            res = {"rank": len(out) + 1, **hit(best, similarity), "image_similarity": best.score}
            if l2:
                res["distance"] = product.value
            if threshold is not None:
                res["match"] = similarity >= threshold
            out.append(res)
        return out, settled

    def search(positions: np.ndarray, k: int) -> list:
        return store.search(vectors[positions], k, where=where)

    return widening_search(search, len(vectors), total, top_k, settle)


def _while_above(hits: list, floor: float):
    for h in hits:  # hits come best first
        if h.score < floor:
            return
        yield h


def product_scores(sims: np.ndarray, db_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exhaustive product scores: (products, scores (n_queries, n_products)), each product's mean of its best
    PRODUCT_TOP similarities in the dense query x catalog similarity matrix ``sims``."""
    products, inverse = np.unique(db_labels, return_inverse=True)
    scores = np.empty((sims.shape[0], len(products)), np.float32)
    for j in range(len(products)):
        block = sims[:, inverse == j]
        m = min(PRODUCT_TOP, block.shape[1])
        scores[:, j] = -np.sort(-block, axis=1)[:, :m].mean(axis=1)
    return products, scores


def average_precision_at_r(ranked: Sequence[Any], relevant: Any, r: int) -> float:
    """MAP@R's term for one query: ``(1/R) * sum_{i<=R} precision@i * [ranked[i] relevant]``. ``relevant`` is
    one label or a set of acceptable labels; ``r`` is R, the number of relevant catalog items."""
    if r < 1:
        raise ValueError(f"R must be at least 1, got {r}")
    accept = relevant if isinstance(relevant, (set, frozenset)) else {relevant}
    hits, total = 0, 0.0
    for i, x in enumerate(list(ranked)[:r], start=1):
        if x in accept:
            hits += 1
            total += hits / i
    return total / r


__all__ = [
    "PRODUCT_TOP",
    "ProductScore",
    "average_precision_at_r",
    "l2_normalize",
    "product_scores",
    "rank",
    "score_products",
    "similarity_from_distance",
    "widening_search",
]
