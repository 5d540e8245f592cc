"""Retrieval metrics as pure functions over ranked labels, and evaluation runs over a catalog.

Conventions (one query; ``ranked`` is the product label of each retrieved image, best first; ``label`` the
query's own product):

- ``recall@k``: 1 if ``label`` is among the first ``k`` retrieved images, else 0 (the metric-learning Recall@K;
  with one relevant label per query it equals the share of relevant labels found).
- ``precision@k``: the share of the first ``k`` retrieved images that have ``label``; missing places count as wrong.
- ``map@r``: MAP@R of Musgrave et al. (2020): with ``R`` the number of catalog images of ``label``,
  ``(1/R) * sum_{i<=R} precision@i * [ranked[i] == label]``.
- ``mrr``: ``1 / rank`` of the first image with ``label`` (0 if none retrieved).
- ``product_hit@k``: 1 if ``label`` is among the first ``k`` distinct products of the ranking.

A summary averages each over the queries.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections import Counter
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .catalog import scan_catalog
from .settings import Settings

logger = logging.getLogger(__name__)

Label = Hashable


def recall_at_k(ranked: Sequence[Label], label: Label, k: int) -> float:
    _check_k(k)
    return 1.0 if label in ranked[:k] else 0.0


def precision_at_k(ranked: Sequence[Label], label: Label, k: int) -> float:
    _check_k(k)
    return sum(1 for x in ranked[:k] if x == label) / k


def average_precision_at_r(ranked: Sequence[Label], label: Label, r: int) -> float:
    return _ap_at_r({label}, list(ranked), r)


def reciprocal_rank(ranked: Sequence[Label], label: Label) -> float:
    for i, x in enumerate(ranked, start=1):
        if x == label:
            return 1.0 / i
    return 0.0


def distinct(ranked: Sequence[Label]) -> list[Label]:
    """The products in the order they first appear (a product ranks by its best image)."""
    return list(dict.fromkeys(ranked))


def product_hit_at_k(ranked: Sequence[Label], label: Label, k: int) -> float:
    _check_k(k)
    return 1.0 if label in distinct(ranked)[:k] else 0.0


def _check_k(k: int) -> None:
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")


def summarize(
    rankings: Sequence[Sequence[Label]], labels: Sequence[Label], relevant: Sequence[int]
) -> dict[str, float]:
    """The standard metric set, averaged over queries. ``relevant[i]`` is R for query ``i``."""
    if not (len(rankings) == len(labels) == len(relevant)):
        raise ValueError("rankings, labels and relevant must have one entry per query")
    n = len(labels)
    if n == 0:
        return {"recall@1": 0.0, "precision@5": 0.0, "map@r": 0.0, "product_hit@5": 0.0, "mrr": 0.0, "queries": 0}
    rows = [
        (
            recall_at_k(r, y, 1),
            precision_at_k(r, y, 5),
            average_precision_at_r(r, y, R),
            product_hit_at_k(r, y, 5),
            reciprocal_rank(r, y),
        )
        for r, y, R in zip(rankings, labels, relevant)
    ]
    means = np.mean(np.array(rows), axis=0)
    keys = ("recall@1", "precision@5", "map@r", "product_hit@5", "mrr")
    return {**{k: float(v) for k, v in zip(keys, means)}, "queries": n}


class EvaluationUtils:
    """The seed's metric helpers. Each takes either one query or many.

    One query: ``true_labels`` is its label (or a collection of acceptable labels) and ``predicted_labels`` the
    ranked labels retrieved for it. Many queries: ``true_labels`` holds one label per query and
    ``predicted_labels`` one ranked list per query; the result is the mean over queries.
    """

    @staticmethod
    def calculate_precision_at_k(true_labels: Any, predicted_labels: Sequence[Any], k: int) -> float:
        """Precision@K: relevant results among the first ``k``, divided by ``k`` (missing places count as wrong)."""
        _check_k(k)
        return _per_query(true_labels, predicted_labels, lambda rel, pred: sum(1 for x in pred[:k] if x in rel) / k)

    @staticmethod
    def calculate_recall_at_k(
        true_labels: Any, predicted_labels: Sequence[Any], k: int, num_relevant: int | None = None
    ) -> float:
        """Recall@K: the share of the acceptable labels found in the first ``k`` results.

        With one true label per query this is 1 if it appears in the top ``k``, else 0 (the Recall@K of metric
        learning). With ``num_relevant`` (one query) it is instead the classic IR recall: relevant results in the
        top ``k`` divided by ``num_relevant``, the number of relevant items in the catalog.
        """
        _check_k(k)
        if num_relevant is not None:
            if num_relevant < 1:
                raise ValueError(f"num_relevant must be at least 1, got {num_relevant}")
            rel = _as_set(true_labels)
            return sum(1 for x in predicted_labels[:k] if x in rel) / num_relevant
        return _per_query(true_labels, predicted_labels, lambda rel, pred: len(rel & set(pred[:k])) / len(rel))

    @staticmethod
    def calculate_map_at_r(
        true_labels: Any, predicted_labels: Sequence[Any], num_relevant: int | Sequence[int]
    ) -> float:
        """MAP@R (Musgrave et al. 2020): ``(1/R) * sum_{i<=R} precision@i * relevant(i)``.

        ``num_relevant`` is R, the number of relevant catalog items (one R per query for many queries).
        """
        if _is_batch(predicted_labels):
            rs = list(num_relevant)  # type: ignore[arg-type]
            if not (len(true_labels) == len(predicted_labels) == len(rs)):
                raise ValueError(
                    f"{len(true_labels)} true labels, {len(predicted_labels)} ranked lists and {len(rs)} values of R: "
                    "give one of each per query"
                )
            return float(
                np.mean([_ap_at_r(_as_set(t), list(p), int(r)) for t, p, r in zip(true_labels, predicted_labels, rs)])
            )
        return _ap_at_r(_as_set(true_labels), list(predicted_labels), int(num_relevant))  # type: ignore[arg-type]

    @staticmethod
    def calculate_mrr(true_labels: Any, predicted_labels: Sequence[Any]) -> float:
        """Mean reciprocal rank of the first relevant result (0 for a query with none)."""

        def rr(rel: set, pred: Sequence[Any]) -> float:
            return next((1.0 / i for i, x in enumerate(pred, start=1) if x in rel), 0.0)

        return _per_query(true_labels, predicted_labels, rr)


def _ap_at_r(relevant: set, ranked: list, r: int) -> float:
    if r < 1:
        raise ValueError(f"R must be at least 1, got {r}")
    hits, total = 0, 0.0
    for i, x in enumerate(ranked[:r], start=1):
        if x in relevant:
            hits += 1
            total += hits / i
    return total / r


def _is_batch(predicted_labels: Sequence[Any]) -> bool:
    return len(predicted_labels) > 0 and all(isinstance(p, (list, tuple, np.ndarray)) for p in predicted_labels)


def _as_set(labels: Any) -> set:
    if isinstance(labels, (str, bytes)) or not isinstance(labels, (list, tuple, set, frozenset, np.ndarray)):
        return {labels}
    return set(labels)


def _per_query(true_labels: Any, predicted_labels: Sequence[Any], fn) -> float:
    if _is_batch(predicted_labels):
        if len(true_labels) != len(predicted_labels):
            raise ValueError(
                f"{len(true_labels)} true labels for {len(predicted_labels)} ranked lists: give one per query"
            )
        return float(np.mean([fn(_as_set(t), list(p)) for t, p in zip(true_labels, predicted_labels)]))
    rel = _as_set(true_labels)
    if not rel:
        raise ValueError("true_labels is empty")
    return float(fn(rel, list(predicted_labels)))


# --- evaluation runs ----------------------------------------------------------------------------------------


def evaluate(
    settings: Settings,
    catalog_dir: str | Path,
    queries_dir: str | Path | None = None,
    *,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Index ``catalog_dir`` and measure retrieval with the photos of ``queries_dir`` (same folder layout; the folder
    names the right product). Without ``queries_dir``, every catalog image queries all the others (leave-one-out).

    The user's own index files are not touched: the evaluation index lives in a temporary folder, while extracted
    features are cached in ``cache_dir`` like any build's.
    """
    from .embedding import FeatureExtractor
    from .engine import ImageSearchEngine, embed_with_cache
    from .store import EmbeddingCache

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lookalike-eval-") as tmp:
        eval_settings = settings.replace(
            data_dir=Path(catalog_dir), index_file=Path(tmp) / "index.faiss", metadata_file=Path(tmp) / "metadata.json"
        )
        extractor = FeatureExtractor(eval_settings)
        engine = ImageSearchEngine(eval_settings, extractor=extractor)
        report = engine.build_index(progress=progress)
        state = engine.snapshot
        catalog_labels = np.array(state.product_ids, dtype=object)
        per_product = Counter(state.product_ids)
        n = state.index.ntotal
        if queries_dir is None:
            protocol = "leave-one-out"
            query_vectors = state.index.vectors()
            query_labels = list(state.product_ids)
            self_rows = np.arange(n)
            skipped_queries: list[dict[str, str]] = []
        else:
            protocol = "queries"
            images = scan_catalog(queries_dir)
            cache = EmbeddingCache.for_catalog(eval_settings.cache_dir, extractor.fingerprint, Path(queries_dir))
            vectors, _, errors, _ = embed_with_cache(extractor, images, cache, progress=progress)
            good = [i for i in range(len(images)) if i not in errors]
            query_vectors = vectors[good]
            query_labels = [images[i].product_id for i in good]
            self_rows = None
            skipped_queries = [{"path": str(images[i].path), "reason": r} for i, r in sorted(errors.items())]

        relevant = np.array([per_product.get(y, 0) - (1 if self_rows is not None else 0) for y in query_labels])
        usable = relevant > 0
        depth = int(min(n, max(int(relevant.max(initial=0)), 100) + (1 if self_rows is not None else 0)))
        _, rows = state.index.search(query_vectors, depth)
        rankings = []
        for q, row in enumerate(rows):
            row = row[row >= 0]
            if self_rows is not None:
                row = row[row != self_rows[q]]
            rankings.append(list(catalog_labels[row]))
        kept = np.flatnonzero(usable)
        metrics = summarize(
            [rankings[i] for i in kept], [query_labels[i] for i in kept], [int(relevant[i]) for i in kept]
        )
    return {
        "protocol": protocol,
        "catalog": str(Path(catalog_dir)),
        "queries": str(Path(queries_dir)) if queries_dir is not None else None,
        "model": extractor.describe(),
        "metric": settings.similarity_metric,
        "catalog_images": n,
        "catalog_products": len(per_product),
        "catalog_skipped": report.skipped,
        "metrics": metrics,
        "queries_without_product_in_catalog": int((~usable).sum()),
        "skipped_queries": skipped_queries,
        "seconds": round(time.perf_counter() - start, 2),
    }
