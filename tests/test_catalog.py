"""scan_catalog: which files are products' images, in which order, and the errors for unusable folders."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from conftest import PRODUCTS
from lookalike.catalog import IMAGE_EXTENSIONS, CatalogError, scan_catalog, stat_image


def touch(path: Path, data: bytes = b"\xff\xd8 not decoded by the scan") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def listing(images) -> list[tuple[str, str]]:
    return [(im.product_id, im.path.name) for im in images]


def test_finds_every_image_of_the_fixture_catalog(catalog):
    images = scan_catalog(catalog)
    assert len(images) == sum(PRODUCTS.values())
    assert {im.product_id for im in images} == set(PRODUCTS)
    for im in images:
        assert im.path.is_absolute()
        assert im.path.parent.name == im.product_id
        assert im.size == im.path.stat().st_size > 0
        assert im.mtime_ns == im.path.stat().st_mtime_ns
        assert im.key == (str(im.path), im.size, im.mtime_ns)


def test_extensions_in_any_letter_case_are_found(tmp_path):
    names = ["a.JPG", "b.Jpeg", "c.png", "d.webp", "e.jpeg", "f.PNG", "g.WebP", "h.jpg"]
    for name in names:
        touch(tmp_path / "shoe" / name)
    assert listing(scan_catalog(tmp_path)) == [("shoe", name) for name in sorted(names)]


def test_hidden_entries_and_other_file_types_are_ignored(tmp_path):
    touch(tmp_path / "shoe" / "1.jpg")
    touch(tmp_path / "shoe" / ".hidden.jpg")
    touch(tmp_path / "shoe" / "._1.jpg")  # macOS resource fork
    touch(tmp_path / "shoe" / "notes.txt")
    touch(tmp_path / "shoe" / "anim.gif")
    touch(tmp_path / "shoe" / "scan.tiff")
    touch(tmp_path / "shoe" / "jpg")  # no extension at all
    touch(tmp_path / "shoe" / "photo.jpg.bak")
    (tmp_path / "shoe" / "folder.jpg").mkdir()  # a folder with an image's name
    touch(tmp_path / ".trash" / "old.jpg")  # a hidden product folder
    touch(tmp_path / ".DS_Store")
    assert listing(scan_catalog(tmp_path)) == [("shoe", "1.jpg")]


def test_loose_images_at_the_root_are_ignored_with_a_warning(tmp_path, caplog):
    touch(tmp_path / "shoe" / "1.jpg")
    touch(tmp_path / "loose.jpg")
    touch(tmp_path / "other.png")
    touch(tmp_path / "readme.txt")
    with caplog.at_level(logging.WARNING, logger="lookalike.catalog"):
        images = scan_catalog(tmp_path)
    assert listing(images) == [("shoe", "1.jpg")]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "2 image(s)" in warnings[0]
    assert "ignored" in warnings[0]


def test_nested_folders_inside_a_product_are_not_scanned(tmp_path):
    touch(tmp_path / "shoe" / "1.jpg")
    touch(tmp_path / "shoe" / "extra" / "2.jpg")
    assert listing(scan_catalog(tmp_path)) == [("shoe", "1.jpg")]


def test_order_is_sorted_by_product_then_file_name(tmp_path):
    # created in scrambled order so that creation order and directory order cannot explain the result
    scrambled = [("zeta", "2.jpg"), ("alpha", "b.png"), ("mid", "x.webp"), ("alpha", "a.jpg"), ("zeta", "10.jpg")]
    for product, name in scrambled:
        touch(tmp_path / product / name)
    expected = [("alpha", "a.jpg"), ("alpha", "b.png"), ("mid", "x.webp"), ("zeta", "10.jpg"), ("zeta", "2.jpg")]
    assert listing(scan_catalog(tmp_path)) == expected
    assert listing(scan_catalog(tmp_path)) == expected  # and again: deterministic


def test_product_folder_without_images_contributes_nothing(tmp_path):
    touch(tmp_path / "shoe" / "1.jpg")
    touch(tmp_path / "empty-product" / "notes.txt")
    (tmp_path / "bare").mkdir()
    assert [im.product_id for im in scan_catalog(tmp_path)] == ["shoe"]


def test_product_ids_keep_their_spelling(tmp_path):
    for product in ["Red Shoe", "sku-0001", "ünïcode"]:
        touch(tmp_path / product / "1.jpg")
    assert sorted(im.product_id for im in scan_catalog(tmp_path)) == sorted(["Red Shoe", "sku-0001", "ünïcode"])


def test_relative_and_home_paths_give_absolute_image_paths(tmp_path, monkeypatch):
    touch(tmp_path / "cat" / "shoe" / "1.jpg")
    monkeypatch.chdir(tmp_path)
    images = scan_catalog("cat")
    assert images[0].path == (tmp_path / "cat" / "shoe" / "1.jpg").resolve()
    monkeypatch.setenv("HOME", str(tmp_path))
    assert scan_catalog("~/cat")[0].path == images[0].path


def test_symlinked_image_is_found(tmp_path):
    target = touch(tmp_path / "elsewhere" / "real.jpg")
    (tmp_path / "cat" / "shoe").mkdir(parents=True)
    os.symlink(target, tmp_path / "cat" / "shoe" / "link.jpg")
    assert listing(scan_catalog(tmp_path / "cat")) == [("shoe", "link.jpg")]


def test_missing_folder_is_an_error(tmp_path):
    missing = tmp_path / "no-such-catalog"
    with pytest.raises(CatalogError) as info:
        scan_catalog(missing)
    message = str(info.value)
    assert str(missing) in message
    assert "does not exist" in message
    assert isinstance(info.value, ValueError)


def test_a_file_instead_of_a_folder_is_an_error(tmp_path):
    path = touch(tmp_path / "catalog.jpg")
    with pytest.raises(CatalogError) as info:
        scan_catalog(path)
    assert str(path) in str(info.value)
    assert "not a folder" in str(info.value)


def test_empty_catalog_is_an_error(tmp_path):
    with pytest.raises(CatalogError) as info:
        scan_catalog(tmp_path)
    message = str(info.value)
    assert "no images found" in message
    assert str(tmp_path.resolve()) in message
    assert "<product_id>/<image>" in message
    for ext in IMAGE_EXTENSIONS:
        assert ext in message


def test_catalog_with_only_loose_images_and_other_files_is_an_error(tmp_path):
    touch(tmp_path / "loose.jpg")
    touch(tmp_path / "shoe" / "anim.gif")
    with pytest.raises(CatalogError, match="no images found"):
        scan_catalog(tmp_path)


def test_stat_image_describes_one_file_like_the_scan(catalog):
    scanned = scan_catalog(catalog)[0]
    assert stat_image(scanned.product_id, scanned.path) == scanned
