"""No-match scores on seeded synthetic vectors: products as tight clusters, unknown products elsewhere."""

from __future__ import annotations

import numpy as np
import pytest

from lookalike import openset


def clusters(seed: int = 0, products: int = 8, per: int = 6, dim: int = 16, noise: float = 0.15):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(products, dim))
    x = np.repeat(centres, per, axis=0) + noise * rng.normal(size=(products * per, dim))
    labels = np.repeat(np.array([f"p{i}" for i in range(products)], dtype=object), per)
    return x.astype(np.float32), labels


def test_prototypes_are_unit_means():
    x, labels = clusters()
    products, protos = openset.prototypes(x, labels)
    assert list(products) == [f"p{i}" for i in range(8)]
    np.testing.assert_allclose(np.linalg.norm(protos, axis=1), 1.0, rtol=1e-5)


def test_unknown_products_score_lower_and_operating_point_counts():
    x, labels = clusters()
    known = np.isin(labels, [f"p{i}" for i in range(6)])
    db, db_labels = x[known][::2], labels[known][::2]  # half of each known product's photos indexed
    queries, q_labels = x[1::2], labels[1::2]  # the other half of every product, p6 and p7 unknown
    out = openset.measure(queries, q_labels, db, db_labels, threshold=0.5)
    assert out["in_catalog_queries"] == 18 and out["unknown_queries"] == 6
    assert out["recall@1_in_catalog"] == 1.0
    for name in ("product", "prototype", "energy"):
        assert out["auroc"][name] > 0.95, name
    assert out["correct_flagged_match"] == 1.0 and out["unknown_flagged_no_match"] == 1.0
    s = openset.scores(queries, db, db_labels)
    assert (s["margin"] >= 0).all() and (s["energy"] >= s["prototype"] - 1e-6).all()
    high = openset.measure(queries, q_labels, db, db_labels, threshold=1.01)
    assert high["correct_flagged_match"] == 0.0 and high["unknown_flagged_no_match"] == 1.0


def test_reference_scores_follow_how_alike_a_products_photos_are():
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(2, 16))
    tight = centres[0] + 0.05 * rng.normal(size=(5, 16))
    loose = centres[1] + 0.6 * rng.normal(size=(5, 16))
    single = rng.normal(size=(1, 16))
    db = np.concatenate([tight, loose, single]).astype(np.float32)
    labels = np.array(["tight"] * 5 + ["loose"] * 5 + ["single"], dtype=object)
    products, ref = openset.reference_scores(db, labels)
    got = dict(zip(products, ref, strict=True))
    assert got["tight"] > 0.95 > got["loose"]
    assert got["single"] == np.median([got["tight"], got["loose"]])  # no own photos to compare: the others' median
    # relative = best product score - the answer's reference
    s = openset.scores(db[:1], db, labels)
    np.testing.assert_allclose(s["relative"], s["product"] - got["tight"], atol=1e-6)


def test_calibration_on_hidden_groups_thresholds_and_combines():
    x, labels = clusters(seed=2, products=12, per=8, noise=0.4)
    cal = openset.calibrate(x, labels)
    assert set(cal.thresholds) == {*openset.SCORES, "combined"}
    pos, neg = openset.hidden_group_scores(x, labels)
    # the build's rule: half of the hidden products' photos fall under each score's threshold
    for k in openset.SCORES:
        assert np.mean(neg[k] < cal.thresholds[k]) == pytest.approx(0.5, abs=0.1), k
    assert cal.info["positives"] == len(pos["product"]) and cal.info["negatives"] == len(neg["product"])
    # the logistic combination separates the groups it was fitted on at least as well as its best single score
    best_single = max(cal.info["auroc_on_catalog"][k] for k in openset.SCORES)
    assert cal.info["auroc_on_catalog"]["combined"] >= best_single - 0.02
    known = np.isin(labels, [f"p{i}" for i in range(9)])
    out = openset.measure(x[~known], labels[~known], x[known], labels[known], calibration=cal)
    assert "combined" in out["auroc"] and set(out["calibrated"]) == set(cal.thresholds)


def test_calibration_needs_products_to_hide():
    x, labels = clusters(products=2, per=3)
    with pytest.raises(ValueError, match="too few products"):
        openset.calibrate(x, labels, folds=2)


def test_calibration_refits_without_the_hidden_group():
    x, labels = clusters(seed=3, products=12, per=8, noise=0.4)
    seen = []

    def refit(v, lab):
        seen.append(set(lab))
        return lambda z: z * 2.0  # scores are scale-free: the same result as no transform

    cal = openset.calibrate(x, labels, refit=refit)
    plain = openset.calibrate(x, labels)
    assert len(seen) == 4 and all(len(s) == 9 for s in seen)  # each fit saw the visible 9 of 12 products only
    for k in openset.SCORES:
        assert cal.thresholds[k] == pytest.approx(plain.thresholds[k], rel=1e-4, abs=1e-5)
