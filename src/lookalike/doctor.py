"""``lookalike doctor``: a health report of a catalog folder, before it is indexed.

What a shop's catalog gets wrong, and how each is found:

- **duplicates across products**: the same photo filed under two products. Exact copies share a SHA-256; re-encoded
  or resized copies share a perceptual hash (64-bit difference hash, a few bits apart at most) or an embedding
  almost identical to another product's photo.
- **likely mislabelled**: a photo that looks more like another product than its own. Every photo is scored against
  every product the way ``search()`` scores products (mean of the best three image similarities), leaving the
  photo itself out; it is flagged when another product beats its own folder by a margin. Vectors are the
  catalog-tuned ones (LDA, see :mod:`lookalike.tuning`) *cross-fitted*: the projection that scores a photo was
  fitted without it, so a mislabelled photo cannot teach the projection its wrong label.
- **outliers**: photos far less like their own product than its other photos are (robust z-score).
- **confused product pairs**: pairs whose photos most often have the other product as their nearest.
- **tiny or blurred** photos: shorter side under ``MIN_SIDE`` pixels; Laplacian variance under ``BLUR_VARIANCE``.

:func:`diagnose` returns the report as a dict (the JSON) and, given ``out_dir``, writes ``doctor.json`` and a
self-contained ``doctor.html``.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .cache import EmbeddingCache, embed_with_cache
from .catalog import CatalogImage, scan_catalog
from .doctor_report import render_html, write_report  # render_html re-exported: its old home
from .imaging import ImageError, open_image
from .ranking import l2_normalize
from .settings import Settings
from .tuning import MIN_PRODUCTS, SHRINKAGE, eligible, lda, product_scores

logger = logging.getLogger(__name__)

# Another product must beat the photo's own folder by this much (product-score units, cosine of tuned vectors)
# before the photo is called likely mislabelled. Chosen on one seeded planting of the Grocery catalog and checked
# on others (docs/quality.md): real look-alikes (potato varieties, bell peppers) stay under it.
MISLABEL_MARGIN = 0.15
# Near-duplicate rule: the same file, or perceptual hashes at most HASH_BITS of 64 bits apart AND embeddings at
# least DUPLICATE_HASH_COSINE alike (the hash alone confuses plain, similar-coloured photos; the embedding alone
# confuses sequential shots of look-alike products).
HASH_BITS = 6
DUPLICATE_HASH_COSINE = 0.90
OUTLIER_Z = 8.0  # robust z-score (median / MAD within the product) of a photo's own-product score
MIN_SIDE = 96  # pixels: shorter sides below this are too small to show a product
BLUR_VARIANCE = 20.0  # Laplacian variance of the grey image at BLUR_SIDE pixels; sharp product photos are in the 100s
BLUR_SIDE = 256
FOLDS = 5  # cross-fitting of the tuned projection
TOP_CONFUSED = 15
FORMAT = "lookalike-doctor/1"


@dataclass(frozen=True)
class PhotoFacts:
    sha256: str
    dhash: int  # 64-bit difference hash; 0 with ok False
    width: int
    height: int
    blur: float  # Laplacian variance at BLUR_SIDE
    ok: bool
    reason: str = ""


def photo_facts(path: Path, max_pixels: int) -> PhotoFacts:
    """File hash, perceptual hash, size and sharpness of one photo (``ok`` False with the reason if it cannot be
    decoded)."""
    data = Path(path).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    try:
        img = open_image(data, max_pixels).image
    except ImageError as exc:
        return PhotoFacts(digest, 0, 0, 0, 0.0, False, exc.reason)
    grey = img.convert("L")
    return PhotoFacts(digest, dhash(grey), img.width, img.height, laplacian_variance(grey), True)


def dhash(grey: Image.Image) -> int:
    """Difference hash: 8x8 signs of horizontal brightness steps on a 9x8 thumbnail. Survives re-encoding and
    resizing; changes with crops and edits."""
    small = np.asarray(grey.resize((9, 8), Image.Resampling.LANCZOS), dtype=np.int16)
    bits = (small[:, 1:] > small[:, :-1]).ravel()
    return int(sum(1 << i for i, b in enumerate(bits) if b))


def laplacian_variance(grey: Image.Image) -> float:
    """Variance of the 4-neighbour Laplacian at a fixed scale (longer side BLUR_SIDE): low means no edges (blur)."""
    img = grey.copy()
    img.thumbnail((BLUR_SIDE, BLUR_SIDE), Image.Resampling.BILINEAR)
    a = np.asarray(img, dtype=np.float32)
    if a.shape[0] < 3 or a.shape[1] < 3:
        return 0.0
    lap = a[1:-1, :-2] + a[1:-1, 2:] + a[:-2, 1:-1] + a[2:, 1:-1] - 4 * a[1:-1, 1:-1]
    return float(lap.var())


def hamming(a: np.ndarray, b: int) -> np.ndarray:
    """Bits that differ between each hash of ``a`` (uint64) and ``b``."""
    x = np.bitwise_xor(a, np.uint64(b))
    return np.array([int(v).bit_count() for v in x], dtype=np.int32)


def cross_fitted_vectors(raw: np.ndarray, labels: np.ndarray, dim: int, folds: int = FOLDS, seed: int = 0):
    """(list of (rows scored, vectors of every photo)) for each fold: the catalog-tuned space in which the photos
    of ``rows`` are scored was fitted without them. Falls back to the untuned embedding (one fold, all rows) when
    the catalog is too small to tune."""
    n = len(labels)
    if eligible(labels) < MIN_PRODUCTS or n < 2 * folds:
        return [(np.arange(n), l2_normalize(raw[:, :dim]))], "untuned"
    fold_of = np.random.default_rng(seed).permutation(n) % folds
    out = []
    for f in range(folds):
        fit = fold_of != f
        mean, matrix = lda(raw[fit], labels[fit], SHRINKAGE)
        out.append((np.flatnonzero(~fit), l2_normalize((raw - mean) @ matrix)))
    return out, "lda-cross-fitted"


def leave_one_out_scores(spaces, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(products, scores (n, products), own product column of each photo): product scores of every photo with the
    photo itself left out, in the space fitted without it."""
    n = len(labels)
    products = np.unique(labels)
    scores = np.zeros((n, len(products)), np.float32)
    for rows, vectors in spaces:
        for start in range(0, len(rows), 256):
            chunk = rows[start : start + 256]
            sims = vectors[chunk] @ vectors.T
            sims[np.arange(len(chunk)), chunk] = -np.inf  # leave the photo itself out
            _, s = product_scores(sims, labels)
            scores[chunk] = s
    scores[~np.isfinite(scores)] = -1.0  # a product whose only photo is this one
    return products, scores, np.searchsorted(products, labels)


def diagnose(
    settings: Settings,
    *,
    data_dir: str | Path | None = None,
    out_dir: str | Path | None = None,
    extractor=None,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Check the catalog at ``data_dir`` (default: the settings' ``data_dir``) and return the report.

    Vectors come from the settings' model through the same embedding cache as ``build_index`` (a later build reuses
    them). With ``out_dir``, ``doctor.json`` and ``doctor.html`` are written there (atomically).
    """
    from .embedding import FeatureExtractor

    start = time.perf_counter()
    root = Path(data_dir if data_dir is not None else settings.data_dir).expanduser().resolve()
    images = scan_catalog(root)
    extractor = extractor if extractor is not None else FeatureExtractor(settings)
    cache = EmbeddingCache.for_catalog(settings.cache_dir, extractor.fingerprint, root)
    embedded = embed_with_cache(extractor, images, cache, progress=progress)
    raw, errors = embedded.vectors, embedded.errors
    facts = [photo_facts(im.path, settings.max_image_pixels) for im in images]
    unreadable = [
        {"path": _rel(images[i], root), "reason": reason}
        for i, reason in sorted(errors.items())
    ]  # fmt: skip
    good = np.array([i for i in range(len(images)) if i not in errors and facts[i].ok], dtype=int)
    imgs = [images[i] for i in good]
    raw = raw[good]
    facts = [facts[i] for i in good]
    labels = np.array([im.product_id for im in imgs], dtype=object)
    rel = [_rel(im, root) for im in imgs]
    emb = l2_normalize(raw[:, : extractor.dim])

    duplicates = _duplicates(emb, facts, labels, rel)
    dup_rows = {r for d in duplicates for r in (d["a"]["row"], d["b"]["row"])}
    spaces, space = cross_fitted_vectors(raw, labels, extractor.dim)
    products, scores, own = leave_one_out_scores(spaces, labels)
    mislabelled, outliers, confused = _label_checks(products, scores, own, labels, rel, dup_rows)
    tiny = [
        {"path": rel[i], "product_id": labels[i], "width": f.width, "height": f.height}
        for i, f in enumerate(facts)
        if min(f.width, f.height) < MIN_SIDE
    ]
    blurred = sorted(
        ({"path": rel[i], "product_id": labels[i], "laplacian_variance": round(f.blur, 1)}
         for i, f in enumerate(facts) if f.blur < BLUR_VARIANCE),
        key=lambda d: d["laplacian_variance"],
    )  # fmt: skip
    for d in duplicates:
        del d["a"]["row"], d["b"]["row"]
    report = {
        "format": FORMAT,
        "catalog": str(root),
        "model": extractor.describe(),
        "space": space,
        "counts": {
            "images": len(images),
            "checked": len(imgs),
            "products": len(products),
            "unreadable": len(unreadable),
        },
        "thresholds": {
            "mislabel_margin": MISLABEL_MARGIN,
            "duplicate_hash_bits": HASH_BITS,
            "duplicate_hash_cosine": DUPLICATE_HASH_COSINE,
            "outlier_z": OUTLIER_Z,
            "min_side": MIN_SIDE,
            "blur_variance": BLUR_VARIANCE,
        },
        "duplicates": duplicates,
        "mislabelled": mislabelled,
        "outliers": outliers,
        "confused_pairs": confused,
        "tiny": tiny,
        "blurred": blurred,
        "unreadable": unreadable,
        "seconds": 0.0,
    }
    report["seconds"] = round(time.perf_counter() - start, 1)
    logger.info(
        "doctor: %d photos of %d products: %d duplicate pair(s) across products, %d likely mislabelled, "
        "%d outlier(s), %d tiny, %d blurred, %d unreadable",
        len(imgs), len(products), len(duplicates), len(mislabelled), len(outliers), len(tiny), len(blurred),
        len(unreadable),
    )  # fmt: skip
    if out_dir is not None:
        write_report(report, Path(out_dir))
    return report


def _rel(image: CatalogImage, root: Path) -> str:
    return image.path.relative_to(root).as_posix()


def _duplicates(emb: np.ndarray, facts: Sequence[PhotoFacts], labels: np.ndarray, rel: list[str]) -> list[dict]:
    """Pairs of photos in different products that are the same photo (exact, or re-encoded / resized)."""
    hashes = np.array([f.dhash for f in facts], dtype=np.uint64)
    out = []
    for i in range(len(labels)):
        other = np.flatnonzero(labels[i + 1 :] != labels[i]) + i + 1
        if not len(other):
            continue
        cos = emb[other] @ emb[i]
        bits = hamming(hashes[other], int(hashes[i]))
        exact = np.array([facts[j].sha256 == facts[i].sha256 for j in other])
        hit = exact | ((bits <= HASH_BITS) & (cos >= DUPLICATE_HASH_COSINE))
        for k in np.flatnonzero(hit):
            j = int(other[k])
            kind = "exact" if exact[k] else "near"
            out.append(
                {
                    "kind": kind,
                    "cosine": round(float(cos[k]), 4),
                    "hash_bits": int(bits[k]),
                    "a": {"path": rel[i], "product_id": labels[i], "row": i},
                    "b": {"path": rel[j], "product_id": labels[j], "row": j},
                }
            )
    return sorted(out, key=lambda d: (d["kind"] != "exact", -d["cosine"]))


def _label_checks(products, scores, own, labels, rel, dup_rows) -> tuple[list[dict], list[dict], list[dict]]:
    n = len(labels)
    own_score = scores[np.arange(n), own]
    others = scores.copy()
    others[np.arange(n), own] = -np.inf
    best = others.argmax(axis=1)
    best_score = others[np.arange(n), best]
    margin = best_score - own_score
    mislabelled = [
        {
            "path": rel[i],
            "product_id": labels[i],
            "looks_like": str(products[best[i]]),
            "own_score": round(float(own_score[i]), 4),
            "other_score": round(float(best_score[i]), 4),
            "margin": round(float(margin[i]), 4),
        }
        for i in np.argsort(-margin)
        if margin[i] > MISLABEL_MARGIN and i not in dup_rows
    ]
    flagged = {d["path"] for d in mislabelled}
    outliers = []
    for p in range(len(products)):
        rows = np.flatnonzero(own == p)
        if len(rows) < 5:
            continue
        s = own_score[rows]
        med = np.median(s)
        mad = 1.4826 * np.median(np.abs(s - med)) + 1e-6
        for r, z in zip(rows, (s - med) / mad):
            if z < -OUTLIER_Z and rel[r] not in flagged and r not in dup_rows:
                outliers.append(
                    {
                        "path": rel[r],
                        "product_id": labels[r],
                        "z": round(float(z), 2),
                        "score": round(float(s[r == rows][0]), 4),
                    }
                )
    outliers.sort(key=lambda d: d["z"])
    # Confusion: how often a product's photos have the other product as their best other product, close to their own.
    pair_count: dict[tuple[int, int], int] = {}
    pair_margin: dict[tuple[int, int], list[float]] = {}
    for i in range(n):
        a, b = sorted((int(own[i]), int(best[i])))
        pair_count[(a, b)] = pair_count.get((a, b), 0) + int(margin[i] > -0.1)
        pair_margin.setdefault((a, b), []).append(float(margin[i]))
    confused = [
        {
            "a": str(products[a]),
            "b": str(products[b]),
            "close_photos": c,
            "mean_margin": round(float(np.mean(pair_margin[(a, b)])), 4),
        }
        for (a, b), c in sorted(pair_count.items(), key=lambda kv: -kv[1])
        if c > 0
    ][:TOP_CONFUSED]
    return mislabelled, outliers, confused


__all__ = ["diagnose", "photo_facts", "render_html", "write_report"]
