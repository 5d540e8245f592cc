"""FeatureExtractor: images in, float32 feature vectors out.

Decoding and resizing run in a small thread pool (Pillow releases the GIL) while the model works on the
previous batch, so the CPU cores are busy with both. JPEGs are decoded straight at the smallest scale that still
covers the model's input (libjpeg's DCT scaling), which makes large photos several times cheaper to read. The
network runs in the runtime the settings name (:mod:`lookalike.runtime`). On a CUDA GPU, plain JPEGs are decoded
on the GPU (nvJPEG) and resized there, and the network runs in fp16.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from collections import deque
from collections.abc import Iterable, Iterator, Sequence, Sized
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice

import numpy as np
from PIL import Image

from .backbones import spec_for, weights_fingerprint
from .imaging import ImageError, ImageSource, describe, open_image
from .runtime import CALIBRATION_VERSION, CENTER_SIGMA, build_runner, center_weights, resolve_precision, resolve_runtime
from .settings import Settings

FEATURE_VERSION = 3  # bump when the same model and settings would give different vectors (3: JPEG draft decoding)
_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}

__all__ = ["CENTER_SIGMA", "Extraction", "FeatureExtractor", "center_weights"]


@dataclass
class Extraction:
    """What a batch extraction produced: vectors for the images that worked, reasons for those that did not.

    Vectors are *raw*: the embedding (``dim`` values) followed by the backbone's auxiliary features
    (``raw_dim - dim`` values, used by catalog tuning). ``vectors[:, :dim]`` is what the public methods return.
    """

    vectors: np.ndarray  # (len(ok), raw_dim) float32, in input order
    ok: list[int] = field(default_factory=list)  # input positions that have a vector
    formats: list[str] = field(default_factory=list)  # decoded format of each vector's image
    errors: dict[int, str] = field(default_factory=dict)  # input position -> reason


def resolve_device(name: str) -> str:
    if name == "cpu":
        return name  # no torch import for the common case
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={name!r} was asked for, but PyTorch sees no CUDA GPU here; use device=cpu")
    return name


class FeatureExtractor:
    """Turns images into the backbone's pooled feature vectors (not normalised; the index decides that).

    ``FeatureExtractor(logger)``, the seed's call, works too: a logger in place of the settings means the default
    settings with that logger.

    With runtime openvino or onnx (``auto`` picks them) and the model already exported under
    ``<cache_dir>/models/``, the network is never built in PyTorch: torch is not even imported.
    """

    def __init__(self, settings: Settings | logging.Logger | None = None, *, logger: logging.Logger | None = None):
        if isinstance(settings, logging.Logger):  # the seed's positional signature: FeatureExtractor(logger)
            settings, logger = None, logger or settings
        self.settings = settings if settings is not None else Settings()
        self.logger = logger or logging.getLogger(__name__)
        self.device = resolve_device(self.settings.device)
        self.precision = resolve_precision(self.settings.precision, self.device)
        self.runtime = resolve_runtime(self.settings.runtime, self.device, self.precision)
        if self.settings.runtime == "auto":
            self.logger.info("runtime auto: %s (%s on %s)", self.runtime, self.precision, self.device)
        self.spec = spec_for(self.settings.model_name, self.settings.weights_path)
        self._loaded = None
        fingerprint = weights_fingerprint(
            self.spec.name, weights_path=self.settings.weights_path, pretrained=self.settings.pretrained
        )
        if fingerprint == "random-init-seed0" and self.spec.load_state is not None:
            self.logger.warning(
                "model %s runs with RANDOM weights (pretrained=false): its results mean nothing", self.spec.name
            )
        if fingerprint is None:  # only loading the weights tells (torchvision's checkpoints)
            fingerprint = self._backbone().weights_fingerprint
        self.weights_fingerprint = fingerprint
        self.input_size = self.settings.input_size
        preprocess = self.spec.preprocess
        self._resample = _RESAMPLE[preprocess.interpolation]
        self._graph = None
        self.runner = build_runner(
            runtime=self.runtime,
            precision=self.precision,
            device=self.device,
            threads=self.settings.threads,
            input_size=self.input_size,
            cache_dir=self.settings.cache_dir,
            identity=self._graph_identity(),
            resample=self._resample,
            make_graph=lambda: self.graph,
        )
        # JPEGs decoded as tensors on the model's device (nvJPEG on a GPU); None: Pillow in the worker threads.
        self.tensor_decoder: TensorDecoder | None = None
        if self.device.startswith("cuda") and self.runtime == "torch" and TensorDecoder.available():
            self.tensor_decoder = TensorDecoder(self.device, self.input_size, self.settings.max_image_pixels)

    def _backbone(self):
        """The backbone with its weights (torch), built on first need."""
        if self._loaded is None:
            from .backbones import build_backbone

            self._loaded = build_backbone(
                self.settings.model_name, weights_path=self.settings.weights_path, pretrained=self.settings.pretrained
            )
        return self._loaded

    @property
    def model(self):
        """The backbone network (a torch module), built on first use."""
        return self._backbone().module

    @property
    def graph(self):
        """Pixels -> raw vectors as one torch module (:class:`~lookalike.graph.PixelsToFeatures`)."""
        if self._graph is None:
            from .graph import PixelsToFeatures

            preprocess = self.spec.preprocess
            self._graph = PixelsToFeatures(self.model, preprocess.mean, preprocess.std, self.settings.pooling)
        return self._graph

    @property
    def dim(self) -> int:
        return self.spec.dim

    @property
    def raw_dim(self) -> int:
        return self.spec.raw_dim

    @property
    def model_name(self) -> str:
        return self.spec.name

    def describe(self) -> dict:
        """Everything that decides what vector an image gets; stored in manifests and compared on load.

        The runtime is left out for fp32 (every runtime gives the same vectors to float rounding); INT8 names it,
        since each runtime rounds its integer arithmetic its own way.
        """
        precision = self.precision
        if precision == "int8":
            precision = f"int8-{CALIBRATION_VERSION}-{self.runtime}"
        return {
            **self._graph_identity(),
            "precision": precision,
            "decode": "nvjpeg" if self.tensor_decoder is not None else "pillow-draft",
        }

    def _graph_identity(self) -> dict:
        """What decides the network's graph (not how it is run)."""
        return {
            "model_name": self.spec.name,
            "weights": self.weights_fingerprint,
            "dim": self.spec.dim,
            "input_size": self.input_size,
            "preprocess": self.spec.preprocess.to_dict(),
            "pooling": self.settings.pooling,
            "feature_version": FEATURE_VERSION,
        }

    @property
    def fingerprint(self) -> str:
        blob = json.dumps(self.describe(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    # --- public API -------------------------------------------------------------------------------------

    def extract_features(self, image: ImageSource) -> np.ndarray:
        """The (dim,) float32 feature vector of one image (a path, bytes or a PIL image).

        Raises :class:`~lookalike.imaging.ImageError` naming the image if it cannot be decoded.
        """
        result = self.extract([image])
        if result.errors:
            raise ImageError(describe(image), result.errors[0])
        return result.vectors[0, : self.dim]

    def extract_batch_features(self, images: Sequence[ImageSource], *, progress: bool | None = None) -> np.ndarray:
        """The (n, dim) float32 feature vectors of ``images``, in order, computed in batches.

        Raises :class:`~lookalike.imaging.ImageError` for the first image that cannot be decoded; use
        :meth:`extract` to skip bad images instead.
        """
        result = self.extract(images, progress=progress)
        if result.errors:
            first = min(result.errors)
            raise ImageError(describe(images[first]), result.errors[first])
        return np.ascontiguousarray(result.vectors[:, : self.dim])

    def extract(self, images: Sequence[ImageSource], *, progress: bool | None = None) -> Extraction:
        """Vectors for every image that decodes; a reason for every one that does not. Never raises for a bad image."""
        from tqdm.auto import tqdm

        n = len(images)
        vectors = np.empty((n, self.raw_dim), dtype=np.float32)
        ok: list[int] = []
        formats: list[str] = []
        errors: dict[int, str] = {}
        # By default a bar for long work only, and only on a terminal (tqdm's disable=None).
        disable = (not progress) if progress is not None else (True if n <= self.settings.batch_size else None)
        bar = tqdm(total=n, unit="img", desc=f"extracting ({self.spec.name})", disable=disable)
        batch: list[tuple[int, object, str]] = []  # (position, pixels or JPEG data, format)
        try:
            for pos, (pixels, fmt_or_error) in enumerate(self._decoded(images)):
                if pixels is None:
                    errors[pos] = fmt_or_error
                    bar.update(1)
                else:
                    batch.append((pos, pixels, fmt_or_error))
                if len(batch) == self.settings.batch_size:
                    self._run(batch, vectors, ok, formats, errors)
                    bar.update(len(batch))
                    batch = []
            if batch:
                self._run(batch, vectors, ok, formats, errors)
                bar.update(len(batch))
        finally:
            bar.close()
        return Extraction(vectors[ok] if len(ok) != n else vectors, ok, formats, errors)

    # --- pipeline ---------------------------------------------------------------------------------------

    def load_pixels(self, image: ImageSource) -> tuple[np.ndarray | None, str]:
        """Decode and resize one image to the model's input: (HxWx3 uint8, format) or (None, reason)."""
        size = self.input_size
        try:
            decoded = open_image(image, self.settings.max_image_pixels, draft_size=size)
            img = decoded.image.resize((size, size), self._resample)
            return np.asarray(img, dtype=np.uint8), decoded.format
        except ImageError as exc:
            return None, exc.reason
        except Exception as exc:  # a decoder bug on one hostile file must not stop a whole build
            return None, f"cannot decode image ({type(exc).__name__}: {exc})"

    def _load(self, image: ImageSource) -> tuple[object | None, str]:
        """What a worker thread makes of one image: pixels, or a plain JPEG's bytes for the tensor decoder."""
        if self.tensor_decoder is not None:
            data = self.tensor_decoder.accepts(image)
            if data is not None:
                return data, "JPEG"
        return self.load_pixels(image)

    def _decoded(self, images: Iterable[ImageSource]) -> Iterator[tuple[object | None, str]]:
        workers = self.settings.num_workers
        if workers == 0 or (isinstance(images, Sized) and len(images) <= 1):  # one query: no thread hand-off
            yield from map(self._load, images)
            return
        ahead = max(2 * self.settings.batch_size, 4 * workers)  # bounded, so a huge catalog never sits in memory
        with ThreadPoolExecutor(workers, thread_name_prefix="lookalike-decode") as pool:
            source = iter(images)
            pending = deque(pool.submit(self._load, im) for im in islice(source, ahead))
            while pending:
                result = pending.popleft().result()
                for im in islice(source, 1):
                    pending.append(pool.submit(self._load, im))
                yield result

    def embed_pixels(self, batch) -> np.ndarray:
        """Normalisation, network and pooling over a (B, H, W, 3) uint8 batch -> (B, raw_dim) float32."""
        vectors = self.runner(batch)
        if vectors.shape[-1] != self.raw_dim:  # an export cached for these weights by another version of the network
            raise RuntimeError(
                f"the {self.runtime} model exported under {self.settings.cache_dir}/models gives "
                f"{vectors.shape[-1]} values a photo where {self.spec.name} with these weights gives {self.raw_dim}: "
                "delete that folder's exports of this model, they are made again on the next run"
            )
        return vectors

    def _run(self, batch, out: np.ndarray, ok: list[int], formats: list[str], errors: dict[int, str]) -> None:
        if any(isinstance(item, JpegData) for _, item, _ in batch):
            batch, pixels = self._tensor_batch(batch, errors)
            if not batch:
                return
        else:
            pixels = np.stack([item for _, item, _ in batch])
        positions = [pos for pos, _, _ in batch]
        out[positions] = self.embed_pixels(pixels)
        ok.extend(positions)
        formats.extend(fmt for _, _, fmt in batch)

    def _tensor_batch(self, batch, errors: dict[int, str]):
        """The batch as one uint8 tensor on the device: JPEGs decoded there, the rest uploaded. A JPEG the tensor
        decoder rejects goes through Pillow instead (which names what is wrong with it)."""
        import torch

        decoder = self.tensor_decoder
        assert decoder is not None
        jpegs = [i for i, (_, item, _) in enumerate(batch) if isinstance(item, JpegData)]
        decoded = None
        try:
            decoded = decoder.decode([batch[i][1].data for i in jpegs])
        except Exception as exc:  # one bad file fails the whole call: sort it out image by image
            self.logger.debug("tensor JPEG decoding failed for a batch (%s); decoding it with Pillow", exc)
        if decoded is None:
            items = []
            for pos, item, fmt in batch:
                if isinstance(item, JpegData):
                    item, fmt = self.load_pixels(item.data)
                    if item is None:
                        errors[pos] = fmt
                        continue
                items.append((pos, item, fmt))
            return items, (np.stack([item for _, item, _ in items]) if items else None)
        size = self.input_size
        pixels = torch.empty((len(batch), size, size, 3), dtype=torch.uint8, device=decoder.device)
        pixels[jpegs] = decoded
        others = [i for i in range(len(batch)) if i not in set(jpegs)]
        if others:
            host = torch.from_numpy(np.stack([batch[i][1] for i in others]))
            pixels[others] = host.to(decoder.device, non_blocking=True)
        return batch, pixels


@dataclass(frozen=True)
class JpegData:
    """A plain JPEG's bytes, for the tensor decoder."""

    data: bytes


class TensorDecoder:
    """Decodes batches of plain JPEGs with ``torchvision.io.decode_jpeg`` on a device (nvJPEG on a CUDA GPU) and
    resizes them there (bilinear with antialiasing, as Pillow does), giving (B, size, size, 3) uint8 tensors.

    Only baseline RGB or grayscale JPEGs without an EXIF rotation, within the pixel limit, take this path
    (``accepts`` reads the header with Pillow to check); everything else goes through Pillow as usual.
    """

    def __init__(self, device: str, size: int, max_pixels: int):
        self.device = device
        self.size = size
        self.max_pixels = max_pixels

    @staticmethod
    def available() -> bool:
        try:
            from torchvision.io import decode_jpeg  # noqa: F401
        except ImportError:  # pragma: no cover - torchvision without image I/O
            return False
        return True

    def accepts(self, image: ImageSource) -> JpegData | None:
        import io
        from pathlib import Path

        if isinstance(image, (bytes, bytearray, memoryview)):
            data = bytes(image)
        elif isinstance(image, (str, Path)):
            try:
                data = Path(image).read_bytes()
            except OSError:
                return None  # Pillow's path says what is wrong
        else:
            return None
        if data[:3] != b"\xff\xd8\xff":
            return None
        try:
            with Image.open(io.BytesIO(data), formats=("JPEG",)) as img:
                w, h = img.size
                plain = img.mode in ("RGB", "L") and not img.info.get("progressive") and not img.info.get("progression")
                upright = img.getexif().get(0x0112, 1) == 1
        except Exception:
            return None
        if not plain or not upright or w * h > self.max_pixels or w <= 0 or h <= 0:
            return None
        return JpegData(data)

    def decode(self, datas: Sequence[bytes]):
        import torch
        from torch.nn import functional as F
        from torchvision.io import ImageReadMode, decode_jpeg

        if not datas:
            return torch.empty((0, self.size, self.size, 3), dtype=torch.uint8, device=self.device)
        encoded = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 points to TorchCodec
            images = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device)
        out = torch.empty((len(images), self.size, self.size, 3), dtype=torch.uint8, device=self.device)
        by_shape: dict[tuple[int, int], list[int]] = {}
        for i, img in enumerate(images):
            by_shape.setdefault(tuple(img.shape[-2:]), []).append(i)
        for rows in by_shape.values():  # one resize per distinct size (catalogs repeat a few sizes)
            x = torch.stack([images[i] for i in rows]).float()
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
            out[rows] = x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
        return out
