"""Milvus behind the VectorStore protocol: Milvus Lite (a local ``.db`` file) or a Milvus server / cluster.

``uri`` picks the deployment (``pymilvus.MilvusClient`` semantics): a file path ending in ``.db`` runs Milvus Lite
embedded in this process (one process at a time holds the file), ``http://host:19530`` talks to a server; the
token comes from the caller (``LOOKALIKE_MILVUS_TOKEN``) and never appears in a message.

Schema of the collection: ``id`` VARCHAR primary key (the image id), ``vector`` FLOAT_VECTOR(dim), ``product_id``,
``path``, ``format`` VARCHAR (declared, so grouping and delete-by-product are server-side), ``extra`` JSON for any
further per-image field, ``record`` JSON: the product's record, ``{}`` without one (filters read it; see
:mod:`lookalike.stores.milvus_records`). Cosine runs as ``IP`` over L2-normalised vectors; l2 as ``L2``
(Milvus reports the squared distance: ``distance`` holds the Euclidean one, ``score`` the similarity
``1 / (1 + distance)``).

The manifest and a write generation live in a companion collection ``<collection>__manifest`` (JSON chunks;
:mod:`lookalike.stores.milvus_meta`), so any client of the same server finds the model identity with the vectors
and :meth:`MilvusStore.refresh` can tell that another process wrote. Every collection is ``Strong``-consistent:
once a write returns, a search from any client sees it. On a Milvus server that costs latency: a Strong search
waits for the server's next time tick (about 200 ms measured on Milvus 2.3.5, docs/scaling.md);
``consistency="Bounded"`` searches answer in about 1 ms but may miss another client's writes of the last seconds
(``common.gracefulTime``). Fetch, count, ids, the manifest and the generation are always read Strong.

Grouped search: servers from 2.5 (and Milvus Lite) group natively (``group_by_field``, ``group_size``); older
servers silently ignore the grouping arguments, so support is decided once from the server version, and the
fallback over-fetches images and groups them here, widening until ``k`` products are filled.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .base import REQUIRED_FIELDS, StoreError, StoreFilter, StoreHit, StoreInfo, StoreMismatchError
from .milvus_meta import MilvusMeta
from .milvus_records import MilvusRecords
from .milvus_support import (
    BATCH,
    FIELDS,
    HNSW_BUILD,
    MAX_TOPK,
    check_options,
    create_vector_collection,
    ensure_manifest_collection,
    in_list,
    index_params,
    is_lite,
    milvus_index,
    native_grouping,
    order_groups,
    public_uri,
    quote,
    search_params,
    to_hit,
    unreachable_error,
)

log = logging.getLogger(__name__)


class _LiteNoise(logging.Filter):
    """Milvus Lite's in-process gRPC server logs every call it does not implement (pymilvus asks for a timestamp
    after each index creation, then carries on) as an ERROR with a traceback: drop those records only."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Method not implemented" not in record.getMessage()


_LITE_NOISE = _LiteNoise()


class MilvusStore(MilvusMeta, MilvusRecords):
    """A :class:`~lookalike.stores.base.VectorStore` over one Milvus collection (see the module docstring)."""

    backend = "milvus"

    def __init__(
        self,
        uri: str,
        collection: str,
        *,
        metric: str = "cosine",
        dim: int | None = None,
        token: str | None = None,
        index_type: str = "auto",
        exact_below: int = 10_000,
        grouping: str = "auto",
        timeout: float = 30.0,
        consistency: str = "Strong",
    ):
        check_options(collection, metric=metric, consistency=consistency, grouping=grouping)
        self.uri, self.location, self.collection = str(uri), public_uri(str(uri)), collection
        self.manifest_collection = f"{collection}__manifest"
        self.metric, self.index_type, self.exact_below, self.timeout = metric, index_type, exact_below, timeout
        self.build_metric = metric  # what replace_all builds; ``metric`` becomes an existing collection's own
        self.consistency = consistency  # of searches; every other read and the writes are Strong
        self._client = self._connect(token)
        try:
            self.server_version = str(self._client.get_server_version())
        except Exception as exc:  # noqa: BLE001 - any failure here means the server cannot be used
            raise self._unreachable(exc, token) from exc
        self.native_grouping = native_grouping(self.server_version) if grouping == "auto" else grouping == "native"
        self._generation: str | None = None
        self._records: dict[str, dict[str, Any]] = {}  # the saved table, and the checksum it was read with
        self._records_sha: str | None = None
        self._pending_records: dict[str, dict[str, Any]] | None = None
        self._has_record = True  # False for a collection made before records (no ``record`` field)
        if self._client.has_collection(collection):
            self._open(dim)
        elif dim is None:  # created by the first write, with that write's dimension
            self.dim, self._exists, self._kind, self._index_params = None, False, "none", {}
        else:
            self.dim = int(dim)
            self._create(collection, milvus_index(index_type, 0, exact_below), 0)
        self._ensure_manifest_collection()
        self._generation = self._read_generation()

    # --- connection -----------------------------------------------------------------------------------------
    def _connect(self, token: str | None):
        from pymilvus import MilvusClient

        if is_lite(self.uri):
            if not self.uri.endswith(".db"):
                raise ValueError(
                    f"milvus_uri={self.uri!r}: a Milvus Lite file must end in .db (or use http://host:port)"
                )
            Path(self.uri).parent.mkdir(parents=True, exist_ok=True)
            logging.getLogger("grpc._server").addFilter(_LITE_NOISE)
        try:
            return MilvusClient(uri=self.uri, token=token or "", timeout=self.timeout)
        except Exception as exc:  # noqa: BLE001
            raise self._unreachable(exc, token) from exc

    def _unreachable(self, exc: BaseException, token: str | None) -> StoreError:
        return unreachable_error(exc, self.uri, self.location, token)

    # --- schema ---------------------------------------------------------------------------------------------
    def _create(self, name: str, kind: str, count: int) -> None:
        create_vector_collection(self._client, name, self.dim, kind, self._milvus_metric, index_params(kind, count))
        self._kind, self._index_params, self._exists = kind, index_params(kind, count), True
        self._has_record = True
        log.info(
            "created Milvus collection %r at %s (dim %d, %s, %s)", name, self.location, self.dim, kind, self.metric
        )

    @property
    def _milvus_metric(self) -> str:
        return "IP" if self.metric == "cosine" else "L2"

    def _open(self, dim: int | None) -> None:
        self._client.load_collection(self.collection)
        desc = self._client.describe_collection(self.collection)
        vector = next((f for f in desc["fields"] if f["name"] == "vector"), None)
        names = {f["name"] for f in desc["fields"]}
        if vector is None or not {"id", *REQUIRED_FIELDS, "extra"} <= names:
            raise StoreError(
                f"Milvus collection {self.collection!r} at {self.location} was not made by lookalike (fields "
                f"{sorted(names)}); choose another collection name"
            )
        self.dim = int(vector["params"]["dim"])
        if dim is not None and int(dim) != self.dim:
            raise StoreMismatchError(
                f"Milvus collection {self.collection!r} at {self.location} holds {self.dim}-d vectors, not {dim}-d: "
                "it was built with another model; rebuild it (lookalike index) or use another collection"
            )
        index = self._client.describe_index(self.collection, "vector")
        have = {"IP": "cosine", "L2": "l2", "COSINE": "cosine"}.get(str(index.get("metric_type")))
        if have is None:
            raise StoreMismatchError(
                f"Milvus collection {self.collection!r} at {self.location} uses the metric "
                f"{index.get('metric_type')!r}, which lookalike does not build: rebuild it (lookalike index --force)"
            )
        if have != self.metric:  # the collection is the truth (as the FAISS store); replace_all builds build_metric
            log.info("%s was built for metric %s (asked: %s): searching with it", self.collection, have, self.metric)
        self.metric, self._exists = have, True
        self._has_record = "record" in names
        self._kind = str(index.get("index_type", "FLAT"))
        self._index_params = {k: index[k] for k in ("nlist", "M", "efConstruction") if k in index}

    def _ensure_manifest_collection(self) -> None:
        ensure_manifest_collection(self._client, self.manifest_collection)

    # --- writing --------------------------------------------------------------------------------------------
    def _prepare(self, vectors: np.ndarray) -> np.ndarray:
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or (self.dim is not None and vectors.shape[1] != self.dim):
            raise ValueError(f"vectors of shape {vectors.shape} do not fit the collection's dimension {self.dim}")
        if self.metric == "cosine":
            norms = np.linalg.norm(vectors, axis=1, keepdims=True)
            vectors = vectors / np.maximum(norms, 1e-12)
        return vectors

    def _batches(
        self, ids: Sequence[str], vectors: np.ndarray, fields: Sequence[Mapping[str, Any]], *, record: bool
    ) -> Iterator[list]:
        """Rows of ``BATCH`` images at a time, made lazily (a row holds its vector as a Python list, 30 bytes a
        value); the whole input is checked first, so a bad row fails the call before anything is written.
        ``record``: rows carry their product's record (from the records table) in the ``record`` field."""
        if not (len(ids) == len(vectors) == len(fields)):
            raise ValueError(f"{len(ids)} ids, {len(vectors)} vectors and {len(fields)} field rows do not match")
        if len(set(ids)) != len(ids):
            raise ValueError("the same image id appears twice in one upsert")
        for image_id, row in zip(ids, fields, strict=True):
            missing = [f for f in REQUIRED_FIELDS if f not in row]
            if missing:
                raise ValueError(f"image {image_id!r} lacks the field(s) {', '.join(missing)}")
        vectors = self._prepare(vectors)
        table = self._table()
        for start in range(0, len(ids), BATCH):
            rows = [
                {"id": str(image_id), "vector": vector.tolist(), **{f: str(row[f]) for f in REQUIRED_FIELDS},
                 "extra": {k: v for k, v in row.items() if k not in REQUIRED_FIELDS}}
                for image_id, vector, row in zip(ids[start : start + BATCH], vectors[start : start + BATCH],
                                                 fields[start : start + BATCH], strict=True)
            ]  # fmt: skip
            if record:
                for row in rows:
                    row["record"] = dict(table.get(row["product_id"]) or {})
            yield rows

    def upsert(self, ids: Sequence[str], vectors: np.ndarray, fields: Sequence[Mapping[str, Any]]) -> None:
        if not self._exists:
            self.replace_all(ids, vectors, fields)  # the first write makes the collection
            return
        for rows in self._batches(ids, vectors, fields, record=self._has_record):
            self._client.upsert(self.collection, rows)
        if len(ids):
            self._maybe_reindex()
        self._flush_records()
        if len(ids):
            self._bump()

    def delete(self, ids: Sequence[str] = (), *, product_id: str | None = None) -> int:
        if not self._exists:
            return 0
        targets = set(self._existing(ids))
        if product_id is not None:
            targets |= set(self.ids(product_id=product_id))
        if not targets:
            return 0
        if ids:
            found = sorted(set(ids) & targets)
            for start in range(0, len(found), BATCH):
                self._client.delete(self.collection, filter=in_list("id", found[start : start + BATCH]))
        if product_id is not None:
            self._client.delete(self.collection, filter=f"product_id == {quote(product_id)}")
        self._flush_records()
        self._bump()
        return len(targets)

    def replace_all(self, ids: Sequence[str], vectors: np.ndarray, fields: Sequence[Mapping[str, Any]]) -> None:
        """Build into ``<collection>__staging`` and rename it over the old one: searches see the old images until
        the new ones are complete (the swap itself is a drop + rename, a moment without the collection)."""
        before = self.dim, self.metric
        vectors = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
        self.dim, self.metric = int(vectors.shape[1]), self.build_metric  # a rebuild may change model and metric
        batches = self._batches(ids, vectors, fields, record=True)
        try:
            first = next(batches, [])  # checks the whole input before the staging collection is made
        except ValueError:
            self.dim, self.metric = before
            raise
        staging = f"{self.collection}__staging"
        if self._client.has_collection(staging):
            self._client.drop_collection(staging)
        self._create(staging, milvus_index(self.index_type, len(ids), self.exact_below), len(ids))
        for rows in itertools.chain([first], batches):
            if rows:
                self._client.insert(staging, rows)
        if self._client.has_collection(self.collection):
            self._client.drop_collection(self.collection)
        self._client.rename_collection(staging, self.collection)
        self._client.load_collection(self.collection)
        self._flush_records(rewrite=False)  # the new rows carry the records already
        self._bump()

    def _maybe_reindex(self) -> None:
        """With ``index_type: auto``, an exact collection that grew past ``exact_below`` gets its HNSW index."""
        if (self.index_type or "auto").lower() != "auto" or self._kind != "FLAT":
            return
        count = self.count()
        if count < self.exact_below:
            return
        log.info("%s: %d images >= exact_below=%d, switching FLAT -> HNSW", self.collection, count, self.exact_below)
        self._client.release_collection(self.collection)
        self._client.drop_index(self.collection, "vector")
        params = self._client.prepare_index_params()
        params.add_index("vector", index_type="HNSW", metric_type=self._milvus_metric, params=dict(HNSW_BUILD))
        self._client.create_index(self.collection, params)
        self._client.load_collection(self.collection)
        self._kind, self._index_params = "HNSW", dict(HNSW_BUILD)

    # --- reading --------------------------------------------------------------------------------------------
    def _hit(self, raw: Mapping[str, Any]) -> StoreHit:
        return to_hit(raw, self.metric)

    def _expr(self, where: StoreFilter | str | None) -> str | None:
        """The Milvus expression of ``where`` ("" for everything, None when no product passes)."""
        if where is None or isinstance(where, str):
            return where or ""
        if not where.product_ids:
            return None
        if where.expr:
            if not self._has_record and "record[" in where.expr:
                raise StoreError(
                    f"Milvus collection {self.collection!r} at {self.location} was built before product records "
                    "(it has no record field), so it cannot filter on them: rebuild it once (lookalike index --force)"
                )
            return where.expr
        return in_list("product_id", sorted(where.product_ids))

    def _raw_search(self, vectors: np.ndarray, limit: int, where: str | None, **group: Any) -> list[list[dict]]:
        return self._client.search(
            self.collection,
            consistency_level=self.consistency,
            data=vectors.tolist(),
            limit=limit,
            filter=where or "",
            output_fields=list(FIELDS),
            search_params=search_params(self._kind, self._milvus_metric, limit, self._index_params),
            **group,
        )

    def search(
        self,
        vectors: np.ndarray,
        k: int,
        *,
        where: StoreFilter | str | None = None,
        group_by_product: bool = False,
        group_size: int = 1,
    ) -> list[list[StoreHit]]:
        queries = self._prepare(np.atleast_2d(vectors))
        expr = self._expr(where)
        if k <= 0 or len(queries) == 0 or not self._exists or expr is None:
            return [[] for _ in queries]
        where = expr
        if not group_by_product:
            raws = self._raw_search(queries, min(k, MAX_TOPK), where)
            return [[self._hit(r) for r in row] for row in raws]
        if self.native_grouping:
            # strict_group_size is left out on purpose: Milvus Lite 3.2 reads any value sent as "true"
            raws = self._raw_search(
                queries, min(k, MAX_TOPK), where, group_by_field="product_id", group_size=group_size
            )
            out = [order_groups([self._hit(r) for r in row], k, group_size) for row in raws]
            # Milvus Lite groups a fixed over-fetch (k * group_size * 3 images): when a few products own all of
            # them it returns fewer than k products although more exist, so those queries take the widening path.
            short = [i for i, hits in enumerate(out) if len({h.product_id for h in hits}) < k]
            if short and self.count() > min(len(out[i]) for i in short):
                for i in short:
                    out[i] = self._grouped_fallback(queries[i : i + 1], k, group_size, where)
            return out
        return [self._grouped_fallback(q[None], k, group_size, where) for q in queries]

    def _grouped_fallback(self, query: np.ndarray, k: int, group_size: int, where: str | None) -> list[StoreHit]:
        """Over-fetch images, group here, widen (x4) until ``k`` products are filled or nothing more exists."""
        total = self.count()
        limit = min(max(k * group_size * 4, 32), MAX_TOPK, max(total, 1))
        while True:
            hits = [self._hit(r) for r in self._raw_search(query, limit, where)[0]]
            ordered = order_groups(hits, k, group_size)
            products = len({h.product_id for h in ordered})
            if products >= k or len(hits) < limit or limit >= min(total, MAX_TOPK):
                if products < k and limit >= MAX_TOPK:
                    log.warning("grouped search: %d of %d products within Milvus' top-%d", products, k, MAX_TOPK)
                return ordered
            limit = min(limit * 4, MAX_TOPK, total)

    def _existing(self, ids: Sequence[str]) -> list[str]:
        return list(self.fetch(ids)) if ids else []

    def fetch(self, ids: Sequence[str], *, with_vectors: bool = False) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        wanted = list(dict.fromkeys(str(i) for i in ids)) if self._exists else []
        fields = [*FIELDS, "vector"] if with_vectors else list(FIELDS)
        for start in range(0, len(wanted), BATCH):
            part = wanted[start : start + BATCH]
            for row in self._client.query(self.collection, filter=in_list("id", part), output_fields=fields):
                item = {f: row[f] for f in REQUIRED_FIELDS}
                item.update(row.get("extra") or {})
                if with_vectors:
                    item["vector"] = np.asarray(row["vector"], dtype=np.float32)
                out[str(row["id"])] = item
        return out

    def _scan(self, filter_: str, fields: list[str]) -> list[dict]:
        """Every matching row: one query on Milvus Lite (it has no limit and no iterator timestamps), a query
        iterator on a server (whose queries stop at 16,384 rows)."""
        if not self._exists:
            return []
        if is_lite(self.uri):
            return list(self._client.query(self.collection, filter=filter_, output_fields=fields))
        iterator = self._client.query_iterator(self.collection, batch_size=4096, filter=filter_, output_fields=fields)
        rows: list[dict] = []
        try:
            while batch := iterator.next():
                rows.extend(batch)
        finally:
            iterator.close()
        return rows

    def ids(self, *, product_id: str | None = None) -> list[str]:
        filter_ = f"product_id == {quote(product_id)}" if product_id is not None else 'id != ""'
        return [str(r["id"]) for r in self._scan(filter_, ["id"])]

    def count(self) -> int:
        if not self._exists:
            return 0
        rows = self._client.query(self.collection, filter="", output_fields=["count(*)"])
        return int(rows[0]["count(*)"]) if rows else 0

    def product_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for row in self._scan('id != ""', ["product_id"]):
            counts[row["product_id"]] = counts.get(row["product_id"], 0) + 1
        return counts

    def describe(self) -> StoreInfo:
        count = self.count()
        extra = {"collection": self.collection, "server_version": self.server_version,
                 "grouping": "native" if self.native_grouping else "client"}  # fmt: skip
        return StoreInfo(
            "milvus", self.location, count, len(self.product_counts()), self.dim or 0, self.metric, self._kind,
            count * (self.dim or 0) * 4, extra,
        )  # fmt: skip

    def close(self) -> None:
        try:
            self._client.close()
        except Exception as exc:  # noqa: BLE001 - closing twice or after the server went away is harmless
            log.debug("closing the Milvus client: %s", exc)

    def __enter__(self) -> MilvusStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
