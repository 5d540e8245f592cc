"""Product records: what a shop shows beside a match (name, price, link) and what searches filter on.

An optional ``products.csv`` or ``products.jsonl`` at the catalog root holds one record per product
(``product_id``, ``name``, ``url``, ``price``, ``currency``, ``category``, ``brand``, ``tags``; any further
column is kept as an attribute). A bad line is reported with its file, line and column and skipped; the rest
loads. A record without a product folder, or a folder without a record, is reported, never fatal.

Reading the files, reconciling and saving are in :mod:`lookalike.record_files`: records live beside the index
manifest in one JSON file written atomically, so they can be replaced without extracting a single image again.

CSV details: UTF-8 (a BOM is fine), a header row naming the columns, ``tags`` separated by ``|`` (or ``,``
inside a quoted field), attribute values that read as plain numbers (``12``, ``-3.5``; not ``007``) become
numbers. JSON lines: one object per line, blank lines skipped, attribute values are strings, numbers,
booleans or lists of strings.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from .ids import InvalidProductIdError, normalize_product_id

logger = logging.getLogger(__name__)

RECORD_FILES = ("products.csv", "products.jsonl")
SAVED_RECORDS_FILE = "records.json"  # beside the index manifest
RECORDS_FORMAT = "lookalike-records"
RECORDS_FORMAT_VERSION = 1

STANDARD_FIELDS = ("product_id", "name", "url", "price", "currency", "category", "brand", "tags")
TEXT_FIELDS = ("name", "category", "brand")
MAX_TEXT = 2_000  # characters in one value
MAX_URL = 2_048
MAX_TAGS = 100
MAX_ATTRIBUTES = 64
ATTRIBUTE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")  # usable in a filter and as a Milvus JSON key
RESERVED_NAMES = frozenset({"record", "attributes", "image_id", "path", "format", "vector", "score"})
_PLAIN_NUMBER = re.compile(r"^-?(0|[1-9][0-9]*)(\.[0-9]+)?$")
_CURRENCY = re.compile(r"^[A-Z]{3}$")

Scalar = str | int | float | bool


class RecordsError(ValueError):
    """A records file that cannot be used at all (no ``product_id`` column, two record files, unreadable)."""


@dataclass(frozen=True)
class ProductRecord:
    """One product's record. :meth:`to_dict` is the ``record`` every search hit carries (unset fields left out)."""

    product_id: str
    name: str | None = None
    url: str | None = None
    price: float | None = None
    currency: str | None = None
    category: str | None = None
    brand: str | None = None
    tags: tuple[str, ...] = ()
    attributes: Mapping[str, Scalar | tuple[str, ...]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A flat JSON-ready dict: standard fields that are set, then the attributes (their names never clash)."""
        out: dict[str, Any] = {"product_id": self.product_id}
        for key in ("name", "url", "price", "currency", "category", "brand"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        if self.tags:
            out["tags"] = list(self.tags)
        for key, value in self.attributes.items():
            out[key] = list(value) if isinstance(value, tuple) else value
        return out

    def get(self, name: str) -> Any:
        """A field's value by name (standard field or attribute); None when unset."""
        if name in STANDARD_FIELDS:
            value = getattr(self, name)
            return value if value != () else None
        return self.attributes.get(name)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ProductRecord:
        """Validate and build a record from a dict (a JSON line, a saved record); ValueError names the field."""
        record, problems = _build(data)
        if problems:
            column, message = problems[0]
            raise ValueError(f"field {column}: {message}" if column else message)
        assert record is not None
        return record


def _build(data: Mapping[str, Any]) -> tuple[ProductRecord | None, list[tuple[str | None, str]]]:
    """A record from raw column values, or the problems (column, message) that make the line unusable."""
    problems: list[tuple[str | None, str]] = []
    raw_pid = data.get("product_id")
    pid = None
    if raw_pid is None or (isinstance(raw_pid, str) and not raw_pid.strip()):
        problems.append(("product_id", "missing product_id"))
    else:
        try:
            pid = normalize_product_id(raw_pid if isinstance(raw_pid, str) else str(raw_pid))
        except InvalidProductIdError as exc:
            problems.append(("product_id", str(exc)))
    values: dict[str, Any] = {}
    attributes: dict[str, Scalar | tuple[str, ...]] = {}
    for key, value in data.items():
        if key == "product_id" or _is_empty(value):
            continue
        try:
            if key in TEXT_FIELDS:
                values[key] = _text(value)
            elif key == "url":
                values[key] = _url(value)
            elif key == "price":
                values[key] = _price(value)
            elif key == "currency":
                values[key] = _currency(value)
            elif key == "tags":
                values[key] = _tags(value)
            elif not isinstance(key, str) or not ATTRIBUTE_NAME.match(key) or key in RESERVED_NAMES:
                raise ValueError(
                    f"{key!r} is not a usable attribute name (letters, digits and '_', not starting with a digit, "
                    f"at most 64 characters, none of {', '.join(sorted(RESERVED_NAMES))})"
                )
            else:
                attributes[key] = _attribute(value)
        except ValueError as exc:
            problems.append((str(key), str(exc)))
    if len(attributes) > MAX_ATTRIBUTES:
        problems.append((None, f"{len(attributes)} attributes, at most {MAX_ATTRIBUTES} are kept per product"))
    if problems or pid is None:
        return None, problems
    return ProductRecord(product_id=pid, attributes=attributes, **values), []


def _is_empty(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip()) or (isinstance(value, list) and not value)


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not text")
    text = value.strip()
    if len(text) > MAX_TEXT:
        raise ValueError(f"{len(text)} characters, at most {MAX_TEXT}")
    if any(ord(c) < 32 and c not in "\t" for c in text):
        raise ValueError("contains control characters")
    return text


def _url(value: Any) -> str:
    url = _text(value)
    if len(url) > MAX_URL:
        raise ValueError(f"URL of {len(url)} characters, at most {MAX_URL}")
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc or any(c.isspace() for c in url):
        raise ValueError(f"{url!r} is not an http(s) URL (like https://shop.example/p/123)")
    return url


def _price(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a price")
    if isinstance(value, (int, float)):
        price = float(value)
    elif isinstance(value, str):
        text = value.strip()
        if "," in text and "." not in text:
            raise ValueError(f"{text!r} is not a number: write prices with a decimal point (12.50)")
        try:
            price = float(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a number (write 12.50, no currency sign)") from None
    else:
        raise ValueError(f"{value!r} is not a number")
    if not math.isfinite(price) or price < 0:
        raise ValueError(f"{value!r} is not a price (a finite number >= 0)")
    return price


def _currency(value: Any) -> str:
    code = _text(value).upper()
    if not _CURRENCY.match(code):
        raise ValueError(f"{value!r} is not a three-letter currency code (ISO 4217, like EUR, SEK, USD)")
    return code


def _tags(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        items = re.split(r"[|,]", value)
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        items = value
    else:
        raise ValueError(f"{value!r} is not a list of tags (a list of strings, or text separated by '|')")
    tags = tuple(dict.fromkeys(t for t in (_text(v) for v in items) if t))
    if len(tags) > MAX_TAGS:
        raise ValueError(f"{len(tags)} tags, at most {MAX_TAGS}")
    return tags


def _attribute(value: Any) -> Scalar | tuple[str, ...]:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise ValueError(f"{value!r} is not a finite number")
        return value
    if isinstance(value, str):
        text = _text(value)
        if _PLAIN_NUMBER.match(text):
            return int(text) if "." not in text else float(text)
        return text
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(_text(v) for v in value)
    raise ValueError(f"{value!r} is not a string, number, boolean or list of strings")


__all__ = [
    "RECORD_FILES",
    "STANDARD_FIELDS",
    "ProductRecord",
    "RecordsError",
]
