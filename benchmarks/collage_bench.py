"""Several products in one photo, measured: seeded collages of the Grocery dev query photos.

No box labels exist for this data, so they are made: 2x2 and 1x3 mosaics of photos of *different* products on
a phone-photo canvas (4032x3024), each photo scaled to 80-100% of its cell and placed at a seeded offset on a
grey, slightly noisy background. A product counts as found when its tile's region (the best-scoring region
whose centre lies in the tile) returns it first. Beside it: the single-photo top-1 of the same photos, as
product results (the same test: first product right) and as images (Recall@1: first image right).

    nice -n 10 python benchmarks/collage_bench.py [--limit N] [--layouts 2x2,1x3] [--out results/bench/collage.json]

Index: the Grocery catalog, backbone efficientnet_lite0, default settings (built into --cache on first use).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from common import GROCERY, print_table, write_results
from lookalike import ImageSearchEngine, Settings
from lookalike.regions import search_regions

CANVAS = (4032, 3024)  # a 12-megapixel phone photo, landscape
LAYOUTS = {"2x2": (2, 2), "1x3": (1, 3)}  # rows, columns


def photos_by_product(root: Path) -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        if files:
            out[folder.name] = files
    return out


def groups(by_product: dict[str, list[Path]], n: int, seed: int) -> list[list[tuple[str, Path]]]:
    """Every photo used at most once per layout, each group of n photos of n different products (seeded)."""
    rng = np.random.default_rng(seed)
    pools = {p: list(rng.permutation(len(files))) for p, files in by_product.items()}
    out = []
    while True:
        left = [p for p in pools if pools[p]]
        if len(left) < n:
            return out
        # products with most photos left first, ties broken at random: uses nearly every photo
        order = sorted(left, key=lambda p: (-len(pools[p]), rng.random()))
        chosen = order[:n]
        rng.shuffle(chosen)
        out.append([(p, by_product[p][pools[p].pop()]) for p in chosen])


def collage(items: list[tuple[str, Path]], layout: tuple[int, int], seed: int) -> tuple[Image.Image, list[tuple]]:
    rows, cols = layout
    rng = np.random.default_rng(seed)
    w, h = CANVAS
    noise = rng.normal(128, 10, (h // 8, w // 8, 3)).clip(0, 255).astype(np.uint8)
    canvas = Image.fromarray(noise, "RGB").resize(CANVAS, Image.Resampling.BILINEAR)
    cw, ch = w // cols, h // rows
    tiles = []
    for k, (product, path) in enumerate(items):
        r, c = divmod(k, cols)
        with Image.open(path) as im:
            photo = im.convert("RGB")
        fit = min(cw / photo.width, ch / photo.height) * rng.uniform(0.8, 1.0)
        pw, ph = round(photo.width * fit), round(photo.height * fit)
        x = c * cw + int(rng.integers(0, cw - pw + 1))
        y = r * ch + int(rng.integers(0, ch - ph + 1))
        canvas.paste(photo.resize((pw, ph), Image.Resampling.BICUBIC), (x, y))
        tiles.append((product, (x, y, x + pw, y + ph)))
    return canvas, tiles


def tile_found(tile_box: tuple, product: str, regions) -> tuple[bool, bool, bool]:
    """(found, has_region, is_match): the best region whose centre lies in the tile returns ``product`` first;
    is_match: its first hit clears the calibrated no-match threshold."""
    x0, y0, x1, y1 = tile_box
    inside = [r for r in regions if x0 <= (r.box[0] + r.box[2]) / 2 < x1 and y0 <= (r.box[1] + r.box[3]) / 2 < y1]
    if not inside:
        return False, False, False
    best = max(inside, key=lambda r: r.score)
    return best.product_id == product, True, bool(best.hits[0].get("match", True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=None, help="collages per layout (default: all)")
    ap.add_argument("--layouts", default="2x2,1x3")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--refine", type=int, default=1)
    ap.add_argument(
        "--only-matches",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="keep only regions above the calibrated no-match threshold (search_regions' default); off by default "
        "here so that a tile counts like a single photo's first result",
    )
    ap.add_argument("--cache", type=Path, default=Path("/tmp/lookalike-collage-bench/cache"))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    settings = Settings(config_file=None, environ={}, data_dir=GROCERY / "catalog", cache_dir=args.cache)
    engine = ImageSearchEngine(settings)
    try:
        engine.load_index()
    except Exception:  # noqa: BLE001 - first run: build it (cached features make later runs fast)
        engine.build_index(progress=False)
    by_product = photos_by_product(GROCERY / "queries")

    rows, details = [], {}

    def save() -> Path:  # after every layout, so a long run that is stopped keeps what it measured
        payload: dict[str, Any] = {
            "settings": {
                "model": settings.model_name,
                "canvas": CANVAS,
                "seed": args.seed,
                "refine": args.refine,
                "only_matches": args.only_matches,
                "limit": args.limit,
            },
            "results": rows,
            "tiles": details,
        }
        return write_results("collage", payload, args.out)

    for name in args.layouts.split(","):
        layout = LAYOUTS[name]
        n = layout[0] * layout[1]
        sets = groups(by_product, n, args.seed)[: args.limit]
        used = [(p, path) for s in sets for p, path in s]
        raw = engine.extractor.extract([path for _, path in used], progress=False).vectors
        single = engine.search_vectors(raw, top_k=1)
        single_img = engine.search_vectors(raw, top_k=1, by_product=False)
        single_top1 = float(np.mean([bool(h) and h[0]["product_id"] == p for (p, _), h in zip(used, single)]))
        single_r1 = float(np.mean([bool(h) and h[0]["product_id"] == p for (p, _), h in zip(used, single_img)]))
        found = have = regions_total = found_match = 0
        start = time.perf_counter()
        per = []
        for i, items in enumerate(sets):
            image, tiles = collage(items, layout, seed=args.seed * 100_000 + i)
            regions = search_regions(engine, image, top_k=5, refine=args.refine, only_matches=args.only_matches)
            regions_total += len(regions)
            for product, box in tiles:
                f, h, m = tile_found(box, product, regions)
                found += f
                have += h
                found_match += f and m
                per.append({"collage": i, "product": product, "found": f, "match": m})
        seconds = time.perf_counter() - start
        tiles_n = len(used)
        row = {
            "layout": name,
            "collages": len(sets),
            "tiles": tiles_n,
            "found_rate": found / tiles_n,
            "found_and_match": found_match / tiles_n,
            "tiles_with_region": have / tiles_n,
            "regions_per_collage": regions_total / max(1, len(sets)),
            "single_product_top1": single_top1,
            "single_recall@1": single_r1,
            "gap_points": 100 * (single_top1 - found / tiles_n),
            "s_per_collage": seconds / max(1, len(sets)),
        }
        rows.append(row)
        details[name] = per
        print_table([row], list(row), title=f"collages {name}")
        save()
    path = save()
    print_table(rows, list(rows[0]), title="region search on collages vs single photos")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
