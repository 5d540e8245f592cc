"""A million seeded clustered vectors (2048-d, as a ResNet50 index stores them): build time, memory per vector,
single-query latency and recall@10 against exact search, for the index `auto` picks at that size (and any
other factory strings given). The vectors are made chunk by chunk and never held as one fp32 array; exact
search for the recall is done the same way. Not part of `make bench` (it takes a while): `make bench-1m`.

    python benchmarks/bench_1m.py [--n 1000000] [--dim 2048] [--indexes auto "HNSW32,SQ8"]
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np

from common import (
    clustered_queries,
    clustered_vectors,
    exact_topk,
    latencies_ms,
    print_table,
    recall_at_k,
    write_results,
)
from lookalike.stores.faiss_index import VectorIndex, choose_index


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--indexes", nargs="+", default=["auto"])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    log = logging.getLogger("bench_1m")

    n, dim = args.n, args.dim
    queries = clustered_queries(args.queries, dim, seed=0, query_seed=1)
    start = time.perf_counter()
    truth = exact_topk(clustered_vectors(n, dim, seed=0), queries, 10)
    exact_s = time.perf_counter() - start
    log.info("exact top-10 of %d queries over %d x %d: %.1fs", len(queries), n, dim, exact_s)
    flat_bytes = n * dim * 4
    rows = []
    for label in args.indexes:
        factory = choose_index(n, dim, label)
        log.info("building %s (%s)", label, factory)
        start = time.perf_counter()
        try:
            index = build_in_chunks(factory, n, dim)
        except ValueError as exc:  # a factory string FAISS refuses: say so, go on with the others
            log.error("%s: %s", label, exc)
            continue
        build_s = time.perf_counter() - start
        size = index.nbytes()
        search = index.search
        lat = latencies_ms(lambda q, search=search: search(q[None, :], 10), queries)
        found = search(queries, 10)[1]
        row = {
            "index": label,
            "factory": factory,
            "n": n,
            "dim": dim,
            "build_s": build_s,
            "bytes_per_vector": size / n,
            "memory_vs_flat_fp32": size / flat_bytes,
            "gb": size / 1e9,
            "p50_ms": lat["p50_ms"],
            "p90_ms": lat["p90_ms"],
            "recall@10": recall_at_k(found, truth, 10),
            "exact_numpy_s_per_query": exact_s / len(queries),
        }
        rows.append(row)
        log.info("%s", row)
        del index
    print_table(
        rows,
        ["index", "factory", "build_s", "bytes_per_vector", "memory_vs_flat_fp32", "p50_ms", "p90_ms", "recall@10"],
        f"{n:,} x {dim} clustered vectors",
    )
    print(f"\nwrote {write_results('index_1m', {'results': rows}, args.json)}")


def build_in_chunks(factory: str, n: int, dim: int) -> VectorIndex:
    """Train on the first chunks (up to TRAIN_MAX vectors), then add chunk by chunk."""
    from lookalike.stores.faiss_index import TRAIN_MAX

    chunks = clustered_vectors(n, dim, seed=0)
    first: list[np.ndarray] = []
    while sum(len(c) for c in first) < min(TRAIN_MAX, n):
        first.append(next(chunks))
    train = np.concatenate(first)
    index = VectorIndex.build(train, "cosine", index_type=factory)
    for chunk in chunks:
        index.add(chunk)
    return index


if __name__ == "__main__":
    main()
