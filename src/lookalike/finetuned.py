"""The fine-tuned weights a build uses with ``tune: finetune``: trained once, then reused.

Fine-tuning takes minutes, a rebuild seconds; so a build looks for a checkpoint already made for the same catalog
content (every photo's relative path and SHA-256), the same base model (name, weights fingerprint, input size,
pooling), the same :class:`~lookalike.finetune.FinetuneConfig` and the same products left out. That fingerprint
names the files under ``<cache_dir>/finetuned/``:

- ``<model>-ft-<fingerprint>.safetensors`` (+ ``.json``, the fine-tune's own report): reused as is, after checking
  its SHA-256 against the report;
- ``<model>-ft-<fingerprint>.declined.json``: this catalog was tried and fine-tuning did not beat the LDA, so the
  build falls back to the LDA without training again.

A changed photo, model or config gives another fingerprint, hence a new fine-tune. The checkpoint's SHA-256 is
the model's weights fingerprint, so manifests and embedding caches of fine-tuned and base features never mix.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import files
from .catalog import CatalogImage, scan_catalog
from .settings import Settings

logger = logging.getLogger(__name__)

FOLDER = "finetuned"  # under cache_dir
VERSION = 3  # bump when the same inputs would train a different model (2: the ensemble and its calibration run;
# 3: with refit_all, every tail is trained again on all photos, not only the first)


@dataclass(frozen=True)
class Outcome:
    """What a build gets: fine-tuned weights to extract with (``weights``), or None and the reason (``info``)."""

    weights: Path | None
    info: dict[str, Any] = field(default_factory=dict)  # recorded in the manifest under tuning.finetune

    @property
    def status(self) -> str:
        return str(self.info.get("status"))


def default_config():
    """The fine-tune a build runs (tests swap this for a smaller one)."""
    from .finetune import FinetuneConfig

    return FinetuneConfig()


def fingerprint(settings: Settings, images: Iterable[CatalogImage], root: Path, config: Any, exclude=()) -> str:
    """What decides the fine-tuned model: catalog content, base model, config and left-out products."""
    from .backbones import file_sha256, weights_fingerprint

    base = weights_fingerprint(settings.model_name, weights_path=settings.weights_path, pretrained=settings.pretrained)
    digest = hashlib.sha256()
    head = {
        "version": VERSION,
        "model": settings.model_name,
        "weights": base or str(settings.weights_path),
        "pretrained": settings.pretrained,
        "input_size": settings.input_size,
        "pooling": settings.pooling,
        "config": asdict(config),
        "exclude": sorted(exclude),
    }
    digest.update(json.dumps(head, sort_keys=True, default=str).encode())
    for im in images:
        if im.product_id in exclude:
            continue
        digest.update(f"\n{im.path.relative_to(root).as_posix()}\0{file_sha256(im.path)}".encode())
    return digest.hexdigest()[:20]


def checkpoint_paths(cache_dir: Path, model_name: str, fp: str) -> tuple[Path, Path]:
    """(checkpoint, declined record) for one fingerprint."""
    stem = Path(cache_dir) / FOLDER / f"{model_name}-ft-{fp}"
    return stem.with_suffix(".safetensors"), stem.with_suffix(".declined.json")


def finetuned_weights(
    settings: Settings,
    *,
    data_dir: str | Path | None = None,
    images: list[CatalogImage] | None = None,
    exclude_products: Iterable[str] = (),
    config: Any = None,
    progress: bool | None = None,
) -> Outcome:
    """The fine-tuned checkpoint for the catalog at ``data_dir`` (default: the settings'): reused when one was made
    for the same fingerprint, else trained now (:func:`lookalike.finetune.finetune`). Declines (weights None, the
    reason in ``info``) when the catalog is too small or fine-tuning does not beat the LDA; a decline is remembered
    like a checkpoint. ``settings`` name the base model (their ``weights_path`` is the model to start from)."""
    from .finetune import FinetuneDeclined, file_sha, finetune

    root = Path(data_dir if data_dir is not None else settings.data_dir).expanduser().resolve()
    images = scan_catalog(root) if images is None else images
    exclude = frozenset(exclude_products)
    config = config if config is not None else default_config()
    fp = fingerprint(settings, images, root, config, exclude)
    ckpt, declined = checkpoint_paths(settings.cache_dir, settings.model_name, fp)
    sidecar = ckpt.with_suffix(".json")
    base = {"fingerprint": fp, "checkpoint": _relative(ckpt, settings.cache_dir)}
    if declined.is_file():
        try:
            reason = json.loads(declined.read_text(encoding="utf-8"))["reason"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.warning("ignoring unreadable %s (%s); fine-tuning again", declined, exc)
        else:
            logger.info("fine-tuning declined before for this catalog (%s): %s", declined.name, reason)
            return Outcome(None, {"status": "declined", "reason": reason, "reused": True, **base})
    if ckpt.is_file() and sidecar.is_file():
        try:
            info = json.loads(sidecar.read_text(encoding="utf-8"))
            if info.get("sha256") == file_sha(ckpt):
                logger.info("reusing the fine-tuned model %s (same catalog, model and config)", ckpt.name)
                return Outcome(ckpt, _summary(info, reused=True, **base))
            logger.warning("fine-tuned checkpoint %s does not match its %s; fine-tuning again", ckpt, sidecar.name)
        except (OSError, ValueError) as exc:
            logger.warning("cannot read fine-tuned checkpoint report %s (%s); fine-tuning again", sidecar, exc)
    try:
        result = finetune(
            settings, data_dir=root, out_path=ckpt, config=config, exclude_products=exclude, progress=progress
        )
    except FinetuneDeclined as exc:
        logger.info("fine-tuning declined: %s", exc)
        files.atomic_write_json(declined, {"reason": str(exc), "fingerprint": fp})
        return Outcome(None, {"status": "declined", "reason": str(exc), "reused": False, **base})
    return Outcome(result.path, _summary(result.info, reused=False, **base))


def _summary(info: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """What the manifest and the build report keep of a fine-tune's report."""
    keep = ("sha256", "base_model", "base_weights", "products", "images", "held_out", "excluded_products")
    keep += ("validation", "seconds", "device", "ensemble", "calibration")
    return {"status": "finetuned", **{k: info[k] for k in keep if k in info}, **extra}


def ensemble_for(extractor) -> Any:
    """The :class:`lookalike.tuning.Ensemble` an index built with ``extractor`` uses (None: a single network).
    Its calibration is the one the fine-tune measured, from the checkpoint's ``.json`` report beside it."""
    from .backbones import ensemble_layout
    from .tuning import Ensemble

    weights = extractor.settings.weights_path
    layout = ensemble_layout(weights)
    if layout is None:
        return None
    tails = layout[1]
    aux = (extractor.raw_dim - (tails + 1) * extractor.dim) // (tails + 1)
    calibration = None
    sidecar = Path(weights).expanduser().with_suffix(".json")
    try:
        calibration = json.loads(sidecar.read_text(encoding="utf-8")).get("calibration")
    except (OSError, ValueError, AttributeError) as exc:
        logger.warning("no fine-tune calibration for %s (%s): the no-match threshold is calibrated on the catalog "
                       "and will be low", weights, exc)  # fmt: skip
    return Ensemble(extractor.dim, aux, tails, calibration)


def _relative(path: Path, cache_dir: Path) -> str:
    try:
        return path.resolve().relative_to(Path(cache_dir).resolve()).as_posix()
    except ValueError:
        return str(path)


def checkpoint_of(tuning: dict[str, Any] | None, cache_dir: Path) -> Path | None:
    """The fine-tuned checkpoint an index's ``tuning`` record names (None: the index uses the base model)."""
    entry = (tuning or {}).get("finetune") or {}
    if entry.get("status") != "finetuned" or not entry.get("checkpoint"):
        return None
    path = Path(entry["checkpoint"])
    return path if path.is_absolute() else Path(cache_dir) / path


def describe(info: dict[str, Any]) -> str:
    """One line on what a build did about fine-tuning (the CLI prints it)."""
    if info.get("status") != "finetuned":
        again = " (decided before for this catalog)" if info.get("reused") else ""
        return f"fine-tuning: declined{again}: {info.get('reason')}; the projection alone is used"
    how = "reused" if info.get("reused") else f"trained in {info.get('seconds', {}).get('wall', 0):.0f} s"
    line = f"fine-tuning: {how} ({info.get('checkpoint')})"
    val = info.get("validation") or {}
    with contextlib.suppress(KeyError, TypeError):
        line += (
            f"; held-out catalog MAP@R {val['lda']['map@r']:.3f} with the projection on the base model, "
            f"{val['finetuned']['map@r']:.3f} fine-tuned, {val['finetuned+lda']['map@r']:.3f} with both"
        )
        if val.get("ensemble"):
            line += f", {val['ensemble']['map@r']:.3f} as the ensemble"
    return line


def require_checkpoint(manifest: dict[str, Any], cache_dir: Path, where: Path | str) -> Path | None:
    """:func:`checkpoint_of` for an index being opened; IndexFileError naming it when the file is gone."""
    from .stores.base import IndexFileError

    path = checkpoint_of(manifest.get("tuning"), cache_dir)
    if path is not None and not path.is_file():
        raise IndexFileError(
            f"the index at {where} was built with the fine-tuned model {path}, which is missing; rebuild the index "
            "(`lookalike index`, tune: finetune trains it again) or restore the file"
        )
    return path


__all__ = [
    "FOLDER",
    "Outcome",
    "checkpoint_of",
    "checkpoint_paths",
    "describe",
    "ensemble_for",
    "finetuned_weights",
    "fingerprint",
    "require_checkpoint",
]
