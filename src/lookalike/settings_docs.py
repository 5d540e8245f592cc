"""One line about each setting and its default in words (the CLI's ``--help`` and the README's table)."""

from __future__ import annotations

DESCRIPTIONS: dict[str, str] = {
    "device": "where the network runs: cpu, cuda, cuda:<n> or auto (a GPU when PyTorch sees one)",
    "img_size": "side of the square the model sees, in pixels",
    "batch_size": "images per network call while indexing",
    "embedding_dim": "length of the vectors; must agree with the model",
    "model_name": "the backbone network that turns photos into vectors",
    "similarity_metric": "cosine (angle between vectors) or l2 (distance)",
    "pooling": "center (centre-weighted, best on product photos) or avg (plain average)",
    "tune": "learn the catalog's products when it helps: true (a projection), finetune (the network too) or false",
    "data_dir": "the catalog folder: <data_dir>/<product_id>/<images>",
    "cache_dir": "where the index, its manifest, cached vectors and exported models are kept",
    "index_file": "base name of the index files: each build writes <stem>-<build id>.faiss beside it",
    "metadata_file": "the index's manifest: the build's settings, the image list, checksums",
    "weights_path": "a local checkpoint instead of the model's standard weights",
    "pretrained": "false: random weights (speed benchmarks only)",
    "num_workers": "image decoding threads beside the network",
    "runtime": "what runs the network: auto (OpenVINO, else ONNX Runtime, else torch), torch, onnx, openvino",
    "precision": "auto (fp16 on CUDA, fp32 elsewhere), fp32, fp16, bf16 or int8",
    "threads": "network threads (unset: every core, one while other work holds them; the server shares the cores)",
    "index_type": "auto (exact for small catalogs, approximate for large) or a FAISS factory string",
    "exact_below": "with index_type auto: catalogs smaller than this get exact search",
    "max_image_pixels": "larger images are refused (decompression bombs)",
    "host": "the address the server listens on (0.0.0.0: every interface)",
    "port": "the port the server listens on",
    "admin_token": "bearer token that allows catalog changes over HTTP (unset: disabled)",
    "max_upload_bytes": "larger request bodies are answered 413",
    "max_concurrent_searches": "searches the server runs at once",
    "search_queue_size": "searches that may wait for a slot; beyond that the server answers 503",
    # Settings that the store/executor work adds; described here so the CLI has a line for each.
    "store": "where vectors are kept: faiss (a file in cache_dir) or milvus",
    "milvus_uri": "the Milvus server or Milvus Lite file to use with store milvus",
    "collection": "the Milvus collection that holds this catalog",
    "executor": "what runs a large build: local or ray",
    "ray_address": "the Ray cluster to use with executor ray (default: a local one)",
}


def describe_setting(name: str) -> str:
    """One line about a setting, for ``--help`` and the README."""
    return DESCRIPTIONS.get(name, name.replace("_", " "))


# What an unset (None) default means, in words.
DEFAULT_TEXT = {
    "img_size": "the model's own",
    "embedding_dim": "the model's own",
    "index_file": "<cache_dir>/index.faiss",
    "metadata_file": "<cache_dir>/metadata.json",
    "threads": "one per core",
}


def default_text(name: str) -> str | None:
    """The default of a setting as a reader would write it (None: there is none)."""
    if name in DEFAULT_TEXT:
        return DEFAULT_TEXT[name]
    from .settings import settings_fields

    value = next((f.default for f in settings_fields() if f.name == name), None)
    if value is None:
        return None
    return str(value).lower() if isinstance(value, bool) else str(value)
