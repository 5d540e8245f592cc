"""The randomized block Hadamard rotation that ``auto`` puts before scalar-quantized indexes (``HR<block>,...`` in
a FAISS factory string; :mod:`lookalike.stores.faiss_index`): it spreads each vector's energy evenly over the
dimensions, so one byte a dimension loses less."""

from __future__ import annotations

import numpy as np


def split_rotation(factory: str) -> tuple[int, str]:
    """``"HR128,HNSW32,SQ8"`` -> (128, ``"HNSW32,SQ8"``); no rotation -> (0, factory)."""
    head, _, rest = factory.partition(",")
    if head.startswith("HR") and head[2:].isdigit() and rest:
        return int(head[2:]), rest
    return 0, factory


def hadamard_block(dim: int, largest: int = 128) -> int:
    """The largest power of two up to ``largest`` dividing ``dim``, or 0 when that is under 16 (no use)."""
    block = largest
    while block >= 16:
        if dim % block == 0:
            return block
        block //= 2
    return 0


class HadamardRotation:
    """A randomized block Hadamard rotation: random signs, then a normalised Hadamard matrix on each block.

    Orthogonal (distances and inner products are unchanged), its own inverse up to the signs, fixed by the
    dimension and block size alone (the signs come from a fixed PCG64 bit stream, the same on every machine), so
    nothing but ``HR<block>`` in the manifest's factory string needs keeping. Like a dense random rotation, it
    spreads each vector's energy evenly over the dimensions, so 8-bit scalar codes lose much less (measured on
    clustered 2048-d vectors: recall@10 0.985 -> 0.994).
    """

    def __init__(self, dim: int, block: int):
        h = np.ones((1, 1), np.float32)
        while len(h) < block:
            h = np.block([[h, h], [h, -h]])
        self.block = block
        self.matrix = (h / np.sqrt(block)).astype(np.float32)
        bits = np.random.PCG64(20261126).random_raw(dim) & 1
        self.signs = np.where(bits == 1, -1.0, 1.0).astype(np.float32)

    def apply(self, x: np.ndarray) -> np.ndarray:
        n = len(x)
        return np.ascontiguousarray(((x * self.signs).reshape(n, -1, self.block) @ self.matrix).reshape(n, -1))

    def invert(self, y: np.ndarray) -> np.ndarray:
        n = len(y)
        return np.ascontiguousarray((y.reshape(n, -1, self.block) @ self.matrix).reshape(n, -1) * self.signs)
