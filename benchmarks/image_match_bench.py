"""Image-level "match" at the calibrated image threshold, with N products left out of the index (and, given the
checkpoint `finetune_bench.py --leave-out N` made without them, out of the fine-tune too).

    nice -n 10 python benchmarks/image_match_bench.py [--weights CKPT] [--leave-out 20] [--cache-dir DIR]

For each query photo the top image is the answer: AUROC of its similarity (in-catalog vs left-out products), and at
the build's calibrated ``image_threshold`` the share of correct top images flagged match and of left-out products'
photos flagged no match; untuned and with the LDA (what ``tune: true`` / ``tune: finetune`` build).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from finetune_bench import DEFAULT_GROCERY, hidden_products


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grocery", type=Path, default=DEFAULT_GROCERY)
    ap.add_argument("--weights", type=Path, help="fine-tuned checkpoint (default: the base model)")
    ap.add_argument("--leave-out", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-dir", type=Path, default=Path("/tmp/finetune-bench/cache"))
    args = ap.parse_args(argv)
    if not (args.grocery / "catalog").is_dir():
        print(f"{args.grocery}/catalog not found (see ../shared/data/README.md)", file=sys.stderr)
        return 2
    from lookalike import Settings
    from lookalike.embedding import FeatureExtractor
    from lookalike.evaluation import embed_folder
    from lookalike.ranking import l2_normalize
    from lookalike.tuning import adapt, auroc

    settings = Settings(
        config_file=None, environ={}, model_name="efficientnet_lite0", data_dir=args.grocery / "catalog",
        cache_dir=args.cache_dir, weights_path=args.weights,
    )  # fmt: skip
    from lookalike.finetuned import ensemble_for

    extractor = FeatureExtractor(settings)
    cat = embed_folder(extractor, settings, args.grocery / "catalog")
    qs = embed_folder(extractor, settings, args.grocery / "queries")
    hidden = hidden_products(args.grocery, args.leave_out, args.seed)
    labels = np.asarray(cat.labels, dtype=object)
    keep = ~np.isin(labels, hidden)
    query_labels = np.asarray(qs.labels, dtype=object)
    inside = ~np.isin(query_labels, hidden)
    out = {"weights": str(args.weights), "hidden_products": hidden}
    for tune in (False, True):
        a = adapt(cat.raw[keep], labels[keep], extractor.dim, tune=tune, ensemble=ensemble_for(extractor))
        db = l2_normalize(a.transform(cat.raw[keep], extractor.dim))
        sims = l2_normalize(a.transform(qs.raw, extractor.dim)) @ db.T
        top = sims.max(axis=1)
        correct = inside & (labels[keep][sims.argmax(axis=1)] == query_labels)
        match = top >= a.image_threshold
        out[f"tune_{tune}"] = {
            "image_threshold": a.image_threshold,
            "product_threshold": a.threshold,
            "auroc_image": auroc(top[inside], top[~inside]),
            "auroc_correct_vs_unknown": auroc(top[correct], top[~inside]),
            "correct_top_image_flagged_match": float(match[correct].mean()),
            "unknown_flagged_no_match": float((~match[~inside]).mean()),
            "image_recall@1_in_catalog": float(correct[inside].mean()),
        }
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
