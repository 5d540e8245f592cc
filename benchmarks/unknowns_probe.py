"""Which unknown products "no match" can tell apart: the AUROC of the product score (in-catalog query photos vs
photos of products left out of the index and of the fine-tune), split by whether a left-out product has a relative
in the index, i.e. shares a word of its name with an indexed product (a brand: God-Morgon, Yoggi; a kind: Tomato,
Pepper). A rule on names, fixed before looking at the scores, so that the split is not chosen by the result.

    lookalike eval --catalog G/catalog --queries G/queries --no-loo --leave-out 20 --tune finetune --cache-dir DIR
    nice -n 10 python benchmarks/unknowns_probe.py --cache-dir DIR [--json results/unknowns_probe.json]

It reads the checkpoint that eval fine-tuned without the left-out products (its report names them) and the
embeddings eval cached, builds the index the way ``search()`` sees it (``ImageSearchEngine.from_vectors``) and
prints, per left-out product, its photos' median product score and the products they land on.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from finetune_bench import DEFAULT_GROCERY


def words(product: str) -> set[str]:
    return {w.lower() for w in product.split("-") if w}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grocery", type=Path, default=DEFAULT_GROCERY)
    ap.add_argument("--cache-dir", type=Path, required=True, help="the cache dir of a `lookalike eval --leave-out` run")
    ap.add_argument("--json", type=Path, help="write the figures here")
    ap.add_argument("--group", help="comma-separated left-out products: also the AUROC against their photos alone")
    args = ap.parse_args(argv)
    reports = [p for p in sorted((args.cache_dir / "finetuned").glob("*.json"))
               if json.loads(p.read_text()).get("excluded_products")]  # fmt: skip
    if not reports:
        print(f"no fine-tune without left-out products under {args.cache_dir}/finetuned", file=sys.stderr)
        return 2
    from lookalike import Settings
    from lookalike.embedding import FeatureExtractor
    from lookalike.engine import ImageSearchEngine
    from lookalike.evaluation import embed_folder
    from lookalike.tuning import auroc

    hidden = set(json.loads(reports[0].read_text())["excluded_products"])
    catalog = args.grocery / "catalog"
    settings = Settings(
        config_file=None, environ={}, cache_dir=args.cache_dir, tune="finetune", model_name="efficientnet_lite0",
        weights_path=reports[0].with_suffix(".safetensors"), data_dir=catalog,
    )  # fmt: skip
    extractor = FeatureExtractor(settings)
    cat = embed_folder(extractor, settings, catalog, progress=False)
    qs = embed_folder(extractor, settings, args.grocery / "queries", progress=False)
    keep = [i for i, y in enumerate(cat.labels) if y not in hidden]
    root = catalog.resolve()
    paths = [Path(cat.paths[i]).resolve().relative_to(root).as_posix() for i in keep]
    engine = ImageSearchEngine.from_vectors(
        settings, extractor, cat.raw[keep], paths, [cat.labels[i] for i in keep], tune="finetune"
    )
    top = [hits[0] for hits in engine.search_vectors(qs.raw, 1)]
    score = np.array([h["similarity"] for h in top])
    found = np.array([h["product_id"] for h in top], dtype=object)
    labels = np.array(qs.labels, dtype=object)
    inside = ~np.isin(labels, sorted(hidden))
    indexed_words = set().union(*(words(p) for p in {cat.labels[i] for i in keep}))
    related = {p: sorted(words(p) & indexed_words) for p in hidden}
    has_relative = np.array([bool(related.get(y)) for y in labels]) & ~inside
    stranger = ~inside & ~has_relative
    out = {
        "cache_dir": str(args.cache_dir),
        "threshold": engine.get_statistics().get("no_match_threshold"),
        "in_catalog_photos": int(inside.sum()),
        "auroc_all": auroc(score[inside], score[~inside]),
        "auroc_with_relative": auroc(score[inside], score[has_relative]),
        "auroc_without_relative": auroc(score[inside], score[stranger]),
        "photos_with_relative": int(has_relative.sum()),
        "photos_without_relative": int(stranger.sum()),
        "in_catalog_median_score": float(np.median(score[inside])),
        "left_out": {},
    }
    if args.group:
        group = [g.strip() for g in args.group.split(",") if g.strip()]
        unknown = sorted(set(group) - hidden)
        if unknown:
            print(f"--group names products that were not left out: {', '.join(unknown)}", file=sys.stderr)
            return 2
        chosen = np.isin(labels, group)
        out["group"] = {"products": group, "photos": int(chosen.sum()), "auroc": auroc(score[inside], score[chosen])}
    for p in sorted(hidden):
        m = labels == p
        if m.any():
            out["left_out"][p] = {
                "photos": int(m.sum()), "shared_words": related[p], "median_score": float(np.median(score[m])),
                "lands_on": sorted(set(found[m])),
            }  # fmt: skip
    print(f"AUROC in catalog ({out['in_catalog_photos']} photos) vs left out: all {out['auroc_all']:.3f}, "
          f"with a relative in the index {out['auroc_with_relative']:.3f} ({out['photos_with_relative']} photos), "
          f"without {out['auroc_without_relative']:.3f} ({out['photos_without_relative']} photos)")  # fmt: skip
    if "group" in out:
        g = out["group"]
        print(f"AUROC against the --group alone ({len(g['products'])} products, {g['photos']} photos): "
              f"{g['auroc']:.3f}")  # fmt: skip
    print(f"median product score of in-catalog photos: {out['in_catalog_median_score']:.3f}")
    print(f"{'left-out product':32s} {'photos':>6s} {'median':>7s}  shared words -> lands on")
    for p, r in out["left_out"].items():
        print(f"{p:32s} {r['photos']:6d} {r['median_score']:7.3f}  {','.join(r['shared_words']) or '-'} -> "
              f"{', '.join(r['lands_on'])}")  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
