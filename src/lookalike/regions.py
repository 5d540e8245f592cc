"""Several products in one photo: propose regions, search each, keep confident non-overlapping matches.

No detector weights are reachable offline, so proposals are class-agnostic sliding windows at a few scales and
aspect ratios (plus the whole photo). Every window is searched with the engine's public batch search; a window
is as confident as its best product's similarity. Windows are then taken best first (non-maximum suppression):
a window is kept when its product is not taken yet and it neither overlaps a kept one (IoU) nor mostly lies
inside one or around one. Kept windows can be refined: shifted and rescaled copies are searched and the best
one for the same product replaces it, so boxes settle on the product rather than on the window grid.

Only the engine's public API is used (``search_batch(list_of_PIL_images, top_k, ...)``, ``settings``,
``no_match_threshold``), so this works over any store the engine uses.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from PIL import Image

from .imaging import ImageSource, crop_box, open_image

logger = logging.getLogger(__name__)

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, x1/y1 exclusive

DEFAULT_SCALES = (1.0, 0.7, 0.5, 0.4)  # window side as a fraction of the photo's short side
DEFAULT_ASPECTS = (1.0,)  # width / height
DEFAULT_OVERLAP = 0.5  # neighbouring windows of one scale share this fraction of their side
WORK_SIDE = 320  # the smallest window is cut from a copy scaled so that it is about this many pixels


class SearchEngine(Protocol):
    """What region search needs of an engine (``ImageSearchEngine`` has it)."""

    def search_batch(self, queries: Sequence[Any], top_k: int = 5, **kwargs: Any) -> list[list[dict[str, Any]]]: ...


@dataclass(frozen=True)
class RegionResult:
    """One region of the photo and what it matched; ``score`` is its best product's similarity."""

    box: Box
    score: float
    hits: list[dict[str, Any]] = field(default_factory=list)

    @property
    def product_id(self) -> str | None:
        return self.hits[0]["product_id"] if self.hits else None

    def to_dict(self) -> dict[str, Any]:
        return {"box": list(self.box), "score": self.score, "hits": self.hits}


def propose_regions(
    size: tuple[int, int] | Image.Image,
    *,
    scales: Sequence[float] = DEFAULT_SCALES,
    aspects: Sequence[float] = DEFAULT_ASPECTS,
    overlap: float = DEFAULT_OVERLAP,
    max_regions: int = 400,
) -> list[Box]:
    """Sliding windows over a photo of ``size`` (width, height) or over a PIL image: the whole photo first,
    then each scale (a fraction of the short side) and aspect ratio, stepping by ``1 - overlap`` of the side."""
    width, height = size.size if isinstance(size, Image.Image) else size
    if width <= 0 or height <= 0:
        raise ValueError(f"an image of {width}x{height} pixels has no regions")
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), not {overlap}")
    short = min(width, height)
    boxes: list[Box] = [(0, 0, width, height)]
    seen = set(boxes)
    for scale in scales:
        if not 0 < scale <= 1:
            raise ValueError(f"scales are fractions of the short side in (0, 1], not {scale}")
        for aspect in aspects:
            if aspect <= 0:
                raise ValueError(f"aspect ratios are positive, not {aspect}")
            w = min(width, round(scale * short * math.sqrt(aspect)))
            h = min(height, round(scale * short / math.sqrt(aspect)))
            for y in _starts(height, h, overlap):
                for x in _starts(width, w, overlap):
                    box = (x, y, x + w, y + h)
                    if box not in seen:
                        seen.add(box)
                        boxes.append(box)
    if len(boxes) > max_regions:
        logger.info("%d proposals, keeping the first %d (coarsest scales)", len(boxes), max_regions)
        boxes = boxes[:max_regions]
    return boxes


def _starts(extent: int, side: int, overlap: float) -> list[int]:
    if side >= extent:
        return [0]
    step = max(1.0, side * (1 - overlap))
    n = math.ceil((extent - side) / step) + 1
    return sorted({round(i * (extent - side) / (n - 1)) for i in range(n)})


def iou(a: Box, b: Box) -> float:
    inter = _intersection(a, b)
    union = _area(a) + _area(b) - inter
    return inter / union if union > 0 else 0.0


def _area(b: Box) -> int:
    return max(0, b[2] - b[0]) * max(0, b[3] - b[1])


def _intersection(a: Box, b: Box) -> int:
    return max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))


def overlaps(a: Box, b: Box, *, iou_threshold: float, contain_threshold: float) -> bool:
    """Whether two regions are about one object: they overlap (IoU) or one mostly lies inside the other."""
    inter = _intersection(a, b)
    if inter == 0:
        return False
    smaller = min(_area(a), _area(b))
    return iou(a, b) > iou_threshold or (smaller > 0 and inter / smaller > contain_threshold)


def select_regions(
    boxes: Sequence[Box],
    hits: Sequence[Sequence[dict[str, Any]]],
    *,
    min_similarity: float | None = None,
    max_regions: int = 10,
    iou_threshold: float = 0.3,
    contain_threshold: float = 0.6,
    only_matches: bool = True,
) -> list[RegionResult]:
    """Non-maximum suppression over scored windows, one region per product, best first.

    A window scores its first hit's similarity; it is kept when that reaches ``min_similarity`` (and, where the
    index is calibrated and ``only_matches``, the hit is a ``match``), its product is not taken, and it does not
    :func:`overlaps` a kept region.
    """
    order = sorted(
        (i for i, h in enumerate(hits) if h), key=lambda i: (-float(hits[i][0]["similarity"]), _area(boxes[i]))
    )
    kept: list[RegionResult] = []
    taken: set[str] = set()
    for i in order:
        top = hits[i][0]
        score = float(top["similarity"])
        if min_similarity is not None and score < min_similarity:
            break
        if (only_matches and top.get("match") is False) or top["product_id"] in taken:
            continue
        if any(
            overlaps(boxes[i], k.box, iou_threshold=iou_threshold, contain_threshold=contain_threshold) for k in kept
        ):
            continue
        kept.append(RegionResult(tuple(int(v) for v in boxes[i]), score, list(hits[i])))  # type: ignore[arg-type]
        taken.add(top["product_id"])
        if len(kept) >= max_regions:
            break
    return kept


def search_regions(
    engine: SearchEngine,
    image: ImageSource,
    *,
    top_k: int = 5,
    proposals: Sequence[Box] | None = None,
    min_similarity: float | None = None,
    max_regions: int = 10,
    refine: int = 1,
    iou_threshold: float = 0.3,
    contain_threshold: float = 0.6,
    only_matches: bool = True,
    **search_kwargs: Any,
) -> list[RegionResult]:
    """The products in a photo of several: (box, hits) per region, best region first.

    ``proposals`` default to :func:`propose_regions`. With ``only_matches`` (default) a calibrated index keeps
    only regions whose best hit is a match (above the no-match threshold). ``refine`` rounds of local search
    (shifted and rescaled boxes) move each kept box to where its product scores best. ``search_kwargs`` go to
    ``engine.search_batch`` (e.g. ``where=`` once the engine filters). Boxes are in pixels of the photo as given
    (EXIF-rotated).
    """
    settings = getattr(engine, "settings", None)
    max_pixels = getattr(settings, "max_image_pixels", 40_000_000)
    photo = open_image(image, max_pixels).image
    boxes = list(proposals) if proposals is not None else propose_regions(photo.size)
    if not boxes:
        return []
    work, factor = _working_copy(photo, boxes)
    hits = _search_boxes(engine, work, factor, boxes, top_k, search_kwargs)
    kept = select_regions(
        boxes,
        hits,
        min_similarity=min_similarity,
        max_regions=max_regions,
        iou_threshold=iou_threshold,
        contain_threshold=contain_threshold,
        only_matches=only_matches,
    )
    for _ in range(max(0, refine)):
        kept = _refine(engine, work, factor, photo.size, kept, top_k, search_kwargs)
    return kept


def _working_copy(photo: Image.Image, boxes: Sequence[Box]) -> tuple[Image.Image, float]:
    """A downscaled copy when even the smallest window is much larger than the model looks at (cheap crops)."""
    smallest = min(min(b[2] - b[0], b[3] - b[1]) for b in boxes)
    factor = min(1.0, WORK_SIDE / max(1, smallest))
    if factor >= 0.9:
        return photo, 1.0
    size = (max(1, round(photo.width * factor)), max(1, round(photo.height * factor)))
    return photo.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0), factor


def _search_boxes(engine, work, factor, boxes, top_k, search_kwargs) -> list[list[dict[str, Any]]]:
    crops = [crop_box(work, tuple(v * factor for v in b)) for b in boxes]
    return engine.search_batch(crops, top_k, **search_kwargs)


def _refine(engine, work, factor, size, kept, top_k, search_kwargs) -> list[RegionResult]:
    """Try each kept box shifted by a quarter of its side and scaled by 0.8 / 1.25; keep the best for its product."""
    if not kept:
        return kept
    width, height = size
    candidates: list[tuple[int, Box]] = []
    for n, region in enumerate(kept):
        x0, y0, x1, y1 = region.box
        w, h = x1 - x0, y1 - y0
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        for dx, dy, s in (
            (-0.25, 0, 1),
            (0.25, 0, 1),
            (0, -0.25, 1),
            (0, 0.25, 1),
            (0, 0, 0.8),
            (0, 0, 1.25),
        ):
            nw, nh = w * s, h * s
            ncx, ncy = cx + dx * w, cy + dy * h
            box = (
                max(0, round(ncx - nw / 2)),
                max(0, round(ncy - nh / 2)),
                min(width, round(ncx + nw / 2)),
                min(height, round(ncy + nh / 2)),
            )
            if box[2] - box[0] >= 8 and box[3] - box[1] >= 8 and box != region.box:
                candidates.append((n, box))
    hits = _search_boxes(engine, work, factor, [b for _, b in candidates], top_k, search_kwargs)
    best = list(kept)
    for (n, box), h in zip(candidates, hits):
        if h and h[0]["product_id"] == kept[n].product_id and float(h[0]["similarity"]) > best[n].score:
            best[n] = RegionResult(box, float(h[0]["similarity"]), list(h))
    return best


__all__ = ["RegionResult", "iou", "overlaps", "propose_regions", "search_regions", "select_regions"]
