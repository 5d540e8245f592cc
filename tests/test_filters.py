"""The where grammar: parsing (Python dicts, CLI/HTTP strings), errors, matching, and Milvus expressions checked
against a real Milvus Lite collection."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from lookalike.filters import Filter, FilterError, field_kinds, milvus_string, parse_where
from lookalike.records import ProductRecord

RECORDS = {
    "milk": ProductRecord("milk", name="Milk", price=12.5, category="dairy", brand="Arla", tags=("organic",)),
    "oat": ProductRecord("oat", name="Oat", price=25.0, category="dairy", brand="Oatly", tags=("vegan", "organic")),
    "bread": ProductRecord("bread", price=20, category="bakery", brand="Pågen", attributes={"stock": 0}),
    "apple": ProductRecord("apple", category="fruit", attributes={"stock": 7, "organic": True}),
    "quote": ProductRecord("quote", brand='Say "cheese" \\ now, ok', attributes={"note": "line\nbreak"}),
}
FIELDS = field_kinds(RECORDS)
UNIVERSE = [*RECORDS, "no-record"]


def ids(where) -> set[str]:
    f = parse_where(where, FIELDS)
    assert f is not None
    return f.product_ids(RECORDS, UNIVERSE)


def test_python_dicts():
    assert ids({"category": "dairy"}) == {"milk", "oat"}
    assert ids({"brand": ["Arla", "Oatly", "Nobody"]}) == {"milk", "oat"}
    assert ids({"price": {"lte": 20}}) == {"milk", "bread"}
    assert ids({"price": {"gt": 12.5, "lt": 25}}) == {"bread"}
    assert ids({"category": "dairy", "brand": ["Arla", "Oatly"], "price": {"lte": 20}}) == {"milk"}
    assert ids({"tags": "organic"}) == {"milk", "oat"}
    assert ids({"tags": ["vegan", "nothing"]}) == {"oat"}
    assert ids({"tags": {"contains_all": ["vegan", "organic"]}}) == {"oat"}
    assert ids({"brand": {"ne": "Arla"}}) == set(UNIVERSE) - {"milk"}  # unset counts as "not Arla"
    assert ids({"brand": {"not_in": ["Arla", "Oatly"]}}) == {"bread", "apple", "quote", "no-record"}
    assert ids({"stock": {"gte": 0}}) == {"bread", "apple"}
    assert ids({"organic": True}) == {"apple"}
    assert ids({"product_id": ["milk", "no-record"]}) == {"milk", "no-record"}
    assert ids({"brand": 'Say "cheese" \\ now, ok'}) == {"quote"}
    assert parse_where({}, FIELDS) is None and parse_where(None, FIELDS) is None and parse_where([], FIELDS) is None


def test_cli_strings_mean_the_same_as_dicts():
    assert ids(["category=dairy", "price<=20"]) == {"milk"}
    assert ids("brand=Arla,Oatly") == {"milk", "oat"}
    assert ids("brand != Arla") == ids({"brand": {"ne": "Arla"}})
    assert ids("brand!=Arla,Oatly") == {"bread", "apple", "quote", "no-record"}
    assert ids("tags~organic") == {"milk", "oat"}
    assert ids("tags=organic") == {"milk", "oat"}
    assert ids("tags~vegan,none") == {"oat"}
    assert ids("price>12.5") == {"oat", "bread"}
    assert ids("price>=12.5") == {"milk", "oat", "bread"}
    assert ids("price<25") == {"milk", "bread"}
    assert ids("stock=7") == {"apple"}
    assert ids("organic=true") == {"apple"}
    assert ids('brand=Say "cheese" \\\\ now\\, ok') == {"quote"}
    for f in [parse_where(w, FIELDS) for w in (["category=dairy", "price<=20"], "brand!=Arla,Oatly", "tags~a,b")]:
        assert parse_where(f.to_strings(), FIELDS) == f  # the CLI form reads back to the same filter


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ({"colour": "red"}, "unknown field 'colour'; known fields: product_id, name, url, price, currency, category"),
        ("colour=red", "unknown field 'colour'; known fields: product_id, name"),
        ("price<=cheap", "price='cheap': price holds number values"),
        ({"price": {"lte": "20"}}, "ordering needs a number field and a number"),
        ({"price": {"lte": True}}, "ordering needs a number field and a number"),
        ("category<dairy", "ordering needs a number field"),
        ({"price": {"about": 3}}, "unknown operator 'about'; operators: eq, ne, in"),
        ({"brand": []}, "an empty list matches nothing"),
        ({"brand": {"in": "Arla"}}, "in needs a non-empty list"),
        ("brand=", "has an empty value"),
        ("brand=Arla,", "has an empty value"),
        ("just words", "cannot read 'just words'"),
        ("category~dairy", "not a list; use = instead of ~"),
        ("tags!=organic", "tags is a list; use tags~value"),
        ({"brand": "a\nb"}, "control characters"),
        ({"price": float("nan")}, "not a usable number"),
        ({"brand": {"eq": None}}, "not text, a number or true/false"),
        ({"organic": 1}, "organic=1: organic holds bool values"),
        ("price<=1,2", "takes one number"),
        (42, "int is not a filter"),
    ],
)
def test_errors_are_one_clear_line(where, message):
    with pytest.raises(FilterError) as err:
        parse_where(where, FIELDS)
    assert message in str(err.value)
    assert "\n" not in str(err.value).replace("a\\nb", "")


def test_default_fields_are_the_standard_ones():
    assert parse_where("category=dairy") is not None
    with pytest.raises(FilterError, match="unknown field 'stock'"):
        parse_where("stock>1")


def test_milvus_expressions_and_escaping():
    f = parse_where({"category": "dairy", "price": {"lte": 20}, "tags": "organic"}, FIELDS)
    assert f.to_milvus_expr() == (
        '(record["category"] == "dairy") and (record["price"] <= 20) and (json_contains(record["tags"], "organic"))'
    )
    assert parse_where("product_id=a,b", FIELDS).to_milvus_expr(product_field="pid") == '(pid in ["a", "b"])'
    assert milvus_string('a"b\\c\nd\te') == r'"a\"b\\c\nd\te"'
    assert parse_where({"brand": {"ne": "x"}}, FIELDS).to_milvus_expr(json_field="r") == (
        '(not ((exists r["brand"]) and r["brand"] == "x"))'
    )


def random_table(seed: int) -> dict[str, ProductRecord]:
    rng = np.random.default_rng(seed)
    brands = ["Arla", "Oatly", 'Q"uote', "back\\slash", "Ünïcode", "comma, inside", "tab\there", "O'Brien"]
    tags = ["organic", "vegan", "local", "new"]
    out = {}
    for i in range(40):
        values: dict = {"product_id": f"p{i:02d}" if i % 7 else f"p'{i}\"x"}
        if rng.random() < 0.8:
            values["brand"] = str(rng.choice(brands))
        if rng.random() < 0.7:
            values["price"] = float(rng.choice([0, 5, 9.99, 10, 12.5, 20, 100]))
        if rng.random() < 0.7:
            values["category"] = str(rng.choice(["dairy", "bakery", "fruit"]))
        if rng.random() < 0.6:
            values["tags"] = [str(t) for t in rng.choice(tags, size=int(rng.integers(1, 3)), replace=False)]
        if rng.random() < 0.5:
            values["stock"] = int(rng.integers(0, 4))
        if rng.random() < 0.5:
            values["organic"] = bool(rng.random() < 0.5)
        if rng.random() < 0.85:  # the rest: products with no record at all
            out[values["product_id"]] = ProductRecord.from_dict(values)
        else:
            out[values["product_id"]] = None
    return out


WHERES = [
    "brand=Arla",
    "brand!=Arla",
    "brand=Arla,Oatly",
    "brand!=Arla,Oatly",
    'brand=Q"uote',
    r"brand=back\\slash",
    "brand=Ünïcode",
    r"brand=comma\, inside",
    "brand=tab\there",
    "brand=O'Brien",
    "brand!=O'Brien",
    "price<=10",
    "price<10",
    "price>9.99",
    "price>=0",
    "price=12.5",
    "price!=20",
    "price=5,20",
    "category=dairy",
    "category!=dairy,fruit",
    "tags~organic",
    "tags~vegan,new",
    "stock>=2",
    "stock=0",
    "stock!=0",
    "organic=true",
    "organic!=false",
    "product_id=p01,p02,p'0\"x",
    "product_id!=p01",
]


def test_matches_equals_milvus_lite_on_a_table(tmp_path):
    pymilvus = pytest.importorskip("pymilvus")
    pytest.importorskip("milvus_lite")
    table = random_table(7)
    records = {k: v for k, v in table.items() if v is not None}
    fields = field_kinds(records)
    client = pymilvus.MilvusClient(str(tmp_path / "filters.db"))
    try:
        schema = client.create_schema(auto_id=False)
        schema.add_field("id", pymilvus.DataType.INT64, is_primary=True)
        schema.add_field("product_id", pymilvus.DataType.VARCHAR, max_length=512)
        schema.add_field("record", pymilvus.DataType.JSON)
        schema.add_field("vector", pymilvus.DataType.FLOAT_VECTOR, dim=2)
        index = client.prepare_index_params()
        index.add_index("vector", index_type="FLAT", metric_type="IP")
        client.create_collection("f", schema=schema, index_params=index, consistency_level="Strong")
        rows = [
            {"id": i, "product_id": pid, "record": rec.to_dict() if rec else {}, "vector": [1.0, 0.0]}
            for i, (pid, rec) in enumerate(table.items())
        ]
        client.insert("f", rows)
        # single clauses, and every pair of them (ANDed)
        filters = [parse_where(w, fields) for w in WHERES]
        filters += [Filter(a.clauses + b.clauses) for a, b in itertools.combinations(filters[::3], 2)]
        filters.append(parse_where({"tags": {"contains_all": ["organic", "vegan"]}}, fields))
        checked = 0
        for f in filters:
            expected = f.product_ids(records, table.keys())
            got = client.query("f", filter=f.to_milvus_expr(), output_fields=["product_id"], limit=1000)
            assert {r["product_id"] for r in got} == expected, (f.to_strings(), f.to_milvus_expr())
            checked += bool(expected) and expected != set(table)
        assert checked > len(filters) // 2  # most filters select a proper, non-empty subset
    finally:
        client.close()
