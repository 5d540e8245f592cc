"""Shared fixtures: settings that never touch the user's config, synthetic catalogs, the real-photo folder."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lookalike import Settings
from lookalike.stores.milvus_support import server_answers as _reachable

GROCERY = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "grocery"

# Distinct looks for synthetic products: background colour, foreground colour, shape.
LOOKS = [
    ((230, 40, 40), (250, 250, 250), "disc"),
    ((40, 160, 40), (20, 20, 20), "bar"),
    ((40, 60, 220), (250, 220, 0), "cross"),
    ((240, 200, 30), (120, 0, 120), "disc"),
    ((20, 20, 20), (0, 200, 220), "bar"),
    ((200, 200, 200), (200, 20, 120), "cross"),
    ((250, 130, 0), (0, 0, 120), "bar"),
    ((120, 60, 20), (240, 240, 180), "cross"),
    ((0, 120, 120), (250, 250, 0), "disc"),
    ((250, 250, 250), (30, 30, 200), "bar"),
]


def product_image(look: int, variant: int, size: int = 96) -> Image.Image:
    """A synthetic product photo: one look per product, small seeded changes per variant."""
    bg, fg, shape = LOOKS[look % len(LOOKS)]
    rng = np.random.default_rng(1000 * look + variant)
    img = np.empty((size, size, 3), np.float32)
    img[:] = bg
    yy, xx = np.mgrid[:size, :size]
    cx, cy = size / 2 + rng.integers(-6, 7), size / 2 + rng.integers(-6, 7)
    if shape == "disc":
        mask = (xx - cx) ** 2 + (yy - cy) ** 2 < (size / 4) ** 2
    elif shape == "bar":
        mask = np.abs(yy - cy) < size / 8
    else:
        mask = (np.abs(yy - cy) < size / 10) | (np.abs(xx - cx) < size / 10)
    img[mask] = fg
    img += rng.normal(0, 8, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


def write_catalog(root: Path, products: dict[str, int], *, start_variant: int = 0, fmt: str = "jpg") -> list[Path]:
    """``root/<product>/<n>.jpg`` for each product; product ``i`` gets look ``i``."""
    paths = []
    for look, (product, count) in enumerate(products.items()):
        folder = root / product
        folder.mkdir(parents=True, exist_ok=True)
        for v in range(start_variant, start_variant + count):
            path = folder / f"{product}-{v:02d}.{fmt}"
            product_image(look, v).save(path)
            paths.append(path)
    return paths


PRODUCTS = {"red-disc": 3, "green-bar": 3, "blue-cross": 2, "yellow-disc": 2}


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., Settings]:
    """Settings for tests: tiny random backbone, temp folders, no YAML, no environment."""

    def make(**overrides) -> Settings:
        values = dict(
            model_name="test_tiny",
            data_dir=tmp_path / "catalog",
            cache_dir=tmp_path / "cache",
            batch_size=4,
            num_workers=2,
        )
        values.update(overrides)
        return Settings(config_file=None, environ={}, **values)

    return make


@pytest.fixture
def catalog(tmp_path: Path) -> Path:
    """A small synthetic catalog of four products."""
    root = tmp_path / "catalog"
    write_catalog(root, PRODUCTS)
    return root


def jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


@pytest.fixture
def grocery() -> Path:
    if not (GROCERY / "catalog").is_dir():
        pytest.skip(f"real product photos not found at {GROCERY} (see ../shared/data/README.md)")
    return GROCERY


# --- a real Milvus server (tests marked milvus_server) ---------------------------------------------------------

MILVUS_SERVER_VENV = Path(
    os.environ.get("LOOKALIKE_MILVUS_SERVER_VENV", Path(__file__).resolve().parents[1] / ".venv-milvus")
)


@pytest.fixture(scope="session")
def server_uri(tmp_path_factory):
    """A running Milvus server: LOOKALIKE_TEST_MILVUS_URI, or the 2.3.5 standalone from .venv-milvus."""
    given = os.environ.get("LOOKALIKE_TEST_MILVUS_URI")
    if given:
        if not _reachable(given):
            pytest.skip(f"LOOKALIKE_TEST_MILVUS_URI={given} does not answer")
        yield given
        return
    binary = MILVUS_SERVER_VENV / "bin" / "milvus-server"
    if not binary.exists():
        pytest.skip(
            f"no Milvus server: {binary} is missing (make milvus-server-venv) and LOOKALIKE_TEST_MILVUS_URI is unset"
        )
    uri = "http://127.0.0.1:19530"
    if _reachable(uri):
        pytest.skip(f"something already answers at {uri}: set LOOKALIKE_TEST_MILVUS_URI={uri} to test against it")
    data = tmp_path_factory.mktemp("milvus_server")
    log = (data / "server.log").open("w")
    # its own session: the wrapper starts the milvus binary as a child, and both must go at the end
    proc = subprocess.Popen(
        [str(binary), "--data", str(data / "data")], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    deadline = time.monotonic() + 120
    while not _reachable(uri):
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop(proc)
            pytest.skip(f"the Milvus server did not start (see {data / 'server.log'})")
        time.sleep(1)
    yield uri
    _stop(proc)
    log.close()


def _stop(proc: subprocess.Popen) -> None:
    """SIGINT lets the wrapper stop Milvus cleanly; whatever is left of its process group is killed."""
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGINT)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
