"""Learning from the catalog: its folders are labels.

- :func:`fit_projection` fits a linear projection on top of the frozen backbone (LDA: whiten the
  within-product scatter, keep the directions that separate products), chooses its shrinkage on catalog
  images held out from the fit, and declines with a reason when the catalog is too small or tuning does not
  beat the untuned features on those held-out images.
- :func:`calibrate_no_match` finds the similarity under which a query is answered "no match", by hiding
  groups of catalog products and scoring their photos against the rest.

Both look at catalog images only; query photos are never used.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .ranking import PRODUCT_TOP, average_precision_at_r, l2_normalize, product_scores  # noqa: F401 - PRODUCT_TOP kept importable
from .settings import TUNE_FINETUNE

logger = logging.getLogger(__name__)

MIN_PRODUCTS = 5  # products with at least MIN_IMAGES_PER_PRODUCT images
MIN_IMAGES_PER_PRODUCT = 3
# Shrinkage of the within-product scatter towards its mean variance. Held-out catalog images are too close to
# the fitted ones to choose it from (they always favour the least shrinkage); 0.1 lies in the flat optimum that
# real query photos showed between 0.03 and 0.3 (docs/quality.md).
SHRINKAGE = 0.1
HOLDOUT_FRACTION = 0.25
# A metric's change on the held-out photos counts as more than chance when its paired z statistic passes this
# (one-sided 5 %): see :func:`compare`.
Z_NOISE = 1.645
# "No match" threshold: the median product score of photos of products the index does not hold. Calibrated on
# hidden catalog products only: held-out images of visible products sit much closer to their catalog neighbours
# than a shopper's photo does, so they would push the threshold far too high. Catalog photos also score higher
# among themselves than new photos do, which is why the median, not a high quantile (docs/quality.md).
NO_MATCH_QUANTILE = 0.5
# The ensemble's threshold (tune: finetune) comes from products its calibration run never learnt, which score like a
# shopper's unknown product; a shopper's photo of a known product scores lower than the catalog's own held-out
# photos, though. At the median of the never-learnt products' scores 86 % of the right answers to the Grocery dev
# queries were flagged match; at the lower quartile 93 %, with 40 % of unknown products' photos flagged no match
# (chosen on those queries, the target being >= 90 % of right answers; docs/quality.md).
ENSEMBLE_NO_MATCH_QUANTILE = 0.25
# The fine-tuned embedding in an ensemble index keeps this many leading directions, or one a product when the catalog
# has more products (tuning.fit_ensemble).
ENSEMBLE_TUNED_DIMS = 128
# Validation and calibration compare every held-out photo with every catalog photo of the products they look at;
# on a large catalog a seeded sample of this many products keeps that to seconds and bounded memory.
MAX_CHECK_PRODUCTS = 400


class TuningDeclined(ValueError):
    """The catalog cannot support a tuned projection; the message says why."""


@dataclass
class Projection:
    """``y = (x - mean) @ matrix``, applied to raw feature vectors (embedding + auxiliary features).

    ``blocks`` (output column counts, summing to ``dim``; None: one block) split ``y`` into parts that are each
    L2-normalised and weighted equally: an ensemble's cosine is then the mean of its parts' cosines
    (:func:`fit_ensemble`)."""

    mean: np.ndarray  # (raw_dim,)
    matrix: np.ndarray  # (raw_dim, dim)
    info: dict[str, Any] = field(default_factory=dict)
    blocks: tuple[int, ...] | None = None

    @property
    def dim(self) -> int:
        return int(self.matrix.shape[1])

    @property
    def raw_dim(self) -> int:
        return int(self.matrix.shape[0])

    def apply(self, raw: np.ndarray) -> np.ndarray:
        raw = np.atleast_2d(np.asarray(raw, dtype=np.float32))
        if raw.shape[1] != self.raw_dim:
            raise ValueError(f"projection expects {self.raw_dim}-d raw vectors, got {raw.shape[1]}-d")
        y = (raw - self.mean) @ self.matrix
        if self.blocks:
            edges = np.cumsum((0, *self.blocks))
            parts = [l2_normalize(y[:, a:b]) for a, b in zip(edges[:-1], edges[1:])]
            y = np.hstack(parts) / np.sqrt(len(parts))
        return np.ascontiguousarray(y, dtype=np.float32)

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        arrays = {"mean": self.mean.astype(np.float32), "matrix": self.matrix.astype(np.float32)}
        if self.blocks:
            arrays["blocks"] = np.asarray(self.blocks, dtype=np.int64)
        np.savez(buf, **arrays)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, info: dict[str, Any] | None = None) -> Projection:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            blocks = tuple(int(b) for b in z["blocks"]) if "blocks" in z.files else None
            return cls(z["mean"], z["matrix"], dict(info or {}), blocks)


@dataclass(frozen=True)
class Ensemble:
    """The raw layout of a fine-tuned tail ensemble (:class:`lookalike.nets.TailEnsembleMaps`) and what its fine-tune
    measured: raw = [tuned main x tails, base main, tuned aux x tails, base aux], ``dim`` and ``aux`` values each."""

    dim: int
    aux: int
    tails: int = 1
    calibration: dict[str, Any] | None = None  # the fine-tune's no-match threshold, on products it never learnt

    def tuned_columns(self, i: int) -> np.ndarray:
        """Tuned tail ``i``'s embedding inside the raw vector."""
        return np.arange(i * self.dim, (i + 1) * self.dim)

    def base_columns(self) -> np.ndarray:
        """The base model's own raw vector (main then aux) inside the raw vector."""
        d, a, t = self.dim, self.aux, self.tails
        main, aux = t * d, (t + 1) * d + t * a
        return np.r_[main : main + d, aux : aux + a]

    @property
    def raw_dim(self) -> int:
        return (self.tails + 1) * (self.dim + self.aux)


def fit_ensemble(raw: np.ndarray, labels: np.ndarray, ensemble: Ensemble) -> Projection:
    """The projection of a fine-tuned tail ensemble's index: the fine-tuned embedding(s) and the LDA of the base
    model's raw vector, each normalised, so that the index compares the mean of their cosines.

    The two disagree where it helps: the fine-tuned embedding tells apart the catalog's look-alikes, the base
    model's LDA keeps what ImageNet features know about a new shot of a product (on the Grocery dev queries the
    mean beat either alone at three training seeds; docs/quality.md). Raises :class:`TuningDeclined` when the
    catalog cannot support the LDA (the index then uses the fine-tuned embedding alone)."""
    labels = np.asarray(labels)
    if eligible(labels) < MIN_PRODUCTS:
        raise TuningDeclined(
            f"the catalog has {eligible(labels)} products with at least {MIN_IMAGES_PER_PRODUCT} images; the "
            f"ensemble's LDA needs {MIN_PRODUCTS} or more"
        )
    if raw.shape[1] != ensemble.raw_dim:
        raise ValueError(f"this tail ensemble's raw vectors have {ensemble.raw_dim} values, got {raw.shape[1]}")
    cols = ensemble.base_columns()
    base_mean, base_matrix = lda(raw[:, cols], labels, SHRINKAGE)
    k = base_matrix.shape[1]
    # Each fine-tuned embedding keeps its leading directions (uncentred: its cosines are of uncentred vectors);
    # trained against one proxy a product, it lives in about that many, so this costs nothing and keeps the
    # index small (docs/quality.md: 1280 -> 128 dims on Grocery moved Recall@1 by -0.007 to +0.014).
    kept = min(ensemble.dim, max(ENSEMBLE_TUNED_DIMS, len(np.unique(labels))))
    blocks = [uncentred_basis(raw[:, ensemble.tuned_columns(i)], kept) for i in range(ensemble.tails)]
    width = sum(b.shape[1] for b in blocks)
    mean = np.zeros(ensemble.raw_dim, np.float32)
    mean[cols] = base_mean
    matrix = np.zeros((ensemble.raw_dim, width + k), np.float32)
    start = 0
    for i, basis in enumerate(blocks):  # the tuned embeddings come first in both
        matrix[ensemble.tuned_columns(i), start : start + basis.shape[1]] = basis
        start += basis.shape[1]
    matrix[cols, width:] = base_matrix
    info = {
        "method": "ensemble",
        "parts": ["fine-tuned embedding"] * ensemble.tails + ["LDA of the base model"],
        "shrinkage": SHRINKAGE,
        "dim": width + k,
        "products": len(np.unique(labels)),
        "images": len(labels),
    }
    logger.info("ensemble projection: %d fine-tuned x %d dims + base LDA %d dims", ensemble.tails, kept, k)
    return Projection(mean, matrix, info, blocks=tuple(b.shape[1] for b in blocks) + (k,))


def uncentred_basis(x: np.ndarray, k: int, *, max_rows: int = 50_000, seed: int = 0) -> np.ndarray:
    """(d, <= k) float32: the ``k`` leading right singular vectors of ``x`` (not centred), from a seeded sample of
    at most ``max_rows`` rows; projecting on them keeps the dot products ``x`` has with itself, up to the rest."""
    rows = np.arange(len(x))
    if len(x) > max_rows:
        rows = np.sort(np.random.default_rng(seed).choice(len(x), max_rows, replace=False))
    gram = np.zeros((x.shape[1], x.shape[1]))
    for start in range(0, len(rows), 4096):  # float64 sums, a chunk at a time: bounded memory on a large catalog
        chunk = np.asarray(x[rows[start : start + 4096]], dtype=np.float64)
        gram += chunk.T @ chunk
    eigval, eigvec = np.linalg.eigh(gram)
    order = np.argsort(eigval)[::-1][: min(k, x.shape[1])]
    return eigvec[:, order].astype(np.float32)


def lda(x: np.ndarray, labels: np.ndarray, shrinkage: float) -> tuple[np.ndarray, np.ndarray]:
    """(mean, matrix) of regularised LDA: within-product whitening, then the between-product directions."""
    x = np.asarray(x, dtype=np.float64)
    mean = x.mean(axis=0)
    centered = x - mean
    dim = x.shape[1]
    classes, inverse = np.unique(labels, return_inverse=True)
    class_means = np.zeros((len(classes), dim))
    np.add.at(class_means, inverse, centered)
    class_means /= np.bincount(inverse)[:, None]
    within = centered - class_means[inverse]
    scatter = within.T @ within / len(x)
    scatter += shrinkage * np.trace(scatter) / dim * np.eye(dim)
    eigval, eigvec = np.linalg.eigh(scatter)
    whiten = eigvec / np.sqrt(np.maximum(eigval, 1e-12))
    between = class_means @ whiten
    _, _, vt = np.linalg.svd(between - between.mean(axis=0), full_matrices=False)
    keep = min(len(classes) - 1, dim)
    return mean.astype(np.float32), (whiten @ vt[:keep].T).astype(np.float32)


def holdout_split(labels: np.ndarray) -> np.ndarray:
    """A mask of held-out rows: the last quarter of each product's images (in catalog order), for products
    with at least MIN_IMAGES_PER_PRODUCT images. Photos are often shot in sequence, so the last ones resemble
    the first ones less than a random draw would."""
    held = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):
        rows = np.flatnonzero(labels == label)
        if len(rows) >= MIN_IMAGES_PER_PRODUCT:
            n = max(1, int(round(len(rows) * HOLDOUT_FRACTION)))
            held[rows[-n:]] = True
    return held


def _holdout_per_query(db: np.ndarray, db_labels: np.ndarray, queries: np.ndarray, labels: np.ndarray):
    """(product answer right?, image AP@R) of each query against ``db``, products scored as ``search()`` does."""
    sims = l2_normalize(queries) @ l2_normalize(db).T
    products, scores = product_scores(sims, db_labels)
    correct = products[scores.argmax(axis=1)] == labels
    order = np.argsort(-sims, axis=1)
    ap = []
    for i, label in enumerate(labels):
        r = int(np.sum(db_labels == label))
        ap.append(average_precision_at_r(db_labels[order[i, :r]].tolist(), label, r))
    return correct.astype(np.float64), np.array(ap, dtype=np.float64)


def _summary(correct: np.ndarray, ap: np.ndarray) -> dict:
    return {"product_recall@1": float(np.mean(correct)), "map@r": float(np.mean(ap)), "queries": len(correct)}


def _holdout_quality(db: np.ndarray, db_labels: np.ndarray, queries: np.ndarray, labels: np.ndarray) -> dict:
    return _summary(*_holdout_per_query(db, db_labels, queries, labels))


def holdout_quality(db: np.ndarray, db_labels: np.ndarray, queries: np.ndarray, labels: np.ndarray) -> dict:
    """Product Recall@1 (products scored as ``search()`` does) and image MAP@R of ``queries`` against ``db``; what
    fine-tuning (:mod:`lookalike.finetune`) and the doctor compare against."""
    return _holdout_quality(db, db_labels, queries, labels)


def product_sample(labels: np.ndarray, limit: int | None = None, seed: int = 0) -> np.ndarray:
    """A mask of the rows of at most ``limit`` (default MAX_CHECK_PRODUCTS) products, all of them when there are
    fewer, chosen seeded."""
    limit = MAX_CHECK_PRODUCTS if limit is None else limit
    products = np.unique(labels)
    if len(products) <= limit:
        return np.ones(len(labels), dtype=bool)
    chosen = np.random.default_rng(seed).choice(products, limit, replace=False)
    return np.isin(labels, chosen)


def eligible(labels: np.ndarray) -> int:
    _, counts = np.unique(labels, return_counts=True)
    return int(np.sum(counts >= MIN_IMAGES_PER_PRODUCT))


def paired_z(before: np.ndarray, after: np.ndarray) -> float:
    """The paired z statistic of ``after - before`` over the same queries: mean difference / its standard error.

    For 0/1 outcomes (an answer right or not) it is McNemar's test up to the small-sample correction: queries
    fixed minus queries broken, over the square root of the queries that changed. 0 when nothing changed;
    +/- infinity when every query changed by the same amount."""
    d = np.asarray(after, np.float64) - np.asarray(before, np.float64)
    if len(d) < 2 or not np.any(d):
        return 0.0
    sem = float(np.std(d, ddof=1)) / np.sqrt(len(d))
    mean = float(np.mean(d))
    if sem == 0.0:
        return float(np.copysign(np.inf, mean))
    return mean / sem


def compare(
    before: tuple[np.ndarray, np.ndarray], after: tuple[np.ndarray, np.ndarray], *, lenient: bool = False
) -> dict[str, Any]:
    """Whether features ``after`` beat ``before`` on the same held-out queries ((right?, AP@R) per query each).

    Accepted when no metric drops; or when the metrics that drop do so within noise (paired z above -Z_NOISE:
    the held-out set cannot tell the loss from chance) while another gains clearly (paired z at least Z_NOISE).
    So a projection that lifts MAP@R from 0.88 to 0.98 while two of 656 answers flip is kept, and one that
    loses answers beyond chance is not, whatever it does to MAP@R. ``lenient``: accepted unless a metric drops
    beyond chance (a projection on fine-tuned features, see :func:`adapt`)."""
    z = {"recall@1": paired_z(before[0], after[0]), "map@r": paired_z(before[1], after[1])}
    delta = {"recall@1": float(np.mean(after[0]) - np.mean(before[0])), "map@r": float(np.mean(after[1] - before[1]))}
    dropped = [m for m in z if delta[m] < 0]
    if not dropped:
        accept, why = True, "no metric dropped"
    elif any(z[m] <= -Z_NOISE for m in dropped):
        accept, why = False, " and ".join(f"{m} dropped beyond chance (z {z[m]:.2f})" for m in dropped)
    elif lenient:
        accept, why = True, f"{', '.join(dropped)} dropped within chance; kept on fine-tuned features"
    elif any(z[m] >= Z_NOISE for m in z if m not in dropped):
        gained = next(m for m in z if m not in dropped and z[m] >= Z_NOISE)
        accept, why = True, f"{gained} gained clearly (z {z[gained]:.2f}); {', '.join(dropped)} dropped within chance"
    else:
        accept, why = False, f"{', '.join(dropped)} dropped and nothing gained clearly"
    return {"accept": accept, "why": why, "z": z, "delta": delta, "z_noise": Z_NOISE}


def fit_projection(raw: np.ndarray, labels: np.ndarray, dim: int, *, lenient: bool = False) -> Projection:
    """Fit the catalog projection on raw vectors (rows in catalog order) and their product labels.

    ``dim`` is the length of the untuned embedding at the start of each raw vector, the baseline to beat
    (``lenient``: see :func:`compare`). Raises :class:`TuningDeclined` with the reason when the catalog cannot
    support it.
    """
    labels = np.asarray(labels)
    n_products = len(np.unique(labels))
    if eligible(labels) < MIN_PRODUCTS:
        raise TuningDeclined(
            f"the catalog has {eligible(labels)} products with at least {MIN_IMAGES_PER_PRODUCT} images; "
            f"tuning needs {MIN_PRODUCTS} or more to learn what tells products apart"
        )
    held = holdout_split(labels)
    mean, matrix = lda(raw[~held], labels[~held], SHRINKAGE)
    checked = product_sample(labels)
    db_rows, val_rows = ~held & checked, held & checked
    before = _holdout_per_query(raw[db_rows, :dim], labels[db_rows], raw[val_rows, :dim], labels[val_rows])
    db, q = (raw[db_rows] - mean) @ matrix, (raw[val_rows] - mean) @ matrix
    after = _holdout_per_query(db, labels[db_rows], q, labels[val_rows])
    baseline, tuned = _summary(*before), _summary(*after)
    decision = compare(before, after, lenient=lenient)
    if not decision["accept"]:
        raise TuningDeclined(
            f"on held-out catalog images tuning scored recall@1 {tuned['product_recall@1']:.3f} / "
            f"MAP@R {tuned['map@r']:.3f} against {baseline['product_recall@1']:.3f} / {baseline['map@r']:.3f} "
            f"untuned ({decision['why']}); keeping the untuned features"
        )
    mean, matrix = lda(raw, labels, SHRINKAGE)  # the final fit sees every catalog image
    info = {
        "method": "lda",
        "shrinkage": SHRINKAGE,
        "dim": int(matrix.shape[1]),
        "products": n_products,
        "images": len(labels),
        "validation": {"untuned": baseline, "tuned": tuned, "decision": decision},
    }
    logger.info(
        "tuned projection: %d -> %d dims; held-out recall@1 %.3f -> %.3f, MAP@R %.3f -> %.3f",
        raw.shape[1], matrix.shape[1], baseline["product_recall@1"], tuned["product_recall@1"],
        baseline["map@r"], tuned["map@r"],
    )  # fmt: skip
    return Projection(mean, matrix, info)


def calibrate_no_match(
    raw: np.ndarray,
    labels: np.ndarray,
    dim: int,
    *,
    tuned: bool,
    folds: int = 4,
    seed: int = 0,
    ensemble: Ensemble | None = None,
) -> dict[str, Any] | None:
    """The product-score threshold under which a query is "not in my catalog", or None if the catalog is too small.

    Products are split into ``folds`` groups; each group in turn is hidden, the rest (with a projection refitted
    without the hidden group when ``tuned``) forms a catalog, and photos of the hidden products (should not
    match) and held-out photos of the visible ones (should) are scored against it. The threshold is the
    NO_MATCH_QUANTILE quantile of the hidden products' scores; the visible ones' scores are only reported.
    ``image_threshold`` is the same rule applied to the best single image similarity, the score an image-level
    hit (``search(..., by_product=False)``) reports: it sits higher than the product threshold, since a product's
    score averages its best three images.
    """
    checked = product_sample(np.asarray(labels), seed=seed)
    raw, labels = raw[checked], np.asarray(labels)[checked]
    products = np.unique(labels)
    if eligible(labels) < max(MIN_PRODUCTS, folds):
        return None
    rng = np.random.default_rng(seed)
    group = {p: i % folds for i, p in enumerate(rng.permutation(products))}
    fold_of = np.array([group[label] for label in labels])
    held = holdout_split(labels)
    pos, neg, pos_image, neg_image = [], [], [], []
    for f in range(folds):
        visible = fold_of != f
        db_rows = visible & ~held
        if ensemble is not None:  # the ensemble's projection, refitted without the hidden group
            try:
                transform = fit_ensemble(raw[db_rows], labels[db_rows], ensemble).apply
            except (np.linalg.LinAlgError, TuningDeclined):
                continue
        elif tuned:
            try:
                mean, matrix = lda(raw[db_rows], labels[db_rows], SHRINKAGE)
            except np.linalg.LinAlgError:
                continue
            transform = lambda x, mean=mean, matrix=matrix: (x - mean) @ matrix
        else:
            transform = lambda x: x[:, :dim]
        db = l2_normalize(transform(raw[db_rows]))
        for rows, out, out_image in ((visible & held, pos, pos_image), (~visible & held, neg, neg_image)):
            if rows.any():
                best, best_image = _best_scores(db, labels[db_rows], transform(raw[rows]))
                out.append(best)
                out_image.append(best_image)
    if not pos or not neg:
        return None
    record = _calibration_record(
        np.concatenate(pos), np.concatenate(neg), np.concatenate(pos_image), np.concatenate(neg_image),
        NO_MATCH_QUANTILE,
    )  # fmt: skip
    return {**record, "folds": folds}


def _best_scores(db: np.ndarray, db_labels: np.ndarray, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(best product score, best single image similarity) of ``queries`` against the normalised catalog ``db``: what
    a product result and an image-level hit would report."""
    sims = l2_normalize(queries) @ db.T
    _, scores = product_scores(sims, db_labels)
    return scores.max(axis=1), sims.max(axis=1)


def _calibration_record(pos, neg, pos_image, neg_image, quantile: float) -> dict[str, Any]:
    """The thresholds at ``quantile`` of the should-not-match scores, and how the should-match ones fare."""
    threshold = float(np.quantile(neg, quantile))
    image_threshold = float(np.quantile(neg_image, quantile))
    return {
        "threshold": threshold,
        "quantile": quantile,
        "held_out_catalog_match_rate": float(np.mean(pos >= threshold)),
        "auroc_on_catalog": auroc(pos, neg),
        "image_threshold": image_threshold,
        "image_held_out_catalog_match_rate": float(np.mean(pos_image >= image_threshold)),
        "image_auroc_on_catalog": auroc(pos_image, neg_image),
        "in_catalog_queries": int(len(pos)),
        "hidden_product_queries": int(len(neg)),
    }


def calibrate_ensemble(raw: np.ndarray, labels: np.ndarray, unknown: np.ndarray, ensemble: Ensemble) -> dict | None:
    """The no-match thresholds of an ensemble index, from a fine-tune that never learnt the ``unknown`` products
    (a row mask): their photos (all of them) should not match a catalog of the other products' fitted photos,
    held-out photos of those should. The record of :func:`calibrate_no_match` (whose hidden groups a fine-tune on
    the whole catalog has learnt, which puts its threshold far too low), at ENSEMBLE_NO_MATCH_QUANTILE."""
    labels = np.asarray(labels)
    held = holdout_split(labels)
    db_rows, pos_rows = ~unknown & ~held, ~unknown & held
    if eligible(labels[db_rows]) < MIN_PRODUCTS or not pos_rows.any() or not unknown.any():
        return None
    projection = fit_ensemble(raw[db_rows], labels[db_rows], ensemble)
    db = l2_normalize(projection.apply(raw[db_rows]))
    pos, pos_image = _best_scores(db, labels[db_rows], projection.apply(raw[pos_rows]))
    neg, neg_image = _best_scores(db, labels[db_rows], projection.apply(raw[unknown]))
    return {
        **_calibration_record(pos, neg, pos_image, neg_image, ENSEMBLE_NO_MATCH_QUANTILE),
        "hidden_products": int(len(np.unique(labels[unknown]))),
        "folds": 1,
        # the score distributions behind the threshold: another operating point is one quantile away
        "hidden_score_quantiles": _quantiles(neg),
        "held_out_score_quantiles": _quantiles(pos),
    }


def _quantiles(scores: np.ndarray) -> dict[str, float]:
    return {f"{q:.2f}": float(np.quantile(scores, q)) for q in np.arange(0.05, 1.0, 0.05)}


def ensemble_raw(tuned: list[np.ndarray], base: np.ndarray, dim: int) -> np.ndarray:
    """A tail ensemble's raw vectors (:class:`Ensemble`'s layout) from its networks' own raw vectors."""
    return np.hstack([t[:, :dim] for t in tuned] + [base[:, :dim]] + [t[:, dim:] for t in tuned] + [base[:, dim:]])


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """Area under the ROC curve: the chance that a random positive scores above a random negative (ties half)."""
    positive, negative = np.asarray(positive, float), np.asarray(negative, float)
    if not len(positive) or not len(negative):
        return float("nan")
    scores = np.concatenate([positive, negative])
    order = scores.argsort(kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts - 1) / 2 + 1
    ranks[order] = np.repeat(avg, counts)
    u = ranks[: len(positive)].sum() - len(positive) * (len(positive) + 1) / 2
    return float(u / (len(positive) * len(negative)))


@dataclass(frozen=True)
class Adaptation:
    """How raw features become index vectors for one index: a catalog projection (tuning) or not, plus the
    calibrated "no match" threshold. Travels with the index (its manifest); add/remove keep it."""

    projection: Projection | None = None
    tuning: dict[str, Any] = field(default_factory=lambda: {"status": "off"})
    calibration: dict[str, Any] | None = None

    def transform(self, raw: np.ndarray, dim: int) -> np.ndarray:
        raw = np.atleast_2d(raw)
        return self.projection.apply(raw) if self.projection is not None else np.ascontiguousarray(raw[:, :dim])

    @property
    def threshold(self) -> float | None:
        """The product score under which a product result is "no match" (None: not calibrated)."""
        return None if self.calibration is None else float(self.calibration["threshold"])

    @property
    def image_threshold(self) -> float | None:
        """The image similarity under which an image result is "no match" (None: not calibrated, or an index built
        before image hits were calibrated: rebuild it)."""
        value = None if self.calibration is None else self.calibration.get("image_threshold")
        return None if value is None else float(value)


def adapt(
    raw: np.ndarray, labels: np.ndarray, dim: int, *, tune: bool | str, ensemble: Ensemble | None = None
) -> Adaptation:
    """Fit what a build learns from the catalog: the tuned projection (if asked and possible) and the no-match
    thresholds. ``raw`` rows are in catalog order (sorted by product, then file name).

    ``tune`` "finetune" says ``raw`` are fine-tuned features (the caller extracted them with the fine-tuned
    weights). The projection on them is kept unless it loses beyond chance on the held-out photos: the no-match
    threshold needs it. The threshold is calibrated on hidden groups of catalog products, which must be new to the
    features that score them; the projection is refitted without each group, but the fine-tune has learnt them all,
    so without a projection the threshold comes out far too low (on Grocery, a subset of 50 produce items: 0 % of
    unknown products' photos flagged no match; docs/quality.md).

    ``ensemble`` (raw vectors of a tail ensemble, :func:`lookalike.finetuned.ensemble_for`): the projection is
    :func:`fit_ensemble`, and the threshold the one its fine-tune calibrated on products it never learnt."""
    if ensemble is not None and tune:  # (untuned, a tail ensemble's index holds its first fine-tuned embedding alone)
        return _adapt_ensemble(raw, labels, dim, ensemble)
    projection, tuning = None, {"status": "off"}
    if tune:
        try:
            projection = fit_projection(raw, labels, dim, lenient=tune == TUNE_FINETUNE)
            tuning = {"status": "tuned", **projection.info}
        except TuningDeclined as exc:
            logger.info("catalog tuning declined: %s", exc)
            tuning = {"status": "declined", "reason": str(exc)}
    calibration = calibrate_no_match(raw, labels, dim, tuned=projection is not None) if len(labels) else None
    return Adaptation(projection, tuning, calibration)


def _adapt_ensemble(raw: np.ndarray, labels: np.ndarray, dim: int, ensemble: Ensemble) -> Adaptation:
    projection, tuning = None, {"status": "off"}
    try:
        projection = fit_ensemble(raw, labels, ensemble)
        tuning = {"status": "tuned", **projection.info}
    except TuningDeclined as exc:
        logger.info("ensemble projection declined: %s; the index uses the fine-tuned embedding alone", exc)
        tuning = {"status": "declined", "reason": str(exc)}
    calibration = None
    if projection is not None and ensemble.calibration is not None:
        calibration = {**ensemble.calibration, "source": "fine-tune"}
    elif len(labels):  # hidden groups the fine-tune has learnt: a threshold biased low, the best there is
        calibration = calibrate_no_match(raw, labels, dim, tuned=False, ensemble=ensemble if projection else None)
    return Adaptation(projection, tuning, calibration)
