"""Fine-tuning the backbone's last blocks on the catalog's own products (``lookalike tune --method finetune``).

Generic ImageNet features cannot tell apart products that differ in a label or a colour; LDA on frozen features
only reweights what the backbone already sees. This module trains the backbone's last block(s) and its head
convolution with a normalised-softmax loss (a cosine classifier over one proxy per product with a CosFace margin,
0.5 by default) on the catalog's product folders, cheaply enough for a CPU:

- the frozen trunk (everything before the trained blocks) runs once per image and per augmented view (random
  crops, flips, light colour jitter) on the fast runtime (OpenVINO on a CPU); its feature maps are cached in
  memory, so an epoch only runs the small tail;
- a warm-up trains the product proxies with the backbone frozen, then the tail is trained too (BatchNorm keeps its
  ImageNet statistics: eval mode, only its affine parameters learn); optionally (``distill_weight``) its loss
  also keeps each batch's cosine similarities near those of the LDA on the base model (relational distillation);
- the last quarter of each product's photos (catalog order, as :func:`lookalike.tuning.holdout_split`) is held out
  of the fit and decides early stopping; query photos are never seen;
- the result must beat both the untuned features and the LDA projection (:mod:`lookalike.tuning`) on those held-out
  photos, or :class:`FinetuneDeclined` says why; then (``refit_all``, the default) every fine-tuned tail is trained
  again on all the photos for the chosen number of epochs, and that is what is saved.

The output is a state dict as safetensors (plus a JSON sidecar), loadable through the existing ``weights_path``
setting: its sha256 becomes the weights fingerprint, so manifests and embedding caches of the fine-tuned model
never mix with the base model's, and the fast runtimes export it like any checkpoint. By default (``ensemble``) it
is a :class:`lookalike.nets.TailEnsembleMaps`: the base network with the fine-tuned tail(s) beside its own on the
shared trunk, which an index turns into the mean of the fine-tuned cosine and the base model's LDA cosine
(:func:`lookalike.tuning.fit_ensemble`); a second run without a quarter of the products sets its no-match
threshold (:func:`lookalike.tuning.calibrate_ensemble`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import outliers
from .catalog import scan_catalog
from .files import atomic_write_bytes
from .finetune_net import _pool, _proxy_loss, _raw, cache_trunk_maps, split_backbone
from .settings import Settings
from .tuning import (
    MIN_IMAGES_PER_PRODUCT,
    MIN_PRODUCTS,
    SHRINKAGE,
    Ensemble,
    calibrate_ensemble,
    eligible,
    ensemble_raw,
    fit_ensemble,
    holdout_quality,
    holdout_split,
    lda,
)

logger = logging.getLogger(__name__)

MIN_IMAGES = 200  # fewer catalog photos than this cannot teach a network anything the LDA does not already get


class FinetuneDeclined(ValueError):
    """The catalog cannot support fine-tuning, or fine-tuning did not beat the LDA; the message says why."""


@dataclass(frozen=True)
class FinetuneConfig:
    """What a fine-tune run does. The defaults are those measured on the Grocery catalog (docs/quality.md)."""

    tail_blocks: int = 1  # backbone blocks trained besides the head convolution
    views: int = 4  # cached views per photo: the plain one and views - 1 augmented ones
    epochs: int = 12
    warmup_epochs: int = 1  # proxies only, backbone frozen
    batch_size: int = 64
    lr: float = 1e-3  # AdamW, cosine decay after warm-up
    proxy_lr: float = 1e-2
    weight_decay: float = 1e-4
    scale: float = 24.0  # cosine-logit scale (1 / temperature)
    margin: float = 0.5  # on the true product: subtracted from its cosine (cosface) or added to its angle (arcface)
    loss: str = "cosface"  # cosface or arcface; with margin 0 both are the plain normalised softmax
    refit_all: bool = True  # after early stopping, train again on every photo for the chosen number of epochs
    patience: int = 3  # epochs without a better held-out MAP@R before stopping
    crop_scale: tuple[float, float] = (0.5, 1.0)
    seed: int = 0
    require_gain: bool = True  # decline unless it beats the LDA on held-out photos (False: save it regardless)
    # Simulated unknowns (lookalike.outliers): each epoch after warm-up this share of the products plays "unknown";
    # 0 turns it off. unknown_loss: "uniform" (outlier exposure) or "energy" (hinge at unknown_margin).
    unknown_fraction: float = 0.0
    unknown_loss: str = "energy"
    unknown_weight: float = 1.0
    unknown_margin: float = 0.4
    unknown_rotate: bool = True  # a new group every epoch; False: one group plays unknown all along (never learnt)
    # At most this many photos train (a seeded sample, every product keeping a share while they fit): the cached maps
    # take about 100 KB a photo at 4 views, so this bounds memory (~1.2 GB) and time on a large catalog.
    max_photos: int = 12_000
    # Relational distillation: keep the batch's cosine similarities close to those of the LDA on the base model
    # (what tune: true indexes), so the fine-tune adds to what the base model knew instead of replacing it. 0: off.
    # 64 lifted the whole Grocery catalog's dev photos but made its halves decline the fine-tune (docs/quality.md).
    distill_weight: float = 0.0
    # The saved network keeps the base model's tail beside `tails` fine-tuned ones (lookalike.nets.TailEnsembleMaps),
    # each trained with its own batches and views: the index compares the mean of the fine-tuned cosines and the base
    # model's LDA cosine (tuning.fit_ensemble). False: the fine-tuned backbone alone, with the LDA refitted on it.
    ensemble: bool = True
    tails: int = 1
    # The ensemble's no-match threshold comes from a second, shorter run that never learns this share of the
    # products (seeded), scoring their photos against the rest (tuning.calibrate_ensemble). 0: no such run (the
    # threshold is then calibrated on products the fine-tune has learnt, and comes out too low).
    calibration_fraction: float = 0.25


@dataclass
class FinetuneResult:
    path: Path  # the safetensors checkpoint (full backbone state dict)
    sha256: str
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        """What ``weights_path`` pointing at ``path`` makes the model's weights fingerprint."""
        return "sha256:" + self.sha256


# --- splitting a backbone into a frozen trunk and a trained tail ----------------------------------------------


def finetune(
    settings: Settings,
    *,
    data_dir: str | Path | None = None,
    out_path: str | Path | None = None,
    config: FinetuneConfig | None = None,
    exclude_products: set[str] | frozenset[str] = frozenset(),
    progress: bool | None = None,
) -> FinetuneResult:
    """Fine-tune the settings' backbone on the catalog at ``data_dir`` (default: the settings' ``data_dir``).

    Writes the checkpoint atomically to ``out_path`` (default ``<cache_dir>/finetuned/<model>-<sha>.safetensors``)
    with a ``.json`` sidecar, and returns it. ``exclude_products`` are left out of the fit (for measuring "not in
    my catalog" on products the network never saw). Raises :class:`FinetuneDeclined` with the reason when the
    catalog is too small or the result does not beat the LDA on held-out catalog photos.
    """
    import torch

    from .embedding import FeatureExtractor
    from .runtime import resolve_runtime

    cfg = config or FinetuneConfig()
    outliers.check_config(cfg.unknown_fraction, cfg.unknown_loss, cfg.unknown_weight)
    if cfg.tails < 1:
        raise ValueError(f"tails must be at least 1, got {cfg.tails}")
    if cfg.max_photos < MIN_IMAGES:
        raise ValueError(f"max_photos must be at least {MIN_IMAGES} (the fewest photos a fine-tune learns from)")
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    root = Path(data_dir if data_dir is not None else settings.data_dir).expanduser().resolve()
    images = [im for im in scan_catalog(root) if im.product_id not in exclude_products]
    labels_all = np.array([im.product_id for im in images], dtype=object)
    if len(images) < MIN_IMAGES or eligible(labels_all) < MIN_PRODUCTS:
        raise FinetuneDeclined(
            f"the catalog has {len(images)} photos, {eligible(labels_all)} products with at least "
            f"{MIN_IMAGES_PER_PRODUCT}; fine-tuning needs {MIN_IMAGES} photos and {MIN_PRODUCTS} such products "
            "(use tune: true, the LDA, instead)"
        )
    sampled = None
    if len(images) > cfg.max_photos:
        kept = sample_photos(labels_all, cfg.max_photos, cfg.seed)
        sampled = {"photos": len(kept), "of_photos": len(images), "products": len(set(labels_all[kept]))}
        sampled["of_products"] = len(set(labels_all))
        logger.info(
            "fine-tune: training on a sample of %d of %d photos (%d of %d products; max_photos %d)",
            sampled["photos"], sampled["of_photos"], sampled["products"], sampled["of_products"], cfg.max_photos,
        )  # fmt: skip
        images, labels_all = [images[i] for i in kept], labels_all[kept]
    extractor = FeatureExtractor(settings.replace(runtime="torch", precision="fp32", data_dir=root))
    device = extractor.device
    model = extractor.model.to(device)
    torch.manual_seed(cfg.seed)
    trunk, tail, params = split_backbone(model, cfg.tail_blocks)
    model.eval()
    # The frozen trunk runs where the settings' runtime would run the network (OpenVINO on a CPU by default).
    runtime = resolve_runtime(settings.runtime, device, "fp32")
    maps, ok = cache_trunk_maps(extractor, trunk, [im.path for im in images], cfg, device, progress, runtime=runtime)
    labels = labels_all[ok]
    products, y = np.unique(labels, return_inverse=True)
    held = holdout_split(labels)
    fit_rows, val_rows = np.flatnonzero(~held), np.flatnonzero(held)
    cache_s = time.perf_counter() - start_wall

    def validate() -> tuple[dict, np.ndarray]:
        raw = _raw(tail, maps[:, 0], settings.pooling)
        emb = raw[:, : extractor.dim]
        return holdout_quality(emb[fit_rows], labels[fit_rows], emb[val_rows], labels[val_rows]), raw

    base, raw0 = validate()
    mean, matrix = lda(raw0[fit_rows], labels[fit_rows], SHRINKAGE)
    lda_q = holdout_quality(
        (raw0[fit_rows] - mean) @ matrix, labels[fit_rows], (raw0[val_rows] - mean) @ matrix, labels[val_rows]
    )
    logger.info(
        "fine-tune: %d photos (%d held out) of %d products; held-out recall@1 / MAP@R untuned %.3f / %.3f, "
        "LDA %.3f / %.3f",
        len(labels), len(val_rows), len(products), base["product_recall@1"], base["map@r"],
        lda_q["product_recall@1"], lda_q["map@r"],
    )  # fmt: skip

    target = None  # the base model's LDA vectors, which distillation keeps the batch's similarities close to
    if cfg.distill_weight > 0:
        target = torch.nn.functional.normalize(torch.from_numpy((raw0 - mean) @ matrix), dim=1).to(device)
    # Proxies start at the products' mean embedding, so the warm-up only polishes them.
    emb0 = torch.nn.functional.normalize(torch.from_numpy(raw0[:, : extractor.dim]), dim=1)
    init = torch.zeros(len(products), extractor.dim).index_add_(0, torch.from_numpy(y), emb0)
    init = torch.nn.functional.normalize(init, dim=1).to(device)
    y_t = torch.from_numpy(y).to(device)
    init_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    from tqdm.auto import tqdm

    def train(train_rows: np.ndarray, epochs: int, watch: bool, desc: str, seed: int = cfg.seed):
        """Train from the base weights on ``train_rows`` for up to ``epochs``; with ``watch``, validate after each
        epoch and keep the best (early stopping). ``seed`` draws the batches and views. Returns (best, its state
        dict, history)."""
        model.load_state_dict(init_state)
        proxies = torch.nn.Parameter(init.clone())
        opt = torch.optim.AdamW(
            [{"params": params, "lr": cfg.lr}, {"params": [proxies], "lr": cfg.proxy_lr, "weight_decay": 0.0}],
            weight_decay=cfg.weight_decay,
        )
        steps_per_epoch = math.ceil(len(train_rows) / cfg.batch_size)
        total = epochs * steps_per_epoch
        warm = cfg.warmup_epochs * steps_per_epoch
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: 1.0 if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm)))
        )
        rng = np.random.default_rng(seed + 1)
        rng_unknown = np.random.default_rng(seed + 2)  # its own stream: unknown_fraction 0 trains as before
        unknown = None  # the products playing "unknown" this epoch (lookalike.outliers)
        best = {"epoch": 0, **base}
        best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        history = []
        bar = tqdm(total=total, unit="step", desc=desc, disable=progress is False)
        for epoch in range(1, epochs + 1):
            frozen = epoch <= cfg.warmup_epochs
            for p in params:
                p.requires_grad_(not frozen)
            order = rng.permutation(train_rows)
            views = rng.integers(0, cfg.views, len(order))
            if not frozen and (cfg.unknown_rotate or unknown is None):
                unknown = outliers.pick_unknown(len(products), cfg.unknown_fraction, rng_unknown)
            unknown_t = (
                torch.from_numpy(unknown).to(device) if not frozen and unknown is not None and unknown.any() else None
            )
            losses, unknown_cos = [], []
            for s in range(0, len(order), cfg.batch_size):
                rows = torch.from_numpy(order[s : s + cfg.batch_size]).to(device)
                v = torch.from_numpy(views[s : s + cfg.batch_size]).to(device)
                x = maps[rows, v].float()
                with torch.set_grad_enabled(not frozen):
                    main, _ = tail(x)
                emb = torch.nn.functional.normalize(_pool(main, settings.pooling), dim=1)
                loss, stats = _proxy_loss(emb, proxies, y_t[rows], cfg, unknown_t)
                if target is not None and not frozen:
                    t = target[rows]
                    loss = loss + cfg.distill_weight * ((emb @ emb.T - t @ t.T) ** 2).mean()
                unknown_cos += [stats["unknown_soft_max_cos"]] if "unknown_soft_max_cos" in stats else []
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                losses.append(float(loss.detach()))
                bar.update(1)
            record = {"epoch": epoch, "loss": float(np.mean(losses))}
            if unknown_cos:
                names = "\n".join(np.asarray(products)[unknown].tolist()).encode()
                record["unknown_soft_max_cos"] = float(np.mean(unknown_cos))
                record["unknown_products"] = int(unknown.sum())
                record["unknown_group"] = hashlib.sha256(names).hexdigest()[:12]  # which group, without the names
            if not watch:
                history.append(record)
                continue
            q, _ = validate()
            history.append({**record, **q})
            bar.set_postfix(loss=f"{np.mean(losses):.3f}", map_r=f"{q['map@r']:.3f}")
            logger.info("fine-tune epoch %d: loss %.3f, held-out recall@1 %.3f, MAP@R %.3f", epoch,
                        np.mean(losses), q["product_recall@1"], q["map@r"])  # fmt: skip
            if q["map@r"] > best["map@r"] or (q["map@r"] == best["map@r"] and not frozen):  # ties: the more trained
                best = {"epoch": epoch, **q}
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            elif epoch - best["epoch"] >= cfg.patience and epoch > cfg.warmup_epochs:
                logger.info("fine-tune: no better held-out MAP@R for %d epochs; stopping", cfg.patience)
                break
        bar.close()
        for p in params:
            p.requires_grad_(False)
        if not watch:
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return best, best_state, history

    best, best_state, history = train(fit_rows, cfg.epochs, True, "fine-tune: training")
    model.load_state_dict(best_state)
    _, raw_ft = validate()
    mean, matrix = lda(raw_ft[fit_rows], labels[fit_rows], SHRINKAGE)
    ft_lda = holdout_quality(
        (raw_ft[fit_rows] - mean) @ matrix, labels[fit_rows], (raw_ft[val_rows] - mean) @ matrix, labels[val_rows]
    )
    tails = cfg.tails if cfg.ensemble else 1
    tail_states, ens_q, calibration = [best_state], None, None
    ensemble = Ensemble(extractor.dim, raw0.shape[1] - extractor.dim, tails)
    if cfg.ensemble:
        raws = [raw_ft]
        for t in range(1, tails):  # the same recipe and number of epochs, other batches and views
            _, state, _ = train(
                fit_rows, best["epoch"], False, f"fine-tune: tail {t + 1} of {tails}", cfg.seed + 10 * t
            )
            tail_states.append(state)
            raws.append(validate()[1])
        both = ensemble_raw(raws, raw0, extractor.dim)
        proj = fit_ensemble(both[fit_rows], labels[fit_rows], ensemble)
        fitted, held_out = proj.apply(both[fit_rows]), proj.apply(both[val_rows])
        ens_q = holdout_quality(fitted, labels[fit_rows], held_out, labels[val_rows])
        logger.info("fine-tune: held-out recall@1 / MAP@R of the ensemble %.3f / %.3f", ens_q["product_recall@1"],
                    ens_q["map@r"])  # fmt: skip
    # Decided before the refit and the calibration run, which a declined fine-tune does not need: the fine-tune is
    # kept when it beats the LDA on the base model's features on held-out MAP@R, alone, with the LDA refitted on its
    # features (an index with tune: true and ensemble: false) or as the ensemble (the mean of the two cosines).
    kept = best["map@r"], ft_lda["map@r"], ens_q["map@r"] if ens_q else 0.0
    if cfg.require_gain and max(kept) <= lda_q["map@r"]:
        also = f", {ens_q['map@r']:.3f} as the ensemble" if ens_q else ""
        raise FinetuneDeclined(
            f"on held-out catalog photos the fine-tuned model scored MAP@R {best['map@r']:.3f} "
            f"({ft_lda['map@r']:.3f} with the LDA on top{also}), the LDA on the base model {lda_q['map@r']:.3f}; "
            "keeping the base model (tune: true)"
        )
    refit_history: list = []
    if cfg.refit_all and best["epoch"] > cfg.warmup_epochs:
        # The held-out photos chose the epoch count and judged the models; the kept ones learn from them too
        # (every tail with its own batches and views, as above).
        refit = []
        for t in range(tails):
            desc = "fine-tune: refit on all" + (f" ({t + 1} of {tails})" if tails > 1 else "")
            _, state, steps = train(np.arange(len(labels)), best["epoch"], False, desc, cfg.seed + 10 * t)
            refit.append(state)
            refit_history += steps
        tail_states = refit
    if cfg.ensemble and cfg.calibration_fraction > 0 and best["epoch"] > cfg.warmup_epochs:
        # The same tails, as many epochs, without a seeded group of products: their photos are then what a product
        # the index does not hold looks like to this kind of network.
        unknown = outliers.pick_unknown(len(products), cfg.calibration_fraction, np.random.default_rng(cfg.seed + 3))
        unknown_rows = unknown[y]
        raws = []
        for t in range(tails):
            desc = f"fine-tune: calibration run {t + 1} of {tails}"
            train(fit_rows[~unknown_rows[fit_rows]], best["epoch"], False, desc, cfg.seed + 10 * t)
            raws.append(validate()[1])
        calibration = calibrate_ensemble(ensemble_raw(raws, raw0, extractor.dim), labels, unknown_rows, ensemble)
        if calibration is not None:
            logger.info(
                "fine-tune: no-match threshold %.3f from %d products it never learnt (held-out AUROC %.3f)",
                calibration["threshold"], calibration["hidden_products"], calibration["auroc_on_catalog"],
            )  # fmt: skip
    wall, cpu = time.perf_counter() - start_wall, time.process_time() - start_cpu
    info = {
        "method": "finetune",
        "base_model": extractor.spec.name,
        "base_weights": extractor.weights_fingerprint,
        "config": asdict(cfg),
        "products": len(products),
        "images": len(labels),
        "held_out": len(val_rows),
        "excluded_products": sorted(exclude_products),
        "sampled": sampled,
        "validation": {"untuned": base, "lda": lda_q, "finetuned": best, "finetuned+lda": ft_lda, "ensemble": ens_q},
        "ensemble": {"dim": ensemble.dim, "aux": ensemble.aux, "tails": tails} if cfg.ensemble else None,
        "calibration": calibration,
        "history": history,
        "refit_history": refit_history,
        "seconds": {"wall": round(wall, 3), "cpu": round(cpu, 3), "cache_wall": round(cache_s, 3)},
        "device": device,
    }
    state = ensemble_state(model, cfg.tail_blocks, init_state, tail_states) if cfg.ensemble else tail_states[0]
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    layout = {"tail_blocks": cfg.tail_blocks, "tuned_tails": tails} if cfg.ensemble else None
    path = save_checkpoint(state, info, out_path, Path(settings.cache_dir), extractor.spec.name, ensemble=layout)
    sha = file_sha(path)
    info["sha256"] = sha
    atomic_write_bytes(path.with_suffix(".json"), json.dumps(info, indent=1).encode())
    logger.info(
        "fine-tuned %s in %.0f s wall / %.0f s CPU: held-out recall@1 %.3f, MAP@R %.3f (LDA %.3f / %.3f) -> %s",
        extractor.spec.name, wall, cpu, best["product_recall@1"], best["map@r"], lda_q["product_recall@1"],
        lda_q["map@r"], path,
    )  # fmt: skip
    return FinetuneResult(path, sha, info)


def sample_photos(labels: np.ndarray, max_photos: int, seed: int) -> np.ndarray:
    """Sorted row indices of a seeded sample of at most ``max_photos`` photos: every product keeps up to an equal
    share (at least MIN_IMAGES_PER_PRODUCT), and when even that many of every product would not fit, a seeded
    choice of products keeps it. Rows stay in catalog order, so the held-out split still takes each product's last
    photos."""
    rng = np.random.default_rng(seed)
    products, inverse = np.unique(labels, return_inverse=True)
    by_product = np.argsort(inverse, kind="stable")  # rows grouped by product, in catalog order within each
    bounds = np.searchsorted(inverse[by_product], np.arange(len(products) + 1))
    share = max(MIN_IMAGES_PER_PRODUCT, max_photos // len(products))
    chosen = np.arange(len(products))
    if len(products) * share > max_photos:
        chosen = rng.choice(len(products), max_photos // share, replace=False)
    kept = []
    for p in chosen:
        rows = by_product[bounds[p] : bounds[p + 1]]
        kept.append(rows if len(rows) <= share else rng.choice(rows, share, replace=False))
    return np.sort(np.concatenate(kept))


def ensemble_state(model, tail_blocks: int, base_state: dict, tail_states: list[dict]) -> dict:
    """The state dict of a :class:`lookalike.nets.TailEnsembleMaps`: ``model`` with ``base_state`` (its weights
    before fine-tuning) as the base network, and the tail of ``model`` under each of ``tail_states``."""
    import copy

    from .nets import TailEnsembleMaps

    work = copy.deepcopy(model)
    tuned = []
    for state in tail_states:
        work.load_state_dict(state)
        tuned.append(copy.deepcopy(work.tail_parts(tail_blocks).state_dict()))
    work.load_state_dict(base_state)
    ens = TailEnsembleMaps(work, tail_blocks, len(tail_states))
    for parts, state in zip(ens.tuned, tuned):
        parts.load_state_dict(state)
    return ens.state_dict()


def save_checkpoint(
    state: dict, info: dict, out_path, cache_dir: Path, model_name: str, *, ensemble: dict | None = None
) -> Path:
    """The state dict as safetensors, written atomically; the default name carries its content hash. ``ensemble``
    (tail_blocks, tuned_tails): the state is a TailEnsembleMaps', recorded in the metadata the loader reads."""
    from safetensors.torch import save

    meta = {"method": "finetune", "base_model": model_name, **({"tail_ensemble": ensemble} if ensemble else {})}
    data = save(state, metadata={"lookalike": json.dumps(meta)})
    if out_path is None:
        out_path = cache_dir / "finetuned" / f"{model_name}-{hashlib.sha256(data).hexdigest()[:16]}.safetensors"
    path = Path(out_path)
    atomic_write_bytes(path, data)
    return path


def file_sha(path: Path) -> str:
    from .backbones import file_sha256

    return file_sha256(path)


__all__ = ["FinetuneConfig", "FinetuneDeclined", "FinetuneResult", "finetune", "split_backbone"]
