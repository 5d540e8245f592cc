"""Product search over HTTP: records in every hit, where= filters, box= crops, only_matches, POST /search/regions,
GET /facets, and a clear 422 for every bad filter or box (before the upload is read).

Fast: the tiny random backbone over a synthetic catalog of six products (enough for a calibrated "no match"
threshold) with a products.csv; the built engine injected into the app factory.
"""

from __future__ import annotations

import io
import warnings

import pytest
from PIL import Image

from conftest import jpeg_bytes, product_image, write_catalog
from lookalike import ImageSearchEngine
from lookalike.server import create_app

with warnings.catch_warnings():  # newer Starlette nudges towards httpx2; httpx is what FastAPI documents
    warnings.filterwarnings("ignore", message=".*httpx2", category=UserWarning)
    from fastapi.testclient import TestClient

PRODUCTS = {"red-disc": 4, "green-bar": 4, "blue-cross": 4, "yellow-disc": 4, "black-bar": 4, "grey-cross": 4}
LOOK = {product: look for look, product in enumerate(PRODUCTS)}
RECORDS_CSV = """product_id,name,url,price,currency,category,brand,tags,origin,weight_g
red-disc,Red Disc Cookies,https://shop.example/p/red-disc,2.50,EUR,snacks,Acme,organic|vegan,SE,200
green-bar,"Green Bar, large",https://shop.example/p/green-bar,12,EUR,dairy,Arla,organic,DK,1000
blue-cross,Blue Cross Oat Drink,https://shop.example/p/blue-cross,25,EUR,dairy,Oatly,vegan,SE,1030
yellow-disc,Yellow Disc,https://shop.example/p/yellow-disc,8,EUR,fruit,Acme,,ES,150
black-bar,Black Bar,https://shop.example/p/black-bar,30,EUR,dairy,Arla,,DK,
"""
RECORDED = [p for p in PRODUCTS if p != "grey-cross"]  # grey-cross has a folder but no record
JPEG = {"content-type": "image/jpeg"}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(client, engine) over the six-product catalog with records; one build for the whole module."""
    from lookalike import Settings

    root = tmp_path_factory.mktemp("products")
    write_catalog(root / "catalog", PRODUCTS)
    (root / "catalog" / "products.csv").write_text(RECORDS_CSV, encoding="utf-8")
    settings = Settings(
        config_file=None,
        environ={},
        model_name="test_tiny",
        data_dir=root / "catalog",
        cache_dir=root / "cache",
        batch_size=4,
        num_workers=2,
    )
    engine = ImageSearchEngine(settings)
    engine.build_index()
    assert engine.no_match_threshold is not None, "the fixture catalog should be calibrated"
    with TestClient(create_app(engine=engine)) as client:
        yield client, engine


@pytest.fixture
def client(served):
    return served[0]


def photo(product: str, variant: int = 50, size: int = 96) -> bytes:
    return jpeg_bytes(product_image(LOOK[product], variant, size=size))


def upload(data: bytes) -> dict:
    return {"image": ("photo.jpg", data, "image/jpeg")}


def search(client, data: bytes, **params):
    r = client.post("/search", files=upload(data), params=params)
    assert r.status_code == 200, r.text
    return r.json()


def detail_422(response) -> str:
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and "Traceback" not in detail
    return detail


# --- records in hits -----------------------------------------------------------------------------------------


def test_every_hit_carries_its_record_and_a_match_flag(client):
    body = search(client, photo("red-disc"), top_k=6)
    hits = {h["product_id"]: h for h in body["results"]}
    assert body["results"][0]["product_id"] == "red-disc"
    assert set(hits) == set(PRODUCTS)
    red = hits["red-disc"]["record"]
    assert red["name"] == "Red Disc Cookies" and red["price"] == 2.5 and red["currency"] == "EUR"
    assert red["url"] == "https://shop.example/p/red-disc" and red["tags"] == ["organic", "vegan"]
    assert red["origin"] == "SE"  # a further column of products.csv passes as an attribute
    assert hits["green-bar"]["record"]["name"] == "Green Bar, large"
    assert hits["grey-cross"]["record"] is None  # a folder without a record still answers
    assert all(isinstance(h["match"], bool) for h in body["results"])  # the index is calibrated
    assert hits["red-disc"]["match"] is True


def test_more_like_this_carries_records_and_takes_where(client):
    r = client.get("/products/red-disc/similar", params={"top_k": 10})
    assert r.status_code == 200, r.text
    assert {h["product_id"] for h in r.json()["results"]} == set(PRODUCTS) - {"red-disc"}
    r = client.get("/products/red-disc/similar", params=[("where", "category=dairy"), ("where", "brand=Arla")])
    body = r.json()
    assert r.status_code == 200, r.text
    assert {h["product_id"] for h in body["results"]} == {"green-bar", "black-bar"}
    assert all(h["record"]["category"] == "dairy" and h["record"]["brand"] == "Arla" for h in body["results"])
    assert body["where"] == ["category=dairy", "brand=Arla"]
    assert "known fields" in detail_422(client.get("/products/red-disc/similar", params={"where": "colour=red"}))


# --- where= ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        (["category=dairy"], {"green-bar", "blue-cross", "black-bar"}),
        (["brand=Arla,Oatly"], {"green-bar", "blue-cross", "black-bar"}),
        (["price<=12"], {"red-disc", "green-bar", "yellow-disc"}),
        (["category=dairy", "price<20"], {"green-bar"}),
        (["tags~vegan"], {"red-disc", "blue-cross"}),
        (["tags~organic,vegan", "brand!=Acme"], {"green-bar", "blue-cross"}),
        (["brand!=Arla"], {"red-disc", "blue-cross", "yellow-disc", "grey-cross"}),  # no record: no brand
        (["origin=SE"], {"red-disc", "blue-cross"}),
        (["weight_g<=200"], {"red-disc", "yellow-disc"}),
        (["name=Green Bar\\, large"], {"green-bar"}),
    ],
)
def test_a_filtered_search_returns_every_matching_product_and_nothing_else(client, where, expected):
    """top_k above the number of matching products: the list holds exactly the products that pass, although some
    of them look nothing like the query (no post-filtering that starves the list)."""
    body = search(client, photo("yellow-disc"), top_k=10, where=where)
    assert {h["product_id"] for h in body["results"]} == expected
    assert [h["rank"] for h in body["results"]] == list(range(1, len(expected) + 1))
    sims = [h["similarity"] for h in body["results"]]
    assert sims == sorted(sims, reverse=True)
    assert len(body["where"]) == len(where)


def test_a_filtered_search_fills_top_k_and_keeps_the_unfiltered_order(client):
    everything = search(client, photo("green-bar"), top_k=6)["results"]
    dairy = [h["product_id"] for h in everything if (h["record"] or {}).get("category") == "dairy"]
    body = search(client, photo("green-bar"), top_k=2, where="category=dairy")
    assert [h["product_id"] for h in body["results"]] == dairy[:2]


def test_image_level_results_are_filtered_too(client):
    body = search(client, photo("red-disc"), top_k=8, by_product="false", where="brand=Arla")
    assert len(body["results"]) == 8  # green-bar and black-bar have four photos each
    assert {h["product_id"] for h in body["results"]} == {"green-bar", "black-bar"}


@pytest.mark.parametrize(
    ("where", "words"),
    [
        ("colour=red", ["unknown field 'colour'", "known fields", "category", "brand", "origin"]),
        ("price<=cheap", ["price"]),
        ("category<5", ["category"]),
        ("just text", ["cannot read", "known fields"]),
        ("brand=", ["empty value"]),
        ("tags!=organic", ["tags"]),
    ],
)
def test_a_bad_filter_is_a_422_in_one_line(client, where, words):
    detail = detail_422(client.post("/search", files=upload(photo("red-disc")), params={"where": where}))
    for word in words:
        assert word in detail


def test_a_bad_box_is_refused_before_the_upload_is_read(client):
    consumed = []

    def body():
        consumed.append(True)
        yield photo("red-disc")

    for box in ("1,2,3", "5,5,1,1", "a,b,c,d"):
        detail_422(client.post("/search", content=body(), headers=JPEG, params={"box": box}))
    assert consumed == []


def test_the_where_grammar_is_in_the_openapi_description(client):
    spec = client.get("/openapi.json").json()
    for path, method in (("/search", "post"), ("/search/regions", "post"), ("/products/{product_id}/similar", "get")):
        params = {p["name"]: p for p in spec["paths"][path][method]["parameters"]}
        text = params["where"]["description"]
        assert "category=dairy" in text and "price<=20" in text and "tags~organic" in text, path
        assert params["where"]["schema"]["anyOf"][0]["type"] == "array"  # repeatable
    hit = spec["components"]["schemas"]["Hit"]["properties"]
    assert "record" in hit and "match" in hit


# --- box= ------------------------------------------------------------------------------------------------------


def two_products(left: str, right: str) -> Image.Image:
    canvas = Image.new("RGB", (400, 200), (128, 128, 128))
    canvas.paste(product_image(LOOK[left], 60, size=180), (10, 10))
    canvas.paste(product_image(LOOK[right], 61, size=180), (210, 10))
    return canvas


def test_a_box_searches_that_region_of_the_photo(client):
    collage = jpeg_bytes(two_products("blue-cross", "yellow-disc"), quality=95)
    for box, expected in (("10,10,190,190", "blue-cross"), ("210,10,390,190", "yellow-disc")):
        body = search(client, collage, top_k=3, box=box)
        assert body["results"][0]["product_id"] == expected, (box, body["results"])
        assert body["box"] == [float(v) for v in box.split(",")]
    # the same as uploading the crop itself
    full = Image.open(io.BytesIO(collage))
    crop = jpeg_bytes(full.crop((210, 10, 390, 190)), quality=95)
    boxed = search(client, collage, top_k=6, box="210,10,390,190")["results"]
    cropped = search(client, crop, top_k=6)["results"]
    assert [h["product_id"] for h in boxed] == [h["product_id"] for h in cropped]
    assert [h["similarity"] for h in boxed] == pytest.approx([h["similarity"] for h in cropped], abs=0.02)


def test_a_box_and_a_filter_together(client):
    collage = jpeg_bytes(two_products("blue-cross", "yellow-disc"), quality=95)
    body = search(client, collage, top_k=10, box="210,10,390,190", where="category=dairy")
    assert {h["product_id"] for h in body["results"]} == {"green-bar", "blue-cross", "black-bar"}


@pytest.mark.parametrize(
    ("box", "words"),
    [
        ("1,2,3", "four"),
        ("a,b,c,d", "four numbers"),
        ("10,10,5,50", "x0 < x1"),
        ("0,0,nan,5", "finite"),
        ("500,500,600,600", "outside"),  # the photo is 96 x 96
    ],
)
def test_a_bad_box_is_a_422_in_one_line(client, box, words):
    detail = detail_422(client.post("/search", files=upload(photo("red-disc")), params={"box": box}))
    assert words in detail and "box" in detail


# --- only_matches ----------------------------------------------------------------------------------------------


def test_only_matches_keeps_the_results_flagged_match(client):
    query = photo("black-bar")
    everything = search(client, query, top_k=6)["results"]
    assert any(h["match"] for h in everything) and not all(h["match"] for h in everything)
    matches = search(client, query, top_k=6, only_matches="true")
    assert body_ids(matches) == [h["product_id"] for h in everything if h["match"]]
    assert matches["only_matches"] is True and all(h["match"] for h in matches["results"])
    assert search(client, query, top_k=6)["only_matches"] is False


def body_ids(body) -> list[str]:
    return [h["product_id"] for h in body["results"]]


# --- POST /search/regions --------------------------------------------------------------------------------------


def test_regions_finds_both_products_of_a_two_product_photo(client):
    collage = jpeg_bytes(two_products("blue-cross", "yellow-disc"), quality=95)
    r = client.post("/search/regions", files=upload(collage), params={"top_k": 2, "max_regions": 4})
    assert r.status_code == 200, r.text
    body = r.json()
    assert 1 <= len(body["regions"]) <= 4 and body["max_regions"] == 4 and body["build_id"]
    found = {}
    for region in body["regions"]:
        x0, y0, x1, y1 = region["box"]
        assert 0 <= x0 < x1 <= 400 and 0 <= y0 < y1 <= 200
        assert 1 <= len(region["hits"]) <= 2
        top = region["hits"][0]
        assert region["score"] == pytest.approx(top["similarity"])
        assert top["image_url"].startswith("/images/") and "record" in top
        found.setdefault(top["product_id"], region["box"])
    assert {"blue-cross", "yellow-disc"} <= set(found), body["regions"]
    assert (
        (found["blue-cross"][0] + found["blue-cross"][2]) / 2
        < 200
        < (found["yellow-disc"][0] + found["yellow-disc"][2]) / 2
    )


def test_regions_take_a_filter(client):
    collage = jpeg_bytes(two_products("blue-cross", "yellow-disc"), quality=95)
    r = client.post("/search/regions", files=upload(collage), params={"where": "category=dairy"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["where"] == ["category=dairy"]
    shown = {h["product_id"] for region in body["regions"] for h in region["hits"]}
    assert shown <= {"green-bar", "blue-cross", "black-bar"}


@pytest.mark.parametrize(
    "params", [{"max_regions": 0}, {"max_regions": 51}, {"top_k": 0}, {"min_similarity": "2"}, {"where": "x=1"}]
)
def test_regions_refuse_bad_parameters(client, params):
    r = client.post("/search/regions", files=upload(photo("red-disc")), params=params)
    assert r.status_code == 422, r.text


def test_regions_refuse_what_is_not_a_photo(client):
    r = client.post("/search/regions", files={"image": ("notes.jpg", b"just text", "image/jpeg")})
    assert r.status_code == 415 and "not a supported image" in r.json()["detail"]


# --- GET /facets -----------------------------------------------------------------------------------------------


def test_facets_list_the_values_the_filter_controls_offer(client):
    r = client.get("/facets")
    assert r.status_code == 200, r.text
    facets = r.json()
    assert facets["products"] == 6 and facets["with_records"] == 5
    assert facets["category"] == [
        {"value": "dairy", "count": 3},
        {"value": "fruit", "count": 1},
        {"value": "snacks", "count": 1},
    ]
    assert {v["value"]: v["count"] for v in facets["brand"]} == {"Acme": 2, "Arla": 2, "Oatly": 1}
    assert {v["value"]: v["count"] for v in facets["tags"]} == {"organic": 2, "vegan": 2}
    assert facets["price"] == {"min": 2.5, "max": 30.0, "currencies": ["EUR"]}
    assert facets["fields"]["price"] == ["number"] and facets["fields"]["origin"] == ["text"]
    assert {"category", "brand", "tags", "product_id"} <= set(facets["fields"])
    assert facets["attributes"] == [
        {"field": "origin", "kind": "text", "values": [{"value": "DK", "count": 2}, {"value": "SE", "count": 2},
                                                        {"value": "ES", "count": 1}], "min": None, "max": None},
        {"field": "weight_g", "kind": "number", "values": None, "min": 150, "max": 1030},
    ]  # fmt: skip


def test_facets_offer_a_control_for_each_usable_further_column():
    from lookalike.records import ProductRecord
    from lookalike.server.facets import MAX_ATTRIBUTE_VALUES, catalog_facets

    records = {
        f"p{i}": ProductRecord(
            f"p{i}",
            attributes={"in_stock": i % 3 != 0, "sku": f"SKU-{i}", "colours": ("red", "blue")[: 1 + i % 2], "mixed": i}
            | ({"mixed": "n/a"} if i == 0 else {}),
        )
        for i in range(MAX_ATTRIBUTE_VALUES + 1)
    }
    records["gone"] = ProductRecord("gone", category="not indexed")
    facets = catalog_facets(records, [*records][:-1] + ["no-record"])
    assert facets["products"] == MAX_ATTRIBUTE_VALUES + 2 and facets["with_records"] == MAX_ATTRIBUTE_VALUES + 1
    assert facets["category"] == []  # the record of a product that is not indexed is left out
    by_field = {a["field"]: a for a in facets["attributes"]}
    assert set(by_field) == {"in_stock", "colours"}  # sku: too many values for a select; mixed: number and text
    assert by_field["in_stock"] == {"field": "in_stock", "kind": "bool", "values": [
        {"value": "true", "count": 34}, {"value": "false", "count": 17}]}  # fmt: skip
    assert by_field["colours"]["kind"] == "list"
    assert {v["value"]: v["count"] for v in by_field["colours"]["values"]} == {"red": 51, "blue": 25}


def test_records_written_after_the_build_reach_the_api_without_a_restart(make_settings, catalog):
    engine = ImageSearchEngine(make_settings())
    engine.build_index()
    with TestClient(create_app(engine=engine)) as client:
        assert client.get("/facets").json()["with_records"] == 0
        (catalog / "products.csv").write_text("product_id,name,category\nred-disc,Red Disc,snacks\n", encoding="utf-8")
        engine.update_records()  # what `lookalike records` does; no photo is read
        assert client.get("/facets").json()["category"] == [{"value": "snacks", "count": 1}]
        body = search(client, photo("red-disc"), where="category=snacks")
        assert [(h["product_id"], h["record"]["name"]) for h in body["results"]] == [("red-disc", "Red Disc")]


def test_facets_without_records(make_settings, catalog):
    engine = ImageSearchEngine(make_settings())
    engine.build_index()
    with TestClient(create_app(engine=engine)) as client:
        facets = client.get("/facets").json()
        assert facets["with_records"] == 0 and facets["category"] == [] and facets["price"] is None
        body = client.post("/search", files=upload(photo("red-disc"))).json()
        assert all(h["record"] is None for h in body["results"])
        # the standard fields are known without records (nothing matches them); anything else is refused
        assert (
            client.post("/search", files=upload(photo("red-disc")), params={"where": "brand=X"}).json()["results"] == []
        )
        assert "known fields" in detail_422(client.post("/search", files=upload(b"x"), params={"where": "colour=red"}))


def test_regions_go_through_the_search_gate_before_the_upload_is_read(served):
    client, _ = served
    gate = client.app.state.lookalike.gate
    consumed = []

    def body():
        consumed.append(True)
        yield photo("red-disc")

    places = [gate.reserve() for _ in range(gate.capacity)]  # every slot and queue place taken
    try:
        r = client.post("/search/regions", content=body(), headers=JPEG)
    finally:
        for place in places:
            place.release()
    assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
    assert consumed == []
    assert client.post("/search/regions", content=photo("red-disc"), headers=JPEG).status_code == 200
    text = client.get("/metrics").text
    assert 'route="/search/regions",status="503"' in text and 'route="/search/regions",status="200"' in text


def test_the_api_over_a_milvus_store(tmp_path):
    """The same HTTP answers when the index lives in Milvus (Lite, a local file): filters run natively there."""
    pytest.importorskip("pymilvus")
    from lookalike import Settings

    write_catalog(tmp_path / "catalog", PRODUCTS)
    (tmp_path / "catalog" / "products.csv").write_text(RECORDS_CSV, encoding="utf-8")
    settings = Settings(
        config_file=None,
        environ={},
        model_name="test_tiny",
        store="milvus",
        data_dir=tmp_path / "catalog",
        cache_dir=tmp_path / "cache",
        batch_size=4,
    )
    engine = ImageSearchEngine(settings)
    engine.build_index(progress=False)
    with TestClient(create_app(engine=engine)) as client:
        body = search(client, photo("yellow-disc"), top_k=10, where=["category=dairy", "price<20"])
        assert [(h["product_id"], h["record"]["name"]) for h in body["results"]] == [("green-bar", "Green Bar, large")]
        body = search(client, jpeg_bytes(two_products("blue-cross", "yellow-disc"), quality=95), box="210,10,390,190")
        assert body["results"][0]["product_id"] == "yellow-disc"
        bad = client.post("/search", files=upload(photo("red-disc")), params={"where": "x=1"})
        assert "known fields" in detail_422(bad)
        r = client.get("/products/red-disc/similar", params={"where": "tags~vegan"})
        assert [h["product_id"] for h in r.json()["results"]] == ["blue-cross"]
        assert client.get("/facets").json()["with_records"] == 5
