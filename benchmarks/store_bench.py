"""Search latency and insert rate of Milvus Lite and a Milvus server against FAISS, same vectors, same run.

    python benchmarks/store_bench.py [--sizes 10000 100000] [--server-uri http://127.0.0.1:19530]

Seeded clustered vectors of EfficientNet-Lite0's dimension (1280; ``common.clustered_vectors``), 200 queries of new
photos of catalog products, k=10. Every backend gets an exact index (FAISS ``IndexFlatIP``, Milvus ``FLAT``) and
an HNSW one with the same build parameters (M=32, efConstruction=200; FAISS efSearch = Milvus ef = 128).

FAISS is driven directly (``lookalike.stores.faiss`` was not on main when this was written): it is the floor —
an in-process index with no row dictionaries, no ids and no RPC. Milvus goes through ``lookalike.stores.milvus``
(what the engine uses): insert = ``MilvusStore.upsert`` of ids, vectors and fields in batches of 2,000, until the
call returns (Strong consistency: searchable); "indexed" adds the wait until the server reports every row in
the vector index. Search = one ``MilvusStore.search`` call per query (k=10), p50 over the 200 queries.

The server is the PyPI ``milvus`` 2.3.5 embedded standalone (``make milvus-server``) at ``--server-uri``; the
server row is left out, with a note, when nothing answers there. JSON in results/bench/store.json.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from common import (
    clustered_queries,
    clustered_vectors,
    exact_topk,
    print_table,
    recall_at_k,
    write_results,
)
from lookalike.stores.milvus_support import server_answers as _reachable

DIM = 1280
K = 10
HNSW_M, HNSW_EFC, HNSW_EF = 32, 200, 128


@dataclass
class Entry:
    """One built index: its figures so far, and the search calls to time (figure name -> one-query call)."""

    row: dict
    searches: dict[str, Callable[[np.ndarray], Any]]
    close: Callable[[], None] = lambda: None


def faiss_entries(vectors: np.ndarray, queries: np.ndarray, truth: np.ndarray) -> list[Entry]:
    import faiss

    entries = []
    for name, make in [
        ("FLAT", lambda: faiss.IndexFlatIP(DIM)),
        ("HNSW", lambda: faiss.IndexHNSWFlat(DIM, HNSW_M, faiss.METRIC_INNER_PRODUCT)),
    ]:
        index = make()
        if name == "HNSW":
            index.hnsw.efConstruction = HNSW_EFC
            index.hnsw.efSearch = HNSW_EF
        start = time.perf_counter()
        index.add(vectors)
        insert_s = time.perf_counter() - start
        found = index.search(queries, K)[1]
        row = _row("faiss", name, len(vectors), insert_s, insert_s, recall_at_k(found, truth, K))
        entries.append(Entry(row, {"p50_ms": lambda q, ix=index: ix.search(q[None], K)}))
    return entries


def milvus_entries(backend: str, uri: str, vectors: np.ndarray, queries: np.ndarray, truth: np.ndarray) -> list[Entry]:
    from lookalike.stores.milvus import MilvusStore

    entries = []
    n = len(vectors)
    ids = [f"{i:08d}" for i in range(n)]
    fields = [{"product_id": f"p{i // 20}", "path": f"p{i // 20}/{i}.jpg", "format": "JPEG"} for i in range(n)]
    for kind in ("FLAT", "HNSW"):
        name = f"bench_{kind.lower()}_{n}"
        store = MilvusStore(uri, name, dim=DIM, index_type=kind)
        if store.count():
            _drop(store)
            store = MilvusStore(uri, name, dim=DIM, index_type=kind)
        start = time.perf_counter()
        store.upsert(ids, vectors, fields)
        insert_s = time.perf_counter() - start
        indexed_s = insert_s + _wait_indexed(store, n)
        results = store.search(queries, K)
        found = np.array([[int(h.image_id) for h in hits] + [-1] * (K - len(hits)) for hits in results])
        bounded = MilvusStore(uri, name, consistency="Bounded")
        row = _row(backend, kind, n, insert_s, indexed_s, recall_at_k(found, truth, K))
        searches = {
            "p50_ms": lambda q, s=store: s.search(q[None], K),
            "bounded_p50_ms": lambda q, s=bounded: s.search(q[None], K),
        }
        entries.append(Entry(row, searches, lambda s=store, b=bounded: (b.close(), _drop(s))))
    return entries


def _drop(store) -> None:
    store._client.drop_collection(store.collection)
    store._client.drop_collection(store.manifest_collection)
    store.close()


def time_interleaved(entries: list[Entry], queries: np.ndarray, warmup: int = 3) -> None:
    """p50 / p90 of every search call, the calls taking turns query by query, so that a shared machine's
    changing load falls on every backend alike."""
    times: dict[tuple[int, str], list[float]] = {}
    for i, q in enumerate(queries):
        for e, entry in enumerate(entries):
            for key, search in entry.searches.items():
                start = time.perf_counter()
                search(q)
                if i >= warmup:
                    times.setdefault((e, key), []).append((time.perf_counter() - start) * 1000)
    for (e, key), values in times.items():
        entries[e].row[key] = float(np.median(values))
        if key == "p50_ms":
            entries[e].row["p90_ms"] = float(np.percentile(values, 90))


def _wait_indexed(store, n: int, timeout: float = 1800) -> float:
    """Seconds until the server reports all ``n`` rows in the vector index (flushing first on a server)."""
    start = time.perf_counter()
    client = store._client
    with contextlib.suppress(Exception):  # Milvus Lite has nothing to flush
        client.flush(store.collection)
    while time.perf_counter() - start < timeout:
        info = client.describe_index(store.collection, "vector")
        if int(info.get("indexed_rows", n)) >= n and int(info.get("pending_index_rows", 0)) == 0:
            break
        time.sleep(0.5)
    return time.perf_counter() - start


def _row(backend: str, index: str, n: int, insert_s: float, indexed_s: float, recall: float) -> dict:
    return {
        "backend": backend,
        "index": index,
        "vectors": n,
        "insert_s": insert_s,
        "insert_per_s": n / insert_s,
        "indexed_s": indexed_s,
        "recall@10": recall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--server-uri", default="http://127.0.0.1:19530")
    parser.add_argument("--lite-db", default="../results/bench/store_bench.db")
    parser.add_argument("--backends", nargs="+", default=["faiss", "milvus-lite", "milvus-server"])
    args = parser.parse_args()

    notes = []
    server = "milvus-server" in args.backends and _reachable(args.server_uri)
    if "milvus-server" in args.backends and not server:
        notes.append(f"no Milvus server answered at {args.server_uri}: server rows left out (make milvus-server)")
    rows: list[dict] = []
    for n in args.sizes:
        vectors = np.concatenate(list(clustered_vectors(n, DIM, seed=0)))
        queries = clustered_queries(200, DIM, seed=0)
        truth = exact_topk([vectors], queries, K)
        entries: list[Entry] = []
        if "faiss" in args.backends:
            entries += faiss_entries(vectors, queries, truth)
        if "milvus-lite" in args.backends:
            entries += milvus_entries("milvus-lite", args.lite_db, vectors, queries, truth)
        if server:
            entries += milvus_entries("milvus-server", args.server_uri, vectors, queries, truth)
        time_interleaved(entries, queries)
        for entry in entries:
            entry.close()
        rows += [entry.row for entry in entries]
        del entries
        floor = {r["index"]: r for r in rows if r["backend"] == "faiss" and r["vectors"] == n}
        for r in rows:
            if r["vectors"] == n and r["index"] in floor:
                r["p50_x_faiss"] = r["p50_ms"] / floor[r["index"]]["p50_ms"]
                r["insert_x_faiss"] = floor[r["index"]]["insert_per_s"] / r["insert_per_s"]
        print_table(
            [r for r in rows if r["vectors"] == n],
            [
                "backend",
                "index",
                "vectors",
                "insert_per_s",
                "indexed_s",
                "p50_ms",
                "bounded_p50_ms",
                "recall@10",
                "p50_x_faiss",
            ],
            f"{n} vectors x {DIM}",
        )
    for note in notes:
        print(note)
    print(f"wrote {write_results('store', {'dim': DIM, 'k': K, 'notes': notes, 'results': rows})}")


if __name__ == "__main__":
    main()
