"""Campaign (e): restart time. An index of ``images`` synthetic Lite0-sized (1280-d) vectors is written through the
library's own build path (``ImageSearchEngine._install``: adaptation, the index type the settings choose, the
manifest, the atomic save), then `lookalike serve` is started ``restarts`` times: seconds from the process start
to the first ``/readyz`` 200 (the index loaded and one search run).
"""

from __future__ import annotations

import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from .common import Workdir, free_port, timer
from .fuzz import _wait_ready


def build_synthetic(wd: Workdir, images: int, *, per_product: int = 4, seed: int = 0) -> dict:
    """A catalog index of ``images`` clustered random vectors (no photos: a restart never reads them)."""
    from lookalike import ImageSearchEngine

    settings = wd.settings(model_name="efficientnet_lite0", tune=False)
    engine = ImageSearchEngine(settings)
    dim = engine.extractor.raw_dim
    rng = np.random.default_rng(seed)
    products = max(1, images // per_product)
    centres = rng.standard_normal((products, dim), dtype=np.float32)
    owner = np.repeat(np.arange(products), per_product)[:images]
    raw = np.abs(centres[owner] + 0.3 * rng.standard_normal((images, dim), dtype=np.float32))  # post-ReLU-like
    paths = [f"p{o:06d}/img{i:07d}.jpg" for i, o in enumerate(owner)]
    wd.catalog.mkdir(parents=True, exist_ok=True)
    labels = [f"p{o:06d}" for o in owner]
    with timer() as took:
        if hasattr(ImageSearchEngine, "from_vectors"):  # the store seam: what build_index() does after extraction
            _save_through_store(engine, raw, paths, labels)
        else:
            engine._install(raw, paths, labels, ["JPEG"] * images, [], tune=False)
    index = ImageSearchEngine(settings)
    index.load_index()
    snap = index.snapshot.index
    return {
        "images": int(snap.ntotal),
        "dim": int(snap.dim),
        "index_type": snap.type_name,
        "build_seconds": round(took["s"], 1),
    }


def _save_through_store(engine, raw: np.ndarray, paths: list[str], labels: list[str]) -> None:
    from lookalike import files
    from lookalike.ids import image_id_for
    from lookalike.manifest import build_manifest, save_projection
    from lookalike.stores import open_store
    from lookalike.tuning import adapt

    settings, extractor = engine.settings, engine.extractor
    with files.catalog_lock(settings.cache_dir):
        store = open_store(settings, metric=settings.similarity_metric, device="cpu")
        adaptation = adapt(raw, np.array(labels, dtype=object), extractor.dim, tune=False)
        projection = save_projection(settings.index_path, adaptation.projection)
        store.set_manifest(build_manifest(settings, extractor, adaptation, [], projection))
        fields = [{"product_id": p, "path": r, "format": "JPEG"} for p, r in zip(labels, paths)]
        store.replace_all([image_id_for(r) for r in paths], adaptation.transform(raw, extractor.dim), fields)


def restart_campaign(root: Path, *, images: int = 100_000, restarts: int = 5) -> dict:
    wd = Workdir(Path(root))
    _ = wd.config_file
    built = build_synthetic(wd, images)
    env = wd.env(LOOKALIKE_MODEL_NAME="efficientnet_lite0", LOOKALIKE_THREADS="2", OMP_NUM_THREADS="2")
    times = []
    for _ in range(restarts):
        port = free_port()
        start = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "-m", "lookalike.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
            env=env, cwd=wd.root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            _wait_ready(f"http://127.0.0.1:{port}", proc, timeout=300)
            times.append(time.monotonic() - start)
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    size = sum(p.stat().st_size for p in wd.cache.glob("index-*"))
    return {
        "campaign": "restart",
        **built,
        "index_mb": round(size / 2**20, 1),
        "restarts": restarts,
        "ready_p50_s": round(statistics.median(times), 2),
        "ready_max_s": round(max(times), 2),
        "ready_s": [round(t, 2) for t in times],
    }
