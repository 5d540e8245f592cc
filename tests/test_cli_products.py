"""The product subcommands: lookalike records / regions / export."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from conftest import PRODUCTS, product_image
from lookalike import ImageSearchEngine, Settings
from lookalike.cli import main
from lookalike.export import read_export


@pytest.fixture(autouse=True)
def clean_environment(tmp_path, monkeypatch):
    for name in list(os.environ):
        if name.startswith("LOOKALIKE_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def flags(tmp_path, catalog) -> list[str]:
    return ["--model-name", "test_tiny", "--data-dir", str(catalog), "--cache-dir", str(tmp_path / "cache")]


def test_records_command_reports_and_saves(flags, catalog, tmp_path, capsys):
    assert main(["records", *flags]) == 1  # no index yet: one line saying to build it
    assert "build the index first" in capsys.readouterr().err
    assert main(["index", *flags]) == 0
    (catalog / "products.csv").write_text("product_id,name,price\nred-disc,Red,2\ngreen-bar,Green,abc\nghost,G,1\n")
    capsys.readouterr()
    assert main(["records", *flags]) == 0
    out = capsys.readouterr().out
    assert "2 record(s) from" in out and "1 line(s) skipped" in out and "record without a folder: ghost" in out
    assert "products.csv:3: column price: 'abc' is not a number" in out
    engine = ImageSearchEngine(Settings(config_file=None, environ={}, model_name="test_tiny", data_dir=catalog,
                                        cache_dir=tmp_path / "cache"))  # fmt: skip
    engine.load_index()
    saved = engine.records
    assert saved["red-disc"].name == "Red" and set(saved) == {"red-disc", "ghost"}
    assert main(["records", *flags, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["products_without_record"] == sorted(set(PRODUCTS) - {"red-disc"})


def test_regions_and_export_commands(flags, tmp_path, capsys):
    assert main(["index", *flags]) == 0
    canvas = Image.new("RGB", (400, 200), (128, 128, 128))
    canvas.paste(product_image(0, 60, size=180), (10, 10))
    canvas.paste(product_image(1, 60, size=180), (210, 10))
    canvas.save(tmp_path / "two.png")
    capsys.readouterr()
    assert main(["regions", str(tmp_path / "two.png"), *flags, "--json"]) == 0
    regions = json.loads(capsys.readouterr().out)
    assert {r["hits"][0]["product_id"] for r in regions} >= {"red-disc", "green-bar"}
    assert main(["regions", str(tmp_path / "two.png"), *flags]) == 0
    assert "1. box " in capsys.readouterr().out

    assert main(["export", str(tmp_path / "out.parquet"), *flags]) == 0
    got = read_export(tmp_path / "out.parquet")
    assert len(got.image_ids) == sum(PRODUCTS.values()) and np.isfinite(got.vectors).all()
    assert main(["export", str(tmp_path / "out.parquet"), *flags]) == 1  # exists: refused, one line on stderr
    assert "already exists" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "npy"), "--format", "npy", *flags]) == 0
    assert (tmp_path / "npy" / "vectors.npy").is_file()


def test_search_with_where_and_box_shows_name_and_price(flags, catalog, tmp_path, capsys):
    (catalog / "products.csv").write_text(
        "product_id,name,price,category\nred-disc,Red disc,2.5,dairy\ngreen-bar,Green bar,12,bakery\n"
        "yellow-disc,Yellow disc,30,dairy\n"
    )
    assert main(["index", *flags]) == 0
    canvas = Image.new("RGB", (300, 200), (128, 128, 128))
    canvas.paste(product_image(1, 50, size=120), (160, 40))  # green-bar on the right
    canvas.save(tmp_path / "shelf.png")
    capsys.readouterr()
    assert main(["search", str(tmp_path / "shelf.png"), *flags, "--box", "160,40,280,160", "--top-k", "2"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:5] == ["rank", "product", "name", "price", "similarity"]
    assert "green-bar  Green bar  12.00" in out.replace("   ", "  ")
    args = ["search", str(tmp_path / "shelf.png"), *flags, "--where", "category=dairy", "--where", "price<=20"]
    assert main([*args, "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["product_id"] for r in rows] == ["red-disc"] and rows[0]["record"]["price"] == 2.5
    assert main([*args, "--csv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("query,rank,product_id,name,price,similarity") and ",Red disc,2.5," in lines[1]

    assert main(["search", str(tmp_path / "shelf.png"), *flags, "--where", "colour=red"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown field 'colour'; known fields: product_id, name" in err[0]
    for box in ("1,2,3", "500,500,600,600", "10,10,5,5"):
        assert main(["search", str(tmp_path / "shelf.png"), *flags, "--box", box]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "box" in err[0]
