"""The ensemble ``tune: finetune`` indexes: fine-tuned tails beside the base one on a shared trunk, a projection
whose parts are normalised apart (so the index compares the mean of their cosines), and the no-match threshold
from a run that never learnt some products."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lookalike.backbones import ensemble_layout, get_backbone, spec_for
from lookalike.nets import TailEnsembleMaps
from lookalike.ranking import l2_normalize
from lookalike.tuning import (
    SHRINKAGE,
    Ensemble,
    Projection,
    TuningDeclined,
    adapt,
    calibrate_ensemble,
    ensemble_raw,
    fit_ensemble,
    lda,
)


def _clusters(n_products: int, per: int, dim: int, seed: int = 0, spread: float = 0.3):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_products, dim))
    labels = np.repeat([f"p{i:02d}" for i in range(n_products)], per).astype(object)
    x = np.repeat(centres, per, axis=0) + spread * rng.normal(size=(n_products * per, dim))
    return np.abs(x).astype(np.float32), labels  # pooled ReLU features are never negative


def test_a_projection_with_blocks_compares_the_mean_of_their_cosines():
    rng = np.random.default_rng(1)
    proj = Projection(rng.normal(size=6).astype(np.float32), rng.normal(size=(6, 5)).astype(np.float32), {}, (2, 3))
    x = rng.normal(size=(4, 6)).astype(np.float32)
    y = proj.apply(x)
    assert np.allclose(np.linalg.norm(y[:, :2], axis=1), 1 / np.sqrt(2))
    assert np.allclose(np.linalg.norm(y[:, 2:], axis=1), 1 / np.sqrt(2))
    plain = (x - proj.mean) @ proj.matrix
    cos = lambda a, b: l2_normalize(a) @ l2_normalize(b).T  # noqa: E731
    mean_cos = (cos(plain[:, :2], plain[:, :2]) + cos(plain[:, 2:], plain[:, 2:])) / 2
    np.testing.assert_allclose(y @ y.T, mean_cos, atol=1e-5)

    again = Projection.from_bytes(proj.to_bytes())
    assert again.blocks == (2, 3)
    np.testing.assert_allclose(again.apply(x), y)
    single = Projection.from_bytes(Projection(proj.mean, proj.matrix).to_bytes())  # as saved before blocks existed
    assert single.blocks is None
    np.testing.assert_allclose(single.apply(x), plain, rtol=1e-5, atol=1e-5)


def test_fit_ensemble_joins_the_tuned_embedding_and_the_base_models_lda():
    tuned, labels = _clusters(8, 6, 10, seed=2)
    base, _ = _clusters(8, 6, 10, seed=3)  # 7 main + 3 aux values each
    ens = Ensemble(dim=7, aux=3)
    raw = ensemble_raw([tuned], base, 7)
    np.testing.assert_array_equal(raw[:, ens.base_columns()], base)
    proj = fit_ensemble(raw, labels, ens)
    mean, matrix = lda(base, labels, SHRINKAGE)
    expected = np.hstack([l2_normalize(tuned[:, :7]), l2_normalize((base - mean) @ matrix)]) / np.sqrt(2)
    y = proj.apply(raw)  # the tuned block is rotated onto its leading directions: the same cosines
    np.testing.assert_allclose(y @ y.T, expected @ expected.T, atol=1e-5)
    assert proj.blocks == (7, matrix.shape[1]) and proj.info["method"] == "ensemble"
    tuned_index = adapt(raw, labels, 7, tune="finetune", ensemble=ens)
    assert tuned_index.tuning["method"] == "ensemble" and tuned_index.projection.blocks == proj.blocks
    assert tuned_index.calibration is not None and "source" not in tuned_index.calibration  # hidden groups
    with_run = adapt(raw, labels, 7, tune="finetune", ensemble=Ensemble(7, 3, 1, {"threshold": 0.5}))
    assert with_run.threshold == 0.5 and with_run.calibration["source"] == "fine-tune"
    untuned = adapt(raw, labels, 7, tune=False, ensemble=ens)  # tune: false: the fine-tuned embedding alone
    assert untuned.projection is None and untuned.tuning == {"status": "off"}
    np.testing.assert_array_equal(untuned.transform(raw, 7), raw[:, :7])
    with pytest.raises(ValueError, match="raw vectors have 20 values, got 17"):
        fit_ensemble(raw[:, :17], labels, ens)
    with pytest.raises(TuningDeclined, match="needs 5 or more"):
        fit_ensemble(raw[:24], labels[:24], ens)  # four products


def test_a_wide_fine_tuned_embedding_keeps_its_leading_directions():
    rng = np.random.default_rng(9)
    labels = np.repeat([f"p{i:02d}" for i in range(10)], 6).astype(object)
    tuned = np.abs(rng.normal(size=(60, 20)) @ rng.normal(size=(20, 300))).astype(np.float32)  # rank 20 in 300 dims
    base, _ = _clusters(10, 6, 300, seed=10)
    ens = Ensemble(dim=300, aux=0, tails=1)
    proj = fit_ensemble(ensemble_raw([tuned], base, 300), labels, ens)
    assert proj.blocks[0] == 128  # ENSEMBLE_TUNED_DIMS, the catalog having fewer products than that
    part = proj.apply(ensemble_raw([tuned], base, 300))[:, :128] * np.sqrt(2)  # the tuned block, normalised
    cos = l2_normalize(tuned) @ l2_normalize(tuned).T
    np.testing.assert_allclose(part @ part.T, cos, atol=1e-4)  # 20 directions hold it all: cosines unchanged
    wide, many = _clusters(150, 3, 300, seed=11)
    assert fit_ensemble(ensemble_raw([wide], wide, 300), many, ens).blocks[0] == 150  # one a product


def test_calibrate_ensemble_puts_the_threshold_at_a_quartile_of_the_products_it_never_learnt():
    tuned, labels = _clusters(12, 8, 12, seed=4)
    base, _ = _clusters(12, 8, 12, seed=5)
    raw = ensemble_raw([tuned], base, 8)
    ens = Ensemble(dim=8, aux=4)
    unknown = np.isin(labels, ["p00", "p05", "p09"])
    cal = calibrate_ensemble(raw, labels, unknown, ens)
    assert cal is not None and cal["hidden_products"] == 3 and cal["hidden_product_queries"] == 24
    # recompute by hand: the unknown photos' best product score against the other products' fitted photos
    from lookalike.ranking import product_scores
    from lookalike.tuning import holdout_split

    db_rows = ~unknown & ~holdout_split(labels)
    proj = fit_ensemble(raw[db_rows], labels[db_rows], ens)
    db = l2_normalize(proj.apply(raw[db_rows]))
    _, scores = product_scores(l2_normalize(proj.apply(raw[unknown])) @ db.T, labels[db_rows])
    assert cal["threshold"] == pytest.approx(np.quantile(scores.max(axis=1), 0.25), abs=1e-6)
    assert cal["quantile"] == 0.25 and cal["hidden_score_quantiles"]["0.25"] == pytest.approx(cal["threshold"])
    assert cal["held_out_catalog_match_rate"] > 0.9 and cal["auroc_on_catalog"] > 0.9  # well-separated clusters
    assert calibrate_ensemble(raw, labels, np.zeros(len(labels), bool), ens) is None  # nothing unknown


def test_two_tuned_tails_make_three_parts():
    (t1, labels), (t2, _), (base, _) = (_clusters(8, 6, 10, seed=k) for k in (6, 7, 8))
    ens = Ensemble(dim=7, aux=3, tails=2)
    raw = ensemble_raw([t1, t2], base, 7)
    assert raw.shape[1] == ens.raw_dim == 30
    np.testing.assert_array_equal(raw[:, ens.tuned_columns(1)], t2[:, :7])
    np.testing.assert_array_equal(raw[:, ens.base_columns()], base)
    np.testing.assert_array_equal(raw[:, 21:24], t1[:, 7:])  # aux: tuned tails in order, then the base model's
    proj = fit_ensemble(raw, labels, ens)
    assert proj.blocks[:2] == (7, 7) and len(proj.blocks) == 3
    mean, matrix = lda(base, labels, SHRINKAGE)
    parts = [l2_normalize(t1[:, :7]), l2_normalize(t2[:, :7]), l2_normalize((base - mean) @ matrix)]
    y, expected = proj.apply(raw), np.hstack(parts) / np.sqrt(3)
    np.testing.assert_allclose(y @ y.T, expected @ expected.T, atol=1e-5)


@pytest.mark.parametrize("tails", [1, 2])
def test_a_tail_ensemble_on_efficientnet_lite_keeps_the_base_models_maps(tails):
    spec = get_backbone("efficientnet_lite0")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        base = spec.architecture().eval()
    ens = TailEnsembleMaps(base, 2, tails).eval()
    with torch.no_grad():
        for i, parts in enumerate(ens.tuned):  # "fine-tuned" tails that differ from the base one and each other
            for p in parts.parameters():
                p.add_(0.01 * (i + 1))
        x = torch.rand(2, 3, 64, 64)
        main_b, aux_b = base(x)
        maps = ens(x)
    assert len(maps) == 2 * (tails + 1)
    torch.testing.assert_close(maps[tails], main_b)  # the base main map after the tuned ones
    torch.testing.assert_close(maps[-1], aux_b)
    for i in range(tails):
        assert maps[i].shape == main_b.shape and not torch.allclose(maps[i], main_b)
        assert maps[tails + 1 + i].shape == aux_b.shape
    if tails == 2:
        assert not torch.allclose(maps[0], maps[1])
    assert set(k.split(".")[0] for k in ens.state_dict()) == {"base", "tuned"}


def test_an_ensemble_checkpoint_is_recognised_from_its_header(tmp_path: Path):
    from safetensors.torch import save_file

    path = tmp_path / "ens.safetensors"
    layout = {"tail_ensemble": {"tail_blocks": 1, "tuned_tails": 2}}
    save_file({"w": torch.zeros(2)}, str(path), metadata={"lookalike": json.dumps(layout)})
    assert ensemble_layout(path) == (1, 2)
    spec, tiny = spec_for("test_tiny", path), get_backbone("test_tiny")
    assert spec.raw_dim == 3 * tiny.raw_dim and spec.dim == tiny.dim
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain), metadata={"lookalike": json.dumps({"method": "finetune"})})
    assert ensemble_layout(plain) is None and spec_for("test_tiny", plain) is tiny
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint")
    assert ensemble_layout(junk) is None and ensemble_layout(tmp_path / "gone.safetensors") is None
    assert ensemble_layout(tmp_path / "model.pt") is None and ensemble_layout(None) is None
