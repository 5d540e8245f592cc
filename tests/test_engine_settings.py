"""The index is the source of truth: the engine passes the settings an index recorded through one hook,
``_adopt_recorded_settings``, before it makes its extractor, and uses the adopted settings everywhere."""

from __future__ import annotations

from pathlib import Path

import pytest

import lookalike.engine
from lookalike import ImageSearchEngine, IndexMismatchError


def adopt_recorded(settings, recorded):
    """A stand-in for settings.adopt_recorded: the recorded catalog folder and input size win."""
    return settings.replace(data_dir=Path(recorded["data_dir"]), img_size=recorded["img_size"])


def test_the_hook_is_the_identity_until_wired(make_settings):
    settings = make_settings()
    assert lookalike.engine._adopt_recorded_settings(settings, {"img_size": 96}) is settings


def test_load_index_adopts_the_recorded_settings_before_making_the_extractor(
    make_settings, catalog, tmp_path, monkeypatch
):
    ImageSearchEngine(make_settings(img_size=96)).build_index()
    elsewhere = make_settings(data_dir=tmp_path / "not-here")  # another folder, no img_size flag
    with pytest.raises(IndexMismatchError, match="input_size"):
        ImageSearchEngine(elsewhere).load_index()  # the identity hook: the flags must repeat the build's

    monkeypatch.setattr(lookalike.engine, "_adopt_recorded_settings", adopt_recorded)
    engine = ImageSearchEngine(elsewhere)
    engine.load_index()
    assert engine.settings.img_size == 96 and engine.extractor.input_size == 96
    assert engine.data_root == catalog.resolve()
    hit = engine.search(next(catalog.rglob("*.jpg")), top_k=1)[0]
    assert Path(hit["image_path"]).is_file() and Path(hit["image_path"]).is_relative_to(catalog.resolve())
    assert engine.image_file(hit["image_id"]).is_file()


def test_build_index_adopts_the_recorded_settings_before_a_rebuild(make_settings, catalog, tmp_path, monkeypatch):
    ImageSearchEngine(make_settings(img_size=96)).build_index()
    monkeypatch.setattr(lookalike.engine, "_adopt_recorded_settings", adopt_recorded)
    engine = ImageSearchEngine(make_settings(data_dir=tmp_path / "not-here"))
    assert engine.extractor.input_size == 64  # made before the rebuild read the manifest: made again after it
    report = engine.build_index()
    assert report.images == sum(1 for _ in catalog.rglob("*.jpg"))
    assert engine.extractor.input_size == 96
    assert engine.get_statistics()["data_dir"] == str(catalog.resolve())
