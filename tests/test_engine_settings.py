"""The index is the source of truth: the engine adopts the settings an index recorded
(:func:`lookalike.settings.adopt_recorded`) before it makes its extractor, and uses them everywhere."""

from __future__ import annotations

from pathlib import Path

import pytest

from lookalike import ImageSearchEngine, IndexMismatchError, Settings


def only_cache(cache_dir: Path, **kw) -> Settings:
    """What a user gives from another folder: the cache folder (and the test backbone), nothing else."""
    return Settings(config_file=None, environ={}, model_name="test_tiny", cache_dir=cache_dir, **kw)


def test_a_flag_that_contradicts_the_index_names_both_values(make_settings, catalog, tmp_path):
    ImageSearchEngine(make_settings(img_size=96)).build_index()
    with pytest.raises(IndexMismatchError, match="img_size=96.*img_size=80"):
        ImageSearchEngine(only_cache(tmp_path / "cache", img_size=80)).load_index()


def test_load_index_adopts_the_recorded_settings_before_making_the_extractor(
    make_settings, catalog, tmp_path, monkeypatch
):
    ImageSearchEngine(make_settings(img_size=96)).build_index()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    engine = ImageSearchEngine(only_cache(tmp_path / "cache"))
    engine.load_index()
    assert engine.settings.img_size == 96 and engine.extractor.input_size == 96
    assert engine.data_root == catalog.resolve()
    hit = engine.search(next(catalog.rglob("*.jpg")), top_k=1)[0]
    assert Path(hit["image_path"]).is_file() and Path(hit["image_path"]).is_relative_to(catalog.resolve())
    assert engine.image_file(hit["image_id"]).is_file()


def test_build_index_adopts_the_recorded_settings_before_a_rebuild(make_settings, catalog, tmp_path):
    ImageSearchEngine(make_settings(img_size=96)).build_index()
    engine = ImageSearchEngine(only_cache(tmp_path / "cache"))
    assert engine.extractor.input_size == 64  # made before the rebuild read the manifest: made again after it
    report = engine.build_index()
    assert report.images == sum(1 for _ in catalog.rglob("*.jpg"))
    assert engine.extractor.input_size == 96
    assert engine.get_statistics()["data_dir"] == str(catalog.resolve())
