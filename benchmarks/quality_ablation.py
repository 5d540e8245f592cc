"""Retrieval quality, lever by lever, on a labelled catalog (default: ../shared/data/grocery).

Each row changes one thing against the row it builds on and is measured on all three protocols:
photo->catalog (queries/), leave-one-out (catalog/), iconic->photos (iconic/). Features go through lookalike's
own extractor and embedding cache (``--cache``), so a rerun only recomputes what changed.

    python benchmarks/quality_ablation.py [--data ../shared/data/grocery] [--out results/quality_ablation.json]

Writes JSON and prints a table. Rows marked "kept" are lookalike's defaults (or its tuning); the others were
measured and left out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from lookalike import Settings
from lookalike.backbones import BackboneSpec, Preprocess, get_backbone, register_backbone
from lookalike.embedding import FeatureExtractor
from lookalike.evaluation import LabelledSet, embed_folder, summarize
from lookalike.ranking import l2_normalize
from lookalike.tuning import SHRINKAGE, lda, product_scores

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("recall@1", "map@r", "product_hit@5", "mrr")

# The seed normalised every backbone with ImageNet's mean/std; the Lite checkpoints expect [-1, 1].
lite = get_backbone("efficientnet_lite0")
register_backbone(
    BackboneSpec(
        "efficientnet_lite0_imagenet_norm",
        lite.dim,
        224,
        Preprocess((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        lite.weights,
        lite.architecture,
        lite.load_state,
        lite.aux_dims,
    )
)


def features(settings: Settings, data: Path) -> dict[str, LabelledSet]:
    extractor = FeatureExtractor(settings)
    return {split: embed_folder(extractor, settings, data / split) for split in ("catalog", "queries", "iconic")}


def protocol(db: np.ndarray, db_labels, queries: np.ndarray, q_labels, *, loo: bool, product_top: int) -> dict:
    sims = l2_normalize(queries) @ l2_normalize(db).T
    db_labels, q_labels = np.asarray(db_labels), np.asarray(q_labels)
    if loo:
        np.fill_diagonal(sims, -np.inf)
    counts = {p: int(np.sum(db_labels == p)) for p in np.unique(db_labels)}
    relevant = np.array([counts.get(y, 0) - (1 if loo else 0) for y in q_labels])
    order = np.argsort(-sims, axis=1)[:, : max(int(relevant.max()), 100)]
    keep = np.flatnonzero(relevant > 0)
    metrics = summarize([list(db_labels[order[i]]) for i in keep], list(q_labels[keep]), list(relevant[keep]))
    # Product ranking as the engine does it: each product scored by the mean of its best `product_top` images.
    products, scores = _product_scores(sims[keep], db_labels, product_top)
    top5 = products[np.argsort(-scores, axis=1)[:, :5]]
    metrics["product_hit@5"] = float(np.mean([q_labels[i] in top5[j] for j, i in enumerate(keep)]))
    return metrics


def _product_scores(sims, db_labels, top):
    import lookalike.tuning as tuning

    saved, tuning.PRODUCT_TOP = tuning.PRODUCT_TOP, top
    try:
        return product_scores(np.where(np.isfinite(sims), sims, -1e9), db_labels)
    finally:
        tuning.PRODUCT_TOP = saved


def run_row(name, sets, transform, *, kept, product_top=3, query_transform=None) -> dict:
    cat, qs, ic = sets["catalog"], sets["queries"], sets["iconic"]
    q_transform = query_transform or transform
    db = transform(cat.raw)
    row = {"lever": name, "kept": kept}
    row["photo->catalog"] = protocol(db, cat.labels, q_transform(qs.raw), qs.labels, loo=False, product_top=product_top)
    row["leave-one-out"] = protocol(db, cat.labels, db, cat.labels, loo=True, product_top=product_top)
    row["iconic->photos"] = protocol(db, cat.labels, q_transform(ic.raw), ic.labels, loo=False, product_top=product_top)
    print(_line(row), flush=True)
    return row


def _line(row) -> str:
    cells = [f"{row['lever'][:58]:58s}", "kept" if row["kept"] else "    "]
    for p in ("photo->catalog", "leave-one-out", "iconic->photos"):
        cells.append(" ".join(f"{row[p][k]:.3f}" for k in ("recall@1", "map@r", "product_hit@5")))
    return " | ".join(cells)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "grocery")
    parser.add_argument("--cache", type=Path, default=ROOT / "cache")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "quality_ablation.json")
    args = parser.parse_args()
    start = time.perf_counter()

    def settings(**kw) -> Settings:
        return Settings(config_file=None, cache_dir=args.cache, **kw)

    dim = lite.dim
    main_part = lambda raw: raw[:, :dim]  # noqa: E731
    print(f"{'lever':58s} | kept | photo->catalog R@1 MAP@R hit@5 | leave-one-out (same) | iconic->photos (same)")
    rows = []
    seed = features(settings(model_name="efficientnet_lite0_imagenet_norm", img_size=224, pooling="avg"), args.data)
    rows.append(run_row("seed: 224px squash, ImageNet mean/std, average pooling", seed, main_part, kept=False,
                        product_top=1))  # fmt: skip
    s224 = features(settings(img_size=224, pooling="avg"), args.data)
    rows.append(run_row("+ the Lite checkpoint's own normalisation", s224, main_part, kept=True, product_top=1))
    s256 = features(settings(img_size=256, pooling="avg"), args.data)
    rows.append(run_row("+ 256px input", s256, main_part, kept=True, product_top=1))
    s288 = features(settings(img_size=288, pooling="avg"), args.data)
    rows.append(run_row("  (288px instead: 1.3x the compute)", s288, main_part, kept=False, product_top=1))
    center = features(settings(img_size=256, pooling="center"), args.data)
    rows.append(run_row("+ centre-weighted pooling (sigma 0.6)", center, main_part, kept=True, product_top=1))
    rows.append(run_row("+ product score = mean of its best 3 images (default)", center, main_part, kept=True))
    gem = lambda raw: np.sign(raw[:, :dim]) * np.abs(raw[:, :dim]) ** 0.5  # noqa: E731
    rows.append(run_row("  power-normalised features (sqrt)", center, gem, kept=False))
    mu = center["catalog"].raw[:, :dim].mean(axis=0)
    rows.append(run_row("  catalog-mean centring", center, lambda r: r[:, :dim] - mu, kept=False))
    rows.append(run_row("  alpha-query expansion (top 2, alpha 3)", center, main_part, kept=False,
                        query_transform=lambda r: _aqe(r[:, :dim], center["catalog"].raw[:, :dim], 2)))  # fmt: skip
    dba = lambda r: _aqe(r[:, :dim], r[:, :dim], 5)  # noqa: E731 - each catalog vector with its 5 neighbours
    rows.append(run_row("  database-side augmentation (top 5, alpha 3)", center, dba, kept=False,
                        query_transform=main_part))  # fmt: skip
    labels = np.array(center["catalog"].labels, dtype=object)
    for name, cols, shrink, kept in (
        ("tuned: LDA on the embedding only", dim, SHRINKAGE, False),
        (f"tuned: LDA on embedding + last-block features, shrinkage {SHRINKAGE} (lookalike tune)", None, SHRINKAGE,
         True),
        ("  same, shrinkage 0.03", None, 0.03, False),
        ("  same, shrinkage 0.3", None, 0.3, False),
    ):  # fmt: skip
        raw = center["catalog"].raw[:, :cols] if cols else center["catalog"].raw
        mean, matrix = lda(raw, labels, shrink)
        rows.append(run_row(name, center, _projector(mean, matrix, cols), kept=kept))
    result = {"data": str(args.data), "rows": rows, "seconds": round(time.perf_counter() - start, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out} ({result['seconds']} s)")


def _aqe(queries: np.ndarray, db: np.ndarray, k: int, alpha: float = 3.0) -> np.ndarray:
    q, d = l2_normalize(queries), l2_normalize(db)
    sims = q @ d.T
    top = np.argsort(-sims, axis=1)[:, :k]
    w = np.take_along_axis(sims, top, axis=1).clip(0) ** alpha
    return q + (w[:, :, None] * d[top]).sum(axis=1)


def _projector(mean: np.ndarray, matrix: np.ndarray, cols: int | None):
    def project(raw: np.ndarray) -> np.ndarray:
        return ((raw[:, :cols] if cols else raw) - mean) @ matrix

    return project


if __name__ == "__main__":
    main()
