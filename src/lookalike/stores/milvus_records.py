"""Product records on Milvus (a part of :class:`~lookalike.stores.milvus.MilvusStore`, kept apart for size).

The table (product id -> the record's JSON dict) lives in the manifest collection as ``records:*`` rows with a
checksum, so every client of the server reads the same one; each image row carries its product's record in the
``record`` JSON field, which filters read (:meth:`lookalike.filters.Filter.to_milvus_expr`). Updating records
upserts the rows of the products whose record changed with their stored vectors (read back): no image is
extracted again.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from .base import StoreError
from .milvus_support import BATCH, FIELDS, in_list, join_records, records_rows


class MilvusRecords:
    """The records methods of MilvusStore (which provides the client, the collection and the scans)."""

    _records: dict[str, dict[str, Any]]
    _records_sha: str | None
    _pending_records: dict[str, dict[str, Any]] | None
    _has_record: bool

    def records(self) -> Mapping[str, Mapping[str, Any]]:
        """The pending records, else the saved table (read again only when its checksum changed)."""
        if self._pending_records is not None:
            return self._pending_records
        rows = self._meta_rows('key == "records:0"')
        if not rows:
            self._records, self._records_sha = {}, None
            return self._records
        try:
            sha = json.loads(rows["records:0"]).get("sha256")
            if sha != self._records_sha:
                self._records = join_records(self._meta_rows('key like "records:%"'))
                self._records_sha = sha
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise StoreError(
                f"the product records of {self.collection!r} at {self.location} are damaged ({exc}): "
                "run `lookalike records` again"
            ) from exc
        return self._records

    def set_records(self, records: Mapping[str, Mapping[str, Any]]) -> None:
        """Saved with the next write or :meth:`commit`: each changed product's rows get the new ``record``
        (upserted with their stored vectors, nothing extracted), then the table is written."""
        self._pending_records = {str(p): dict(r) for p, r in records.items()}

    def _table(self) -> Mapping[str, Mapping[str, Any]]:
        return self.records()  # the pending table, else the saved one (read from the server when it changed)

    def _flush_records(self, *, rewrite: bool = True) -> None:
        """Write pending records: the rows of every product whose record changed, then the table rows."""
        new = self._pending_records
        if new is None:
            return
        saved = dict(self._saved_records())
        changed = sorted(p for p in set(saved) | set(new) if saved.get(p) != new.get(p))
        if rewrite and changed and self._exists:
            self._rewrite_records(changed, new)
        rows = records_rows(new)
        old = [k for k in self._meta_rows('key like "records:%"') if int(k.split(":")[1]) >= len(rows)]
        self._client.upsert(self.manifest_collection, rows[:-1])
        self._client.upsert(self.manifest_collection, rows[-1:])  # the head last: it names the chunks
        if old:
            self._client.delete(self.manifest_collection, filter=in_list("key", old))
        self._records, self._records_sha = new, json.loads(rows[-1]["data"])["sha256"]
        self._pending_records = None

    def _saved_records(self) -> Mapping[str, Mapping[str, Any]]:
        pending, self._pending_records = self._pending_records, None
        try:
            return self.records()
        finally:
            self._pending_records = pending

    def _rewrite_records(self, products: list[str], table: Mapping[str, Mapping[str, Any]]) -> None:
        """Upsert these products' rows with their new ``record`` and their stored vectors (read back)."""
        fields = ["id", "vector", *FIELDS]
        for start in range(0, len(products), 256):
            rows = self._scan(in_list("product_id", products[start : start + 256]), fields)
            if rows and not self._has_record:
                raise StoreError(
                    f"Milvus collection {self.collection!r} at {self.location} was built before product records "
                    "(it has no record field): rebuild it once (lookalike index --force)"
                )
            for part in range(0, len(rows), BATCH):
                batch = [
                    {**{f: r[f] for f in fields}, "vector": [float(v) for v in r["vector"]],
                     "record": dict(table.get(r["product_id"]) or {})}
                    for r in rows[part : part + BATCH]
                ]  # fmt: skip
                self._client.upsert(self.collection, batch)
