"""lookalike: visual product search. Point it at ``<catalog>/<product_id>/<images>``; ask which products look alike.

The public names are imported on first use (PEP 562), so ``import lookalike.settings`` stays light (no torch).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_WHERE = {
    "BuildReport": "engine",
    "CatalogWriteError": "errors",
    "DataManager": "store",
    "EvaluationUtils": "evaluation",
    "FeatureExtractor": "embedding",
    "ImageError": "imaging",
    "ImageSearchEngine": "engine",
    "IndexFileError": "store",
    "IndexMismatchError": "engine",
    "Settings": "settings",
    "SettingsError": "settings",
    "UnknownProductError": "engine",
}

__all__ = [*sorted(_WHERE), "__version__"]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'lookalike' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
