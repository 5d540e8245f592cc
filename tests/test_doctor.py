"""lookalike doctor: planted duplicates, a mislabelled photo, tiny and blurred photos are found; a clean catalog is
not flagged."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from conftest import product_image, write_catalog
from lookalike.doctor import dhash, diagnose, laplacian_variance, photo_facts

SIX = {f"p{i}": 6 for i in range(6)}


@pytest.fixture
def clean(tmp_path: Path) -> Path:
    root = tmp_path / "catalog"
    write_catalog(root, SIX)
    return root


def test_hashes_survive_reencoding_but_not_another_photo(tmp_path: Path):
    img = product_image(0, 1, size=200)
    img.save(tmp_path / "a.jpg", quality=95)
    img.resize((140, 140)).save(tmp_path / "b.jpg", quality=60)
    product_image(2, 1, size=200).save(tmp_path / "c.jpg")
    a, b, c = (photo_facts(tmp_path / f"{n}.jpg", 10**8) for n in "abc")
    assert a.ok and (a.width, a.height) == (200, 200)
    assert a.sha256 != b.sha256
    assert (a.dhash ^ b.dhash).bit_count() <= 6
    assert (a.dhash ^ c.dhash).bit_count() > 12


def test_blur_lowers_laplacian_variance():
    img = product_image(1, 0, size=256).convert("L")
    assert laplacian_variance(img.filter(ImageFilter.GaussianBlur(6))) < laplacian_variance(img) / 5
    assert dhash(img) == dhash(img.copy())


def test_clean_catalog_has_no_flags(clean: Path, make_settings, tmp_path: Path):
    report = diagnose(make_settings(data_dir=clean), out_dir=tmp_path / "out")
    assert report["counts"] == {"images": 36, "checked": 36, "products": 6, "unreadable": 0}
    assert report["duplicates"] == [] and report["mislabelled"] == []
    assert report["space"] == "lda-cross-fitted"
    assert json.loads((tmp_path / "out" / "doctor.json").read_text(encoding="utf-8"))["counts"]["images"] == 36
    page = (tmp_path / "out" / "doctor.html").read_text(encoding="utf-8")
    assert "Every photo looks most like its own product." in page


def test_planted_problems_are_found(clean: Path, make_settings, tmp_path: Path):
    shutil.copyfile(clean / "p0" / "p0-01.jpg", clean / "p1" / "copy-exact.jpg")
    Image.open(clean / "p2" / "p2-03.jpg").resize((120, 120)).save(clean / "p3" / "copy-resized.jpg", quality=70)
    shutil.move(clean / "p4" / "p4-05.jpg", clean / "p5" / "moved.jpg")
    Image.new("RGB", (40, 30), (200, 10, 10)).save(clean / "p0" / "tiny.jpg")
    product_image(1, 9).filter(ImageFilter.GaussianBlur(5)).save(clean / "p1" / "blurred.jpg")
    (clean / "p2" / "broken.jpg").write_bytes(b"not an image")

    report = diagnose(make_settings(data_dir=clean), out_dir=tmp_path / "out")

    pairs = {(d["kind"], frozenset((d["a"]["path"], d["b"]["path"]))) for d in report["duplicates"]}
    assert ("exact", frozenset(("p0/p0-01.jpg", "p1/copy-exact.jpg"))) in pairs
    assert any(p == frozenset(("p2/p2-03.jpg", "p3/copy-resized.jpg")) for _, p in pairs)
    assert len(pairs) == 2
    mis = {d["path"]: d for d in report["mislabelled"]}
    assert mis["p5/moved.jpg"]["looks_like"] == "p4"
    assert len(mis) <= 2
    assert [d["path"] for d in report["tiny"]] == ["p0/tiny.jpg"]
    assert "p1/blurred.jpg" in {d["path"] for d in report["blurred"]}
    assert report["unreadable"][0]["path"] == "p2/broken.jpg"
    page = (tmp_path / "out" / "doctor.html").read_text(encoding="utf-8")
    assert "p5/moved.jpg" in page and "data:image/jpeg;base64," in page
    assert np.isfinite([d["margin"] for d in report["mislabelled"]]).all()


def test_cli_doctor_writes_the_report(clean: Path, tmp_path: Path, capsys, monkeypatch):
    from lookalike.cli import main

    monkeypatch.chdir(tmp_path)
    shutil.copyfile(clean / "p0" / "p0-01.jpg", clean / "p1" / "copy.jpg")
    out = tmp_path / "report"
    args = ["doctor", "--catalog", str(clean), "--out", str(out), "--model-name", "test_tiny"]
    assert main([*args, "--cache-dir", str(tmp_path / "cache")]) == 0
    text = capsys.readouterr().out
    assert "checked 37 of 37 photos of 6 products" in text
    assert "    1 duplicate pair(s) across products" in text
    assert (out / "doctor.html").is_file() and (out / "doctor.json").is_file()
