"""Several products in one photo: proposals, non-maximum suppression, region search over a real engine."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import PRODUCTS, product_image
from lookalike import ImageSearchEngine
from lookalike.regions import RegionResult, iou, overlaps, propose_regions, search_regions, select_regions

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


class ColourEngine:
    """A stand-in engine: a crop "is" the colour covering most of it, as sure as the share it covers."""

    def __init__(self):
        self.calls: list[int] = []
        self.kwargs: list[dict] = []

    def search_batch(self, queries, top_k=5, **kwargs):
        self.calls.append(len(queries))
        self.kwargs.append(kwargs)
        out = []
        for img in queries:
            arr = np.asarray(img.convert("RGB"), dtype=np.int32)
            shares = {
                name: float(np.mean(np.abs(arr - np.array(rgb)).sum(axis=2) < 60)) for name, rgb in COLOURS.items()
            }
            ranked = sorted(shares.items(), key=lambda kv: -kv[1])[:top_k]
            out.append([{"rank": i + 1, "product_id": p, "similarity": s} for i, (p, s) in enumerate(ranked) if s > 0])
        return out


def colour_photo() -> tuple[Image.Image, dict[str, tuple[int, int, int, int]]]:
    arr = np.full((600, 800, 3), 128, np.uint8)
    boxes = {"red": (40, 60, 260, 280), "green": (420, 50, 700, 330), "blue": (300, 380, 520, 580)}
    for name, (x0, y0, x1, y1) in boxes.items():
        arr[y0:y1, x0:x1] = COLOURS[name]
    return Image.fromarray(arr, "RGB"), boxes


def test_proposals_cover_the_photo_and_stay_inside():
    boxes = propose_regions((800, 600))
    assert boxes[0] == (0, 0, 800, 600)
    assert all(0 <= x0 < x1 <= 800 and 0 <= y0 < y1 <= 600 for x0, y0, x1, y1 in boxes)
    assert len(set(boxes)) == len(boxes)
    # every pixel lies in some window of the smallest scale (the grid reaches both edges)
    side = round(0.4 * 600)
    small = [b for b in boxes if b[2] - b[0] == side]
    assert {b[0] for b in small} >= {0, 800 - side} and {b[1] for b in small} >= {0, 600 - side}
    tall = propose_regions((800, 600), scales=(0.5,), aspects=(0.5,))
    assert all(b[3] - b[1] > b[2] - b[0] for b in tall[1:])
    with pytest.raises(ValueError, match="scales are fractions"):
        propose_regions((800, 600), scales=(1.5,))
    with pytest.raises(ValueError, match="has no regions"):
        propose_regions((0, 600))


def test_iou_and_overlap():
    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0
    assert iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    inner, outer = (2, 2, 6, 6), (0, 0, 20, 20)
    assert iou(inner, outer) < 0.3
    assert overlaps(inner, outer, iou_threshold=0.3, contain_threshold=0.6)  # one lies inside the other
    assert not overlaps((0, 0, 10, 10), (9, 9, 20, 20), iou_threshold=0.3, contain_threshold=0.6)


def hit(product, sim, **extra):
    return [{"product_id": product, "similarity": sim, **extra}]


def test_select_regions_keeps_the_best_window_per_object_and_per_product():
    boxes = [(0, 0, 10, 10), (1, 1, 11, 11), (50, 50, 60, 60), (100, 0, 110, 10), (0, 0, 200, 200), (70, 0, 80, 10)]
    hits = [hit("a", 0.9), hit("b", 0.95), hit("c", 0.8), hit("b", 0.85), hit("d", 0.99), hit("e", 0.1)]
    kept = select_regions(boxes, hits, min_similarity=0.5)
    # the whole-photo window scores best and contains the others: it wins; nothing inside it survives
    assert [r.product_id for r in kept] == ["d"]
    boxes[4] = (300, 300, 310, 310)
    kept = select_regions(boxes, hits, min_similarity=0.5)
    # b's best window suppresses the overlapping a window; b's second window is dropped (one region per product)
    assert [(r.product_id, r.box) for r in kept] == [
        ("d", (300, 300, 310, 310)),
        ("b", (1, 1, 11, 11)),
        ("c", boxes[2]),
    ]
    assert select_regions(boxes, hits, max_regions=2)[-1].product_id == "b"
    assert "e" in {r.product_id for r in select_regions(boxes, hits)}  # no similarity floor: kept
    # a calibrated index says which hits are matches; non-matches never become regions
    assert select_regions([(0, 0, 5, 5)], [hit("a", 0.9, match=False)]) == []
    assert select_regions([(0, 0, 5, 5)], [hit("a", 0.9, match=False)], only_matches=False)[0].product_id == "a"
    assert select_regions([(0, 0, 5, 5)], [[]]) == []


def test_search_regions_finds_each_object_and_tightens_its_box():
    photo, truth = colour_photo()
    engine = ColourEngine()
    regions = search_regions(engine, photo, top_k=3, min_similarity=0.5)
    assert all(isinstance(r, RegionResult) for r in regions)
    assert {r.product_id for r in regions} == set(truth)
    for r in regions:
        assert iou(r.box, truth[r.product_id]) > 0.5, (r.product_id, r.box, truth[r.product_id])
        assert r.to_dict()["box"] == list(r.box) and r.hits[0]["product_id"] == r.product_id
    unrefined = search_regions(engine, photo, top_k=3, min_similarity=0.5, refine=0)
    assert sum(r.score for r in regions) >= sum(r.score for r in unrefined)
    assert len(engine.calls) == 2 + 1  # one batch of proposals, one of refinements; then one batch (refine=0)
    search_regions(engine, photo, where={"category": "dairy"})
    assert engine.kwargs[-1] == {"where": {"category": "dairy"}}  # search options reach every batch search


def test_search_regions_on_a_large_photo_works_on_a_small_copy_and_reports_full_size_boxes():
    photo, truth = colour_photo()
    big = photo.resize((3200, 2400), Image.Resampling.NEAREST)
    regions = search_regions(ColourEngine(), big, min_similarity=0.5)
    assert {r.product_id for r in regions} == set(truth)
    for r in regions:
        x0, y0, x1, y1 = truth[r.product_id]
        assert iou(r.box, (4 * x0, 4 * y0, 4 * x1, 4 * y1)) > 0.5


def test_search_regions_over_a_real_engine(make_settings, catalog):
    """A 2x2 collage of held-out views of four catalog products: each tile's region returns its product."""
    engine = ImageSearchEngine(make_settings())
    engine.build_index()
    canvas = Image.new("RGB", (400, 400), (128, 128, 128))
    tiles = {}
    for k, product in enumerate(PRODUCTS):
        x, y = 200 * (k % 2) + 10, 200 * (k // 2) + 10
        canvas.paste(product_image(k, 60, size=180), (x, y))
        tiles[product] = (x, y, x + 180, y + 180)
    regions = search_regions(engine, canvas, top_k=3)
    for product, box in tiles.items():
        inside = [r for r in regions if box[0] <= (r.box[0] + r.box[2]) / 2 < box[2]]
        inside = [r for r in inside if box[1] <= (r.box[1] + r.box[3]) / 2 < box[3]]
        assert inside and max(inside, key=lambda r: r.score).product_id == product, (product, regions)
