"""The ``lookalike`` command line: subcommands, settings precedence, error reporting, the console script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import PRODUCTS, product_image, write_catalog
from lookalike import ImageSearchEngine, Settings, __version__
from lookalike.cli import main

N_IMAGES = sum(PRODUCTS.values())
SCRIPT = Path(sys.executable).with_name("lookalike")


@pytest.fixture(autouse=True)
def clean_environment(tmp_path, monkeypatch):
    """No LOOKALIKE_* variables and no configs/configs.yaml from the developer's checkout."""
    for name in list(os.environ):
        if name.startswith("LOOKALIKE_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def flags(tmp_path) -> list[str]:
    return [
        "--model-name",
        "test_tiny",
        "--data-dir",
        str(tmp_path / "catalog"),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--batch-size",
        "4",
    ]


@pytest.fixture
def indexed(catalog, flags, capsys) -> list[str]:
    """The catalog indexed through the CLI; returns the settings flags."""
    assert main(["index", *flags]) == 0
    capsys.readouterr()
    return flags


@pytest.fixture
def query(tmp_path) -> Path:
    """A held-out view of red-disc."""
    path = tmp_path / "query.jpg"
    product_image(0, 50).save(path)
    return path


def library_settings(tmp_path, **kw) -> Settings:
    values = dict(model_name="test_tiny", data_dir=tmp_path / "catalog", cache_dir=tmp_path / "cache", batch_size=4)
    values.update(kw)
    return Settings(config_file=None, environ={}, **values)


def run_error(argv, capsys) -> str:
    """Run a command that must fail; return its single error line."""
    code = main(argv)
    out, err = capsys.readouterr()
    assert code != 0
    assert "Traceback" not in err and "Traceback" not in out
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("lookalike: error:")]
    assert len(errors) == 1, err
    assert lines[-1] == errors[0]
    return errors[0]


# --- subcommands ----------------------------------------------------------------------------------------------


def test_index_builds_and_reuses_the_cache(catalog, flags, tmp_path, capsys):
    assert main(["index", *flags]) == 0
    out = capsys.readouterr().out
    assert f"indexed {N_IMAGES} images of 4 products ({N_IMAGES} extracted, 0 from cache)" in out
    assert (tmp_path / "cache" / "metadata.json").is_file()

    assert main(["index", *flags]) == 0
    assert f"(0 extracted, {N_IMAGES} from cache)" in capsys.readouterr().out
    assert main(["index", "--force", *flags]) == 0
    assert f"({N_IMAGES} extracted, 0 from cache)" in capsys.readouterr().out


def test_index_says_what_it_did_about_tuning(catalog, flags, capsys):
    assert main(["index", *flags]) == 0  # on by default; four products are too few, and it says so
    out = capsys.readouterr().out
    assert "tuning: declined (" in out and "products" in out
    assert main(["index", *flags, "--tune", "false"]) == 0
    assert "tuning: off (tune: false)" in capsys.readouterr().out


def test_index_lists_skipped_files(catalog, flags, capsys):
    empty = catalog / "red-disc" / "empty.jpg"
    empty.write_bytes(b"")
    assert main(["index", *flags]) == 0
    out = capsys.readouterr().out
    assert f"skipped {empty}: empty file (0 bytes)" in out


def test_search_prints_a_table(indexed, query, capsys):
    assert main(["search", str(query), *indexed]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["rank", "product", "similarity", "image"]
    assert set(lines[1]) <= {"-", " "}
    rows = [line.split() for line in lines[2:]]
    assert len(rows) == 4  # 4 products, one row each
    assert [r[0] for r in rows] == ["1", "2", "3", "4"]
    assert rows[0][1] == "red-disc"
    assert sorted(r[1] for r in rows) == sorted(PRODUCTS)


def test_search_json_matches_the_library(indexed, query, tmp_path, capsys):
    assert main(["search", str(query), "--json", "--top-k", "3", *indexed]) == 0
    hits = [json.loads(line) for line in capsys.readouterr().out.splitlines()]  # JSON lines: one per result
    assert len(hits) == 3 and all(h["query"] == str(query) for h in hits)
    assert all(
        isinstance(h, dict) and {"rank", "product_id", "similarity", "image_id", "image_path"} <= set(h) for h in hits
    )
    eng = ImageSearchEngine(library_settings(tmp_path))
    eng.load_index()
    expected = eng.search(query, top_k=3)
    assert [(h["product_id"], h["image_id"]) for h in hits] == [(h["product_id"], h["image_id"]) for h in expected]
    assert [h["similarity"] for h in hits] == pytest.approx([h["similarity"] for h in expected], abs=1e-5)


def test_search_image_level_and_min_similarity(indexed, query, capsys):
    assert main(["search", str(query), "--json", "--images", "--top-k", "3", *indexed]) == 0
    hits = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [h["product_id"] for h in hits] == ["red-disc"] * 3  # red-disc's three images

    assert main(["search", str(query), "--min-similarity", "1.5", *indexed]) == 0
    assert capsys.readouterr().out.strip() == "no match"
    assert main(["search", str(query), "--json", "--min-similarity", "1.5", *indexed]) == 0
    assert capsys.readouterr().out == ""  # no result, no line


def test_search_many_photos_and_a_folder(indexed, tmp_path, capsys):
    folder = tmp_path / "shots"
    (folder / "nested").mkdir(parents=True)
    product_image(1, 60).save(folder / "b-green.jpg")
    product_image(0, 61).save(folder / "nested" / "a-red.png")
    (folder / "notes.txt").write_text("not a photo")
    (folder / ".hidden.jpg").write_bytes(b"")
    single = tmp_path / "blue.jpg"
    product_image(2, 62).save(single)
    assert main(["search", str(single), str(folder), "--top-k", "1", *indexed]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["query", "rank", "product", "similarity", "image"]
    rows = [line.split() for line in lines[2:]]
    assert [(r[0], r[2]) for r in rows] == [
        (str(single), "blue-cross"),
        (str(folder / "b-green.jpg"), "green-bar"),
        (str(folder / "nested" / "a-red.png"), "red-disc"),
    ]


def test_search_json_lines_and_csv_agree(indexed, tmp_path, capsys):
    import csv
    import io

    paths = []
    for look in (0, 3):
        paths.append(tmp_path / f"q{look}.jpg")
        product_image(look, 70).save(paths[-1])
    assert main(["search", *map(str, paths), "--json", "--top-k", "2", *indexed]) == 0
    hits = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(h["query"], h["rank"]) for h in hits] == [(str(p), r) for p in paths for r in (1, 2)]
    assert main(["search", *map(str, paths), "--csv", "--top-k", "2", *indexed]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert list(rows[0])[:4] == ["query", "rank", "product_id", "similarity"]
    assert [(r["query"], r["product_id"], r["image_id"]) for r in rows] == [
        (h["query"], h["product_id"], h["image_id"]) for h in hits
    ]


def test_search_folder_without_photos_is_an_error(indexed, tmp_path, capsys):
    (tmp_path / "empty-folder").mkdir()
    assert "holds no photos" in run_error(["search", str(tmp_path / "empty-folder"), *indexed], capsys)


def test_each_subcommand_help_shows_its_own_options_with_descriptions(capsys):
    from lookalike.cli import COMMAND_SETTINGS
    from lookalike.settings import describe_setting

    helps = {}
    for command in COMMAND_SETTINGS:
        with pytest.raises(SystemExit):
            main([command, "--help"])
        helps[command] = capsys.readouterr().out
    assert "--host" in helps["serve"] and "--port" in helps["serve"]
    for command in set(COMMAND_SETTINGS) - {"serve"}:
        assert "--host" not in helps[command] and "--max-concurrent-searches" not in helps[command], command
    assert "--model-name" in helps["index"] and "--model-name" not in helps["search"]
    assert "--csv" in helps["search"] and "--csv" not in helps["stats"]
    flat = " ".join(helps["index"].split())
    assert " ".join(describe_setting("exact_below").split()) in flat
    for command, text in helps.items():  # every option has a description
        lines = text.splitlines()
        for i, line in enumerate(lines):
            stripped = line.strip()
            if stripped.startswith("--") and len(stripped.split()) <= 2:  # flag alone: its help on the next line
                assert i + 1 < len(lines) and lines[i + 1].startswith(" " * 10), (command, line)


def test_search_accepts_build_settings_that_agree_with_the_index(indexed, query, capsys):
    assert main(["search", str(query), "--model-name", "test_tiny", "--pooling", "center", *indexed]) == 0


def test_stats(indexed, capsys):
    assert main(["stats", "--json", *indexed]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert (stats["products"], stats["images"], stats["model"]) == (4, N_IMAGES, "test_tiny")
    assert stats["images_per_product"] == {"min": 2, "median": 2.5, "max": 3}

    assert main(["stats", *indexed]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "products: 4" in out
    assert f"images: {N_IMAGES}" in out
    assert "model: test_tiny" in out


def test_eval_writes_json(catalog, flags, tmp_path, capsys):
    queries = tmp_path / "queries"
    write_catalog(queries, PRODUCTS, start_variant=50)
    out_file = tmp_path / "results" / "eval.json"
    argv = ["eval", "--catalog", str(catalog), "--queries", str(queries), "--json", str(out_file), *flags]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "recall@1" in out and "map@r" in out
    header = next(line.split() for line in out.splitlines() if line.startswith("protocol"))
    row = next(line.split() for line in out.splitlines() if line.startswith("photo->catalog"))
    assert header[-1] == "product_recall@1" and row[-1] == "1.000"  # the first product search() answers
    assert f"wrote {out_file}" in out
    result = json.loads(out_file.read_text(encoding="utf-8"))
    metrics = result["protocols"]["photo->catalog"]["metrics"]
    assert metrics["recall@1"] == 1.0
    assert metrics["queries"] == N_IMAGES
    assert not (tmp_path / "cache" / "metadata.json").exists()  # evaluation leaves the user's index alone


def test_eval_leave_one_out(catalog, flags, capsys):
    assert main(["eval", "--catalog", str(catalog), *flags]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"catalog {catalog}: {N_IMAGES} images of 4 products")
    rows = [line.split() for line in out.splitlines() if line.startswith("leave-one-out")]
    assert rows and rows[0][1] == str(N_IMAGES)  # protocol, queries, metrics...


def test_eval_report_is_a_self_contained_page(catalog, flags, tmp_path, capsys):
    queries = tmp_path / "queries"
    write_catalog(queries, PRODUCTS, start_variant=50)
    report = tmp_path / "report"
    argv = ["eval", "--catalog", str(catalog), "--queries", str(queries), "--report", str(report), *flags]
    assert main(argv) == 0
    page = (report / "index.html").read_text(encoding="utf-8")
    assert "photo-&gt;catalog" in page and "leave-one-out" in page
    assert "worst queries" in page and "Most confused" in page and "Per-product recall" in page
    assert page.count("data:image/jpeg;base64,") >= 6  # query and result thumbnails, inlined
    assert "http://" not in page and "https://" not in page


def test_add_then_remove(indexed, catalog, tmp_path, capsys):
    shots = []
    for v in (1, 2):
        path = tmp_path / "incoming" / f"shot-{v}.jpg"
        path.parent.mkdir(exist_ok=True)
        product_image(5, v).save(path)
        shots.append(str(path))
    assert main(["add", "pink-cross", *shots, *indexed]) == 0
    out = capsys.readouterr().out
    assert f"added 2 image(s) to pink-cross; the index now holds {N_IMAGES + 2} images" in out
    assert sorted(p.name for p in (catalog / "pink-cross").iterdir()) == ["shot-1.jpg", "shot-2.jpg"]

    assert main(["search", shots[0], "--json", "--top-k", "1", *indexed]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["product_id"] == "pink-cross"

    assert main(["remove", "green-bar", *indexed]) == 0
    out = capsys.readouterr().out
    assert out.startswith("removed green-bar (3 images); its folder moved to ")
    assert f"the index now holds {N_IMAGES - 1} images" in out
    assert main(["stats", "--json", *indexed]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert (stats["products"], stats["images"]) == (4, N_IMAGES - 1)


# --- settings precedence --------------------------------------------------------------------------------------


def test_flags_override_environment_variables(catalog, flags, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LOOKALIKE_MODEL_NAME", "efficientnet_lite0")
    monkeypatch.setenv("LOOKALIKE_DATA_DIR", str(tmp_path / "no-such-catalog"))
    monkeypatch.setenv("LOOKALIKE_CACHE_DIR", str(tmp_path / "env-cache"))
    monkeypatch.setenv("LOOKALIKE_SIMILARITY_METRIC", "l2")
    assert main(["index", *flags, "--similarity-metric", "cosine"]) == 0
    assert (tmp_path / "cache" / "metadata.json").is_file()
    assert not (tmp_path / "env-cache").exists()
    capsys.readouterr()
    assert main(["stats", "--json", *flags, "--similarity-metric", "cosine"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert (stats["model"], stats["similarity_metric"], stats["data_dir"]) == ("test_tiny", "cosine", str(catalog))


def test_environment_variables_apply_without_flags(catalog, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LOOKALIKE_MODEL_NAME", "test_tiny")
    monkeypatch.setenv("LOOKALIKE_DATA_DIR", str(catalog))
    monkeypatch.setenv("LOOKALIKE_CACHE_DIR", str(tmp_path / "env-cache"))
    monkeypatch.setenv("LOOKALIKE_SIMILARITY_METRIC", "l2")
    assert main(["index"]) == 0
    assert (tmp_path / "env-cache" / "metadata.json").is_file()
    capsys.readouterr()
    assert main(["stats", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert (stats["model"], stats["similarity_metric"]) == ("test_tiny", "l2")


# --- errors: one line on stderr, non-zero exit, no traceback --------------------------------------------------


def test_error_missing_data_dir(flags, capsys):
    line = run_error(["index", *flags], capsys)  # the catalog fixture is not used: the folder does not exist
    assert "does not exist" in line


def test_error_search_before_index(catalog, flags, query, capsys):
    line = run_error(["search", str(query), *flags], capsys)
    assert "build the index first" in line
    line = run_error(["stats", *flags], capsys)
    assert "build the index first" in line


def test_error_unknown_model_name(catalog, flags, capsys):
    line = run_error(["index", *flags, "--model-name", "resnet9000"], capsys)
    assert "resnet9000" in line and "test_tiny" in line  # names the bad value and what is allowed


def test_error_bad_image_as_query(indexed, tmp_path, capsys):
    text = tmp_path / "notes.jpg"
    text.write_text("not a photo")
    assert str(text) in run_error(["search", str(text), *indexed], capsys)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    assert "empty file" in run_error(["search", str(empty), *indexed], capsys)
    assert "file not found" in run_error(["search", str(tmp_path / "missing.jpg"), *indexed], capsys)


def test_error_bad_arguments_of_library_calls(indexed, query, capsys):
    assert "top_k" in run_error(["search", str(query), "--top-k", "0", *indexed], capsys)
    assert "invalid product id" in run_error(["add", "../escape", str(query), *indexed], capsys)
    assert "unknown product" in run_error(["remove", "no-such-product", *indexed], capsys)
    assert "batch_size" in run_error(["index", *indexed, "--batch-size", "zero"], capsys)


def test_error_in_a_real_process_is_exactly_one_line(catalog, flags, query, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOKALIKE_")}
    proc = subprocess.run(
        [str(SCRIPT), "search", str(query), *flags], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300
    )
    assert proc.returncode == 1
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lookalike: error:"), proc.stderr


# --- the console script ---------------------------------------------------------------------------------------


def test_console_script_help(tmp_path):
    proc = subprocess.run([str(SCRIPT), "--help"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: lookalike")
    for command in ("index", "search", "stats", "eval", "add", "remove", "demo"):
        assert command in proc.stdout


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"lookalike {__version__}"


@pytest.mark.slow
def test_demo_finds_every_held_out_view(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOKALIKE_")}
    workdir = tmp_path / "demo"
    proc = subprocess.run(
        [str(SCRIPT), "demo", "--workdir", str(workdir)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "20/20" in proc.stdout
    assert "efficientnet_lite0" in proc.stdout
    assert len(list((workdir / "catalog").glob("*/*.jpg"))) == 60
    assert len(list((workdir / "queries").glob("*/*.jpg"))) == 20


def test_tuning_line_of_a_tuned_build():
    from lookalike.cli import _tuning_line

    tuned = {
        "status": "tuned",
        "validation": {"untuned": {"product_recall@1": 0.93}, "tuned": {"product_recall@1": 0.985}},
    }
    assert _tuning_line(tuned) == "tuning: tuned (held-out catalog recall@1 0.930 -> 0.985)"
    assert _tuning_line({"status": "tuned"}) == "tuning: tuned"
