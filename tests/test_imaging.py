"""open_image: every kind of input becomes RGB, every failure an ImageError that names the source and says why."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import jpeg_bytes, product_image
from lookalike import ImageError
from lookalike.imaging import ALLOWED_FORMATS, open_image

LIMIT = 10_000_000


def save(img: Image.Image, path: Path, fmt: str | None = None, **kw) -> Path:
    img.save(path, fmt, **kw)
    return path


def pixels(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.uint8)


def rgba_half_transparent() -> Image.Image:
    """4x2: left half opaque red, right half fully transparent black."""
    arr = np.zeros((2, 4, 4), np.uint8)
    arr[:, :2] = (255, 0, 0, 255)
    arr[:, 2:] = (0, 0, 0, 0)
    return Image.fromarray(arr, "RGBA")


def palette_with_transparency() -> Image.Image:
    """4x4 palette image: index 0 (transparent) everywhere but one green pixel at (1, 1)."""
    img = Image.new("P", (4, 4), 0)
    img.putpalette([0, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 6))
    img.putpixel((1, 1), 1)
    img.info["transparency"] = 0
    return img


# --- pixels from every kind of image ----------------------------------------------------------------------


def test_rgb_jpeg_path(tmp_path):
    path = tmp_path / "photo.jpg"
    product_image(0, 0).save(path)
    decoded = open_image(path, LIMIT)
    assert decoded.format == "JPEG"
    assert decoded.image.mode == "RGB"
    assert decoded.image.size == (96, 96)


def test_path_given_as_str(tmp_path):
    path = tmp_path / "photo.jpg"
    product_image(0, 0).save(path)
    assert pixels(open_image(str(path), LIMIT).image).tolist() == pixels(open_image(path, LIMIT).image).tolist()


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_bytes_input_decodes_like_the_file(tmp_path, kind):
    path = tmp_path / "photo.jpg"
    path.write_bytes(jpeg_bytes(product_image(1, 0)))
    decoded = open_image(kind(path.read_bytes()), LIMIT)
    assert decoded.format == "JPEG"
    assert decoded.image.mode == "RGB"
    np.testing.assert_array_equal(pixels(decoded.image), pixels(open_image(path, LIMIT).image))


def test_pil_input_is_returned_as_rgb():
    img = product_image(2, 0)
    decoded = open_image(img, LIMIT)
    assert decoded.image.mode == "RGB"
    np.testing.assert_array_equal(pixels(decoded.image), pixels(img))


def test_pil_input_opened_from_a_file_keeps_its_format(tmp_path):
    path = tmp_path / "photo.jpg"
    product_image(2, 0).save(path)
    with Image.open(path) as img:
        decoded = open_image(img, LIMIT)
    assert decoded.format == "JPEG"
    np.testing.assert_array_equal(pixels(decoded.image), pixels(open_image(path, LIMIT).image))


def test_pil_input_with_alpha_is_composited_on_white():
    decoded = open_image(rgba_half_transparent(), LIMIT)
    assert decoded.image.mode == "RGB"
    assert decoded.image.getpixel((0, 0)) == (255, 0, 0)
    assert decoded.image.getpixel((3, 1)) == (255, 255, 255)  # transparent black becomes white, not black


def test_pil_input_half_transparent_pixel_is_blended_with_white():
    img = Image.new("RGBA", (2, 2), (0, 0, 0, 128))
    r, g, b = open_image(img, LIMIT).image.getpixel((0, 0))
    assert r == g == b
    assert 120 <= r <= 135


@pytest.mark.parametrize(
    "img, expected",
    [
        (Image.new("L", (3, 3), 77), (77, 77, 77)),
        (Image.new("1", (3, 3), 1), (255, 255, 255)),
        (Image.new("1", (3, 3), 0), (0, 0, 0)),
        (Image.new("LA", (3, 3), (0, 0)), (255, 255, 255)),
        (Image.new("LA", (3, 3), (40, 255)), (40, 40, 40)),
        (Image.new("CMYK", (3, 3), (0, 255, 255, 0)), (255, 0, 0)),
        (Image.new("I;16", (3, 3), 65535), (255, 255, 255)),
        (Image.new("I", (3, 3), 200), (200, 200, 200)),
        (palette_with_transparency(), (255, 255, 255)),
    ],
    ids=["L", "1-white", "1-black", "LA-transparent", "LA-opaque", "CMYK", "I16", "I", "P-transparent"],
)
def test_pil_modes_become_rgb(img, expected):
    decoded = open_image(img, LIMIT)
    assert decoded.image.mode == "RGB"
    assert decoded.image.getpixel((0, 0)) == expected


def test_pil_16_bit_values_are_scaled_not_clipped():
    arr = np.array([[0, 1000, 30000, 65535]], dtype=np.uint16)
    decoded = open_image(Image.fromarray(arr), LIMIT)
    row = pixels(decoded.image)[0, :, 0].astype(int)
    np.testing.assert_allclose(row, arr[0] / 257, atol=1)  # 0..65535 maps onto 0..255


def test_grayscale_jpeg(tmp_path):
    path = save(Image.new("L", (8, 6), 90), tmp_path / "gray.jpg")
    decoded = open_image(path, LIMIT)
    assert (decoded.format, decoded.image.mode, decoded.image.size) == ("JPEG", "RGB", (8, 6))
    r, g, b = decoded.image.getpixel((4, 3))
    assert r == g == b and abs(r - 90) <= 2


def test_cmyk_jpeg(tmp_path):
    path = save(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), tmp_path / "cmyk.jpg")
    decoded = open_image(path, LIMIT)
    assert decoded.format == "JPEG"
    assert decoded.image.mode == "RGB"
    r, g, b = decoded.image.getpixel((4, 4))
    assert r > 240 and g < 15 and b < 15  # red, not its inverse


def exif_rotated_jpeg(path: Path) -> Path:
    img = Image.new("RGB", (40, 20), (200, 30, 30))
    img.paste((30, 30, 200), (0, 0, 20, 20))  # left half blue
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    img.save(path, exif=exif, quality=95)
    return path


def test_exif_orientation_is_applied(tmp_path):
    decoded = open_image(exif_rotated_jpeg(tmp_path / "rotated.jpg"), LIMIT)
    assert decoded.image.size == (20, 40)
    # rotated 90 degrees clockwise: the stored left half (blue) ends up on top
    top = decoded.image.getpixel((10, 5))
    bottom = decoded.image.getpixel((10, 35))
    assert top[2] > 150 and top[0] < 80
    assert bottom[0] > 150 and bottom[2] < 80


def test_exif_orientation_is_applied_to_bytes_and_pil_input(tmp_path):
    path = exif_rotated_jpeg(tmp_path / "rotated.jpg")
    assert open_image(path.read_bytes(), LIMIT).image.size == (20, 40)
    with Image.open(path) as img:
        assert open_image(img, LIMIT).image.size == (20, 40)


def test_draft_size_decodes_a_large_jpeg_smaller_but_not_below_the_size(tmp_path):
    path = save(Image.new("RGB", (800, 600), (10, 120, 200)), tmp_path / "big.jpg")
    decoded = open_image(path, LIMIT, draft_size=100)
    assert decoded.image.mode == "RGB"
    assert 100 <= min(decoded.image.size) < 600
    assert open_image(path, LIMIT).image.size == (800, 600)


# --- non-JPEG files ------------------------------------------------------------------------------------


def test_png_with_alpha_is_composited_on_white(tmp_path):
    path = save(rgba_half_transparent(), tmp_path / "cutout.png")
    decoded = open_image(path, LIMIT)
    assert decoded.format == "PNG"
    assert decoded.image.mode == "RGB"
    assert decoded.image.getpixel((0, 0)) == (255, 0, 0)
    assert decoded.image.getpixel((3, 1)) == (255, 255, 255)


@pytest.mark.parametrize("suffix", ["png", "gif"])
def test_palette_with_transparency(tmp_path, suffix):
    path = save(palette_with_transparency(), tmp_path / f"palette.{suffix}", transparency=0)
    decoded = open_image(path, LIMIT)
    assert decoded.image.mode == "RGB"
    assert decoded.image.getpixel((0, 0)) == (255, 255, 255)
    assert decoded.image.getpixel((1, 1)) == (0, 255, 0)


@pytest.mark.parametrize(
    "img, expected",
    [
        (Image.new("L", (4, 4), 77), (77, 77, 77)),
        (Image.new("1", (4, 4), 1), (255, 255, 255)),
        (Image.new("LA", (4, 4), (0, 0)), (255, 255, 255)),
        (Image.new("LA", (4, 4), (40, 255)), (40, 40, 40)),
    ],
    ids=["L", "1", "LA-transparent", "LA-opaque"],
)
def test_png_modes_become_rgb(tmp_path, img, expected):
    path = save(img, tmp_path / "image.png")
    decoded = open_image(path, LIMIT)
    assert (decoded.format, decoded.image.mode) == ("PNG", "RGB")
    assert decoded.image.getpixel((1, 1)) == expected


def test_16_bit_grayscale_png_is_scaled_not_clipped(tmp_path):
    arr = np.array([[0, 1000, 30000, 65535]], dtype=np.uint16)
    path = save(Image.fromarray(arr), tmp_path / "deep.png")
    with Image.open(path) as probe:
        assert probe.mode.startswith("I")
    decoded = open_image(path, LIMIT)
    row = pixels(decoded.image)[0, :, 0].astype(int)
    np.testing.assert_allclose(row, arr[0] / 257, atol=1)  # 0..65535 maps onto 0..255


def test_jpeg_named_png_is_decoded_as_jpeg(tmp_path):
    path = tmp_path / "misnamed.png"
    path.write_bytes(jpeg_bytes(Image.new("RGB", (6, 4), (0, 0, 255))))
    decoded = open_image(path, LIMIT)
    assert (decoded.format, decoded.image.size) == ("JPEG", (6, 4))


def test_format_is_read_from_the_content_not_the_name(tmp_path):
    path = save(Image.new("RGB", (6, 6), (0, 0, 255)), tmp_path / "really-a-gif.webp", "GIF")
    decoded = open_image(path, LIMIT)
    assert decoded.format == "GIF"
    assert decoded.image.mode == "RGB"
    assert decoded.image.getpixel((3, 3)) == (0, 0, 255)


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "GIF", "BMP"])
def test_other_allowed_formats_decode(tmp_path, fmt):
    path = save(
        Image.new("RGB", (10, 8), (0, 0, 0)),
        tmp_path / f"image.{fmt.lower()}",
        fmt,
        **({"lossless": True} if fmt == "WEBP" else {}),
    )
    decoded = open_image(path, LIMIT)
    assert decoded.format == fmt
    assert (decoded.image.mode, decoded.image.size) == ("RGB", (10, 8))


# --- errors -----------------------------------------------------------------------------------------------


def open_error(source, max_pixels: int = LIMIT) -> ImageError:
    with pytest.raises(ImageError) as info:
        open_image(source, max_pixels)
    err = info.value
    assert isinstance(err, ValueError)
    assert str(err) == f"{err.source}: {err.reason}"
    return err


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    err = open_error(path)
    assert err.source == str(path)
    assert err.reason == "empty file (0 bytes)"


def test_zero_bytes_input():
    err = open_error(b"")
    assert err.source == "<0 bytes>"
    assert "empty" in err.reason


def test_missing_file(tmp_path):
    path = tmp_path / "nope.jpg"
    err = open_error(path)
    assert err.source == str(path)
    assert err.reason == "file not found"


def test_directory(tmp_path):
    folder = tmp_path / "looks-like.jpg"
    folder.mkdir()
    (folder / "inside.txt").write_text("so the folder is not empty")
    err = open_error(folder)
    assert err.source == str(folder)
    assert "directory" in err.reason


def truncated_jpeg() -> bytes:
    rng = np.random.default_rng(3)
    data = jpeg_bytes(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)), quality=90)
    return data[: len(data) // 2]


def test_truncated_jpeg_file(tmp_path):
    path = tmp_path / "cut.jpg"
    path.write_bytes(truncated_jpeg())
    err = open_error(path)
    assert err.source == str(path)
    assert "truncated" in err.reason


def test_truncated_jpeg_bytes():
    data = truncated_jpeg()
    err = open_error(data)
    assert err.source == f"<{len(data)} bytes>"
    assert "truncated" in err.reason


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small real JPEG whose header (SOF0) claims another size."""
    data = bytearray(jpeg_bytes(Image.new("RGB", (8, 8), (50, 60, 70))))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 7] = height.to_bytes(2, "big")
    data[sof + 7 : sof + 9] = width.to_bytes(2, "big")
    return bytes(data)


def test_header_beyond_max_pixels_is_refused(tmp_path):
    path = tmp_path / "huge.jpg"
    path.write_bytes(jpeg_claiming(5000, 5000))
    err = open_error(path, max_pixels=1_000_000)
    assert err.source == str(path)
    assert "too large" in err.reason
    assert "5000x5000" in err.reason
    assert "1,000,000" in err.reason


def test_header_of_a_decompression_bomb_is_refused():
    err = open_error(jpeg_claiming(60000, 60000), max_pixels=1_000_000_000)
    assert "too large" in err.reason


def test_image_exactly_at_the_limit_is_accepted():
    assert open_image(jpeg_bytes(Image.new("RGB", (10, 10))), max_pixels=100).image.size == (10, 10)
    assert "too large" in open_error(jpeg_bytes(Image.new("RGB", (10, 10))), max_pixels=99).reason


def test_pil_input_beyond_max_pixels_is_refused():
    err = open_error(Image.new("RGB", (50, 50)), max_pixels=2000)
    assert err.source == "<PIL image>"
    assert "too large" in err.reason


def test_solid_png_beyond_max_pixels_is_refused(tmp_path):
    path = save(Image.new("RGB", (5000, 5000), (1, 2, 3)), tmp_path / "huge.png")
    err = open_error(path, max_pixels=1_000_000)
    assert err.source == str(path)
    assert "too large" in err.reason


def test_text_named_jpg_is_refused(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not a picture\n")
    err = open_error(path)
    assert err.source == str(path)
    assert "not a supported image" in err.reason
    for fmt in ALLOWED_FORMATS:
        assert fmt in err.reason


@pytest.mark.parametrize("fmt", ["TIFF", "EPS", "PPM", "ICO"])
def test_formats_outside_the_allowed_list_are_refused(tmp_path, fmt):
    assert fmt not in ALLOWED_FORMATS
    path = tmp_path / "image.jpg"  # the name must not matter either
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (9, 9, 9)).save(buf, fmt)
    path.write_bytes(buf.getvalue())
    with Image.open(path) as probe:  # Pillow itself would open it
        assert probe.format == fmt
    err = open_error(path)
    assert err.source == str(path)
    assert "not a supported image" in err.reason
