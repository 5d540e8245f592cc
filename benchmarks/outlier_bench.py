"""Screening "no match" after fine-tuning on the honest protocol: products left out of the index AND of the fine-tune.

    nice -n 10 python benchmarks/outlier_bench.py --config '{"views": 2, "epochs": 8}' --tag baseline \
        [--leave-out 20] [--seed 0] [--out results/outlier_bench.jsonl]
    nice -n 10 python benchmarks/outlier_bench.py --base --tag base   # the base model, no fine-tune

Each run fine-tunes without the N products that ``lookalike eval --leave-out N`` leaves out (the same seeded choice
as ``finetune_bench.py --leave-out N``), then scores every dev query photo against the catalog without those
products, untuned and LDA-tuned, with the build's calibrated threshold: AUROC of each no-match score
(:mod:`lookalike.openset`), the operating point at the threshold, and product Recall@1 / MAP@R of the in-catalog
queries. One JSON line per run is appended to --out.

To make screening affordable on a 2-core machine, the frozen trunk's maps (the part of the network the fine-tune
does not train) are computed once and kept on disk under --work as .npy files (keyed by the photos, views, seed
and crop), for the fine-tune's views and for the plain view of every catalog and query photo; the index and query
vectors are then the trained tail applied to the plain view, which is what the extractor computes (same resize,
same normalisation; fp16 maps). ``finetune_bench.py --leave-out`` measures through the full extraction pipeline.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from finetune_bench import DEFAULT_GROCERY, hidden_products  # noqa: E402

logger = logging.getLogger("outlier_bench")


def caching(work: Path, model_name: str):
    """A drop-in for ``lookalike.finetune.cache_trunk_maps`` that keeps its result on disk (fp16 .npy)."""
    import torch

    from lookalike import finetune as ft

    original = ft.cache_trunk_maps

    def cached(extractor, trunk, paths, cfg, device, progress, **kw):
        key = hashlib.sha256(
            json.dumps(
                [model_name, extractor.input_size, cfg.views, cfg.seed, list(cfg.crop_scale), cfg.tail_blocks]
                + [str(p) for p in paths]
            ).encode()
        ).hexdigest()[:16]
        maps_file, ok_file = work / f"maps-{key}.npy", work / f"ok-{key}.npy"
        if maps_file.exists() and ok_file.exists():
            maps = np.load(maps_file, allow_pickle=False)
            return torch.from_numpy(maps).to(device), np.load(ok_file, allow_pickle=False)
        maps, ok = original(extractor, trunk, paths, cfg, device, progress, **kw)
        work.mkdir(parents=True, exist_ok=True)
        for f, a in ((maps_file, maps.cpu().numpy()), (ok_file, ok)):
            tmp = f.with_suffix(".tmp.npy")
            np.save(tmp, a, allow_pickle=False)
            tmp.replace(f)
        return maps, ok

    return cached


def plain_raw(settings, weights: Path | None, folder: Path, tail_blocks: int, cached) -> tuple[np.ndarray, np.ndarray]:
    """(raw vectors, labels) of every photo under ``folder``: the (fine-tuned) tail on the cached plain view."""
    from lookalike.catalog import scan_catalog
    from lookalike.embedding import FeatureExtractor
    from lookalike.finetune import FinetuneConfig, _raw, split_backbone
    from lookalike.nets import TailEnsembleMaps

    s = settings.replace(runtime="torch", precision="fp32", weights_path=weights)
    extractor = FeatureExtractor(s)
    model = extractor.model.to(extractor.device).eval()
    if isinstance(model, TailEnsembleMaps):  # tune: finetune's ensemble network: the base trunk, then every tail
        trunk, _, _ = split_backbone(model.base, model.tail_blocks)
        tail = model.run_tails
    else:
        trunk, tail, _ = split_backbone(model, tail_blocks)
    images = scan_catalog(folder)
    maps, ok = cached(extractor, trunk, [im.path for im in images], FinetuneConfig(views=1), extractor.device, False)
    labels = np.array([images[i].product_id for i in ok], dtype=object)
    return _raw(tail, maps[:, 0], settings.pooling), labels


def measure(settings, weights, grocery: Path, hidden: list[str], tail_blocks: int, cached) -> dict:
    from lookalike import openset
    from lookalike.ranking import l2_normalize
    from lookalike.tuning import SHRINKAGE, adapt, holdout_quality, lda

    def refit_lda(x, labels):  # what the build's calibration does with tuning on: the LDA without the hidden group
        mean, matrix = lda(x, labels, SHRINKAGE)
        return lambda v: (v - mean) @ matrix

    cat_raw, cat_labels = plain_raw(settings, weights, grocery / "catalog", tail_blocks, cached)
    q_raw, q_labels = plain_raw(settings, weights, grocery / "queries", tail_blocks, cached)
    keep = ~np.isin(cat_labels, hidden)
    inside = ~np.isin(q_labels, hidden)
    dim = 1280
    ensemble = None  # a tail-ensemble checkpoint (FinetuneConfig.ensemble): the build's projection and threshold
    if weights is not None:
        from lookalike.embedding import FeatureExtractor
        from lookalike.finetuned import ensemble_for
        from lookalike.tuning import fit_ensemble

        ensemble = ensemble_for(FeatureExtractor(settings.replace(weights_path=weights)))
    out = {}
    for tune in (False, True):
        fitted = ("finetune" if weights is not None else True) if tune else False  # fine-tuned features: its rule
        a = adapt(cat_raw[keep], cat_labels[keep], dim, tune=fitted, ensemble=ensemble if tune else None)
        db, q = a.transform(cat_raw[keep], dim), a.transform(q_raw, dim)
        if a.projection is None:
            cal = openset.calibrate(db, cat_labels[keep])
        elif ensemble is not None:
            refit = lambda x, labels: fit_ensemble(x, labels, ensemble).apply  # noqa: E731
            cal = openset.calibrate(cat_raw[keep], cat_labels[keep], refit=refit)
        else:
            cal = openset.calibrate(cat_raw[keep], cat_labels[keep], refit=refit_lda)
        m = openset.measure(q, q_labels, db, cat_labels[keep], a.threshold, calibration=cal)
        m["in_catalog_quality"] = holdout_quality(db, cat_labels[keep], q[inside], q_labels[inside])
        nearest = np.argmax(l2_normalize(q[inside]) @ l2_normalize(db).T, axis=1)  # `lookalike eval`'s Recall@1
        m["in_catalog_quality"]["image_recall@1"] = float(np.mean(cat_labels[keep][nearest] == q_labels[inside]))
        m["tuning"] = a.tuning.get("status")
        out[f"tune_{tune}"] = m
    return out


def fixed_group_calibration(settings, weights, grocery: Path, hidden: list[str], cfg, cached) -> dict:
    """The no-match threshold set by the products a fine-tune with ``unknown_rotate: false`` never learnt: the median
    product score of their photos against the other products (untuned index), and the dev queries' operating point
    at it. Such products are as new to the network as a shop's unknown product, unlike the build's hidden groups."""
    from lookalike import openset, outliers
    from lookalike.ranking import l2_normalize
    from lookalike.tuning import NO_MATCH_QUANTILE, product_scores

    cat_raw, cat_labels = plain_raw(settings, weights, grocery / "catalog", cfg.tail_blocks, cached)
    q_raw, q_labels = plain_raw(settings, weights, grocery / "queries", cfg.tail_blocks, cached)
    keep = ~np.isin(cat_labels, hidden)
    db, labels = cat_raw[keep, :1280], cat_labels[keep]
    products = np.unique(labels)  # the fine-tune's products, in its order: its first draw is the fixed group
    fixed = products[outliers.pick_unknown(len(products), cfg.unknown_fraction, np.random.default_rng(cfg.seed + 2))]
    rows = np.isin(labels, fixed)
    _, scores = product_scores(l2_normalize(db[rows]) @ l2_normalize(db[~rows]).T, labels[~rows])
    threshold = float(np.quantile(scores.max(axis=1), NO_MATCH_QUANTILE))
    m = openset.measure(q_raw[:, :1280], q_labels, db, labels, threshold)
    keys = ("correct_flagged_match", "unknown_flagged_no_match", "in_catalog_flagged_match")
    return {"never_learnt_products": len(fixed), "threshold": threshold, **{k: m[k] for k in keys}}


def summary(res: dict) -> str:
    parts = []
    for k, m in res.items():
        au = " / ".join(f"{n} {v:.3f}" for n, v in m["auroc"].items())
        parts.append(
            f"{k}: AUROC {au}; thr {m['threshold']:.3f} correct->match {m['correct_flagged_match']:.3f} "
            f"unknown->no match {m['unknown_flagged_no_match']:.3f}; in-catalog R@1 "
            f"{m['in_catalog_quality']['product_recall@1']:.3f} MAP@R {m['in_catalog_quality']['map@r']:.3f}"
        )
        for name, op in m.get("calibrated", {}).items():
            parts.append(
                f"    {name} at its calibrated threshold {op['threshold']:.3f}: correct->match "
                f"{op['correct_flagged_match']:.3f}, unknown->no match {op['unknown_flagged_no_match']:.3f}"
            )
    return "\n".join(parts)


def table(path: Path, tags: list[str] | None = None) -> str:
    """Markdown tables (untuned index, then LDA-tuned index) of the runs recorded in ``path``: the last run of each
    tag, in the order given (default: every tag, first seen first)."""
    from lookalike.finetune import FinetuneConfig

    runs: dict[str, dict] = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        runs[r["tag"]] = r
    defaults = json.loads(json.dumps(asdict(FinetuneConfig())))  # tuples as the JSON lists of the records
    out = []
    for key, title in (("tune_False", "untuned index"), ("tune_True", "index + LDA")):
        out += [
            f"\n{title}:\n",
            "| run | changes to FinetuneConfig | CPU s | AUROC product / prototype / energy / margin / relative / "
            "combined | threshold | correct answers flagged match | unknown flagged no match "
            "| in-catalog R@1 / MAP@R |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for tag in tags or list(runs):
            r = runs[tag]
            m = r["no_match"][key]
            changes = "base model, no fine-tune" if r["base"] else ", ".join(
                f"{k} {v}" for k, v in r["config"].items() if v != defaults[k] and k != "require_gain"
            ) or "(defaults)"  # fmt: skip
            names = ("product", "prototype", "energy", "margin", "relative", "combined")
            au = " / ".join(f"{m['auroc'][k]:.3f}" if k in m["auroc"] else "-" for k in names)
            cpu = f"{r['trained_cpu_s']:.0f}" if "trained_cpu_s" in r else "-"
            q = m["in_catalog_quality"]
            if key == "tune_True" and m.get("tuning") != "tuned":
                changes += f" (LDA {m.get('tuning')}: untuned figures)"
            out.append(
                f"| {tag} | {changes} | {cpu} | {au} | {m['threshold']:.3f} | "
                f"{100 * m['correct_flagged_match']:.1f} % | {100 * m['unknown_flagged_no_match']:.1f} % | "
                f"{q['product_recall@1']:.3f} / {q['map@r']:.3f} |"
            )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grocery", type=Path, default=DEFAULT_GROCERY)
    ap.add_argument("--config", default="{}", help="FinetuneConfig fields as JSON")
    ap.add_argument("--base", action="store_true", help="measure the base model (no fine-tune)")
    ap.add_argument("--weights", type=Path, help="measure these fine-tuned weights (of a run with --config) again")
    ap.add_argument("--tag", default="")
    ap.add_argument("--leave-out", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--img-size", type=int, help="input size of the fine-tune and measurement")
    ap.add_argument("--work", type=Path, default=Path("/tmp/outlier-bench"))
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "outlier_bench.jsonl")
    ap.add_argument("--table", nargs="*", metavar="TAG", help="print the recorded runs (these tags) as markdown")
    args = ap.parse_args(argv)
    if args.table is not None:
        print(table(args.out, args.table or None))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not (args.grocery / "catalog").is_dir():
        print(f"{args.grocery}/catalog not found (see ../shared/data/README.md)", file=sys.stderr)
        return 2
    from lookalike import Settings
    from lookalike import finetune as ft

    cfg = ft.FinetuneConfig(**json.loads(args.config))
    if isinstance(cfg.crop_scale, list):
        cfg = replace(cfg, crop_scale=tuple(cfg.crop_scale))
    settings = Settings(
        config_file=None, environ={}, model_name="efficientnet_lite0", data_dir=args.grocery / "catalog",
        cache_dir=args.work / "cache", img_size=args.img_size,
    )  # fmt: skip
    cached = caching(args.work, settings.model_name)
    ft.cache_trunk_maps = cached
    hidden = hidden_products(args.grocery, args.leave_out, args.seed)
    record: dict = {"tag": args.tag, "config": asdict(cfg), "base": args.base, "hidden_products": hidden}
    if args.img_size:
        record["img_size"] = args.img_size
    weights = args.weights
    if args.weights is not None:
        record["weights"] = str(args.weights)
    elif not args.base:
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            result = ft.finetune(
                settings, config=replace(cfg, require_gain=False), exclude_products=set(hidden),
                out_path=args.work / f"ft-{args.tag or 'run'}.safetensors", progress=False,
            )  # fmt: skip
        finally:
            record["finetune_wall_s"] = round(time.perf_counter() - t0, 1)
            record["finetune_cpu_s"] = round(time.process_time() - c0, 1)
        weights = result.path
        record["validation"] = result.info["validation"]
        record["history"] = result.info["history"]
        record["trained_cpu_s"] = result.info["seconds"]["cpu"]
    c0 = time.process_time()
    record["no_match"] = measure(settings, weights, args.grocery, hidden, cfg.tail_blocks, cached)
    if weights is not None and cfg.unknown_fraction > 0 and not cfg.unknown_rotate:
        fixed = fixed_group_calibration(settings, weights, args.grocery, hidden, cfg, cached)
        record["fixed_group_calibration"] = fixed
        logger.info("threshold from the never-learnt group: %s", json.dumps(record["fixed_group_calibration"]))
    record["measure_cpu_s"] = round(time.process_time() - c0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        f.write(json.dumps(record) + "\n")
    print(f"[{args.tag}] fine-tune CPU {record.get('finetune_cpu_s')} s\n" + summary(record["no_match"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
