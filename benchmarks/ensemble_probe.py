"""Probe: the fine-tuned embedding, the LDA on it, and an ensemble with the base model's LDA, on the dev queries.

    python benchmarks/ensemble_probe.py /tmp/outlier-bench/ft-<run>.safetensors ...          # whole catalog
    python benchmarks/ensemble_probe.py --leave-out 20 --calibration ft-<never-learnt>.safetensors ft-<run>.safetensors

Checkpoints come from ``outlier_bench.py`` (its ``--work`` folder also holds the frozen trunk's cached maps that
this reads), trained as single networks (``--config '{"ensemble": false}'``): the probe builds the ensemble
itself, which ``tune: finetune`` now does in one network (measure that with ``lookalike eval``). For every
checkpoint it prints image Recall@1, product Recall@1, product hit@5 and MAP@R of the dev query photos against
the catalog for: the fine-tuned embedding alone, the LDA refitted on it (what ``tune: finetune`` built before the
ensemble), and the ensemble (the fine-tuned vector and the base model's LDA vector, each normalised, then
concatenated: the two cosines averaged). With ``--leave-out N`` the N products ``lookalike eval --leave-out N``
leaves out are out of the index (the checkpoints must have been trained without them too), and with
``--calibration`` (a run with ``unknown_rotate: false, unknown_weight: 0``: a fixed group it never learnt) the
ensemble's no-match threshold is the median score of that group's photos against the other products, with the
operating point it gives. Numbers in docs/quality.md ("Where it stands"). One JSON line per checkpoint to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from finetune_bench import DEFAULT_GROCERY, hidden_products  # noqa: E402
from outlier_bench import caching, plain_raw  # noqa: E402


def quality(db, db_labels, q, labels) -> dict:
    from lookalike.ranking import l2_normalize, product_scores
    from lookalike.tuning import holdout_quality

    db, q = l2_normalize(db), l2_normalize(q)
    sims = q @ db.T
    products, scores = product_scores(sims, db_labels)
    top = products[np.argsort(-scores, axis=1)[:, :5]]
    return {
        "image_recall@1": float(np.mean(db_labels[np.argmax(sims, axis=1)] == labels)),
        "product_recall@1": float(np.mean(top[:, 0] == labels)),
        "product_hit@5": float(np.mean([labels[i] in top[i] for i in range(len(labels))])),
        "map@r": holdout_quality(db, db_labels, q, labels)["map@r"],
    }


def ensemble(ft_db, ft_q, base_db, base_q, labels):
    """(index, queries): the fine-tuned embedding and the base model's LDA (fitted on ``base_db``), averaged."""
    from lookalike.ranking import l2_normalize
    from lookalike.tuning import SHRINKAGE, lda

    mean, matrix = lda(base_db, labels, SHRINKAGE)

    def join(ft, base):
        return np.hstack([l2_normalize(ft[:, :1280]), l2_normalize((base - mean) @ matrix)]) / np.sqrt(2)

    return join(ft_db, base_db), join(ft_q, base_q)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("weights", nargs="+", type=Path)
    ap.add_argument("--grocery", type=Path, default=DEFAULT_GROCERY)
    ap.add_argument("--leave-out", type=int, default=0)
    ap.add_argument("--calibration", type=Path, help="a fine-tune that never learnt a fixed group of products")
    ap.add_argument("--work", type=Path, default=Path("/tmp/outlier-bench"))
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "ensemble_probe.jsonl")
    args = ap.parse_args(argv)
    from lookalike import Settings, outliers
    from lookalike import finetune as ft
    from lookalike.ranking import product_scores
    from lookalike.tuning import NO_MATCH_QUANTILE, SHRINKAGE, auroc, lda

    settings = Settings(config_file=None, environ={}, model_name="efficientnet_lite0", cache_dir=args.work / "cache")
    cached = caching(args.work, settings.model_name)
    hidden = hidden_products(args.grocery, args.leave_out, 0) if args.leave_out else []
    base_db, db_labels = plain_raw(settings, None, args.grocery / "catalog", 1, cached)
    base_q, labels = plain_raw(settings, None, args.grocery / "queries", 1, cached)
    keep, inside = ~np.isin(db_labels, hidden), ~np.isin(labels, hidden)
    index_labels = db_labels[keep]
    threshold = None
    if args.calibration is not None:
        cal_db, _ = plain_raw(settings, args.calibration, args.grocery / "catalog", 1, cached)
        products = np.unique(index_labels)  # the calibration run's products, in its order: its first draw is fixed
        cfg = ft.FinetuneConfig(unknown_fraction=0.25)
        fixed = products[outliers.pick_unknown(len(products), cfg.unknown_fraction, np.random.default_rng(2))]
        rows = np.isin(index_labels, fixed)
        x, b = cal_db[keep], base_db[keep]
        db, q = ensemble(x[~rows], x[rows], b[~rows], b[rows], index_labels[~rows])
        _, scores = product_scores(q @ db.T, index_labels[~rows])
        threshold = float(np.quantile(scores.max(axis=1), NO_MATCH_QUANTILE))
    for w in args.weights:
        ft_db, _ = plain_raw(settings, w, args.grocery / "catalog", 1, cached)
        ft_q, _ = plain_raw(settings, w, args.grocery / "queries", 1, cached)
        mean, matrix = lda(ft_db[keep], index_labels, SHRINKAGE)
        variants = {
            "finetuned": (ft_db[keep, :1280], ft_q[:, :1280]),
            "finetuned+lda": ((ft_db[keep] - mean) @ matrix, (ft_q - mean) @ matrix),
            "ensemble": ensemble(ft_db[keep], ft_q, base_db[keep], base_q, index_labels),
        }
        record: dict = {"weights": str(w), "leave_out": args.leave_out}
        for name, (db, q) in variants.items():
            record[name] = quality(db, index_labels, q[inside], labels[inside])
            print(f"{w.stem:28s} {name:14s} " + "  ".join(f"{k} {v:.3f}" for k, v in record[name].items()))
        if hidden:
            db, q = variants["ensemble"]
            products, scores = product_scores(q @ db.T, index_labels)
            best, answer = scores.max(axis=1), products[scores.argmax(axis=1)]
            correct = inside & (answer == labels)
            record["ensemble_no_match"] = {"auroc": auroc(best[inside], best[~inside]), "threshold": threshold}
            if threshold is not None:
                record["ensemble_no_match"]["right_answers_flagged_match"] = float(np.mean(best[correct] >= threshold))
                record["ensemble_no_match"]["unknown_flagged_no_match"] = float(np.mean(best[~inside] < threshold))
            print(f"{'':28s} ensemble no match: {json.dumps(record['ensemble_no_match'])}")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
