"""Product records, filters, query crops and region search through ``ImageSearchEngine``, on FAISS and on Milvus
Lite: records come back on every hit and survive a reload, update without reading an image, filtered results
equal an exact search over the matching products, and ``top_k`` is filled even when those products are far."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

import lookalike.engine
from conftest import product_image, write_catalog
from lookalike import ImageSearchEngine
from lookalike.filters import FilterError, field_kinds, parse_where
from lookalike.products import BoxError

pytest.importorskip("pymilvus")

# Eight products, look i for product i; the query is a held-out view of look 0 (red-disc).
CATALOG = {
    "red-disc": 3,
    "green-bar": 2,
    "blue-cross": 2,
    "yellow-disc": 3,
    "black-bar": 2,
    "grey-cross": 2,
    "orange-bar": 2,
    "brown-cross": 2,
}
RECORDS = """product_id,name,price,category,brand,tags,stock
red-disc,Red disc,2.5,dairy,Arla,organic|red,4
green-bar,Green bar,12,bakery,Oatly,vegan,0
blue-cross,Blue cross,20,bakery,Arla,,7
yellow-disc,Yellow disc,abc,dairy,Arla,,1
black-bar,Black bar,30,snacks,Kims,vegan|dark,2
grey-cross,Grey cross,8,snacks,Kims,,3
ghost,Ghost,1,snacks,Kims,,1
"""
# yellow-disc's line is bad (price), orange-bar and brown-cross have no line, ghost has no folder.


@pytest.fixture(params=["faiss", "milvus"])
def store(request) -> str:
    return request.param


@pytest.fixture
def shop(tmp_path):
    root = tmp_path / "shop"
    write_catalog(root, CATALOG)
    (root / "products.csv").write_text(RECORDS, encoding="utf-8")
    return root


@pytest.fixture
def settings_for(make_settings, store):
    return lambda root, cache: make_settings(store=store, tune=False, data_dir=root, cache_dir=cache)


@pytest.fixture
def engine(settings_for, shop, tmp_path):
    engine = ImageSearchEngine(settings_for(shop, tmp_path / "cache"))
    engine.report = engine.build_index(progress=False)
    return engine


@pytest.fixture
def query(tmp_path):
    path = tmp_path / "query.png"
    product_image(0, 77).save(path)
    return path


def test_records_are_read_at_build_reported_and_come_back_on_every_hit(engine, settings_for, shop, tmp_path, query):
    report = engine.report.records
    assert report["loaded"] == 6 and report["skipped_lines"] == 1
    assert any("products.csv:5: column price" in issue for issue in report["issues"])
    assert report["records_without_folder"] == ["ghost"]
    assert report["products_without_record"] == ["brown-cross", "orange-bar", "yellow-disc"]

    hits = engine.search(query, top_k=len(CATALOG))
    assert hits[0]["product_id"] == "red-disc"
    first = hits[0]["record"]
    assert first == {"product_id": "red-disc", "name": "Red disc", "price": 2.5, "category": "dairy",
                     "brand": "Arla", "tags": ["organic", "red"], "stock": 4}  # fmt: skip
    no_record = {h["product_id"] for h in hits if h["record"] is None}
    assert no_record == {"yellow-disc", "orange-bar", "brown-cross"}
    assert all("record" in h for h in engine.search(query, top_k=4, by_product=False))
    assert all("record" in h for h in engine.similar_to_product("red-disc", top_k=3))
    fields = engine.record_fields()
    assert fields["price"] == ["number"] and fields["tags"] == ["list"] and fields["stock"] == ["number"]
    assert "url" not in fields  # no record has one
    assert engine.get_statistics()["records"] == 6  # ghost's record is kept: its folder may come later

    reopened = ImageSearchEngine(settings_for(shop, tmp_path / "cache"))
    reopened.load_index()
    assert reopened.search(query, top_k=1)[0]["record"] == first
    assert set(reopened.records) == set(engine.records)


def test_products_without_a_records_file_have_record_none(settings_for, tmp_path, query):
    root = tmp_path / "plain"
    write_catalog(root, {"red-disc": 2, "green-bar": 2})
    engine = ImageSearchEngine(settings_for(root, tmp_path / "cache-plain"))
    report = engine.build_index(progress=False)
    assert report.records["source"] is None
    assert [h["record"] for h in engine.search(query, top_k=2)] == [None, None]
    assert engine.records == {}


class NoImages:
    """An extractor that fails the test if anything asks it for features."""

    device = "cpu"

    def extract(self, *args, **kwargs):
        raise AssertionError("a records update must not read any image")

    def describe(self):
        raise AssertionError("a records update needs no model")


def test_update_records_reads_no_image_and_a_running_engine_sees_it(
    engine, settings_for, shop, tmp_path, query, monkeypatch
):
    monkeypatch.setattr(lookalike.engine, "REFRESH_SECONDS", 0.0)
    before = engine.store.fetch(engine.store.ids(product_id="red-disc"), with_vectors=True)
    (shop / "products.csv").write_text("product_id,name,price,category\nred-disc,Red disc XL,3,frozen\n")
    updater = ImageSearchEngine(settings_for(shop, tmp_path / "cache"), extractor=NoImages())
    report = updater.update_records()
    assert report["loaded"] == 1 and len(report["products_without_record"]) == len(CATALOG) - 1

    hits = engine.search(query, top_k=2)  # the running engine picks the new table up on its next search
    assert hits[0]["record"] == {"product_id": "red-disc", "name": "Red disc XL", "price": 3.0, "category": "frozen"}
    assert hits[1]["record"] is None
    assert [h["product_id"] for h in engine.search(query, top_k=5, where="category=frozen")] == ["red-disc"]
    after = engine.store.fetch(list(before), with_vectors=True)
    for image_id, row in before.items():  # the vectors were kept as they were, not extracted again
        assert np.allclose(row["vector"], after[image_id]["vector"], atol=1e-6)


def test_records_and_their_fields_show_another_process_update_without_a_search(
    engine, settings_for, shop, tmp_path, monkeypatch
):
    # what a page's filter controls read (GET /facets) must not wait for the next search to see a records update
    monkeypatch.setattr(lookalike.engine, "REFRESH_SECONDS", 0.0)
    (shop / "products.csv").write_text("product_id,name,price,category\nred-disc,Red disc XL,3,frozen\n")
    ImageSearchEngine(settings_for(shop, tmp_path / "cache"), extractor=NoImages()).update_records()
    assert engine.records["red-disc"].category == "frozen" and set(engine.records) == {"red-disc"}
    assert engine.record_fields()["category"] == ["text"]


def test_add_and_remove_read_the_records_file_again(engine, shop, tmp_path, query):
    (shop / "products.csv").write_text(RECORDS + "purple-new,Purple,5,dairy,Arla,,9\n", encoding="utf-8")
    photo = tmp_path / "new.png"
    product_image(9, 1).save(photo)
    engine.add_images("purple-new", [photo])
    assert engine.records["purple-new"].name == "Purple"
    assert "purple-new" in {h["product_id"] for h in engine.search(query, top_k=9, where={"brand": "Arla"})}
    engine.remove_product("purple-new")
    assert "purple-new" not in {h["product_id"] for h in engine.search(query, top_k=9, where={"brand": "Arla"})}


WHERES = [
    {"category": "snacks"},  # far from the query (red): black-bar, grey-cross
    {"category": ["bakery", "snacks"], "price": {"gte": 10}},
    ["brand=Kims", "tags~vegan"],
    "price<=12",
    {"brand": {"ne": "Arla"}},  # products without a record pass "!="
    {"category": "nothing-like-this"},
]


def test_filtered_results_pass_fill_top_k_and_equal_an_exact_search_of_the_subset(
    engine, settings_for, shop, tmp_path, query
):
    records = engine.records
    for n, where in enumerate(WHERES):
        flt = parse_where(where, field_kinds(records))
        passing = sorted(p for p in CATALOG if flt.matches(records.get(p), p))
        for by_product, top_k in ((True, 3), (True, 8), (False, 4)):
            hits = engine.search(query, top_k=top_k, by_product=by_product, where=where)
            assert all(flt.matches(h["record"], h["product_id"]) for h in hits), (where, hits)
            available = len(passing) if by_product else sum(CATALOG[p] for p in passing)
            assert len(hits) == min(top_k, available), (where, by_product, hits)  # filled although far away
        if not passing:
            continue
        # The same search in an index of only the passing products: the same answers.
        subset = tmp_path / f"subset-{n}"
        for p in passing:
            shutil.copytree(shop / p, subset / p)
        alone = ImageSearchEngine(settings_for(subset, tmp_path / f"cache-{n}"))
        alone.build_index(progress=False)
        for by_product in (True, False):
            got = engine.search(query, top_k=5, by_product=by_product, where=where)
            want = alone.search(query, top_k=5, by_product=by_product)
            assert [h["product_id"] for h in got] == [h["product_id"] for h in want], where
            assert np.allclose([h["similarity"] for h in got], [h["similarity"] for h in want], atol=1e-5)


def test_filters_on_batches_vectors_and_more_like_this(engine, query):
    where = {"category": "bakery"}
    batch = engine.search_batch([query, query], top_k=5, where=where)
    assert all(sorted(h["product_id"] for h in hits) == ["blue-cross", "green-bar"] for hits in batch)
    similar = engine.similar_to_product("green-bar", top_k=5, where=where)
    assert [h["product_id"] for h in similar] == ["blue-cross"]
    assert [h["rank"] for h in engine.similar_to_product("red-disc", top_k=5, where="tags~vegan")] == [1, 2]


def test_bad_filters_name_the_known_fields(engine, query):
    with pytest.raises(FilterError, match="unknown field 'colour'; known fields: .*category.*stock"):
        engine.search(query, where={"colour": "red"})
    with pytest.raises(FilterError, match="price"):
        engine.search(query, where="price<=cheap")
    with pytest.raises(FilterError, match="unknown field"):
        engine.similar_to_product("red-disc", where="colour=red")
    with pytest.raises(FilterError):
        engine.search_regions(query, where=["colour=red"])


def test_box_searches_exactly_the_cropped_region(engine, tmp_path):
    canvas = Image.new("RGB", (300, 200), (128, 128, 128))
    canvas.paste(product_image(1, 50, size=120), (160, 40))  # green-bar, on the right
    path = tmp_path / "shelf.png"
    canvas.save(path)
    box = (160, 40, 280, 160)
    cropped = engine.search(canvas.crop(box), top_k=3)
    boxed = engine.search(path, top_k=3, box=box)
    assert [h["product_id"] for h in boxed] == [h["product_id"] for h in cropped]
    assert np.allclose([h["similarity"] for h in boxed], [h["similarity"] for h in cropped], atol=1e-6)
    assert boxed[0]["product_id"] == "green-bar"
    as_text = engine.search(path, top_k=3, box="160,40,280,160")
    assert np.allclose([h["similarity"] for h in as_text], [h["similarity"] for h in boxed], atol=1e-5)
    batch = engine.search_batch([path, path], top_k=3, boxes=[box, None])
    for got, want in zip(batch, (boxed, engine.search(path, top_k=3))):
        assert [h["product_id"] for h in got] == [h["product_id"] for h in want]
        assert np.allclose([h["similarity"] for h in got], [h["similarity"] for h in want], atol=1e-5)
    for bad in ((10, 10, 5, 50), (400, 10, 500, 50), "1,2,3", (0, 0, float("nan"), 5)):
        with pytest.raises(BoxError):
            engine.search(path, box=bad)
    with pytest.raises(ValueError, match="one box"):
        engine.search_batch([path, path], boxes=[box])


def test_search_regions_on_the_engine(engine, tmp_path):
    canvas = Image.new("RGB", (400, 200), (128, 128, 128))
    canvas.paste(product_image(0, 60, size=180), (10, 10))  # red-disc (dairy)
    canvas.paste(product_image(4, 60, size=180), (210, 10))  # black-bar (snacks)
    regions = engine.search_regions(canvas, top_k=2)
    assert {r.product_id for r in regions} >= {"red-disc", "black-bar"}
    assert all(len(r.hits) <= 2 and "record" in r.hits[0] for r in regions)
    snacks = engine.search_regions(canvas, top_k=2, where={"category": "snacks"})
    assert snacks and {h["product_id"] for r in snacks for h in r.hits} <= {"black-bar", "grey-cross"}
    assert "black-bar" in {r.product_id for r in snacks}


def test_an_unusable_records_file_never_stops_a_build_and_keeps_the_previous_records(engine, shop, query):
    (shop / "products.jsonl").write_text('{"product_id": "red-disc", "name": "Other"}\n')  # two files: which one?
    report = engine.build_index(progress=False)
    assert "both exist" in report.records["error"] and report.images == sum(CATALOG.values())
    assert engine.search(query, top_k=1)[0]["record"]["name"] == "Red disc"  # the previous table, kept
    (shop / "products.csv").unlink()
    engine.build_index(progress=False)
    assert engine.search(query, top_k=1)[0]["record"] == {"product_id": "red-disc", "name": "Other"}
