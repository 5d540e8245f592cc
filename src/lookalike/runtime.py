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

import functools
import hashlib
import importlib.util
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .store import atomic_write_bytes

logger = logging.getLogger(__name__)

CENTER_SIGMA = 0.6  # width of the centre weighting, as a fraction of the half-side of the feature map
GRAPH_VERSION = 1  # bump when the exported graph changes (names the files under <cache_dir>/models/)
ONNX_OPSET = 17
CALIBRATION_VERSION = "skimage-v1"  # the INT8 calibration images and method; part of the vectors' identity
_INPUT, _OUTPUT = "pixels", "features"
OPENVINO_CACHE = "openvino-cache"  # compiled OpenVINO models, under <cache_dir>/models/


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


Runner = Callable[[Any], np.ndarray]  # uint8 (B, H, W, 3) numpy array or tensor -> (B, raw_dim) float32

_TORCH_NAMES = {"PixelsToFeatures", "TorchRunner", "export_onnx"}


def __getattr__(name: str) -> Any:
    """The torch-side names (:mod:`lookalike.graph`), imported only when asked for."""
    if name in _TORCH_NAMES:
        from . import graph

        return getattr(graph, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _host(pixels: Any) -> Any:
    """A torch tensor as a numpy array (without importing torch for the arrays that already are)."""
    if not isinstance(pixels, np.ndarray) and hasattr(pixels, "cpu"):
        return pixels.cpu().numpy()
    return pixels


@functools.lru_cache(maxsize=1)
def _torch_version() -> str:
    """The installed PyTorch's version, read from its metadata (importing torch takes a second)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch")
    except PackageNotFoundError:  # pragma: no cover - torch is a dependency
        return "none"


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def resolve_runtime(runtime: str, device: str, precision: str) -> str:
    """``auto``: the fastest installed runtime that runs this device and precision with the reference vectors.

    OpenVINO (CPU; fp32, bf16, int8), else ONNX Runtime (CPU; fp32, int8), else PyTorch. A CUDA device or fp16
    means PyTorch. Any other name is returned as it is.
    """
    if runtime != "auto":
        return runtime
    if device.startswith("cuda") or precision == "fp16":
        return "torch"
    if installed("openvino"):
        return "openvino"
    if precision != "bf16" and installed("onnxruntime"):
        return "onnx"
    if precision == "int8":
        raise RuntimeError(
            "precision='int8' needs OpenVINO or ONNX Runtime, and neither is installed: pip install openvino"
        )
    return "torch"


def network_threads(cores: int, concurrent: int) -> int:
    """Threads for each of ``concurrent`` searches so that together they never ask for more than ``cores``."""
    return max(1, cores // max(1, concurrent))


def server_settings(settings):
    """``settings`` for a server that runs ``max_concurrent_searches`` searches at once: with ``threads`` unset,
    each search's network gets its share of the cores (slots x threads <= cores) instead of every core each,
    which under load made the searches fight for the cores. An explicit ``threads`` is kept."""
    if settings.threads is not None:
        return settings
    threads = network_threads(default_threads(), settings.max_concurrent_searches)
    logger.info(
        "network threads per search: %d (%d cores, %d concurrent searches)",
        threads,
        default_threads(),
        settings.max_concurrent_searches,
    )
    out = settings.replace(threads=threads)
    object.__setattr__(out, "_explicit", settings.explicit)  # sized here, not set by the user
    return out


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
        # Idle threads sleep instead of spinning: a spinning pool burns the cores that concurrent searches and
        # other processes need (measured: query p50 8x slower beside two busy processes with spinning threads).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
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
        pixels = _host(pixels)
        return self.session.run(None, {_INPUT: np.ascontiguousarray(pixels, dtype=np.uint8)})[0]


def cores_taken(cores: int) -> bool:
    """True when, right now, other runnable threads would take every core this process may use: the kernel's
    count of runnable tasks (``/proc/loadavg``, the caller included) exceeds ``cores``. False where unknown."""
    try:
        with open("/proc/loadavg", "rb") as f:
            running = int(f.read().split()[3].split(b"/")[0])
    except (OSError, ValueError, IndexError):
        return False
    return running > cores


class OpenVinoRunner:
    """OpenVINO on the CPU. Small batches (a query) run in latency mode: one request on all the threads. Larger
    batches are split over throughput-mode streams (one per core here), which keeps each core on its own images
    instead of synchronising on every layer: measured +20-30% for EfficientNet-B0 and Lite0 on two cores.

    With ``threads`` unset, a query that arrives while other work holds every core (:func:`cores_taken`) runs on
    one thread instead (a second compiled model, made on first need): a query split over threads waits for its
    slowest thread, and on a busy machine one of them is always waiting for a core (docs/benchmarks.md,
    contention: p50 beside two CPU-busy processes 15.4 ms on two threads, 13.3 ms on one). An explicit ``threads``
    (the server sets one per search slot) is always kept."""

    name = "openvino"
    SPLIT_FROM = 8  # images in a batch from which it is split over streams

    def __init__(self, path: Path, precision: str, threads: int | None):
        import openvino as ov

        self._config: dict[str, Any] = {
            # Explicit: on CPUs with bf16 instructions OpenVINO would otherwise compute fp32 models in bf16.
            "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
            # Threads float between cores: pinned threads wait for a core another process holds. (OpenVINO's CPU
            # plugin has no spin-wait setting; its TBB workers sleep when idle.)
            "ENABLE_CPU_PINNING": False,
        }
        if threads:
            self._config["INFERENCE_NUM_THREADS"] = int(threads)
        self._cores = default_threads()
        self._adapt = not threads and self._cores > 1  # threads unset: one thread when the cores are taken
        self._core = ov.Core()
        # Compiled models are cached beside the exported one: a later process imports the compiled blob instead of
        # reading and compiling the graph again (measured 0.6 s of a cold one-photo search for Lite0). OpenVINO
        # keys its cache by the model's path only, so the folder names the file's size and mtime: a file replaced
        # (a damaged one exported again) never meets the blob of its predecessor.
        st = Path(path).stat()
        folder = Path(path).parent / OPENVINO_CACHE / f"{Path(path).stem}-{st.st_size}-{st.st_mtime_ns}"
        self._core.set_property({"CACHE_DIR": str(folder)})
        self._path = str(path)
        latency = {**self._config, "PERFORMANCE_HINT": "LATENCY"}
        if "TBB_PARTITIONER" in self._core.get_property("CPU", "SUPPORTED_PROPERTIES"):
            # A query's layers split over the threads dynamically, not in fixed shares: when another process holds
            # one core, the other thread takes over its work instead of waiting (busy p50 8-15% lower beside two
            # CPU burners on two cores, three rounds of docs/benchmarks.md's experiment).
            latency["TBB_PARTITIONER"] = "AUTO"
        self.compiled = self._core.compile_model(self._path, "CPU", latency)
        self._latency = latency
        self._solo = None  # the one-thread model for queries on a busy machine, compiled on first need
        self._solo_lock = threading.Lock()
        self._local = threading.local()
        self._streams = None  # (AsyncInferQueue, number of streams), compiled on the first large batch
        self._streams_lock = threading.Lock()

    def __call__(self, pixels) -> np.ndarray:
        pixels = _host(pixels)
        pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
        if len(pixels) >= self.SPLIT_FROM:
            return self._split(pixels)
        solo = self._adapt and cores_taken(self._cores)
        name = "solo_request" if solo else "request"
        request = getattr(self._local, name, None)
        if request is None:
            compiled = self._solo_model() if solo else self.compiled
            request = compiled.create_infer_request()
            setattr(self._local, name, request)
        request.infer({0: pixels})
        return np.array(request.get_output_tensor(0).data, dtype=np.float32, copy=True)

    def _solo_model(self):
        with self._solo_lock:
            if self._solo is None:
                self._solo = self._core.compile_model(self._path, "CPU", {**self._latency, "INFERENCE_NUM_THREADS": 1})
            return self._solo

    def _split(self, pixels: np.ndarray) -> np.ndarray:
        import openvino as ov

        with self._streams_lock:  # one large batch at a time; queries keep their own requests meanwhile
            if self._streams is None:
                config = {**self._config, "PERFORMANCE_HINT": "THROUGHPUT"}
                compiled = self._core.compile_model(self._path, "CPU", config)
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
    blob = repr(sorted(identity.items())) + f"|graph{GRAPH_VERSION}|opset{ONNX_OPSET}|{_torch_version()}"
    key = hashlib.sha256(blob.encode()).hexdigest()[:16]
    suffix = f"int8-{CALIBRATION_VERSION}" if precision == "int8" else "fp32"
    return Path(cache_dir) / "models" / f"{identity['model_name']}-{key}-{suffix}.onnx"


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
    graph: Any = None,
    *,
    runtime: str,
    precision: str,
    device: str,
    threads: int | None,
    input_size: int,
    cache_dir: Path,
    identity: dict[str, Any],
    resample=None,
    make_graph: Callable[[], Any] | None = None,
) -> Runner:
    """The runner for these settings; exports (and quantizes) the graph on first use, then reuses the files.

    ``graph`` (a :class:`~lookalike.graph.PixelsToFeatures`) or ``make_graph`` (which builds it) is needed only
    for runtime torch or when the model has not been exported yet: an exported model runs without torch.
    """

    def the_graph():
        return graph if graph is not None else make_graph()

    if runtime == "torch":
        from .graph import TorchRunner

        return TorchRunner(the_graph(), device, precision, threads)
    if runtime == "openvino" and device.startswith("cuda"):
        raise ValueError("runtime='openvino' runs on the CPU; use device=cpu, or runtime=torch on a GPU")
    fp32_path = model_file(cache_dir, identity, "fp32")
    path = fp32_path
    if precision == "int8":
        path = model_file(cache_dir, identity, "int8")
    for attempt in (0, 1):
        try:
            if not fp32_path.is_file() and (precision != "int8" or not path.is_file()):
                from .graph import export_onnx

                logger.warning(
                    "exporting %s for %s to %s (once; later runs reuse it)", identity["model_name"], runtime, fp32_path
                )
                export_onnx(the_graph(), input_size, fp32_path)
            if precision == "int8" and not path.is_file():
                logger.warning(
                    "quantizing %s to INT8 on %s photos (once; later runs reuse it)",
                    identity["model_name"],
                    CALIBRATION_VERSION,
                )
                quantize_int8(fp32_path, path, calibration_pixels(input_size, resample))
            if runtime == "onnx":
                return OnnxRunner(path, device, threads)
            return OpenVinoRunner(path, precision, threads)
        except ImportError as exc:
            raise RuntimeError(
                f"runtime={runtime!r} at {precision} needs {exc.name}, which is missing: pip install "
                f"{'openvino' if exc.name == 'openvino' else repr('lookalike[fast]')}, or use runtime=torch"
            ) from None
        except Exception as exc:  # the runtimes raise their own types for a file they cannot read
            if attempt or not path.is_file():
                raise
            # A damaged file in the cache (a disk error, an older exporter): make it again, once.
            logger.warning("model file %s cannot be loaded (%s); exporting again", path, exc)
            for stale in {path, fp32_path}:
                stale.unlink(missing_ok=True)
    raise AssertionError("unreachable")  # pragma: no cover
