"""Everything lookalike keeps on disk: the embedding cache, the index and its manifest.

Formats are safe to load from an untrusted disk (``.npz`` without pickle, JSON, FAISS' own format). Every write
is atomic: written to a temporary file in the same folder, fsynced, then renamed over the target. The index is
written as a new generation (``index-<build_id>.faiss``) and the metadata file, which names the generation and
carries its checksum, is replaced last: a crash at any moment leaves the previous index loadable.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import secrets
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from .catalog import CatalogError, scan_catalog
from .settings import Settings

logger = logging.getLogger(__name__)

INDEX_FORMAT = "lookalike-index"
INDEX_FORMAT_VERSION = 1


class IndexFileError(RuntimeError):
    """The index on disk is missing, damaged, or was built with settings that differ from the current ones."""


# --- atomic files -----------------------------------------------------------------------------------------


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes the file private (0600); keep the mode of the file replaced, else the usual 0644
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform can open a directory
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def write_lock(folder: Path) -> Iterator[None]:
    """One writer at a time per cache folder (advisory; readers never wait)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a+b") as f:
        try:
            import fcntl

            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover - Windows: no advisory lock
            pass
        yield


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode("utf-8")


# --- embedding cache ----------------------------------------------------------------------------------------


@dataclass
class CachedEmbeddings:
    """Raw feature vectors keyed by image (path, size, mtime) for one model fingerprint."""

    paths: list[str] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    mtimes: list[int] = field(default_factory=list)
    formats: list[str] = field(default_factory=list)
    vectors: np.ndarray | None = None

    def lookup(self) -> dict[tuple[str, int, int], int]:
        return {(p, s, m): i for i, (p, s, m) in enumerate(zip(self.paths, self.sizes, self.mtimes))}


class EmbeddingCache:
    """``<cache_dir>/embeddings/<fingerprint>-<folder>.npz``: one file per model fingerprint and catalog folder,
    so models never mix and one catalog never evicts another's vectors."""

    def __init__(self, cache_dir: Path, name: str):
        self.path = Path(cache_dir) / "embeddings" / f"{name}.npz"

    @classmethod
    def for_catalog(cls, cache_dir: Path, fingerprint: str, root: Path) -> EmbeddingCache:
        """The cache of one catalog folder: evaluating another folder never evicts this one's vectors."""
        folder = hashlib.sha256(str(Path(root).expanduser().resolve()).encode()).hexdigest()[:8]
        return cls(cache_dir, f"{fingerprint}-{folder}")

    def load(self) -> CachedEmbeddings:
        """The cache, or an empty one if there is none or it cannot be read (it is only a cache)."""
        if not self.path.is_file():
            return CachedEmbeddings()
        try:
            with np.load(self.path, allow_pickle=False) as z:
                vectors = z["vectors"].astype(np.float32, copy=False)
                out = CachedEmbeddings(
                    [str(p) for p in z["paths"]],
                    [int(s) for s in z["sizes"]],
                    [int(m) for m in z["mtimes"]],
                    [str(f) for f in z["formats"]],
                    vectors,
                )
            if not (len(out.paths) == len(out.sizes) == len(out.mtimes) == len(out.formats) == len(vectors)):
                raise ValueError("columns of different lengths")
            return out
        except Exception as exc:
            logger.warning(
                "ignoring unreadable embedding cache %s (%s); images will be extracted again", self.path, exc
            )
            return CachedEmbeddings()

    def save(self, entries: CachedEmbeddings) -> None:
        buf = io.BytesIO()
        dim = entries.vectors.shape[1] if entries.vectors is not None and entries.vectors.ndim == 2 else 0
        np.savez(
            buf,
            paths=np.array(entries.paths, dtype=str),
            sizes=np.array(entries.sizes, dtype=np.int64),
            mtimes=np.array(entries.mtimes, dtype=np.int64),
            formats=np.array(entries.formats, dtype=str),
            vectors=entries.vectors if entries.vectors is not None else np.zeros((0, dim), np.float32),
        )
        atomic_write_bytes(self.path, buf.getvalue())


# --- index files --------------------------------------------------------------------------------------------


@dataclass
class StoredIndex:
    manifest: dict[str, Any]
    files: dict[str, bytes]  # role ("index", "projection", ...) -> verified content


FILE_SUFFIXES = {"index": None, "projection": ".projection.npz"}  # None: the index file's own suffix


def new_build_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(3)


def generation_path(index_path: Path, build_id: str, role: str = "index") -> Path:
    suffix = FILE_SUFFIXES[role] or index_path.suffix
    return index_path.with_name(f"{index_path.stem}-{build_id}{suffix}")


def save_index(settings: Settings, manifest: dict[str, Any], files: dict[str, bytes]) -> dict[str, Any]:
    """Write a new generation of the index files, then commit it by replacing the metadata file.

    ``files`` maps a role ("index", optionally "projection") to its bytes. Returns the manifest as written, with
    each file's name, size and checksum under its role (``manifest["index"]``, ``manifest["files"]``).
    """
    index_path, metadata_path = settings.index_path, settings.metadata_path
    build_id = manifest["build_id"]
    manifest = dict(manifest)
    written = {}
    for role, data in files.items():
        path = generation_path(index_path, build_id, role)
        written[role] = {"file": path.name, "sha256": sha256_bytes(data), "bytes": len(data)}
    manifest["index"] = dict(manifest.get("index", {}), **written["index"])
    manifest["files"] = written
    manifest["images_sha256"] = sha256_bytes(_canonical(manifest["images"]))
    with write_lock(metadata_path.parent):
        for role, data in files.items():
            atomic_write_bytes(generation_path(index_path, build_id, role), data)
        atomic_write_json(metadata_path, manifest)
        _remove_old_generations(index_path, keep={index_path.with_name(w["file"]) for w in written.values()})
    return manifest


def _remove_old_generations(index_path: Path, keep: set[Path]) -> None:
    for old in index_path.parent.glob(f"{index_path.stem}-*"):
        if old not in keep and old.is_file() and not old.name.endswith(".tmp"):
            with contextlib.suppress(OSError):
                old.unlink()


def read_index(settings: Settings) -> StoredIndex:
    """The committed index files and their manifest, verified against their checksums."""
    metadata_path = settings.metadata_path
    if not metadata_path.is_file():
        raise IndexFileError(
            f"no index metadata at {metadata_path}: build the index first (`lookalike index` or build_index())"
        )
    try:
        manifest = json.loads(metadata_path.read_bytes())
    except (OSError, ValueError) as exc:
        raise IndexFileError(
            f"index metadata {metadata_path} is unreadable or damaged ({exc}); rebuild the index"
        ) from None
    if not isinstance(manifest, dict) or manifest.get("format") != INDEX_FORMAT:
        raise IndexFileError(f"{metadata_path} is not a lookalike index metadata file")
    if manifest.get("version") != INDEX_FORMAT_VERSION:
        raise IndexFileError(
            f"{metadata_path} has index format version {manifest.get('version')}, this lookalike reads "
            f"version {INDEX_FORMAT_VERSION}; rebuild the index"
        )
    try:
        if sha256_bytes(_canonical(manifest["images"])) != manifest["images_sha256"]:
            raise IndexFileError(f"index metadata {metadata_path} does not match its checksum; rebuild the index")
        entries = dict(manifest.get("files") or {"index": manifest["index"]})
        files = {}
        for role, info in entries.items():
            path = settings.index_path.with_name(info["file"])
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise IndexFileError(
                    f"{role} file {path} named by {metadata_path} cannot be read ({exc.strerror or exc})"
                ) from None
            if sha256_bytes(data) != info.get("sha256"):
                raise IndexFileError(
                    f"{role} file {path} does not match the checksum in {metadata_path}; it is damaged, rebuild"
                )
            files[role] = data
    except (KeyError, TypeError) as exc:
        raise IndexFileError(f"index metadata {metadata_path} lacks {exc}; rebuild the index") from None
    return StoredIndex(manifest, files)


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --- the seed's DataManager ---------------------------------------------------------------------------------


class DataManager:
    """Loads the catalog and keeps the embedding cache (the seed's API, on the formats above)."""

    def __init__(self, settings: Settings | None = None, *, fingerprint: str | None = None):
        self.settings = settings if settings is not None else Settings()
        # The engine passes its extractor's fingerprint; standalone use keys the cache by model and input size.
        self.fingerprint = fingerprint or f"{self.settings.model_name}-{self.settings.input_size}"

    @property
    def cache(self) -> EmbeddingCache:
        return EmbeddingCache.for_catalog(self.settings.cache_dir, self.fingerprint, self.settings.data_dir)

    def load_dataset(self) -> tuple[list[str], list[str]]:
        """(image_paths, product_ids) of every image under ``data_dir``, sorted; raises CatalogError if none."""
        images = scan_catalog(self.settings.data_dir)
        return [str(im.path) for im in images], [im.product_id for im in images]

    def save_embeddings(self, embeddings: np.ndarray, image_paths: list[str], product_ids: list[str]) -> None:
        """Cache ``embeddings`` (n, dim) for these images, keyed by each file's current size and mtime."""
        if len(embeddings) != len(image_paths) or len(image_paths) != len(product_ids):
            raise ValueError(
                f"embeddings ({len(embeddings)}), image_paths ({len(image_paths)}) and product_ids "
                f"({len(product_ids)}) must have the same length"
            )
        entries = CachedEmbeddings(vectors=np.asarray(embeddings, dtype=np.float32))
        for p in image_paths:
            path = Path(p).resolve()
            st = path.stat()
            entries.paths.append(str(path))
            entries.sizes.append(st.st_size)
            entries.mtimes.append(st.st_mtime_ns)
            entries.formats.append("")
        self.cache.save(entries)

    def load_embeddings(self) -> tuple[np.ndarray, list[str], list[str]] | None:
        """(embeddings, image_paths, product_ids) from the cache for images still unchanged on disk, or None."""
        cached = self.cache.load()
        if cached.vectors is None or not cached.paths:
            return None
        try:
            current = {im.key: im for im in scan_catalog(self.settings.data_dir)}
        except CatalogError:
            return None
        rows = [i for i, key in enumerate(zip(cached.paths, cached.sizes, cached.mtimes)) if key in current]
        if not rows:
            return None
        keys = [(cached.paths[i], cached.sizes[i], cached.mtimes[i]) for i in rows]
        return cached.vectors[rows], [k[0] for k in keys], [current[k].product_id for k in keys]

    def load_metadata(self) -> tuple[list[str], list[str]] | None:
        """(image_paths, product_ids) of the built index, from the metadata file, or None if there is none."""
        try:
            manifest = read_index(self.settings).manifest
        except IndexFileError:
            return None
        root = Path(self.settings.data_dir).expanduser().resolve()
        images = manifest["images"]
        return [str(root / p) for p in images["path"]], list(images["product_id"])
