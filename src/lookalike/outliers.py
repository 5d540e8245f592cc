"""Training with simulated unknowns (outlier exposure) for the fine-tune (:mod:`lookalike.finetune`).

"Not in my catalog" fails on products that look like catalog products. A network trained only to tell the
catalog's products apart has never been asked what to do with a photo of a product it does not know. Outlier
exposure asks it: each epoch a group of the catalog's products plays "unknown". Their photos leave the
classification loss, their proxies leave every softmax, and their embeddings are pushed away from the proxies of
the remaining ("known") products, either

- ``uniform``: towards a uniform softmax over the known proxies (Hendrycks et al., "Deep anomaly detection with
  outlier exposure", 2019), or
- ``energy``: below a fixed soft-max cosine (``logsumexp(scale * cos) / scale``, a squared hinge at
  ``unknown_margin``; Liu et al., "Energy-based out-of-distribution detection", 2020, on cosine logits).

The groups rotate from epoch to epoch, so every product is also learnt as a known one.
"""

from __future__ import annotations

from typing import Any

import numpy as np

UNKNOWN_LOSSES = ("uniform", "energy")


def check_config(fraction: float, kind: str, weight: float) -> None:
    """ValueError naming the field when an outlier-exposure setting is out of range."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"unknown_fraction must be in [0, 1), got {fraction}")
    if kind not in UNKNOWN_LOSSES:
        raise ValueError(f"unknown_loss must be one of {', '.join(UNKNOWN_LOSSES)}, got {kind!r}")
    if weight < 0:
        raise ValueError(f"unknown_weight must be >= 0, got {weight}")


def pick_unknown(n_products: int, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """A mask of the products that play "unknown" this epoch: ``round(fraction * n)`` of them, at least one and
    leaving at least two known; all False when ``fraction`` is 0."""
    mask = np.zeros(n_products, dtype=bool)
    if fraction <= 0 or n_products < 3:
        return mask
    k = min(n_products - 2, max(1, int(round(fraction * n_products))))
    mask[rng.permutation(n_products)[:k]] = True
    return mask


def loss_with_unknowns(
    cos: Any, target: Any, unknown: Any, *, scale: float, margin: float, kind: str, weight: float, unknown_margin: float
) -> tuple[Any, dict[str, float]]:
    """The training loss of one batch when the products in ``unknown`` (bool tensor over proxies) play unknown.

    ``cos`` (batch, products) are cosines to the proxies, ``target`` the rows' products. Rows of known products get
    the usual normalised softmax with a CosFace ``margin`` over the known proxies only; rows of unknown products get
    ``weight`` times the outlier term over the known proxies. Returns (loss, statistics for the history).
    """
    import torch
    import torch.nn.functional as F

    known_cols = ~unknown
    is_unknown = unknown[target]
    logits = scale * (cos - margin * F.one_hot(target, cos.shape[1]))
    logits = logits.masked_fill(~known_cols, float("-inf"))
    stats: dict[str, float] = {}
    loss = cos.new_zeros(())
    if (~is_unknown).any():
        loss = loss + F.cross_entropy(logits[~is_unknown], target[~is_unknown])
    if is_unknown.any():
        z = scale * cos[is_unknown][:, known_cols]
        soft_max_cos = torch.logsumexp(z, dim=1) / scale
        if kind == "uniform":
            term = -F.log_softmax(z, dim=1).mean(dim=1).mean()
        else:
            term = F.relu(soft_max_cos - unknown_margin).pow(2).mean()
        loss = loss + weight * term
        stats["unknown_soft_max_cos"] = float(soft_max_cos.detach().mean())
    return loss, stats


__all__ = ["UNKNOWN_LOSSES", "check_config", "loss_with_unknowns", "pick_unknown"]
