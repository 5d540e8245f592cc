"""Fine-tuning with the tiny test backbone: the trunk/tail split is exact, the checkpoint is safetensors that loads
through weights_path as a model of its own, and it declines with a reason."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import write_catalog
from lookalike import finetune as ft
from lookalike.backbones import build_backbone, file_sha256
from lookalike.embedding import FeatureExtractor

FAST = ft.FinetuneConfig(epochs=2, views=2, batch_size=32)


@pytest.fixture
def big_catalog(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setattr(ft, "MIN_IMAGES", 40)
    root = tmp_path / "catalog"
    write_catalog(root, {f"p{i}": 6 for i in range(8)})
    return root


@pytest.mark.parametrize("name", ["test_tiny", "efficientnet_lite0"])
def test_tail_of_trunk_is_the_backbone(name: str):
    model = build_backbone(name, pretrained=False).module
    trunk, tail, params = ft.split_backbone(model, 2 if name != "test_tiny" else 1)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected, got = model(x), tail(trunk(x))
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e)
    trained = {id(p) for p in params}
    assert trained and all(id(p) in trained for p in model._conv_head.parameters()) if name != "test_tiny" else True


@pytest.mark.parametrize("runtime", ["openvino", "onnx"])
def test_trunk_maps_on_a_fast_runtime_equal_pytorchs(big_catalog: Path, make_settings, runtime: str):
    pytest.importorskip("openvino" if runtime == "openvino" else "onnxruntime")
    settings = make_settings(data_dir=big_catalog)
    extractor = FeatureExtractor(settings.replace(runtime="torch", precision="fp32"))
    trunk, _, _ = ft.split_backbone(extractor.model.eval(), 1)
    paths = sorted(big_catalog.rglob("*.jpg"))[:10]
    (big_catalog / "broken.jpg").write_bytes(b"not a photo")
    paths.insert(3, big_catalog / "broken.jpg")
    cfg = ft.FinetuneConfig(views=3)
    ref, ok_ref = ft.cache_trunk_maps(extractor, trunk, paths, cfg, "cpu", False)
    fast, ok = ft.cache_trunk_maps(extractor, trunk, paths, cfg, "cpu", False, runtime=runtime)
    assert ok.tolist() == ok_ref.tolist() == [0, 1, 2, 4, 5, 6, 7, 8, 9, 10]  # the broken photo is skipped
    assert fast.dtype == ref.dtype == torch.float16 and fast.shape == ref.shape == (10, 3, 32, 16, 16)
    torch.testing.assert_close(fast.float(), ref.float(), atol=2e-3, rtol=2e-3)
    assert len(list((settings.cache_dir / "models").glob("test_tiny-trunk-*-fp32.onnx"))) == 1  # exported once


def test_trunk_maps_fall_back_to_pytorch(big_catalog: Path, make_settings, monkeypatch, caplog):
    from lookalike import runtime

    def broken(*args, **kwargs):
        raise RuntimeError("no such runtime here")

    monkeypatch.setattr(runtime, "build_runner", broken)
    extractor = FeatureExtractor(make_settings(data_dir=big_catalog).replace(runtime="torch", precision="fp32"))
    trunk, _, _ = ft.split_backbone(extractor.model.eval(), 1)
    paths = sorted(big_catalog.rglob("*.jpg"))[:4]
    ref, _ = ft.cache_trunk_maps(extractor, trunk, paths, ft.FinetuneConfig(views=2), "cpu", False)
    with caplog.at_level("WARNING", logger="lookalike.finetune"):
        got, _ = ft.cache_trunk_maps(extractor, trunk, paths, ft.FinetuneConfig(views=2), "cpu", False, runtime="onnx")
    torch.testing.assert_close(got, ref)
    assert "the trunk does not run on onnx (no such runtime here); caching its maps in PyTorch" in caplog.text


def test_split_refuses_other_architectures():
    with pytest.raises(ValueError, match="efficientnet_lite"):
        ft.split_backbone(torch.nn.Linear(2, 2), 1)


def test_declines_a_small_catalog(make_settings, tmp_path: Path):
    root = tmp_path / "small"
    write_catalog(root, {"a": 3, "b": 3})
    with pytest.raises(ft.FinetuneDeclined, match="fine-tuning needs 200 photos"):
        ft.finetune(make_settings(data_dir=root), progress=False)


def test_declines_when_lda_is_as_good(big_catalog: Path, make_settings):
    # Synthetic products are told apart perfectly by the LDA already: nothing to gain.
    with pytest.raises(ft.FinetuneDeclined, match="keeping the base model"):
        ft.finetune(make_settings(data_dir=big_catalog), config=FAST, progress=False)


def test_checkpoint_loads_through_weights_path(big_catalog: Path, make_settings, tmp_path: Path):
    settings = make_settings(data_dir=big_catalog)
    cfg = ft.FinetuneConfig(epochs=3, views=2, batch_size=16, lr=1e-2, require_gain=False)
    result = ft.finetune(settings, config=cfg, out_path=tmp_path / "ft.safetensors", progress=False)
    assert result.path == tmp_path / "ft.safetensors"
    assert result.sha256 == file_sha256(result.path)
    sidecar = json.loads(result.path.with_suffix(".json").read_text(encoding="utf-8"))
    assert sidecar["sha256"] == result.sha256 and sidecar["images"] == 48 and sidecar["held_out"] == 16
    assert set(sidecar["validation"]) == {"untuned", "lda", "finetuned", "finetuned+lda", "ensemble"}
    assert sidecar["seconds"]["wall"] > 0 and len(sidecar["history"]) >= 1
    assert sidecar["ensemble"] == {"dim": 64, "aux": 32, "tails": 1}

    base = FeatureExtractor(settings)
    tuned = FeatureExtractor(settings.replace(weights_path=result.path))
    assert tuned.weights_fingerprint == result.fingerprint != base.weights_fingerprint
    assert tuned.fingerprint != base.fingerprint  # caches and manifests never mix
    photo = sorted(big_catalog.glob("p0/*.jpg"))[0]
    a, b = base.extract_features(photo), tuned.extract_features(photo)
    assert a.shape == b.shape and not np.allclose(a, b)  # the head really changed
    # The tail ensemble: [tuned main, base main, tuned aux, base aux], its base parts the base model's own
    raw_a, raw_b = base.extract([photo]).vectors[0], tuned.extract([photo]).vectors[0]
    assert tuned.raw_dim == 2 * base.raw_dim == 192
    np.testing.assert_allclose(raw_b[:64], b, rtol=1e-6)
    np.testing.assert_allclose(raw_b[64:128], raw_a[:64], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(raw_b[160:], raw_a[64:], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(raw_b[128:160], raw_a[64:], rtol=1e-4, atol=1e-5)  # TinyNet's aux: the shared trunk


def test_excluded_products_are_not_seen(big_catalog: Path, make_settings, tmp_path: Path, monkeypatch):
    monkeypatch.setattr(ft, "MIN_IMAGES", 30)
    cfg = ft.FinetuneConfig(epochs=1, views=1, batch_size=16, require_gain=False)
    result = ft.finetune(
        make_settings(data_dir=big_catalog), config=cfg, exclude_products={"p0", "p1"}, progress=False,
        out_path=tmp_path / "x.safetensors",
    )  # fmt: skip
    assert result.info["products"] == 6 and result.info["excluded_products"] == ["p0", "p1"]


def test_a_large_catalog_trains_on_a_bounded_sample(big_catalog: Path, make_settings, tmp_path: Path, caplog):
    cfg = ft.FinetuneConfig(epochs=1, views=1, batch_size=16, require_gain=False, max_photos=40)
    with caplog.at_level("INFO", logger="lookalike.finetune"):
        result = ft.finetune(
            make_settings(data_dir=big_catalog), config=cfg, progress=False, out_path=tmp_path / "s.safetensors"
        )
    assert result.info["sampled"] == {"photos": 40, "of_photos": 48, "products": 8, "of_products": 8}
    assert result.info["images"] == 40 and result.info["held_out"] == 8  # five photos a product, its last one held
    assert "training on a sample of 40 of 48 photos (8 of 8 products; max_photos 40)" in caplog.text
    cfg = ft.FinetuneConfig(epochs=1, views=1, batch_size=16, require_gain=False)  # the default max_photos
    whole = ft.finetune(make_settings(data_dir=big_catalog), config=cfg, progress=False, out_path=tmp_path / "w.st")
    assert whole.info["sampled"] is None and whole.info["images"] == 48


def test_max_photos_below_the_minimum_is_refused(big_catalog: Path, make_settings):
    with pytest.raises(ValueError, match="max_photos must be at least 40"):  # MIN_IMAGES, as the fixture sets it
        ft.finetune(make_settings(data_dir=big_catalog), config=ft.FinetuneConfig(max_photos=39), progress=False)


def test_sample_photos_shares_the_budget_between_products():
    labels = np.array([f"p{i}" for i, n in enumerate([10, 2, 7, 30, 5]) for _ in range(n)], dtype=object)
    kept = ft.sample_photos(labels, 16, seed=0)
    assert list(kept) == sorted(kept) and len(set(kept)) == len(kept)
    assert [int(np.sum(labels[kept] == f"p{i}")) for i in range(5)] == [3, 2, 3, 3, 3]  # 16 // 5 < 3: three each
    assert list(ft.sample_photos(labels, 16, seed=0)) == list(kept)  # seeded
    few = ft.sample_photos(labels, 9, seed=0)  # three photos of five products would not fit: three products keep them
    assert len(few) == 9 and len(set(labels[few])) == 3
    assert all(int(np.sum(labels[few] == p)) == 3 for p in set(labels[few]))


def test_distillation_keeps_the_base_lda_neighbourhoods(big_catalog: Path, make_settings, tmp_path: Path):
    from lookalike.ranking import l2_normalize
    from lookalike.tuning import SHRINKAGE, lda

    settings = make_settings(data_dir=big_catalog)
    photos = sorted(big_catalog.rglob("*.jpg"))
    labels = np.array([p.parent.name for p in photos], dtype=object)
    raw = FeatureExtractor(settings).extract(photos).vectors
    mean, matrix = lda(raw, labels, SHRINKAGE)
    target = l2_normalize((raw - mean) @ matrix)

    def gap(weight: float) -> float:  # how far the fine-tuned similarities are from the base LDA's
        cfg = ft.FinetuneConfig(epochs=3, views=1, batch_size=16, lr=1e-2, require_gain=False, distill_weight=weight)
        result = ft.finetune(settings, config=cfg, progress=False, out_path=tmp_path / f"d{weight}.safetensors")
        tuned = FeatureExtractor(settings.replace(weights_path=result.path)).extract(photos).vectors
        emb = l2_normalize(tuned[:, : raw.shape[1] - 32])  # the test backbone's embedding (its aux map has 32)
        return float(np.mean((emb @ emb.T - target @ target.T) ** 2))

    assert gap(200.0) < gap(0.0)


def test_safetensors_weights_path_errors_name_the_file(tmp_path: Path):
    from lookalike.backbones import WeightsUnavailableError

    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not safetensors")
    with pytest.raises(WeightsUnavailableError, match=r"bad\.safetensors cannot be loaded as safetensors"):
        build_backbone("efficientnet_lite0", weights_path=bad)
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        build_backbone("efficientnet_lite0", weights_path=tmp_path / "missing.safetensors")


def test_cli_tune_finetune_reports_a_decline(big_catalog: Path, tmp_path: Path, capsys, monkeypatch):
    from lookalike.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(ft, "FinetuneConfig", lambda: FAST)
    args = ["tune", "--method", "finetune", "--model-name", "test_tiny", "--data-dir", str(big_catalog)]
    assert main([*args, "--cache-dir", str(tmp_path / "cache")]) == 0
    assert "fine-tuning declined: on held-out catalog photos" in capsys.readouterr().out


def test_refit_on_all_photos_trains_again_for_the_chosen_epochs(big_catalog: Path, make_settings, tmp_path: Path):
    settings = make_settings(data_dir=big_catalog)
    base = dict(epochs=3, views=2, batch_size=16, lr=1e-2, require_gain=False, patience=5)
    plain = ft.FinetuneConfig(**base, refit_all=False)
    plain = ft.finetune(settings, config=plain, out_path=tmp_path / "a.safetensors", progress=False)
    refit = ft.finetune(settings, config=ft.FinetuneConfig(**base), out_path=tmp_path / "b.safetensors", progress=False)
    best = refit.info["validation"]["finetuned"]["epoch"]
    assert refit.info["config"]["refit_all"] is True  # the default
    assert plain.info["refit_history"] == [] and best == plain.info["validation"]["finetuned"]["epoch"]
    assert best > 1  # past the warm-up (held-out ties go to the more trained epoch), so the refit runs
    assert [h["epoch"] for h in refit.info["refit_history"]] == list(range(1, best + 1))
    assert refit.sha256 != plain.sha256  # the held-out photos changed the kept weights
    assert refit.info["validation"] == plain.info["validation"]  # judged before the refit, on photos it had not seen
    assert refit.info["calibration"] == plain.info["calibration"]  # from its own run, which leaves products out


def test_refit_trains_every_tail_again_and_judges_them_before(big_catalog: Path, make_settings, tmp_path: Path):
    from safetensors.torch import load_file

    settings = make_settings(data_dir=big_catalog)
    base = dict(epochs=3, views=2, batch_size=16, lr=1e-2, require_gain=False, patience=5, tails=2)
    plain = ft.FinetuneConfig(**base, refit_all=False)
    plain = ft.finetune(settings, config=plain, out_path=tmp_path / "a.safetensors", progress=False)
    refit = ft.finetune(settings, config=ft.FinetuneConfig(**base), out_path=tmp_path / "b.safetensors", progress=False)
    best = refit.info["validation"]["finetuned"]["epoch"]
    assert best > 1
    assert [h["epoch"] for h in refit.info["refit_history"]] == list(range(1, best + 1)) * 2  # both tails
    assert refit.info["validation"] == plain.info["validation"]  # the ensemble too, judged before the refit
    a, b = load_file(str(plain.path)), load_file(str(refit.path))
    assert a.keys() == b.keys()
    changed = {k.split(".")[0] + "." + k.split(".")[1] for k in a if not torch.equal(a[k], b[k])}
    assert len(changed) == 2, changed  # the two fine-tuned tails, and nothing of the base network or trunk


def test_arcface_loss_trains_and_an_unknown_loss_is_refused(big_catalog: Path, make_settings, tmp_path: Path):
    settings = make_settings(data_dir=big_catalog)
    cfg = ft.FinetuneConfig(epochs=2, views=1, batch_size=16, require_gain=False, loss="arcface", margin=0.2)
    result = ft.finetune(settings, config=cfg, out_path=tmp_path / "arc.safetensors", progress=False)
    assert all(np.isfinite(h["loss"]) for h in result.info["history"])
    with pytest.raises(ValueError, match="unknown fine-tune loss 'triplet'"):
        ft.finetune(settings, config=ft.FinetuneConfig(epochs=1, views=1, loss="triplet"), progress=False)


def test_simulated_unknowns_push_towards_a_uniform_answer():
    # the loss of a photo of a hidden product is lowest when it resembles every known product equally
    cfg = ft.FinetuneConfig(unknown_fraction=0.5, unknown_loss="uniform", unknown_weight=1.0, margin=0.0)
    proxies = torch.eye(4)
    unknown = torch.tensor([False, False, False, True])
    target = torch.tensor([3])
    uniform = torch.nn.functional.normalize(torch.tensor([[1.0, 1.0, 1.0, 0.0]]), dim=1)
    leaning = torch.nn.functional.normalize(torch.tensor([[1.0, 0.2, 0.2, 0.0]]), dim=1)
    loss_uniform, stats = ft._proxy_loss(uniform, proxies, target, cfg, unknown)
    assert loss_uniform < ft._proxy_loss(leaning, proxies, target, cfg, unknown)[0]
    assert "unknown_soft_max_cos" in stats
    # a known product's photo is classified among the known products only
    photo = torch.nn.functional.normalize(torch.tensor([[0.1, 0.3, 0.1, 0.3]]), dim=1)  # as close to p3 as to p1
    masked, _ = ft._proxy_loss(photo, proxies, torch.tensor([1]), cfg, unknown)
    assert float(masked) < float(ft._proxy_loss(photo, proxies, torch.tensor([1]), cfg)[0]) - 0.5


def test_finetune_with_simulated_unknowns_runs(big_catalog: Path, make_settings, tmp_path: Path):
    cfg = ft.FinetuneConfig(epochs=3, views=1, batch_size=16, require_gain=False, unknown_fraction=0.25)
    result = ft.finetune(make_settings(data_dir=big_catalog), config=cfg, out_path=tmp_path / "u.st", progress=False)
    assert len(result.info["history"]) >= 2 and all(np.isfinite(h["loss"]) for h in result.info["history"])


def test_ensemble_off_saves_the_fine_tuned_backbone_alone(big_catalog: Path, make_settings, tmp_path: Path):
    settings = make_settings(data_dir=big_catalog)
    cfg = ft.FinetuneConfig(epochs=2, views=1, batch_size=16, require_gain=False, ensemble=False)
    result = ft.finetune(settings, config=cfg, out_path=tmp_path / "one.safetensors", progress=False)
    assert result.info["ensemble"] is None and result.info["calibration"] is None
    assert result.info["validation"]["ensemble"] is None
    tuned = FeatureExtractor(settings.replace(weights_path=result.path))
    assert tuned.raw_dim == FeatureExtractor(settings).raw_dim  # the backbone's own layout


def test_two_tails_are_trained_apart_and_saved_together(big_catalog: Path, make_settings, tmp_path: Path):
    settings = make_settings(data_dir=big_catalog)
    cfg = ft.FinetuneConfig(epochs=3, views=2, batch_size=16, lr=1e-2, require_gain=False, tails=2)
    result = ft.finetune(settings, config=cfg, out_path=tmp_path / "two.safetensors", progress=False)
    assert result.info["ensemble"] == {"dim": 64, "aux": 32, "tails": 2}
    tuned = FeatureExtractor(settings.replace(weights_path=result.path))
    raw = tuned.extract(sorted(big_catalog.glob("p0/*.jpg"))[:2]).vectors
    assert raw.shape == (2, 3 * 96)
    assert not np.allclose(raw[:, :64], raw[:, 64:128])  # other batches and views: another tail
    with pytest.raises(ValueError, match="tails must be at least 1"):
        ft.finetune(settings, config=ft.FinetuneConfig(tails=0), progress=False)
