"""DataManager and the on-disk formats: embedding cache, index metadata, atomic writes, no pickle."""

from __future__ import annotations

import io
import json
import logging
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest

from conftest import PRODUCTS, product_image
from lookalike import DataManager, ImageSearchEngine
from lookalike.catalog import CatalogError
from lookalike.store import EmbeddingCache, atomic_write_bytes, atomic_write_json

N_IMAGES = sum(PRODUCTS.values())


def expected_dataset(catalog: Path) -> tuple[list[str], list[str]]:
    """Sorted by product, then file name, written out by hand from the fixture's layout."""
    paths, ids = [], []
    for product in sorted(PRODUCTS):
        for v in range(PRODUCTS[product]):
            paths.append(str(catalog / product / f"{product}-{v:02d}.jpg"))
            ids.append(product)
    return paths, ids


def seeded_embeddings(n: int, dim: int = 8) -> np.ndarray:
    return np.random.default_rng(7).normal(size=(n, dim)).astype(np.float32)


def temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


# --- DataManager ----------------------------------------------------------------------------------------------


def test_load_dataset_lists_images_sorted_with_their_products(make_settings, catalog):
    paths, ids = DataManager(make_settings()).load_dataset()
    assert (paths, ids) == expected_dataset(catalog)
    assert ids == sorted(ids)


def test_load_dataset_ignores_hidden_and_other_files(make_settings, catalog):
    (catalog / "red-disc" / "notes.txt").write_text("not an image")
    (catalog / "red-disc" / ".hidden.jpg").write_bytes(b"x")
    (catalog / ".removed" / "old").mkdir(parents=True)
    product_image(0, 1).save(catalog / ".removed" / "old" / "a.jpg")
    assert DataManager(make_settings()).load_dataset() == expected_dataset(catalog)


def test_load_dataset_of_a_missing_folder_raises(make_settings, tmp_path):
    with pytest.raises(CatalogError, match="does not exist"):
        DataManager(make_settings(data_dir=tmp_path / "nope")).load_dataset()


def test_embeddings_round_trip(make_settings, catalog):
    manager = DataManager(make_settings())
    assert manager.load_embeddings() is None  # nothing saved yet
    paths, ids = manager.load_dataset()
    vectors = seeded_embeddings(len(paths))
    manager.save_embeddings(vectors, paths, ids)

    loaded = DataManager(make_settings()).load_embeddings()  # a new manager reads the file, not memory
    assert loaded is not None
    got_vectors, got_paths, got_ids = loaded
    assert got_paths == paths and got_ids == ids
    assert got_vectors.dtype == np.float32
    np.testing.assert_array_equal(got_vectors, vectors)


def test_load_embeddings_returns_only_images_unchanged_on_disk(make_settings, catalog):
    manager = DataManager(make_settings())
    paths, ids = manager.load_dataset()
    vectors = seeded_embeddings(len(paths))
    manager.save_embeddings(vectors, paths, ids)

    changed = catalog / "green-bar" / "green-bar-01.jpg"
    product_image(4, 9).save(changed)  # other pixels: size and mtime change
    deleted = catalog / "yellow-disc" / "yellow-disc-00.jpg"
    deleted.unlink()

    got_vectors, got_paths, got_ids = manager.load_embeddings()
    keep = [i for i, p in enumerate(paths) if p not in {str(changed), str(deleted)}]
    assert got_paths == [paths[i] for i in keep]
    assert got_ids == [ids[i] for i in keep]
    np.testing.assert_array_equal(got_vectors, vectors[keep])


def test_load_embeddings_is_none_when_nothing_matches(make_settings, catalog, tmp_path):
    manager = DataManager(make_settings())
    paths, ids = manager.load_dataset()
    manager.save_embeddings(seeded_embeddings(len(paths)), paths, ids)
    for path in paths:
        product_image(5, 3).save(path)
    assert manager.load_embeddings() is None
    # and a manager for a catalog that no longer exists finds nothing either
    assert DataManager(make_settings(data_dir=tmp_path / "gone")).load_embeddings() is None


def test_save_embeddings_refuses_columns_of_different_lengths(make_settings, catalog):
    manager = DataManager(make_settings())
    paths, ids = manager.load_dataset()
    with pytest.raises(ValueError, match="same length"):
        manager.save_embeddings(seeded_embeddings(len(paths) - 1), paths, ids)
    with pytest.raises(ValueError, match="same length"):
        manager.save_embeddings(seeded_embeddings(len(paths)), paths, ids[:-1])
    assert manager.load_embeddings() is None  # nothing was written


def test_caches_of_different_models_never_mix(make_settings, catalog):
    small = DataManager(make_settings(img_size=64))
    paths, ids = small.load_dataset()
    small.save_embeddings(seeded_embeddings(len(paths)), paths, ids)
    assert DataManager(make_settings(img_size=96)).load_embeddings() is None
    assert small.load_embeddings() is not None


def test_load_metadata_before_and_after_a_build(make_settings, catalog):
    settings = make_settings()
    assert DataManager(settings).load_metadata() is None
    ImageSearchEngine(settings).build_index()
    assert DataManager(settings).load_metadata() == expected_dataset(catalog)


def test_load_metadata_of_a_damaged_index_is_none(make_settings, catalog):
    settings = make_settings()
    ImageSearchEngine(settings).build_index()
    settings.metadata_path.write_text('{"format": "lookalike-index", "version": 1, "ima')
    assert DataManager(settings).load_metadata() is None


# --- formats: npz without pickle, JSON, FAISS -----------------------------------------------------------------


def test_nothing_written_is_a_pickle(make_settings, catalog):
    settings = make_settings()
    ImageSearchEngine(settings).build_index()
    manager = DataManager(settings)
    manager.save_embeddings(seeded_embeddings(N_IMAGES), *manager.load_dataset())

    files = [p for p in settings.cache_dir.rglob("*") if p.is_file()]
    npz = [p for p in files if p.suffix == ".npz"]
    assert len(npz) == 2  # the engine's cache and the DataManager's cache
    assert settings.metadata_path in files
    assert any(p.suffix == ".faiss" for p in files)
    for path in files:
        assert not path.read_bytes().startswith(b"\x80"), f"{path} looks like a pickle"
    for path in npz:
        with zipfile.ZipFile(path) as z:  # the arrays inside are .npy, not pickles either
            for name in z.namelist():
                assert not z.read(name).startswith(b"\x80")
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
        assert set(arrays) == {"paths", "sizes", "mtimes", "formats", "vectors"}
        assert all(a.dtype != object for a in arrays.values())
        assert arrays["vectors"].shape == (N_IMAGES, arrays["vectors"].shape[1])
    manifest = json.loads(settings.metadata_path.read_text(encoding="utf-8"))
    assert manifest["images"]["product_id"] == expected_dataset(catalog)[1]


# --- atomic writes --------------------------------------------------------------------------------------------


def test_atomic_write_bytes_replaces_content_and_leaves_no_temp_files(tmp_path):
    target = tmp_path / "sub" / "dir" / "file.bin"
    atomic_write_bytes(target, b"first")
    atomic_write_bytes(target, b"second version")
    assert target.read_bytes() == b"second version"
    assert [p.name for p in target.parent.iterdir()] == ["file.bin"]


def test_atomic_write_json_round_trip(tmp_path):
    target = tmp_path / "meta.json"
    value = {"name": "Kaffee für Zwei ☕", "n": [1, 2.5, None, True]}
    atomic_write_json(target, value)
    assert json.loads(target.read_text(encoding="utf-8")) == value
    assert temp_files(tmp_path) == []


def test_a_failing_write_keeps_the_old_content(tmp_path, monkeypatch):
    target = tmp_path / "file.bin"
    atomic_write_bytes(target, b"old content")

    def failing_fsync(fd):
        raise OSError(28, "No space left on device (simulated)")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="simulated"):
        atomic_write_bytes(target, b"new content that never lands")
    monkeypatch.undo()
    assert target.read_bytes() == b"old content"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]

    with pytest.raises(TypeError):
        atomic_write_bytes(target, "text, not bytes")  # fails inside the write itself
    assert target.read_bytes() == b"old content"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]


def test_a_failing_rename_keeps_the_old_content(tmp_path, monkeypatch):
    target = tmp_path / "file.bin"
    atomic_write_bytes(target, b"old content")

    def failing_replace(src, dst):
        raise PermissionError("rename refused (simulated)")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(PermissionError):
        atomic_write_bytes(target, b"new")
    monkeypatch.undo()
    assert target.read_bytes() == b"old content"
    assert temp_files(tmp_path) == []


def test_builds_leave_no_temp_files(make_settings, catalog):
    settings = make_settings()
    eng = ImageSearchEngine(settings)
    eng.build_index()
    eng.build_index(force_rebuild=True)
    eng.build_index(force_rebuild=True)
    assert temp_files(settings.cache_dir) == []
    # old generations are cleaned up; the previous one stays one commit for readers that just read its metadata
    assert len(list(settings.cache_dir.glob("index-*.faiss"))) == 2


# --- an unreadable embedding cache is only a cache ------------------------------------------------------------


def _engine_cache_file(settings) -> Path:
    files = list((settings.cache_dir / "embeddings").glob("*.npz"))
    assert len(files) == 1
    return files[0]


def test_an_unreadable_embedding_cache_is_ignored_with_a_warning(make_settings, catalog, caplog):
    settings = make_settings()
    eng = ImageSearchEngine(settings)
    eng.build_index()
    cache_file = _engine_cache_file(settings)
    cache_file.write_bytes(b"PK\x03\x04 this is not a zip archive any more")

    with caplog.at_level(logging.WARNING):
        report = eng.build_index()
    assert (report.extracted, report.reused, report.images) == (N_IMAGES, 0, N_IMAGES)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("unreadable embedding cache" in m and str(cache_file) in m for m in warnings)
    assert eng.build_index().extracted == 0  # the cache was rewritten and is good again


class _Payload:
    """Unpickling this runs os.mkdir(marker): proof that a cache was loaded with pickle."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_a_cache_holding_pickled_objects_is_never_unpickled(make_settings, catalog, tmp_path, caplog):
    settings = make_settings()
    eng = ImageSearchEngine(settings)
    eng.build_index()
    cache_file = _engine_cache_file(settings)
    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    np.savez(
        buf,
        paths=np.array([_Payload(marker)], dtype=object),
        sizes=np.array([1]),
        mtimes=np.array([1]),
        formats=np.array(["JPEG"]),
        vectors=np.zeros((1, 64), np.float32),
    )
    cache_file.write_bytes(buf.getvalue())

    with caplog.at_level(logging.WARNING):
        report = eng.build_index()
    assert not marker.exists()
    assert report.extracted == N_IMAGES
    assert any("unreadable embedding cache" in r.getMessage() for r in caplog.records)


def test_a_cache_with_columns_of_different_lengths_is_ignored(make_settings, catalog, caplog):
    settings = make_settings()
    eng = ImageSearchEngine(settings)
    eng.build_index()
    cache = EmbeddingCache.for_catalog(settings.cache_dir, eng.extractor.fingerprint, settings.data_dir)
    assert cache.path == _engine_cache_file(settings)
    buf = io.BytesIO()
    np.savez(
        buf,
        paths=np.array(["a", "b"]),
        sizes=np.array([1]),
        mtimes=np.array([1, 2]),
        formats=np.array(["JPEG", "JPEG"]),
        vectors=np.zeros((2, 64), np.float32),
    )
    cache.path.write_bytes(buf.getvalue())
    with caplog.at_level(logging.WARNING):
        assert cache.load().paths == []
    assert "unreadable embedding cache" in caplog.text
    assert eng.build_index().extracted == N_IMAGES
