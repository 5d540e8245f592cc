"""The FAISS store's files: ``metadata.json`` (the manifest, with the image list and checksums) and one
``index-<build_id>.faiss`` per generation. Reading verifies every checksum and says which file is wrong."""

from __future__ import annotations

import contextlib
import json
import secrets
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .. import files
from .base import REQUIRED_FIELDS, IndexFileError
from .faiss_index import VectorIndex

INDEX_FORMAT = "lookalike-index"
INDEX_FORMAT_VERSION = 1


def new_build_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(3)


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def generation_path(index_path: Path, build_id: str, suffix: str | None = None) -> Path:
    """``index-<build_id>.faiss`` (or another ``suffix``) beside ``index_path``."""
    return index_path.with_name(f"{index_path.stem}-{build_id}{suffix or index_path.suffix}")


def read_generation(metadata_path: Path, index_path: Path) -> tuple[dict[str, Any], bytes]:
    """The committed manifest and index file bytes, verified against their checksums."""
    manifest = read_manifest(metadata_path)
    try:
        if files.sha256_bytes(files.canonical_json(manifest["images"])) != manifest["images_sha256"]:
            raise IndexFileError(f"index metadata {metadata_path} does not match its checksum; rebuild the index")
        info = (manifest.get("files") or {}).get("index") or manifest["index"]
        data = verified_bytes(index_path.with_name(info["file"]), info.get("sha256"), metadata_path, "index")
    except (KeyError, TypeError) as exc:
        raise IndexFileError(f"index metadata {metadata_path} lacks {exc}; rebuild the index") from None
    return manifest, data


def read_manifest(metadata_path: Path) -> dict[str, Any]:
    """The manifest in ``metadata.json``, or :class:`IndexFileError` saying what is wrong with it."""
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
    return manifest


def rows_from_manifest(manifest: dict[str, Any]) -> tuple[list[str], list[dict[str, Any]]]:
    from ..ids import image_id_for

    try:
        columns = dict(manifest["images"])
        paths = list(columns.pop("path"))
        ids = list(columns.pop("image_id", None) or [image_id_for(p) for p in paths])
        fields = [{"path": p} for p in paths]
        for name, values in columns.items():
            if len(values) != len(paths):
                raise IndexFileError(f"index metadata column {name!r} has {len(values)} rows for {len(paths)} images")
            for f, v in zip(fields, values):
                f[name] = v
        if fields and any(name not in fields[0] for name in REQUIRED_FIELDS):
            raise KeyError(REQUIRED_FIELDS)
    except (KeyError, TypeError, AttributeError) as exc:
        raise IndexFileError(f"index metadata lacks the image list ({exc}); rebuild the index") from None
    return ids, fields


def columns(ids: list[str], fields: list[dict[str, Any]]) -> dict[str, list[Any]]:
    names = list(REQUIRED_FIELDS) + sorted({k for f in fields for k in f} - set(REQUIRED_FIELDS))
    out: dict[str, list[Any]] = {"path": [f.get("path", "") for f in fields]}
    for name in names:
        if name != "path":
            out[name] = [f.get(name) for f in fields]
    out["image_id"] = list(ids)
    return out


RECORDS_FORMAT = "lookalike-records"  # the same format as lookalike.record_files.save_records writes
RECORDS_FORMAT_VERSION = 1


def records_file_bytes(records: dict[str, dict[str, Any]]) -> bytes:
    """The product records file of a generation: canonical JSON, records sorted by product id."""
    table = [dict(records[p], product_id=p) for p in sorted(records)]
    return files.canonical_json({"format": RECORDS_FORMAT, "version": RECORDS_FORMAT_VERSION, "records": table})


def verified_bytes(path: Path, digest: Any, metadata_path: Path, kind: str) -> bytes:
    """The bytes of a file the manifest names, checked against its SHA-256 (IndexFileError naming both files)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise IndexFileError(
            f"{kind} file {path} named by {metadata_path} cannot be read ({exc.strerror or exc}); rebuild"
        ) from None
    if files.sha256_bytes(data) != digest:
        raise IndexFileError(
            f"{kind} file {path} does not match the checksum in {metadata_path}; it is damaged, rebuild"
        )
    return data


def read_records_file(index_path: Path, entry: dict[str, Any], metadata_path: Path) -> dict[str, dict[str, Any]]:
    """The records a manifest's ``files.records`` entry names, verified against its checksum."""
    path = index_path.with_name(str(entry.get("file")))
    data = verified_bytes(path, entry.get("sha256"), metadata_path, "records")
    try:
        table = json.loads(data)
        if table.get("format") != RECORDS_FORMAT or table.get("version") != RECORDS_FORMAT_VERSION:
            raise ValueError(f"format {table.get('format')!r} version {table.get('version')!r}")
        return {str(r["product_id"]): dict(r) for r in table["records"]}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise IndexFileError(f"records file {path} is not a lookalike records table ({exc}); rebuild") from None


def index_info(index: VectorIndex | None, previous: dict[str, Any] | None) -> dict[str, Any]:
    if index is None:
        return dict(previous or {})
    return {"type": index.type_name, "factory": index.factory, "ntotal": index.ntotal, "dim": index.dim}


def remove_old_generations(index_path: Path, keep: set[Path]) -> None:
    for old in index_path.parent.glob(f"{index_path.stem}-*"):
        if old not in keep and old.is_file() and not old.name.endswith(".tmp"):
            with contextlib.suppress(OSError):
                old.unlink()


def holds_checksum(path: Path, digest: str) -> bool:
    """Whether ``path`` already holds the bytes of this checksum (content-addressed files are written once)."""
    try:
        return files.sha256_bytes(path.read_bytes()) == digest
    except OSError:
        return False


__all__ = ["INDEX_FORMAT", "INDEX_FORMAT_VERSION", "generation_path", "read_generation", "read_manifest"]
