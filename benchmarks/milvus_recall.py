"""Recall@1 on the Grocery photos with the Milvus store (exact FLAT) against exact FAISS, on the same vectors.

    python benchmarks/milvus_recall.py [--server-uri http://127.0.0.1:19530]

Extracts the catalog and the query photos once (efficientnet_lite0, the default settings), indexes the catalog
vectors in FAISS ``IndexFlatIP`` and in ``MilvusStore`` (Milvus Lite, and the server when one answers), and
scores protocol 1 of ../shared/data/README.md: Recall@1 = the top image's product is the query's product; also
product hit@5 from the store's grouped search. This checks the store, not ``lookalike eval`` (whose evaluation
build is in memory): same vectors in, the same answers must come out. JSON in results/bench/milvus_recall.json.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from common import grocery_photos, print_table, write_results
from lookalike import Settings
from lookalike.embedding import FeatureExtractor
from lookalike.ids import image_id_for
from lookalike.stores.milvus_support import server_answers as _reachable


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server-uri", default="http://127.0.0.1:19530")
    args = parser.parse_args()

    import faiss

    from lookalike.stores.milvus import MilvusStore

    catalog, queries = grocery_photos("catalog"), grocery_photos("queries")
    extractor = FeatureExtractor(Settings(config_file=None, environ={}))
    cat, qry = extractor.extract(catalog), extractor.extract(queries)
    x = cat.vectors[:, : extractor.dim]
    q = qry.vectors[:, : extractor.dim]
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    paths = [catalog[i] for i in cat.ok]
    products = [p.parent.name for p in paths]
    truth = [queries[i].parent.name for i in qry.ok]
    index = faiss.IndexFlatIP(extractor.dim)
    index.add(x)
    top = index.search(q, 1)[1][:, 0]
    rows = [{"backend": "faiss FLAT", "recall@1": float(np.mean([products[t] == y for t, y in zip(top, truth)]))}]

    ids = [image_id_for(f"{p.parent.name}/{p.name}") for p in paths]
    fields = [{"product_id": p.parent.name, "path": f"{p.parent.name}/{p.name}", "format": "JPEG"} for p in paths]
    uris = {"milvus-lite FLAT": str(Path(tempfile.mkdtemp()) / "recall.db")}
    if _reachable(args.server_uri):
        uris["milvus-server FLAT"] = args.server_uri
    for name, uri in uris.items():
        store = MilvusStore(uri, "grocery_recall", dim=extractor.dim, index_type="FLAT")
        store.replace_all(ids, x, fields)
        first = [hits[0].product_id for hits in store.search(q, 1)]
        grouped = store.search(q, 5, group_by_product=True)
        hit5 = np.mean([y in {h.product_id for h in hits} for hits, y in zip(grouped, truth)])
        rows.append({"backend": name, "recall@1": float(np.mean([p == y for p, y in zip(first, truth)])),
                     "product_hit@5": float(hit5)})  # fmt: skip
        store._client.drop_collection(store.collection)
        store._client.drop_collection(store.manifest_collection)
        store.close()
    for row in rows:
        row["delta_vs_faiss"] = row["recall@1"] - rows[0]["recall@1"]
    print_table(rows, ["backend", "recall@1", "product_hit@5", "delta_vs_faiss"], "Grocery photo -> catalog")
    print(f"wrote {write_results('milvus_recall', {'catalog': len(paths), 'queries': len(truth), 'results': rows})}")


if __name__ == "__main__":
    main()
