"""The engine's product layer: records loaded with the index, ``where`` filters turned into store filters, query
crops (``box=``), and reading the catalog's records file at build / add / remove / ``lookalike records``.

The store keeps the record table (:meth:`~lookalike.stores.base.VectorStore.records`, JSON dicts by product id)
with the index generation; the engine holds it parsed as a :class:`ProductTable` and attaches each hit's
``record`` (:meth:`~lookalike.records.ProductRecord.to_dict`, None for a product without one). Filters are
parsed against the fields the loaded records have (:func:`lookalike.filters.field_kinds`), so an unknown field
is a :class:`~lookalike.filters.FilterError` naming the known ones.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .filters import Filter, FilterError, field_kinds, parse_where
from .imaging import ImageError, ImageSource, crop_box, describe, open_image, parse_box
from .record_files import RecordsReport, refresh_records, with_records
from .records import ProductRecord, RecordsError
from .stores import StoreFilter, VectorStore

logger = logging.getLogger(__name__)

Where = Filter | Mapping[str, Any] | Sequence[str] | str | None
FILTER_CACHE = 256  # filters remembered per loaded table (a page sends the same few again and again)


class BoxError(ImageError):
    """A query box that cannot be used: not four numbers, empty, or outside the photo (HTTP 422, CLI exit 2)."""


@dataclass(frozen=True)
class ProductTable:
    """The loaded records, parsed: ``records`` by product id and the filterable ``kinds`` of each field."""

    source: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # the store's table it was parsed from
    records: Mapping[str, ProductRecord] = field(default_factory=dict)
    kinds: Mapping[str, frozenset[str]] = field(default_factory=lambda: field_kinds({}))
    filters: dict[Filter, tuple[Mapping[str, int], StoreFilter]] = field(default_factory=dict, compare=False)

    def fields(self) -> dict[str, list[str]]:
        """The fields at least one record has a value for, with the kinds of value they hold (``text``,
        ``number``, ``bool``, ``list``): what a filter form offers. ``product_id`` is always there."""
        present = {"product_id"} | {k for r in self.records.values() for k in r.to_dict()}
        return {name: sorted(kinds) for name, kinds in self.kinds.items() if name in present}


def load_table(store: VectorStore, previous: ProductTable | None = None) -> ProductTable:
    """The store's records, parsed (``previous`` again when the store hands back the same table object)."""
    source = store.records()
    if previous is not None and previous.source is source:
        return previous
    records: dict[str, ProductRecord] = {}
    for pid, data in source.items():
        try:
            records[pid] = ProductRecord.from_dict(data)
        except ValueError as exc:  # written by this module, so only a hand-edited table gets here
            logger.warning("ignoring the saved record of %r: %s", pid, exc)
    return ProductTable(source, records, field_kinds(records))


def to_json(records: Mapping[str, ProductRecord]) -> dict[str, dict[str, Any]]:
    """The table as the store keeps it: each record's :meth:`~ProductRecord.to_dict` by product id."""
    return {pid: records[pid].to_dict() for pid in sorted(records)}


def store_filter(where: Where, table: ProductTable, counts: Mapping[str, int]) -> StoreFilter | None:
    """The store filter of ``where`` over the indexed products (``counts``: images per product); None: no filter.
    Raises :class:`~lookalike.filters.FilterError` (unknown field, bad value) naming the known fields."""
    flt = parse_where(where, table.kinds)
    if flt is None:
        return None
    cached = table.filters.get(flt)
    if cached is not None and cached[0] is counts:  # same records, same indexed products: same answer
        return cached[1]
    passing = frozenset(flt.product_ids(table.records, counts))
    out = StoreFilter(passing, flt.to_milvus_expr(), sum(counts.get(p, 0) for p in passing))
    if len(table.filters) >= FILTER_CACHE:
        table.filters.clear()
    table.filters[flt] = (counts, out)
    return out


def check_where(where: Where, table: ProductTable) -> Filter | None:
    """``where`` parsed against the loaded fields (FilterError when it cannot be used)."""
    return parse_where(where, table.kinds)


def attach(results: list[list[dict[str, Any]]], table: ProductTable) -> list[list[dict[str, Any]]]:
    """Every hit with its product's ``record`` (None without one), in place."""
    for hits in results:
        with_records(hits, table.records)
    return results


def crop_queries(
    queries: Sequence[ImageSource], boxes: Sequence[Sequence[float] | str | None] | None, max_pixels: int
) -> list[ImageSource]:
    """The queries with each ``boxes[i]`` (pixels x0, y0, x1, y1 of the photo as shown, EXIF-rotated) cut out;
    a None box keeps the whole photo. Raises :class:`BoxError` for a bad box, ImageError for a bad photo."""
    if boxes is None:
        return list(queries)
    if isinstance(boxes, str) or len(boxes) != len(queries):
        raise ValueError(f"boxes: give one box (or None) per query ({len(queries)}), not {boxes!r}")
    out: list[ImageSource] = []
    for query, box in zip(queries, boxes):
        if box is None:
            out.append(query)
            continue
        name = describe(query)
        try:
            parsed = parse_box(box, source=name)
        except ImageError as exc:
            raise BoxError(exc.source, exc.reason) from None
        photo = open_image(query, max_pixels).image
        try:
            out.append(crop_box(photo, parsed, source=name))
        except ImageError as exc:
            raise BoxError(exc.source, exc.reason) from None
    return out


def catalog_records(
    root: Path, product_ids: Iterable[str], previous: Mapping[str, Mapping[str, Any]]
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """(table for the store, report) from the catalog's ``products.csv`` / ``products.jsonl``: bad lines are
    reported and skipped; a file that cannot be used at all keeps the ``previous`` table and says why."""
    try:
        records, report = refresh_records(root, product_ids)
    except RecordsError as exc:
        logger.warning("product records not updated: %s", exc)
        return {p: dict(r) for p, r in previous.items()}, {"source": None, "error": str(exc), "loaded": len(previous)}
    report.log()
    return to_json(records), report.to_dict()


def update_records(store: VectorStore, root: Path) -> dict[str, Any]:
    """``lookalike records`` on an open index: re-read the catalog's records file, reconcile it with the indexed
    products and save it with the index (``commit``). No image is read; returns the report."""
    table, report = catalog_records(root, store.product_counts(), store.records())
    store.set_records(table)
    store.commit()
    return report


__all__ = [
    "BoxError",
    "FilterError",
    "ProductTable",
    "RecordsReport",
    "attach",
    "catalog_records",
    "check_where",
    "crop_queries",
    "load_table",
    "store_filter",
    "update_records",
]
