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
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .catalog import scan_catalog
from .ranking import average_precision_at_r as _ap
from .ranking import score_products
from .settings import TUNE_FINETUNE, Settings

logger = logging.getLogger(__name__)

Label = Hashable


def recall_at_k(ranked: Sequence[Label], label: Label, k: int) -> float:
    _check_k(k)
    return 1.0 if label in ranked[:k] else 0.0


def precision_at_k(ranked: Sequence[Label], label: Label, k: int) -> float:
    _check_k(k)
    return sum(1 for x in ranked[:k] if x == label) / k


def average_precision_at_r(ranked: Sequence[Label], label: Label, r: int) -> float:
    return _ap(list(ranked), {label}, r)


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
    return _ap(ranked, set(relevant), r)


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

PROTOCOL_QUERIES = "photo->catalog"
PROTOCOL_LOO = "leave-one-out"
PROTOCOL_ICONIC = "iconic->photos"


@dataclass
class LabelledSet:
    """Raw feature vectors of a labelled folder (``<product>/<images>``), in catalog order."""

    raw: np.ndarray
    labels: list[str]
    paths: list[str]  # absolute
    skipped: list[dict[str, str]]


def embed_folder(extractor, settings: Settings, folder: str | Path, *, progress: bool | None = None) -> LabelledSet:
    """Raw vectors of every image under ``folder``, through the same embedding cache as index builds."""
    from .cache import EmbeddingCache, embed_with_cache

    images = scan_catalog(folder)
    cache = EmbeddingCache.for_catalog(settings.cache_dir, extractor.fingerprint, Path(folder))
    emb = embed_with_cache(extractor, images, cache, progress=progress)
    good = emb.good
    skipped = [{"path": str(images[i].path), "reason": r} for i, r in sorted(emb.errors.items())]
    return LabelledSet(
        emb.vectors[good], [images[i].product_id for i in good], [str(images[i].path) for i in good], skipped
    )


def _run_protocol(engine, queries: np.ndarray, labels: Sequence[str], paths: Sequence[str], *, loo: bool) -> dict:
    """Metrics of one protocol, with per-query details for reports. ``queries`` are raw vectors."""
    per_product = engine.images_per_product()
    n = sum(per_product.values())
    relevant = np.array([per_product.get(y, 0) - (1 if loo else 0) for y in labels])
    depth = int(min(n, max(int(relevant.max(initial=0)), 100) + (1 if loo else 0)))
    root = engine.data_root
    results = engine.search_vectors(queries, depth, by_product=False) if n else [[] for _ in labels]
    rankings, products, details = [], [], []
    for q, hits in enumerate(results):
        if loo:  # the query image itself is in the index: leave it out
            own = image_id_of(paths[q], root)
            hits = [h for h in hits if h["image_id"] != own]
        rankings.append([h["product_id"] for h in hits])
        values = [h.get("distance", h["similarity"]) for h in hits]
        l2 = bool(hits) and "distance" in hits[0]
        chosen, _ = score_products(values, rankings[-1], per_product, 5, lower_is_better=l2, complete=True)
        products.append([c.product_id for c in chosen])
        details.append(
            {
                "path": paths[q],
                "label": labels[q],
                "results": [
                    {"product_id": h["product_id"], "path": h["image_path"], "similarity": h["similarity"]}
                    for h in hits[:5]
                ],
                "products": products[-1],
            }
        )
    usable = np.flatnonzero(relevant > 0)
    metrics = summarize([rankings[i] for i in usable], [labels[i] for i in usable], [int(relevant[i]) for i in usable])
    metrics["product_hit@5"] = float(np.mean([labels[i] in products[i][:5] for i in usable])) if len(usable) else 0.0
    metrics["product_recall@1"] = (
        float(np.mean([products[i][:1] == [labels[i]] for i in usable])) if len(usable) else 0.0
    )
    for i in usable:
        details[i]["recall@1"] = recall_at_k(rankings[i], labels[i], 1)
        details[i]["ap@r"] = average_precision_at_r(rankings[i], labels[i], int(relevant[i]))
    return {
        "metrics": metrics,
        "queries_without_product_in_catalog": int(np.sum(relevant <= 0)),
        "details": [details[i] for i in usable],
    }


def image_id_of(path: str | Path, root: Path) -> str:
    from .ids import image_id_for

    return image_id_for(Path(path).relative_to(root).as_posix())


def evaluate(
    settings: Settings,
    catalog_dir: str | Path,
    queries_dir: str | Path | None = None,
    *,
    iconic_dir: str | Path | None = None,
    leave_one_out: bool = True,
    leave_out_products: int = 0,
    seed: int = 0,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Index ``catalog_dir`` in memory (with tuning if ``settings.tune``) and measure retrieval:

    - photo->catalog: the photos of ``queries_dir`` (same layout; the folder names the right product);
    - leave-one-out: every catalog image queries all the others;
    - iconic->photos: the studio shots of ``iconic_dir``.

    ``leave_out_products`` > 0 also measures "not in my catalog": that many products (seeded choice among those
    with query photos) are left out of a second index, adapted without them, and its no-match score must tell
    their query photos from the others (AUROC; rates at the calibrated threshold).

    Only the embedding cache in ``cache_dir`` is written; the user's index files are not touched. A tuned
    projection is fitted on catalog images only, so leave-one-out of a tuned index scores images the fit saw.
    With ``tune: finetune`` the backbone is fine-tuned on ``catalog_dir`` first (or its checkpoint for that catalog
    reused from ``cache_dir/finetuned``), and for ``leave_out_products`` fine-tuned again without the left-out
    products, so that "not in my catalog" is measured on products the network never saw.
    """
    from .embedding import FeatureExtractor
    from .engine import ImageSearchEngine

    start = time.perf_counter()
    base_settings, finetune_info = settings, None
    if settings.tune == TUNE_FINETUNE:
        settings, finetune_info = _with_finetuned(settings, catalog_dir, progress=progress)
    eval_settings = settings.replace(data_dir=Path(catalog_dir))
    extractor = FeatureExtractor(eval_settings)
    catalog = embed_folder(extractor, eval_settings, catalog_dir, progress=progress)
    root = Path(catalog_dir).expanduser().resolve()
    rel = [Path(p).relative_to(root).as_posix() for p in catalog.paths]
    engine = ImageSearchEngine.from_vectors(
        eval_settings, extractor, catalog.raw, rel, catalog.labels, tune=settings.tune
    )
    adaptation = engine.snapshot.adaptation
    protocols: dict[str, Any] = {}
    query_sets: dict[str, LabelledSet] = {}
    if queries_dir is not None:
        query_sets[PROTOCOL_QUERIES] = embed_folder(extractor, eval_settings, queries_dir, progress=progress)
    if iconic_dir is not None:
        query_sets[PROTOCOL_ICONIC] = embed_folder(extractor, eval_settings, iconic_dir, progress=progress)
    for name, qs in query_sets.items():
        protocols[name] = _run_protocol(engine, qs.raw, qs.labels, qs.paths, loo=False)
        protocols[name]["skipped_queries"] = qs.skipped
    if leave_one_out:
        protocols[PROTOCOL_LOO] = _run_protocol(engine, catalog.raw, catalog.labels, catalog.paths, loo=True)
    result: dict[str, Any] = {
        "catalog": str(Path(catalog_dir)),
        "queries": None if queries_dir is None else str(Path(queries_dir)),
        "iconic": None if iconic_dir is None else str(Path(iconic_dir)),
        "model": extractor.describe(),
        "metric": settings.similarity_metric,
        "tuning": adaptation.tuning if finetune_info is None else {**adaptation.tuning, "finetune": finetune_info},
        "calibration": adaptation.calibration,
        "catalog_images": len(catalog.labels),
        "catalog_products": len(set(catalog.labels)),
        "catalog_skipped": catalog.skipped,
        "protocols": protocols,
    }
    if leave_out_products:
        probe = query_sets.get(PROTOCOL_QUERIES)
        if probe is None:
            raise ValueError("measuring 'not in my catalog' (leave_out_products) needs a queries folder")
        hidden = _hidden_choice(catalog.labels, probe.labels, leave_out_products, seed)
        if finetune_info is not None:  # a network that never saw the left-out products, and its own vectors
            ft_settings, info = _with_finetuned(base_settings, catalog_dir, exclude=hidden, progress=progress)
            eval_settings = ft_settings.replace(data_dir=Path(catalog_dir))
            extractor = FeatureExtractor(eval_settings)
            catalog = embed_folder(extractor, eval_settings, catalog_dir, progress=progress)
            probe = embed_folder(extractor, eval_settings, queries_dir, progress=progress)
        result["no_match"] = _no_match_run(eval_settings, extractor, catalog, probe, hidden)
        if finetune_info is not None:
            result["no_match"]["finetune"] = info
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result


def describe_no_match(nm: dict[str, Any]) -> str:
    """One sentence on a "not in my catalog" measurement (CLI and report)."""
    line = f"not in catalog ({len(nm['hidden_products'])} products left out): AUROC {nm['auroc']:.3f}"
    if nm.get("threshold") is not None:
        line += (
            f"; at the calibrated threshold {nm['threshold']:.3f}: {nm['wrong_no_match_rate']:.1%} of in-catalog "
            f"photos answered 'no match' (wrong), {nm['right_no_match_rate']:.1%} of left-out ones (right)"
        )
        if nm.get("correct_flagged_match_rate") is not None:  # absent from results saved before it was measured
            line += f"; {nm['correct_flagged_match_rate']:.1%} of right answers flagged match"
    return line


def _with_finetuned(settings: Settings, catalog_dir, *, exclude=(), progress=None) -> tuple[Settings, dict]:
    """``settings`` extracting with the weights fine-tuned on ``catalog_dir`` (without ``exclude``) and the LDA on
    top (tune "finetune", as a build fits it), and the fine-tune's record; the base weights and the LDA alone (tune
    true) when it declines."""
    from .finetuned import finetuned_weights

    outcome = finetuned_weights(settings, data_dir=catalog_dir, exclude_products=exclude, progress=progress)
    if outcome.weights is None:
        return settings.replace(tune=True), outcome.info
    return settings.replace(weights_path=outcome.weights, tune=TUNE_FINETUNE), outcome.info


def _hidden_choice(catalog_labels, probe_labels, n_out: int, seed: int) -> set[str]:
    """The ``n_out`` products (seeded choice among those with query photos) that "not in my catalog" leaves out."""
    candidates = sorted(set(probe_labels) & set(catalog_labels))
    if n_out >= len(set(catalog_labels)) or n_out > len(candidates):
        raise ValueError(f"cannot leave {n_out} products out: the catalog has {len(set(catalog_labels))}")
    rng = np.random.default_rng(seed)
    return set(rng.choice(candidates, n_out, replace=False).tolist())


def _no_match_run(settings, extractor, catalog: LabelledSet, probe: LabelledSet, hidden: set[str]) -> dict:
    """Leave ``hidden`` products out of the index and score how well "no match" tells their photos apart."""
    from .engine import ImageSearchEngine
    from .tuning import auroc

    keep = [i for i, y in enumerate(catalog.labels) if y not in hidden]
    root = Path(settings.data_dir).expanduser().resolve()
    engine = ImageSearchEngine.from_vectors(
        settings,
        extractor,
        catalog.raw[keep],
        [Path(catalog.paths[i]).relative_to(root).as_posix() for i in keep],
        [catalog.labels[i] for i in keep],
        tune=settings.tune,
    )
    adaptation = engine.snapshot.adaptation
    best, right = [], []
    for q, hits in enumerate(engine.search_vectors(probe.raw, 1)):
        best.append(hits[0]["similarity"] if hits else -np.inf)
        right.append(bool(hits) and hits[0]["product_id"] == probe.labels[q])
    best_a = np.array(best)
    inside = np.array([y not in hidden for y in probe.labels])
    threshold = adaptation.threshold
    out = {
        "hidden_products": sorted(hidden),
        "in_catalog_queries": int(inside.sum()),
        "hidden_product_queries": int((~inside).sum()),
        "auroc": auroc(best_a[inside], best_a[~inside]),
        "threshold": threshold,
        "calibration": adaptation.calibration,
    }
    if threshold is not None:
        out["wrong_no_match_rate"] = float(np.mean(best_a[inside] < threshold))  # in catalog, answered "no match"
        out["right_no_match_rate"] = float(np.mean(best_a[~inside] < threshold))  # hidden, answered "no match"
        correct = inside & np.array(right)  # the right product first: flagged match, as it should be?
        out["correct_flagged_match_rate"] = float(np.mean(best_a[correct] >= threshold)) if correct.any() else None
        out["in_catalog_recall@1_when_matched"] = float(
            np.mean(np.array(right)[inside & (best_a >= threshold)]) if np.any(inside & (best_a >= threshold)) else 0.0
        )
    return out
