"""FaissStore against the VectorStore protocol: seeded vectors, brute-force references, files on disk."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lookalike.ids import image_id_for
from lookalike.manifest import IndexMismatchError, check_model
from lookalike.ranking import l2_normalize
from lookalike.stores import IndexFileError, StoreError, StoreHit, VectorStore, open_store
from lookalike.stores.faiss import FaissStore

DIM = 16


def rows(n: int, products: int = 5, seed: int = 0, start: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(products, DIM)).astype(np.float32)
    labels = [f"p{(start + i) % products}" for i in range(n)]
    vectors = np.stack([centres[int(p[1:])] + 0.3 * rng.normal(size=DIM) for p in labels]).astype(np.float32)
    paths = [f"{p}/img-{start + i}.jpg" for i, p in enumerate(labels)]
    ids = [image_id_for(p) for p in paths]
    fields = [{"product_id": p, "path": path, "format": "JPEG"} for p, path in zip(labels, paths)]
    return ids, vectors, fields


def new_store(tmp_path, metric="cosine", **kw) -> FaissStore:
    return FaissStore(tmp_path / "index.faiss", tmp_path / "metadata.json", metric=metric, **kw)


def filled(tmp_path, n=40, metric="cosine"):
    store = new_store(tmp_path, metric)
    ids, vectors, fields = rows(n)
    store.set_manifest({"model": {"model_name": "m"}, "settings": {"x": 1}, "data_dir": "/abs"})
    store.replace_all(ids, vectors, fields)
    return store, ids, vectors, fields


def test_faiss_store_satisfies_the_protocol(tmp_path):
    assert isinstance(new_store(tmp_path), VectorStore)


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_search_matches_brute_force(tmp_path, metric):
    store, ids, vectors, _ = filled(tmp_path, metric=metric)
    queries = rows(3, seed=9)[1]
    if metric == "cosine":
        expect = l2_normalize(queries) @ l2_normalize(vectors).T
        order = np.argsort(-expect, axis=1)
    else:
        expect = np.linalg.norm(queries[:, None] - vectors[None], axis=2)
        order = np.argsort(expect, axis=1)
    for q, hits in enumerate(store.search(queries, 10)):
        assert all(isinstance(h, StoreHit) for h in hits)
        assert [h.image_id for h in hits] == [ids[i] for i in order[q, :10]]
        got = [h.distance if metric == "l2" else h.score for h in hits]
        np.testing.assert_allclose(got, expect[q, order[q, :10]], rtol=1e-4, atol=1e-5)
        assert hits[0]["product_id"] == hits[0].product_id  # reads like the seed's dicts
        if metric == "l2":
            assert hits[0].score == pytest.approx(1 / (1 + hits[0].distance))


def test_grouped_search_gives_k_products_with_their_best_images(tmp_path):
    store, ids, vectors, fields = filled(tmp_path)
    hits = store.search(vectors[:1], 3, group_by_product=True, group_size=2)[0]
    products = list(dict.fromkeys(h.product_id for h in hits))
    assert len(products) == 3 and len(hits) == 6
    assert products[0] == fields[0]["product_id"]
    flat = store.search(vectors[:1], len(ids))[0]
    for p in products:  # each group holds that product's best images, best first
        assert [h.image_id for h in hits if h.product_id == p] == [h.image_id for h in flat if h.product_id == p][:2]


def test_delete_by_ids_and_by_product_keeps_every_other_id(tmp_path):
    store, ids, vectors, fields = filled(tmp_path)
    assert store.delete([ids[3], "no-such-id"]) == 1
    assert store.delete(product_id="p1") == sum(f["product_id"] == "p1" for f in fields)
    left = [i for i, f in zip(ids, fields) if i != ids[3] and f["product_id"] != "p1"]
    assert sorted(store.ids()) == sorted(left) and store.count() == len(left)
    assert "p1" not in store.product_counts()
    got = store.fetch(left, with_vectors=True)
    for i in left:  # no renumbering: every remaining id still has its own vector and fields
        row = ids.index(i)
        np.testing.assert_allclose(got[i]["vector"], l2_normalize(vectors[row : row + 1])[0], atol=1e-5)
        assert got[i]["path"] == fields[row]["path"]
    assert store.search(vectors[3:4], 1)[0][0].image_id != ids[3]
    assert store.delete(product_id="nobody") == 0


def test_upsert_adds_and_replaces_by_id(tmp_path):
    store, ids, vectors, fields = filled(tmp_path, n=10)
    new_ids, new_vectors, new_fields = rows(3, seed=5, start=100)
    store.upsert(new_ids, new_vectors, new_fields)
    assert store.count() == 13
    store.upsert([ids[0]], new_vectors[:1], [dict(fields[0], format="PNG")])  # same id: replaced, not added
    assert store.count() == 13
    assert store.fetch([ids[0]])[ids[0]]["format"] == "PNG"
    assert store.search(new_vectors[:1], 1)[0][0].image_id in {ids[0], new_ids[0]}


def test_reload_in_a_new_instance_and_manifest_round_trip(tmp_path):
    store, ids, vectors, fields = filled(tmp_path)
    store.delete(product_id="p2")
    again = new_store(tmp_path)
    assert sorted(again.ids()) == sorted(store.ids())
    assert again.product_counts() == store.product_counts()
    manifest = again.manifest()
    assert manifest["settings"] == {"x": 1} and manifest["data_dir"] == "/abs"
    assert manifest["build_id"] == store.manifest()["build_id"]
    assert manifest["counts"]["images"] == store.count()
    q = vectors[:2]
    found = [[h.image_id for h in hs] for hs in again.search(q, 5)]
    assert found == [[h.image_id for h in hs] for hs in store.search(q, 5)]
    on_disk = json.loads((tmp_path / "metadata.json").read_text(encoding="utf-8"))
    assert on_disk["images"]["image_id"] == again.ids()


def test_an_open_store_sees_another_instances_commit_after_refresh(tmp_path):
    store, *_ = filled(tmp_path)
    reader = new_store(tmp_path)
    assert reader.refresh() is False
    new_ids, new_vectors, new_fields = rows(2, seed=3, start=50)
    store.upsert(new_ids, new_vectors, new_fields)
    assert new_ids[0] not in reader.fetch(new_ids)
    assert reader.refresh() is True
    assert set(reader.fetch(new_ids)) == set(new_ids)


def test_a_failed_save_leaves_memory_and_disk_at_the_committed_generation(tmp_path, monkeypatch):
    import lookalike.files

    store, ids, *_ = filled(tmp_path)
    before = (tmp_path / "metadata.json").read_bytes()

    def full(path, obj):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(lookalike.files, "atomic_write_json", full)
    with pytest.raises(OSError):
        store.delete(product_id="p0")
    assert (tmp_path / "metadata.json").read_bytes() == before
    assert sorted(store.ids()) == sorted(ids)  # memory went back to the committed generation


def test_model_mismatch_is_refused_naming_both(tmp_path):
    store, *_ = filled(tmp_path)
    with pytest.raises(IndexMismatchError, match="model_name: index has 'm', settings give 'other'"):
        check_model(store.manifest(), {"model_name": "other"}, "cosine", tmp_path / "metadata.json")
    check_model(store.manifest(), {"model_name": "m"}, "cosine", tmp_path)  # the same model passes


def test_damaged_files_are_refused_naming_the_file(tmp_path):
    store, *_ = filled(tmp_path)
    gen = tmp_path / store.manifest()["index"]["file"]
    gen.write_bytes(gen.read_bytes()[:-7] + b"garbage")
    with pytest.raises(IndexFileError, match="does not match the checksum"):
        new_store(tmp_path)
    (tmp_path / "metadata.json").write_text("{not json")
    with pytest.raises(IndexFileError, match="metadata.json"):
        new_store(tmp_path)


def test_fields_must_carry_product_and_path(tmp_path):
    store = new_store(tmp_path)
    with pytest.raises(StoreError, match="product_id"):
        store.upsert(["a"], np.ones((1, DIM), np.float32), [{"path": "x/a.jpg", "format": ""}])


def test_open_store_gives_faiss_by_default_and_names_unknown_ones(make_settings, tmp_path):
    settings = make_settings()
    store = open_store(settings, metric="cosine")
    assert isinstance(store, FaissStore) and store.describe().backend == "faiss" and store.count() == 0
    assert settings.milvus_uri is None and settings.collection == "lookalike" and settings.executor == "local"


# --- the contract every store passes (tests/store_contract.py), unchanged ---------------------------------------

from store_contract import DIM as CONTRACT_DIM  # noqa: E402
from store_contract import StoreContract  # noqa: E402


class TestFaissStoreContract(StoreContract):
    @pytest.fixture(scope="class")
    @classmethod
    def make_store(cls, tmp_path_factory):
        root = tmp_path_factory.mktemp("faiss-contract")

        def make(name, *, metric="cosine", dim=CONTRACT_DIM):
            folder = root / name
            return FaissStore(folder / "index.faiss", folder / "metadata.json", metric=metric, dim=dim)

        return make


def test_a_reader_of_the_previous_metadata_still_finds_its_generation(tmp_path):
    """Another process may read metadata.json just before a commit: the generation it names survives one commit."""
    store, ids, vectors, fields = filled(tmp_path)
    before = json.loads((tmp_path / "metadata.json").read_text(encoding="utf-8"))["files"]["index"]["file"]
    store.delete(ids[:1])
    assert (tmp_path / before).is_file()
    store.delete(ids[1:2])
    assert not (tmp_path / before).is_file()  # two commits later it is gone


# --- filtered search and product records ----------------------------------------------------------------------


@pytest.mark.parametrize("metric", ["cosine", "l2"])
@pytest.mark.parametrize("factory", ["Flat", "HNSW16,SQ8", "HR16,HNSW16", "IVF4,Flat"])
def test_subset_search_is_exact_on_every_index_type(metric, factory):
    from lookalike.stores.faiss_index import VectorIndex

    rng = np.random.default_rng(5)
    vectors = rng.normal(size=(600, DIM)).astype(np.float32)
    index = VectorIndex.build(vectors, metric, index_type=factory)
    subset = np.sort(rng.choice(600, 37, replace=False))
    queries = rng.normal(size=(3, DIM)).astype(np.float32)
    scores, found = index.search_subset(queries, 10, subset)
    assert found.shape == (3, 10) and np.isin(found, subset).all()
    stored = index.reconstruct(subset)  # what the index holds (decoded): the exact pass compares with these
    q = l2_normalize(queries) if metric == "cosine" else queries
    if metric == "cosine":
        truth = np.sort(q @ stored.T, axis=1)[:, ::-1][:, :10]
    else:
        truth = np.sort(np.linalg.norm(q[:, None] - stored[None], axis=-1), axis=1)[:, :10]
    np.testing.assert_allclose(scores, truth, atol=2e-3 if "SQ8" in factory else 1e-4)


def test_a_large_subset_of_an_approximate_index_still_fills_k(monkeypatch):
    from lookalike.stores import faiss_index
    from lookalike.stores.faiss_index import VectorIndex

    monkeypatch.setattr(faiss_index, "SUBSET_EXACT", 10)  # force the path that searches through the HNSW graph
    rng = np.random.default_rng(6)
    vectors = rng.normal(size=(800, DIM)).astype(np.float32)
    index = VectorIndex.build(vectors, "cosine", index_type="HNSW16")
    subset = np.arange(0, 800, 40)  # 20 rows, 1 in 40: far from most queries
    scores, found = index.search_subset(rng.normal(size=(4, DIM)).astype(np.float32), 15, subset)
    assert found.shape == (4, 15) and np.isin(found, subset).all()
    assert (np.diff(scores, axis=1) <= 1e-6).all()  # best first


def test_records_live_in_a_content_addressed_file_named_by_the_manifest(tmp_path):
    store, ids, vectors, fields = filled(tmp_path)
    store.set_records({"p1": {"product_id": "p1", "name": "One"}})
    store.commit()
    entry = store.manifest()["files"]["records"]
    first = tmp_path / entry["file"]
    assert first.is_file() and entry["products"] == 1 and entry["file"].endswith(".records.json")
    store.set_records({"p1": {"product_id": "p1", "name": "Uno"}})
    store.upsert(ids[:1], vectors[:1], fields[:1])  # saved with the next write too
    assert new_store(tmp_path).records()["p1"]["name"] == "Uno"
    store.delete(ids[:1])  # a third generation: the first table's file is no longer named by the last two
    assert not first.exists()
    named = tmp_path / store.manifest()["files"]["records"]["file"]
    named.write_bytes(named.read_bytes().replace(b"Uno", b"Dos"))
    with pytest.raises(IndexFileError, match="records file .* does not match the checksum"):
        new_store(tmp_path)
    named.unlink()
    with pytest.raises(IndexFileError, match="records file .* cannot be read"):
        new_store(tmp_path)


def test_a_raw_expression_is_refused_by_faiss(tmp_path):
    store, ids, vectors, fields = filled(tmp_path)
    with pytest.raises(StoreError, match="StoreFilter"):
        store.search(vectors[:1], 3, where='product_id == "p1"')
