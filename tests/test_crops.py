"""Query crops: crop_box / parse_box, the helper the engine's search(image, box=...) calls."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lookalike import ImageError
from lookalike.imaging import crop_box, parse_box


def grid() -> Image.Image:
    arr = np.zeros((40, 60, 3), np.uint8)  # 60 wide, 40 high
    arr[:, :, 0] = np.arange(60)[None, :]  # red = x
    arr[:, :, 1] = np.arange(40)[:, None]  # green = y
    return Image.fromarray(arr, "RGB")


def test_crop_is_the_pixels_inside_the_box():
    out = crop_box(grid(), (10, 5, 30, 25))
    assert out.size == (20, 20)
    arr = np.asarray(out)
    assert arr[0, 0, 0] == 10 and arr[0, 0, 1] == 5
    assert arr[-1, -1, 0] == 29 and arr[-1, -1, 1] == 24  # x1, y1 are exclusive


def test_fractional_boxes_cover_every_touched_pixel_and_boxes_are_clipped():
    assert crop_box(grid(), (10.5, 5.2, 12.1, 6.9)).size == (3, 2)
    out = crop_box(grid(), (-10, -10, 1000, 20))
    assert out.size == (60, 20)
    assert np.asarray(out)[0, 0, 0] == 0


@pytest.mark.parametrize(
    ("box", "message"),
    [
        ((30, 5, 10, 25), "is empty: it needs x0 < x1 and y0 < y1"),
        ((10, 5, 10, 25), "is empty"),
        ((10, 25, 30, 5), "is empty"),
        ((100, 5, 130, 25), "lies outside the 60x40 image"),
        ((-20, -20, 0, 0), "lies outside"),
        ((1, 2, 3), "not four finite numbers"),
        ((0, 0, float("nan"), 5), "not four finite numbers"),
        (("a", 0, 1, 1), "not four numbers"),
        (None, "not four numbers"),
    ],
)
def test_bad_boxes_raise_a_clear_image_error(box, message):
    with pytest.raises(ImageError, match=message) as err:
        crop_box(grid(), box, source="shelf.jpg")
    assert str(err.value).startswith("shelf.jpg: box")


def test_parse_box_reads_the_cli_and_http_text():
    assert parse_box("10, 20,30.5,40") == (10.0, 20.0, 30.5, 40.0)
    with pytest.raises(ImageError, match="not four numbers"):
        parse_box("10,20,thirty,40")
    with pytest.raises(ImageError, match="not four finite numbers"):
        parse_box("1,2,3")
    with pytest.raises(ImageError, match="is empty"):
        parse_box("5,5,5,9")
