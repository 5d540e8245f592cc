"""Export the index so its vectors can go to any other tool: Parquet, or ``vectors.npy`` with a JSON sidecar.

One row per indexed image: ``image_id``, ``product_id``, ``path`` (relative to the catalog root), ``format``,
``vector`` (float32, the vectors the index searches: normalised for cosine, projected when the index is tuned)
and the product's record (``lookalike.records``). Rows are ordered by product id, then path. Nothing is
pickled; both formats are written to a temporary name and renamed into place.

- ``parquet``: one file; columns ``image_id product_id path format vector`` (fixed-size list of float32) and
  the record's ``name url price currency category brand tags``, plus ``record`` (the whole record as JSON
  text, attributes included). The file's key-value metadata ``lookalike`` holds the manifest summary (model,
  metric, dim, count) as JSON.
- ``npy``: a folder with ``vectors.npy`` (float32, ``(n, dim)``, loads with ``allow_pickle=False``) and
  ``items.json`` (the summary, ``items``: one entry per row in row order, ``records``: by product id).

The source is anything with the reading half of the :class:`~lookalike.stores.base.VectorStore` protocol
(``ids()``, ``fetch(ids, with_vectors=True)``, optionally ``describe()``); :func:`export_index` takes an engine.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .records import ProductRecord

logger = logging.getLogger(__name__)

FORMATS = ("parquet", "npy")
EXPORT_FORMAT = "lookalike-export"
EXPORT_VERSION = 1
RECORD_COLUMNS = ("name", "url", "price", "currency", "category", "brand", "tags")
FETCH_CHUNK = 4096


class ExportError(RuntimeError):
    """An export that cannot be written or read back; names the path and the reason."""


class ExportSource(Protocol):
    """The reading half of the VectorStore protocol: all an export needs."""

    def ids(self) -> list[str]: ...

    def fetch(self, ids: Sequence[str], *, with_vectors: bool = False) -> dict[str, dict[str, Any]]: ...


@dataclass
class Exported:
    """An export read back (:func:`read_export`): row ``i`` of ``vectors`` is ``image_ids[i]``."""

    image_ids: list[str]
    product_ids: list[str]
    paths: list[str]
    formats: list[str]
    vectors: np.ndarray
    records: dict[str, dict[str, Any]]  # by product id
    info: dict[str, Any]


def export(
    source: ExportSource,
    out: str | Path,
    *,
    format: str = "parquet",
    records: Mapping[str, ProductRecord] | None = None,
    info: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write every image of ``source`` to ``out`` (a ``.parquet`` file or an npy folder); returns ``out``."""
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; available: {', '.join(FORMATS)}")
    out = Path(out)
    if out.exists() and not overwrite:
        raise ExportError(f"{out} already exists; choose another path or pass overwrite=True (CLI: --overwrite)")
    rows, vectors = _collect(source)
    records = dict(records or {})
    summary = {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "count": len(rows),
        "dim": int(vectors.shape[1]) if vectors.ndim == 2 else 0,
        **_describe(source),
        **dict(info or {}),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    if format == "parquet":
        _write_parquet(out, rows, vectors, records, summary)
    else:
        _write_npy(out, rows, vectors, records, summary)
    logger.info("exported %d image vectors (dim %d) to %s (%s)", len(rows), summary["dim"], out, format)
    return out


def _describe(source: Any) -> dict[str, Any]:
    describe = getattr(source, "describe", None)
    if describe is None:
        return {}
    d = describe()
    return {"backend": d.backend, "metric": d.metric, "index_type": d.index_type, "products": d.products}


def _collect(source: ExportSource) -> tuple[list[dict[str, Any]], np.ndarray]:
    ids = list(source.ids())
    rows: list[dict[str, Any]] = []
    chunks: list[np.ndarray] = []
    for start in range(0, len(ids), FETCH_CHUNK):
        part = ids[start : start + FETCH_CHUNK]
        fetched = source.fetch(part, with_vectors=True)
        missing = [i for i in part if i not in fetched]
        if missing:
            raise ExportError(f"{len(missing)} image(s) vanished during the export (e.g. {missing[0]}); run it again")
        for image_id in part:
            f = fetched[image_id]
            rows.append(
                {
                    "image_id": image_id,
                    "product_id": str(f["product_id"]),
                    "path": str(f.get("path", "")),
                    "format": str(f.get("format", "")),
                }
            )
        chunks.append(np.stack([np.asarray(fetched[i]["vector"], np.float32) for i in part]) if part else None)
    vectors = np.concatenate([c for c in chunks if c is not None]) if rows else np.zeros((0, 0), np.float32)
    order = sorted(range(len(rows)), key=lambda i: (rows[i]["product_id"], rows[i]["path"], rows[i]["image_id"]))
    return [rows[i] for i in order], np.ascontiguousarray(vectors[order], dtype=np.float32)


@contextlib.contextmanager
def _staged(out: Path, *, folder: bool):
    """A temporary file or folder beside ``out`` that replaces it only when writing succeeded."""
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    target = tmp if folder else tmp / out.name
    try:
        yield target
        if out.is_dir() and not out.is_symlink():
            shutil.rmtree(out)
        os.replace(target, out)
    except OSError as exc:
        raise ExportError(f"cannot write {out} ({exc.strerror or exc})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_parquet(out, rows, vectors, records, summary) -> None:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - pyarrow is a dependency
        raise ExportError("parquet export needs pyarrow (pip install pyarrow) or use --format npy") from None
    dim = summary["dim"]
    columns: dict[str, Any] = {k: [r[k] for r in rows] for k in ("image_id", "product_id", "path", "format")}
    flat = pa.array(vectors.reshape(-1), type=pa.float32())
    columns["vector"] = pa.FixedSizeListArray.from_arrays(flat, dim) if dim else pa.array([], pa.list_(pa.float32()))
    recs = [records.get(r["product_id"]) for r in rows]
    for key in RECORD_COLUMNS:
        values = [None if rec is None else rec.get(key) for rec in recs]
        if key == "tags":
            columns[key] = pa.array([list(v) if v else None for v in values], pa.list_(pa.string()))
        elif key == "price":
            columns[key] = pa.array(values, pa.float64())
        else:
            columns[key] = pa.array(values, pa.string())
    columns["record"] = pa.array(
        [None if rec is None else json.dumps(rec.to_dict(), ensure_ascii=False) for rec in recs], pa.string()
    )
    table = pa.table(columns).replace_schema_metadata({"lookalike": json.dumps(summary, ensure_ascii=False)})
    with _staged(out, folder=False) as target:
        pq.write_table(table, target)


def _write_npy(out, rows, vectors, records, summary) -> None:
    from .files import atomic_write_json

    products = sorted({r["product_id"] for r in rows})
    sidecar = {
        **summary,
        "items": rows,
        "records": {p: records[p].to_dict() for p in products if p in records},
    }
    with _staged(out, folder=True) as target:
        target.mkdir(exist_ok=True)
        np.save(target / "vectors.npy", vectors, allow_pickle=False)
        atomic_write_json(target / "items.json", sidecar)


def read_export(path: str | Path) -> Exported:
    """Read an export back (either format), checking that rows and vectors agree."""
    path = Path(path)
    try:
        if path.is_dir():
            info = json.loads((path / "items.json").read_bytes())
            vectors = np.load(path / "vectors.npy", allow_pickle=False)
            items = info.pop("items")
            records = info.pop("records")
        else:
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            meta = table.schema.metadata or {}
            info = json.loads(meta.get(b"lookalike", b"{}"))
            data = table.to_pydict()
            items = [
                {k: data[k][i] for k in ("image_id", "product_id", "path", "format")} for i in range(table.num_rows)
            ]
            records = {
                data["product_id"][i]: json.loads(data["record"][i])
                for i in range(table.num_rows)
                if data["record"][i] is not None
            }
            dim = int(info.get("dim", 0))
            col = table.column("vector").combine_chunks()
            vectors = np.asarray(col.values.to_numpy(zero_copy_only=False), np.float32).reshape(-1, dim or 1)
            vectors = vectors[: table.num_rows] if dim else np.zeros((table.num_rows, 0), np.float32)
    except (OSError, ValueError, KeyError) as exc:
        raise ExportError(f"{path}: not a readable lookalike export ({exc})") from None
    if info.get("format") != EXPORT_FORMAT or len(items) != len(vectors):
        raise ExportError(f"{path}: not a lookalike export, or its rows and vectors disagree")
    return Exported(
        [i["image_id"] for i in items],
        [i["product_id"] for i in items],
        [i["path"] for i in items],
        [i["format"] for i in items],
        vectors,
        records,
        info,
    )


# --- engines ----------------------------------------------------------------------------------------------


def export_index(engine: Any, out: str | Path, *, format: str = "parquet", overwrite: bool = False) -> Path:
    """``lookalike export``: the engine's loaded index (its store, FAISS or Milvus) and its product records
    (``engine.records`` when it has them) to ``out``."""
    store = engine.store
    info: dict[str, Any] = {}
    source = store
    manifest = store.manifest()
    if isinstance(manifest, Mapping):
        model = manifest.get("model", {})
        info["model"] = {k: model.get(k) for k in ("model_name", "weights") if k in model}
        info["model_fingerprint"] = manifest.get("model_fingerprint")
        info["build_id"] = manifest.get("build_id")
    records = getattr(engine, "records", None)
    return export(source, out, format=format, records=records, info=info, overwrite=overwrite)


__all__ = ["FORMATS", "ExportError", "ExportSource", "Exported", "export", "export_index", "read_export"]
