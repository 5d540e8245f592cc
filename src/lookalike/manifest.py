"""The manifest: what an index records about how it was built, and the check that refuses a mismatch.

The store keeps it with the vectors (FAISS: ``metadata.json``; Milvus: with the collection). The engine writes
the model identity (``model``, ``model_fingerprint``), ``metric``, the catalog adaptation (``projection``,
``tuning``, ``calibration``), ``data_dir`` (absolute), ``skipped`` files and ``settings`` (``Settings.to_dict()``);
the store adds the image list, counts, its index description and the generation's ``build_id``.
The tuned projection is a content-addressed file beside the index (``index-p<sha>.projection.npz``), named with
its checksum under ``files.projection``.
"""

from __future__ import annotations

import logging
import statistics
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from . import files
from .settings import Settings, SettingsError, adopt_recorded
from .stores import VectorStore, open_store
from .stores.base import IndexFileError, StoreInfo, StoreMismatchError
from .tuning import Adaptation, Projection

PROJECTION_SUFFIX = ".projection.npz"
logger = logging.getLogger(__name__)


class IndexMismatchError(IndexFileError, StoreMismatchError):
    """The index was built with a model, weights, preprocessing or metric other than the settings'."""


def check_model(manifest: dict[str, Any], model: dict[str, Any], metric: str, where: Path | str) -> None:
    """Refuse an index built with another model identity or metric, naming both values of each difference."""
    expected = dict(model, metric=metric)
    found = dict(manifest.get("model") or {}, metric=manifest.get("metric"))
    diffs = [f"{k}: index has {found.get(k)!r}, settings give {v!r}" for k, v in expected.items() if found.get(k) != v]
    if diffs:
        raise IndexMismatchError(
            f"the index at {where} was built with other settings ({'; '.join(diffs)}). "
            "Rebuild it (`lookalike index` / build_index()) or use the settings it was built with."
        )


def warn_other_model(manifest: dict[str, Any], model: dict[str, Any], metric: str) -> None:
    """Log (not raise) when another process committed an index made by another model than the running one."""
    try:
        check_model(manifest, model, metric, "the store")
    except IndexMismatchError as exc:
        logger.error("another process rebuilt the index with another model; restart to follow: %s", exc)


def adopt_index_settings(settings: Settings, recorded: dict[str, Any], *, rebuild: bool) -> Settings:
    """``settings`` with the values the index recorded adopted (the index is the source of truth).

    Opening, a setting that contradicts the index is an :class:`IndexMismatchError` naming both values;
    rebuilding, what the user set explicitly wins (a new index) and the rest still follows the old one.
    """
    try:
        return adopt_recorded(settings, recorded)
    except SettingsError as exc:
        if not rebuild:
            raise IndexMismatchError(str(exc)) from exc
        logger.info("rebuilding with other settings than the index had: %s", exc)
        return adopt_recorded(settings, {k: v for k, v in recorded.items() if k not in settings.explicit})


def open_adopting(settings: Settings, device: Any, *, adopt: bool, rebuild: bool) -> tuple[VectorStore, Settings]:
    """Open the configured store (searching on ``device``) and, with ``adopt``, ``settings`` with the values its
    manifest recorded adopted (:func:`adopt_index_settings`)."""
    store = open_store(settings, metric=settings.similarity_metric, device=device)
    if adopt and (recorded := (store.manifest() or {}).get("settings")):
        settings = adopt_index_settings(settings, recorded, rebuild=rebuild)
    return store, settings


def require_index(store: VectorStore, where: Path | str) -> dict[str, Any]:
    """The store's manifest; :class:`IndexFileError` naming ``where`` when nothing was built there yet."""
    manifest = store.manifest()
    if manifest is None:
        raise IndexFileError(f"no index at {where}: build the index first (`lookalike index` or build_index())")
    return manifest


def build_manifest(
    settings: Any, extractor: Any, adaptation: Adaptation, skipped: list[dict[str, str]], projection_file: Any
) -> dict[str, Any]:
    """The engine's part of a manifest for one generation (the store adds its own)."""
    return {
        "model": extractor.describe(),
        "model_fingerprint": extractor.fingerprint,
        "metric": settings.similarity_metric,
        "projection": None if adaptation.projection is None else dict(adaptation.projection.info),
        "tuning": adaptation.tuning,
        "calibration": adaptation.calibration,
        "data_dir": str(Path(settings.data_dir).expanduser().resolve()),
        "counts": {"skipped": len(skipped)},
        "skipped": skipped,
        "settings": settings.to_dict(),
        "files": {} if projection_file is None else {"projection": projection_file},
    }


def save_projection(index_path: Path, projection: Projection | None) -> dict[str, Any] | None:
    """Write the projection as a content-addressed file beside the index; its manifest entry (None: untuned)."""
    if projection is None:
        return None
    data = projection.to_bytes()
    digest = files.sha256_bytes(data)
    path = Path(index_path).with_name(f"{Path(index_path).stem}-p{digest[:16]}{PROJECTION_SUFFIX}")
    if not (path.is_file() and files.sha256_bytes(path.read_bytes()) == digest):
        files.atomic_write_bytes(path, data)
    return {"file": path.name, "sha256": digest, "bytes": len(data)}


def load_adaptation(manifest: dict[str, Any], index_path: Path, where: Path | str) -> Adaptation:
    """The adaptation recorded in ``manifest``; the projection file is verified against its checksum."""
    projection = None
    if manifest.get("projection") is not None:
        entry = (manifest.get("files") or {}).get("projection")
        if not entry:
            raise IndexFileError(f"{where} names a projection but its file is missing")
        path = Path(index_path).with_name(entry["file"])
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise IndexFileError(f"projection file {path} named by {where} cannot be read ({exc.strerror})") from None
        if files.sha256_bytes(data) != entry.get("sha256"):
            raise IndexFileError(f"projection file {path} does not match the checksum in {where}; it is damaged")
        projection = Projection.from_bytes(data, manifest["projection"])
    return Adaptation(projection, manifest.get("tuning") or {"status": "off"}, manifest.get("calibration"))


@dataclass(frozen=True)
class EngineView:
    """What is loaded: the manifest, the adaptation and the store's description (read-only)."""

    manifest: dict[str, Any]
    adaptation: Adaptation
    info: StoreInfo

    @property
    def index(self) -> SimpleNamespace:  # the seed-era ``snapshot.index.ntotal`` the server reads
        info = self.info
        return SimpleNamespace(ntotal=info.count, dim=info.dim, type_name=info.index_type, **dict(info.extra))


def index_statistics(store: Any, adaptation: Adaptation, counts: dict[str, int], data_root: Path) -> dict[str, Any]:
    """``get_statistics()``: catalog and index facts from the store and its manifest."""
    manifest, info = store.manifest() or {}, store.describe()
    sizes = sorted(counts.values())
    skipped = manifest.get("skipped", [])
    formats = Counter(f.get("format", "") for f in store.fetch(store.ids()).values())
    return {
        "products": len(sizes),
        "images": info.count,
        "images_per_product": {
            "min": sizes[0] if sizes else 0,
            "median": float(statistics.median(sizes)) if sizes else 0.0,
            "max": sizes[-1] if sizes else 0,
        },
        "formats": dict(sorted(formats.items())),
        "skipped": len(skipped),
        "skipped_files": skipped,
        "duplicates": len(manifest.get("duplicates") or []),  # groups of byte-identical photos in several products
        "duplicate_files": manifest.get("duplicates") or [],
        "model": manifest["model"]["model_name"],
        "weights": manifest["model"]["weights"],
        "embedding_dim": info.dim,
        "similarity_metric": info.metric,
        "index_type": info.index_type,
        "store": info.backend,
        "tuning": adaptation.tuning.get("status", "off"),
        "no_match_threshold": adaptation.threshold,
        "index_size_bytes": info.nbytes,
        "last_build": manifest.get("created_at"),
        "build_id": manifest.get("build_id"),
        "data_dir": str(data_root),
    }


__all__ = [
    "EngineView",
    "IndexMismatchError",
    "build_manifest",
    "check_model",
    "index_statistics",
    "load_adaptation",
    "save_projection",
]
