"""The network side of fine-tuning (:mod:`lookalike.finetune`, kept apart for size): splitting the backbone into
a frozen trunk and a trained tail, the trunk's cached feature maps of augmented views, the pooled tail output (the
embedding the engine indexes) and the proxy loss with its margin and simulated unknowns (:mod:`lookalike.outliers`).
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

import numpy as np

from . import outliers
from .imaging import ImageError, open_image

if TYPE_CHECKING:
    from .finetune import FinetuneConfig

logger = logging.getLogger("lookalike.finetune")  # the same logger as the run it is part of


def split_backbone(model: Any, tail_blocks: int):
    """(trunk, tail, trainable parameters): ``tail(trunk(x))`` equals ``model(x)`` (the (main, aux) maps).

    Supports the EfficientNet-Lite backbones and the tiny test backbone; other architectures raise ValueError.
    """
    from torch import nn

    from .nets import EfficientNetLiteMaps, TinyNet

    if isinstance(model, EfficientNetLiteMaps):
        n = len(model._blocks)
        if not 1 <= tail_blocks < n:
            raise ValueError(f"tail_blocks must be between 1 and {n - 1}, got {tail_blocks}")
    elif not isinstance(model, TinyNet):
        raise ValueError(
            f"fine-tuning supports the efficientnet_lite backbones (and test_tiny), not {type(model).__name__}; "
            "use tune: true (LDA) with this model"
        )
    parts = model.tail_parts(tail_blocks)

    class Trunk(nn.Module):
        def forward(self, x):
            return model.run_trunk(x, tail_blocks)

    class Tail(nn.Module):
        def forward(self, x):
            return model.run_tail(x, parts)

    return Trunk(), Tail(), list(parts.parameters())


# --- the cached views ---------------------------------------------------------------------------------------


def _view(img, size: int, rng: np.random.Generator, cfg: FinetuneConfig, plain: bool) -> np.ndarray:
    """One (size, size, 3) uint8 view: the extractor's plain resize, or a random crop / flip / jitter of it."""
    from PIL import Image

    if plain:
        return np.asarray(img.resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)
    w, h = img.size
    area = w * h * rng.uniform(*cfg.crop_scale)
    ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    cw = int(round(min(w, math.sqrt(area * ratio))))
    ch = int(round(min(h, math.sqrt(area / ratio))))
    x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    view = img.resize((size, size), Image.Resampling.BILINEAR, box=(x0, y0, x0 + cw, y0 + ch))
    a = np.asarray(view, dtype=np.float32)
    if rng.random() < 0.5:
        a = a[:, ::-1]
    a = (a - a.mean()) * rng.uniform(0.8, 1.2) + a.mean() * rng.uniform(0.8, 1.2)
    return np.clip(a, 0, 255).astype(np.uint8)


def trunk_runner(extractor, trunk, tail_blocks: int, device: str, runtime: str):
    """uint8 pixels (B, S, S, 3) -> the frozen trunk's maps (B, C, H, W) float32, on ``runtime``.

    On a CPU the fast runtimes (OpenVINO, ONNX Runtime) give the eager PyTorch trunk's maps to float rounding in a
    fraction of its time (caching the views was 70 % of a fine-tune's wall time in PyTorch; docs/quality.md). The
    trunk is exported once into ``<cache_dir>/models/`` beside the base model's own export. Should that fail, the
    run goes on in PyTorch with a warning: the maps are the same either way.
    """
    from .graph import PixelsToMaps, TorchRunner
    from .runtime import build_runner

    pre = extractor.spec.preprocess
    graph = PixelsToMaps(trunk, pre.mean, pre.std).eval()
    if runtime != "torch":
        identity = {
            **extractor._graph_identity(),
            "model_name": f"{extractor.spec.name}-trunk",
            "part": f"all but the last {tail_blocks} blocks",
        }
        try:
            return build_runner(
                graph, runtime=runtime, precision="fp32", device=device, threads=extractor.settings.threads,
                input_size=extractor.input_size, cache_dir=extractor.settings.cache_dir, identity=identity,
            )  # fmt: skip
        except Exception as exc:  # an optimisation only: PyTorch computes the same maps
            logger.warning("fine-tune: the trunk does not run on %s (%s); caching its maps in PyTorch", runtime, exc)
    return TorchRunner(graph, device, "fp32")


def cache_trunk_maps(extractor, trunk, paths, cfg: FinetuneConfig, device: str, progress: bool | None, *,
                     runtime: str = "torch"):  # fmt: skip
    """(maps (n, views, C, H, W) float16 on ``device``, ok rows): the frozen trunk's output for every view of every
    photo that decodes, computed on ``runtime`` (:func:`trunk_runner`)."""
    import torch
    from tqdm.auto import tqdm

    size = extractor.input_size
    run = trunk_runner(extractor, trunk, cfg.tail_blocks, device, runtime)
    rng = np.random.default_rng(cfg.seed)
    ok, chunks, batch = [], [], []
    bar = tqdm(total=len(paths), unit="img", desc="fine-tune: caching trunk maps", disable=progress is False)

    def flush():
        maps = torch.from_numpy(run(np.stack(batch))).to(device, torch.float16)  # (B*views, C, H, W)
        chunks.append(maps.reshape(-1, cfg.views, *maps.shape[1:]))
        batch.clear()

    for i, path in enumerate(paths):
        try:
            img = open_image(path, extractor.settings.max_image_pixels, draft_size=size).image
        except ImageError as exc:
            logger.warning("fine-tune skips %s: %s", path, exc.reason)
            bar.update(1)
            continue
        ok.append(i)
        batch.extend(_view(img, size, rng, cfg, plain=v == 0) for v in range(cfg.views))
        if len(batch) >= 32 * cfg.views:
            flush()
        bar.update(1)
    if batch:
        flush()
    bar.close()
    return torch.cat(chunks), np.array(ok, dtype=int)


# --- training -----------------------------------------------------------------------------------------------


def _pool(fmap, pooling: str):
    import torch

    from .runtime import center_weights

    if pooling == "avg":
        return fmap.mean(dim=(2, 3))
    w = torch.from_numpy(center_weights(*fmap.shape[-2:])).to(fmap.device)
    return torch.einsum("bchw,hw->bc", fmap, w)


def _raw(tail, maps, pooling: str, batch: int = 256) -> np.ndarray:
    """Raw vectors (every map ``tail`` returns, pooled: main then aux), as the extractor would give them, of cached
    maps."""
    import torch

    out = []
    with torch.inference_mode():
        for s in range(0, len(maps), batch):
            pooled = [_pool(m, pooling) for m in tail(maps[s : s + batch].float())]
            out.append(torch.cat(pooled, dim=1).float().cpu().numpy())
    return np.concatenate(out)


def _proxy_loss(emb, proxies, target, cfg: FinetuneConfig, unknown=None):
    """(loss, statistics) of a batch: normalised softmax over the product proxies, with the configured margin on
    the true product's logit: CosFace subtracts it from the cosine, ArcFace adds it to the angle.

    ``unknown`` (a bool mask over products; None: all known) simulates unknown products
    (:func:`lookalike.outliers.loss_with_unknowns`): their proxies leave the softmax, and their photos are pushed
    away from every known product (``cfg.unknown_loss``: towards a uniform answer, or below an energy margin)."""
    import torch

    cos = emb @ torch.nn.functional.normalize(proxies, dim=1).T
    onehot = torch.nn.functional.one_hot(target, proxies.shape[0]).to(cos.dtype)
    if cfg.loss == "arcface":
        theta = torch.acos(cos.clamp(-1 + 1e-6, 1 - 1e-6))
        cos = torch.where(onehot.bool(), torch.cos(theta + cfg.margin), cos)
    elif cfg.loss == "cosface":
        cos = cos - cfg.margin * onehot
    else:
        raise ValueError(f"unknown fine-tune loss {cfg.loss!r}: expected cosface or arcface")
    if unknown is None:
        return torch.nn.functional.cross_entropy(cfg.scale * cos, target), {}
    # the margin is already on the true products' cosines (an unknown product's own column leaves the softmax)
    return outliers.loss_with_unknowns(
        cos, target, unknown, scale=cfg.scale, margin=0.0, kind=cfg.unknown_loss, weight=cfg.unknown_weight,
        unknown_margin=cfg.unknown_margin,
    )  # fmt: skip
