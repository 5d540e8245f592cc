"""One contract for every VectorStore backend (lookalike.stores.base), run unchanged against each of them.

A backend's test module subclasses :class:`StoreContract` and provides one fixture, ``make_store``::

    class TestFaissStore(StoreContract):
        @pytest.fixture(scope="class")
        @classmethod
        def make_store(cls, tmp_path_factory):
            root = tmp_path_factory.mktemp("faiss")
            return lambda name, *, metric="cosine", dim=DIM: FaissStore(root / name, metric=metric, dim=dim)

``make_store(name, *, metric="cosine", dim=DIM)`` opens the store called ``name`` (a valid identifier, unique per
test), creating it when it does not exist yet; ``dim=None`` opens an existing one and reads the dimension from it.
Two calls with the same name are two instances on the same location (a reopen / another client). Every store a
test opens is closed after it. The contract uses no backend-specific filter syntax (``where``). A manifest is
saved with ``set_manifest`` followed by ``commit()`` where the store has one (FAISS saves it with the next write).
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from lookalike.filters import parse_where
from lookalike.stores.base import StoreFilter, StoreHit, StoreInfo, VectorStore

DIM = 16
ODD_PRODUCTS = ['a"b', "a\\b", 'a\\"b', "it's", "é-中-😀", "x' or 1==1 or '", "space inside", "end\\"]


def clustered(n: int, products: int, seed: int, dim: int = DIM) -> tuple[list[str], np.ndarray, list[dict]]:
    """``n`` seeded vectors around ``products`` centres; ids ``img<i>``, products ``p<i % products>``."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(products, dim))
    owner = np.arange(n) % products
    vectors = (centres[owner] + 0.35 * rng.normal(size=(n, dim))).astype(np.float32)
    ids = [f"img{i:04d}" for i in range(n)]
    fields = [{"product_id": f"p{o:03d}", "path": f"p{o:03d}/{i}.jpg", "format": "JPEG"} for i, o in enumerate(owner)]
    return ids, vectors, fields


def save_manifest(store: VectorStore, manifest: dict) -> None:
    """set_manifest, then commit where the backend saves it with the next write (FAISS) rather than at once."""
    store.set_manifest(manifest)
    commit = getattr(store, "commit", None)
    if commit is not None:
        commit()


def holds(got: dict | None, manifest: dict) -> bool:
    """The stored manifest has every key given, with its value (a backend may add keys of its own: FAISS does)."""
    return got is not None and {k: got.get(k) for k in manifest} == manifest


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def brute_force(vectors: np.ndarray, queries: np.ndarray, metric: str) -> np.ndarray:
    """Similarity of every query to every vector, as the stores report it."""
    if metric == "cosine":
        return unit(queries) @ unit(vectors).T
    distances = np.linalg.norm(queries[:, None, :] - vectors[None, :, :], axis=-1)
    return 1.0 / (1.0 + distances)


class StoreContract:
    """Subclasses provide the ``make_store`` fixture described in the module docstring."""

    @pytest.fixture
    def open_store(self, make_store, request):
        opened: list[VectorStore] = []
        base = "c_" + re.sub(r"\W", "_", request.node.name)[:60]

        def open_(suffix: str = "", **kw) -> VectorStore:
            store = make_store(base + suffix, **kw)
            opened.append(store)
            return store

        yield open_
        for store in reversed(opened):
            store.close()

    @pytest.fixture
    def filled(self, open_store):
        ids, vectors, fields = clustered(240, 30, seed=7)
        store = open_store()
        store.upsert(ids, vectors, fields)
        return store, ids, vectors, fields

    # --- search ---------------------------------------------------------------------------------------------
    @pytest.mark.parametrize("metric", ["cosine", "l2"])
    def test_search_matches_brute_force(self, open_store, metric):
        ids, vectors, fields = clustered(240, 30, seed=1)
        store = open_store(metric=metric)
        assert isinstance(store, VectorStore)
        store.upsert(ids, vectors, fields)
        queries = np.random.default_rng(2).normal(size=(5, DIM)).astype(np.float32)
        truth = brute_force(vectors, queries, metric)
        results = store.search(queries, 10)
        assert len(results) == 5
        for q, hits in enumerate(results):
            assert len(hits) == 10 and all(isinstance(h, StoreHit) for h in hits)
            expected = np.sort(truth[q])[::-1][:10]
            got = np.array([h.score for h in hits])
            np.testing.assert_allclose(got, expected, atol=1e-4)  # same scores, best first (ties in any order)
            for hit in hits:
                row = ids.index(hit.image_id)
                assert hit.score == pytest.approx(truth[q, row], abs=1e-4)
                assert hit["product_id"] == hit.product_id == fields[row]["product_id"]
                assert hit.path == fields[row]["path"]
                if metric == "l2":
                    assert hit.distance == pytest.approx(float(np.linalg.norm(queries[q] - vectors[row])), rel=1e-3)

    @pytest.mark.parametrize("group_size", [1, 3])
    def test_grouped_search_gives_best_products_with_their_best_images(self, filled, group_size):
        store, ids, vectors, fields = filled
        query = np.random.default_rng(3).normal(size=(1, DIM)).astype(np.float32)
        scores = brute_force(vectors, query, "cosine")[0]
        best: dict[str, list[float]] = {}
        for row in np.argsort(-scores):
            best.setdefault(fields[row]["product_id"], []).append(float(scores[row]))
        expected_products = list(best)[:4]
        hits = store.search(query, 4, group_by_product=True, group_size=group_size)[0]
        products = list(dict.fromkeys(h.product_id for h in hits))
        assert products == expected_products
        for product in products:
            got = [h.score for h in hits if h.product_id == product]
            np.testing.assert_allclose(got, best[product][:group_size], atol=1e-4)
        # product by product: each product's images are contiguous
        runs = [h.product_id for i, h in enumerate(hits) if i == 0 or hits[i - 1].product_id != h.product_id]
        assert runs == products

    # --- filters and records -------------------------------------------------------------------------------
    @pytest.mark.parametrize("group", [False, True])
    def test_filtered_search_exact_and_fills_k(self, filled, group):
        store, ids, vectors, fields = filled
        records = {f"p{i:03d}": {"product_id": f"p{i:03d}", "price": i, "tags": ["odd"] if i % 2 else []}
                   for i in range(30)}  # fmt: skip
        store.set_records(records)
        store.commit()
        query = vectors[:1] + 0.01  # next to p000's images: the filter's products are elsewhere
        flt = parse_where(["price>=21", "tags~odd"])  # p021 p023 ... p029: five products, 8 images each
        passing = frozenset(p for p in records if flt.matches(records[p], p))
        images = sum(1 for f in fields if f["product_id"] in passing)
        where = StoreFilter(passing, flt.to_milvus_expr(), images)
        rows = [i for i, f in enumerate(fields) if f["product_id"] in passing]
        truth = brute_force(vectors[rows], query, "cosine")[0]
        if not group:
            hits = store.search(query, 12, where=where)[0]
            assert len(hits) == 12 and all(h.product_id in passing for h in hits)
            np.testing.assert_allclose([h.score for h in hits], np.sort(truth)[::-1][:12], atol=1e-4)
            assert len(store.search(query, 500, where=where)[0]) == images  # everything that passes, no more
        else:
            hits = store.search(query, 10, where=where, group_by_product=True, group_size=2)[0]
            assert {h.product_id for h in hits} == passing, [h.product_id for h in hits]  # all five, of 10 asked
        assert store.search(query, 5, where=StoreFilter(frozenset(), "", 0)) == [[]]

    def test_records_saved_with_the_index(self, filled, open_store):
        store, ids, vectors, fields = filled
        assert dict(store.records()) == {}
        table = {"p001": {"product_id": "p001", "name": "One", "price": 1.5}, "ghost": {"product_id": "ghost"}}
        store.set_records(table)
        store.commit()
        before = store.fetch(ids[:10], with_vectors=True)
        again = open_store()  # another instance on the same location
        assert {p: dict(r) for p, r in again.records().items()} == table
        store.set_records({"p001": {"product_id": "p001", "name": "Uno", "category": "x"}})
        store.commit()
        again.refresh()
        assert again.records()["p001"]["name"] == "Uno" and "ghost" not in again.records()
        after = again.fetch(ids[:10], with_vectors=True)
        for image_id in before:
            np.testing.assert_allclose(before[image_id]["vector"], after[image_id]["vector"], atol=1e-6)
        flt = parse_where({"category": "x"})
        hits = again.search(vectors[:1], 3, where=StoreFilter(frozenset({"p001"}), flt.to_milvus_expr(), 8))[0]
        assert {h.product_id for h in hits} == {"p001"}
        third = open_store()  # a fresh instance adds an image: the row gets its product's saved record
        third.upsert(["new1"], vectors[:1], [{"product_id": "p001", "path": "p001/new.jpg", "format": "JPEG"}])
        hits = third.search(vectors[:1], 20, where=StoreFilter(frozenset({"p001"}), flt.to_milvus_expr(), 9))[0]
        assert "new1" in {h.image_id for h in hits} and len(hits) == 9

    def test_empty_store_and_k_larger_than_count(self, open_store):
        store = open_store()
        assert store.count() == 0 and store.ids() == [] and store.product_counts() == {}
        assert store.search(np.ones((2, DIM), np.float32), 5) == [[], []]
        ids, vectors, fields = clustered(6, 2, seed=4)
        store.upsert(ids, vectors, fields)
        assert len(store.search(vectors[:1], 50)[0]) == 6
        grouped = store.search(vectors[:1], 10, group_by_product=True, group_size=10)[0]
        assert sorted(h.image_id for h in grouped) == sorted(ids)

    # --- writing --------------------------------------------------------------------------------------------
    def test_delete_by_ids_and_by_product(self, filled):
        store, ids, vectors, fields = filled
        assert store.delete(["img0000", "img0001", "no-such-id"]) == 2
        assert store.count() == 238
        assert store.fetch(["img0000", "img0001"]) == {}
        assert store.delete(["img0000"]) == 0
        doomed = set(store.ids(product_id="p005"))
        assert len(doomed) == 8
        assert store.delete(product_id="p005") == 8
        assert store.count() == 230 and "p005" not in store.product_counts()
        assert store.delete(product_id="p005") == 0
        hits = store.search(vectors[[0, 1, 5, 35]], 20)
        seen = {h.image_id for row in hits for h in row}
        assert not seen & (doomed | {"img0000", "img0001"})

    def test_upsert_replaces_an_id(self, filled):
        store, ids, vectors, fields = filled
        new = -vectors[10:11]
        store.upsert(["img0010"], new, [{"product_id": "moved", "path": "moved/10.jpg", "format": "PNG"}])
        assert store.count() == 240
        got = store.fetch(["img0010"], with_vectors=True)["img0010"]
        assert (got["product_id"], got["path"], got["format"]) == ("moved", "moved/10.jpg", "PNG")
        np.testing.assert_allclose(unit(got["vector"]), unit(new[0]), atol=1e-5)
        assert store.product_counts()["moved"] == 1 and store.product_counts()["p010"] == 7
        top = store.search(new, 1)[0][0]
        assert (top.image_id, top.product_id) == ("img0010", "moved")

    def test_replace_all_leaves_exactly_the_new_images(self, filled):
        store, *_ = filled
        ids, vectors, fields = clustered(12, 3, seed=9)
        ids = [f"new{i}" for i in range(12)]
        store.replace_all(ids, vectors, fields)
        assert store.count() == 12 and sorted(store.ids()) == sorted(ids)
        assert store.product_counts() == {"p000": 4, "p001": 4, "p002": 4}
        assert store.search(vectors[:1], 1)[0][0].image_id == "new0"

    # --- reading --------------------------------------------------------------------------------------------
    def test_fetch_with_and_without_vectors_and_extra_fields(self, open_store):
        ids, vectors, fields = clustered(5, 2, seed=5)
        fields[0] = {**fields[0], "title": "Blue mug é", "price": 12.5}
        store = open_store()
        store.upsert(ids, vectors, fields)
        plain = store.fetch([ids[0], ids[1], "unknown"])
        assert set(plain) == {ids[0], ids[1]}
        assert "vector" not in plain[ids[0]]
        assert plain[ids[0]]["product_id"] == fields[0]["product_id"] and plain[ids[0]]["format"] == "JPEG"
        assert plain[ids[0]]["title"] == "Blue mug é" and plain[ids[0]]["price"] == 12.5
        full = store.fetch(ids, with_vectors=True)
        for i, image_id in enumerate(ids):
            np.testing.assert_allclose(unit(full[image_id]["vector"]), unit(vectors[i]), atol=1e-5)
        assert store.fetch([]) == {}

    def test_count_ids_and_product_counts(self, filled):
        store, ids, vectors, fields = filled
        assert store.count() == 240
        assert sorted(store.ids()) == sorted(ids)
        assert store.product_counts() == {f"p{i:03d}": 8 for i in range(30)}
        assert sorted(store.ids(product_id="p002")) == [ids[i] for i in range(2, 240, 30)]
        info = store.describe()
        assert isinstance(info, StoreInfo)
        assert (info.count, info.products, info.dim, info.metric) == (240, 30, DIM, "cosine")

    # --- durability and identity ----------------------------------------------------------------------------
    def test_another_instance_sees_every_write(self, open_store):
        ids, vectors, fields = clustered(40, 5, seed=6)
        first = open_store()
        first.upsert(ids, vectors, fields)
        save_manifest(first, {"model": "m1"})
        second = open_store(dim=None)
        assert second.count() == 40 and holds(second.manifest(), {"model": "m1"})
        assert second.search(vectors[3:4], 1)[0][0].image_id == ids[3]
        first.refresh()
        second.delete(product_id="p001")
        assert first.refresh() is True
        assert first.count() == 32 and "p001" not in first.product_counts()
        assert first.refresh() is False

    def test_manifest_round_trip(self, open_store):
        store = open_store()
        assert store.manifest() is None
        ids, vectors, fields = clustered(3, 1, seed=3)
        store.upsert(ids, vectors, fields)
        manifest = {"model": "efficientnet_lite0", "metric": "cosine", "dim": DIM, "name": "é 中 \"q\" \\",
                    "tuning": {"whiten": [[0.5] * 64] * 64}, "big": "x" * 70_000}  # fmt: skip
        save_manifest(store, manifest)
        assert holds(store.manifest(), manifest)
        save_manifest(store, {"model": "other"})
        assert holds(store.manifest(), {"model": "other"}) and "big" not in store.manifest()
        assert holds(open_store(dim=None).manifest(), {"model": "other"})

    def test_odd_product_ids(self, open_store):
        store = open_store()
        vectors = np.random.default_rng(8).normal(size=(2 * len(ODD_PRODUCTS), DIM)).astype(np.float32)
        ids = [f"odd{i}" for i in range(len(vectors))]
        fields = [{"product_id": ODD_PRODUCTS[i // 2], "path": f"{ODD_PRODUCTS[i // 2]}/{i}.jpg", "format": "JPEG"}
                  for i in range(len(vectors))]  # fmt: skip
        store.upsert(ids, vectors, fields)
        assert store.product_counts() == {p: 2 for p in ODD_PRODUCTS}
        for product in ODD_PRODUCTS:
            assert len(store.ids(product_id=product)) == 2
        assert store.delete(product_id='a"b') == 2
        assert store.delete(product_id="x' or 1==1 or '") == 2
        assert store.product_counts() == {p: 2 for p in ODD_PRODUCTS if p not in ('a"b', "x' or 1==1 or '")}
        hits = store.search(vectors[8:9], 3, group_by_product=True, group_size=2)[0]
        assert hits[0].product_id == ODD_PRODUCTS[4] and hits[0].image_id == "odd8"

    def test_odd_image_ids(self, open_store):
        store = open_store()
        odd = ['q"uote', "back\\slash", "é中😀", "with space", "x' or 1==1 or '"]
        vectors = np.random.default_rng(10).normal(size=(len(odd), DIM)).astype(np.float32)
        store.upsert(odd, vectors, [{"product_id": "p", "path": f"{i}.jpg", "format": "JPEG"} for i in range(5)])
        assert set(store.fetch(odd)) == set(odd)
        assert store.search(vectors[2:3], 1)[0][0].image_id == "é中😀"
        assert store.delete(['q"uote', "back\\slash"]) == 2
        assert sorted(store.ids()) == sorted(odd[2:])

    # --- errors ---------------------------------------------------------------------------------------------
    def test_errors(self, filled, open_store):
        store, ids, vectors, fields = filled
        with pytest.raises(ValueError, match="dimension"):
            store.upsert(["x"], np.ones((1, DIM + 1), np.float32), [fields[0]])
        with pytest.raises(ValueError, match="dimension"):
            store.search(np.ones((1, DIM + 1), np.float32), 3)
        with pytest.raises(ValueError):
            store.upsert(["x", "y"], vectors[:1], fields[:1])
        with pytest.raises(ValueError, match="format"):
            store.upsert(["x"], vectors[:1], [{"product_id": "p", "path": "x.jpg"}])
        assert store.count() == 240  # nothing half-written

    def test_the_stored_metric_and_dimension_win_until_a_rebuild(self, filled, open_store):
        """An existing store is the truth (the engine adopts what its manifest recorded); replace_all builds anew."""
        store, ids, vectors, fields = filled
        other = open_store(metric="l2", dim=None)
        info = other.describe()
        assert (info.metric, info.dim, info.count) == ("cosine", DIM, 240)
        hit = other.search(vectors[:1], 1)[0][0]
        assert hit.image_id == ids[0] and hit.score == pytest.approx(1.0, abs=1e-4) and hit.distance is None
        wide = np.random.default_rng(14).normal(size=(4, DIM * 2)).astype(np.float32)
        other.replace_all(["w0", "w1", "w2", "w3"], wide, fields[:4])
        info = other.describe()
        assert (info.metric, info.dim, info.count) == ("l2", DIM * 2, 4)
        hit = other.search(wide[2:3] + 0.5, 1)[0][0]
        assert hit.image_id == "w2" and hit.distance == pytest.approx(0.5 * np.sqrt(2 * DIM), rel=1e-3)

    def test_a_new_store_takes_its_dimension_from_the_first_write(self, open_store):
        store = open_store(dim=None)
        assert store.count() == 0 and store.search(np.ones((1, 5), np.float32), 3) == [[]]
        ids, vectors, fields = clustered(5, 1, seed=15, dim=5)
        store.upsert(ids, vectors, fields)
        assert store.describe().dim == 5 and store.search(vectors[:1], 1)[0][0].image_id == ids[0]
        with pytest.raises(ValueError, match="dimension"):
            store.upsert(["x"], np.ones((1, 6), np.float32), fields[:1])
