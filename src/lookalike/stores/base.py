"""The VectorStore protocol: what the engine asks of any place that keeps image vectors.

Everything is addressed by stable image ids (:func:`lookalike.ids.image_id_for`: a hash of the image's path
relative to the catalog root), never by row positions, so a delete never renumbers anything and a remote store
(Milvus) and the embedded one (FAISS) answer the same calls. Only modules in ``lookalike.stores`` import a
vector-database library; the engine sees this protocol, :class:`StoreHit` and :class:`StoreInfo`.

Shape borrowed from qdrant-client (one API, local and remote implementations behind it) and autofaiss'
``FaissIndexWrapper``: the engine owns ranking (the product score, ``lookalike.ranking``), the store owns
vectors, per-image fields and durability.

Per-image fields every store keeps (``fields`` rows): ``product_id`` (str), ``path`` (str, POSIX, relative to
the catalog root), ``format`` (str). Further scalar fields (records, ``lookalike.records``) may be added by
backends that support them; unknown fields are kept and returned by :meth:`VectorStore.fetch`.

Product records (:mod:`lookalike.records`) are kept per product, not per image: :meth:`VectorStore.set_records`
gives the store the table (product id -> the record's JSON dict), :meth:`VectorStore.records` returns the saved
one. Like the manifest, a table given to ``set_records`` is saved with the next write or :meth:`VectorStore.commit`;
no vector is extracted again. FAISS keeps it in a content-addressed file beside the manifest, named (with its
checksum) by the manifest, so a generation can never be read with another generation's records; Milvus keeps it in
the manifest collection and copies each product's record into its rows' ``record`` JSON field (for filters).

Filtered search: the engine parses a ``where`` (:mod:`lookalike.filters`) against the loaded records and gives the
store a :class:`StoreFilter` holding the exact set of products that pass (FAISS searches exactly over their images)
and the same condition as a Milvus boolean expression (Milvus filters natively). A plain ``str`` is a raw Milvus
expression (Milvus only). A filtered search returns only images of passing products and fills ``k`` whenever
enough of them exist: never a post-filtered, starved list.

What "saved" means: when :meth:`VectorStore.upsert`, :meth:`VectorStore.delete` or :meth:`VectorStore.commit`
returns, a new :class:`VectorStore` opened on the same location (another process included) sees the change.
FAISS: a new generation file plus the manifest, written atomically under the catalog's write lock. Milvus: the
write is flushed/consistent (``consistency_level="Strong"``) before the call returns.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

# The fields every image row carries, in every store.
REQUIRED_FIELDS = ("product_id", "path", "format")


class StoreError(RuntimeError):
    """A store could not do what was asked (connection, missing collection, damaged file). Says what to do."""


class IndexFileError(StoreError):
    """The stored index is missing or damaged (a file, its checksum, its metadata); the message names the file."""


class StoreInputError(StoreError, ValueError):
    """The caller gave rows a store cannot take: counts that disagree, missing fields, another dimension."""


class StoreMismatchError(StoreError):
    """The store holds vectors built with another model, weights, preprocessing or metric than asked for."""


@dataclass(frozen=True)
class StoreHit(Mapping[str, Any]):
    """One image found by a search: reads like the seed's dict (``hit["product_id"]``) and is typed.

    ``score`` is a similarity, higher is more alike, whatever the metric (for l2 the store converts the
    distance with :func:`lookalike.ranking.similarity_from_distance` and keeps it in ``distance``).
    """

    image_id: str
    product_id: str
    score: float
    path: str = ""
    distance: float | None = None
    fields: Mapping[str, Any] = field(default_factory=dict)

    def _as_dict(self) -> dict[str, Any]:
        out = {"image_id": self.image_id, "product_id": self.product_id, "score": self.score, "path": self.path}
        if self.distance is not None:
            out["distance"] = self.distance
        out.update(self.fields)
        return out

    def __getitem__(self, key: str) -> Any:
        return self._as_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._as_dict())

    def __len__(self) -> int:
        return len(self._as_dict())


@dataclass(frozen=True)
class StoreFilter:
    """Which images a search may return (only whole products pass or fail), in the forms the stores need.

    ``product_ids``: every product that passes (the engine computes it from the loaded records; FAISS searches
    exactly over these products' images). ``expr``: the same condition as a Milvus boolean expression over the
    ``product_id`` field and the ``record`` JSON field (empty: use ``product_id in [...]``). ``images``: how many
    images the passing products hold, when the caller knows it (the engine does), else None.
    """

    product_ids: frozenset[str]
    expr: str = ""
    images: int | None = None


@dataclass(frozen=True)
class StoreInfo:
    """What :meth:`VectorStore.describe` reports: enough for ``get_statistics`` and the manifest."""

    backend: str  # "faiss", "milvus"
    location: str  # a folder, a file (Milvus Lite) or a URI (never a token)
    count: int  # images stored
    products: int
    dim: int
    metric: str  # "cosine" or "l2"
    index_type: str  # e.g. "Flat", "HR128,HNSW32,SQ8", "HNSW", "IVF_FLAT", "FLAT"
    nbytes: int = 0  # bytes of vectors and index where known
    extra: Mapping[str, Any] = field(default_factory=dict)


@runtime_checkable
class VectorStore(Protocol):
    """Vectors and per-image fields, addressed by image id. See the module docstring for the contract."""

    # --- identity -------------------------------------------------------------------------------------------
    def manifest(self) -> dict[str, Any] | None:
        """The manifest stored with the vectors (model identity, metric, tuning, ...), None if the store is new."""
        ...

    def set_manifest(self, manifest: Mapping[str, Any]) -> None:
        """Store the manifest with the vectors (saved with the next write, or at once where no write follows)."""
        ...

    def commit(self) -> None:
        """Make a manifest given to :meth:`set_manifest` (and a table given to :meth:`set_records`) durable
        without writing any vector (a no-op where nothing is pending)."""
        ...

    def records(self) -> Mapping[str, Mapping[str, Any]]:
        """The saved product records (product id -> the record's JSON dict), or the one given to
        :meth:`set_records` and not saved yet; empty when there are none. The same object until it changes."""
        ...

    def set_records(self, records: Mapping[str, Mapping[str, Any]]) -> None:
        """Replace the product records: saved with the next write or :meth:`commit`; no vector is touched."""
        ...

    # --- writing --------------------------------------------------------------------------------------------
    def upsert(self, ids: Sequence[str], vectors: np.ndarray, fields: Sequence[Mapping[str, Any]]) -> None:
        """Insert or replace these images (``fields[i]`` holds at least REQUIRED_FIELDS for ``ids[i]``)."""
        ...

    def delete(self, ids: Sequence[str] = (), *, product_id: str | None = None) -> int:
        """Delete images by id and/or every image of one product; returns how many were deleted."""
        ...

    def replace_all(self, ids: Sequence[str], vectors: np.ndarray, fields: Sequence[Mapping[str, Any]]) -> None:
        """A full rebuild: afterwards the store holds exactly these images (the index type chosen by size)."""
        ...

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
        """Best ``k`` images per query (or, grouped, the best ``k`` products with up to ``group_size`` images
        each, best first, as a flat list ordered product by product). ``where``: only images of the products a
        :class:`StoreFilter` passes (a ``str``: a raw Milvus expression, Milvus only); None: everything."""
        ...

    def fetch(self, ids: Sequence[str], *, with_vectors: bool = False) -> dict[str, dict[str, Any]]:
        """Fields (and ``vector`` when asked) of the images that exist, by id; unknown ids are absent."""
        ...

    def ids(self, *, product_id: str | None = None) -> list[str]:
        """Every image id stored (of one product when asked)."""
        ...

    def count(self) -> int: ...

    def product_counts(self) -> dict[str, int]:
        """Images per product (the product score needs it)."""
        ...

    def describe(self) -> StoreInfo: ...

    # --- life cycle -----------------------------------------------------------------------------------------
    def refresh(self) -> bool:
        """See changes committed by other processes; True if anything changed since the last look."""
        ...

    def close(self) -> None: ...


def check_rows(ids: list[str], vectors: np.ndarray, fields: list[dict[str, Any]]) -> None:
    """StoreInputError unless there is one id, one vector and one field row (with the required fields) per image."""
    if not (len(ids) == len(vectors) == len(fields)):
        raise StoreInputError(f"{len(ids)} ids, {len(vectors)} vectors and {len(fields)} field rows: give one of each")
    for f in fields:
        missing = [k for k in REQUIRED_FIELDS if k not in f]
        if missing:
            raise StoreInputError(
                f"image fields lack {', '.join(missing)} (every image needs {', '.join(REQUIRED_FIELDS)})"
            )
