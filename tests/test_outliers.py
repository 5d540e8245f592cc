"""Simulated unknowns for the fine-tune (lookalike.outliers): which products play unknown, what the loss does to
them and to the known ones, and that a fine-tune with them runs and records them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import write_catalog
from lookalike import finetune as ft
from lookalike import outliers


def test_pick_unknown_counts_and_seeding():
    masks = [outliers.pick_unknown(20, 0.25, np.random.default_rng(3)) for _ in range(2)]
    assert masks[0].sum() == 5 and np.array_equal(masks[0], masks[1])
    rng = np.random.default_rng(0)
    assert not np.array_equal(outliers.pick_unknown(20, 0.25, rng), outliers.pick_unknown(20, 0.25, rng))
    assert not outliers.pick_unknown(20, 0.0, np.random.default_rng(0)).any()
    assert outliers.pick_unknown(4, 0.9, np.random.default_rng(0)).sum() == 2  # two products stay known
    assert outliers.pick_unknown(10, 0.01, np.random.default_rng(0)).sum() == 1


@pytest.mark.parametrize(
    ("fraction", "kind", "weight", "message"),
    [(1.0, "energy", 1.0, "unknown_fraction"), (0.2, "softmax", 1.0, "unknown_loss"), (0.2, "energy", -1, "weight")],
)
def test_bad_settings_are_named(fraction, kind, weight, message):
    with pytest.raises(ValueError, match=message):
        outliers.check_config(fraction, kind, weight)


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    cos = (torch.rand(12, 6, generator=g) * 2 - 1).requires_grad_(True)
    target = torch.arange(12) % 6
    return cos, target


def test_without_unknowns_it_is_the_cosface_loss():
    cos, target = _batch()
    unknown = torch.zeros(6, dtype=torch.bool)
    loss, stats = outliers.loss_with_unknowns(
        cos, target, unknown, scale=24.0, margin=0.1, kind="energy", weight=1.0, unknown_margin=0.4
    )
    expected = F.cross_entropy(24.0 * (cos - 0.1 * F.one_hot(target, 6)), target)
    torch.testing.assert_close(loss, expected)
    assert stats == {}


@pytest.mark.parametrize("kind", outliers.UNKNOWN_LOSSES)
def test_unknown_rows_are_pushed_from_known_proxies_only(kind: str):
    cos, target = _batch(1)
    unknown = torch.tensor([False, False, False, False, True, True])
    loss, stats = outliers.loss_with_unknowns(
        cos, target, unknown, scale=24.0, margin=0.1, kind=kind, weight=1.0, unknown_margin=-1.0
    )
    loss.backward()
    grad = cos.grad
    rows_unknown = unknown[target]
    # The unknown products' proxies are out of every softmax this epoch: no gradient reaches their columns.
    assert torch.all(grad[:, 4:] == 0)
    # An unknown row is never pulled towards its own (absent) proxy, and the loss lowers its top known cosine
    # (energy) or evens its known cosines out (uniform).
    top = cos.detach()[rows_unknown][:, :4].argmax(dim=1)
    assert torch.all(grad[rows_unknown][torch.arange(len(top)), top] > 0)  # gradient descent lowers the top one
    assert "unknown_soft_max_cos" in stats
    # Known rows pull their own proxy's cosine up, as in the plain loss.
    known_rows = torch.nonzero(~rows_unknown).flatten()
    assert torch.all(grad[known_rows, target[known_rows]] < 0)


def test_energy_term_is_zero_below_the_margin():
    cos = torch.full((2, 3), -0.5)
    target = torch.tensor([2, 2])
    unknown = torch.tensor([False, False, True])
    loss, stats = outliers.loss_with_unknowns(
        cos, target, unknown, scale=24.0, margin=0.1, kind="energy", weight=1.0, unknown_margin=0.4
    )
    assert float(loss) == 0.0 and stats["unknown_soft_max_cos"] < 0.4


def test_finetune_with_simulated_unknowns(tmp_path: Path, make_settings, monkeypatch):
    monkeypatch.setattr(ft, "MIN_IMAGES", 40)
    root = tmp_path / "catalog"
    write_catalog(root, {f"p{i}": 6 for i in range(8)})
    cfg = ft.FinetuneConfig(epochs=3, views=2, batch_size=16, require_gain=False, unknown_fraction=0.25)
    result = ft.finetune(make_settings(data_dir=root), config=cfg, out_path=tmp_path / "ft.safetensors")
    history = json.loads(result.path.with_suffix(".json").read_text(encoding="utf-8"))["history"]
    assert "unknown_soft_max_cos" not in history[0]  # the warm-up trains the proxies alone
    assert all("unknown_soft_max_cos" in h for h in history[1:]) and len(history) == 3
    assert result.info["config"]["unknown_fraction"] == 0.25
    assert all(h["unknown_products"] == 2 for h in history[1:])
    assert len({h["unknown_group"] for h in history[1:]}) == 2  # a new group each epoch (seeded)


def test_finetune_with_one_fixed_unknown_group(tmp_path: Path, make_settings, monkeypatch):
    monkeypatch.setattr(ft, "MIN_IMAGES", 40)
    root = tmp_path / "catalog"
    write_catalog(root, {f"p{i}": 6 for i in range(8)})
    cfg = ft.FinetuneConfig(
        epochs=3, views=2, batch_size=16, require_gain=False, unknown_fraction=0.25, unknown_rotate=False
    )
    result = ft.finetune(make_settings(data_dir=root), config=cfg, out_path=tmp_path / "ft.safetensors")
    history = result.info["history"][1:]
    assert len({h["unknown_group"] for h in history}) == 1 and all(h["unknown_products"] == 2 for h in history)


def test_finetune_refuses_a_bad_unknown_loss_before_any_work(tmp_path: Path, make_settings):
    with pytest.raises(ValueError, match="unknown_loss"):
        ft.finetune(make_settings(data_dir=tmp_path / "nowhere"), config=ft.FinetuneConfig(unknown_loss="x"))
