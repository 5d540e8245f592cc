"""All-or-nothing catalog edits: add photos to a product, remove a product.

Each edit runs under the catalog's writer lock (the engine holds it) and in an order that can be undone:

- add: extract (nothing written yet) -> copy the photos into a hidden staging folder inside ``data_dir`` ->
  move them into ``data_dir/<product>/`` -> write the embedding cache -> commit the index. A failure at any step
  undoes the steps before it (files moved back out, the cache's previous bytes put back); the index is committed
  last, by the store, atomically.
- remove: write the cache -> move the folder to ``data_dir/.removed/<product>-<stamp>`` -> commit the index;
  on failure the folder moves back and the cache is restored.

A full disk or a read-only folder surfaces as :class:`~lookalike.errors.CatalogWriteError` naming the path.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import files
from .catalog import IMAGE_EXTENSIONS, stat_image
from .ids import image_id_for, normalize_product_id
from .imaging import ImageError

logger = logging.getLogger(__name__)

REMOVED_FOLDER = ".removed"  # where remove_product moves a product's folder (hidden: scans skip it)
STAGING_PREFIX = ".staging-"  # hidden folders inside data_dir where add_images stages copied photos
MAX_NAME_BYTES = 200  # file names we derive stay under the usual 255-byte limit


class UnknownProductError(LookupError):
    def __init__(self, product_id: str):
        super().__init__(f"unknown product {product_id!r}: it is not in the index")
        self.product_id = product_id


def undo(step: Callable[[], Any]) -> None:
    """Run one undo step of a failed edit; a failing undo is logged, never hides the original error."""
    try:
        step()
    except Exception:
        logger.exception("could not undo a step of a failed catalog change")


def rebuild(engine, store, *, force: bool, tune: bool | None, progress: bool | None):
    """Index every image of the catalog into ``store`` (the engine holds the writer lock); see build_index."""
    from .cache import embed_with_cache
    from .catalog import find_duplicates, scan_catalog
    from .engine import BuildReport
    from .manifest import build_manifest, save_projection
    from .tuning import adapt

    start = time.perf_counter()
    settings, extractor = engine.settings, engine.extractor
    if tune is None:
        tune = settings.tune
        if not tune and ((store.manifest() or {}).get("tuning") or {}).get("status") == "tuned":
            tune = True
            logger.info("keeping catalog tuning: the previous index was tuned (build with tune=False to drop it)")
    images = scan_catalog(settings.data_dir)
    duplicates = [  # byte-identical photos filed under two or more products (find_duplicates warns about each)
        [im.path.relative_to(engine.data_root).as_posix() for im in group] for group in find_duplicates(images)
    ]
    cache = engine._cache()
    emb = embed_with_cache(extractor, images, cache, force=force, progress=progress, save=False)
    good = emb.good
    skipped = [{"path": str(images[i].path), "reason": reason} for i, reason in sorted(emb.errors.items())]
    if skipped:
        logger.warning(
            "skipped %d bad image(s): %s", len(skipped), "; ".join(f"{s['path']}: {s['reason']}" for s in skipped)
        )
    rel = [images[i].path.relative_to(engine.data_root).as_posix() for i in good]
    labels = [images[i].product_id for i in good]
    adaptation = adapt(emb.vectors[good], np.array(labels, dtype=object), extractor.dim, tune=tune)
    fields = [{"product_id": p, "path": r, "format": emb.formats[i]} for p, r, i in zip(labels, rel, good)]
    before = cache.read_bytes()
    try:
        cache.save(emb.entries)
        projection = save_projection(settings.index_path, adaptation.projection)
        store.set_manifest(
            dict(build_manifest(settings, extractor, adaptation, skipped, projection), duplicates=duplicates)
        )
        vectors = adaptation.transform(emb.vectors[good], extractor.dim)
        store.replace_all([image_id_for(r) for r in rel], vectors, fields)
    except BaseException as exc:
        undo(lambda: cache.restore(before))
        if isinstance(exc, OSError):
            raise files.as_write_error(exc) from exc
        raise
    engine._install(store, adaptation)
    report = BuildReport(
        images=store.count(),
        products=len(set(labels)),
        extracted=emb.extracted,
        reused=len(images) - emb.extracted - len(emb.errors),
        skipped=skipped,
        seconds=time.perf_counter() - start,
        tuning=adaptation.tuning,
    )
    logger.info(
        "indexed %d images of %d products (%d extracted, %d from cache, %d skipped) in %.1fs",
        report.images, report.products, report.extracted, report.reused, len(skipped), report.seconds,
    )  # fmt: skip
    return report


def in_memory(settings, extractor, raw: np.ndarray, paths: list[str], product_ids: list[str], *, tune: bool):
    """(store, adaptation) over already extracted raw vectors, in memory only (evaluation): nothing is written.
    ``paths`` are relative to ``settings.data_dir``."""
    from .manifest import build_manifest
    from .stores import open_scratch_store
    from .tuning import adapt

    adaptation = adapt(raw, np.array(product_ids, dtype=object), extractor.dim, tune=tune)
    metric = settings.similarity_metric
    store = open_scratch_store(settings, metric=metric, dim=extractor.dim)
    store.set_manifest(build_manifest(settings, extractor, adaptation, [], None))
    fields = [{"product_id": p, "path": r, "format": ""} for p, r in zip(product_ids, paths)]
    store.replace_all([image_id_for(r) for r in paths], adaptation.transform(raw, extractor.dim), fields)
    return store, adaptation


def check_add(product_id: str, paths: Sequence[str | Path]) -> list[Path]:
    """The photos to add (each once), after the checks that need no lock: id rule, extensions, at least one."""
    normalize_product_id(product_id)
    sources = list(dict.fromkeys(Path(p).expanduser().resolve() for p in paths))
    if not sources:
        raise ValueError("add_images needs at least one image path")
    for src in sources:
        if src.suffix.lower() not in IMAGE_EXTENSIONS:
            allowed = ", ".join(sorted(IMAGE_EXTENSIONS))
            raise ImageError(str(src), f"unsupported extension {src.suffix!r}; use {allowed}")
    return sources


def add_images(engine, product_id: str, sources: list[Path]) -> dict[str, Any]:
    store, extractor, root = engine.store, engine.extractor, engine.data_root
    result = extractor.extract([str(s) for s in sources], progress=False)
    if result.errors:
        first = min(result.errors)
        raise ImageError(str(sources[first]), result.errors[first])
    folder = root / product_id
    dests = _destinations(sources, folder)
    rel = [d.relative_to(root).as_posix() for d in dests]
    ids = [image_id_for(r) for r in rel]
    indexed = store.fetch(ids)
    keep = [i for i, image_id in enumerate(ids) if image_id not in indexed and ids.index(image_id) == i]
    cache = engine._cache()
    before = cache.read_bytes()
    staging = root / f"{STAGING_PREFIX}{secrets.token_hex(4)}"
    moved: list[Path] = []
    made_folder = False
    try:
        copies = [i for i in keep if dests[i] != sources[i] and not dests[i].exists()]
        if copies:
            staging.mkdir(parents=True)
            for i in copies:
                shutil.copyfile(sources[i], staging / dests[i].name)
            made_folder = not folder.exists()
            folder.mkdir(parents=True, exist_ok=True)
            for i in copies:
                os.replace(staging / dests[i].name, dests[i])
                moved.append(dests[i])
        added = [stat_image(product_id, dests[i]) for i in keep]
        vectors = result.vectors[keep]
        formats = [result.formats[i] for i in keep]
        cache.save(cache.merged(add=added, vectors=vectors, formats=formats))
        if keep:
            fields = [{"product_id": product_id, "path": rel[i], "format": f} for i, f in zip(keep, formats)]
            store.upsert([ids[i] for i in keep], engine._adaptation.transform(vectors, extractor.dim), fields)
    except BaseException as exc:
        for path in moved:
            undo(path.unlink)
        if made_folder:
            undo(folder.rmdir)
        undo(lambda: cache.restore(before))
        if isinstance(exc, OSError):
            raise files.as_write_error(exc) from exc
        raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    engine._install(store, engine._adaptation)
    return {
        "product_id": product_id,
        "added": len(keep),
        "images": store.count(),
        "image_ids": [ids[i] for i in keep],
    }


def remove_product(engine, product_id: str) -> dict[str, Any]:
    store, root = engine.store, engine.data_root
    rows = store.fetch(store.ids(product_id=product_id))
    if not rows:
        raise UnknownProductError(product_id)
    manifest = store.manifest() or {}
    cache = engine._cache()
    before = cache.read_bytes()
    folder = root / product_id
    moved_to = None
    try:
        cache.save(cache.merged(remove={str(root / r["path"]) for r in rows.values()}))
        if folder.is_dir():
            trash = root / REMOVED_FOLDER
            trash.mkdir(exist_ok=True)
            moved_to = _unused(trash, f"{product_id}-{time.strftime('%Y%m%dT%H%M%S')}")
            os.rename(folder, moved_to)
        skipped = [s for s in manifest.get("skipped", []) if Path(s["path"]).parent.name != product_id]
        store.set_manifest(dict(manifest, skipped=skipped))
        removed = store.delete(product_id=product_id)
    except BaseException as exc:
        if moved_to is not None and moved_to.exists():
            undo(lambda: os.rename(moved_to, folder))
        undo(lambda: cache.restore(before))
        if isinstance(exc, OSError):
            raise files.as_write_error(exc) from exc
        raise
    engine._install(store, engine._adaptation)
    return {
        "product_id": product_id,
        "removed": removed,
        "images": store.count(),
        "moved_to": str(moved_to) if moved_to else None,
    }


def _unused(folder: Path, stem: str) -> Path:
    path, n = folder / stem, 1
    while path.exists():
        n += 1
        path = folder / f"{stem}-{n}"
    return path


def _destinations(sources: list[Path], folder: Path) -> list[Path]:
    """Where each photo goes: itself when already in the folder, an identical file there, or a free name (the
    source's, else with a content digest); never over a different file, never a name over MAX_NAME_BYTES."""
    out: list[Path] = []
    resolved = folder.resolve() if folder.exists() else folder
    for src in sources:
        if src.parent == resolved:
            out.append(src)
            continue
        name = _short_name(src.stem, src.suffix)
        dest = folder / name
        if dest.exists() and dest.read_bytes() != src.read_bytes():
            digest = hashlib.sha1(src.read_bytes()).hexdigest()[:8]
            dest = folder / _short_name(f"{src.stem}-{digest}", src.suffix)
        if dest in out:  # two sources with one name in one call
            dest = folder / _short_name(f"{src.stem}-{hashlib.sha1(str(src).encode()).hexdigest()[:8]}", src.suffix)
        out.append(dest)
    return out


def _short_name(stem: str, suffix: str) -> str:
    raw = stem.encode("utf-8")
    if len(raw) + len(suffix.encode()) <= MAX_NAME_BYTES:
        return stem + suffix
    digest = hashlib.sha1(raw).hexdigest()[:8]
    cut = raw[: MAX_NAME_BYTES - 9 - len(suffix.encode())].decode("utf-8", "ignore")
    return f"{cut}-{digest}{suffix}"


__all__ = ["REMOVED_FOLDER", "UnknownProductError", "add_images", "check_add", "normalize_product_id", "remove_product"]
