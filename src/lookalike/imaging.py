"""Open one untrusted image safely and hand back RGB pixels.

Every failure becomes an :class:`ImageError` that names the source and says why, so a build can skip the file
and report it, and a query can be answered with a clear message.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

ImageSource = str | Path | bytes | bytearray | memoryview | Image.Image

# Decoders we accept. Pillow can open many more (EPS would run Ghostscript); untrusted input gets only these.
# (Multi-picture JPEGs, "MPO", come through the JPEG opener.)
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP")
ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageError(ValueError):
    """An image that cannot be used; ``source`` names it and ``reason`` says why."""

    def __init__(self, source: str, reason: str):
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


@dataclass(frozen=True)
class DecodedImage:
    image: Image.Image  # RGB, EXIF orientation applied
    format: str  # what the bytes really were (JPEG, PNG, ...), not what the name says


def describe(source: ImageSource) -> str:
    """A short human name for an image source, used in error messages."""
    if isinstance(source, (str, Path)):
        return str(source)
    if isinstance(source, Image.Image):
        return "<PIL image>"
    return f"<{len(source)} bytes>"


def open_image(source: ImageSource, max_pixels: int, *, draft_size: int | None = None) -> DecodedImage:
    """Decode ``source`` (a path, raw bytes or a PIL image) into RGB.

    ``draft_size`` lets JPEG decode at a reduced scale that is still at least that many pixels on each side,
    which is much faster when the model only needs a small input.
    """
    name = describe(source)
    if isinstance(source, Image.Image):
        img, fmt = source, source.format or "PIL"
        _check_size(name, img.size, max_pixels)
        return DecodedImage(_to_rgb(name, _orient(name, img)), fmt)
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ImageError(name, "empty data (0 bytes)")
        fp: io.BufferedIOBase = io.BytesIO(bytes(source))
    else:
        path = Path(source)
        try:
            if path.is_dir():
                raise IsADirectoryError
            if path.stat().st_size == 0:
                raise ImageError(name, "empty file (0 bytes)")
            fp = open(path, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            raise ImageError(name, "file not found") from None
        except IsADirectoryError:
            raise ImageError(name, "is a directory, not an image file") from None
        except PermissionError:
            raise ImageError(name, "permission denied") from None
    with fp:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit is checked below
                img = Image.open(fp, formats=ALLOWED_FORMATS)
        except UnidentifiedImageError:
            raise ImageError(name, f"not a supported image (readable formats: {', '.join(ALLOWED_FORMATS)})") from None
        except Image.DecompressionBombError:
            raise ImageError(name, "image is too large (refused as a possible decompression bomb)") from None
        except (OSError, ValueError, SyntaxError, EOFError) as exc:  # Pillow's header parsers raise all of these
            raise ImageError(name, f"unreadable image header ({exc})") from None
        fmt = img.format or "unknown"
        _check_size(name, img.size, max_pixels)
        if draft_size and fmt == "JPEG":
            img.draft("RGB", (draft_size, draft_size))
        try:
            img.load()
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            text = str(exc)
            reason = "truncated image data" if "truncated" in text else f"corrupt image data ({text})"
            raise ImageError(name, reason) from None
        return DecodedImage(_to_rgb(name, _orient(name, img)), fmt)


def _check_size(name: str, size: tuple[int, int], max_pixels: int) -> None:
    w, h = size
    if w <= 0 or h <= 0:
        raise ImageError(name, f"image has no pixels ({w}x{h})")
    if w * h > max_pixels:
        raise ImageError(name, f"image is too large: {w}x{h} = {w * h:,} pixels, the limit is {max_pixels:,}")


def _orient(name: str, img: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(img)
    except Exception:  # a broken EXIF block must not lose an otherwise good image
        return img


def _to_rgb(name: str, img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = float(arr.max()) if arr.size else 0.0
        lo = float(arr.min()) if arr.size else 0.0
        if mode == "F":
            scaled = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        elif mode.startswith("I;16") or hi > 255:
            scaled = arr / 257.0  # 16-bit data spans 0..65535
        else:
            scaled = arr  # 32-bit integer mode holding 8-bit values
        return Image.fromarray(np.clip(scaled, 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
        if mode == "RGB":
            return img
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))  # product shots expect white, not black
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV
    except (ValueError, OSError) as exc:
        raise ImageError(name, f"cannot convert colour mode {mode} to RGB ({exc})") from None


Box = tuple[float, float, float, float]


def crop_box(image: Image.Image, box: Sequence[float], *, source: str = "<query>") -> Image.Image:
    """The part of ``image`` inside ``box`` = (x0, y0, x1, y1) in pixels (x1, y1 exclusive), clipped to the image.

    Raises :class:`ImageError` for a box that is not four finite numbers with x0 < x1 and y0 < y1, or that
    leaves no pixel once clipped (it lies outside the image).
    """
    x0, y0, x1, y1 = parse_box(box, source=source)
    w, h = image.size
    cx0, cy0 = max(0, math.floor(x0)), max(0, math.floor(y0))
    cx1, cy1 = min(w, math.ceil(x1)), min(h, math.ceil(y1))
    if cx1 <= cx0 or cy1 <= cy0:
        raise ImageError(source, f"box {_box_text((x0, y0, x1, y1))} lies outside the {w}x{h} image")
    return image.crop((cx0, cy0, cx1, cy1))


def parse_box(box: Sequence[float] | str, *, source: str = "<query>") -> Box:
    """A box from four numbers or the text ``"x0,y0,x1,y1"`` (CLI ``--box``, HTTP ``box=``), checked."""
    if isinstance(box, str):
        parts = [p.strip() for p in box.split(",")]
        try:
            values = [float(p) for p in parts]
        except ValueError:
            raise ImageError(source, f"box {box!r} is not four numbers x0,y0,x1,y1 (pixels)") from None
    else:
        try:
            values = [float(v) for v in box]
        except (TypeError, ValueError):
            raise ImageError(source, f"box {box!r} is not four numbers x0,y0,x1,y1 (pixels)") from None
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise ImageError(source, f"box {box!r} is not four finite numbers x0,y0,x1,y1 (pixels)")
    x0, y0, x1, y1 = values
    if x1 <= x0 or y1 <= y0:
        raise ImageError(source, f"box {_box_text(values)} is empty: it needs x0 < x1 and y0 < y1")
    return x0, y0, x1, y1


def _box_text(box: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:g}" for v in box) + ")"
