"""The torch side of the runtimes: the exportable graph, the eager PyTorch runner and the ONNX export.

Imported only when a model must be built or exported (:mod:`lookalike.runtime` itself does not import torch), so a
search on an exported OpenVINO / ONNX model never loads PyTorch.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .runtime import _INPUT, _OUTPUT, ONNX_OPSET, center_weights
from .store import atomic_write_bytes


class PixelsToMaps(nn.Module):
    """uint8 pixels (B, H, W, 3) -> what ``network`` makes of them after the model's normalisation: an exportable
    graph. Fine-tuning runs its frozen trunk through it (:func:`lookalike.finetune_net.cache_trunk_maps`).

    NHWC input permuted to NCHW is channels_last in memory, which is what oneDNN's convolutions want.
    """

    def __init__(self, network: nn.Module, mean, std):
        super().__init__()
        self.network = network
        mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        # (x / 255 - mean) / std folded into one multiply-add.
        self.register_buffer("scale", 1.0 / (255.0 * std), persistent=False)
        self.register_buffer("shift", -mean / std, persistent=False)

    def forward(self, pixels: torch.Tensor):
        return self.network(pixels.permute(0, 3, 1, 2).float() * self.scale + self.shift)


class PixelsToFeatures(PixelsToMaps):
    """uint8 pixels (B, H, W, 3) -> raw vectors (B, raw_dim): the whole computation, in one exportable graph."""

    def __init__(self, backbone: nn.Module, mean, std, pooling: str):
        super().__init__(backbone, mean, std)
        self.pooling = pooling
        self._weights: dict[tuple[int, int, str], torch.Tensor] = {}

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        maps = super().forward(pixels)
        return torch.cat([self.pool(m.float()) for m in maps], dim=1)

    def pool(self, fmap: torch.Tensor) -> torch.Tensor:
        if self.pooling == "avg":
            return fmap.mean(dim=(2, 3))
        h, w = (int(s) for s in fmap.shape[-2:])
        key = (h, w, str(fmap.device))
        if key not in self._weights:
            self._weights[key] = torch.from_numpy(center_weights(h, w)).to(fmap.device)
        return torch.einsum("bchw,hw->bc", fmap, self._weights[key])


class TorchRunner:
    """Eager PyTorch: ``inference_mode``, channels_last; fp16/bf16 through autocast."""

    name = "torch"

    def __init__(self, graph: PixelsToFeatures, device: str, precision: str, threads: int | None = None):
        if threads is not None and not device.startswith("cuda"):
            torch.set_num_threads(threads)  # process-wide: the setting says how many cores the network gets
        if device.startswith("cuda"):
            torch.backends.cudnn.benchmark = True  # one input size: let cuDNN pick its fastest kernels once
        self.graph = graph.to(device, memory_format=torch.channels_last)
        self.device = device
        self.precision = precision
        self._dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)

    def __call__(self, pixels) -> np.ndarray:
        with torch.inference_mode():
            x = pixels if isinstance(pixels, torch.Tensor) else torch.from_numpy(np.require(pixels, None, "CW"))
            x = x.to(self.device, non_blocking=True)
            if self._dtype is None:
                out = self.graph(x)
            else:
                with torch.autocast(torch.device(self.device).type, dtype=self._dtype):
                    out = self.graph(x)
            return out.float().cpu().numpy()


def export_onnx(graph: PixelsToFeatures, input_size: int, path: Path) -> Path:
    """The graph as ONNX (fp32, any batch size, this input size), written atomically to ``path``."""
    import io

    graph = graph.to("cpu").eval()
    example = torch.zeros((2, input_size, input_size, 3), dtype=torch.uint8)
    buf = io.BytesIO()
    with torch.no_grad():
        graph(example)  # makes the pooling weights, so that the trace sees them as constants
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        torch.onnx.export(
            graph,
            (example,),
            buf,
            input_names=[_INPUT],
            output_names=[_OUTPUT],
            dynamic_axes={_INPUT: {0: "batch"}, _OUTPUT: {0: "batch"}},
            opset_version=ONNX_OPSET,
            do_constant_folding=True,
            dynamo=False,
        )
    atomic_write_bytes(path, buf.getvalue())
    return path
