"""Export: Parquet and npy round trips; exported vectors searched with plain numpy give the engine's hits."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lookalike import ImageSearchEngine
from lookalike.export import ExportError, export, export_index, read_export
from lookalike.records import ProductRecord


@pytest.fixture
def engine(make_settings, catalog):
    eng = ImageSearchEngine(make_settings())
    eng.build_index()
    return eng


@pytest.mark.parametrize("fmt", ["parquet", "npy"])
def test_round_trip_searches_the_same(engine, tmp_path, fmt):
    out = tmp_path / ("export.parquet" if fmt == "parquet" else "export-npy")
    export_index(engine, out, format=fmt)
    got = read_export(out)
    store = engine.store
    stored = store.fetch(store.ids())
    assert sorted(got.image_ids) == sorted(stored)
    assert got.vectors.dtype == np.float32 and got.vectors.shape == (len(stored), engine.extractor.dim)
    for k, image_id in enumerate(got.image_ids):
        assert got.product_ids[k] == stored[image_id]["product_id"]
        assert got.paths[k] == stored[image_id]["path"]
    assert got.info["count"] == len(got.image_ids) and got.info["metric"] == "cosine"
    assert got.info["model"]["model_name"] == "test_tiny"
    # every exported vector as a query: numpy's exact inner-product ranking == the engine's image ranking
    queries = got.vectors[::2]
    expected = engine.search_vectors(queries, top_k=4, by_product=False)
    scores = queries @ got.vectors.T
    for q, hits in enumerate(expected):
        order = np.argsort(-scores[q], kind="stable")[:4]
        np.testing.assert_allclose(scores[q][order], [h["similarity"] for h in hits], atol=1e-5)
        for k, h in enumerate(hits):
            tied = np.sum(np.abs(scores[q] - h["similarity"]) < 1e-6) > 1
            assert tied or got.image_ids[order[k]] == h["image_id"]
    if fmt == "npy":
        assert np.load(out / "vectors.npy", allow_pickle=False).shape == got.vectors.shape
        assert set(json.loads((out / "items.json").read_text(encoding="utf-8"))) >= {"items", "records", "dim", "count"}


class DictStore:
    """A store seen only through the protocol's reading half (what the Milvus and FAISS stores both offer)."""

    def __init__(self, rows):
        self.rows = rows

    def ids(self):
        return list(self.rows)

    def fetch(self, ids, *, with_vectors=False):
        out = {}
        for i in ids:
            if i in self.rows:
                fields = {k: v for k, v in self.rows[i].items() if with_vectors or k != "vector"}
                out[i] = fields
        return out


def test_export_from_a_store_with_records(tmp_path):
    rng = np.random.default_rng(3)
    rows = {
        f"id{i}": {"product_id": ["b", "a"][i % 2], "path": f"p/{i}.jpg", "format": "JPEG", "vector": rng.random(5)}
        for i in range(7)
    }
    records = {"a": ProductRecord("a", name="Ä", price=2.5, tags=("x",), attributes={"stock": 3})}
    for fmt, name in (("parquet", "s.parquet"), ("npy", "s-npy")):
        export(DictStore(rows), tmp_path / name, format=fmt, records=records)
        got = read_export(tmp_path / name)
        assert got.product_ids == sorted(got.product_ids)  # ordered by product, then path
        for k, image_id in enumerate(got.image_ids):
            np.testing.assert_allclose(got.vectors[k], rows[image_id]["vector"].astype(np.float32))
        assert got.records == {"a": {"product_id": "a", "name": "Ä", "price": 2.5, "tags": ["x"], "stock": 3}}
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "s.parquet").to_pydict()
    assert table["price"][table["product_id"].index("a")] == 2.5 and table["name"][0] in (None, "Ä")


def test_errors_name_the_path(engine, tmp_path):
    out = tmp_path / "x.parquet"
    export_index(engine, out)
    with pytest.raises(ExportError, match=f"{out} already exists"):
        export_index(engine, out)
    export_index(engine, out, overwrite=True)
    with pytest.raises(ExportError, match="unknown export format 'csv'; available: parquet, npy"):
        export_index(engine, tmp_path / "y", format="csv")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(ExportError, match="bad.parquet: not a readable lookalike export"):
        read_export(tmp_path / "bad.parquet")
    assert not list(tmp_path.glob(".*.tmp"))
