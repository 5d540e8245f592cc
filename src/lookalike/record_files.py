"""Product record files: reading ``products.csv`` / ``products.jsonl`` line by line, reconciling them with the
product folders, and saving the table beside the index manifest (see :mod:`lookalike.records` for the format).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .records import (
    RECORD_FILES,
    RECORDS_FORMAT,
    RECORDS_FORMAT_VERSION,
    SAVED_RECORDS_FILE,
    STANDARD_FIELDS,
    ProductRecord,
    RecordsError,
    _build,
)

logger = logging.getLogger(__name__)


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


__all__ = [
    "Reconciliation",
    "RecordIssue",
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
