"""Scores for "is this product in my catalog at all?", computed from an index's own vectors.

Each score is higher for "in the catalog"; all work on L2-normalised index vectors and their product labels, so
they apply to any index (untuned, LDA-tuned, fine-tuned). :func:`measure` compares them on photos of products the
index holds and of products it does not (AUROC), and gives the operating point at a threshold: the share of
correct answers flagged ``match`` and the share of unknown products flagged ``no match``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .ranking import l2_normalize
from .tuning import auroc, product_scores

ENERGY_SCALE = 16.0  # inverse temperature of the energy score over product prototypes


def prototypes(db: np.ndarray, db_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(products, unit-length mean vector of each product's images)."""
    products, inverse = np.unique(db_labels, return_inverse=True)
    sums = np.zeros((len(products), db.shape[1]), np.float64)
    np.add.at(sums, inverse, l2_normalize(db))
    return products, l2_normalize(sums.astype(np.float32))


def scores(queries: np.ndarray, db: np.ndarray, db_labels: np.ndarray) -> dict[str, Any]:
    """Per query: the answer (best product) and each no-match score.

    - ``product``: the best product's score as ``search()`` reports it (mean of its best three images);
    - ``prototype``: cosine to the nearest product prototype (mean vector);
    - ``energy``: ``logsumexp(s * cos) / s`` over all prototypes (high when one or more are close);
    - ``margin``: best product score minus the second best (a confident, unambiguous answer).
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
    return {
        "answer": products[order[:, 0]],
        "product": best,
        "prototype": cos.max(axis=1),
        "energy": energy,
        "margin": best - second,
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
        "auroc": {k: auroc(s[k][inside], s[k][~inside]) for k in ("product", "prototype", "energy", "margin")},
        "auroc_correct_vs_unknown": {
            k: auroc(s[k][correct], s[k][~inside]) for k in ("product", "prototype", "energy", "margin")
        },
    }
    if threshold is not None:
        match = s["product"] >= threshold
        out["threshold"] = float(threshold)
        out["correct_flagged_match"] = float(match[correct].mean()) if correct.any() else float("nan")
        out["in_catalog_flagged_match"] = float(match[inside].mean()) if inside.any() else float("nan")
        out["unknown_flagged_no_match"] = float((~match[~inside]).mean()) if (~inside).any() else float("nan")
        out["right_when_match"] = float(correct[match & inside].sum() / max(1, match.sum()))
    return out


__all__ = ["ENERGY_SCALE", "measure", "prototypes", "scores"]
