"""Scores for "is this product in my catalog at all?", computed from an index's own vectors.

Each score is higher for "in the catalog"; all work on L2-normalised index vectors and their product labels, so
they apply to any index (untuned, LDA-tuned, fine-tuned). :func:`measure` compares them on photos of products the
index holds and of products it does not (AUROC), and gives the operating point at a threshold: the share of
correct answers flagged ``match`` and the share of unknown products flagged ``no match``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .ranking import PRODUCT_TOP, l2_normalize
from .tuning import NO_MATCH_QUANTILE, auroc, holdout_split, product_scores

ENERGY_SCALE = 16.0  # inverse temperature of the energy score over product prototypes
# fits a transform on (vectors, labels) of the visible products; returns it (vectors -> index vectors)
Refit = Callable[[np.ndarray, np.ndarray], Callable[[np.ndarray], np.ndarray]]
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


def _operating_point(score: np.ndarray, threshold: float, correct: np.ndarray, inside: np.ndarray) -> dict[str, float]:
    match = score >= threshold
    return {
        "threshold": float(threshold),
        "correct_flagged_match": float(match[correct].mean()) if correct.any() else float("nan"),
        "in_catalog_flagged_match": float(match[inside].mean()) if inside.any() else float("nan"),
        "unknown_flagged_no_match": float((~match[~inside]).mean()) if (~inside).any() else float("nan"),
        "right_when_match": float(correct[match & inside].sum() / max(1, match.sum())),
    }


def measure(
    queries: np.ndarray,
    labels: np.ndarray,
    db: np.ndarray,
    db_labels: np.ndarray,
    threshold: float | None = None,
    calibration: Calibration | None = None,
) -> dict[str, Any]:
    """AUROC of each score (query products in the index vs not), and with ``threshold`` on the ``product`` score the
    operating point: correct answers flagged match, unknown products flagged no match. With a ``calibration``
    (:func:`calibrate`) also the ``combined`` score, and every score's operating point at its calibrated
    threshold (``calibrated``)."""
    labels = np.asarray(labels)
    s = scores(queries, db, db_labels)
    names = list(SCORES)
    if calibration is not None:
        s["combined"] = calibration.combine(s)
        names.append("combined")
    inside = np.isin(labels, np.unique(db_labels))
    correct = inside & (s["answer"] == labels)
    out: dict[str, Any] = {
        "in_catalog_queries": int(inside.sum()),
        "unknown_queries": int((~inside).sum()),
        "recall@1_in_catalog": float(correct[inside].mean()) if inside.any() else float("nan"),
        "auroc": {k: auroc(s[k][inside], s[k][~inside]) for k in names},
        "auroc_correct_vs_unknown": {k: auroc(s[k][correct], s[k][~inside]) for k in names},
    }
    if threshold is not None:
        out.update(_operating_point(s["product"], threshold, correct, inside))
    if calibration is not None:
        out["calibrated"] = {
            k: _operating_point(s[k], t, correct, inside) for k, t in calibration.thresholds.items() if k in names
        }
        out["calibration"] = calibration.info
    return out


@dataclass(frozen=True)
class Calibration:
    """Per-score thresholds and a logistic combination of the scores, learnt on hidden catalog groups."""

    thresholds: dict[str, float]
    mean: np.ndarray
    std: np.ndarray
    weights: np.ndarray
    bias: float
    info: dict[str, Any] = field(default_factory=dict)

    def combine(self, s: dict[str, np.ndarray]) -> np.ndarray:
        """The combined score (log-odds of "in the catalog") of :func:`scores`' output."""
        x = np.stack([np.asarray(s[k], np.float64) for k in SCORES], axis=1)
        return ((x - self.mean) / self.std) @ self.weights + self.bias


def hidden_group_scores(
    db: np.ndarray, db_labels: np.ndarray, folds: int = 4, seed: int = 0, refit: Refit | None = None
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """:func:`scores` of held-out catalog photos of visible products (positives) and of hidden products (negatives),
    as the build's threshold calibration (:func:`lookalike.tuning.calibrate_no_match`) splits them: products in
    ``folds`` seeded groups, each hidden in turn; the index is the rest without its held-out photos.

    Without ``refit`` the vectors are used as given; a projection fitted on every product has seen the hidden ones,
    so pass raw vectors and ``refit(x, labels)`` returning the transform fitted without them (as the build does when
    tuning is on)."""
    labels = np.asarray(db_labels)
    products = np.unique(labels)
    rng = np.random.default_rng(seed)
    group = {p: i % folds for i, p in enumerate(rng.permutation(products))}
    fold_of = np.array([group[label] for label in labels])
    held = holdout_split(labels)
    pos: dict[str, list] = {k: [] for k in SCORES}
    neg: dict[str, list] = {k: [] for k in SCORES}
    for f in range(folds):
        visible = fold_of != f
        db_rows = visible & ~held
        if len(np.unique(labels[db_rows])) < 2:
            continue
        transform = (lambda x: x) if refit is None else refit(db[db_rows], labels[db_rows])
        index = transform(db[db_rows])
        for rows, out in ((visible & held, pos), (~visible & held, neg)):
            if rows.any():
                sc = scores(transform(db[rows]), index, labels[db_rows])
                for k in SCORES:
                    out[k].append(sc[k])
    if not pos["product"] or not neg["product"]:
        raise ValueError("too few products or photos to calibrate no-match scores on hidden catalog groups")
    return {k: np.concatenate(v) for k, v in pos.items()}, {k: np.concatenate(v) for k, v in neg.items()}


def _logistic(x: np.ndarray, y: np.ndarray, l2: float = 1.0, steps: int = 50) -> tuple[np.ndarray, float]:
    """L2-regularised logistic regression by Newton's method (a handful of standardised features)."""
    a = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    w = np.zeros(a.shape[1])
    reg = np.full(a.shape[1], l2)
    reg[-1] = 0.0
    for _ in range(steps):
        p = 1 / (1 + np.exp(-(a @ w)))
        grad = a.T @ (p - y) + reg * w
        hess = (a * (p * (1 - p))[:, None]).T @ a + np.diag(reg) + 1e-9 * np.eye(len(w))
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return w[:-1], float(w[-1])


def calibrate(
    db: np.ndarray, db_labels: np.ndarray, folds: int = 4, seed: int = 0, refit: Refit | None = None
) -> Calibration:
    """Thresholds for every score (the NO_MATCH_QUANTILE quantile of the hidden products' scores, the build's rule)
    and a logistic combination of the scores fitted to tell held-out photos of visible products from photos of
    hidden ones, with its own threshold by the same rule. ``refit``: see :func:`hidden_group_scores`."""
    pos, neg = hidden_group_scores(db, db_labels, folds, seed, refit)
    x = np.concatenate([np.stack([pos[k] for k in SCORES], 1), np.stack([neg[k] for k in SCORES], 1)]).astype(float)
    y = np.concatenate([np.ones(len(pos["product"])), np.zeros(len(neg["product"]))])
    mean, std = x.mean(axis=0), x.std(axis=0) + 1e-9
    weights, bias = _logistic((x - mean) / std, y)
    comb = Calibration({}, mean, std, weights, bias)
    neg_comb = comb.combine(neg)
    thresholds = {k: float(np.quantile(neg[k], NO_MATCH_QUANTILE)) for k in SCORES}
    thresholds["combined"] = float(np.quantile(neg_comb, NO_MATCH_QUANTILE))
    info = {
        "positives": int(len(pos["product"])),
        "negatives": int(len(neg["product"])),
        "weights": dict(zip(SCORES, np.round(weights, 4).tolist(), strict=True)),
        "auroc_on_catalog": {k: auroc(pos[k], neg[k]) for k in SCORES}
        | {"combined": auroc(comb.combine(pos), neg_comb)},
    }
    return Calibration(thresholds, mean, std, weights, bias, info)


__all__ = [
    "ENERGY_SCALE",
    "SCORES",
    "Calibration",
    "calibrate",
    "hidden_group_scores",
    "measure",
    "prototypes",
    "reference_scores",
    "scores",
]
