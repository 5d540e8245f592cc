"""Product records: what a shop shows beside a match (name, price, link) and what searches filter on.

An optional ``products.csv`` or ``products.jsonl`` at the catalog root holds one record per product
(``product_id``, ``name``, ``url``, ``price``, ``currency``, ``category``, ``brand``, ``tags``; any further
column is kept as an attribute). A bad line is reported with its file, line and column and skipped; the rest
loads. A record without a product folder, or a folder without a record, is reported, never fatal.

Records live beside the index manifest in one JSON file written atomically (:func:`save_records`), so they can
be replaced (:func:`refresh_records`) without extracting a single image again.

CSV details: UTF-8 (a BOM is fine), a header row naming the columns, ``tags`` separated by ``|`` (or ``,``
inside a quoted field), attribute values that read as plain numbers (``12``, ``-3.5``; not ``007``) become
numbers. JSON lines: one object per line, blank lines skipped, attribute values are strings, numbers,
booleans or lists of strings.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
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
class RecordIssue:
    """One bad line (or column) of a records file; the line was skipped (or the column ignored)."""

    file: str
    line: int
    column: str | None
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" + (f": column {self.column}" if self.column else "")
        return f"{where}: {self.message}"


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


# --- reading a records file -------------------------------------------------------------------------------


@dataclass
class RecordsLoad:
    """What one records file gave: the good records and the issues of the lines skipped."""

    source: str | None  # the file read, None when the catalog has none
    records: dict[str, ProductRecord]
    issues: list[RecordIssue]


def find_records_file(root: Path) -> Path | None:
    """``products.csv`` or ``products.jsonl`` at the catalog root; both at once is an error (which one wins?)."""
    found = [Path(root) / name for name in RECORD_FILES if (Path(root) / name).is_file()]
    if len(found) > 1:
        raise RecordsError(f"{found[0]} and {found[1]} both exist; keep one records file in {root}")
    return found[0] if found else None


def read_records(path: Path) -> RecordsLoad:
    """Parse and validate one records file (``.csv`` or ``.jsonl``). Bad lines are reported and skipped."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise RecordsError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if path.suffix.lower() == ".csv":
        rows = _csv_rows(path, data)
    elif path.suffix.lower() == ".jsonl":
        rows = _jsonl_rows(path, data)
    else:
        raise RecordsError(f"{path}: records must be a .csv or .jsonl file")
    records: dict[str, ProductRecord] = {}
    first_line: dict[str, int] = {}
    issues: list[RecordIssue] = []
    for line, values, problem in rows:
        if problem is not None:
            issues.append(RecordIssue(str(path), line, problem[0], problem[1]))
            continue
        record, problems = _build(values)
        if record is None:
            issues.extend(RecordIssue(str(path), line, col, msg) for col, msg in problems)
            continue
        if record.product_id in records:
            issues.append(
                RecordIssue(
                    str(path),
                    line,
                    "product_id",
                    f"duplicate product_id {record.product_id!r} (first on line {first_line[record.product_id]}); "
                    "this line is skipped",
                )
            )
            continue
        records[record.product_id] = record
        first_line[record.product_id] = line
    return RecordsLoad(str(path), records, issues)


Row = tuple[int, dict[str, Any], tuple[str | None, str] | None]


def _csv_rows(path: Path, data: bytes) -> Iterator[Row]:
    text = data.decode("utf-8", errors="surrogateescape")
    if text.startswith("\ufeff"):
        text = text[1:]
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader)
    except StopIteration:
        raise RecordsError(f"{path}: empty file; the first line must name the columns (product_id,name,...)") from None
    except csv.Error as exc:
        raise RecordsError(f"{path}:1: unreadable header ({exc})") from None
    names = [h.strip() for h in header]
    if _has_surrogates("".join(names)):
        raise RecordsError(f"{path}:1: the header is not UTF-8 text; save the file as UTF-8")
    if "product_id" not in names:
        raise RecordsError(f"{path}:1: no product_id column (the header has: {', '.join(names) or 'nothing'})")
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise RecordsError(f"{path}:1: column names used twice: {', '.join(dupes)}")
    if "" in names:
        raise RecordsError(f"{path}:1: column {names.index('') + 1} has no name")
    previous = reader.line_num
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            line = previous + 1
            yield line, {}, (None, f"unreadable CSV ({exc}); the rest of the file is not read")
            return
        line, previous = previous + 1, reader.line_num
        if not row or all(not v.strip() for v in row):
            continue
        if len(row) > len(names):
            yield line, {}, (None, f"{len(row)} values but the header names {len(names)} columns")
            continue
        values = dict(zip(names, row))
        bad = [n for n, v in values.items() if _has_surrogates(v)]
        if bad:
            yield line, {}, (bad[0], "not UTF-8 text (save the file as UTF-8)")
            continue
        yield line, values, None


def _jsonl_rows(path: Path, data: bytes) -> Iterator[Row]:
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield number, {}, (None, f"not UTF-8 text (byte {raw[exc.start]:#04x} at byte {exc.start + 1})")
            continue
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            yield number, {}, (None, f"bad JSON at character {exc.colno}: {exc.msg}")
            continue
        if not isinstance(obj, dict):
            yield number, {}, (None, f'a JSON {type(obj).__name__}, not an object like {{"product_id": "..."}}')
            continue
        yield number, obj, None


def _has_surrogates(text: str) -> bool:
    return any("\udc80" <= c <= "\udcff" for c in text)


# --- reconciling with the catalog folders -----------------------------------------------------------------


@dataclass(frozen=True)
class Reconciliation:
    without_folder: list[str]  # records whose product has no images in the catalog
    without_record: list[str]  # products in the catalog with no record


def reconcile(records: Mapping[str, ProductRecord], product_ids: Iterable[str]) -> Reconciliation:
    """Which records have no product folder and which product folders have no record (never an error)."""
    products = set(product_ids)
    return Reconciliation(
        without_folder=sorted(set(records) - products),
        without_record=sorted(products - set(records)),
    )


@dataclass
class RecordsReport:
    """Everything a records (re)load found; :meth:`to_dict` goes into statistics and the CLI's output."""

    source: str | None
    loaded: int
    issues: list[RecordIssue]
    without_folder: list[str]
    without_record: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "loaded": self.loaded,
            "skipped_lines": len({(i.file, i.line) for i in self.issues}),
            "issues": [str(i) for i in self.issues],
            "records_without_folder": self.without_folder,
            "products_without_record": self.without_record,
        }

    def log(self) -> None:
        """One summary line, then one line per issue (warnings), so nothing is silent."""
        if self.source is None:
            logger.info("no product records (products.csv / products.jsonl) in the catalog folder")
            return
        logger.info(
            "product records from %s: %d loaded, %d issue(s), %d record(s) without a folder, %d product(s) without "
            "a record",
            self.source,
            self.loaded,
            len(self.issues),
            len(self.without_folder),
            len(self.without_record),
        )
        for issue in self.issues:
            logger.warning("%s", issue)
        if self.without_folder:
            logger.warning("records without a product folder: %s", ", ".join(self.without_folder[:20]))
        if self.without_record:
            logger.info("products without a record: %s", ", ".join(self.without_record[:20]))


def refresh_records(root: Path, product_ids: Iterable[str]) -> tuple[dict[str, ProductRecord], RecordsReport]:
    """Read the catalog's records file and reconcile it with ``product_ids`` (the indexed products).

    This is the whole of a records update: no image is read or extracted. Raises :class:`RecordsError` only for
    a file that cannot be used at all; bad lines are in the report.
    """
    path = find_records_file(Path(root))
    if path is None:
        records: dict[str, ProductRecord] = {}
        report = RecordsReport(None, 0, [], [], sorted(set(product_ids)))
        return records, report
    load = read_records(path)
    rec = reconcile(load.records, product_ids)
    report = RecordsReport(load.source, len(load.records), load.issues, rec.without_folder, rec.without_record)
    return load.records, report


# --- saving beside the manifest ---------------------------------------------------------------------------


def records_path(metadata_path: Path) -> Path:
    """Where the records of the index whose manifest is ``metadata_path`` are saved."""
    return Path(metadata_path).with_name(SAVED_RECORDS_FILE)


def records_checksum(records: Mapping[str, ProductRecord]) -> str:
    """A checksum of the record table (the manifest may keep it to tie records to an index generation)."""
    payload = [records[k].to_dict() for k in sorted(records)]
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False, sort_keys=True).encode("utf-8")).hexdigest()


def save_records(path: Path, records: Mapping[str, ProductRecord], *, source: str | None = None) -> str:
    """Write the record table atomically as JSON (never pickle); returns its checksum."""
    from .files import atomic_write_json

    checksum = records_checksum(records)
    atomic_write_json(
        Path(path),
        {
            "format": RECORDS_FORMAT,
            "version": RECORDS_FORMAT_VERSION,
            "source": source,
            "sha256": checksum,
            "records": [records[k].to_dict() for k in sorted(records)],
        },
    )
    return checksum


def load_saved_records(path: Path) -> dict[str, ProductRecord]:
    """The record table written by :func:`save_records`; a missing file is an empty table, a damaged one an error."""
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise RecordsError(f"{path}: saved records are unreadable ({exc}); run the records update again") from None
    if not isinstance(data, dict) or data.get("format") != RECORDS_FORMAT:
        raise RecordsError(f"{path}: not a lookalike records file")
    if data.get("version") != RECORDS_FORMAT_VERSION:
        raise RecordsError(f"{path}: records format version {data.get('version')}, this lookalike reads 1")
    records: dict[str, ProductRecord] = {}
    for i, item in enumerate(data.get("records") or []):
        try:
            if not isinstance(item, dict):
                raise ValueError("not an object")
            record = ProductRecord.from_dict(item)
        except ValueError as exc:
            raise RecordsError(f"{path}: record {i + 1} is damaged ({exc}); run the records update again") from None
        records[record.product_id] = record
    if records_checksum(records) != data.get("sha256"):
        raise RecordsError(f"{path}: records do not match their checksum; run the records update again")
    return records


def record_fields(records: Mapping[str, ProductRecord]) -> list[str]:
    """Field names a filter may use over these records: the standard ones, then every attribute, sorted."""
    extra = sorted({k for r in records.values() for k in r.attributes})
    return [*STANDARD_FIELDS, *extra]


__all__ = [
    "RECORD_FILES",
    "STANDARD_FIELDS",
    "ProductRecord",
    "Reconciliation",
    "RecordIssue",
    "RecordsError",
    "RecordsLoad",
    "RecordsReport",
    "catalog_products",
    "find_records_file",
    "load_saved_records",
    "read_records",
    "reconcile",
    "record_fields",
    "records_checksum",
    "records_path",
    "refresh_records",
    "save_records",
    "update_records",
    "with_records",
]


def catalog_products(root: Path) -> list[str]:
    """The product folders of a catalog (hidden folders such as ``.removed`` are not products)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def update_records(data_dir: Path, metadata_path: Path) -> tuple[dict[str, ProductRecord], RecordsReport]:
    """``lookalike records``: re-read the catalog's records file, reconcile it with the product folders and save
    it beside the index manifest. No image is read; a loaded engine picks the new table up on its next load."""
    records, report = refresh_records(data_dir, catalog_products(data_dir))
    save_records(records_path(metadata_path), records, source=report.source)
    report.log()
    return records, report


def with_records(hits: Iterable[dict[str, Any]], records: Mapping[str, ProductRecord]) -> list[dict[str, Any]]:
    """The hits, each with its product's ``record`` (:meth:`ProductRecord.to_dict`, None without one): what
    the engine returns from every search once records are loaded. The hit dicts are updated in place."""
    out = []
    for hit in hits:
        record = records.get(hit["product_id"])
        hit["record"] = None if record is None else record.to_dict()
        out.append(hit)
    return out
