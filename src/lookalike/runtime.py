"""What runs the network: PyTorch, ONNX Runtime or OpenVINO; in fp32, fp16/bf16 or INT8.

Whatever runs it, the computation is one graph, :class:`PixelsToFeatures`: uint8 pixels (B, H, W, 3) ->
normalisation -> backbone -> pooling -> raw vectors (B, raw_dim). PyTorch runs it eagerly. For ONNX Runtime and
OpenVINO it is exported once to ONNX (and for INT8 quantized statically, on a fixed calibration set that ships
with scikit-image) and kept under ``<cache_dir>/models/``, so later processes start in a second.

fp32 runtimes agree with PyTorch to float rounding (tests check it), so they share caches and indexes. INT8,
fp16 and bf16 give slightly different vectors: the extractor's ``describe()`` names the precision, so caches and
indexes of one are never used for another.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .store import atomic_write_bytes

logger = logging.getLogger(__name__)

CENTER_SIGMA = 0.6  # width of the centre weighting, as a fraction of the half-side of the feature map
GRAPH_VERSION = 1  # bump when the exported graph changes (names the files under <cache_dir>/models/)
ONNX_OPSET = 17
CALIBRATION_VERSION = "skimage-v1"  # the INT8 calibration images and method; part of the vectors' identity
_INPUT, _OUTPUT = "pixels", "features"


def center_weights(height: int, width: int) -> np.ndarray:
    """Gaussian weights over a feature map, summing to 1, highest in the middle.

    Shoppers and catalog photographers put the product in the middle of the frame; weighting the centre keeps
    shelf clutter at the edges from dominating the descriptor (docs/quality.md has the measurements).
    """

    def axis(n: int) -> np.ndarray:
        r = (np.arange(n) - (n - 1) / 2) / max((n - 1) / 2, 1)
        return np.exp(-(r**2) / (2 * CENTER_SIGMA**2))

    w = np.outer(axis(height), axis(width))
    return (w / w.sum()).astype(np.float32)


class PixelsToFeatures(nn.Module):
    """uint8 pixels (B, H, W, 3) -> raw vectors (B, raw_dim): the whole computation, in one exportable graph.

    NHWC input permuted to NCHW is channels_last in memory, which is what oneDNN's convolutions want.
    """

    def __init__(self, backbone: nn.Module, mean, std, pooling: str):
        super().__init__()
        self.backbone = backbone
        mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        # (x / 255 - mean) / std folded into one multiply-add.
        self.register_buffer("scale", 1.0 / (255.0 * std), persistent=False)
        self.register_buffer("shift", -mean / std, persistent=False)
        self.pooling = pooling
        self._weights: dict[tuple[int, int, str], torch.Tensor] = {}

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.permute(0, 3, 1, 2).float() * self.scale + self.shift
        maps = self.backbone(x)
        return torch.cat([self.pool(m.float()) for m in maps], dim=1)

    def pool(self, fmap: torch.Tensor) -> torch.Tensor:
        if self.pooling == "avg":
            return fmap.mean(dim=(2, 3))
        h, w = (int(s) for s in fmap.shape[-2:])
        key = (h, w, str(fmap.device))
        if key not in self._weights:
            self._weights[key] = torch.from_numpy(center_weights(h, w)).to(fmap.device)
        return torch.einsum("bchw,hw->bc", fmap, self._weights[key])


Runner = Callable[[Any], np.ndarray]  # uint8 (B, H, W, 3) numpy array or tensor -> (B, raw_dim) float32


def resolve_precision(precision: str, device: str) -> str:
    """``auto`` is fp16 on a CUDA GPU and fp32 elsewhere."""
    if precision == "auto":
        return "fp16" if device.startswith("cuda") else "fp32"
    if precision == "fp16" and not device.startswith("cuda"):
        raise ValueError(f"precision='fp16' needs a CUDA GPU, but the device is {device!r}; use fp32 or int8")
    return precision


def default_threads() -> int:
    """Cores this process may run on (not the machine's count: containers and taskset limit it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


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


class OnnxRunner:
    """ONNX Runtime on the CPU (or CUDA with onnxruntime-gpu). ``InferenceSession.run`` is thread-safe."""

    name = "onnx"

    def __init__(self, path: Path, device: str, threads: int | None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or 0  # 0: one per physical core
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        providers: list[Any] = ["CPUExecutionProvider"]
        if device.startswith("cuda"):
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise RuntimeError(
                    "runtime='onnx' on a CUDA device needs onnxruntime-gpu (pip install onnxruntime-gpu); "
                    "or use runtime=torch, which runs on the GPU as it is"
                )
            index = int(device.split(":")[1]) if ":" in device else 0
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": index}))
        self.session = ort.InferenceSession(str(path), options, providers=providers)

    def __call__(self, pixels) -> np.ndarray:
        if isinstance(pixels, torch.Tensor):
            pixels = pixels.cpu().numpy()
        return self.session.run(None, {_INPUT: np.ascontiguousarray(pixels, dtype=np.uint8)})[0]


class OpenVinoRunner:
    """OpenVINO on the CPU. Small batches (a query) run in latency mode: one request on all the threads. Larger
    batches are split over throughput-mode streams (one per core here), which keeps each core on its own images
    instead of synchronising on every layer: measured +20-30% for EfficientNet-B0 and Lite0 on two cores."""

    name = "openvino"
    SPLIT_FROM = 8  # images in a batch from which it is split over streams

    def __init__(self, path: Path, precision: str, threads: int | None):
        import openvino as ov

        self._config: dict[str, Any] = {
            # Explicit: on CPUs with bf16 instructions OpenVINO would otherwise compute fp32 models in bf16.
            "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
        }
        if threads:
            self._config["INFERENCE_NUM_THREADS"] = int(threads)
        self._core = ov.Core()
        self._model = self._core.read_model(str(path))
        self.compiled = self._core.compile_model(self._model, "CPU", {**self._config, "PERFORMANCE_HINT": "LATENCY"})
        self._local = threading.local()
        self._streams = None  # (AsyncInferQueue, number of streams), compiled on the first large batch
        self._streams_lock = threading.Lock()

    def __call__(self, pixels) -> np.ndarray:
        if isinstance(pixels, torch.Tensor):
            pixels = pixels.cpu().numpy()
        pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
        if len(pixels) >= self.SPLIT_FROM:
            return self._split(pixels)
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        request.infer({0: pixels})
        return np.array(request.get_output_tensor(0).data, dtype=np.float32, copy=True)

    def _split(self, pixels: np.ndarray) -> np.ndarray:
        import openvino as ov

        with self._streams_lock:  # one large batch at a time; queries keep their own requests meanwhile
            if self._streams is None:
                config = {**self._config, "PERFORMANCE_HINT": "THROUGHPUT"}
                compiled = self._core.compile_model(self._model, "CPU", config)
                n = max(1, int(compiled.get_property("NUM_STREAMS")))
                self._streams = (ov.AsyncInferQueue(compiled, n), n)
            queue, n = self._streams
            parts = np.array_split(np.arange(len(pixels)), n)
            outputs: dict[int, np.ndarray] = {}

            def done(request, index: int) -> None:
                outputs[index] = np.array(request.get_output_tensor(0).data, dtype=np.float32, copy=True)

            queue.set_callback(done)
            for index, rows in enumerate(parts):
                if len(rows):
                    queue.start_async({0: pixels[rows[0] : rows[-1] + 1]}, index)
            queue.wait_all()
            return np.concatenate([outputs[i] for i in sorted(outputs)])


# --- export and quantization ----------------------------------------------------------------------------------


def model_file(cache_dir: Path, identity: dict[str, Any], precision: str) -> Path:
    """Where the exported graph of this model (and precision) is kept."""
    blob = repr(sorted(identity.items())) + f"|graph{GRAPH_VERSION}|opset{ONNX_OPSET}|{torch.__version__}"
    key = hashlib.sha256(blob.encode()).hexdigest()[:16]
    suffix = f"int8-{CALIBRATION_VERSION}" if precision == "int8" else "fp32"
    return Path(cache_dir) / "models" / f"{identity['model_name']}-{key}-{suffix}.onnx"


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


def calibration_pixels(input_size: int, resample) -> np.ndarray:
    """A fixed, varied set of real photos (scikit-image's, offline), as uint8 (N, size, size, 3).

    Views of each photo (whole, centre crop, corners, mirrored) give the activation ranges some spread.
    """
    from PIL import Image, ImageOps
    from skimage import data

    names = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "camera")
    names += ("coins", "clock", "cat", "colorwheel", "retina", "brick", "gravel", "grass")
    photos = []
    for name in names:
        try:
            pixels = getattr(data, name)()
        except Exception:  # a photo that needs a download (retina, ...) is simply left out
            continue
        photos.append(Image.fromarray(np.asarray(pixels)).convert("RGB"))
    views = []
    for img in photos:
        w, h = img.size
        for box in (
            (0, 0, w, h),
            (w // 8, h // 8, w - w // 8, h - h // 8),
            (0, 0, w // 2, h // 2),
            (w // 2, h // 2, w, h),
        ):
            view = img.crop(box).resize((input_size, input_size), resample)
            views.append(np.asarray(view))
            views.append(np.asarray(ImageOps.mirror(view)))
    return np.stack(views)


# What gets quantized: convolutions and the residual additions between them (so that activations stay int8 from
# one convolution to the next); see quantize_int8 for what stays in float.
QUANT_OPTIONS: dict[str, Any] = {}
QUANT_OPS = ("Conv", "Add")


def quantize_int8(fp32_path: Path, out_path: Path, calibration: np.ndarray) -> Path:
    """Static INT8 quantization (QDQ: u8 activations, per-channel s8 weights) of the backbone's convolutions
    and additions; normalisation and pooling stay in float. Runs in ONNX Runtime and OpenVINO alike."""
    import tempfile

    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter([{_INPUT: calibration[i : i + 8]} for i in range(0, len(calibration), 8)])

        def get_next(self):
            return next(self._batches, None)

    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        graph = onnx.load(str(prepared), load_external_data=False)
        outside = [node.name for node in graph.graph.node if not node.name.startswith("/backbone/")]
        convs = [node for node in graph.graph.node if node.op_type == "Conv"]
        # Kept in float, as measured on real photos (EfficientNet-Lite0's cosine to fp32 goes from 0.81 to 0.994):
        # the stem, whose input is the image itself, and depthwise convolutions, whose batch-norm-folded weights
        # quantize badly per channel (and which are memory-bound, so there is little to gain).
        grouped = [n.name for n in convs if any(a.name == "group" and a.i > 1 for a in n.attribute)]
        outside += convs[:1] and [convs[0].name]
        outside += grouped
        quantized = Path(tmp) / "int8.onnx"
        quantize_static(
            str(prepared),
            str(quantized),
            Reader(),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(QUANT_OPS),
            nodes_to_exclude=outside,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            extra_options=dict(QUANT_OPTIONS),
        )
        atomic_write_bytes(out_path, quantized.read_bytes())
    return out_path


def build_runner(
    graph: PixelsToFeatures,
    *,
    runtime: str,
    precision: str,
    device: str,
    threads: int | None,
    input_size: int,
    cache_dir: Path,
    identity: dict[str, Any],
    resample=None,
) -> Runner:
    """The runner for these settings; exports (and quantizes) the graph on first use, then reuses the files."""
    if runtime == "torch":
        return TorchRunner(graph, device, precision, threads)
    if runtime == "openvino" and device.startswith("cuda"):
        raise ValueError("runtime='openvino' runs on the CPU; use device=cpu, or runtime=torch on a GPU")
    fp32_path = model_file(cache_dir, identity, "fp32")
    path = fp32_path
    if precision == "int8":
        path = model_file(cache_dir, identity, "int8")
    for attempt in (0, 1):
        try:
            if not fp32_path.is_file() and (precision != "int8" or not path.is_file()):
                logger.info("exporting %s to ONNX (%s), once", identity["model_name"], fp32_path)
                export_onnx(graph, input_size, fp32_path)
            if precision == "int8" and not path.is_file():
                logger.info("quantizing %s to INT8 on %s photos, once", identity["model_name"], CALIBRATION_VERSION)
                quantize_int8(fp32_path, path, calibration_pixels(input_size, resample))
            if runtime == "onnx":
                return OnnxRunner(path, device, threads)
            return OpenVinoRunner(path, precision, threads)
        except ImportError as exc:
            raise RuntimeError(
                f"runtime={runtime!r} needs the optional packages of lookalike[fast] ({exc.name} is missing): "
                "pip install 'lookalike[fast]', or use runtime=torch"
            ) from None
        except Exception as exc:  # the runtimes raise their own types for a file they cannot read
            if attempt or not path.is_file():
                raise
            # A damaged file in the cache (a disk error, an older exporter): make it again, once.
            logger.warning("model file %s cannot be loaded (%s); exporting again", path, exc)
            for stale in {path, fp32_path}:
                stale.unlink(missing_ok=True)
    raise AssertionError("unreachable")  # pragma: no cover
