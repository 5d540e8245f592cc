"""Search speed against the seed's exact IndexFlatIP, in the same run.

1. Index only, on seeded clustered vectors (10k x 2048 by default): for each index choice, the build time,
   bytes per vector, single-query latency (p50/p90), batch throughput and recall@10 against exact search.
2. End to end, one query: JPEG bytes -> product results through ImageSearchEngine.search, on an index of real
   photos, for each model and runtime; the seed's pipeline (extraction of one image + IndexFlatIP) beside it.

    python benchmarks/search_bench.py [--n 10000] [--dim 2048] [--skip-e2e] [--e2e-models efficientnet_lite0 resnet50]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path

import numpy as np

from common import (
    SeedPipeline,
    clustered_queries,
    clustered_vectors,
    exact_topk,
    grocery_photos,
    latencies_ms,
    print_table,
    recall_at_k,
    timed,
    write_results,
)
from lookalike import ImageSearchEngine, Settings
from lookalike.stores.faiss_index import VectorIndex, choose_index

INDEX_CHOICES = [
    "Flat",
    "SQfp16",
    "SQ8",
    "HNSW32,Flat",
    "HNSW32,SQfp16",
    "HNSW32,SQ8",
    "HR128,SQ8",
    "IVF256,SQ8",
    "auto",
]
E2E = {
    "efficientnet_lite0": [("torch fp32", {}), ("openvino fp32", {"runtime": "openvino"}),
                           ("openvino int8", {"runtime": "openvino", "precision": "int8"})],
    "resnet50": [("torch fp32", {}), ("openvino fp32", {"runtime": "openvino"}),
                 ("openvino int8", {"runtime": "openvino", "precision": "int8"})],
}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--dims", type=int, nargs="+", default=[2048, 1280], help="2048: resnet50, 1280: the Lite/B0")
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--indexes", nargs="+", default=INDEX_CHOICES)
    parser.add_argument("--skip-e2e", action="store_true")
    parser.add_argument("--e2e-models", nargs="+", default=list(E2E))
    parser.add_argument("--e2e-products", type=int, default=4, help="grocery products in the end-to-end index")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    index_rows = []
    for dim in args.dims:
        rows = bench_indexes(args.n, dim, args.queries, args.indexes)
        print_table(
            rows,
            ["index", "factory", "build_s", "bytes_per_vector", "mb", "p50_ms", "p90_ms", "batch_qps", "recall@10",
             "p50_ratio_to_seed"],
            f"index only: {args.n} x {dim} clustered vectors, one query at a time (and 1000 at once)",
        )  # fmt: skip
        index_rows += rows
    e2e_rows = [] if args.skip_e2e else bench_e2e(args.e2e_models, args.e2e_products)
    if e2e_rows:
        print_table(
            e2e_rows,
            ["model", "setting", "catalog_images", "p50_ms", "p90_ms", "ratio_to_seed"],
            "end to end: JPEG bytes -> product results (ImageSearchEngine.search), one query at a time",
        )
    payload = {"n": args.n, "dims": args.dims, "index": index_rows, "end_to_end": e2e_rows}
    print(f"\nwrote {write_results('search', payload, args.json)}")


def bench_indexes(n: int, dim: int, n_queries: int, choices: list[str]) -> list[dict]:
    database = np.concatenate(list(clustered_vectors(n, dim, seed=0)))
    queries = clustered_queries(n_queries, dim, seed=0, query_seed=1)
    batch = clustered_queries(1000, dim, seed=0, query_seed=2)
    truth = exact_topk([database], queries, 10)
    rows = []
    seed_p50 = None
    for label in ["seed IndexFlatIP", *choices]:
        if label == "seed IndexFlatIP":
            build_s, index = timed(lambda: SeedPipeline.index(database))
            search = index.search
            size = len(__import__("faiss").serialize_index(index))
            factory = "IndexFlatIP"
        else:
            build_s, vindex = timed(lambda label=label: VectorIndex.build(database, "cosine", index_type=label))
            search = vindex.search  # everything the engine's index does per query (normalise, rotate, search)
            size = vindex.nbytes()
            factory = choose_index(n, dim, label) if label == "auto" else label
        lat = latencies_ms(lambda q, search=search: search(q[None, :], 10), queries)
        found = search(queries, 10)[1]
        batch_s, _ = timed(lambda search=search: search(batch, 10))
        if seed_p50 is None:
            seed_p50 = lat["p50_ms"]
        rows.append(
            {
                "index": label,
                "dim": dim,
                "factory": factory,
                "build_s": build_s,
                "bytes": size,
                "bytes_per_vector": size / n,
                "mb": size / 1e6,
                "p50_ms": lat["p50_ms"],
                "p90_ms": lat["p90_ms"],
                "batch_qps": len(batch) / batch_s,
                "recall@10": recall_at_k(found, truth, 10),
                "p50_ratio_to_seed": seed_p50 / lat["p50_ms"],  # how many times faster than the seed
            }
        )
    return rows


def bench_e2e(models: list[str], n_products: int) -> list[dict]:
    catalog = grocery_photos("catalog")
    products = sorted({p.parent.name for p in catalog})[:: max(1, 81 // n_products)][:n_products]
    photos = [p for p in catalog if p.parent.name in products]
    queries = grocery_photos("queries", every=6)[:40]
    query_bytes = [q.read_bytes() for q in queries]
    rows = []
    with tempfile.TemporaryDirectory(prefix="lookalike-e2e-") as tmp:
        root = Path(tmp) / "catalog"
        for p in photos:  # links, never copies of the photos
            (root / p.parent.name).mkdir(parents=True, exist_ok=True)
            (root / p.parent.name / p.name).symlink_to(p)
        for model in models:
            pretrained = model.startswith("efficientnet_lite")
            seed = SeedPipeline(model)
            seed_index = SeedPipeline.index(seed.extract([str(p) for p in photos]))

            def seed_search(data: bytes, seed=seed, seed_index=seed_index) -> None:
                v = seed.extract([data])
                seed_index.search(v / np.linalg.norm(v, axis=1, keepdims=True), 40)

            measured = {"seed pipeline": seed_search}
            for label, overrides in E2E.get(model, []):
                settings = Settings(
                    config_file=None,
                    environ={},
                    model_name=model,
                    pretrained=pretrained,
                    data_dir=root,
                    cache_dir=Path(tmp) / f"cache-{model}-{label.replace(' ', '-')}",
                    **overrides,
                )
                engine = ImageSearchEngine(settings)
                engine.build_index(progress=False)
                measured[label] = lambda data, engine=engine: engine.search(data, top_k=5)
            # Interleaved in two halves, so drifting load hits every setting alike.
            half = len(query_bytes) // 2
            parts: dict[str, list[dict]] = {label: [] for label in measured}
            for chunk in (query_bytes[:half], query_bytes[half:]):
                for label, fn in measured.items():
                    parts[label].append(latencies_ms(fn, chunk, warmup=2))
            seed_p50 = np.mean([p["p50_ms"] for p in parts["seed pipeline"]])
            for label, halves in parts.items():
                p50 = float(np.mean([p["p50_ms"] for p in halves]))
                rows.append(
                    {
                        "model": model,
                        "setting": label,
                        "catalog_images": len(photos),
                        "p50_ms": p50,
                        "p90_ms": float(np.mean([p["p90_ms"] for p in halves])),
                        "ratio_to_seed": seed_p50 / p50,
                    }
                )
    return rows


if __name__ == "__main__":
    main()
