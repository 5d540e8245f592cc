"""The vector index behind a small interface (FAISS here).

Positions in the index are rows: row ``i`` is the ``i``-th image of the metadata. Removing rows shifts the
later ones down, in order, exactly as the metadata lists do.
"""

from __future__ import annotations

import numpy as np

METRIC_COSINE = "cosine"
METRIC_L2 = "l2"


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (all-zero rows stay zero)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


class VectorIndex:
    """Exact search: inner product over L2-normalised vectors for cosine, Euclidean distance for l2."""

    def __init__(self, index, metric: str):
        self._index = index
        self.metric = metric

    @classmethod
    def build(cls, vectors: np.ndarray, metric: str) -> VectorIndex:
        import faiss

        if metric not in (METRIC_COSINE, METRIC_L2):
            raise ValueError(f"unknown similarity metric {metric!r}; available: cosine, l2")
        dim = int(vectors.shape[1])
        index = faiss.IndexFlatIP(dim) if metric == METRIC_COSINE else faiss.IndexFlatL2(dim)
        out = cls(index, metric)
        out.add(vectors)
        return out

    @property
    def normalized(self) -> bool:
        return self.metric == METRIC_COSINE

    def prepare(self, vectors: np.ndarray) -> np.ndarray:
        """What the index stores and compares for these raw feature vectors."""
        vectors = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
        return l2_normalize(vectors) if self.normalized else np.ascontiguousarray(vectors)

    @property
    def ntotal(self) -> int:
        return int(self._index.ntotal)

    @property
    def dim(self) -> int:
        return int(self._index.d)

    @property
    def type_name(self) -> str:
        return type(self._index).__name__

    def add(self, vectors: np.ndarray) -> None:
        if len(vectors):
            self._index.add(self.prepare(vectors))

    def remove(self, rows: np.ndarray) -> None:
        import faiss

        rows = np.asarray(rows, dtype=np.int64)
        if len(rows):
            self._index.remove_ids(faiss.IDSelectorBatch(rows))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows), each (n, k'), with k' = min(k, ntotal); best first.

        Scores are cosine similarities for cosine and Euclidean distances for l2; rows are -1 where missing.
        """
        k = min(int(k), self.ntotal)
        q = self.prepare(queries)
        if k <= 0:
            return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
        scores, rows = self._index.search(q, k)
        if self.metric == METRIC_L2:
            scores = np.sqrt(np.maximum(scores, 0.0))  # FAISS reports squared distances
        return scores, rows

    def reconstruct(self, rows: list[int] | np.ndarray) -> np.ndarray:
        """The stored vectors of these rows, (len(rows), dim)."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            return np.zeros((0, self.dim), np.float32)
        return np.stack([self._index.reconstruct(int(r)) for r in rows])

    def vectors(self) -> np.ndarray:
        """All stored vectors, (ntotal, dim), in row order."""
        if self.ntotal == 0:
            return np.zeros((0, self.dim), np.float32)
        return self._index.reconstruct_n(0, self.ntotal)

    def copy(self) -> VectorIndex:
        import faiss

        return VectorIndex(faiss.clone_index(self._index), self.metric)

    def nbytes(self) -> int:
        return len(self.to_bytes())

    def to_bytes(self) -> bytes:
        import faiss

        return faiss.serialize_index(self._index).tobytes()

    @classmethod
    def from_bytes(cls, data: bytes, metric: str) -> VectorIndex:
        import faiss

        return cls(faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8)), metric)


def similarity_from_distance(distance: np.ndarray) -> np.ndarray:
    """The monotone similarity reported for l2: 1 / (1 + distance), in (0, 1], 1 for identical vectors."""
    return 1.0 / (1.0 + distance)
