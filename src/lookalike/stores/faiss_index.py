"""FAISS indexes behind a small interface: what :class:`lookalike.stores.faiss.FaissStore` keeps its vectors in.

Positions in the index are rows: row ``i`` is the ``i``-th image of the metadata. Removing rows shifts the
later ones down, in order, exactly as the metadata lists do.

Which index: ``index_type="auto"`` keeps exact search (``Flat``) for catalogs under ``exact_below`` images and
switches to an approximate, compressed one above it (see :func:`choose_index`); any FAISS factory string
(``"HNSW32,SQ8"``, ``"IVF1024,PQ64"``, ``"PCA256,HNSW32"``, ...) picks one by hand. Search parameters
(``efSearch``, ``nprobe``) are set when the index is built and travel inside the index file.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import numpy as np

from ..ranking import l2_normalize, similarity_from_distance  # noqa: F401 - re-exported
from .rotation import HadamardRotation, hadamard_block, split_rotation

logger = logging.getLogger(__name__)

METRIC_COSINE = "cosine"
METRIC_L2 = "l2"
INDEX_AUTO = "auto"
DEFAULT_EXACT_BELOW = 10_000
COMPRESSED_FROM = 1_000_000  # auto: from here on 1 byte a dimension is too much; PCA + IVF + 6-bit codes
HNSW_EF_SEARCH = 128  # recall@10 >= 0.99 against exact search up to a few hundred thousand vectors (benchmarks/)
IVF_NPROBE = 64  # at least; nlist / 32 for large indexes
TRAIN_MAX = 200_000  # vectors used to train quantizers (a seeded sample beyond that)
SUBSET_EXACT = 16_384  # filtered search on an approximate index: an exact pass over subsets up to this many rows


def choose_index(n: int, dim: int, index_type: str = INDEX_AUTO, exact_below: int = DEFAULT_EXACT_BELOW) -> str:
    """The FAISS factory string for ``n`` vectors of ``dim`` values.

    ``auto``: exact (``Flat``) under ``exact_below``; then HNSW over 8-bit scalar-quantized vectors behind a
    randomized Hadamard rotation (``HR<block>``, see :class:`HadamardRotation`: it spreads each vector's energy
    evenly over the dimensions, which makes 8-bit codes accurate enough for recall@10 >= 0.99; a quarter of flat
    fp32's memory, well under a millisecond a query); from ``COMPRESSED_FROM`` on, PCA + IVF + 6-bit codes (1/8
    of flat fp32's memory). The README's "Speed" section has the measured recall, latency and memory of each.
    """
    if index_type != INDEX_AUTO:
        return index_type
    if n < exact_below:
        return "Flat"
    if n < COMPRESSED_FROM:
        block = hadamard_block(dim)
        return f"HR{block},HNSW32,SQ8" if block else "HNSW32,SQ8"
    nlist = int(min(65536, max(1024, 4 * round(np.sqrt(n)))))
    # 6-bit codes of the leading principal directions, 62.5% of them, encoded as residuals from their IVF
    # centroid: with the ids and the coarse quantizer just under 1/8 of flat fp32's memory. At that budget more
    # directions at 6 bits keep more of the neighbours than fewer at 8 bits (recall@10 0.951 vs 0.937 on a
    # million clustered 2048-d vectors, benchmarks/bench_1m.py).
    keep = max(8, int(dim * 0.625) // 8 * 8)
    return f"PCA{keep},IVF{nlist}_HNSW32,SQ6"


class VectorIndex:
    """Inner product over L2-normalised vectors for cosine, Euclidean distance for l2; exact or approximate."""

    def __init__(self, index, metric: str, *, factory: str | None = None, device: str = "cpu"):
        self._index = index
        self.metric = metric
        self.factory = factory or _describe(index)
        block, _ = split_rotation(self.factory)
        # Applied here, not inside FAISS (whose linear transforms are dense d x d matrices): O(d) to keep.
        self._rotation = HadamardRotation(int(index.d), block) if block else None
        self.device = device  # "cuda..." searches exact indexes with a torch matmul on the GPU
        self._mirror = None  # the vectors on the GPU, made on first search
        self._subset: tuple[np.ndarray, np.ndarray] | None = None  # (rows asked, their decoded vectors), last one
        self._lock = threading.Lock()  # guards structures made on first use (the IVF direct map)
        _set_runtime_parameters(index)

    @classmethod
    def build(
        cls,
        vectors: np.ndarray,
        metric: str,
        *,
        index_type: str = "Flat",
        exact_below: int = DEFAULT_EXACT_BELOW,
        device: str = "cpu",
    ) -> VectorIndex:
        """An index over ``vectors`` (raw; normalised here for cosine). ``index_type`` ``"auto"`` chooses by size."""
        import faiss

        if metric not in (METRIC_COSINE, METRIC_L2):
            raise ValueError(f"unknown similarity metric {metric!r}; available: cosine, l2")
        vectors = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
        dim = int(vectors.shape[1])
        factory = choose_index(len(vectors), dim, index_type, exact_below)
        block, inner = split_rotation(factory)
        if block and (dim % block or block & (block - 1)):
            raise ValueError(f"index_type {factory!r}: HR<block> needs a power of two that divides the dimension {dim}")
        faiss_metric = faiss.METRIC_INNER_PRODUCT if metric == METRIC_COSINE else faiss.METRIC_L2
        try:
            try:
                if inner == "Flat" and not block:  # the classes FAISS' own flat factory does not name
                    index = faiss.IndexFlatIP(dim) if metric == METRIC_COSINE else faiss.IndexFlatL2(dim)
                elif metric == METRIC_COSINE and "PCA" in inner:
                    # PCA centres the data, which keeps L2 distances but not inner products; on unit vectors
                    # L2 ranks exactly as cosine does (|q-x|^2 = 2 - 2 q.x), so the index works in L2.
                    index = faiss.index_factory(dim, inner, faiss.METRIC_L2)
                else:
                    index = faiss.index_factory(dim, inner, faiss_metric)
            except RuntimeError as exc:
                if metric != METRIC_COSINE or "inner product" not in str(exc):
                    raise
                # Unit vectors rank the same by L2 distance as by inner product (|q-x|^2 = 2 - 2 q.x), so an
                # index that only knows L2 (IVFPQR, ...) serves cosine too; search converts back.
                index = faiss.index_factory(dim, inner, faiss.METRIC_L2)
        except RuntimeError as exc:
            raise ValueError(
                f"index_type {factory!r} is not a FAISS index factory string for {dim}-d vectors "
                f"({_faiss_message(exc)}); use auto, Flat, HNSW32,SQ8, IVF1024,PQ64, ..."
            ) from None
        out = cls(index, metric, factory=factory, device=device)
        prepared = out.prepare(vectors)
        if not index.is_trained:
            out._train(prepared)
        _set_search_defaults(index)
        if len(prepared):
            index.add(prepared)
        return out

    def _train(self, prepared: np.ndarray) -> None:
        if len(prepared) > TRAIN_MAX:
            rng = np.random.default_rng(0)
            prepared = prepared[np.sort(rng.choice(len(prepared), TRAIN_MAX, replace=False))]
        try:
            self._index.train(prepared)
        except RuntimeError as exc:
            raise ValueError(
                f"index_type {self.factory!r} cannot be trained on {len(prepared)} vectors "
                f"({_faiss_message(exc)}); IVF<n> needs many more vectors than <n> lists: use auto or a smaller one"
            ) from None

    @property
    def normalized(self) -> bool:
        return self.metric == METRIC_COSINE

    @property
    def exact(self) -> bool:
        """Whether search is exhaustive over uncompressed vectors (the results are the true nearest)."""
        import faiss

        return isinstance(faiss.downcast_index(self._index), faiss.IndexFlat)

    def prepare(self, vectors: np.ndarray) -> np.ndarray:
        """What the index stores and compares for these raw feature vectors."""
        vectors = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
        vectors = l2_normalize(vectors) if self.normalized else np.ascontiguousarray(vectors)
        return self._rotation.apply(vectors) if self._rotation is not None else vectors

    @property
    def ntotal(self) -> int:
        return int(self._index.ntotal)

    @property
    def dim(self) -> int:
        return int(self._index.d)

    @property
    def type_name(self) -> str:
        import faiss

        return type(faiss.downcast_index(self._index)).__name__

    def add(self, vectors: np.ndarray) -> None:
        if len(vectors):
            self._index.add(self.prepare(vectors))
            self._mirror = self._subset = None

    def remove(self, rows: np.ndarray) -> None:
        """Drop these rows; later rows move down in order. Indexes that cannot remove in place (HNSW, IVF, ...)
        are rebuilt from their remaining stored vectors, with their trained quantizers kept."""
        import faiss

        rows = np.unique(np.asarray(rows, dtype=np.int64))
        if not len(rows):
            return
        inner = faiss.downcast_index(self._index)
        if isinstance(inner, faiss.IndexFlatCodes):  # Flat, SQ, PQ: remove_ids shifts the rest down in order
            inner.remove_ids(faiss.IDSelectorBatch(rows))
        else:
            keep = np.setdiff1d(np.arange(self.ntotal), rows)
            stored = self._stored()[keep]
            rebuilt = faiss.clone_index(self._index)
            rebuilt.reset()
            if len(stored):
                rebuilt.add(stored)
            _set_runtime_parameters(rebuilt)
            self._index = rebuilt
        self._mirror = self._subset = None

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows), each (n, k'), with k' = min(k, ntotal); best first.

        Scores are cosine similarities for cosine and Euclidean distances for l2; rows are -1 where missing.
        """
        k = min(int(k), self.ntotal)
        q = self.prepare(queries)
        if k <= 0:
            return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
        if self.device.startswith("cuda") and self.exact:
            scores, rows = self._gpu().search(q, k)
        else:
            scores, rows = self._index.search(q, k)
        return self._scores(scores, self._index.metric_type != faiss_inner_product()), rows

    def _gpu(self) -> TorchFlat:
        if self._mirror is None:
            self._mirror = TorchFlat(self.vectors(), self.metric, self.device)
        return self._mirror

    def _scores(self, raw: np.ndarray, squared_l2: bool) -> np.ndarray:
        """What :meth:`search` reports from raw FAISS values (``squared_l2``: they are squared distances)."""
        if self.metric == METRIC_L2:
            return np.sqrt(np.maximum(raw, 0.0))  # FAISS reports squared distances
        if squared_l2:
            return 1.0 - raw / 2.0  # an L2 index over unit vectors: squared distance -> cosine
        return raw

    def search_subset(self, queries: np.ndarray, k: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`search` over the given rows only (a filter's images): (scores, rows), k' = min(k, len(rows)).

        Exact over the stored vectors when the index is exact (FAISS' id selector: no copy) or the subset holds
        at most :data:`SUBSET_EXACT` rows (their vectors are decoded and compared one by one). A larger subset
        of an approximate index is searched through the index with a widening window, keeping only its rows
        until ``k`` are found (as approximate as an unfiltered search of that index, never fewer than ``k``).
        """
        asked = rows
        rows = np.unique(np.asarray(rows, dtype=np.int64))
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        k = min(int(k), len(rows))
        if k <= 0:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        if len(rows) == self.ntotal:
            return self.search(queries, k)
        if self.exact:
            return self._exact_subset(self.prepare(queries), k, rows)
        if len(rows) <= SUBSET_EXACT:
            return self._brute_force(self.prepare(queries), k, rows, asked)
        return self._widening_subset(queries, k, rows)

    def _exact_subset(self, q: np.ndarray, k: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import faiss

        if self.device.startswith("cuda"):
            scores, found = self._gpu().search(q, k, rows)
            return self._scores(scores, False), found
        selector = faiss.IDSelectorBatch(rows)
        scores, found = self._index.search(q, k, params=faiss.SearchParameters(sel=selector))
        return self._scores(scores, self._index.metric_type != faiss_inner_product()), found

    def _brute_force(self, q: np.ndarray, k: int, rows: np.ndarray, asked: Any) -> tuple[np.ndarray, np.ndarray]:
        """An exact pass over the rows' stored (decoded) vectors, in the space :meth:`prepare` maps to. The
        decoded vectors of the last subset are kept while the caller asks with the same ``rows`` object (the
        store hands the same one back for a repeated filter): decoding costs more than comparing."""
        cached = self._subset
        if cached is not None and cached[0] is asked:
            x = cached[1]
        else:
            self._ensure_direct_map()
            x = np.asarray(self._index.reconstruct_batch(rows), dtype=np.float32)
            self._subset = (asked, x)
        sims = q @ x.T
        if self.metric == METRIC_L2:
            values = (q * q).sum(1, keepdims=True) + (x * x).sum(1)[None, :] - 2 * sims
            order = _smallest(values, k)
            return np.sqrt(np.maximum(np.take_along_axis(values, order, 1), 0.0)), rows[order]
        order = _smallest(-sims, k)
        return np.take_along_axis(sims, order, 1), rows[order]

    def _widening_subset(self, queries: np.ndarray, k: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        member = np.zeros(self.ntotal, dtype=bool)
        member[rows] = True
        depth = min(self.ntotal, max(4 * k, int(2 * k * self.ntotal / len(rows))))
        while True:
            scores, found = self.search(queries, depth)
            keep = (found >= 0) & member[np.maximum(found, 0)]
            if depth >= self.ntotal or keep.sum(axis=1).min() >= k:
                break
            depth = min(self.ntotal, depth * 4)
        out_s = np.full((len(queries), k), np.nan, np.float32)
        out_r = np.full((len(queries), k), -1, np.int64)
        for i in range(len(queries)):
            s, r = scores[i][keep[i]][:k], found[i][keep[i]][:k]
            out_s[i, : len(s)], out_r[i, : len(r)] = s, r
        return out_s, out_r

    def reconstruct(self, rows: list[int] | np.ndarray) -> np.ndarray:
        """The stored vectors of these rows, (len(rows), dim) (decoded: approximate for compressed indexes)."""
        rows = np.asarray(rows, dtype=np.int64)
        if len(rows) == 0:
            return np.zeros((0, self.dim), np.float32)
        if len(rows) > 64:
            return self.vectors()[rows]
        self._ensure_direct_map()
        return self._unrotate(np.stack([self._index.reconstruct(int(r)) for r in rows]))

    def _ensure_direct_map(self) -> None:
        """IVF indexes find one row through a direct map (8 bytes a vector). It is made on the first call that
        needs one ("more like this"), not at build time, so that an index that never serves it stays within its
        memory budget (1/8 of flat fp32 for the million-vector ``auto`` index)."""
        import faiss

        with self._lock:
            for part in _parts(self._index):
                if isinstance(part, faiss.IndexIVF) and part.direct_map.type == faiss.DirectMap.NoMap:
                    part.make_direct_map()

    def vectors(self) -> np.ndarray:
        """All stored vectors, (ntotal, dim), in row order."""
        return self._unrotate(self._stored())

    def _stored(self) -> np.ndarray:
        """The vectors as the FAISS index holds them (rotated, if there is a rotation)."""
        if self.ntotal == 0:
            return np.zeros((0, self.dim), np.float32)
        return self._index.reconstruct_n(0, self.ntotal)

    def _unrotate(self, vectors: np.ndarray) -> np.ndarray:
        return self._rotation.invert(vectors) if self._rotation is not None else vectors

    def copy(self) -> VectorIndex:
        import faiss

        return VectorIndex(faiss.clone_index(self._index), self.metric, factory=self.factory, device=self.device)

    def nbytes(self) -> int:
        return len(self.to_bytes())

    def to_bytes(self) -> bytes:
        import faiss

        return faiss.serialize_index(self._index).tobytes()

    @classmethod
    def from_bytes(cls, data: bytes, metric: str, *, factory: str | None = None, device: str = "cpu") -> VectorIndex:
        import faiss

        index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        return cls(index, metric, factory=factory, device=device)


def _smallest(values: np.ndarray, k: int) -> np.ndarray:
    """Column positions of each row's ``k`` smallest values, smallest first (ties by position)."""
    if k < values.shape[1]:
        part = np.argpartition(values, k - 1, axis=1)[:, :k]
        part.sort(axis=1)  # by position, so that the stable sort below breaks ties as FAISS does
    else:
        part = np.broadcast_to(np.arange(values.shape[1]), values.shape).copy()
    picked = np.take_along_axis(values, part, 1)
    return np.take_along_axis(part, np.argsort(picked, axis=1, kind="stable"), 1)


def faiss_inner_product() -> int:
    import faiss

    return faiss.METRIC_INNER_PRODUCT


def _set_search_defaults(index) -> None:
    """Search parameters for recall@10 >= 0.95-0.99 (benchmarks/index_bench.py); they are saved with the index."""
    import faiss

    for part in _parts(index):
        if isinstance(part, faiss.IndexHNSW):
            part.hnsw.efSearch = HNSW_EF_SEARCH
        elif isinstance(part, faiss.IndexIVF):
            part.nprobe = min(part.nlist, max(IVF_NPROBE, part.nlist // 32))
            quantizer = faiss.downcast_index(part.quantizer)
            if isinstance(quantizer, faiss.IndexHNSW):
                quantizer.hnsw.efSearch = max(HNSW_EF_SEARCH, 2 * part.nprobe)
        elif isinstance(part, faiss.IndexRefine):
            part.k_factor = 4


def _set_runtime_parameters(index) -> None:
    """What FAISS does not save: IVF searches one query with all threads, over its lists (the default splits the
    queries of a batch between threads, which leaves all but one idle for a single query)."""
    import faiss

    for part in _parts(index):
        if isinstance(part, faiss.IndexIVF):
            part.parallel_mode = 1


def _parts(index):
    """The index and the indexes it wraps (pre-transforms, refinement), outermost first."""
    import faiss

    index = faiss.downcast_index(index)
    yield index
    if isinstance(index, faiss.IndexPreTransform):
        yield from _parts(index.index)
    elif isinstance(index, faiss.IndexRefine):
        yield from _parts(index.base_index)


def _describe(index) -> str:
    return type(_first(index)).__name__


def _first(index):
    return next(iter(_parts(index)))


def _faiss_message(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return next((line for line in lines if line.startswith("Error")), lines[-1] if lines else type(exc).__name__)


class TorchFlat:
    """Exact top-k as one matrix product on a torch device (a GPU): what FAISS' flat search does on the CPU.

    Used for exact indexes when ``device`` is CUDA; it runs on any torch device, which is how it is tested here.
    """

    def __init__(self, vectors: np.ndarray, metric: str, device: str):
        import torch

        self.metric = metric
        self.device = device
        self.x = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32)).to(device)
        self.sq = (self.x * self.x).sum(dim=1) if metric == METRIC_L2 else None

    def search(self, queries: np.ndarray, k: int, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows) as FAISS gives them: inner products for cosine, squared distances for l2; over the given
        ``rows`` only when there are some."""
        import torch

        with torch.inference_mode():
            q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32)).to(self.device)
            x, sq, chosen = self.x, self.sq, None
            if rows is not None:
                chosen = torch.from_numpy(np.asarray(rows, dtype=np.int64)).to(self.device)
                x = x.index_select(0, chosen)
                sq = sq.index_select(0, chosen) if sq is not None else None
            sims = q @ x.T
            if self.metric == METRIC_L2:
                dist = ((q * q).sum(dim=1, keepdim=True) + sq[None, :] - 2 * sims).clamp_(min=0)
                scores, found = dist.topk(k, dim=1, largest=False)
            else:
                scores, found = sims.topk(k, dim=1)
            if chosen is not None:
                found = chosen[found]
            return scores.cpu().numpy(), found.cpu().numpy().astype(np.int64)
