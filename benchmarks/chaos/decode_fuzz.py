"""Coverage-guided fuzzing (atheris, libFuzzer) of the library's image decoding: any bytes must either decode or raise
``ImageError``; anything else (another exception, a hang, a crash of the interpreter) is a finding.

python -m chaos.decode_fuzz CORPUS_DIR -runs=100000 -max_len=65536     (from benchmarks/; libFuzzer's own flags)
"""

from __future__ import annotations

import contextlib
import sys

import atheris
import numpy  # noqa: F401 - the heavy dependencies first, uninstrumented: coverage is wanted in Pillow and ours
import torch  # noqa: F401

with atheris.instrument_imports():
    from PIL import GifImagePlugin, Image, JpegImagePlugin, PngImagePlugin, WebPImagePlugin  # noqa: F401

    from lookalike.imaging import ImageError, open_image

MAX_PIXELS = 4_000_000


def test_one_input(data: bytes) -> None:
    with contextlib.suppress(ImageError):
        open_image(data, MAX_PIXELS, draft_size=64)


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
