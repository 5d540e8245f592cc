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


def test_nested_folders_inside_a_product_belong_to_it(tmp_path, caplog):
    touch(tmp_path / "shoe" / "1.jpg")
    touch(tmp_path / "shoe" / "extra" / "2.jpg")
    touch(tmp_path / "shoe" / "extra" / "deeper" / "3.png")
    touch(tmp_path / "shoe" / ".thumbs" / "4.jpg")  # hidden folders are skipped
    touch(tmp_path / "shoe" / "extra" / ".5.jpg")
    touch(tmp_path / "shoe" / "zz.jpg")
    with caplog.at_level(logging.INFO, logger="lookalike.catalog"):
        images = scan_catalog(tmp_path)
    rel = [(im.product_id, im.path.relative_to(tmp_path.resolve()).as_posix()) for im in images]
    assert rel == [
        ("shoe", "shoe/1.jpg"),
        ("shoe", "shoe/extra/2.jpg"),
        ("shoe", "shoe/extra/deeper/3.png"),
        ("shoe", "shoe/zz.jpg"),
    ]
    assert any("nested folder(s) deeper, extra belong to it" in r.getMessage() for r in caplog.records)


def test_flat_catalog_keeps_its_paths_and_image_ids(tmp_path):
    """Flat catalogs built before nested folders counted get the same images, order and ids as before."""
    from lookalike.ids import image_id_for

    for product, name in [("b", "2.jpg"), ("a", "x.png"), ("b", "10.jpg"), ("a", "a.jpg")]:
        touch(tmp_path / product / name)
    images = scan_catalog(tmp_path)
    rel = [im.path.relative_to(tmp_path.resolve()).as_posix() for im in images]
    assert rel == ["a/a.jpg", "a/x.png", "b/10.jpg", "b/2.jpg"]
    assert [image_id_for(r) for r in rel] == [image_id_for(f"{p}/{n}") for p, n in listing(images)]


def test_symlinked_folder_inside_a_product_is_not_followed(tmp_path):
    touch(tmp_path / "shoe" / "1.jpg")
    os.symlink(tmp_path / "shoe", tmp_path / "shoe" / "loop")
    assert listing(scan_catalog(tmp_path)) == [("shoe", "1.jpg")]


def test_duplicates_across_products_are_found_and_named(tmp_path, caplog):
    from lookalike.catalog import find_duplicates

    same = b"\xff\xd8 the very same bytes"
    touch(tmp_path / "cola" / "front.jpg", same)
    touch(tmp_path / "cola-zero" / "sub" / "copy.jpg", same)
    touch(tmp_path / "cola" / "again.jpg", same)  # also within one product: reported with its group
    touch(tmp_path / "fanta" / "other.jpg", b"\xff\xd8 other bytes, same size!")  # same size, other bytes
    touch(tmp_path / "fanta" / "twice-a.jpg", b"\xff\xd8 only in fanta")
    touch(tmp_path / "fanta" / "twice-b.jpg", b"\xff\xd8 only in fanta")  # one product: harmless
    with caplog.at_level(logging.WARNING, logger="lookalike.catalog"):
        groups = find_duplicates(scan_catalog(tmp_path))
    assert [[im.path.relative_to(tmp_path.resolve()).as_posix() for im in g] for g in groups] == [
        ["cola-zero/sub/copy.jpg", "cola/again.jpg", "cola/front.jpg"]
    ]
    (message,) = [r.getMessage() for r in caplog.records]
    assert "same photo is filed under 2 products" in message
    assert str(tmp_path.resolve() / "cola" / "front.jpg") in message and "copy.jpg (cola-zero)" in message


def test_no_duplicates_no_warning(tmp_path, caplog):
    from lookalike.catalog import find_duplicates

    touch(tmp_path / "a" / "1.jpg", b"\xff\xd8 one")
    touch(tmp_path / "b" / "1.jpg", b"\xff\xd8 two")
    with caplog.at_level(logging.WARNING, logger="lookalike.catalog"):
        assert find_duplicates(scan_catalog(tmp_path)) == []
    assert not caplog.records


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
