"""What the benchmark scripts share: the seed's plain pipeline (the reference every figure is a ratio to),
seeded synthetic vectors, timing, JSON results and a printed table.

The machine these run on is shared and its speed drifts, so every script measures the seed's pipeline in the
same run, interleaved with ours, and reports ratios.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
GROCERY = Path(os.environ.get("LOOKALIKE_GROCERY", REPO.parent / "shared" / "data" / "grocery"))
RESULTS = REPO / "results" / "bench"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --- the seed's pipeline ----------------------------------------------------------------------------------


class SeedPipeline:
    """A faithful re-implementation of the seed's extractor: PIL full decode, ``Resize((224, 224))``, ``ToTensor``,
    ImageNet ``Normalize``, PyTorch eager in contiguous fp32 under ``no_grad``, global average pooling, batches of
    32 decoded one image after another; then L2 normalisation and ``IndexFlatIP``."""

    def __init__(self, model_name: str, *, img_size: int = 224, batch_size: int = 32):
        import torch
        from torchvision import transforms

        from lookalike.backbones import build_backbone

        loaded = build_backbone(model_name, pretrained=model_name.startswith("efficientnet_lite"))
        self.net = loaded.module.eval()  # returns feature maps; the seed pooled the last one with avgpool
        self.dim = loaded.spec.dim
        self.batch_size = batch_size
        self.transform = transforms.Compose(
            [
                transforms.Resize((img_size, img_size)),
                transforms.ToTensor(),
                transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )
        self._torch = torch

    def _tensor(self, image) -> Any:
        import io

        from PIL import Image

        if isinstance(image, (bytes, bytearray)):
            image = io.BytesIO(image)
        return self.transform(Image.open(image).convert("RGB"))

    def extract(self, images: Sequence[Any]) -> np.ndarray:
        torch = self._torch
        out = []
        with torch.no_grad():
            for i in range(0, len(images), self.batch_size):
                batch = torch.stack([self._tensor(im) for im in images[i : i + self.batch_size]])
                out.append(self.net(batch)[0].mean(dim=(2, 3)).numpy())
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)

    @staticmethod
    def index(vectors: np.ndarray):
        import faiss

        vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        index = faiss.IndexFlatIP(vectors.shape[1])
        index.add(np.ascontiguousarray(vectors, dtype=np.float32))
        return index


def grocery_photos(split: str = "catalog", limit: int | None = None, *, every: int = 1) -> list[Path]:
    """Real photos from ../shared/data/grocery (never copied into the repository), sorted, every ``every``-th."""
    folder = GROCERY / split
    if not folder.is_dir():
        sys.exit(f"real photos not found at {folder} (see ../shared/data/README.md; set LOOKALIKE_GROCERY)")
    paths = sorted(folder.glob("*/*.jpg"))[::every]
    return paths[:limit] if limit else paths


# --- synthetic vectors ------------------------------------------------------------------------------------


PHOTO_NOISE = 0.62  # with the weights below, the statistics of real EfficientNet-Lite0 features of the Grocery photos:
# nearest-neighbour cosine 0.77 (real 0.76), 10th 0.68 (0.69), mean 0.32 (0.32), variance in the top 16/64/256
# principal directions 0.54/0.79/0.94 (0.54/0.75/0.92)


def clustered_vectors(n: int, dim: int, *, seed: int = 0, chunk: int = 50_000):
    """Seeded, L2-normalised vectors with the structure of a product catalog, yielded in chunks.

    Not uniform noise: a shared positive mean (pooled ReLU features all point one way), categories, products
    inside categories and photos around each product (20 per product), each level with a decaying spectrum (a
    few directions carry most of the variance, as in real CNN embeddings). Chunk ``i`` depends only on
    (``seed``, ``i``), so a million vectors can be made piecewise without holding them all.
    """
    for start in range(0, n, chunk):
        yield _chunk(seed, start, min(chunk, n - start), dim)[0]


def clustered_queries(n_queries: int, dim: int, *, seed: int = 0, query_seed: int = 1) -> np.ndarray:
    """New photos of products of the first chunk of ``clustered_vectors(..., seed=seed)``."""
    _, centres, spectrum = _chunk(seed, 0, 50_000, dim, photos=False)
    rng = np.random.default_rng([query_seed, 7])
    owner = rng.integers(0, len(centres), n_queries)
    q = centres[owner] + PHOTO_NOISE * rng.standard_normal((n_queries, dim)).astype(np.float32) * spectrum
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def _chunk(seed: int, start: int, m: int, dim: int, *, photos: bool = True, images_per_product: int = 20):
    base = np.random.default_rng(seed)
    spectrum = (1.0 + np.arange(dim) / 3.0) ** -0.65
    spectrum = (spectrum / np.sqrt((spectrum**2).sum())).astype(np.float32)
    mean = np.abs(base.standard_normal(dim)).astype(np.float32) * spectrum[base.permutation(dim)]
    mean /= np.linalg.norm(mean)
    categories = base.standard_normal((200, dim)).astype(np.float32) * spectrum
    rng = np.random.default_rng([seed, start])
    products = max(1, m // images_per_product)
    kind = rng.integers(0, len(categories), products)
    centres = 0.6 * mean + 0.5 * categories[kind] + 0.45 * rng.standard_normal((products, dim)) * spectrum
    centres = centres.astype(np.float32)
    if not photos:
        return None, centres, spectrum
    owner = np.repeat(np.arange(products), int(np.ceil(m / products)))[:m]
    x = centres[owner] + PHOTO_NOISE * rng.standard_normal((m, dim)).astype(np.float32) * spectrum
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), centres, spectrum


def exact_topk(chunks, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k rows by inner product over vectors that come in chunks (never all in memory)."""
    best_s = np.full((len(queries), k), -np.inf, np.float32)
    best_i = np.full((len(queries), k), -1, np.int64)
    offset = 0
    for chunk in chunks:
        s = queries @ chunk.T
        top = np.argpartition(-s, min(k, s.shape[1] - 1), axis=1)[:, :k]
        cand_s = np.concatenate([best_s, np.take_along_axis(s, top, 1)], axis=1)
        cand_i = np.concatenate([best_i, top + offset], axis=1)
        order = np.argsort(-cand_s, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(cand_s, order, 1), np.take_along_axis(cand_i, order, 1)
        offset += len(chunk)
    return best_i


def recall_at_k(found: np.ndarray, truth: np.ndarray, k: int = 10) -> float:
    """Share of the true top-k that the index returned in its top-k (the usual ANN recall@k)."""
    hits = sum(len(set(f[:k].tolist()) & set(t[:k].tolist())) for f, t in zip(found, truth))
    return hits / (k * len(truth))


# --- timing and output ------------------------------------------------------------------------------------


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def latencies_ms(fn: Callable[[Any], Any], items: Sequence[Any], *, warmup: int = 3) -> dict[str, float]:
    """p50/p90/mean in milliseconds of ``fn(item)`` over ``items`` (each timed on its own)."""
    for item in items[:warmup]:
        fn(item)
    times = []
    for item in items:
        start = time.perf_counter()
        fn(item)
        times.append((time.perf_counter() - start) * 1000)
    times.sort()
    return {
        "p50_ms": statistics.median(times),
        "p90_ms": times[int(0.9 * (len(times) - 1))],
        "mean_ms": statistics.fmean(times),
        "n": len(times),
    }


def machine() -> dict[str, Any]:
    import faiss
    import torch

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "faiss": faiss.__version__,
        "cpu": _cpu_name(),
        "cores": len(os.sched_getaffinity(0)),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "load_average_at_start": os.getloadavg(),
    }
    for name in ("onnxruntime", "openvino"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = None
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def write_results(name: str, payload: dict[str, Any], out: Path | None = None) -> Path:
    path = out or RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "machine": machine(), **payload}
    path.write_text(json.dumps(payload, indent=2, default=_json_default))
    return path


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(type(obj).__name__)


def print_table(rows: list[dict[str, Any]], columns: list[str], title: str = "") -> None:
    if title:
        print(f"\n{title}")
    cells = [[_fmt(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)))
    sys.stdout.flush()


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value >= 100:
            return f"{value:.0f}"
        if value >= 10:
            return f"{value:.1f}"
        return f"{value:.3g}" if value < 1 else f"{value:.2f}"
    return str(value)
