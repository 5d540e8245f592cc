"""Vector stores behind one protocol (:mod:`lookalike.stores.base`). Only this package imports faiss or pymilvus."""

from .base import REQUIRED_FIELDS, StoreError, StoreHit, StoreInfo, StoreMismatchError, VectorStore

__all__ = ["REQUIRED_FIELDS", "StoreError", "StoreHit", "StoreInfo", "StoreMismatchError", "VectorStore"]
