"""Product records: parsing, validation with file/line/column, reconciliation, saving, updating."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from lookalike.record_files import (
    find_records_file,
    load_saved_records,
    read_records,
    reconcile,
    record_fields,
    records_path,
    refresh_records,
    save_records,
    with_records,
)
from lookalike.records import ProductRecord, RecordsError

GOOD_CSV = """product_id,name,url,price,currency,category,brand,tags,stock,colour
red-disc,Red Disc,https://shop.example/p/1,12.50,eur,dairy,Arla,organic|lactose-free,7,red
green-bar,"Green Bar, large",http://shop.example/p/2,3,SEK,bakery,Pågen,,0,green
blue-cross,Blue Cross,,,,,,"vegan,organic",,
"""


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, str):
        path.write_text(text, encoding="utf-8")
    else:
        path.write_bytes(text)
    return path


def test_good_csv(tmp_path):
    load = read_records(write(tmp_path / "products.csv", GOOD_CSV))
    assert load.issues == []
    assert set(load.records) == {"red-disc", "green-bar", "blue-cross"}
    red = load.records["red-disc"]
    assert red.name == "Red Disc" and red.price == 12.5 and red.currency == "EUR" and red.brand == "Arla"
    assert red.tags == ("organic", "lactose-free")
    assert red.attributes == {"stock": 7, "colour": "red"}
    green = load.records["green-bar"]
    assert green.name == "Green Bar, large" and green.brand == "Pågen" and green.price == 3.0
    assert green.attributes["stock"] == 0
    blue = load.records["blue-cross"]
    assert blue.price is None and blue.url is None and blue.tags == ("vegan", "organic") and blue.attributes == {}
    assert red.to_dict() == {
        "product_id": "red-disc",
        "name": "Red Disc",
        "url": "https://shop.example/p/1",
        "price": 12.5,
        "currency": "EUR",
        "category": "dairy",
        "brand": "Arla",
        "tags": ["organic", "lactose-free"],
        "stock": 7,
        "colour": "red",
    }
    assert blue.to_dict() == {"product_id": "blue-cross", "name": "Blue Cross", "tags": ["vegan", "organic"]}
    assert ProductRecord.from_dict(red.to_dict()) == red
    assert record_fields(load.records)[-2:] == ["colour", "stock"]


def test_good_jsonl_with_bom_and_blank_lines(tmp_path):
    lines = [
        {"product_id": "a", "name": "A", "price": 2, "tags": ["x", "y"], "organic": True, "sizes": ["S", "M"]},
        {"product_id": "b", "price": "4.25", "tags": "x|z", "weight_g": 500},
    ]
    text = "\n".join(json.dumps(x) for x in lines[:1]) + "\n\n" + json.dumps(lines[1]) + "\n"
    load = read_records(write(tmp_path / "products.jsonl", b"\xef\xbb\xbf" + text.encode()))
    assert load.issues == []
    assert load.records["a"].attributes == {"organic": True, "sizes": ("S", "M")}
    assert load.records["a"].to_dict()["sizes"] == ["S", "M"]
    assert load.records["b"].price == 4.25 and load.records["b"].tags == ("x", "z")
    assert load.records["b"].get("weight_g") == 500 and load.records["b"].get("name") is None


def test_bad_csv_lines_are_reported_with_line_and_column_and_skipped(tmp_path):
    text = (
        "product_id,name,url,price,currency\n"
        "ok-1,Fine,https://a.example/1,1.5,EUR\n"  # line 2
        "bad-price,X,,12,50x,\n"  # line 3: too many values
        "bad-price2,X,,abc,EUR\n"  # line 4
        "bad-url,X,javascript:alert(1),1,EUR\n"  # line 5
        ",No id,,1,EUR\n"  # line 6
        "ok-1,Again,,2,EUR\n"  # line 7: duplicate
        "bad-cur,X,,1,euro\n"  # line 8
        'comma-price,X,,"12,50",EUR\n'  # line 9
        "neg,X,,-1,EUR\n"  # line 10
        '"multi\nline",X,,1,EUR\n'  # line 11-12: id with a newline (control character)
        "ok-2,Last,,,\n"  # line 13
    )
    path = write(tmp_path / "products.csv", text)
    load = read_records(path)
    assert set(load.records) == {"ok-1", "ok-2"}
    assert load.records["ok-1"].name == "Fine"  # the first of two duplicates wins
    by_line = {i.line: i for i in load.issues}
    assert sorted(by_line) == [3, 4, 5, 6, 7, 8, 9, 10, 11]
    assert "6 values but the header names 5 columns" in str(by_line[3])
    assert by_line[4].column == "price" and "'abc' is not a number" in by_line[4].message
    assert by_line[5].column == "url" and "not an http(s) URL" in by_line[5].message
    assert by_line[6].column == "product_id" and "missing product_id" in by_line[6].message
    assert by_line[7].column == "product_id" and "duplicate product_id 'ok-1' (first on line 2)" in by_line[7].message
    assert by_line[8].column == "currency"
    assert by_line[9].column == "price" and "decimal point" in by_line[9].message
    assert by_line[10].column == "price"
    assert by_line[11].column == "product_id" and "control character" in by_line[11].message
    assert str(by_line[4]).startswith(f"{path}:4: column price: ")


def test_wrong_encoding_names_the_line(tmp_path):
    csv_bytes = b"product_id,name\nok,Fine\n" + b"latin,Caf\xe9\n" + b"ok2,Also fine\n"
    load = read_records(write(tmp_path / "products.csv", csv_bytes))
    assert set(load.records) == {"ok", "ok2"}
    [issue] = load.issues
    assert issue.line == 3 and issue.column == "name" and "not UTF-8" in issue.message

    jsonl = b'{"product_id": "a"}\n{"product_id": "caf\xe9"}\n{"product_id": "c"}\n'
    load = read_records(write(tmp_path / "products.jsonl", jsonl))
    assert set(load.records) == {"a", "c"}
    assert load.issues[0].line == 2 and "not UTF-8" in load.issues[0].message


def test_bad_jsonl_lines(tmp_path):
    text = "\n".join(
        [
            '{"product_id": "a", "price": 1}',
            '{"product_id": "b", "price": }',  # bad JSON
            '["not", "an", "object"]',
            '{"product_id": "c", "price": true}',
            '{"product_id": "d", "nested": {"x": 1}}',
            '{"product_id": "e", "bad name": 1}',
            '{"product_id": "f", "tags": [1, 2]}',
            '{"product_id": 7, "name": "number ids are text"}',
        ]
    )
    load = read_records(write(tmp_path / "products.jsonl", text))
    assert set(load.records) == {"a", "7"}
    by_line = {i.line: i for i in load.issues}
    assert sorted(by_line) == [2, 3, 4, 5, 6, 7]
    assert "bad JSON at character" in by_line[2].message
    assert "not an object" in by_line[3].message
    assert by_line[4].column == "price"
    assert by_line[5].column == "nested"
    assert by_line[6].column == "bad name" and "attribute name" in by_line[6].message
    assert by_line[7].column == "tags"


def test_unusable_files_raise_naming_the_file(tmp_path):
    with pytest.raises(RecordsError, match=r"products.csv:1: no product_id column \(the header has: sku, name\)"):
        read_records(write(tmp_path / "a" / "products.csv", "sku,name\n1,x\n"))
    with pytest.raises(RecordsError, match="empty file"):
        read_records(write(tmp_path / "b" / "products.csv", ""))
    with pytest.raises(RecordsError, match="used twice: name"):
        read_records(write(tmp_path / "c" / "products.csv", "product_id,name,name\n"))
    write(tmp_path / "d" / "products.csv", "product_id\n")
    write(tmp_path / "d" / "products.jsonl", "")
    with pytest.raises(RecordsError, match="both exist"):
        find_records_file(tmp_path / "d")
    assert find_records_file(tmp_path / "nothing-here") is None


def test_reconcile_reports_both_directions():
    records = {p: ProductRecord(p) for p in ("a", "b", "ghost")}
    rec = reconcile(records, ["a", "b", "c", "d"])
    assert rec.without_folder == ["ghost"]
    assert rec.without_record == ["c", "d"]


def test_refresh_records_needs_no_images_and_reports(tmp_path, caplog):
    root = tmp_path / "catalog"
    write(root / "products.csv", "product_id,price\na,1\nb,x\nghost,2\n")
    with caplog.at_level(logging.INFO, logger="lookalike.records"):
        records, report = refresh_records(root, ["a", "b", "c"])
        report.log()
    assert set(records) == {"a", "ghost"}
    d = report.to_dict()
    assert d["loaded"] == 2 and d["skipped_lines"] == 1
    assert d["records_without_folder"] == ["ghost"] and d["products_without_record"] == ["b", "c"]
    assert "products.csv:3: column price" in caplog.text
    # an update: edit the file, refresh again; no folder content (images) is touched
    write(root / "products.csv", "product_id,price\na,5\nb,6\nc,7\n")
    records, report = refresh_records(root, ["a", "b", "c"])
    assert {k: r.price for k, r in records.items()} == {"a": 5.0, "b": 6.0, "c": 7.0}
    assert report.issues == [] and report.without_record == []
    # no records file at all: every product is "without a record", nothing fails
    records, report = refresh_records(tmp_path / "empty", ["a"])
    assert records == {} and report.source is None and report.without_record == ["a"]


def test_save_and_load_round_trip_atomically(tmp_path):
    load = read_records(write(tmp_path / "products.csv", GOOD_CSV))
    path = records_path(tmp_path / "cache" / "metadata.json")
    assert path == tmp_path / "cache" / "records.json"
    checksum = save_records(path, load.records, source=load.source)
    assert len(checksum) == 64
    assert not list(path.parent.glob("*.tmp"))
    assert load_saved_records(path) == load.records
    assert load_saved_records(tmp_path / "missing.json") == {}
    data = json.loads(path.read_text(encoding="utf-8"))
    data["records"][0]["price"] = 999
    path.write_text(json.dumps(data))
    with pytest.raises(RecordsError, match="checksum"):
        load_saved_records(path)
    path.write_text("{not json")
    with pytest.raises(RecordsError, match=f"{path}: saved records are unreadable"):
        load_saved_records(path)


def test_with_records_adds_the_record_to_every_hit():
    records = {"a": ProductRecord("a", name="A", price=1.0)}
    hits = with_records([{"product_id": "a", "similarity": 0.9}, {"product_id": "b", "similarity": 0.5}], records)
    assert hits[0]["record"] == {"product_id": "a", "name": "A", "price": 1.0}
    assert hits[1]["record"] is None
    json.dumps(hits)  # JSON-ready as the server returns it
