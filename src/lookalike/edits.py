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

import contextlib
import hashlib
import json
import logging
import os
import secrets
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import files
from .catalog import IMAGE_EXTENSIONS, stat_image
from .ids import image_id_for, normalize_product_id
from .imaging import ImageError
from .products import catalog_records

logger = logging.getLogger(__name__)

REMOVED_FOLDER = ".removed"  # where remove_product moves a product's folder (hidden: scans skip it)
STAGING_PREFIX = ".staging-"  # hidden folders inside data_dir where add_images stages copied photos
MAX_NAME_BYTES = 200  # file names we derive stay under the usual 255-byte limit


@dataclass
class BuildReport:
    images: int
    products: int
    extracted: int  # images whose features were computed in this build
    reused: int  # images whose features came from the cache
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"path", "reason"}
    seconds: float = 0.0
    tuning: dict[str, Any] = field(default_factory=dict)  # status "off", "tuned" (with validation) or "declined"
    records: dict[str, Any] = field(default_factory=dict)  # the product records read (RecordsReport.to_dict())


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


def rebuild(engine, store, *, force: bool, tune: bool | str | None, progress: bool | None):
    """Index every image of the catalog into ``store`` (the engine holds the writer lock); see build_index."""
    from dataclasses import replace

    from .cache import embed_with_cache
    from .catalog import find_duplicates, scan_catalog
    from .finetuned import ensemble_for, finetuned_weights
    from .manifest import build_manifest, save_projection
    from .settings import TUNE_FINETUNE, parse_tune
    from .tuning import adapt

    start = time.perf_counter()
    settings = engine.settings
    if tune is None:  # tuning is a property of the index: a rebuild keeps it unless told tune=False
        previously = ((store.manifest() or {}).get("tuning") or {}).get("status") == "tuned"
        tune = settings.tune if "tune" in settings.explicit else settings.tune or previously
        if previously:
            logger.info("keeping catalog tuning: the previous index was tuned (build with tune=False to drop it)")
    else:
        tune = parse_tune(tune)  # the setting's checks and spelling
    if tune != settings.tune:  # what this build did is what the index records, and what a rebuild keeps
        settings = engine.settings = settings.replace(tune=tune)
    images = scan_catalog(settings.data_dir)
    finetune = None
    if tune == TUNE_FINETUNE:  # fine-tuned weights (trained now, or reused), else the LDA alone with the reason
        finetune = finetuned_weights(settings, data_dir=engine.data_root, images=images, progress=progress)
    engine._use_weights(finetune.weights if finetune is not None else None)
    extractor = engine.extractor
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
    # "finetune" tells adapt the features are fine-tuned; a declined fine-tune left the base model's features
    fitted = True if tune == TUNE_FINETUNE and (finetune is None or finetune.weights is None) else tune
    adaptation = adapt(
        emb.vectors[good], np.array(labels, dtype=object), extractor.dim, tune=fitted, ensemble=ensemble_for(extractor)
    )
    if finetune is not None:
        adaptation = replace(adaptation, tuning={**adaptation.tuning, "finetune": finetune.info})
    fields = [{"product_id": p, "path": r, "format": emb.formats[i]} for p, r, i in zip(labels, rel, good)]
    records, records_report = catalog_records(engine.data_root, labels, store.records())
    with Edit(engine, store) as edit:
        edit.prepare_cache(cache, emb.entries)
        projection = save_projection(settings.index_path, adaptation.projection)
        store.set_manifest(
            dict(build_manifest(settings, extractor, adaptation, skipped, projection), duplicates=duplicates)
        )
        vectors = adaptation.transform(emb.vectors[good], extractor.dim)
        store.set_records(records)
        edit.commit(lambda: store.replace_all([image_id_for(r) for r in rel], vectors, fields))
    engine._install(store, adaptation)
    report = BuildReport(
        images=store.count(),
        products=len(set(labels)),
        extracted=emb.extracted,
        reused=len(images) - emb.extracted - len(emb.errors),
        skipped=skipped,
        seconds=time.perf_counter() - start,
        tuning=adaptation.tuning,
        records=records_report,
    )
    logger.info(
        "indexed %d images of %d products (%d extracted, %d from cache, %d skipped) in %.1fs",
        report.images, report.products, report.extracted, report.reused, len(skipped), report.seconds,
    )  # fmt: skip
    return report


def in_memory(settings, extractor, raw: np.ndarray, paths: list[str], product_ids: list[str], *, tune: bool | str):
    """(store, adaptation) over already extracted raw vectors, in memory only (evaluation): nothing is written.
    ``paths`` are relative to ``settings.data_dir``."""
    from .finetuned import ensemble_for
    from .manifest import build_manifest
    from .stores import open_scratch_store
    from .tuning import adapt

    ensemble = ensemble_for(extractor)
    adaptation = adapt(raw, np.array(product_ids, dtype=object), extractor.dim, tune=tune, ensemble=ensemble)
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
    with Edit(engine, store) as edit:
        copies = [i for i in keep if dests[i] != sources[i] and not dests[i].exists()]
        staged = {i: edit.stage(sources[i], dests[i].name) for i in copies}
        formats = [result.formats[i] for i in keep]
        # the cache keys photos by final path, size and mtime: a rename keeps the staged copy's size and mtime
        added = [stat_image(product_id, dests[i]) if i not in staged else _as_placed(product_id, staged[i], dests[i])
                 for i in keep]  # fmt: skip
        edit.prepare_cache(cache, cache.merged(add=added, vectors=result.vectors[keep], formats=formats))
        edit.begin([(staged[i], dests[i]) for i in copies], undo="unlink")
        fields = [{"product_id": product_id, "path": rel[i], "format": f} for i, f in zip(keep, formats)]
        vectors = engine._adaptation.transform(result.vectors[keep], extractor.dim)
        if keep:  # the records file may name the new product: read it again (no image is read for that)
            store.set_records(catalog_records(root, {*store.product_counts(), product_id}, store.records())[0])
        edit.commit(lambda: store.upsert([ids[i] for i in keep], vectors, fields) if keep else None)
    engine._install(store, engine._adaptation)
    return {"product_id": product_id, "added": len(keep), "images": store.count(), "image_ids": [ids[i] for i in keep]}


def remove_product(engine, product_id: str) -> dict[str, Any]:
    store, root = engine.store, engine.data_root
    rows = store.fetch(store.ids(product_id=product_id))
    if not rows:
        raise UnknownProductError(product_id)
    manifest = store.manifest() or {}
    cache = engine._cache()
    folder = root / product_id
    moved_to = None
    with Edit(engine, store) as edit:
        edit.prepare_cache(cache, cache.merged(remove={str(root / r["path"]) for r in rows.values()}))
        if folder.is_dir():
            trash = root / REMOVED_FOLDER
            if not trash.exists():
                trash.mkdir()
                edit.made.append(trash)
            moved_to = _unused(trash, f"{product_id}-{time.strftime('%Y%m%dT%H%M%S')}")
        edit.begin([(folder, moved_to)] if moved_to else [], undo="rename")
        skipped = [s for s in manifest.get("skipped", []) if Path(s["path"]).parent.name != product_id]
        store.set_manifest(dict(manifest, skipped=skipped))
        store.set_records(catalog_records(root, set(store.product_counts()) - {product_id}, store.records())[0])
        removed = edit.commit(lambda: store.delete(product_id=product_id))
    engine._install(store, engine._adaptation)
    return {
        "product_id": product_id,
        "removed": removed,
        "images": store.count(),
        "moved_to": str(moved_to) if moved_to else None,
    }


JOURNAL = "edit-journal.json"


class Edit:
    """One all-or-nothing catalog change. Writes that need disk space come first (staged photo copies, the new
    cache beside the old one, the journal); then renames (photos into place, a folder to ``.removed``); then the
    store commits; last the new cache is renamed in place. A failure before the commit undoes every step; the
    journal (``<cache_dir>/edit-journal.json``) lets the next writer finish or undo a change a crash interrupted
    (:func:`recover`), judged by whether the store's generation moved past the one the change started from."""

    def __init__(self, engine, store):
        self.store = store
        self.journal = Path(engine.settings.cache_dir) / JOURNAL
        self.staging = Path(engine.data_root) / f"{STAGING_PREFIX}{secrets.token_hex(4)}"
        self.cache: tuple[Path, Path] | None = None  # (prepared temp, cache file)
        self.moves: list[tuple[Path, Path]] = []
        self.done: list[tuple[Path, Path]] = []
        self.undo_kind = "unlink"
        self.made: list[Path] = []  # folders this change made (removed again if it fails)
        self.committed = False

    def __enter__(self) -> Edit:
        return self

    def stage(self, src: Path, name: str) -> Path:
        self.staging.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, self.staging / name)
        return self.staging / name

    def prepare_cache(self, cache, entries) -> None:
        self.cache = (cache.prepare(entries), cache.path)

    def begin(self, moves: list[tuple[Path, Path]], *, undo: str) -> None:
        """Record the planned renames in the journal, then do them."""
        self.moves, self.undo_kind = moves, undo
        new_folders = list(dict.fromkeys(dst.parent for _, dst in moves if not dst.parent.exists()))
        if moves:
            files.atomic_write_json(self.journal, dict(self._record(), made=[str(f) for f in self.made + new_folders]))
        for folder in new_folders:
            folder.mkdir(parents=True)
            self.made.append(folder)
        for src, dst in moves:
            os.rename(src, dst)
            self.done.append((src, dst))

    def commit(self, write: Callable[[], Any]) -> Any:
        out = write()
        self.committed = True
        return out

    def _record(self) -> dict[str, Any]:
        base = (self.store.manifest() or {}).get("build_id")
        cache = [str(p) for p in self.cache] if self.cache else None
        moves = [[str(a), str(b)] for a, b in self.moves]
        return {"base": base, "moves": moves, "undo": self.undo_kind, "cache": cache, "staging": str(self.staging)}

    def __exit__(self, kind, exc, tb) -> bool:
        if self.committed:
            self._finish()
            return False
        for src, dst in reversed(self.done):
            undo((lambda d=dst: d.unlink()) if self.undo_kind == "unlink" else (lambda s=src, d=dst: os.rename(d, s)))
        for folder in reversed(self.made):
            with contextlib.suppress(OSError):
                folder.rmdir()
        if self.cache:
            files.discard_temp(self.cache[0])
        self._cleanup()
        if isinstance(exc, OSError) and not isinstance(exc, files.CatalogWriteError):
            raise files.as_write_error(exc) from exc
        return False

    def _finish(self) -> None:
        """After the commit: the cache into place, the journal and staging away. Failures here lose nothing
        acknowledged (the cache is only a cache), so they are logged, not raised."""
        if self.cache:
            try:
                files.commit_temp(*self.cache)
            except OSError as exc:
                logger.warning("the index is saved but the embedding cache could not be updated (%s)", exc)
        self._cleanup()

    def _cleanup(self) -> None:
        with contextlib.suppress(OSError):
            self.journal.unlink()
        if self.staging.exists():
            shutil.rmtree(self.staging, ignore_errors=True)


def recover(cache_dir: Path, store) -> None:
    """Finish or undo a change a crash interrupted (call under the writer lock, before any new change)."""
    journal = Path(cache_dir) / JOURNAL
    if not journal.is_file():
        return
    try:
        record = json.loads(journal.read_text(encoding="utf-8"))
        committed = (store.manifest() or {}).get("build_id") != record["base"]
        moves = [(Path(a), Path(b)) for a, b in record["moves"]]
        cache = record.get("cache")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("ignoring an unreadable edit journal %s (%s)", journal, exc)
        moves, committed, cache, record = [], True, None, {}
    for src, dst in moves if committed else reversed(moves):
        if committed and src.exists() and not dst.exists():
            undo(lambda s=src, d=dst: os.rename(s, d))
        elif not committed and dst.exists():
            kind = record.get("undo")
            undo((lambda d=dst: d.unlink()) if kind == "unlink" else (lambda s=src, d=dst: os.rename(d, s)))
    for folder in [] if committed else reversed(record.get("made") or []):
        with contextlib.suppress(OSError):
            Path(folder).rmdir()
    if cache:
        tmp, path = Path(cache[0]), Path(cache[1])
        if committed and tmp.exists():
            undo(lambda: files.commit_temp(tmp, path))
        files.discard_temp(tmp)
    if record.get("staging"):
        shutil.rmtree(record["staging"], ignore_errors=True)
    logger.warning("%s an interrupted catalog change (journal %s)", "completed" if committed else "undid", journal)
    with contextlib.suppress(OSError):
        journal.unlink()


def _as_placed(product_id: str, staged: Path, dest: Path):
    from .catalog import CatalogImage

    st = staged.stat()
    return CatalogImage(product_id, dest, st.st_size, st.st_mtime_ns)


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


__all__ = [
    "REMOVED_FOLDER",
    "BuildReport",
    "UnknownProductError",
    "add_images",
    "check_add",
    "normalize_product_id",
    "remove_product",
]
