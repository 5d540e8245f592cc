"""Vector stores behind one protocol (:mod:`lookalike.stores.base`). Only this package imports faiss or pymilvus."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .base import (
    REQUIRED_FIELDS,
    IndexFileError,
    StoreError,
    StoreFilter,
    StoreHit,
    StoreInfo,
    StoreMismatchError,
    VectorStore,
)


def milvus_uri(settings: Any) -> str:
    """The Milvus URI of ``settings``: ``milvus_uri``, or Milvus Lite's file ``<cache_dir>/milvus.db``."""
    uri = getattr(settings, "milvus_uri", None)
    return uri if uri else str(Path(settings.cache_dir).expanduser().resolve() / "milvus.db")


def search_device(settings: Any) -> str:
    """Where exact searches run: a CUDA device when the settings ask for one (a torch matmul), else the CPU."""
    if settings.device.startswith("cuda"):
        return settings.device
    if settings.device == "auto":
        from ..embedding import resolve_device

        return resolve_device("auto")
    return "cpu"


def open_store(settings: Any, *, metric: str, dim: int | None = None, device: str = "cpu") -> VectorStore:
    """The store the settings name (``store: faiss`` by default, or ``milvus``), opened at its location."""
    kind = getattr(settings, "store", "faiss")
    if kind == "milvus":
        from .milvus import MilvusStore  # needs pymilvus (and milvus-lite for a local file)

        return MilvusStore(
            milvus_uri(settings),
            settings.collection,
            metric=metric,
            dim=dim,
            token=os.environ.get("LOOKALIKE_MILVUS_TOKEN"),
            index_type=settings.index_type,
            exact_below=settings.exact_below,
        )
    if kind != "faiss":
        raise ValueError(f"unknown store {kind!r}; available: faiss, milvus")
    from .faiss import FaissStore

    return FaissStore(
        settings.index_path,
        settings.metadata_path,
        metric=metric,
        dim=dim,
        index_type=settings.index_type,
        exact_below=settings.exact_below,
        device=device,
    )


def open_scratch_store(settings: Any, *, metric: str, dim: int) -> VectorStore:
    """A store for an evaluation, never the catalog's own: FAISS in memory, or with ``store: milvus`` the
    collection ``<collection>__eval`` on the configured server, or a Milvus Lite file in a temporary folder
    (removed at exit) when no server is configured."""
    if getattr(settings, "store", "faiss") != "milvus":
        from .faiss import FaissStore

        return FaissStore(None, metric=metric, index_type=settings.index_type, exact_below=settings.exact_below)
    import atexit
    import shutil
    import tempfile

    from .milvus import MilvusStore
    from .milvus_support import is_lite

    uri = getattr(settings, "milvus_uri", None)
    if not uri or is_lite(uri):
        folder = tempfile.mkdtemp(prefix="lookalike-eval-")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        uri = os.path.join(folder, "eval.db")
    return MilvusStore(
        uri, f"{settings.collection}__eval", metric=metric, dim=dim, token=os.environ.get("LOOKALIKE_MILVUS_TOKEN"),
        index_type=settings.index_type, exact_below=settings.exact_below,
    )  # fmt: skip


__all__ = [
    "open_scratch_store",
    "REQUIRED_FIELDS",
    "IndexFileError",
    "StoreError",
    "StoreFilter",
    "StoreHit",
    "StoreInfo",
    "StoreMismatchError",
    "VectorStore",
    "milvus_uri",
    "open_store",
    "search_device",
]
