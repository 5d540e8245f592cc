"""``tune: finetune`` wired into builds and evaluation (tiny test backbone): the manifest records it, the checkpoint
is reused while the catalog is unchanged, a decline falls back to the LDA with the reason; the acceptance rule of
the projection; "match" on image-level hits."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import product_image, write_catalog
from lookalike import ImageSearchEngine, IndexFileError, finetuned
from lookalike import finetune as ft
from lookalike.backbones import file_sha256
from lookalike.evaluation import evaluate
from lookalike.settings import Settings, SettingsError
from lookalike.tuning import Z_NOISE, calibrate_no_match, compare, paired_z

EIGHT = {f"p{i}": 6 for i in range(8)}
TRAINS = ft.FinetuneConfig(epochs=2, views=2, batch_size=16, lr=1e-2, require_gain=False)  # always keeps its result


@pytest.fixture
def eight(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setattr(ft, "MIN_IMAGES", 40)
    root = tmp_path / "catalog"
    write_catalog(root, EIGHT)
    return root


@pytest.fixture
def runs(monkeypatch) -> list[dict]:
    """Every real fine-tune run (the reuse tests count them)."""
    calls: list[dict] = []
    real = ft.finetune

    def counted(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(ft, "finetune", counted)
    return calls


# --- the setting ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("given", "held"), [("finetune", "finetune"), (" FineTune ", "finetune"), ("true", True),
                                             (False, False), ("off", False)])  # fmt: skip
def test_tune_setting_takes_true_false_or_finetune(given, held):
    assert Settings(config_file=None, environ={}, tune=given).tune == held
    assert Settings(config_file=None, environ={"LOOKALIKE_TUNE": str(given)}).tune == held


def test_tune_setting_names_what_it_accepts():
    with pytest.raises(SettingsError, match="tune='lots' is not allowed: expected true, false or finetune"):
        Settings(config_file=None, environ={}, tune="lots")


# --- the projection's acceptance rule ---------------------------------------------------------------------------


def test_paired_z_worked_by_hand():
    # differences (1, 1, 0, 0): mean 0.5, sample sd sqrt(1/3), standard error sqrt(1/3)/2 -> z = sqrt(3)
    assert paired_z(np.array([0, 0, 1, 1]), np.array([1, 1, 1, 1])) == pytest.approx(np.sqrt(3))
    assert paired_z(np.zeros(5), np.zeros(5)) == 0.0
    assert paired_z(np.zeros(4), np.full(4, 0.5)) == np.inf


def _outcomes(n: int, fixed: int, broken: int, ap_before: float, ap_after: float, seed: int = 0):
    """Per-query (right?, AP) before and after: ``fixed`` answers become right, ``broken`` ones wrong."""
    rng = np.random.default_rng(seed)
    right = np.ones(n)
    right[:fixed] = 0
    after_right = right.copy()
    after_right[:fixed] = 1
    after_right[fixed : fixed + broken] = 0
    ap0 = np.clip(ap_before + rng.normal(0, 0.1, n), 0, 1)
    ap1 = np.clip(ap0 + (ap_after - ap_before) + rng.normal(0, 0.05, n), 0, 1)
    return (right, ap0), (after_right, ap1)


def test_rule_keeps_a_clear_map_gain_when_recall_dips_within_chance():
    # what the LDA does on fine-tuned features: 656 held-out photos, recall 0.989 -> 0.986, MAP@R 0.88 -> 0.98
    before, after = _outcomes(656, fixed=1, broken=3, ap_before=0.88, ap_after=0.98)
    decision = compare(before, after)
    assert decision["accept"] and "map@r gained clearly" in decision["why"]
    assert -Z_NOISE < decision["z"]["recall@1"] < 0 and decision["z"]["map@r"] > Z_NOISE


def test_rule_declines_a_recall_loss_beyond_chance_whatever_map_does():
    before, after = _outcomes(656, fixed=0, broken=20, ap_before=0.88, ap_after=0.98)
    decision = compare(before, after)
    assert not decision["accept"] and "recall@1 dropped beyond chance" in decision["why"]


def test_rule_declines_a_small_loss_when_nothing_gains_clearly():
    before, after = _outcomes(656, fixed=1, broken=3, ap_before=0.88, ap_after=0.88)
    after = (after[0], before[1].copy())  # MAP@R exactly unchanged
    assert not compare(before, after)["accept"]


def test_rule_on_finetuned_features_keeps_a_loss_within_chance_but_not_beyond():
    # lenient: what adapt() uses on fine-tuned features, where the projection keeps the no-match threshold honest
    before, after = _outcomes(337, fixed=1, broken=5, ap_before=0.97, ap_after=0.97)
    after = (after[0], before[1].copy())  # like the produce subset's leave-out build: recall down 4 of 337
    assert not compare(before, after)["accept"]
    decision = compare(before, after, lenient=True)
    assert decision["accept"] and decision["why"] == "recall@1 dropped within chance; kept on fine-tuned features"
    before, after = _outcomes(337, fixed=0, broken=20, ap_before=0.97, ap_after=0.99)
    decision = compare(before, after, lenient=True)
    assert not decision["accept"] and "recall@1 dropped beyond chance" in decision["why"]


def test_adapt_is_lenient_only_on_finetuned_features(monkeypatch):
    import lookalike.tuning as tuning
    from test_tuning import clustered

    raw, labels = clustered(8, 10)
    n = int(tuning.holdout_split(labels).sum())
    outcomes = _outcomes(n, fixed=0, broken=1, ap_before=0.9, ap_after=0.9)
    outcomes = (outcomes[0], (outcomes[1][0], outcomes[0][1].copy()))  # one answer lost, nothing gained
    sequence = itertools.cycle(outcomes)  # fit_projection scores before, then after
    monkeypatch.setattr(tuning, "_holdout_per_query", lambda *a: next(sequence))
    assert tuning.adapt(raw, labels, 24, tune=True).projection is None
    adapted = tuning.adapt(raw, labels, 24, tune="finetune")
    assert adapted.projection is not None and adapted.tuning["status"] == "tuned"


def test_rule_accepts_when_nothing_drops():
    before, after = _outcomes(100, fixed=2, broken=0, ap_before=0.5, ap_after=0.6)
    assert compare(before, after) == compare(before, after) and compare(before, after)["accept"]


def test_fit_projection_uses_the_rule(monkeypatch):
    import lookalike.tuning as tuning
    from test_tuning import clustered

    raw, labels = clustered(8, 10)
    designed = iter(_outcomes(int(tuning.holdout_split(labels).sum()), 0, 6, 0.5, 0.9))
    monkeypatch.setattr(tuning, "_holdout_per_query", lambda *a: next(designed))
    with pytest.raises(tuning.TuningDeclined, match=r"recall@1 dropped beyond chance.*keeping the untuned features"):
        tuning.fit_projection(raw, labels, dim=24)
    designed = iter(_outcomes(int(tuning.holdout_split(labels).sum()), 0, 1, 0.5, 0.9))
    projection = tuning.fit_projection(raw, labels, dim=24)  # one answer of 24 lost, MAP@R up: kept
    assert projection.info["validation"]["decision"]["accept"]


# --- builds ---------------------------------------------------------------------------------------------------


def test_build_with_finetune_records_it_and_reuses_the_checkpoint(eight, make_settings, runs, monkeypatch, tmp_path):
    monkeypatch.setattr(finetuned, "default_config", lambda: TRAINS)
    settings = make_settings(data_dir=eight, tune="finetune")
    engine = ImageSearchEngine(settings)
    report = engine.build_index()
    info = report.tuning["finetune"]
    assert info["status"] == "finetuned" and info["reused"] is False and len(runs) == 1
    ckpt = settings.cache_dir / info["checkpoint"]
    assert ckpt.parent == settings.cache_dir / "finetuned" and ckpt.suffix == ".safetensors"
    manifest = json.loads(settings.metadata_path.read_text(encoding="utf-8"))
    assert manifest["settings"]["tune"] == "finetune"
    assert manifest["settings"]["weights_path"] is None  # the base model stays the setting; the index names its own
    assert manifest["model"]["weights"] == "sha256:" + file_sha256(ckpt) == engine.extractor.weights_fingerprint
    assert report.tuning["status"] == "tuned" and report.tuning["method"] == "ensemble"  # with the base model's LDA
    assert manifest["projection"]["method"] == "ensemble"
    # the no-match threshold from the fine-tune's run without some products, the one its report holds
    sidecar = json.loads(ckpt.with_suffix(".json").read_text(encoding="utf-8"))
    assert sidecar["calibration"]["hidden_products"] == 2
    assert manifest["calibration"]["source"] == "fine-tune"
    assert manifest["calibration"]["threshold"] == sidecar["calibration"]["threshold"]
    query = tmp_path / "q.jpg"
    product_image(3, 77).save(query)
    before = engine.search(query, top_k=3)

    plain = make_settings(data_dir=eight)  # tune left at its default: the index's choice is kept
    fresh = ImageSearchEngine(plain)
    fresh.load_index()
    assert fresh.extractor.weights_fingerprint == manifest["model"]["weights"]
    assert [(h["product_id"], round(h["similarity"], 4)) for h in fresh.search(query, top_k=3)] == [
        (h["product_id"], round(h["similarity"], 4)) for h in before
    ]
    again = ImageSearchEngine(plain).build_index()
    assert again.tuning["finetune"]["reused"] is True and len(runs) == 1  # same catalog: no second training
    assert again.tuning["finetune"]["checkpoint"] == info["checkpoint"]

    product_image(3, 300).save(eight / "p3" / "new.jpg")  # the catalog changed: a new fine-tune
    changed = ImageSearchEngine(plain).build_index()
    assert changed.tuning["finetune"]["reused"] is False and len(runs) == 2
    assert changed.tuning["finetune"]["checkpoint"] != info["checkpoint"]

    off = ImageSearchEngine(make_settings(data_dir=eight, tune=False))
    off.build_index()  # an explicit tune: false goes back to the base model
    assert off.extractor.weights_fingerprint != manifest["model"]["weights"]
    assert json.loads(settings.metadata_path.read_text(encoding="utf-8"))["tuning"]["status"] == "off"


def test_a_missing_checkpoint_is_named_on_load(eight, make_settings, monkeypatch):
    monkeypatch.setattr(finetuned, "default_config", lambda: TRAINS)
    settings = make_settings(data_dir=eight, tune="finetune")
    report = ImageSearchEngine(settings).build_index()
    (settings.cache_dir / report.tuning["finetune"]["checkpoint"]).unlink()
    with pytest.raises(IndexFileError, match="fine-tuned model .* is missing; rebuild the index"):
        ImageSearchEngine(make_settings(data_dir=eight)).load_index()


def test_a_declined_finetune_falls_back_to_the_lda_with_the_reason(eight, make_settings, runs):
    # Synthetic products are told apart perfectly by the LDA on the base model already: fine-tuning cannot win.
    monkeypatch_config = ft.FinetuneConfig(epochs=2, views=2, batch_size=32)
    settings = make_settings(data_dir=eight, tune="finetune")
    finetuned_default = finetuned.default_config
    try:
        finetuned.default_config = lambda: monkeypatch_config
        engine = ImageSearchEngine(settings)
        report = engine.build_index()
        again = ImageSearchEngine(settings).build_index()
    finally:
        finetuned.default_config = finetuned_default
    info = report.tuning["finetune"]
    assert info["status"] == "declined" and "keeping the base model" in info["reason"]
    assert report.tuning["status"] == "tuned"  # the LDA alone
    assert engine.extractor.weights_fingerprint == "random-init-seed0"  # the base model
    assert again.tuning["finetune"]["status"] == "declined" and again.tuning["finetune"]["reused"] is True
    assert len(runs) == 1  # the decline is remembered too
    manifest = json.loads(settings.metadata_path.read_text(encoding="utf-8"))
    assert manifest["settings"]["tune"] == "finetune" and manifest["tuning"]["finetune"]["status"] == "declined"


def test_a_catalog_too_small_to_finetune_is_declined_with_the_reason(catalog, make_settings):
    report = ImageSearchEngine(make_settings(tune="finetune")).build_index()
    assert report.tuning["finetune"]["status"] == "declined"
    assert "fine-tuning needs 200 photos" in report.tuning["finetune"]["reason"]
    assert report.images == 10


def test_cli_tune_finetune_rebuilds_the_index(eight, tmp_path, capsys, monkeypatch):
    from lookalike.cli import main

    monkeypatch.setattr(finetuned, "default_config", lambda: TRAINS)
    flags = ["--model-name", "test_tiny", "--data-dir", str(eight), "--cache-dir", str(tmp_path / "cache")]
    assert main(["tune", "--method", "finetune", *flags]) == 0
    out = capsys.readouterr().out
    assert out.startswith("fine-tuning: trained in") and "Index rebuilt with it: 48 images" in out
    assert main(["index", *flags]) == 0
    assert "fine-tuning: reused" in capsys.readouterr().out


def test_evaluate_with_finetune_fits_on_the_catalog_and_leaves_products_out_of_it(
    eight, make_settings, runs, monkeypatch, tmp_path
):
    monkeypatch.setattr(finetuned, "default_config", lambda: TRAINS)
    monkeypatch.setattr(ft, "MIN_IMAGES", 30)  # 36 photos are left when two products are out
    queries = tmp_path / "queries"
    write_catalog(queries, EIGHT, start_variant=50)
    result = evaluate(make_settings(tune="finetune"), eight, queries, leave_out_products=2)
    assert result["tuning"]["finetune"]["status"] == "finetuned"
    assert result["tuning"]["finetune"]["images"] == 48  # the catalog's photos only, never the queries
    assert result["model"]["weights"] == "sha256:" + result["tuning"]["finetune"]["sha256"]
    nm = result["no_match"]
    assert nm["finetune"]["excluded_products"] == nm["hidden_products"]  # the network never saw them
    assert len(runs) == 2 and runs[1]["exclude_products"] == frozenset(nm["hidden_products"])
    assert 0.0 <= nm["auroc"] <= 1.0


# --- "match" on image-level hits -----------------------------------------------------------------------------------


def test_image_threshold_is_calibrated_on_the_best_image():
    from test_tuning import clustered

    raw, labels = clustered(12, 10, spread=0.2)
    cal = calibrate_no_match(raw, labels, dim=24, tuned=True)
    # a product scores the mean of its best three images, never more than its best one: the same hidden photos
    # give a higher median on the best image
    assert cal["image_threshold"] >= cal["threshold"]
    assert 0.5 < cal["image_auroc_on_catalog"] <= 1.0


def test_image_hits_say_match_and_only_matches_keeps_those(make_settings, tmp_path):
    root = tmp_path / "catalog"
    write_catalog(root, {f"p{i}": 4 for i in range(6)})
    engine = ImageSearchEngine(make_settings(data_dir=root))
    engine.build_index()
    threshold = engine.snapshot.adaptation.image_threshold
    assert threshold is not None and threshold >= engine.no_match_threshold
    for look, variant in ((2, 77), (8, 5)):  # a catalog look, and one no product has
        query = tmp_path / f"q{look}.jpg"
        product_image(look, variant).save(query)
        hits = engine.search(query, top_k=8, by_product=False)
        assert all(h["match"] == (h["similarity"] >= threshold) for h in hits)
        assert engine.search(query, top_k=8, by_product=False, only_matches=True) == [h for h in hits if h["match"]]
    assert any(h["match"] for h in engine.search(tmp_path / "q2.jpg", top_k=8, by_product=False))


def test_an_index_without_an_image_threshold_leaves_image_hits_unmarked(make_settings, tmp_path):
    from dataclasses import replace

    root = tmp_path / "catalog"
    write_catalog(root, {f"p{i}": 4 for i in range(6)})
    engine = ImageSearchEngine(make_settings(data_dir=root))
    engine.build_index()
    adaptation = engine.snapshot.adaptation
    old = {k: v for k, v in adaptation.calibration.items() if not k.startswith("image_")}
    engine._adaptation = replace(adaptation, calibration=old)  # as an index built before image calibration
    query = tmp_path / "q.jpg"
    product_image(1, 70).save(query)
    hits = engine.search(query, top_k=4, by_product=False, only_matches=True)
    assert len(hits) == 4 and all("match" not in h for h in hits)
    assert all("match" in h for h in engine.search(query, top_k=4))  # products still are


def test_a_failed_finetune_build_keeps_the_model_of_its_index(eight, make_settings, monkeypatch, tmp_path):
    import lookalike.tuning as tuning

    monkeypatch.setattr(finetuned, "default_config", lambda: TRAINS)
    engine = ImageSearchEngine(make_settings(data_dir=eight, tune=False))
    engine.build_index()
    base = engine.extractor.weights_fingerprint

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tuning, "adapt", broken)
    with pytest.raises(OSError):
        engine.build_index(tune="finetune")
    assert engine.extractor.weights_fingerprint == base and engine.settings.tune is False
    query = tmp_path / "q.jpg"
    product_image(5, 80).save(query)
    assert engine.search(query, top_k=1)[0]["product_id"] == "p5"  # still searches its (untouched) index
