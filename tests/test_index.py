"""VectorIndex: every index choice against brute force on seeded clustered vectors (recall floors, never timings),
add/remove keeping row order on indexes that cannot remove in place, persistence, the torch top-k path."""

from __future__ import annotations

import numpy as np
import pytest

from lookalike import ImageSearchEngine, Settings, SettingsError
from lookalike.stores.faiss_index import COMPRESSED_FROM, TorchFlat, VectorIndex, choose_index, l2_normalize

DIM = 64


def clustered(n: int, dim: int = DIM, seed: int = 0, per_cluster: int = 10) -> np.ndarray:
    """Seeded vectors in tight-ish clusters with a decaying spectrum (what image embeddings look like)."""
    rng = np.random.default_rng(seed)
    spectrum = (1 + np.arange(dim) / 4.0) ** -0.7
    centres = 0.5 + rng.standard_normal((max(1, n // per_cluster), dim)) * spectrum
    owner = rng.integers(0, len(centres), n)
    return (centres[owner] + 0.5 * rng.standard_normal((n, dim)) * spectrum).astype(np.float32)


def brute_force(database: np.ndarray, queries: np.ndarray, k: int, metric: str) -> np.ndarray:
    if metric == "cosine":
        scores = l2_normalize(queries) @ l2_normalize(database).T
        return np.argsort(-scores, axis=1, kind="stable")[:, :k]
    dist = ((queries[:, None, :] - database[None, :, :]) ** 2).sum(-1)
    return np.argsort(dist, axis=1, kind="stable")[:, :k]


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    return sum(len(set(f[:k]) & set(t)) for f, t in zip(found.tolist(), truth.tolist())) / truth.size


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    database = clustered(3000)
    rng = np.random.default_rng(1)
    queries = database[rng.choice(len(database), 100, replace=False)]
    queries = queries + 0.3 * rng.standard_normal(queries.shape).astype(np.float32) * queries.std(0)
    return database, queries.astype(np.float32)


# (factory string, recall@10 floor against brute force); floors leave room for ties and seeds, not for bugs.
CHOICES = [
    ("Flat", 0.999),
    ("SQfp16", 0.98),
    ("SQ8", 0.93),
    (f"RR{DIM},SQ8", 0.93),
    ("HNSW32,Flat", 0.97),
    ("HNSW32,SQ8", 0.9),
    (f"RR{DIM},HNSW32,SQ8", 0.9),
    ("HR64,HNSW32,SQ8", 0.9),
    ("HR16,IVF16,SQ8", 0.9),
    ("IVF16,Flat", 0.95),
    ("IVF16_HNSW32,SQ8", 0.9),
    ("IVF16,PQ32x4fs", 0.6),
    ("IVF16,PQ32x4fs,Refine(SQ8)", 0.9),
    ("IVF16,PQ8+16", 0.8),  # IVFPQR: L2 only in FAISS; cosine runs it on unit vectors
    ("PCA48,IVF16,SQ8", 0.8),  # PCA centres the data: cosine runs in L2 on unit vectors
    ("PCA40,IVF16_HNSW32,SQ6", 0.8),  # the shape auto builds from a million vectors on
]


@pytest.mark.parametrize("metric", ["cosine", "l2"])
@pytest.mark.parametrize(("factory", "floor"), CHOICES)
def test_every_index_choice_finds_the_true_neighbours(data, factory, floor, metric):
    database, queries = data
    index = VectorIndex.build(database, metric, index_type=factory)
    assert index.ntotal == len(database) and index.dim == DIM
    scores, rows = index.search(queries, 10)
    assert rows.shape == (len(queries), 10)
    assert recall(rows, brute_force(database, queries, 10, metric)) >= floor
    ordered = np.diff(scores, axis=1)
    assert (ordered <= 1e-5).all() if metric == "cosine" else (ordered >= -1e-5).all()  # best first
    assert index.exact == (factory == "Flat")


@pytest.mark.parametrize(
    "factory", ["Flat", "HNSW32,SQ8", f"RR{DIM},HNSW32,SQ8", "HR64,HNSW32,SQ8", "IVF16,SQ8", "IVF16,PQ8+16"]
)
def test_remove_keeps_row_order_and_search_correct(data, factory):
    database, queries = data
    index = VectorIndex.build(database, "cosine", index_type=factory)
    gone = np.arange(0, len(database), 3)
    index.remove(gone)
    kept = np.setdiff1d(np.arange(len(database)), gone)
    assert index.ntotal == len(kept)
    # Row r of the new index is the r-th kept vector: its stored vector is (close to) that one.
    stored = index.vectors()
    cos = (l2_normalize(stored) * l2_normalize(database[kept])).sum(1)
    assert cos.min() > 0.9
    floor = 0.999 if factory == "Flat" else 0.8
    assert recall(index.search(queries, 10)[1], brute_force(database[kept], queries, 10, "cosine")) >= floor


@pytest.mark.parametrize("factory", ["Flat", "HNSW32,SQ8", "HR64,HNSW32,SQ8", "IVF16,SQ8"])
def test_add_to_a_built_index_is_found(data, factory):
    database, _ = data
    index = VectorIndex.build(database[:2000], "cosine", index_type=factory)
    index.add(database[2000:])
    assert index.ntotal == len(database)
    _, rows = index.search(database[2000:2100], 1)
    assert (rows[:, 0] == np.arange(2000, 2100)).mean() >= 0.95  # each new vector is its own nearest


def test_copy_is_independent(data):
    database, _ = data
    index = VectorIndex.build(database, "cosine", index_type="HNSW32,SQ8")
    copy = index.copy()
    copy.remove(np.arange(100))
    assert index.ntotal == len(database) and copy.ntotal == len(database) - 100
    assert copy.factory == "HNSW32,SQ8"


@pytest.mark.parametrize(
    "factory", ["Flat", "HNSW32,SQ8", "HR64,HNSW32,SQ8", "IVF16_HNSW32,SQ8", f"RR{DIM},IVF16,PQ8+16"]
)
def test_serialized_index_answers_the_same_with_its_search_parameters(data, factory):
    database, queries = data
    index = VectorIndex.build(database, "cosine", index_type=factory)
    again = VectorIndex.from_bytes(index.to_bytes(), "cosine", factory=index.factory)
    np.testing.assert_array_equal(index.search(queries, 10)[1], again.search(queries, 10)[1])
    assert again.factory == factory
    assert again.nbytes() == index.nbytes()


def test_reconstruct_single_rows_of_an_ivf_index(data):
    database, _ = data
    index = VectorIndex.build(database, "cosine", index_type="IVF16,Flat")
    rows = [5, 17, 2999]
    np.testing.assert_allclose(index.reconstruct(rows), l2_normalize(database[rows]), atol=1e-6)


def test_ivf_row_lookup_costs_memory_only_once_it_is_used(data):
    """The direct map (8 bytes a row) is made on the first single-row lookup, and survives saving."""
    database, _ = data
    index = VectorIndex.build(database, "cosine", index_type="IVF16,SQ8")
    built = index.nbytes()
    loaded = VectorIndex.from_bytes(index.to_bytes(), "cosine", factory=index.factory)
    rows = [5, 17, 2999]
    expected = index.vectors()[rows]  # read list by list, no map needed
    np.testing.assert_allclose(loaded.reconstruct(rows), expected, atol=1e-6)
    assert loaded.nbytes() == built + 8 * len(database)
    index.remove(np.array([0, 1]))
    np.testing.assert_allclose(index.reconstruct([3, 15]), expected[:2], atol=1e-6)
    again = VectorIndex.from_bytes(loaded.to_bytes(), "cosine", factory=loaded.factory)
    np.testing.assert_allclose(again.reconstruct(rows), expected, atol=1e-6)


def test_k_larger_than_the_index_and_empty_index(data):
    database, queries = data
    small = VectorIndex.build(database[:5], "cosine", index_type="HNSW32,Flat")
    scores, rows = small.search(queries[:2], 10)
    assert rows.shape == (2, 5) and sorted(rows[0].tolist()) == [0, 1, 2, 3, 4]
    empty = VectorIndex.build(np.zeros((0, DIM), np.float32), "cosine", index_type="Flat")
    assert empty.search(queries[:2], 3)[1].shape == (2, 0)


# --- choosing ------------------------------------------------------------------------------------------------


def test_auto_is_exact_below_the_threshold_and_approximate_above():
    assert choose_index(9_999, 1280, "auto", 10_000) == "Flat"
    assert choose_index(10_000, 1280, "auto", 10_000) == "HR128,HNSW32,SQ8"
    assert choose_index(10_000, 2048, "auto", 10_000) == "HR128,HNSW32,SQ8"
    assert choose_index(50, 1000, "auto", 0) == "HNSW32,SQ8"  # 1000 = 8 x 125: no block worth rotating
    assert choose_index(50, 64, "auto", 0) == "HR64,HNSW32,SQ8"
    assert choose_index(COMPRESSED_FROM, 2048, "auto", 10_000) == "PCA1280,IVF4000_HNSW32,SQ6"
    assert choose_index(5, 1280, "HNSW16,Flat", 10_000) == "HNSW16,Flat"  # a factory string is taken as it is


def test_auto_build_picks_by_size(data):
    database, queries = data
    exact = VectorIndex.build(database, "cosine", index_type="auto", exact_below=10_000)
    assert exact.exact and exact.type_name == "IndexFlatIP"
    approx = VectorIndex.build(database, "cosine", index_type="auto", exact_below=1000)
    assert not approx.exact and approx.factory == "HR64,HNSW32,SQ8"
    assert recall(approx.search(queries, 10)[1], brute_force(database, queries, 10, "cosine")) >= 0.9


def test_bad_factory_strings_are_refused_clearly(data):
    database, _ = data
    with pytest.raises(ValueError, match="not a FAISS index factory string"):
        VectorIndex.build(database, "cosine", index_type="Nonsense12")
    with pytest.raises(ValueError, match="cannot be trained on 50 vectors"):
        VectorIndex.build(database[:50], "cosine", index_type="IVF1024,Flat")


# --- the GPU path's top-k, run on the CPU ---------------------------------------------------------------


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_torch_topk_matches_faiss_flat(data, metric):
    database, queries = data
    index = VectorIndex.build(database, metric, index_type="Flat")
    faiss_scores, faiss_rows = index._index.search(index.prepare(queries), 10)
    torch_scores, torch_rows = TorchFlat(index.vectors(), metric, "cpu").search(index.prepare(queries), 10)
    np.testing.assert_allclose(torch_scores, faiss_scores, rtol=1e-4, atol=1e-4)
    assert recall(torch_rows, faiss_rows) >= 0.99  # equal up to ties


# --- settings and the engine ------------------------------------------------------------------------------


def test_index_settings_are_validated():
    s = Settings(config_file=None, environ={"LOOKALIKE_INDEX_TYPE": "HNSW32,SQ8", "LOOKALIKE_EXACT_BELOW": "5000"})
    assert (s.index_type, s.exact_below) == ("HNSW32,SQ8", 5000)
    assert Settings(config_file=None, environ={}).index_type == "auto"
    assert Settings(config_file=None, environ={}, index_type="AUTO").index_type == "auto"
    for factory in ("HR128,HNSW32,SQ8", "PCA960,IVF4000_HNSW32,SQ8", "IVF16,PQ8+16", "IVF16,PQ32x4fs,Refine(SQ8)"):
        assert Settings(config_file=None, environ={}, index_type=factory).index_type == factory
    with pytest.raises(SettingsError, match="index_type='HNSW 32' is not allowed"):
        Settings(config_file=None, environ={}, index_type="HNSW 32")
    with pytest.raises(SettingsError, match="exact_below=-1 is not allowed"):
        Settings(config_file=None, environ={}, exact_below=-1)


@pytest.mark.parametrize("index_type", ["HNSW32,SQ8", "auto"])
def test_engine_builds_searches_adds_removes_and_loads_an_approximate_index(make_settings, catalog, index_type):
    settings = make_settings(index_type=index_type, exact_below=0)
    engine = ImageSearchEngine(settings)
    engine.build_index()
    factory = engine.snapshot.manifest["index"]["factory"]
    assert factory == ("HNSW32,SQ8" if index_type != "auto" else "HR64,HNSW32,SQ8")
    assert engine.get_statistics()["index_type"] == "IndexHNSWSQ" or index_type == "auto"
    photo = next((catalog / "green-bar").iterdir())
    assert engine.search(photo, top_k=1)[0]["product_id"] == "green-bar"
    before = engine.snapshot.index.ntotal
    engine.remove_product("red-disc")
    assert engine.snapshot.index.ntotal == before - 3
    assert engine.search(photo, top_k=1)[0]["product_id"] == "green-bar"
    assert all(h["product_id"] != "red-disc" for h in engine.search(photo, top_k=5))
    loaded = ImageSearchEngine(settings)
    loaded.load_index()
    assert loaded.snapshot.index.factory == factory
    assert loaded.search(photo, top_k=1)[0]["product_id"] == "green-bar"


def test_hadamard_rotation_is_orthogonal_and_fixed(data):
    from lookalike.stores.rotation import HadamardRotation

    database, _ = data
    rot = HadamardRotation(DIM, 32)
    x = l2_normalize(database[:50])
    y = rot.apply(x)
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(y @ y.T, x @ x.T, atol=1e-5)
    np.testing.assert_allclose(rot.invert(y), x, atol=1e-5)
    np.testing.assert_array_equal(HadamardRotation(DIM, 32).apply(x), y)  # nothing random between processes
    assert (rot.signs == -1).any() and (rot.signs == 1).any()


def test_rotated_index_reconstructs_the_original_vectors(data):
    database, _ = data
    index = VectorIndex.build(database, "cosine", index_type="HR64,Flat")
    np.testing.assert_allclose(index.reconstruct([3, 7]), l2_normalize(database[[3, 7]]), atol=1e-5)
    with pytest.raises(ValueError, match="power of two that divides"):
        VectorIndex.build(database, "cosine", index_type="HR48,Flat")
