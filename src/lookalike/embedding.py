"""FeatureExtractor: images in, float32 feature vectors out.

Decoding and resizing run in a small thread pool (Pillow releases the GIL) while the model works on the
previous batch, so the CPU cores are busy with both.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice

import numpy as np
from PIL import Image

from .backbones import LoadedBackbone, build_backbone
from .imaging import ImageError, ImageSource, describe, open_image
from .settings import Settings

FEATURE_VERSION = 2  # bump when the same model and settings would give different vectors
CENTER_SIGMA = 0.6  # width of the centre weighting, as a fraction of the half-side of the feature map
_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


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
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={name!r} was asked for, but PyTorch sees no CUDA GPU here; use device=cpu")
    return name


class FeatureExtractor:
    """Turns images into the backbone's pooled feature vectors (not normalised; the index decides that)."""

    def __init__(self, settings: Settings | None = None, *, logger: logging.Logger | None = None):
        import torch

        self.settings = settings if settings is not None else Settings()
        self.logger = logger or logging.getLogger(__name__)
        self.device = resolve_device(self.settings.device)
        loaded: LoadedBackbone = build_backbone(
            self.settings.model_name, weights_path=self.settings.weights_path, pretrained=self.settings.pretrained
        )
        self.spec = loaded.spec
        self.weights_fingerprint = loaded.weights_fingerprint
        self.model = loaded.module.to(self.device, memory_format=torch.channels_last)
        self.input_size = self.settings.input_size
        preprocess = self.spec.preprocess
        mean = torch.tensor(preprocess.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(preprocess.std, dtype=torch.float32).view(1, 3, 1, 1)
        # (x / 255 - mean) / std folded into one multiply-add.
        self._scale = (1.0 / (255.0 * std)).to(self.device)
        self._shift = (-mean / std).to(self.device)
        self._resample = _RESAMPLE[preprocess.interpolation]
        self._weights: dict[tuple[int, int], object] = {}  # centre weights per feature-map size

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
        """Everything that decides what vector an image gets; stored in manifests and compared on load."""
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
        batch: list[np.ndarray] = []
        batch_pos: list[int] = []
        try:
            for pos, (pixels, fmt_or_error) in enumerate(self._decoded(images)):
                if pixels is None:
                    errors[pos] = fmt_or_error
                    bar.update(1)
                else:
                    batch.append(pixels)
                    batch_pos.append(pos)
                    formats.append(fmt_or_error)
                if len(batch) == self.settings.batch_size:
                    self._run(batch, batch_pos, vectors, ok)
                    bar.update(len(batch))
                    batch, batch_pos = [], []
            if batch:
                self._run(batch, batch_pos, vectors, ok)
                bar.update(len(batch))
        finally:
            bar.close()
        return Extraction(vectors[ok] if len(ok) != n else vectors, ok, formats, errors)

    # --- pipeline ---------------------------------------------------------------------------------------

    def load_pixels(self, image: ImageSource) -> tuple[np.ndarray | None, str]:
        """Decode and resize one image to the model's input: (HxWx3 uint8, format) or (None, reason)."""
        size = self.input_size
        try:
            decoded = open_image(image, self.settings.max_image_pixels)
            img = decoded.image.resize((size, size), self._resample)
            return np.asarray(img, dtype=np.uint8), decoded.format
        except ImageError as exc:
            return None, exc.reason
        except Exception as exc:  # a decoder bug on one hostile file must not stop a whole build
            return None, f"cannot decode image ({type(exc).__name__}: {exc})"

    def _decoded(self, images: Iterable[ImageSource]) -> Iterator[tuple[np.ndarray | None, str]]:
        workers = self.settings.num_workers
        if workers == 0:
            yield from map(self.load_pixels, images)
            return
        ahead = max(2 * self.settings.batch_size, 4 * workers)  # bounded, so a huge catalog never sits in memory
        with ThreadPoolExecutor(workers, thread_name_prefix="lookalike-decode") as pool:
            source = iter(images)
            pending = deque(pool.submit(self.load_pixels, im) for im in islice(source, ahead))
            while pending:
                result = pending.popleft().result()
                for im in islice(source, 1):
                    pending.append(pool.submit(self.load_pixels, im))
                yield result

    def embed_pixels(self, batch: np.ndarray) -> np.ndarray:
        """Model forward pass and pooling over a (B, H, W, 3) uint8 batch -> (B, raw_dim) float32."""
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(batch).to(self.device).permute(0, 3, 1, 2)  # NHWC memory = channels_last
            x = x.float().mul_(self._scale).add_(self._shift)
            maps = self.model(x)
            return torch.cat([self._pool(m.float()) for m in maps], dim=1).cpu().numpy()

    def _pool(self, fmap):
        import torch

        if self.settings.pooling == "avg":
            return fmap.mean(dim=(2, 3))
        h, w = fmap.shape[-2:]
        key = (h, w)
        if key not in self._weights:
            self._weights[key] = torch.from_numpy(center_weights(h, w)).to(fmap.device)
        return torch.einsum("bchw,hw->bc", fmap, self._weights[key])

    def _run(self, batch: list[np.ndarray], positions: list[int], out: np.ndarray, ok: list[int]) -> None:
        out[positions] = self.embed_pixels(np.stack(batch))
        ok.extend(positions)
