"""lookalike: visual product search. Point it at ``<catalog>/<product_id>/<images>``; ask which products look alike.

The public names are imported on first use (PEP 562), so ``import lookalike`` and ``import lookalike.settings``
stay fast and never pull in torch or FAISS by themselves.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# No spin-waiting OpenMP threads in PyTorch (they burn the cores that concurrent searches and other processes
# need). Read when the OpenMP runtime loads, i.e. when torch is first imported: so here, before any of ours does.
# A value the user set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

_LAZY = {
    "BoxError": ".products",
    "BuildReport": ".engine",
    "CatalogWriteError": ".errors",
    "DataManager": ".store",
    "EvaluationUtils": ".evaluation",
    "FeatureExtractor": ".embedding",
    "FilterError": ".filters",
    "ImageError": ".imaging",
    "ImageSearchEngine": ".engine",
    "IndexFileError": ".store",
    "IndexMismatchError": ".engine",
    "ProductRecord": ".records",
    "RegionResult": ".regions",
    "Settings": ".settings",
    "SettingsError": ".settings",
    "UnknownProductError": ".engine",
}

__all__ = [
    "BoxError",
    "BuildReport",
    "CatalogWriteError",
    "DataManager",
    "EvaluationUtils",
    "FeatureExtractor",
    "FilterError",
    "ImageError",
    "ImageSearchEngine",
    "IndexFileError",
    "IndexMismatchError",
    "ProductRecord",
    "RegionResult",
    "Settings",
    "SettingsError",
    "UnknownProductError",
    "__version__",
]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from .embedding import FeatureExtractor
    from .engine import BuildReport, ImageSearchEngine, IndexMismatchError, UnknownProductError
    from .errors import CatalogWriteError
    from .evaluation import EvaluationUtils
    from .filters import FilterError
    from .imaging import ImageError
    from .products import BoxError
    from .records import ProductRecord
    from .regions import RegionResult
    from .settings import Settings, SettingsError
    from .store import DataManager, IndexFileError


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lookalike' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # the next access is a plain lookup
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
