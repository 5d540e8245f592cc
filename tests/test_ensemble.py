"""The ensemble ``tune: finetune`` indexes: a two-tail network (fine-tuned tail beside the base one on a shared
trunk), a projection whose parts are normalised apart (so the index compares the mean of their cosines), and the
no-match threshold from a run that never learnt some products."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lookalike.backbones import get_backbone, spec_for, two_tail_blocks
from lookalike.nets import TwoTailMaps
from lookalike.ranking import l2_normalize
from lookalike.tuning import (
    SHRINKAGE,
    Ensemble,
    Projection,
    TuningDeclined,
    adapt,
    calibrate_ensemble,
    fit_ensemble,
    lda,
    two_tail_raw,
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
    raw = two_tail_raw(tuned, base, 7)
    np.testing.assert_array_equal(raw[:, ens.base_columns()], base)
    proj = fit_ensemble(raw, labels, ens)
    mean, matrix = lda(base, labels, SHRINKAGE)
    expected = np.hstack([l2_normalize(tuned[:, :7]), l2_normalize((base - mean) @ matrix)]) / np.sqrt(2)
    np.testing.assert_allclose(proj.apply(raw), expected, atol=1e-5)
    assert proj.blocks == (7, matrix.shape[1]) and proj.info["method"] == "ensemble"
    tuned_index = adapt(raw, labels, 7, tune="finetune", ensemble=ens)
    assert tuned_index.tuning["method"] == "ensemble" and tuned_index.projection.blocks == proj.blocks
    assert tuned_index.calibration is not None and "source" not in tuned_index.calibration  # hidden groups, in its space
    with_run = adapt(raw, labels, 7, tune="finetune", ensemble=Ensemble(7, 3, {"threshold": 0.5}))
    assert with_run.threshold == 0.5 and with_run.calibration["source"] == "fine-tune"
    untuned = adapt(raw, labels, 7, tune=False, ensemble=ens)  # tune: false: the fine-tuned embedding alone
    assert untuned.projection is None and untuned.tuning == {"status": "off"}
    np.testing.assert_array_equal(untuned.transform(raw, 7), raw[:, :7])
    with pytest.raises(ValueError, match="raw vectors have 20 values, got 17"):
        fit_ensemble(raw[:, :17], labels, ens)
    with pytest.raises(TuningDeclined, match="needs 5 or more"):
        fit_ensemble(raw[:24], labels[:24], ens)  # four products


def test_calibrate_ensemble_puts_the_threshold_at_a_quartile_of_the_products_it_never_learnt():
    tuned, labels = _clusters(12, 8, 12, seed=4)
    base, _ = _clusters(12, 8, 12, seed=5)
    raw = two_tail_raw(tuned, base, 8)
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


def test_two_tail_on_efficientnet_lite_keeps_the_base_models_maps():
    spec = get_backbone("efficientnet_lite0")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        base = spec.architecture().eval()
    two = TwoTailMaps(base, 2).eval()
    with torch.no_grad():
        for p in two.tuned.parameters():  # a "fine-tuned" tail that differs from the base one
            p.add_(0.01)
        x = torch.rand(2, 3, 64, 64)
        main_b, aux_b = base(x)
        main_t, main_b2, aux_t, aux_b2 = two(x)
    torch.testing.assert_close(main_b2, main_b)
    torch.testing.assert_close(aux_b2, aux_b)
    assert main_t.shape == main_b.shape and aux_t.shape == aux_b.shape
    assert not torch.allclose(main_t, main_b)
    assert set(k.split(".")[0] for k in two.state_dict()) == {"base", "tuned"}


def test_a_two_tail_checkpoint_is_recognised_from_its_header(tmp_path: Path):
    from safetensors.torch import save_file

    path = tmp_path / "two.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"lookalike": json.dumps({"two_tail": 1})})
    assert two_tail_blocks(path) == 1
    spec = spec_for("test_tiny", path)
    assert spec.raw_dim == 2 * get_backbone("test_tiny").raw_dim and spec.dim == get_backbone("test_tiny").dim
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain), metadata={"lookalike": json.dumps({"method": "finetune"})})
    assert two_tail_blocks(plain) is None and spec_for("test_tiny", plain) is get_backbone("test_tiny")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint")
    assert two_tail_blocks(junk) is None and two_tail_blocks(tmp_path / "gone.safetensors") is None
    assert two_tail_blocks(tmp_path / "model.pt") is None and two_tail_blocks(None) is None
