"""Catalog tuning (projection fitted on the catalog's own folders) and the calibrated "no match" answer."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import product_image, write_catalog
from lookalike import ImageSearchEngine, IndexFileError
from lookalike.cli import main
from lookalike.evaluation import describe_no_match, evaluate
from lookalike.tuning import (
    MIN_PRODUCTS,
    Projection,
    TuningDeclined,
    auroc,
    calibrate_no_match,
    fit_projection,
    holdout_split,
    lda,
    product_scores,
)

SIX = {f"p{i}": 4 for i in range(6)}  # six products (one look each), four photos each
EIGHT = {f"p{i}": 4 for i in range(8)}


def clustered(
    n_products: int, per_product: int, dim: int = 24, seed: int = 0, spread: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Raw vectors whose products differ along a few directions buried under shared, larger noise."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 1.0, (n_products, dim))
    centers[:, 8:] = 0  # only the first 8 dimensions tell products apart
    noise = rng.normal(0, spread, (n_products * per_product, dim))
    noise[:, 8:] *= 4.0  # ...while the others carry big, product-independent variation
    labels = np.repeat([f"p{i:02d}" for i in range(n_products)], per_product)
    return (np.repeat(centers, per_product, axis=0) + noise).astype(np.float32), labels


# --- the pure parts -------------------------------------------------------------------------------------------


def test_lda_keeps_one_direction_fewer_than_products_and_separates_them():
    raw, labels = clustered(10, 12)
    mean, matrix = lda(raw, labels, 0.1)
    assert matrix.shape == (raw.shape[1], 9)
    projected = (raw - mean) @ matrix

    # nearest class mean in the projection is right far more often than in the raw space
    def nearest_mean_accuracy(x):
        means = np.stack([x[labels == p].mean(0) for p in np.unique(labels)])
        return np.mean(np.unique(labels)[np.argmin(((x[:, None] - means[None]) ** 2).sum(-1), axis=1)] == labels)

    assert nearest_mean_accuracy(projected) > nearest_mean_accuracy(raw) + 0.2


def test_holdout_is_the_last_quarter_of_each_product_with_enough_images():
    labels = np.array(["a"] * 8 + ["b"] * 2 + ["c"] * 4)
    held = holdout_split(labels)
    assert held.tolist() == [False] * 6 + [True] * 2 + [False] * 2 + [False] * 3 + [True]


def test_fit_projection_reports_its_validation_and_is_deterministic():
    raw, labels = clustered(8, 10)
    a, b = fit_projection(raw, labels, dim=24), fit_projection(raw, labels, dim=24)
    np.testing.assert_array_equal(a.matrix, b.matrix)
    assert a.dim == 7 and a.raw_dim == 24
    val = a.info["validation"]
    assert val["tuned"]["product_recall@1"] >= val["untuned"]["product_recall@1"]
    assert val["tuned"]["queries"] == int(holdout_split(labels).sum())
    assert a.info["products"] == 8 and a.info["images"] == 80


def test_fit_projection_declines_a_catalog_too_small_to_learn_from():
    raw, labels = clustered(MIN_PRODUCTS - 1, 10)
    with pytest.raises(TuningDeclined, match=f"{MIN_PRODUCTS - 1} products with at least 3 images"):
        fit_projection(raw, labels, dim=24)
    raw, labels = clustered(8, 2)  # enough products, but two photos each
    with pytest.raises(TuningDeclined):
        fit_projection(raw, labels, dim=24)


def test_fit_projection_declines_when_it_does_not_beat_the_untuned_features(monkeypatch):
    raw, labels = clustered(8, 10)
    import lookalike.tuning as tuning

    noise_only = np.eye(24, dtype=np.float32)[:, 8:12]  # a "projection" onto dimensions that carry no product
    monkeypatch.setattr(tuning, "lda", lambda x, y, s: (x.mean(0), noise_only))
    with pytest.raises(TuningDeclined, match="keeping the untuned features"):
        fit_projection(raw, labels, dim=8)  # the untuned embedding here: exactly the informative dimensions


def test_projection_round_trips_through_bytes_without_pickle():
    raw, labels = clustered(8, 10)
    p = fit_projection(raw, labels, dim=24)
    q = Projection.from_bytes(p.to_bytes(), p.info)
    np.testing.assert_array_equal(p.apply(raw), q.apply(raw))
    with pytest.raises(ValueError, match="expects 24-d"):
        p.apply(raw[:, :10])


def test_product_scores_average_each_products_best_three():
    sims = np.array([[0.9, 0.8, 0.1, 0.7, 0.6, 0.5, 0.95]])
    labels = np.array(["a", "a", "a", "a", "b", "b", "c"])
    products, scores = product_scores(sims, labels)
    assert products.tolist() == ["a", "b", "c"]
    # a: best three of (.9, .8, .1, .7) = (.9 + .8 + .7) / 3; b: only two images; c: one
    np.testing.assert_allclose(scores[0], [0.8, 0.55, 0.95], rtol=1e-6)


def test_auroc_worked_by_hand():
    assert auroc([3, 4], [1, 2]) == 1.0
    assert auroc([1, 2], [3, 4]) == 0.0
    # pairs (pos, neg): (2,1) win, (2,3) lose, (4,1) win, (4,3) win -> 3/4
    assert auroc([2, 4], [1, 3]) == 0.75
    assert auroc([1], [1]) == 0.5  # a tie counts half


def test_calibration_scores_hidden_products_and_sets_a_threshold():
    raw, labels = clustered(12, 10, spread=0.2)  # tight products: photos of a hidden one match nothing well
    cal = calibrate_no_match(raw, labels, dim=24, tuned=True)
    assert cal is not None
    assert cal["folds"] == 4
    assert cal["hidden_product_queries"] > 0 and cal["in_catalog_queries"] > 0
    assert -1.0 <= cal["threshold"] <= 1.0
    assert 0.5 < cal["auroc_on_catalog"] <= 1.0  # hidden products score lower than held-out known ones
    assert calibrate_no_match(*clustered(3, 10), dim=24, tuned=False) is None  # too few products to hide any


# --- through the engine ----------------------------------------------------------------------------------------


@pytest.fixture
def six(tmp_path):
    root = tmp_path / "catalog"
    write_catalog(root, SIX)
    return root


def test_build_with_tuning_saves_the_projection_beside_the_index(make_settings, six, tmp_path):
    settings = make_settings(tune=True)
    engine = ImageSearchEngine(settings)
    report = engine.build_index()
    assert report.tuning["status"] == "tuned"
    manifest = json.loads(settings.metadata_path.read_text(encoding="utf-8"))
    assert manifest["tuning"]["status"] == "tuned"
    assert manifest["projection"]["dim"] == len(SIX) - 1 == engine.get_statistics()["embedding_dim"]
    projection_file = settings.cache_dir / manifest["files"]["projection"]["file"]
    assert projection_file.is_file()
    query = tmp_path / "q.jpg"
    product_image(2, 77).save(query)
    before = engine.search(query, top_k=3)
    assert before[0]["product_id"] == "p2"
    fresh = ImageSearchEngine(settings)
    fresh.load_index()
    assert [(h["product_id"], round(h["similarity"], 5)) for h in fresh.search(query, top_k=3)] == [
        (h["product_id"], round(h["similarity"], 5)) for h in before
    ]
    # a damaged projection file is refused like a damaged index file
    projection_file.write_bytes(projection_file.read_bytes()[:-5] + b"xxxxx")
    with pytest.raises(IndexFileError, match="projection file"):
        ImageSearchEngine(settings).load_index()


def test_tuning_declines_on_a_small_catalog_and_the_index_still_works(make_settings, catalog, tmp_path):
    engine = ImageSearchEngine(make_settings(tune=True))  # the 4-product `catalog` fixture
    report = engine.build_index()
    assert report.tuning["status"] == "declined"
    assert "products with at least" in report.tuning["reason"]
    assert engine.get_statistics()["tuning"] == "declined"
    assert engine.get_statistics()["embedding_dim"] == engine.extractor.dim
    query = tmp_path / "q.jpg"
    product_image(0, 77).save(query)
    assert engine.search(query, top_k=1)[0]["product_id"] == "red-disc"


def test_adding_and_removing_products_keeps_a_tuned_index_searchable(make_settings, six, tmp_path):
    engine = ImageSearchEngine(make_settings(tune=True))
    engine.build_index()
    incoming = []
    for v in range(3):
        path = tmp_path / "in" / f"new-{v}.jpg"
        path.parent.mkdir(exist_ok=True)
        product_image(7, 200 + v).save(path)  # a look the projection never saw
        incoming.append(path)
    added = engine.add_images("newcomer", incoming)
    hit = engine.search(incoming[0], top_k=1, by_product=False)[0]
    assert hit["image_id"] == added["image_ids"][0]  # the added photo finds itself: same projection both ways
    assert hit["similarity"] == pytest.approx(1.0, abs=1e-4)
    engine.remove_product("p3")
    assert "p3" not in {h["product_id"] for h in engine.search(incoming[0], top_k=10)}
    assert engine.snapshot.adaptation.projection is not None  # documented fallback: no refit until tune/build


def test_search_marks_matches_and_only_matches_drops_the_rest(make_settings, six, tmp_path):
    engine = ImageSearchEngine(make_settings())
    engine.build_index()
    threshold = engine.no_match_threshold
    assert threshold is not None  # six products: enough to calibrate
    query = tmp_path / "q.jpg"
    product_image(4, 99).save(query)
    hits = engine.search(query, top_k=6)
    assert all(h["match"] == (h["similarity"] >= threshold) for h in hits)
    assert engine.search(query, top_k=6, only_matches=True) == [h for h in hits if h["match"]]
    assert engine.get_statistics()["no_match_threshold"] == threshold


def test_evaluate_with_tuning_fits_on_the_catalog_only(make_settings, tmp_path):
    catalog = tmp_path / "eight"
    write_catalog(catalog, EIGHT)
    queries = tmp_path / "queries"
    write_catalog(queries, EIGHT, start_variant=50)
    product_image(0, 90).save(queries / "p0" / "extra.jpg")
    result = evaluate(make_settings(tune=True), catalog, queries, leave_out_products=2)
    assert result["tuning"]["status"] == "tuned"
    assert result["tuning"]["images"] == sum(EIGHT.values())  # the catalog's photos only, never the queries
    assert result["protocols"]["photo->catalog"]["metrics"]["recall@1"] == 1.0
    nm = result["no_match"]
    assert len(nm["hidden_products"]) == 2
    assert nm["hidden_product_queries"] == 2 * 4
    assert 0.0 <= nm["auroc"] <= 1.0
    assert 0.0 <= nm["wrong_no_match_rate"] <= 1.0 and 0.0 <= nm["right_no_match_rate"] <= 1.0
    # every in-catalog photo is answered right here, so the right answers flagged match are those not flagged "no"
    assert nm["correct_flagged_match_rate"] == pytest.approx(1.0 - nm["wrong_no_match_rate"])
    assert f"{nm['correct_flagged_match_rate']:.1%} of right answers flagged match" in describe_no_match(nm)


def test_leaving_out_products_needs_queries(make_settings, six):
    with pytest.raises(ValueError, match="needs a queries folder"):
        evaluate(make_settings(), six, leave_out_products=2)


def test_cli_tune_reports_what_it_learned(make_settings, six, tmp_path, capsys):
    flags = ["--model-name", "test_tiny", "--data-dir", str(six), "--cache-dir", str(tmp_path / "cache")]
    assert main(["tune", *flags]) == 0
    out = capsys.readouterr().out
    assert out.startswith("tuned: 5-d projection from 24 images of 6 products")
    assert main(["stats", "--json", *flags]) == 0
    assert json.loads(capsys.readouterr().out)["tuning"] == "tuned"


def test_large_catalogs_are_checked_on_a_sample_of_products(monkeypatch):
    import lookalike.tuning as tuning

    labels = np.repeat([f"p{i:03d}" for i in range(50)], 3)
    mask = tuning.product_sample(labels, limit=10)
    assert len(np.unique(labels[mask])) == 10 and mask.sum() == 30  # whole products, never parts of them
    assert np.array_equal(mask, tuning.product_sample(labels, limit=10))  # seeded
    assert tuning.product_sample(labels, limit=100).all()
    monkeypatch.setattr(tuning, "MAX_CHECK_PRODUCTS", 6)
    raw, labels = clustered(20, 8, spread=0.2)
    projection = fit_projection(raw, labels, dim=24)
    assert projection.info["products"] == 20  # fitted on every product...
    assert projection.info["validation"]["tuned"]["queries"] == 6 * 2  # ...checked on six
    cal = calibrate_no_match(raw, labels, dim=24, tuned=True)
    # six products' two held-out photos each: hidden once (as a hidden product), visible in the other three folds
    assert (cal["hidden_product_queries"], cal["in_catalog_queries"]) == (6 * 2, 3 * 6 * 2)


def test_a_rebuild_keeps_catalog_tuning_and_says_so(make_settings, six, caplog):
    ImageSearchEngine(make_settings(tune=True)).build_index()
    plain = ImageSearchEngine(make_settings())  # tune left at its default
    with caplog.at_level("INFO", logger="lookalike"):
        report = plain.build_index()
    assert report.tuning["status"] == "tuned" and plain.get_statistics()["tuning"] == "tuned"
    assert sum("keeping catalog tuning" in r.getMessage() for r in caplog.records) == 1
    assert ImageSearchEngine(make_settings()).build_index(tune=False).tuning["status"] == "off"  # told otherwise


def test_tune_false_set_explicitly_drops_the_tuning_of_the_previous_index(make_settings, six):
    ImageSearchEngine(make_settings(tune=True)).build_index()
    told = ImageSearchEngine(make_settings(tune=False))  # `lookalike index --tune false`, LOOKALIKE_TUNE=false, YAML
    assert told.build_index().tuning["status"] == "off"
    assert told.get_statistics()["tuning"] == "off"
