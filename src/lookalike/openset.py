"""Scores for "is this product in my catalog at all?", computed from an index's own vectors.

Each score is higher for "in the catalog"; all work on L2-normalised index vectors and their product labels, so
they apply to any index (untuned, LDA-tuned, fine-tuned). :func:`measure` compares them on photos of products the
index holds and of products it does not (AUROC), and gives the operating point at a threshold: the share of
correct answers flagged ``match`` and the share of unknown products flagged ``no match``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .ranking import PRODUCT_TOP, l2_normalize
from .tuning import auroc, product_scores

ENERGY_SCALE = 16.0  # inverse temperature of the energy score over product prototypes
SCORES = ("product", "prototype", "energy", "margin", "relative")  # what scores() gives besides the answer


def prototypes(db: np.ndarray, db_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(products, unit-length mean vector of each product's images)."""
    products, inverse = np.unique(db_labels, return_inverse=True)
    sums = np.zeros((len(products), db.shape[1]), np.float64)
    np.add.at(sums, inverse, l2_normalize(db))
    return products, l2_normalize(sums.astype(np.float32))


def reference_scores(db: np.ndarray, db_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(products, each product's typical own score): the median over its images of the score its product gives
    that image with the image itself left out (``search()``'s product score, mean of the best three). Products
    differ in how alike their own photos are (identical cartons vs loose vegetables); the ``relative`` score
    measures a query against its answer's own typical score. Single-image products get the median of the rest."""
    d = l2_normalize(db)
    labels = np.asarray(db_labels)
    products = np.unique(labels)
    ref = np.full(len(products), np.nan)
    for j, p in enumerate(products):
        own = d[labels == p]
        if len(own) < 2:
            continue
        sims = own @ own.T
        np.fill_diagonal(sims, -np.inf)
        top = -np.sort(-sims, axis=1)[:, : min(PRODUCT_TOP, len(own) - 1)]
        ref[j] = float(np.median(top.mean(axis=1)))
    ref[np.isnan(ref)] = np.nanmedian(ref) if np.isfinite(ref).any() else 0.0
    return products, ref


def scores(queries: np.ndarray, db: np.ndarray, db_labels: np.ndarray) -> dict[str, Any]:
    """Per query: the answer (best product) and each no-match score.

    - ``product``: the best product's score as ``search()`` reports it (mean of its best three images);
    - ``prototype``: cosine to the nearest product prototype (mean vector);
    - ``energy``: ``logsumexp(s * cos) / s`` over all prototypes (high when one or more are close);
    - ``margin``: best product score minus the second best (a confident, unambiguous answer);
    - ``relative``: the best product's score minus that product's typical own score (:func:`reference_scores`).
    """
    q, d = l2_normalize(queries), l2_normalize(db)
    products, pscore = product_scores(q @ d.T, np.asarray(db_labels))
    order = np.argsort(-pscore, axis=1)
    best = pscore[np.arange(len(q)), order[:, 0]]
    second = pscore[np.arange(len(q)), order[:, 1]] if pscore.shape[1] > 1 else np.zeros(len(q))
    _, protos = prototypes(d, np.asarray(db_labels))
    cos = q @ protos.T
    z = ENERGY_SCALE * cos
    energy = (z.max(axis=1) + np.log(np.exp(z - z.max(axis=1, keepdims=True)).sum(axis=1))) / ENERGY_SCALE
    _, ref = reference_scores(d, np.asarray(db_labels))
    return {
        "answer": products[order[:, 0]],
        "product": best,
        "prototype": cos.max(axis=1),
        "energy": energy,
        "margin": best - second,
        "relative": best - ref[order[:, 0]],
    }


def measure(
    queries: np.ndarray, labels: np.ndarray, db: np.ndarray, db_labels: np.ndarray, threshold: float | None = None
) -> dict[str, Any]:
    """AUROC of each score (query products in the index vs not), and with ``threshold`` on the ``product`` score the
    operating point: correct answers flagged match, unknown products flagged no match."""
    labels = np.asarray(labels)
    s = scores(queries, db, db_labels)
    inside = np.isin(labels, np.unique(db_labels))
    correct = inside & (s["answer"] == labels)
    out: dict[str, Any] = {
        "in_catalog_queries": int(inside.sum()),
        "unknown_queries": int((~inside).sum()),
        "recall@1_in_catalog": float(correct[inside].mean()) if inside.any() else float("nan"),
        "auroc": {k: auroc(s[k][inside], s[k][~inside]) for k in SCORES},
        "auroc_correct_vs_unknown": {k: auroc(s[k][correct], s[k][~inside]) for k in SCORES},
    }
    if threshold is not None:
        match = s["product"] >= threshold
        out["threshold"] = float(threshold)
        out["correct_flagged_match"] = float(match[correct].mean()) if correct.any() else float("nan")
        out["in_catalog_flagged_match"] = float(match[inside].mean()) if inside.any() else float("nan")
        out["unknown_flagged_no_match"] = float((~match[~inside]).mean()) if (~inside).any() else float("nan")
        out["right_when_match"] = float(correct[match & inside].sum() / max(1, match.sum()))
    return out


__all__ = ["ENERGY_SCALE", "SCORES", "measure", "prototypes", "reference_scores", "scores"]
