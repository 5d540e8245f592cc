"""The engine over each store, unchanged: the same calls and answers on FAISS and on Milvus Lite.

The store-level contract (tests/store_contract.py) checks each backend against the protocol; this checks what a
user sees through ``ImageSearchEngine`` (build, search, grouping, add, remove, reload in a new engine, refusing
an index of another model, errors) with ``store: faiss`` and ``store: milvus``.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import PRODUCTS, product_image
from lookalike import ImageSearchEngine, IndexMismatchError, UnknownProductError
from lookalike.ids import InvalidProductIdError

pytest.importorskip("pymilvus")

STORES = ["faiss", "milvus"]


@pytest.fixture(params=STORES)
def store_settings(request, make_settings, catalog):
    return lambda **kw: make_settings(store=request.param, tune=False, **kw)


@pytest.fixture
def query(tmp_path):
    path = tmp_path / "query.jpg"
    product_image(0, 77).save(path)  # look 0 = red-disc, a variant the catalog does not hold
    return path


def test_build_search_and_group(store_settings, query):
    engine = ImageSearchEngine(store_settings())
    report = engine.build_index(progress=False)
    assert (report.images, report.products) == (sum(PRODUCTS.values()), len(PRODUCTS))
    products = engine.search(query, top_k=3)
    assert products[0]["product_id"] == "red-disc"
    assert len({h["product_id"] for h in products}) == 3  # one entry per product
    images = engine.search(query, top_k=3, by_product=False)
    assert [h["product_id"] for h in images] == ["red-disc"] * 3  # its three photos are the nearest images
    sims = [h["similarity"] for h in images]
    assert sims == sorted(sims, reverse=True)
    stats = engine.get_statistics()
    assert (stats["images"], stats["products"]) == (report.images, report.products)


def test_same_answers_on_both_stores(make_settings, catalog, query, tmp_path):
    answers = {}
    for store in STORES:
        engine = ImageSearchEngine(make_settings(store=store, tune=False, cache_dir=tmp_path / store))
        engine.build_index(progress=False)
        answers[store] = [(h["product_id"], h["image_id"], round(h["similarity"], 4)) for h in engine.search(query, 4)]
    assert answers["faiss"] == answers["milvus"]


def test_add_remove_and_reload(store_settings, tmp_path, query):
    engine = ImageSearchEngine(store_settings())
    engine.build_index(progress=False)
    photo = tmp_path / "new-photo.jpg"
    product_image(5, 3).save(photo)
    added = engine.add_images("grey-cross", [photo])
    assert added["added"] == 1 and len(added["image_ids"]) == 1
    probe = tmp_path / "probe.jpg"
    product_image(5, 3).save(probe)
    assert engine.search(probe, top_k=1)[0]["product_id"] == "grey-cross"

    reopened = ImageSearchEngine(store_settings())  # another engine: what was acknowledged is there
    reopened.load_index()
    assert reopened.search(probe, top_k=1)[0]["product_id"] == "grey-cross"
    assert reopened.get_statistics()["images"] == sum(PRODUCTS.values()) + 1

    removed = reopened.remove_product("red-disc")
    assert removed["removed"] == PRODUCTS["red-disc"]
    assert "red-disc" not in {h["product_id"] for h in reopened.search(query, top_k=5)}
    again = ImageSearchEngine(store_settings())
    again.load_index()
    assert "red-disc" not in {h["product_id"] for h in again.search(query, top_k=5)}


def test_refuses_an_index_of_another_model(store_settings):
    ImageSearchEngine(store_settings()).build_index(progress=False)
    with pytest.raises(IndexMismatchError, match="pooling"):
        ImageSearchEngine(store_settings(pooling="center" if store_settings().pooling == "avg" else "avg")).load_index()


def test_errors(store_settings, tmp_path):
    engine = ImageSearchEngine(store_settings())
    engine.build_index(progress=False)
    with pytest.raises(UnknownProductError):
        engine.remove_product("never-there")
    photo = tmp_path / "p.jpg"
    product_image(1, 9).save(photo)
    with pytest.raises(InvalidProductIdError):
        engine.add_images("\u202eevil", [photo])
    with pytest.raises(ValueError, match="top_k"):
        engine.search(photo, top_k=0)
    assert engine.get_statistics()["images"] == sum(PRODUCTS.values())  # nothing changed


def test_vectors_survive_the_round_trip(store_settings, query):
    engine = ImageSearchEngine(store_settings())
    engine.build_index(progress=False)
    first = engine.search(query, top_k=2, by_product=False)
    reopened = ImageSearchEngine(store_settings())
    reopened.load_index()
    second = reopened.search(query, top_k=2, by_product=False)
    assert [h["image_id"] for h in first] == [h["image_id"] for h in second]
    assert np.allclose([h["similarity"] for h in first], [h["similarity"] for h in second], atol=1e-5)
