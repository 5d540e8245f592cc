"""Measure `lookalike doctor` on planted problems: a COPY of the dev catalog under a temporary folder gets
20 photos moved into a wrong product folder and 10 photos copied into a second product (some re-encoded at another
JPEG quality, some resized). The doctor must find them among its flags with few false flags.

    python benchmarks/doctor_bench.py [--catalog ../shared/data/grocery/catalog] [--work /tmp/doctor-bench]
        [--seed 0] [--out results/doctor_bench.json] [--report DIR]

Writes machine-readable results (planted, found, false flags by kind). Never touches the source catalog.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CATALOG = ROOT.parent / "shared" / "data" / "grocery" / "catalog"
MISLABELS = 20
DUPLICATES = 10


def plant(source: Path, work: Path, seed: int) -> dict:
    """Copy ``source`` to ``work/catalog`` and plant the problems; returns what was planted (paths relative to it)."""
    catalog = work / "catalog"
    if catalog.exists():
        shutil.rmtree(catalog)
    shutil.copytree(source, catalog)
    rng = np.random.default_rng(seed)
    products = sorted(p.name for p in catalog.iterdir() if p.is_dir())
    files = sorted(p.relative_to(catalog).as_posix() for p in catalog.glob("*/*") if p.is_file())
    chosen = rng.choice(len(files), MISLABELS + DUPLICATES, replace=False)
    moved, copied = [], []
    for k, idx in enumerate(chosen):
        rel = files[idx]
        own = rel.split("/", 1)[0]
        other = products[rng.choice([i for i, p in enumerate(products) if p != own])]
        src = catalog / rel
        if k < MISLABELS:
            dest = catalog / other / f"planted-moved-{k:02d}{src.suffix}"
            shutil.move(src, dest)
            moved.append({"path": dest.relative_to(catalog).as_posix(), "true_product": own, "folder": other})
        else:
            variant = ("same bytes", "JPEG q60", "resized 0.7", "JPEG q85 + resized 1.3")[k % 4]
            dest = catalog / other / f"planted-copy-{k:02d}.jpg"
            if variant == "same bytes":
                shutil.copyfile(src, dest.with_suffix(src.suffix))
                dest = dest.with_suffix(src.suffix)
            else:
                img = Image.open(src).convert("RGB")
                if "resized" in variant:
                    f = 0.7 if "0.7" in variant else 1.3
                    img = img.resize((round(img.width * f), round(img.height * f)), Image.Resampling.BICUBIC)
                img.save(dest, "JPEG", quality=60 if "q60" in variant else 85)
            copied.append({"path": dest.relative_to(catalog).as_posix(), "original": rel, "variant": variant})
    return {"catalog": str(catalog), "moved": moved, "copied": copied}


def score(report: dict, planted: dict) -> dict:
    """Found planted problems and false flags, from the doctor's JSON report.

    A moved photo counts as found when it is flagged as likely mislabelled, or as a duplicate of a photo of its true
    product (a sequential near-twin: the flag names the right product either way). A duplicate flag that pairs a
    planted photo with something other than its planted twin points at a planted photo all the same: it is counted
    apart, neither true nor false.
    """
    moved = {m["path"]: m["true_product"] for m in planted["moved"]}
    copies = {c["path"] for c in planted["copied"]}
    pairs = {frozenset((c["path"], c["original"])) for c in planted["copied"]}
    mis_flags = {f["path"] for f in report["mislabelled"]}
    dup_flags = {frozenset((d["a"]["path"], d["b"]["path"])) for d in report["duplicates"]}
    by_twin = set()
    for d in report["duplicates"]:
        for x, y in ((d["a"], d["b"]), (d["b"], d["a"])):
            if moved.get(x["path"]) == y["product_id"]:
                by_twin.add(x["path"])
    found_mis = set(moved) & (mis_flags | by_twin)
    found_dup = pairs & dup_flags
    planted_paths = set(moved) | copies
    false_mis = sorted(mis_flags - planted_paths)
    other_dup = [p for p in dup_flags - pairs]
    false_dup = sorted(tuple(sorted(p)) for p in other_dup if not (set(p) & planted_paths))
    return {
        "mislabels_planted": len(moved),
        "mislabels_found": len(found_mis),
        "mislabels_found_as_mislabel": len(set(moved) & mis_flags),
        "duplicates_planted": len(pairs),
        "duplicates_found": len(found_dup),
        "true_flags": len(found_mis) + len(found_dup),
        "false_flags": len(false_mis) + len(false_dup),
        "flags_on_planted_photos_otherwise": len(other_dup) - len(false_dup),
        "false_mislabel_flags": false_mis,
        "false_duplicate_flags": false_dup,
        "missed_mislabels": sorted(set(moved) - found_mis),
        "missed_duplicates": sorted(tuple(sorted(p)) for p in pairs - dup_flags),
        "other_flags": {k: len(report[k]) for k in ("outliers", "tiny", "blurred", "confused_pairs")},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--catalog", type=Path, default=DEFAULT_CATALOG)
    ap.add_argument("--work", type=Path, default=Path("/tmp/doctor-bench"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "doctor_bench.json")
    ap.add_argument("--report", type=Path, help="where the doctor writes its HTML/JSON (default: WORK/report)")
    ap.add_argument("--keep", action="store_true", help="reuse WORK/catalog if it was planted with this seed")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not args.catalog.is_dir():
        print(f"catalog {args.catalog} not found (see ../shared/data/README.md)", file=sys.stderr)
        return 2
    from lookalike import Settings
    from lookalike.doctor import diagnose

    args.work.mkdir(parents=True, exist_ok=True)
    planted_file = args.work / f"planted-seed{args.seed}.json"
    if args.keep and planted_file.is_file() and (args.work / "catalog").is_dir():
        planted = json.loads(planted_file.read_text())
    else:
        planted = plant(args.catalog, args.work, args.seed)
        planted_file.write_text(json.dumps(planted, indent=1))
    settings = Settings(
        config_file=None, environ={}, model_name=args.model, data_dir=planted["catalog"], cache_dir=args.work / "cache"
    )
    start = time.perf_counter()
    report = diagnose(settings, out_dir=args.report or args.work / "report")
    seconds = time.perf_counter() - start
    result = {"seed": args.seed, "model": args.model, "seconds": round(seconds, 1), **score(report, planted)}
    result["thresholds"] = report["thresholds"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, list)}, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
