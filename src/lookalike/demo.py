"""The offline demo: a small catalog made from the real photos that ship inside scikit-image.

Each photo becomes a product with several catalog views (flips, crops, small rotations, colour and scale
changes); other views of the same photo, never indexed, are the queries. No network, no server.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from .engine import ImageSearchEngine
from .settings import Settings

logger = logging.getLogger(__name__)

# product id -> scikit-image loader name
PHOTOS = {
    "astronaut": "astronaut",
    "cat": "chelsea",
    "coffee-cup": "coffee",
    "rocket": "rocket",
    "galaxies": "hubble_deep_field",
    "tissue-sample": "immunohistochemistry",
    "motorcycle": "stereo_motorcycle",
    "cameraman": "camera",
    "coins": "coins",
    "clock": "clock",
}


def _load(name: str) -> Image.Image:
    from skimage import data

    pixels = getattr(data, name)()
    if isinstance(pixels, tuple):  # stereo pairs: take the left view
        pixels = pixels[0]
    return Image.fromarray(np.asarray(pixels)).convert("RGB")


def _crop(img: Image.Image, box: tuple[float, float, float, float]) -> Image.Image:
    w, h = img.size
    return img.crop((int(box[0] * w), int(box[1] * h), int(box[2] * w), int(box[3] * h)))


def _scale(img: Image.Image, factor: float) -> Image.Image:
    return img.resize((max(1, int(img.width * factor)), max(1, int(img.height * factor))), Image.Resampling.BICUBIC)


CATALOG_VIEWS = {
    "original": lambda im: im,
    "flipped": ImageOps.mirror,
    "centre-crop": lambda im: _crop(im, (0.1, 0.1, 0.9, 0.9)),
    "rotated": lambda im: im.rotate(12, resample=Image.Resampling.BICUBIC, fillcolor=(255, 255, 255)),
    "warm-light": lambda im: ImageEnhance.Color(ImageEnhance.Brightness(im).enhance(1.15)).enhance(1.3),
    "small": lambda im: _scale(im, 0.4),
}
QUERY_VIEWS = {
    "corner-crop-tilted": lambda im: _crop(im, (0.0, 0.05, 0.75, 0.85)).rotate(
        -8, resample=Image.Resampling.BICUBIC, fillcolor=(255, 255, 255)
    ),
    "dim-flipped-small": lambda im: _scale(ImageEnhance.Brightness(ImageOps.mirror(im)).enhance(0.7), 0.6),
}


@dataclass
class DemoQuery:
    path: Path
    expected: str
    results: list[dict]

    @property
    def found_first(self) -> bool:
        return bool(self.results) and self.results[0]["product_id"] == self.expected


def make_demo_catalog(workdir: Path) -> list[tuple[Path, str]]:
    """Write the catalog under ``workdir/catalog`` and the held-out queries under ``workdir/queries``."""
    queries = []
    for product, loader in PHOTOS.items():
        photo = _load(loader)
        folder = workdir / "catalog" / product
        folder.mkdir(parents=True, exist_ok=True)
        for view, make in CATALOG_VIEWS.items():
            make(photo).save(folder / f"{view}.jpg", quality=90)
        qfolder = workdir / "queries" / product
        qfolder.mkdir(parents=True, exist_ok=True)
        for view, make in QUERY_VIEWS.items():
            path = qfolder / f"{view}.jpg"
            make(photo).save(path, quality=85)
            queries.append((path, product))
    return queries


def run_demo(settings: Settings, workdir: Path, top_k: int = 3) -> list[DemoQuery]:
    """Build the demo catalog in ``workdir``, index it, and search with every held-out view."""
    workdir = Path(workdir)
    queries = make_demo_catalog(workdir)
    demo_settings = settings.replace(
        data_dir=workdir / "catalog", cache_dir=workdir / "cache", index_file=None, metadata_file=None
    )
    engine = ImageSearchEngine(demo_settings)
    report = engine.build_index()
    logger.info("demo catalog: %d products, %d images", report.products, report.images)
    results = engine.search_batch([str(p) for p, _ in queries], top_k=top_k)
    return [DemoQuery(path, expected, hits) for (path, expected), hits in zip(queries, results)]
