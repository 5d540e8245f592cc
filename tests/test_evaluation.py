"""Retrieval metrics (worked by hand and against naive references) and evaluation runs over a catalog."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from conftest import PRODUCTS, product_image, write_catalog
from lookalike import EvaluationUtils, ImageSearchEngine
from lookalike.evaluation import (
    average_precision_at_r,
    evaluate,
    precision_at_k,
    product_hit_at_k,
    recall_at_k,
    reciprocal_rank,
    summarize,
)

N_IMAGES = sum(PRODUCTS.values())
METRIC_KEYS = {"recall@1", "precision@5", "map@r", "product_hit@5", "mrr"}


# --- pure functions, worked by hand ---------------------------------------------------------------------------


def test_recall_at_k_by_hand():
    ranked = ["b", "a", "c"]
    assert recall_at_k(ranked, "a", 1) == 0.0  # first is b
    assert recall_at_k(ranked, "a", 2) == 1.0  # a is second
    assert recall_at_k(ranked, "a", 10) == 1.0  # k beyond the list: the whole list
    assert recall_at_k(ranked, "z", 3) == 0.0
    assert recall_at_k([], "a", 1) == 0.0


def test_precision_at_k_by_hand():
    ranked = ["a", "b", "a", "c", "a"]
    assert precision_at_k(ranked, "a", 1) == 1.0  # 1/1
    assert precision_at_k(ranked, "a", 3) == pytest.approx(2 / 3)  # a, b, a -> 2 of 3
    assert precision_at_k(ranked, "a", 5) == pytest.approx(3 / 5)  # a, b, a, c, a -> 3 of 5
    assert precision_at_k(["a"], "a", 5) == pytest.approx(1 / 5)  # 4 missing places count as wrong
    assert precision_at_k(ranked, "z", 5) == 0.0


def test_map_at_r_by_hand():
    # ranked = [a, b, a, a], R = 3: only the first 3 places count.
    #   place 1: a, relevant, precision@1 = 1/1
    #   place 2: b, not relevant, contributes nothing
    #   place 3: a, relevant, precision@3 = 2/3
    #   place 4: beyond R, ignored
    # MAP@R = (1/R) * (1/1 + 2/3) = (1/3) * (5/3) = 5/9
    assert average_precision_at_r(["a", "b", "a", "a"], "a", 3) == pytest.approx(5 / 9)
    # [b, a], R = 2: place 2 relevant with precision@2 = 1/2 -> (1/2) * (1/2) = 1/4
    assert average_precision_at_r(["b", "a"], "a", 2) == pytest.approx(1 / 4)
    # [a, a, b], R = 2: (1/2) * (1/1 + 2/2) = 1
    assert average_precision_at_r(["a", "a", "b"], "a", 2) == pytest.approx(1.0)
    # [a], R = 4 (three relevant images never retrieved): (1/4) * (1/1) = 1/4
    assert average_precision_at_r(["a"], "a", 4) == pytest.approx(1 / 4)
    assert average_precision_at_r(["b", "c"], "a", 2) == 0.0
    # [b, a, a], R = 1: only place 1 counts, and it is wrong
    assert average_precision_at_r(["b", "a", "a"], "a", 1) == 0.0


def test_reciprocal_rank_by_hand():
    assert reciprocal_rank(["b", "c", "a"], "a") == pytest.approx(1 / 3)
    assert reciprocal_rank(["a", "a"], "a") == 1.0
    assert reciprocal_rank(["b", "c"], "a") == 0.0
    assert reciprocal_rank([], "a") == 0.0


def test_product_hit_at_k_counts_distinct_products():
    ranked = ["b", "b", "b", "c", "c", "a"]
    # distinct products in order: b, c, a
    assert product_hit_at_k(ranked, "a", 3) == 1.0
    assert product_hit_at_k(ranked, "a", 2) == 0.0
    assert recall_at_k(ranked, "a", 3) == 0.0  # image level: the first 3 images are all b


@pytest.mark.parametrize("k", [0, -1])
def test_invalid_k_raises(k):
    for fn in (recall_at_k, precision_at_k, product_hit_at_k):
        with pytest.raises(ValueError, match="k must be at least 1"):
            fn(["a"], "a", k)
    with pytest.raises(ValueError, match="R must be at least 1"):
        average_precision_at_r(["a"], "a", k)


def test_summarize_by_hand():
    rankings = [["a", "b", "a", "a", "c"], ["c", "b", "b", "d", "e"]]
    labels = ["a", "b"]
    relevant = [3, 2]
    # query 1 (label a, R=3): recall@1 = 1; precision@5 = 3/5; MAP@R = (1/3)(1/1 + 2/3) = 5/9;
    #   distinct [a, b, c] -> product_hit@5 = 1; first a at place 1 -> RR = 1
    # query 2 (label b, R=2): recall@1 = 0; precision@5 = 2/5; MAP@R = (1/2)(1/2) = 1/4;
    #   distinct [c, b, d, e] -> product_hit@5 = 1; first b at place 2 -> RR = 1/2
    out = summarize(rankings, labels, relevant)
    assert out["queries"] == 2
    assert out["recall@1"] == pytest.approx(0.5)
    assert out["precision@5"] == pytest.approx(0.5)  # (3/5 + 2/5) / 2
    assert out["map@r"] == pytest.approx(29 / 72)  # (5/9 + 1/4) / 2 = (20/36 + 9/36) / 2
    assert out["product_hit@5"] == pytest.approx(1.0)
    assert out["mrr"] == pytest.approx(0.75)  # (1 + 1/2) / 2


def test_summarize_edge_cases():
    empty = summarize([], [], [])
    assert empty["queries"] == 0
    assert all(empty[k] == 0.0 for k in METRIC_KEYS)
    with pytest.raises(ValueError, match="one entry per query"):
        summarize([["a"]], ["a", "b"], [1, 1])


# --- against naive references on seeded random rankings -------------------------------------------------------


def naive_recall(ranked, label, k):
    return float(any(ranked[i] == label for i in range(min(k, len(ranked)))))


def naive_precision(ranked, label, k):
    hits = 0
    for i in range(k):
        if i < len(ranked) and ranked[i] == label:
            hits += 1
    return hits / k


def naive_map_at_r(ranked, label, r):
    total = 0.0
    for i in range(1, r + 1):
        if i <= len(ranked) and ranked[i - 1] == label:
            total += naive_precision(ranked, label, i)
    return total / r


def naive_rr(ranked, label):
    ranks = [i + 1 for i, x in enumerate(ranked) if x == label]
    return 1.0 / ranks[0] if ranks else 0.0


def naive_product_hit(ranked, label, k):
    seen = []
    for x in ranked:
        if x not in seen:
            seen.append(x)
    return float(label in seen[:k])


def random_cases(n=300, seed=1234):
    rng = random.Random(seed)
    for _ in range(n):
        ranked = [rng.choice("abcde") for _ in range(rng.randint(0, 15))]
        yield ranked, rng.choice("abcdef"), rng.randint(1, 12), rng.randint(1, 10)


def test_metrics_agree_with_naive_references():
    for ranked, label, k, r in random_cases():
        assert recall_at_k(ranked, label, k) == naive_recall(ranked, label, k)
        assert precision_at_k(ranked, label, k) == pytest.approx(naive_precision(ranked, label, k))
        assert average_precision_at_r(ranked, label, r) == pytest.approx(naive_map_at_r(ranked, label, r))
        assert reciprocal_rank(ranked, label) == pytest.approx(naive_rr(ranked, label))
        assert product_hit_at_k(ranked, label, k) == naive_product_hit(ranked, label, k)


def test_summarize_and_utils_agree_with_naive_references():
    cases = list(random_cases(n=60, seed=99))
    rankings = [c[0] for c in cases]
    labels = [c[1] for c in cases]
    relevant = [c[3] for c in cases]
    out = summarize(rankings, labels, relevant)
    n = len(cases)
    assert out["recall@1"] == pytest.approx(sum(naive_recall(r, y, 1) for r, y in zip(rankings, labels)) / n)
    assert out["precision@5"] == pytest.approx(sum(naive_precision(r, y, 5) for r, y in zip(rankings, labels)) / n)
    expected_map = sum(naive_map_at_r(r, y, R) for r, y, R in zip(rankings, labels, relevant)) / n
    assert out["map@r"] == pytest.approx(expected_map)
    assert out["mrr"] == pytest.approx(sum(naive_rr(r, y) for r, y in zip(rankings, labels)) / n)

    assert EvaluationUtils.calculate_map_at_r(labels, rankings, relevant) == pytest.approx(expected_map)
    assert EvaluationUtils.calculate_mrr(labels, rankings) == pytest.approx(out["mrr"])
    for k in (1, 3, 5):
        p = sum(naive_precision(r, y, k) for r, y in zip(rankings, labels)) / n
        rec = sum(naive_recall(r, y, k) for r, y in zip(rankings, labels)) / n
        assert EvaluationUtils.calculate_precision_at_k(labels, rankings, k) == pytest.approx(p)
        assert EvaluationUtils.calculate_recall_at_k(labels, rankings, k) == pytest.approx(rec)


# --- EvaluationUtils ------------------------------------------------------------------------------------------


def test_utils_precision_at_k():
    # one query, one label: [a, b, a] top 2 -> a, b -> 1/2
    assert EvaluationUtils.calculate_precision_at_k("a", ["a", "b", "a"], 2) == pytest.approx(1 / 2)
    # one query, a set of acceptable labels: [a, b, c] top 3 -> a, b relevant -> 2/3
    assert EvaluationUtils.calculate_precision_at_k({"a", "b"}, ["a", "b", "c"], 3) == pytest.approx(2 / 3)
    # a list of acceptable labels with a flat ranking is one query too
    assert EvaluationUtils.calculate_precision_at_k(["a", "b"], ["a", "b", "c"], 3) == pytest.approx(2 / 3)
    # many queries: q1 [a, c] -> 1/2, q2 [c, d] -> 0 -> mean 1/4
    assert EvaluationUtils.calculate_precision_at_k(["a", "b"], [["a", "c"], ["c", "d"]], 2) == pytest.approx(1 / 4)
    # short ranking: [a] with k = 4 -> 1/4 (missing places count as wrong)
    assert EvaluationUtils.calculate_precision_at_k("a", ["a"], 4) == pytest.approx(1 / 4)


def test_utils_recall_at_k():
    # one query, one label
    assert EvaluationUtils.calculate_recall_at_k("a", ["b", "a"], 1) == 0.0
    assert EvaluationUtils.calculate_recall_at_k("a", ["b", "a"], 2) == 1.0
    # one query, two acceptable labels, only a found in the top 2 [a, c] -> 1/2
    assert EvaluationUtils.calculate_recall_at_k({"a", "b"}, ["a", "c", "b"], 2) == pytest.approx(1 / 2)
    assert EvaluationUtils.calculate_recall_at_k({"a", "b"}, ["a", "c", "b"], 3) == pytest.approx(1.0)
    # many queries: top 1 -> a hit, x miss, x miss -> 1/3; top 2 -> hit, hit (b second), miss -> 2/3
    true, pred = ["a", "b", "c"], [["a", "x"], ["x", "b"], ["x", "y"]]
    assert EvaluationUtils.calculate_recall_at_k(true, pred, 1) == pytest.approx(1 / 3)
    assert EvaluationUtils.calculate_recall_at_k(true, pred, 2) == pytest.approx(2 / 3)


def test_utils_recall_with_num_relevant_is_ir_recall():
    # top 3 of [a, b, a, a] holds 2 relevant results; the catalog has 4 -> 2/4
    assert EvaluationUtils.calculate_recall_at_k("a", ["a", "b", "a", "a"], 3, num_relevant=4) == pytest.approx(0.5)
    # all 4 places: 3 relevant of 4 -> 3/4
    assert EvaluationUtils.calculate_recall_at_k("a", ["a", "b", "a", "a"], 4, num_relevant=4) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="num_relevant"):
        EvaluationUtils.calculate_recall_at_k("a", ["a"], 1, num_relevant=0)


def test_utils_map_at_r_and_mrr():
    # the worked case again: (1/3)(1/1 + 2/3) = 5/9
    assert EvaluationUtils.calculate_map_at_r("a", ["a", "b", "a", "a"], 3) == pytest.approx(5 / 9)
    # many queries: 5/9 and (1/2)(1/2) = 1/4 -> mean 29/72
    pred = [["a", "b", "a", "a", "c"], ["c", "b", "b", "d", "e"]]
    assert EvaluationUtils.calculate_map_at_r(["a", "b"], pred, [3, 2]) == pytest.approx(29 / 72)
    # MRR: one query, a second -> 1/2; many: 1, 1/3, 0 -> 4/9
    assert EvaluationUtils.calculate_mrr("a", ["b", "a"]) == pytest.approx(1 / 2)
    assert EvaluationUtils.calculate_mrr(["a", "b", "z"], [["a"], ["x", "y", "b"], ["x"]]) == pytest.approx(4 / 9)


def test_utils_map_at_r_accepts_a_set_of_labels_like_the_others():
    # The class contract: one query's true_labels may be a collection of acceptable labels.
    # [a, b, c] with {a, b}, R = 2: (1/2)(1/1 + 2/2) = 1
    assert EvaluationUtils.calculate_map_at_r({"a", "b"}, ["a", "b", "c"], 2) == pytest.approx(1.0)


def test_utils_map_at_r_refuses_lists_of_different_lengths():
    with pytest.raises(ValueError):
        EvaluationUtils.calculate_map_at_r(["a", "b", "c"], [["a"], ["b"]], [1, 1, 1])


@pytest.mark.parametrize("k", [0, -3])
def test_utils_invalid_k_raises(k):
    with pytest.raises(ValueError):
        EvaluationUtils.calculate_precision_at_k("a", ["a"], k)
    with pytest.raises(ValueError):
        EvaluationUtils.calculate_recall_at_k("a", ["a"], k)
    with pytest.raises(ValueError):
        EvaluationUtils.calculate_map_at_r("a", ["a"], k)


def test_utils_refuse_mismatched_batches_and_empty_labels():
    for fn in (
        lambda: EvaluationUtils.calculate_precision_at_k(["a"], [["a"], ["b"]], 1),
        lambda: EvaluationUtils.calculate_recall_at_k(["a", "b", "c"], [["a"], ["b"]], 1),
        lambda: EvaluationUtils.calculate_mrr(["a"], [["a"], ["b"]]),
        lambda: EvaluationUtils.calculate_precision_at_k([], ["a"], 1),
    ):
        with pytest.raises(ValueError):
            fn()


# --- evaluate() on synthetic catalogs -------------------------------------------------------------------------


Q = "photo->catalog"
LOO = "leave-one-out"


def test_evaluate_with_a_queries_folder(make_settings, catalog, tmp_path):
    queries = tmp_path / "queries"
    write_catalog(queries, PRODUCTS, start_variant=50)  # held-out views of the same products
    result = evaluate(make_settings(), catalog, queries)
    assert set(result["protocols"]) == {Q, LOO}  # leave-one-out runs too unless switched off
    metrics = result["protocols"][Q]["metrics"]
    assert set(metrics) >= METRIC_KEYS | {"product_recall@1"}
    assert metrics["queries"] == N_IMAGES
    assert metrics["recall@1"] == 1.0  # easy synthetic products: the right product first every time
    assert metrics["product_hit@5"] == 1.0
    assert metrics["mrr"] == 1.0
    assert all(0.0 <= metrics[k] <= 1.0 for k in METRIC_KEYS)
    assert (result["catalog_images"], result["catalog_products"]) == (N_IMAGES, 4)
    assert result["model"]["model_name"] == "test_tiny"
    assert result["protocols"][Q]["queries_without_product_in_catalog"] == 0
    assert result["protocols"][Q]["skipped_queries"] == []
    details = result["protocols"][Q]["details"]  # per query, for reports
    assert len(details) == N_IMAGES and all(d["products"][0] == d["label"] for d in details)


def test_evaluate_iconic_protocol_and_no_leave_one_out(make_settings, catalog, tmp_path):
    iconic = tmp_path / "iconic"
    write_catalog(iconic, {p: 1 for p in PRODUCTS}, start_variant=80)
    result = evaluate(make_settings(), catalog, iconic_dir=iconic, leave_one_out=False)
    assert set(result["protocols"]) == {"iconic->photos"}
    assert result["protocols"]["iconic->photos"]["metrics"]["queries"] == len(PRODUCTS)


def test_evaluate_ignores_queries_of_products_not_in_the_catalog(make_settings, catalog, tmp_path):
    queries = tmp_path / "queries"
    write_catalog(queries, PRODUCTS, start_variant=50)
    stranger = queries / "not-in-catalog"
    stranger.mkdir()
    product_image(5, 1).save(stranger / "x.jpg")
    product_image(5, 2).save(stranger / "y.jpg")
    (queries / "red-disc" / "broken.jpg").write_bytes(b"")
    result = evaluate(make_settings(), catalog, queries)["protocols"][Q]
    assert result["queries_without_product_in_catalog"] == 2
    assert result["metrics"]["queries"] == N_IMAGES
    assert result["metrics"]["recall@1"] == 1.0
    assert [Path(s["path"]).name for s in result["skipped_queries"]] == ["broken.jpg"]


def test_leave_one_out_on_an_easy_catalog(make_settings, catalog):
    result = evaluate(make_settings(), catalog)
    assert set(result["protocols"]) == {LOO}
    assert result["queries"] is None
    assert result["protocols"][LOO]["metrics"]["queries"] == N_IMAGES
    assert result["protocols"][LOO]["metrics"]["recall@1"] == 1.0


def test_leave_one_out_excludes_the_query_image_itself(make_settings, tmp_path):
    # Two products, each with one image of look 0 and one of look 2. Without itself, an image's nearest
    # neighbour is the other product's image of the same look, so Recall@1 is 0; were the query image
    # left in the ranking it would always be first and Recall@1 would be 1.
    root = tmp_path / "crossed"
    for product, variant in (("x", 1), ("y", 2)):
        (root / product).mkdir(parents=True)
        product_image(0, variant).save(root / product / "look0.jpg")
        product_image(2, variant).save(root / product / "look2.jpg")
    metrics = evaluate(make_settings(), root)["protocols"][LOO]["metrics"]
    assert metrics["queries"] == 4
    assert metrics["recall@1"] == 0.0
    assert metrics["map@r"] == 0.0  # R = 1 (the only other image of its product), and place 1 is wrong
    assert metrics["product_hit@5"] == 1.0


def test_leave_one_out_skips_products_with_a_single_image(make_settings, catalog):
    (catalog / "solo").mkdir()
    product_image(5, 0).save(catalog / "solo" / "only.jpg")
    result = evaluate(make_settings(), catalog)
    assert result["catalog_images"] == N_IMAGES + 1
    assert result["protocols"][LOO]["metrics"]["queries"] == N_IMAGES  # solo has nothing left to find
    assert result["protocols"][LOO]["queries_without_product_in_catalog"] == 1


def test_evaluate_with_l2(make_settings, catalog, tmp_path):
    queries = tmp_path / "queries"
    write_catalog(queries, PRODUCTS, start_variant=50)
    result = evaluate(make_settings(similarity_metric="l2"), catalog, queries)
    assert result["metric"] == "l2"
    assert result["protocols"][Q]["metrics"]["recall@1"] == 1.0


def test_evaluate_does_not_write_the_users_index(make_settings, catalog, tmp_path):
    settings = make_settings(data_dir=tmp_path / "users-catalog")
    evaluate(settings, catalog)
    assert not settings.metadata_path.exists()
    assert not settings.index_path.exists()
    assert list(settings.cache_dir.glob("*.faiss")) == []


def test_evaluate_leaves_an_existing_index_alone(make_settings, catalog, tmp_path):
    settings = make_settings()
    eng = ImageSearchEngine(settings)
    eng.build_index()
    before = settings.metadata_path.read_bytes()
    gens = sorted(settings.cache_dir.glob("*.faiss"))
    other = tmp_path / "other"
    write_catalog(other, {"p": 2, "q": 2})
    evaluate(settings, other)
    assert settings.metadata_path.read_bytes() == before
    assert sorted(settings.cache_dir.glob("*.faiss")) == gens
    fresh = ImageSearchEngine(settings)
    fresh.load_index()
    assert fresh.get_statistics()["images"] == N_IMAGES


def test_evaluate_keeps_the_users_embedding_cache(make_settings, catalog, tmp_path):
    settings = make_settings()
    ImageSearchEngine(settings).build_index()
    other = tmp_path / "other"
    write_catalog(other, {"p": 2, "q": 2})
    evaluate(settings, other)
    assert ImageSearchEngine(settings).build_index().extracted == 0  # nothing changed in the user's catalog
