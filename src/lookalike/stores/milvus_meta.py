"""The manifest and write generation of a Milvus store (a part of :class:`~lookalike.stores.milvus.MilvusStore`,
kept apart for size).

Both live in the companion collection ``<collection>__manifest``: the manifest as JSON chunks (``manifest:<n>``
rows), the generation as one ``generation`` row that every write replaces with a fresh random value, so any client
of the same server can tell that another process wrote (:meth:`MilvusMeta.refresh`).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from typing import Any

from .base import StoreError
from .milvus_support import in_list, join_manifest, manifest_rows


class MilvusMeta:
    """The manifest and generation methods of MilvusStore (which provides the client and the collections)."""

    _generation: str | None
    _exists: bool
    _pending_records: dict[str, dict[str, Any]] | None

    # --- manifest and generation ----------------------------------------------------------------------------
    def _meta_rows(self, filter_: str) -> dict[str, str]:
        rows = self._client.query(self.manifest_collection, filter=filter_, output_fields=["key", "data"])
        return {r["key"]: r["data"] for r in rows}

    def manifest(self) -> dict[str, Any] | None:
        rows = self._meta_rows('key like "manifest:%"')
        if not rows:
            return None
        text = join_manifest(rows)
        try:
            return json.loads(text)
        except ValueError as exc:
            raise StoreError(f"the manifest of {self.collection!r} at {self.location} is damaged: {exc}") from exc

    def set_manifest(self, manifest: Mapping[str, Any]) -> None:
        rows = manifest_rows(manifest)
        old = [k for k in self._meta_rows('key like "manifest:%"') if int(k.split(":")[1]) >= len(rows)]
        self._client.upsert(self.manifest_collection, rows)
        if old:
            self._client.delete(self.manifest_collection, filter=in_list("key", old))
        self._bump()

    def commit(self) -> None:
        """Save records given to :meth:`set_records` (every other write is saved when its call returns)."""
        if self._pending_records is not None:
            self._flush_records()
            self._bump()

    def _read_generation(self) -> str | None:
        return self._meta_rows('key == "generation"').get("generation")

    def _bump(self) -> None:
        self._generation = uuid.uuid4().hex
        row = {"key": "generation", "data": self._generation, "vector": [0.0, 0.0]}
        self._client.upsert(self.manifest_collection, [row])

    def refresh(self) -> bool:
        if not self._exists and self._client.has_collection(self.collection):
            self._open(None)  # another process made it
        current = self._read_generation()
        changed, self._generation = current != self._generation, current
        return changed
