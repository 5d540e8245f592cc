"""Feature extraction spread over a Ray cluster (``executor: ray``): the same vectors as local extraction.

The image list becomes a Ray dataset; ``map_batches`` runs it through a pool of actors, each holding one
:class:`~lookalike.embedding.FeatureExtractor` (one model load per actor, one GPU per actor when the settings ask
for CUDA). Every row carries its input position, so the vectors come back in input order whatever the order the
actors finish in, and a bad image keeps the reason :meth:`FeatureExtractor.extract` gave for it.

``ray_address`` (a setting) joins a running cluster (``ray://head:10001`` or ``auto``); without it a local Ray
instance is started with this machine's CPUs and kept for the life of the process (starting one costs seconds).
The images must be readable at the same path on every node (a shared mount), or be passed as bytes.

Ray is imported only here and only when called: ``import lookalike`` works without it (``pip install
'lookalike[scale]'`` adds it).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .embedding import Extraction
from .imaging import ImageSource
from .settings import Settings

log = logging.getLogger(__name__)


class RayUnavailableError(RuntimeError):
    """executor: ray was asked for, but Ray is not installed or the cluster cannot be reached."""


def _ray():
    try:
        import ray
        import ray.data  # noqa: F401 - Ray Data is a separate extra of ray
    except ImportError as exc:
        raise RayUnavailableError(
            f"executor='ray' needs Ray Data ({exc}); install it with pip install 'lookalike[scale]' "
            "or set executor: local"
        ) from exc
    return ray


def ensure_ray(settings: Settings) -> Any:
    """The ``ray`` module, connected: to ``settings.ray_address`` when set, else to a local instance."""
    ray = _ray()
    if ray.is_initialized():
        return ray
    address = getattr(settings, "ray_address", None)
    try:
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, log_to_driver=False)
    except Exception as exc:  # noqa: BLE001 - connection failures come in several exception types
        where = f"the Ray cluster at {address}" if address else "a local Ray instance"
        raise RayUnavailableError(
            f"cannot start or join {where}: {exc}; check ray_address (ray://head:10001) or set executor: local"
        ) from exc
    log.info("Ray: %s", ray.cluster_resources())
    return ray


class ExtractorActor:
    """One model per actor, built once; a Ray Data batch of images in, their vectors (or reasons) out."""

    def __init__(self, settings: Settings):
        from .embedding import FeatureExtractor

        self.extractor = FeatureExtractor(settings)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = [item if isinstance(item, bytes) else str(item) for item in batch["image"]]
        result = self.extractor.extract(images, progress=False)
        n = len(images)
        vectors = np.zeros((n, self.extractor.raw_dim), np.float32)
        vectors[result.ok] = result.vectors
        formats = np.full(n, "", dtype=object)
        formats[result.ok] = result.formats
        errors = np.full(n, "", dtype=object)
        for pos, reason in result.errors.items():
            errors[pos] = reason
        ok = np.zeros(n, bool)
        ok[result.ok] = True
        return {"pos": np.asarray(batch["pos"], np.int64), "vector": vectors, "ok": ok, "format": formats,
                "error": errors}  # fmt: skip


def _actors(ray: Any, settings: Settings, gpus: float) -> int:
    """One actor per GPU when on CUDA, else one per CPU of the cluster (each with one inference thread)."""
    wanted = getattr(settings, "ray_actors", None)
    if wanted:
        return int(wanted)
    resources = ray.cluster_resources()
    if gpus:
        return max(1, int(resources.get("GPU", 0) // gpus))
    return max(1, int(resources.get("CPU", 1)))


def extract_with_ray(
    settings: Settings,
    paths: Sequence[ImageSource],
    *,
    progress: bool | None = None,
) -> Extraction:
    """:meth:`FeatureExtractor.extract` over ``paths`` on Ray: vectors for the images that decode, in input
    order, and the reason for each one that does not."""
    n = len(paths)
    if n == 0:
        from .embedding import FeatureExtractor

        return Extraction(np.empty((0, FeatureExtractor(settings).raw_dim), np.float32))
    ray = ensure_ray(settings)
    from ray.data import ActorPoolStrategy, DataContext

    gpus = 1.0 if str(settings.device).startswith("cuda") else 0.0
    actors = _actors(ray, settings, gpus)
    context = DataContext.get_current()
    context.enable_progress_bars = bool(progress)
    items = [{"pos": i, "image": p if isinstance(p, bytes) else str(Path(p))} for i, p in enumerate(paths)]
    blocks = min(n, max(4 * actors, math.ceil(n / (8 * settings.batch_size))))
    dataset = ray.data.from_items(items, override_num_blocks=blocks).map_batches(
        ExtractorActor,
        fn_constructor_kwargs={"settings": settings},
        batch_size=settings.batch_size,
        batch_format="numpy",
        compute=ActorPoolStrategy(size=actors),
        num_cpus=1,
        num_gpus=gpus,
    )
    log.info("Ray extraction: %d images, %d actors, %d blocks, %s GPU per actor", n, actors, blocks, gpus or 0)
    return _collect(dataset.iter_batches(batch_size=None, batch_format="numpy"), n)


def _collect(batches: Any, n: int) -> Extraction:
    """Put the actors' rows back in input order."""
    vectors: np.ndarray | None = None
    ok_mask = np.zeros(n, bool)
    formats = [""] * n
    errors: dict[int, str] = {}
    for batch in batches:
        pos = batch["pos"]
        if vectors is None:
            vectors = np.zeros((n, batch["vector"].shape[1]), np.float32)
        vectors[pos] = batch["vector"]
        ok_mask[pos] = batch["ok"]
        for p, good, fmt, err in zip(pos, batch["ok"], batch["format"], batch["error"], strict=True):
            if good:
                formats[int(p)] = str(fmt)
            else:
                errors[int(p)] = str(err)
    missing = n - int(ok_mask.sum()) - len(errors)
    if vectors is None or missing:
        raise RuntimeError(f"Ray extraction lost {missing} of {n} images (a failed actor?); run again or use local")
    ok = np.flatnonzero(ok_mask).tolist()
    return Extraction(vectors[ok] if len(ok) != n else vectors, ok, [formats[i] for i in ok], errors)


__all__ = ["ExtractorActor", "RayUnavailableError", "ensure_ray", "extract_with_ray"]
