"""The values a shop's records hold, for the page's filter controls: categories, brands and tags with how many
indexed products carry each, the price range, and every field a ``where=`` clause may name."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

from ..filters import field_kinds
from ..records import ProductRecord

MAX_VALUES = 200  # per field: the most common ones (a select with thousands of entries helps nobody)
MAX_ATTRIBUTE_VALUES = 50  # a text attribute with more distinct values gets no select (an id, a free text)


def catalog_facets(records: Mapping[str, ProductRecord], product_ids: Iterable[str]) -> dict[str, Any]:
    """Facets over the indexed products (``product_ids``); records of products not in the index are left out.

    ``fields`` maps every filterable field to the kinds of value it holds (text, number, bool, list), so a client
    knows which ``where=`` clauses make sense; ``category``, ``brand`` and ``tags`` list ``{value, count}`` most
    common first; ``price`` is ``{min, max, currencies}`` or None when no product has a price. ``attributes``
    describes the further columns a control can be made for: ``{field, kind}`` plus ``values`` (text, bool and
    list attributes with at most MAX_ATTRIBUTE_VALUES distinct values) or ``min``/``max`` (numbers).
    """
    indexed = list(product_ids)
    present = [records[p] for p in indexed if p in records]
    values: dict[str, Counter] = {"category": Counter(), "brand": Counter(), "tags": Counter()}
    prices, currencies = [], Counter()
    for record in present:
        for name in ("category", "brand"):
            if getattr(record, name) is not None:
                values[name][getattr(record, name)] += 1
        values["tags"].update(record.tags)
        if record.price is not None:
            prices.append(record.price)
            if record.currency is not None:
                currencies[record.currency] += 1
    kinds = field_kinds({r.product_id: r for r in present})
    return {
        "products": len(indexed),
        "with_records": len(present),
        "fields": {name: sorted(k) for name, k in kinds.items()},
        **{name: _counted(counter) for name, counter in values.items()},
        "price": {"min": min(prices), "max": max(prices), "currencies": [c for c, _ in currencies.most_common()]}
        if prices
        else None,
        "attributes": _attributes(present, kinds),
    }


def _attributes(present: list[ProductRecord], kinds: Mapping[str, frozenset[str]]) -> list[dict[str, Any]]:
    out = []
    for name in sorted({k for r in present for k in r.attributes}):
        kind = kinds[name]
        if len(kind) != 1:  # mixed kinds (numbers and text): no single control fits
            continue
        (only,) = kind
        values = [r.attributes[name] for r in present if name in r.attributes]
        if only == "number":
            out.append({"field": name, "kind": only, "min": min(values), "max": max(values)})
            continue
        counter = Counter(v for value in values for v in (value if isinstance(value, tuple) else (value,)))
        if len(counter) > MAX_ATTRIBUTE_VALUES:
            continue
        ranked = _counted(Counter({_text(v): c for v, c in counter.items()}))
        out.append({"field": name, "kind": only, "values": ranked})
    return out


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _counted(counter: Counter) -> list[dict[str, Any]]:
    ranked = sorted(counter.items(), key=lambda item: (-item[1], item[0]))[:MAX_VALUES]
    return [{"value": value, "count": count} for value, count in ranked]


__all__ = ["MAX_VALUES", "catalog_facets"]
