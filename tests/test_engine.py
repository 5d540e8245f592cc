"""ImageSearchEngine and VectorIndex: building, searching, persistence, incremental updates, live changes."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import lookalike.files
from conftest import PRODUCTS, jpeg_bytes, product_image, write_catalog
from lookalike import (
    BuildReport,
    ImageError,
    ImageSearchEngine,
    IndexFileError,
    IndexMismatchError,
    Settings,
    UnknownProductError,
)
from lookalike.stores.faiss_index import VectorIndex

RESULT_KEYS = {"rank", "product_id", "similarity", "image_id", "image_path", "image_similarity", "record"}
IMAGE_RESULT_KEYS = {"rank", "product_id", "similarity", "image_id", "image_path", "record"}
N_IMAGES = sum(PRODUCTS.values())  # 10 images of 4 products in the `catalog` fixture


# --- helpers and local fixtures -------------------------------------------------------------------------------


@pytest.fixture
def engine(make_settings, catalog) -> ImageSearchEngine:
    """An engine with the 4-product synthetic catalog built (cosine)."""
    eng = ImageSearchEngine(make_settings())
    eng.build_index()
    return eng


@pytest.fixture
def queries(tmp_path) -> list[Path]:
    """Held-out JPEG views of each catalog product (never indexed), outside the catalog folder."""
    return write_catalog(tmp_path / "queries", PRODUCTS, start_variant=50)


@pytest.fixture(scope="module")
def ro_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("read-only")


@pytest.fixture(scope="module")
def ro_catalog(ro_dir) -> Path:
    write_catalog(ro_dir / "catalog", PRODUCTS)
    return ro_dir / "catalog"


@pytest.fixture(scope="module")
def ro_queries(ro_dir) -> list[Path]:
    return write_catalog(ro_dir / "queries", PRODUCTS, start_variant=50)


@pytest.fixture(scope="module")
def ro_engine(ro_dir, ro_catalog) -> ImageSearchEngine:
    """Like `engine` (same settings as make_settings), built once and shared by the tests that only search."""
    settings = Settings(
        config_file=None,
        environ={},
        model_name="test_tiny",
        data_dir=ro_catalog,
        cache_dir=ro_dir / "cache",
        batch_size=4,
        num_workers=2,
    )
    eng = ImageSearchEngine(settings)
    eng.build_index()
    return eng


def save_jpeg(path: Path, look: int, variant: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    product_image(look, variant).save(path)
    return path


def all_hits(engine: ImageSearchEngine, query, **kw) -> list[dict]:
    return engine.search(query, top_k=engine.snapshot.index.ntotal, by_product=False, **kw)


def loaded(settings) -> ImageSearchEngine:
    eng = ImageSearchEngine(settings)
    eng.load_index()
    return eng


def summary(hits: list[dict]) -> list[tuple]:
    """What must agree between two runs: rank, product, image (similarities compared separately, with tolerance)."""
    return [(h["rank"], h["product_id"], h["image_id"], h["image_path"]) for h in hits]


def assert_same_hits(a: list[dict], b: list[dict]) -> None:
    assert summary(a) == summary(b)
    assert [h["similarity"] for h in a] == pytest.approx([h["similarity"] for h in b], abs=1e-5)


def generation_file(settings) -> Path:
    manifest = json.loads(settings.metadata_path.read_text(encoding="utf-8"))
    return settings.index_path.with_name(manifest["index"]["file"])


# --- building -------------------------------------------------------------------------------------------------


def test_build_index_reports_what_it_did(make_settings, catalog):
    report = ImageSearchEngine(make_settings()).build_index()
    assert isinstance(report, BuildReport)
    assert (report.images, report.products, report.extracted, report.reused) == (N_IMAGES, 4, N_IMAGES, 0)
    assert report.skipped == []


def test_build_index_without_catalog_folder_raises_and_writes_nothing(make_settings, tmp_path):
    settings = make_settings(data_dir=tmp_path / "missing")
    with pytest.raises(ValueError, match="does not exist"):
        ImageSearchEngine(settings).build_index()
    assert not settings.metadata_path.exists()


def test_operations_before_any_index_say_to_build_or_load(make_settings, catalog, tmp_path):
    eng = ImageSearchEngine(make_settings())
    assert not eng.is_ready
    query = catalog / "red-disc" / "red-disc-00.jpg"
    calls = [
        lambda: eng.search(query),
        lambda: eng.search_batch([query]),
        eng.get_statistics,
        lambda: eng.add_images("red-disc", [query]),
        lambda: eng.remove_product("red-disc"),
        lambda: eng.snapshot,
    ]
    for call in calls:
        with pytest.raises(RuntimeError, match=r"build_index\(\) or load_index\(\)"):
            call()
    assert sorted(p.name for p in (catalog / "red-disc").iterdir()) == [
        "red-disc-00.jpg",
        "red-disc-01.jpg",
        "red-disc-02.jpg",
    ]


# --- searching ------------------------------------------------------------------------------------------------


def test_search_results_have_the_documented_fields_best_first(ro_engine, ro_catalog, ro_queries):
    query = ro_queries[0]  # a held-out view of red-disc
    hits = ro_engine.search(query, top_k=4)
    assert len(hits) == 4
    for i, hit in enumerate(hits, start=1):
        assert set(hit) == RESULT_KEYS
        assert hit["rank"] == i
        assert isinstance(hit["similarity"], float)
        assert isinstance(hit["image_id"], str) and len(hit["image_id"]) == 16
        path = Path(hit["image_path"])
        assert path.is_file()
        assert path.parent == ro_catalog / hit["product_id"]  # the product's own image
    sims = [h["similarity"] for h in hits]
    assert sims == sorted(sims, reverse=True)
    assert hits[0]["product_id"] == "red-disc"
    assert {h["product_id"] for h in hits} == set(PRODUCTS)


def test_search_accepts_a_path_str_bytes_and_pil_image(ro_engine, ro_queries):
    path = ro_queries[3]  # green-bar held-out view (JPEG)
    reference = ro_engine.search(path, top_k=3)
    assert reference[0]["product_id"] == "green-bar"
    with Image.open(path) as pil:
        pil.load()
        for query in (str(path), path.read_bytes(), bytearray(path.read_bytes()), pil):
            assert_same_hits(ro_engine.search(query, top_k=3), reference)


def test_a_catalog_image_finds_itself_first(ro_engine, ro_catalog):
    path = ro_catalog / "blue-cross" / "blue-cross-01.jpg"
    hits = ro_engine.search(path, top_k=1, by_product=False)
    assert hits[0]["image_path"] == str(path)
    assert hits[0]["similarity"] == pytest.approx(1.0, abs=1e-4)


def test_by_default_a_product_with_many_images_does_not_fill_the_list(make_settings, tmp_path):
    # 70 near-identical red-disc images: more than the first look-ahead of the product grouping (64 rows).
    write_catalog(tmp_path / "catalog", {"red-disc": 70, "green-bar": 2, "blue-cross": 2, "yellow-disc": 2})
    eng = ImageSearchEngine(make_settings())
    eng.build_index()
    query = product_image(0, 99)  # a red-disc look

    image_hits = eng.search(query, top_k=10, by_product=False)
    assert [h["product_id"] for h in image_hits] == ["red-disc"] * 10  # image level: one product fills the list

    products = eng.search(query, top_k=4)
    assert products[0]["product_id"] == "red-disc"
    assert sorted(h["product_id"] for h in products) == sorted(["red-disc", "green-bar", "blue-cross", "yellow-disc"])
    assert [h["rank"] for h in products] == [1, 2, 3, 4]

    three = eng.search(query, top_k=3)
    assert len({h["product_id"] for h in three}) == 3
    assert summary(three) == summary(products[:3])


def test_product_entry_is_its_best_image_scored_by_its_best_three(ro_engine, ro_queries):
    query = ro_queries[0]
    per_product: dict[str, list[dict]] = {}
    for hit in all_hits(ro_engine, query):
        per_product.setdefault(hit["product_id"], []).append(hit)
    hits = ro_engine.search(query, top_k=4)
    for hit in hits:
        images = per_product[hit["product_id"]]  # best first
        assert hit["image_id"] == images[0]["image_id"]
        assert hit["image_similarity"] == pytest.approx(images[0]["similarity"])
        # the product's similarity: the mean of its best three image similarities (fewer if it has fewer)
        assert hit["similarity"] == pytest.approx(np.mean([h["similarity"] for h in images[:3]]), abs=1e-6)
    assert [h["similarity"] for h in hits] == sorted((h["similarity"] for h in hits), reverse=True)


def test_image_level_hits_with_by_product_false(ro_engine, ro_queries):
    hits = ro_engine.search(ro_queries[0], top_k=6, by_product=False)
    assert len(hits) == 6
    assert [h["rank"] for h in hits] == list(range(1, 7))
    assert len({h["image_id"] for h in hits}) == 6
    # red-disc has 3 catalog images: all of them come before anything else for a red-disc view
    assert [h["product_id"] for h in hits[:3]] == ["red-disc"] * 3


def test_top_k_larger_than_the_catalog_returns_what_exists(ro_engine, ro_queries):
    assert len(ro_engine.search(ro_queries[0], top_k=50)) == 4
    hits = ro_engine.search(ro_queries[0], top_k=50, by_product=False)
    assert len(hits) == N_IMAGES
    assert len({h["image_id"] for h in hits}) == N_IMAGES


@pytest.mark.parametrize("top_k", [0, -1, 2.5, "3", None, True, 3.0])
def test_invalid_top_k_raises_value_error(ro_engine, ro_queries, top_k):
    with pytest.raises(ValueError, match="top_k"):
        ro_engine.search(ro_queries[0], top_k=top_k)
    with pytest.raises(ValueError, match="top_k"):
        ro_engine.search_batch([ro_queries[0]], top_k=top_k)


def test_numpy_integer_top_k_is_accepted(ro_engine, ro_queries):
    assert len(ro_engine.search(ro_queries[0], top_k=np.int64(2))) == 2


@pytest.mark.parametrize("by_product", [True, False])
def test_min_similarity_filters_results(ro_engine, ro_queries, by_product):
    query = ro_queries[0]
    unfiltered = ro_engine.search(query, top_k=N_IMAGES, by_product=by_product)
    sims = [h["similarity"] for h in unfiltered]
    threshold = (sims[1] + sims[2]) / 2  # keeps exactly the first two
    filtered = ro_engine.search(query, top_k=N_IMAGES, by_product=by_product, min_similarity=threshold)
    assert summary(filtered) == summary(unfiltered[:2])
    assert all(h["similarity"] >= threshold for h in filtered)
    assert ro_engine.search(query, top_k=5, by_product=by_product, min_similarity=1.5) == []
    assert len(ro_engine.search(query, top_k=5, by_product=by_product, min_similarity=-1.0)) == min(5, len(unfiltered))


def test_search_batch_equals_one_search_per_query(ro_engine, ro_queries):
    mixed = [ro_queries[0], str(ro_queries[3]), ro_queries[6].read_bytes(), ro_queries[8]]
    for by_product in (True, False):
        batch = ro_engine.search_batch(mixed, top_k=3, by_product=by_product)
        assert len(batch) == len(mixed)
        for query, hits in zip(mixed, batch):
            assert_same_hits(hits, ro_engine.search(query, top_k=3, by_product=by_product))


def test_search_of_a_bad_image_raises_image_error(ro_engine, tmp_path):
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    with pytest.raises(ImageError):
        ro_engine.search(text)
    with pytest.raises(ImageError):
        ro_engine.search(b"")
    with pytest.raises(ImageError, match="not found"):
        ro_engine.search(tmp_path / "missing.jpg")


# --- exactness against brute force ----------------------------------------------------------------------------


def _catalog_vectors(eng: ImageSearchEngine) -> tuple[np.ndarray, list[str]]:
    root = eng.data_root
    paths = [str(root / f["path"]) for f in eng.store.fetch(eng.store.ids()).values()]
    return eng.extractor.extract_batch_features(paths), paths


def test_cosine_scores_and_ranking_match_numpy(ro_engine, ro_queries):
    catalog_vectors, paths = _catalog_vectors(ro_engine)
    query_vectors = ro_engine.extractor.extract_batch_features(ro_queries)
    a = catalog_vectors / np.linalg.norm(catalog_vectors, axis=1, keepdims=True)
    b = query_vectors / np.linalg.norm(query_vectors, axis=1, keepdims=True)
    cosine = b @ a.T  # (queries, catalog)
    for q, query in enumerate(ro_queries):
        hits = all_hits(ro_engine, query)
        assert sorted(h["image_path"] for h in hits) == sorted(paths)
        # each reported score is that image's cosine similarity ...
        for hit in hits:
            assert hit["similarity"] == pytest.approx(cosine[q, paths.index(hit["image_path"])], abs=1e-4)
        # ... and they come in the brute-force order (ties tolerated: the sorted scores agree)
        assert [h["similarity"] for h in hits] == pytest.approx(sorted(cosine[q], reverse=True), abs=1e-4)
        top3 = {paths[i] for i in np.argsort(-cosine[q])[:3]}
        assert {h["image_path"] for h in hits[:3]} == top3


def test_l2_distances_and_similarities_match_numpy(make_settings, catalog, queries):
    eng = ImageSearchEngine(make_settings(similarity_metric="l2"))
    eng.build_index()
    catalog_vectors, paths = _catalog_vectors(eng)
    query_vectors = eng.extractor.extract_batch_features(queries)
    distance = np.linalg.norm(query_vectors[:, None, :] - catalog_vectors[None, :, :], axis=2)
    for q, query in enumerate(queries):
        hits = all_hits(eng, query)
        assert all(set(h) == IMAGE_RESULT_KEYS | {"distance"} for h in hits)
        for hit in hits:
            assert hit["distance"] == pytest.approx(distance[q, paths.index(hit["image_path"])], abs=2e-3)
            assert hit["similarity"] == pytest.approx(1.0 / (1.0 + hit["distance"]), rel=1e-6)
        distances = [h["distance"] for h in hits]
        assert distances == sorted(distances)
        assert distances == pytest.approx(sorted(distance[q]), abs=2e-3)
        sims = [h["similarity"] for h in hits]
        assert sims == sorted(sims, reverse=True)  # similarity falls as distance grows
        assert all(0.0 < s <= 1.0 for s in sims)
    product_hits = eng.search(queries[0], top_k=4)
    assert product_hits[0]["product_id"] == "red-disc"
    assert all("distance" in h for h in product_hits)


# --- VectorIndex directly -------------------------------------------------------------------------------------


@pytest.fixture
def random_vectors() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(42)
    return rng.normal(size=(200, 16)).astype(np.float32), rng.normal(size=(7, 16)).astype(np.float32)


def _numpy_search(data: np.ndarray, queries: np.ndarray, metric: str, k: int) -> tuple[np.ndarray, np.ndarray]:
    if metric == "cosine":
        a = data / np.linalg.norm(data, axis=1, keepdims=True)
        b = queries / np.linalg.norm(queries, axis=1, keepdims=True)
        scores = b @ a.T
        order = np.argsort(-scores, axis=1)[:, :k]
    else:
        scores = np.linalg.norm(queries[:, None, :] - data[None, :, :], axis=2)
        order = np.argsort(scores, axis=1)[:, :k]
    return np.take_along_axis(scores, order, axis=1), order


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_vector_index_matches_numpy(random_vectors, metric):
    data, queries = random_vectors
    index = VectorIndex.build(data, metric)
    assert (index.ntotal, index.dim, index.metric) == (200, 16, metric)
    scores, rows = index.search(queries, 10)
    expected_scores, expected_rows = _numpy_search(data, queries, metric, 10)
    np.testing.assert_array_equal(rows, expected_rows)  # continuous random data: no ties
    np.testing.assert_allclose(scores, expected_scores, atol=1e-4)


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_vector_index_remove_keeps_row_order(random_vectors, metric):
    data, queries = random_vectors
    index = VectorIndex.build(data, metric)
    stored = index.vectors()
    removed = [0, 3, 57, 58, 199]
    index.remove(np.array(removed))
    remaining = np.delete(data, removed, axis=0)
    assert index.ntotal == 195
    np.testing.assert_allclose(index.vectors(), np.delete(stored, removed, axis=0), atol=1e-6)
    scores, rows = index.search(queries, 10)
    expected_scores, expected_rows = _numpy_search(remaining, queries, metric, 10)
    np.testing.assert_array_equal(rows, expected_rows)  # rows renumbered like np.delete renumbers
    np.testing.assert_allclose(scores, expected_scores, atol=1e-4)


def test_vector_index_stores_normalised_vectors_for_cosine_only(random_vectors):
    data, _ = random_vectors
    np.testing.assert_allclose(np.linalg.norm(VectorIndex.build(data, "cosine").vectors(), axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(VectorIndex.build(data, "l2").vectors(), data, atol=1e-6)


def test_vector_index_k_above_size_bytes_round_trip_and_copy(random_vectors):
    data, queries = random_vectors
    index = VectorIndex.build(data[:5], "cosine")
    scores, rows = index.search(queries, 50)
    assert scores.shape == rows.shape == (7, 5)
    assert sorted(rows[0]) == [0, 1, 2, 3, 4]

    again = VectorIndex.from_bytes(index.to_bytes(), "cosine")
    np.testing.assert_array_equal(again.search(queries, 5)[1], rows)
    assert index.nbytes() == len(index.to_bytes()) > 0

    clone = index.copy()
    clone.add(data[5:8])
    clone.remove(np.array([0]))
    assert (index.ntotal, clone.ntotal) == (5, 7)  # the original is untouched

    empty = VectorIndex.build(data[:0], "l2")
    scores, rows = empty.search(queries, 3)
    assert scores.shape == rows.shape == (7, 0)


def test_vector_index_refuses_an_unknown_metric(random_vectors):
    with pytest.raises(ValueError, match="unknown similarity metric"):
        VectorIndex.build(random_vectors[0], "manhattan")


# --- persistence ----------------------------------------------------------------------------------------------

FRESH_PROCESS = """
import json, sys
from lookalike import ImageSearchEngine, Settings
data_dir, cache_dir, query = sys.argv[1:4]
settings = Settings(config_file=None, environ={}, model_name="test_tiny", data_dir=data_dir, cache_dir=cache_dir,
                    batch_size=4, num_workers=2)
engine = ImageSearchEngine(settings)
engine.load_index()
print(json.dumps({"products": engine.search(query, top_k=4), "images": engine.search(query, top_k=10, by_product=False),
                  "build_id": engine.get_statistics()["build_id"]}))
"""


def test_load_index_in_a_fresh_process_gives_the_same_results(make_settings, catalog, queries, tmp_path):
    settings = make_settings()
    eng = ImageSearchEngine(settings)
    eng.build_index()
    query = queries[5]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOKALIKE_")}
    proc = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, str(settings.data_dir), str(settings.cache_dir), str(query)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    child = json.loads(proc.stdout.strip().splitlines()[-1])
    assert child["build_id"] == eng.get_statistics()["build_id"]
    assert_same_hits(child["products"], eng.search(query, top_k=4))
    assert_same_hits(child["images"], eng.search(query, top_k=10, by_product=False))


def test_load_index_needs_no_catalog_images(make_settings, catalog, queries):
    settings = make_settings()
    eng = ImageSearchEngine(settings)
    eng.build_index()
    expected = eng.search(queries[0], top_k=4)
    stats = eng.get_statistics()
    shutil.rmtree(catalog)
    fresh = loaded(settings)
    assert_same_hits(fresh.search(queries[0], top_k=4), expected)
    assert fresh.get_statistics() == stats


def test_load_index_without_an_index_says_to_build(make_settings, catalog):
    with pytest.raises(IndexFileError, match="build the index first"):
        loaded(make_settings())


def test_load_index_refuses_another_metric(make_settings, catalog):
    ImageSearchEngine(make_settings(similarity_metric="cosine")).build_index()
    with pytest.raises(IndexMismatchError) as info:
        loaded(make_settings(similarity_metric="l2"))
    message = str(info.value)
    assert "similarity_metric=cosine" in message and "similarity_metric=l2" in message
    assert isinstance(info.value, IndexFileError)


def test_load_index_refuses_another_input_size(make_settings, catalog):
    ImageSearchEngine(make_settings(img_size=64)).build_index()
    with pytest.raises(IndexMismatchError) as info:
        loaded(make_settings(img_size=96))
    message = str(info.value)
    assert "img_size=64" in message and "img_size=96" in message
    assert "metric" not in message  # only what differs is named
    loaded(make_settings(img_size=64))  # the settings it was built with still work


def test_load_index_refuses_a_corrupted_index_file(make_settings, catalog):
    settings = make_settings()
    ImageSearchEngine(settings).build_index()
    gen = generation_file(settings)
    data = bytearray(gen.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 8):
        data[i] ^= 0xFF
    gen.write_bytes(bytes(data))
    with pytest.raises(IndexFileError, match="damaged"):
        loaded(settings)


def test_load_index_refuses_a_missing_index_file(make_settings, catalog):
    settings = make_settings()
    ImageSearchEngine(settings).build_index()
    generation_file(settings).unlink()
    with pytest.raises(IndexFileError, match="cannot be read"):
        loaded(settings)


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda b: b[: len(b) // 2], id="truncated"),
        pytest.param(lambda b: b"", id="empty"),
        pytest.param(lambda b: b"\xff\xfe" + b[2:], id="garbage-bytes"),
        pytest.param(lambda b: b"[1, 2, 3]", id="not-a-manifest"),
        pytest.param(lambda b: b.replace(b'"red-disc"', b'"red-dosc"', 1), id="edited-image-list"),
    ],
)
def test_load_index_refuses_damaged_metadata(make_settings, catalog, damage):
    settings = make_settings()
    ImageSearchEngine(settings).build_index()
    original = settings.metadata_path.read_bytes()
    damaged = damage(original)
    assert damaged != original
    settings.metadata_path.write_bytes(damaged)
    with pytest.raises(IndexFileError):
        loaded(settings)


def test_a_crash_while_committing_leaves_the_previous_index_loadable(make_settings, catalog, queries, monkeypatch):
    settings = make_settings()
    eng = ImageSearchEngine(settings)
    eng.build_index()
    first_gen = generation_file(settings)
    first_metadata = settings.metadata_path.read_bytes()
    first_results = eng.search(queries[0], top_k=N_IMAGES, by_product=False)

    # the second build would add a product; it crashes after its index generation file was written
    write_catalog(catalog, {"purple": 2}, start_variant=0)  # look 0 (a red-disc look), new product name
    written: list[Path] = []
    real_write = lookalike.files.atomic_write_bytes

    def record(path, data):
        written.append(Path(path))
        real_write(path, data)

    def crash(path, obj):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(lookalike.files, "atomic_write_bytes", record)
    monkeypatch.setattr(lookalike.files, "atomic_write_json", crash)
    with pytest.raises(OSError, match="simulated"):
        eng.build_index()
    monkeypatch.undo()

    new_gens = [p for p in written if p.suffix == ".faiss"]
    assert new_gens and new_gens[0].is_file() and new_gens[0] != first_gen  # the new generation was written
    assert first_gen.is_file()  # the previous generation is not deleted
    assert settings.metadata_path.read_bytes() == first_metadata
    fresh = loaded(settings)
    assert summary(fresh.search(queries[0], top_k=N_IMAGES, by_product=False)) == summary(first_results)
    assert "purple" not in {h["product_id"] for h in fresh.search(queries[0], top_k=10)}
    assert "purple" not in {h["product_id"] for h in eng.search(queries[0], top_k=10)}  # live state unchanged

    # the next successful build commits; the crashed build's orphan is cleaned up, the previous generation stays
    # one commit (for readers that read the old metadata a moment ago)
    eng.build_index()
    gens = sorted(settings.cache_dir.glob("index-*.faiss"))
    assert gens == sorted([generation_file(settings), first_gen])
    assert "purple" in {h["product_id"] for h in loaded(settings).search(queries[0], top_k=10)}


# --- incremental builds ---------------------------------------------------------------------------------------


def test_incremental_build_extracts_only_new_and_changed_images(make_settings, catalog):
    settings = make_settings()
    eng = ImageSearchEngine(settings)
    eng.build_index()

    added = save_jpeg(catalog / "green-bar" / "green-bar-60.jpg", 1, 60)
    modified = catalog / "red-disc" / "red-disc-00.jpg"
    before = modified.read_bytes()
    product_image(3, 7).save(modified)  # now shows a yellow-disc look
    assert modified.read_bytes() != before
    deleted = catalog / "blue-cross" / "blue-cross-01.jpg"
    deleted.unlink()

    report = eng.build_index()
    assert report.extracted == 2
    assert report.reused == N_IMAGES - 2
    assert (report.images, report.products) == (N_IMAGES, 4)

    paths = {h["image_path"] for h in all_hits(eng, added)}
    assert str(deleted) not in paths and str(added) in paths
    assert eng.get_statistics()["images"] == N_IMAGES
    top = eng.search(added, top_k=1, by_product=False)[0]
    assert top["image_path"] == str(added) and top["similarity"] == pytest.approx(1.0, abs=1e-4)
    top = eng.search(modified, top_k=1, by_product=False)[0]  # the new pixels are indexed, not the old ones
    assert top["image_path"] == str(modified) and top["similarity"] == pytest.approx(1.0, abs=1e-4)
    assert all(h["image_path"] != str(deleted) for h in all_hits(loaded(settings), added))

    assert eng.build_index().extracted == 0  # nothing changed since
    forced = eng.build_index(force_rebuild=True)
    assert (forced.extracted, forced.reused) == (N_IMAGES, 0)


def test_another_input_size_does_not_reuse_cached_vectors(make_settings, catalog):
    assert ImageSearchEngine(make_settings(img_size=64)).build_index().extracted == N_IMAGES
    report = ImageSearchEngine(make_settings(img_size=96)).build_index()
    assert (report.extracted, report.reused) == (N_IMAGES, 0)
    eng = ImageSearchEngine(make_settings(img_size=96))
    eng.load_index()
    assert eng.snapshot.manifest["model"]["input_size"] == 96


@pytest.mark.slow
def test_another_model_does_not_reuse_cached_vectors(make_settings, catalog, queries):
    ImageSearchEngine(make_settings()).build_index()
    eng = ImageSearchEngine(make_settings(model_name="efficientnet_lite0"))
    report = eng.build_index()
    assert (report.extracted, report.reused) == (N_IMAGES, 0)
    stats = eng.get_statistics()
    assert (stats["model"], stats["embedding_dim"]) == ("efficientnet_lite0", 1280)
    assert eng.search(queries[0], top_k=1)[0]["product_id"] == "red-disc"


# --- bad files ------------------------------------------------------------------------------------------------


@pytest.fixture
def bad_files(catalog) -> dict[str, Path]:
    data = jpeg_bytes(product_image(0, 5))
    files = {
        "truncated": catalog / "red-disc" / "truncated.jpg",
        "empty": catalog / "green-bar" / "empty.jpg",
        "text": catalog / "blue-cross" / "notes.jpg",
    }
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["empty"].write_bytes(b"")
    files["text"].write_text("this is a text file, not a photo\n")
    return files


def test_bad_catalog_files_are_skipped_reported_and_logged(make_settings, bad_files, queries, caplog):
    settings = make_settings()
    eng = ImageSearchEngine(settings)
    with caplog.at_level(logging.WARNING):
        report = eng.build_index()
    assert (report.images, report.products) == (N_IMAGES, 4)
    reasons = {Path(s["path"]): s["reason"] for s in report.skipped}
    assert set(reasons) == set(bad_files.values())
    assert "truncated" in reasons[bad_files["truncated"]]
    assert "empty" in reasons[bad_files["empty"]]
    assert reasons[bad_files["text"]]

    stats = eng.get_statistics()
    assert stats["skipped"] == 3
    assert stats["skipped_files"] == report.skipped
    assert loaded(settings).get_statistics()["skipped_files"] == report.skipped

    log = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    for path in bad_files.values():
        assert str(path) in log

    indexed = {h["image_path"] for h in all_hits(eng, queries[0])}
    assert not indexed & {str(p) for p in bad_files.values()}
    assert eng.search(queries[0], top_k=1)[0]["product_id"] == "red-disc"


def test_a_text_file_named_jpg_is_reported_as_not_an_image(make_settings, bad_files):
    report = ImageSearchEngine(make_settings()).build_index()
    reason = next(s["reason"] for s in report.skipped if Path(s["path"]) == bad_files["text"])
    assert "not a supported image" in reason


def test_extracted_counts_only_images_that_got_features(make_settings, bad_files):
    report = ImageSearchEngine(make_settings()).build_index()
    assert report.extracted == N_IMAGES  # the 3 bad files got no features
    assert report.extracted + report.reused == report.images


def test_png_and_webp_catalog_images_are_indexed(make_settings, catalog):
    write_catalog(catalog, {"png-product": 2}, fmt="png")
    write_catalog(catalog, {"webp-product": 2}, fmt="webp")
    eng = ImageSearchEngine(make_settings())
    report = eng.build_index()
    assert report.skipped == []
    assert eng.get_statistics()["formats"] == {"JPEG": N_IMAGES, "PNG": 2, "WEBP": 2}


def test_a_png_query_can_be_searched(ro_engine, tmp_path):
    path = tmp_path / "query.png"
    product_image(0, 50).save(path)
    assert ro_engine.search(path, top_k=1)[0]["product_id"] == "red-disc"


# --- add_images -----------------------------------------------------------------------------------------------


@pytest.fixture
def incoming(tmp_path) -> list[Path]:
    """Two photos of a new product (look 5) outside the catalog."""
    return [save_jpeg(tmp_path / "incoming" / f"shot-{v}.jpg", 5, v) for v in (1, 2)]


def test_add_images_copies_indexes_and_persists(make_settings, engine, catalog, incoming):
    out = engine.add_images("pink-cross", incoming)
    assert out["product_id"] == "pink-cross"
    assert (out["added"], out["images"]) == (2, N_IMAGES + 2)
    assert len(out["image_ids"]) == 2
    folder = catalog / "pink-cross"
    assert sorted(p.name for p in folder.iterdir()) == ["shot-1.jpg", "shot-2.jpg"]
    for src in incoming:
        assert src.is_file()  # copied, not moved
        assert (folder / src.name).read_bytes() == src.read_bytes()

    query = product_image(5, 50)
    hits = engine.search(query, top_k=5)
    assert hits[0]["product_id"] == "pink-cross"
    assert hits[0]["image_id"] in out["image_ids"]
    assert Path(hits[0]["image_path"]).parent == folder
    assert engine.get_statistics()["products"] == 5

    fresh = loaded(make_settings())
    assert_same_hits(fresh.search(query, top_k=5), hits)
    # the cache learnt the new images: a rebuild extracts nothing
    rebuilt = fresh.build_index()
    assert (rebuilt.extracted, rebuilt.images) == (0, N_IMAGES + 2)


def test_add_images_to_an_existing_product(engine, catalog, tmp_path):
    src = save_jpeg(tmp_path / "more" / "extra.jpg", 0, 77)
    engine.add_images("red-disc", [src])
    assert (catalog / "red-disc" / "extra.jpg").is_file()
    assert engine.get_statistics()["images_per_product"]["max"] == 4
    assert engine.search(src, top_k=1, by_product=False)[0]["image_path"] == str(catalog / "red-disc" / "extra.jpg")


def test_adding_the_same_file_again_adds_nothing(engine, incoming):
    engine.add_images("pink-cross", incoming)
    again = engine.add_images("pink-cross", incoming[:1])
    assert (again["added"], again["images"]) == (0, N_IMAGES + 2)


def test_a_path_given_twice_in_one_call_is_indexed_once(engine, incoming):
    out = engine.add_images("pink-cross", [incoming[0], incoming[0]])
    assert (out["added"], out["images"]) == (1, N_IMAGES + 1)


def test_add_images_never_overwrites_a_different_file_of_the_same_name(engine, catalog, tmp_path):
    existing = catalog / "red-disc" / "red-disc-00.jpg"
    original = existing.read_bytes()
    src = save_jpeg(tmp_path / "elsewhere" / "red-disc-00.jpg", 0, 88)
    assert src.read_bytes() != original
    out = engine.add_images("red-disc", [src])
    assert out["added"] == 1
    assert existing.read_bytes() == original
    names = sorted(p.name for p in (catalog / "red-disc").iterdir())
    assert len(names) == 4
    copy = next(catalog / "red-disc" / n for n in names if n.startswith("red-disc-00-"))
    assert copy.read_bytes() == src.read_bytes()


def _folder_listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_add_images_with_a_bad_image_changes_nothing(make_settings, engine, catalog, incoming, tmp_path):
    bad = tmp_path / "incoming" / "broken.jpg"
    bad.write_bytes(jpeg_bytes(product_image(5, 3))[:300])
    listing = _folder_listing(catalog)
    metadata = make_settings().metadata_path.read_bytes()
    for product in ("pink-cross", "red-disc"):
        with pytest.raises(ImageError) as info:
            engine.add_images(product, [incoming[0], bad])
        assert "broken.jpg" in str(info.value)
    assert engine.snapshot.index.ntotal == N_IMAGES
    assert _folder_listing(catalog) == listing
    assert make_settings().metadata_path.read_bytes() == metadata


def test_add_images_refuses_invalid_product_ids(engine, catalog, tmp_path, incoming):
    listing = _folder_listing(tmp_path)
    for product_id in ["../x", "a/b", "a\\b", ".hidden", "..", ".", "", "   "]:
        with pytest.raises(ValueError, match="invalid product id"):
            engine.add_images(product_id, incoming)
    assert _folder_listing(tmp_path) == listing
    assert engine.snapshot.index.ntotal == N_IMAGES


def test_add_images_refuses_other_extensions(engine, catalog, tmp_path):
    for name in ["photo.bmp", "photo.gif", "photo.txt", "photo"]:
        src = tmp_path / "incoming" / name
        src.parent.mkdir(exist_ok=True)
        product_image(5, 1).save(src, format="BMP")  # a valid image, under a name the catalog would not scan
        with pytest.raises(ValueError, match="extension"):
            engine.add_images("pink-cross", [src])
    assert not (catalog / "pink-cross").exists()
    assert engine.snapshot.index.ntotal == N_IMAGES


def test_add_images_needs_at_least_one_path(engine):
    with pytest.raises(ValueError, match="at least one"):
        engine.add_images("pink-cross", [])


# --- remove_product -------------------------------------------------------------------------------------------


def test_remove_product_removes_moves_and_persists(make_settings, engine, catalog, queries):
    out = engine.remove_product("green-bar")
    assert (out["product_id"], out["removed"], out["images"]) == ("green-bar", 3, N_IMAGES - 3)
    moved = Path(out["moved_to"])
    assert moved.parent == catalog / ".removed"
    assert sorted(p.name for p in moved.iterdir()) == ["green-bar-00.jpg", "green-bar-01.jpg", "green-bar-02.jpg"]
    assert not (catalog / "green-bar").exists()

    green_query = queries[3]
    for eng in (engine, loaded(make_settings())):
        hits = eng.search(green_query, top_k=10)
        assert [h["rank"] for h in hits] == [1, 2, 3]
        assert "green-bar" not in {h["product_id"] for h in hits}
        assert all("green-bar" not in h["image_path"] for h in all_hits(eng, green_query))
        assert eng.get_statistics()["products"] == 3

    rebuilt = ImageSearchEngine(make_settings())
    report = rebuilt.build_index()  # the moved folder is hidden: a rebuild does not bring the product back
    assert (report.products, report.images, report.extracted) == (3, N_IMAGES - 3, 0)


def test_remove_product_keeps_the_other_rows_aligned(engine, catalog):
    engine.remove_product("red-disc")  # rows 0.. of the index: every later row shifts down
    for path in sorted(catalog.glob("*/*.jpg")):
        top = engine.search(path, top_k=1, by_product=False)[0]
        assert top["image_path"] == str(path)
        assert top["similarity"] == pytest.approx(1.0, abs=1e-4)


def test_remove_unknown_product_raises_lookup_error(engine):
    with pytest.raises(UnknownProductError, match="no-such-thing") as info:
        engine.remove_product("no-such-thing")
    assert isinstance(info.value, LookupError)
    assert engine.snapshot.index.ntotal == N_IMAGES


# --- statistics -----------------------------------------------------------------------------------------------


def test_get_statistics(make_settings, catalog):
    settings = make_settings()
    eng = ImageSearchEngine(settings)
    eng.build_index()
    stats = eng.get_statistics()
    assert stats["products"] == 4
    assert stats["images"] == N_IMAGES
    assert stats["images_per_product"] == {"min": 2, "median": 2.5, "max": 3}
    assert stats["formats"] == {"JPEG": N_IMAGES}
    assert (stats["skipped"], stats["skipped_files"]) == (0, [])
    assert stats["model"] == "test_tiny"
    assert stats["embedding_dim"] == 64
    assert stats["similarity_metric"] == "cosine"
    assert stats["index_type"] == "IndexFlatIP"
    assert stats["index_size_bytes"] > 0
    assert stats["index_size_bytes"] == generation_file(settings).stat().st_size
    assert datetime.fromisoformat(stats["last_build"]).tzinfo is not None
    assert stats["data_dir"] == str(catalog)
    json.dumps(stats)  # JSON-ready (the CLI prints it)


def test_get_statistics_for_l2_and_an_odd_number_of_products(make_settings, tmp_path):
    write_catalog(tmp_path / "catalog", {"a": 1, "b": 4, "c": 2})
    eng = ImageSearchEngine(make_settings(similarity_metric="l2"))
    eng.build_index()
    stats = eng.get_statistics()
    assert stats["images_per_product"] == {"min": 1, "median": 2.0, "max": 4}
    assert (stats["similarity_metric"], stats["index_type"]) == ("l2", "IndexFlatL2")
    first = stats["last_build"], stats["build_id"]
    eng.remove_product("b")
    stats = eng.get_statistics()
    assert stats["images_per_product"] == {"min": 1, "median": 1.5, "max": 2}
    assert stats["build_id"] != first[1]


# --- "more like this" and image lookup by id -------------------------------------------------------------


def test_similar_to_product_leaves_the_product_out_and_ranks_the_others(ro_engine):
    hits = ro_engine.similar_to_product("red-disc", top_k=10)
    products = [h["product_id"] for h in hits]
    assert "red-disc" not in products
    assert sorted(products) == sorted(set(PRODUCTS) - {"red-disc"})  # every other product, once
    assert [h["rank"] for h in hits] == list(range(1, len(hits) + 1))
    sims = [h["similarity"] for h in hits]
    assert sims == sorted(sims, reverse=True)


def test_similar_to_product_unknown_product_raises(ro_engine):
    with pytest.raises(UnknownProductError):
        ro_engine.similar_to_product("no-such-product")


def test_image_file_resolves_ids_from_results_and_refuses_others(ro_engine, ro_queries):
    hit = ro_engine.search(ro_queries[0], top_k=1)[0]
    assert ro_engine.image_file(hit["image_id"]) == Path(hit["image_path"])
    for bad in ["../../etc/passwd", "", "0" * 16, hit["image_path"]]:
        with pytest.raises(LookupError):
            ro_engine.image_file(bad)


def test_byte_identical_photos_in_two_products_warn_and_show_in_stats(make_settings, catalog, caplog, capsys):
    import shutil

    from lookalike.cli import main

    src = next((catalog / "red-disc").glob("*.jpg"))
    shutil.copyfile(src, catalog / "green-bar" / "copied.jpg")
    settings = make_settings(tune=False)
    with caplog.at_level("WARNING"):
        ImageSearchEngine(settings).build_index(progress=False)
    assert "copied.jpg" in caplog.text
    stats = ImageSearchEngine(settings)
    stats.load_index()
    facts = stats.get_statistics()
    assert facts["duplicates"] == 1
    assert sorted(facts["duplicate_files"][0]) == sorted([f"red-disc/{src.name}", "green-bar/copied.jpg"])
    main(["stats", "--cache-dir", str(settings.cache_dir), "--data-dir", str(settings.data_dir)])
    assert "same photo in several products" in capsys.readouterr().out
