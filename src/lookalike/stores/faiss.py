"""FaissStore: the embedded :class:`~lookalike.stores.base.VectorStore`, one FAISS index in the cache folder.

On disk (``cache_dir``): ``index-<build_id>.faiss``, one file per generation, and ``metadata.json``, the manifest
that names the current generation with its checksum and lists every image (id, product, path, format, further
fields). A write builds the next generation in memory, writes its file, then replaces ``metadata.json``: a crash
at any moment leaves the previous generation loadable. "Saved": when ``upsert`` / ``delete`` / ``replace_all``
returns, the new generation is committed and any store opened on the folder (another process too) sees it; an
open store sees it at its next :meth:`FaissStore.refresh`.

Images are addressed by id; rows are this module's business. Edits change the index in place (no whole-index
copy) under a readers-writer lock: searches run concurrently and wait only while an edit is applied and saved.
If a save fails, the store reloads the last committed generation, so memory and disk never disagree.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import files
from .base import (
    IndexFileError,
    StoreError,
    StoreFilter,
    StoreHit,
    StoreInfo,
    StoreInputError,
    StoreMismatchError,
    check_rows,
)
from .faiss_files import (
    INDEX_FORMAT,
    INDEX_FORMAT_VERSION,
    columns,
    generation_path,
    holds_checksum,
    index_info,
    new_build_id,
    read_generation,
    read_manifest,
    read_records_file,
    records_file_bytes,
    remove_old_generations,
    rows_from_manifest,
    utc_now,
)
from .faiss_index import DEFAULT_EXACT_BELOW, INDEX_AUTO, METRIC_L2, VectorIndex, choose_index
from .rwlock import RWLock

logger = logging.getLogger(__name__)


class FaissStore:
    """Vectors in a FAISS index, per-image fields in the manifest. ``index_path=None``: in memory only."""

    backend = "faiss"

    def __init__(
        self,
        index_path: Path | None,
        metadata_path: Path | None = None,
        *,
        metric: str,
        dim: int | None = None,
        index_type: str = INDEX_AUTO,
        exact_below: int = DEFAULT_EXACT_BELOW,
        device: str = "cpu",
    ):
        self.index_path = Path(index_path) if index_path is not None else None
        self.metadata_path = (
            Path(metadata_path) if metadata_path is not None else (self.index_path.with_name("metadata.json")
            if self.index_path is not None else None)
        )  # fmt: skip
        self.metric = metric  # the committed generation's metric once one is loaded
        self.build_metric = metric  # what replace_all builds
        self.dim = dim
        self.index_type = index_type
        self.exact_below = exact_below
        self.device = device
        self._lock = RWLock()
        self._pending: dict[str, Any] | None = None
        self._pending_records: dict[str, dict[str, Any]] | None = None
        self._set_empty()
        self._stamp: tuple | None = None
        if self.metadata_path is not None and self.metadata_path.is_file():
            self._load()
            if dim is not None and dim != self.dim:
                raise StoreMismatchError(
                    f"the index at {self.metadata_path} holds {self.dim}-d vectors, not {dim}-d: "
                    "open it without a dimension, or build a new index in another cache_dir"
                )

    # --- state ----------------------------------------------------------------------------------------------

    def _set_empty(self) -> None:
        self._index: VectorIndex | None = None
        self._ids: list[str] = []
        self._fields: list[dict[str, Any]] = []
        self._row: dict[str, int] = {}
        self._counts: Counter = Counter()
        self._manifest: dict[str, Any] | None = None
        self._records: dict[str, dict[str, Any]] = {}
        self._by_product: dict[str, list[int]] | None = None
        self._last_subset: tuple[frozenset[str], np.ndarray] | None = None

    def _set_rows(self, ids: list[str], fields: list[dict[str, Any]]) -> None:
        self._ids, self._fields = ids, fields
        self._row = {i: r for r, i in enumerate(ids)}
        self._counts = Counter(f["product_id"] for f in fields)
        self._by_product = None  # rows of each product, made on the first filtered search
        self._last_subset: tuple[frozenset[str], np.ndarray] | None = None

    def _stat(self) -> tuple | None:
        try:
            st = os.stat(self.metadata_path)
        except (OSError, TypeError):
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _load(self) -> None:
        """Read the committed generation (verified against its checksums) and make it the live state."""
        self._apply(*self._read())

    def _read(self) -> tuple:
        """(stamp, manifest, index, ids, fields, records) of the committed generation, read without any lock."""
        stamp = self._stat()
        try:
            manifest, data = read_generation(self.metadata_path, self.index_path)
        except IndexFileError:
            if self._stat() == stamp:  # damaged, not replaced underneath: say so
                raise
            stamp = self._stat()  # another process committed while we read: read its generation
            manifest, data = read_generation(self.metadata_path, self.index_path)
        index = VectorIndex.from_bytes(
            data, manifest["metric"], factory=manifest["index"].get("factory"), device=self.device
        )
        ids, fields = rows_from_manifest(manifest)
        if index.ntotal != len(ids):
            raise IndexFileError(
                f"index file holds {index.ntotal} vectors but {self.metadata_path} lists {len(ids)} images; rebuild"
            )
        entry = (manifest.get("files") or {}).get("records")
        old = ((self._manifest or {}).get("files") or {}).get("records")
        if not entry:
            records: dict[str, dict[str, Any]] = {}
        elif old and old.get("sha256") == entry.get("sha256"):
            records = self._records  # the same table (its file is content-addressed): not read again
        else:
            records = read_records_file(self.index_path, entry, self.metadata_path)
        return stamp, manifest, index, ids, fields, records

    def _apply(self, stamp, manifest, index, ids, fields, records) -> None:
        self._index, self._manifest, self._stamp = index, manifest, stamp
        self.metric, self.dim = manifest["metric"], index.dim
        self._set_rows(ids, fields)
        self._records = records

    def _check_dim(self, vectors: np.ndarray) -> None:
        dim = self._index.dim if self._index is not None else self.dim
        if dim is not None and vectors.shape[-1] != dim:
            raise StoreInputError(f"vectors of dimension {vectors.shape[-1]} given to an index of dimension {dim}")

    # --- identity -------------------------------------------------------------------------------------------

    def manifest(self) -> dict[str, Any] | None:
        """The committed manifest, or the one given to :meth:`set_manifest` and not saved yet."""
        return dict(self._pending) if self._pending is not None else self._manifest

    def set_manifest(self, manifest: Mapping[str, Any]) -> None:
        """Saved with the next write (``upsert`` / ``delete`` / ``replace_all``), or at once when this store
        already holds a committed generation and :meth:`commit` is called."""
        self._pending = dict(manifest)

    def commit(self) -> None:
        """Save the pending manifest and records without changing any vector."""
        with self._lock.write():
            self._save()

    def records(self) -> Mapping[str, Mapping[str, Any]]:
        """The product records of the committed generation (or the pending ones); the same dict until changed."""
        return self._pending_records if self._pending_records is not None else self._records

    def set_records(self, records: Mapping[str, Mapping[str, Any]]) -> None:
        """Saved with the next write or :meth:`commit`, in ``index-r<sha>.records.json`` named by the manifest."""
        self._pending_records = {str(p): dict(r) for p, r in records.items()}

    # --- writing --------------------------------------------------------------------------------------------

    def upsert(self, ids: Sequence[str], vectors: np.ndarray, fields: Sequence[Mapping[str, Any]]) -> None:
        ids, fields = list(ids), [dict(f) for f in fields]
        vectors = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
        check_rows(ids, vectors, fields)
        self._check_dim(vectors)
        with self._lock.write():
            self._edit(lambda: self._upsert(ids, vectors, fields))

    def _upsert(self, ids, vectors, fields) -> None:
        if self._index is None:
            self._build(ids, vectors, fields)
            return
        last = {i: n for n, i in enumerate(ids)}  # an id given twice: its last row wins
        keep = [n for n, i in enumerate(ids) if last[i] == n]
        ids, vectors, fields = [ids[n] for n in keep], vectors[keep], [fields[n] for n in keep]
        self._remove_rows([self._row[i] for i in ids if i in self._row])
        self._index.add(vectors)
        self._set_rows(self._ids + ids, self._fields + fields)

    def delete(self, ids: Sequence[str] = (), *, product_id: str | None = None) -> int:
        with self._lock.write():
            rows = {self._row[i] for i in ids if i in self._row}
            if product_id is not None:
                rows |= {r for r, f in enumerate(self._fields) if f["product_id"] == product_id}
            if not rows:
                return 0
            self._edit(lambda: self._remove_rows(sorted(rows)))
            return len(rows)

    def _remove_rows(self, rows: list[int]) -> None:
        if not rows:
            return
        self._index.remove(np.array(rows, dtype=np.int64))
        drop = set(rows)
        keep = [r for r in range(len(self._ids)) if r not in drop]
        self._set_rows([self._ids[r] for r in keep], [self._fields[r] for r in keep])

    def replace_all(self, ids: Sequence[str], vectors: np.ndarray, fields: Sequence[Mapping[str, Any]]) -> None:
        ids, fields = list(ids), [dict(f) for f in fields]
        vectors = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
        if not len(ids):
            vectors = np.zeros((0, self.dim or vectors.shape[-1]), np.float32)
        check_rows(ids, vectors, fields)
        if len(set(ids)) != len(ids):
            raise StoreError("replace_all got the same image id twice")
        with self._lock.write():
            self._edit(lambda: self._build(ids, vectors, fields))

    def _build(self, ids, vectors, fields) -> None:
        self.metric = self.build_metric
        self._index = VectorIndex.build(
            vectors, self.metric, index_type=self.index_type, exact_below=self.exact_below, device=self.device
        )
        self.dim = self._index.dim
        self._set_rows(ids, fields)

    def _edit(self, change) -> None:
        """Apply ``change`` in memory and save it; on any failure go back to the committed generation."""
        try:
            change()
            self._save()
        except BaseException:
            self._rollback()
            raise

    def _rollback(self) -> None:
        self._pending = self._pending_records = None
        if self.metadata_path is not None and self.metadata_path.is_file():
            try:
                self._load()
                return
            except StoreError:
                logger.exception("could not reload the committed index after a failed write")
        if self._manifest is None:
            self._set_empty()

    def _save(self) -> None:
        """Write the next generation and commit it by replacing the metadata file (a no-op in memory)."""
        manifest = dict(self._pending if self._pending is not None else (self._manifest or {}))
        index = self._index
        manifest.update(
            format=INDEX_FORMAT,
            version=INDEX_FORMAT_VERSION,
            build_id=new_build_id(),
            created_at=utc_now(),
            metric=self.metric,
            normalized=index.normalized if index is not None else self.metric != METRIC_L2,
        )
        records = self._pending_records if self._pending_records is not None else self._records
        manifest["images"] = columns(self._ids, self._fields)
        manifest["counts"] = dict(manifest.get("counts") or {}, images=len(self._ids), products=len(self._counts))
        manifest["files"] = {k: v for k, v in (manifest.get("files") or {}).items() if k != "records"}
        if self.index_path is None or index is None:
            manifest["index"] = index_info(index, manifest.get("index"))
            self._manifest, self._pending, self._records, self._pending_records = manifest, None, records, None
            return
        table = records_file_bytes(records) if records else None
        data = index.to_bytes()
        path = generation_path(self.index_path, manifest["build_id"])
        entry = {"file": path.name, "sha256": files.sha256_bytes(data), "bytes": len(data)}
        manifest["index"] = dict(index_info(index, None), **entry)
        manifest["files"] = dict(manifest["files"], index=entry)
        if table is not None:
            digest = files.sha256_bytes(table)
            table_path = generation_path(self.index_path, f"r{digest[:16]}", ".records.json")
            manifest["files"]["records"] = {"file": table_path.name, "sha256": digest, "bytes": len(table),
                                            "products": len(records)}  # fmt: skip
        manifest["images_sha256"] = files.sha256_bytes(files.canonical_json(manifest["images"]))
        with files.folder_lock(self.metadata_path.parent):
            files.atomic_write_bytes(path, data)
            if table is not None and not holds_checksum(table_path, digest):
                files.atomic_write_bytes(table_path, table)
            files.atomic_write_json(self.metadata_path, manifest)
            # The previous generation stays one more commit: a reader that read the old metadata a moment ago
            # (another process opening the index) still finds the file it names.
            kept = [manifest, self._manifest or {}]
            keep = {self.index_path.with_name(e["file"]) for m in kept for e in (m.get("files") or {}).values()}
            remove_old_generations(self.index_path, keep)
        self._manifest, self._pending, self._stamp = manifest, None, self._stat()
        self._records, self._pending_records = records, None

    # --- reading --------------------------------------------------------------------------------------------

    def search(
        self,
        vectors: np.ndarray,
        k: int,
        *,
        where: StoreFilter | str | None = None,
        group_by_product: bool = False,
        group_size: int = 1,
    ) -> list[list[StoreHit]]:
        """See :meth:`VectorStore.search`; with a :class:`StoreFilter` the search runs over its products' images
        only (:meth:`VectorIndex.search_subset`: exact on exact indexes and on subsets up to SUBSET_EXACT rows)."""
        if isinstance(where, str):
            raise StoreError(
                "the faiss store filters with a StoreFilter (engine: search(..., where=...)), not a Milvus expression"
            )
        vectors = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
        self._check_dim(vectors)
        with self._lock.read():
            subset = None if where is None else self._rows_of(where.product_ids)
            n = self.count() if subset is None else len(subset)
            if n == 0 or k < 1:
                return [[] for _ in range(len(vectors))]

            def search(q: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
                if subset is None:
                    return self._index.search(q, depth)
                return self._index.search_subset(q, depth, subset)

            if not group_by_product:
                scores, rows = search(vectors, k)
                return [self._hits(s, r) for s, r in zip(scores, rows)]
            out = []
            for q in vectors:  # grouped: widen until k products have their group_size best images, or all seen
                depth = min(n, max(4 * k * group_size, 64))
                while True:
                    scores, rows = search(q[None], depth)
                    hits = self._hits(scores[0], rows[0])
                    groups: dict[str, list[StoreHit]] = {}
                    for h in hits:
                        groups.setdefault(h.product_id, [])
                        if len(groups[h.product_id]) < group_size:
                            groups[h.product_id].append(h)
                    full = [p for p, g in groups.items() if len(g) >= min(group_size, self._counts[p])]
                    if depth >= n or len(full) >= k and all(p in full for p in list(groups)[:k]):
                        break
                    depth = min(n, depth * 4)
                out.append([h for g in list(groups.values())[:k] for h in g])
            return out

    def _rows_of(self, products: frozenset[str] | set[str]) -> np.ndarray:
        """The rows of these products' images, sorted (call under the read lock)."""
        last = self._last_subset
        if last is not None and last[0] is products:  # the engine hands the same filter back while it holds
            return last[1]
        by_product = self._by_product
        if by_product is None:
            by_product = {}
            for r, f in enumerate(self._fields):
                by_product.setdefault(f["product_id"], []).append(r)
            self._by_product = by_product
        rows = [r for p in products for r in by_product.get(p, ())]
        out = np.array(sorted(rows), dtype=np.int64)
        self._last_subset = (products, out)
        return out

    def _hits(self, scores: np.ndarray, rows: np.ndarray) -> list[StoreHit]:
        l2 = self.metric == METRIC_L2
        ids, fields, out = self._ids, self._fields, []
        for score, row in zip(scores.tolist(), rows.tolist()):
            if row < 0:
                break
            f = fields[row]  # shared read-only view of the row's fields: no copy per hit
            similarity = 1.0 / (1.0 + score) if l2 else score  # ranking.similarity_from_distance
            out.append(StoreHit(ids[row], f["product_id"], similarity, f["path"], score if l2 else None, f))
        return out

    def fetch(self, ids: Sequence[str], *, with_vectors: bool = False) -> dict[str, dict[str, Any]]:
        with self._lock.read():
            found = [i for i in dict.fromkeys(ids) if i in self._row]
            out = {i: dict(self._fields[self._row[i]]) for i in found}
            if with_vectors and found:
                vectors = self._index.reconstruct([self._row[i] for i in found])
                for i, v in zip(found, vectors):
                    out[i]["vector"] = v
            return out

    def ids(self, *, product_id: str | None = None) -> list[str]:
        with self._lock.read():
            if product_id is None:
                return list(self._ids)
            return [i for i, f in zip(self._ids, self._fields) if f["product_id"] == product_id]

    def count(self) -> int:
        return len(self._ids)

    def product_counts(self) -> dict[str, int]:
        return dict(self._counts)

    def describe(self) -> StoreInfo:
        index = self._index
        location = str(self.metadata_path.parent) if self.metadata_path is not None else ":memory:"
        size = int((self._manifest or {}).get("index", {}).get("bytes", 0))
        return StoreInfo(
            backend="faiss",
            location=location,
            count=self.count(),
            products=len(self._counts),
            dim=int(index.dim if index is not None else (self.dim or 0)),
            metric=self.metric,
            index_type=index.type_name if index is not None else "none",
            nbytes=size,
            extra={"factory": index.factory if index is not None else None},
        )

    # --- life cycle -----------------------------------------------------------------------------------------

    def refresh(self) -> bool:
        """Load the generation another process committed since this store last looked (a ``stat`` when none).

        The new generation is read while searches go on; it replaces the live one only if the manifest on disk
        is still the one read (otherwise the next refresh picks up the newer one)."""
        if self.metadata_path is None:
            return False
        stamp = self._stat()
        if stamp is None or stamp == self._stamp:
            return False
        try:
            loaded = self._read()
        except IndexFileError as exc:  # e.g. a generation file removed by a newer commit while it was read
            logger.debug("refresh of %s postponed: %s", self.metadata_path, exc)
            return False
        with self._lock.write():
            if loaded[0] == self._stamp or self._stat() != loaded[0]:
                return False
            before = (self._manifest or {}).get("build_id")
            self._apply(*loaded)
            return self._manifest.get("build_id") != before

    def close(self) -> None:
        self._set_empty()


__all__ = ["FaissStore", "choose_index", "read_generation", "read_manifest"]
