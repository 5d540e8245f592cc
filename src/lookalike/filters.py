"""The ``where`` grammar: which products a search may return, from Python, the CLI and HTTP alike.

Python (``search(..., where=...)``)::

    {"category": "dairy", "brand": ["Arla", "Oatly"], "price": {"lte": 20}, "tags": "organic"}

A plain value means equal (for ``tags`` and other list fields: contains), a list means one of them (for list
fields: contains any), a dict names operators: ``eq ne in not_in lt lte gt gte contains contains_any
contains_all``. Every entry must hold (AND).

CLI (``--where``, repeatable) and HTTP (``where=``, repeatable) use one clause per string::

    category=dairy        equal                       brand=Arla,Oatly     one of
    brand!=Arla           not equal (or unset)        brand!=Arla,Oatly    none of (or unset)
    price<=20  price<20  price>=5  price>5            numbers only
    tags~organic          contains                    tags~organic,vegan   contains any

Field names are the record fields (``product_id name url price currency category brand tags``) and the
attributes the catalog's records have. Values are compared exactly (case matters); ``\\,`` is a literal comma
inside a value and ``\\\\`` a backslash. A product without a value for a field matches only ``!=`` on it.

One parsed :class:`Filter` answers three ways: :meth:`Filter.matches` (one record), :meth:`Filter.product_ids`
(the exact subset, for the FAISS store) and :meth:`Filter.to_milvus_expr` (a Milvus boolean expression over the
``product_id`` scalar field and the ``record`` JSON field).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .records import STANDARD_FIELDS, ProductRecord

# kinds of field values
TEXT, NUMBER, BOOL, LIST = "text", "number", "bool", "list"
STANDARD_KINDS: dict[str, frozenset[str]] = {
    "product_id": frozenset({TEXT}),
    "name": frozenset({TEXT}),
    "url": frozenset({TEXT}),
    "price": frozenset({NUMBER}),
    "currency": frozenset({TEXT}),
    "category": frozenset({TEXT}),
    "brand": frozenset({TEXT}),
    "tags": frozenset({LIST}),
}
OPS = ("eq", "ne", "in", "not_in", "lt", "lte", "gt", "gte", "contains", "contains_any", "contains_all")
_RANGE = {"lt": "<", "lte": "<=", "gt": ">", "gte": ">="}
_CLI = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(<=|>=|!=|=|<|>|~)\s*(.*?)\s*$", re.S)
MAX_CLAUSES = 32
MAX_VALUES = 256
MAX_VALUE_CHARS = 2_000
MAX_SAFE_INT = 2**53  # beyond this JSON numbers lose precision


class FilterError(ValueError):
    """A ``where`` that cannot be used: unknown field, bad operator or value. One line, naming the known fields."""


Value = str | int | float | bool


@dataclass(frozen=True)
class Clause:
    field: str
    op: str
    value: Value | tuple[Value, ...]


@dataclass(frozen=True)
class Filter:
    """Clauses that must all hold. Build it with :func:`parse_where`."""

    clauses: tuple[Clause, ...]

    def matches(self, record: ProductRecord | Mapping[str, Any] | None, product_id: str | None = None) -> bool:
        """Whether a product with this record (None: no record) passes. ``product_id`` when the record is None."""
        for clause in self.clauses:
            if clause.field == "product_id":
                value: Any = product_id if record is None else _get(record, "product_id")
            else:
                value = None if record is None else _get(record, clause.field)
            if not _holds(clause, value):
                return False
        return True

    def product_ids(self, records: Mapping[str, ProductRecord], universe: Iterable[str] | None = None) -> set[str]:
        """The products that pass: of ``universe`` (e.g. every indexed product; those without a record are
        judged as having no fields) or, without it, of the records."""
        ids = records.keys() if universe is None else universe
        return {pid for pid in ids if self.matches(records.get(pid), pid)}

    def to_milvus_expr(self, *, json_field: str = "record", product_field: str = "product_id") -> str:
        """A Milvus boolean expression selecting exactly the rows :meth:`matches` accepts.

        Rows carry the product id in the scalar field ``product_field`` and the record's :meth:`~ProductRecord.
        to_dict` (``{}`` for a product without a record) in the JSON field ``json_field``.
        """
        parts = [_milvus_clause(c, json_field, product_field) for c in self.clauses]
        return " and ".join(f"({p})" for p in parts) if parts else ""

    def fields(self) -> set[str]:
        return {c.field for c in self.clauses}

    def to_strings(self) -> list[str]:
        """The clauses in the CLI/HTTP grammar (for logs and for passing a filter on)."""
        symbols = {"eq": "=", "in": "=", "ne": "!=", "not_in": "!=", "contains": "~", "contains_any": "~"}
        symbols.update(_RANGE)
        out = []
        for c in self.clauses:
            values = c.value if isinstance(c.value, tuple) else (c.value,)
            text = ",".join(_escape_cli(_format_cli(v)) for v in values)
            if c.op == "contains_all":
                out.extend(f"{c.field}~{_escape_cli(_format_cli(v))}" for v in values)
            else:
                out.append(f"{c.field}{symbols[c.op]}{text}")
        return out


# --- parsing ----------------------------------------------------------------------------------------------


def field_kinds(records: Mapping[str, ProductRecord]) -> dict[str, frozenset[str]]:
    """The fields a filter may use over these records and the kinds of value each holds."""
    kinds: dict[str, set[str]] = {}
    for record in records.values():
        for key, value in record.attributes.items():
            kinds.setdefault(key, set()).add(_kind(value))
    return {**STANDARD_KINDS, **{k: frozenset(v) for k, v in sorted(kinds.items())}}


def parse_where(
    where: Filter | Mapping[str, Any] | Sequence[str] | str | None,
    fields: Mapping[str, frozenset[str]] | None = None,
) -> Filter | None:
    """One :class:`Filter` from a Python dict, CLI/HTTP strings (one clause each) or one such string.

    ``fields`` are the usable fields and their kinds (:func:`field_kinds` of the index's records; default: the
    standard record fields). None or an empty ``where`` gives None (no filter). Raises :class:`FilterError`.
    """
    known = dict(fields) if fields is not None else dict(STANDARD_KINDS)
    if where is None:
        return None
    if isinstance(where, Filter):
        clauses = list(where.clauses)
        for c in clauses:
            _check_field(c.field, known)
    elif isinstance(where, str):
        clauses = _parse_string(where, known)
    elif isinstance(where, Mapping):
        clauses = []
        for name, spec in where.items():
            clauses.extend(_parse_entry(name, spec, known))
    elif isinstance(where, Sequence):
        clauses = []
        for text in where:
            if not isinstance(text, str):
                raise FilterError(f"where: {text!r} is not a clause string like 'category=dairy'")
            clauses.extend(_parse_string(text, known))
    else:
        raise FilterError(f"where: {type(where).__name__} is not a filter (a dict or clause strings)")
    if not clauses:
        return None
    if len(clauses) > MAX_CLAUSES:
        raise FilterError(f"where: {len(clauses)} clauses, at most {MAX_CLAUSES}")
    return Filter(tuple(clauses))


def _known_text(known: Mapping[str, Any]) -> str:
    return ", ".join(known)


def _check_field(name: Any, known: Mapping[str, frozenset[str]]) -> frozenset[str]:
    if not isinstance(name, str) or name not in known:
        raise FilterError(f"where: unknown field {name!r}; known fields: {_known_text(known)}")
    return known[name]


def _parse_string(text: str, known: Mapping[str, frozenset[str]]) -> list[Clause]:
    if not text.strip():
        return []
    m = _CLI.match(text)
    if not m:
        raise FilterError(
            f"where: cannot read {text!r}; write field=value, field!=value, field<=number, field~tag "
            f"(known fields: {_known_text(known)})"
        )
    name, symbol, raw = m.groups()
    kinds = _check_field(name, known)
    values = _split_cli(raw)
    if not values or any(v == "" for v in values):
        raise FilterError(f"where: {text!r} has an empty value")
    typed = tuple(_typed_from_text(name, v, kinds) for v in values)
    many = len(typed) > 1
    if symbol in _RANGE.values():
        if many:
            raise FilterError(f"where: {text!r}: {symbol} takes one number")
        op = {v: k for k, v in _RANGE.items()}[symbol]
        return [_clause(name, op, typed[0], kinds)]
    if symbol == "~":
        return [_clause(name, "contains_any" if many else "contains", typed if many else typed[0], kinds)]
    if kinds == {LIST}:  # tags=organic reads as "has the tag organic"
        op = {"=": "contains_any" if many else "contains"}.get(symbol)
        if op is None:
            raise FilterError(f"where: {text!r}: {name} is a list; use {name}~value")
        return [_clause(name, op, typed if many else typed[0], kinds)]
    if symbol == "=":
        return [_clause(name, "in" if many else "eq", typed if many else typed[0], kinds)]
    return [_clause(name, "not_in" if many else "ne", typed if many else typed[0], kinds)]


def _split_cli(raw: str) -> list[str]:
    out, cur, i = [], [], 0
    while i < len(raw):
        ch = raw[i]
        if ch == "\\" and i + 1 < len(raw) and raw[i + 1] in ",\\":
            cur.append(raw[i + 1])
            i += 2
            continue
        if ch == ",":
            out.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
        i += 1
    out.append("".join(cur).strip())
    return out


def _escape_cli(text: str) -> str:
    return text.replace("\\", "\\\\").replace(",", "\\,")


def _format_cli(value: Value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _typed_from_text(name: str, text: str, kinds: frozenset[str]) -> Value:
    """A CLI/HTTP value typed by what the field holds: numbers for number fields, true/false for booleans."""
    if NUMBER in kinds:
        try:
            number = float(text)
        except ValueError:
            number = None
        if number is not None:
            return int(number) if re.fullmatch(r"-?\d+", text) else number
    if BOOL in kinds and text.lower() in ("true", "false"):
        return text.lower() == "true"
    if kinds & {TEXT, LIST}:
        return text
    raise FilterError(f"where: {name}={text!r}: {name} holds {'/'.join(sorted(kinds))} values")


def _parse_entry(name: str, spec: Any, known: Mapping[str, frozenset[str]]) -> list[Clause]:
    kinds = _check_field(name, known)
    if isinstance(spec, Mapping):
        if not spec:
            raise FilterError(f"where: {name}: empty operator dict; operators: {', '.join(OPS)}")
        clauses = []
        for op, value in spec.items():
            if op not in OPS:
                raise FilterError(f"where: {name}: unknown operator {op!r}; operators: {', '.join(OPS)}")
            if op in ("in", "not_in", "contains_any", "contains_all"):
                if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
                    raise FilterError(f"where: {name}: {op} needs a non-empty list")
                value = tuple(value)
            clauses.append(_clause(name, op, value, kinds))
        return clauses
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise FilterError(f"where: {name}: an empty list matches nothing; leave the field out instead")
        return [_clause(name, "contains_any" if kinds == {LIST} else "in", tuple(spec), kinds)]
    return [_clause(name, "contains" if kinds == {LIST} else "eq", spec, kinds)]


def _clause(name: str, op: str, value: Any, kinds: frozenset[str]) -> Clause:
    values = value if isinstance(value, tuple) else (value,)
    if len(values) > MAX_VALUES:
        raise FilterError(f"where: {name}: {len(values)} values, at most {MAX_VALUES}")
    for v in values:
        _check_value(name, v)
    if op in _RANGE:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or NUMBER not in kinds:
            raise FilterError(f"where: {name} {_RANGE[op]} {value!r}: ordering needs a number field and a number")
    elif op.startswith("contains"):
        if not kinds & {LIST}:
            raise FilterError(f"where: {name} holds {'/'.join(sorted(kinds))} values, not a list; use = instead of ~")
        if not all(isinstance(v, str) for v in values):
            raise FilterError(f"where: {name}: list fields hold text values")
    else:
        for v in values:
            kind = _kind(v)
            if kind not in kinds and not (kind == TEXT and LIST in kinds):
                raise FilterError(f"where: {name}={v!r}: {name} holds {'/'.join(sorted(kinds))} values")
        if kinds == {LIST}:
            raise FilterError(f"where: {name} is a list; use contains ({name}~value)")
    return Clause(name, op, value)


def _check_value(name: str, value: Any) -> None:
    if isinstance(value, bool):
        return
    if isinstance(value, str):
        if len(value) > MAX_VALUE_CHARS:
            raise FilterError(f"where: {name}: a value of {len(value)} characters, at most {MAX_VALUE_CHARS}")
        if any(ord(c) < 32 and c not in "\t" for c in value):
            raise FilterError(f"where: {name}: control characters in {value!r}")
        return
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or abs(value) > MAX_SAFE_INT:
            raise FilterError(f"where: {name}: {value!r} is not a usable number")
        return
    raise FilterError(f"where: {name}: {value!r} is not text, a number or true/false")


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return BOOL
    if isinstance(value, (int, float)):
        return NUMBER
    if isinstance(value, (tuple, list)):
        return LIST
    return TEXT


# --- evaluating -------------------------------------------------------------------------------------------


def _get(record: ProductRecord | Mapping[str, Any], name: str) -> Any:
    if isinstance(record, ProductRecord):
        return record.get(name)
    value = record.get(name)
    return None if value in ((), []) else value


def _same(a: Any, b: Any) -> bool:
    """Equality that keeps kinds apart (True is not 1, "5" is not 5), as Milvus does for these kinds."""
    return a is not None and _kind(a) == _kind(b) and a == b


def _holds(clause: Clause, value: Any) -> bool:
    op, target = clause.op, clause.value
    if op == "eq":
        return _same(value, target)
    if op == "ne":
        return not _same(value, target)
    if op == "in":
        return any(_same(value, t) for t in target)  # type: ignore[union-attr]
    if op == "not_in":
        return not any(_same(value, t) for t in target)  # type: ignore[union-attr]
    if op in _RANGE:
        if _kind(value) != NUMBER:
            return False
        return {"lt": value < target, "lte": value <= target, "gt": value > target, "gte": value >= target}[op]
    items = list(value) if isinstance(value, (list, tuple)) else []
    if op == "contains":
        return target in items
    if op == "contains_any":
        return any(t in items for t in target)  # type: ignore[union-attr]
    return all(t in items for t in target)  # type: ignore[union-attr]  # contains_all


# --- Milvus -----------------------------------------------------------------------------------------------


def milvus_string(text: str) -> str:
    """A Milvus string literal: double-quoted, backslash and quote escaped, tab/newline written as escapes."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\t", "\\t").replace("\n", "\\n")
    return f'"{escaped}"'


def _literal(value: Value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    return milvus_string(value)


def _milvus_clause(clause: Clause, json_field: str, product_field: str) -> str:
    op, value = clause.op, clause.value
    if clause.field == "product_id":
        path = product_field
        if op in ("in", "not_in"):
            items = ", ".join(_literal(v) for v in value)  # type: ignore[union-attr]
            return f"{path} {'in' if op == 'in' else 'not in'} [{items}]"
        if op in ("eq", "ne"):
            return f"{path} {'==' if op == 'eq' else '!='} {_literal(value)}"  # type: ignore[arg-type]
        raise FilterError(f"where: product_id: {op} is not available")  # parse_where never builds this
    path = f"{json_field}[{milvus_string(clause.field)}]"
    if op == "eq":
        return f"{path} == {_literal(value)}"  # type: ignore[arg-type]
    if op == "in":
        return " or ".join(f"{path} == {_literal(v)}" for v in value)  # type: ignore[union-attr]
    # Missing keys behave like SQL NULL in Milvus (both "!=" and "not (==)" drop them): test presence explicitly.
    # "(exists x)" in parentheses: Milvus 2.3 reads "exists x and y" as "exists (x and y)".
    if op == "ne":
        return f"not ((exists {path}) and {path} == {_literal(value)})"  # type: ignore[arg-type]
    if op == "not_in":
        alts = " or ".join(f"{path} == {_literal(v)}" for v in value)  # type: ignore[union-attr]
        return f"not ((exists {path}) and ({alts}))"
    if op in _RANGE:
        return f"{path} {_RANGE[op]} {_literal(value)}"  # type: ignore[arg-type]
    items = ", ".join(_literal(v) for v in (value if isinstance(value, tuple) else (value,)))
    func = {"contains": "json_contains", "contains_any": "json_contains_any", "contains_all": "json_contains_all"}[op]
    return f"{func}({path}, {_literal(value)})" if op == "contains" else f"{func}({path}, [{items}])"  # type: ignore[arg-type]


__all__ = ["OPS", "STANDARD_FIELDS", "Clause", "Filter", "FilterError", "field_kinds", "milvus_string", "parse_where"]
