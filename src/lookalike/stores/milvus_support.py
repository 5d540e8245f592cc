"""Helpers of the Milvus store: expression literals, index choice, search parameters, server capabilities,
collection schemas, manifest rows and connection errors.

Kept apart from :mod:`lookalike.stores.milvus` so most can be tested without a Milvus, and so the store module
stays readable. Imports pymilvus only inside the two functions that create collections.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from .base import StoreError, StoreHit

MAX_ID = 512  # image ids are 16 hex characters; room for callers with their own ids
MAX_PRODUCT = 1024  # bytes: lookalike.ids allows 180 bytes of UTF-8; other callers get more room
MAX_PATH = 4096
MAX_TOPK = 16384  # Milvus' limit on ``limit`` (and offset + limit) per search / query
CHUNK = 60_000  # characters of manifest JSON per row (VARCHAR holds at most 65,535 bytes)
BATCH = 2000  # rows per upsert request (2,000 x 1280-d fp32 = 10 MB, well under gRPC's 64 MB)
MILVUS_INDEXES = ("FLAT", "HNSW", "HNSW_SQ", "IVF_FLAT", "IVF_SQ8", "IVF_PQ", "DISKANN", "AUTOINDEX")
HNSW_BUILD = {"M": 32, "efConstruction": 200}
HNSW_SEARCH = {"ef": 128}
FIELDS = ("product_id", "path", "format", "extra")


def quote(value: str) -> str:
    """``value`` as a string literal of Milvus' expression language (quotes and backslashes escaped)."""
    if not isinstance(value, str):
        raise TypeError(f"a Milvus string literal needs a str, got {type(value).__name__}")
    bad = next((ch for ch in value if ord(ch) < 32 or ord(ch) == 127), None)
    if bad is not None:
        raise ValueError(f"{value!r} holds the control character U+{ord(bad):04X}, which Milvus filters cannot carry")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def in_list(field: str, values: Sequence[str]) -> str:
    return f"{field} in [{', '.join(quote(v) for v in values)}]"


def public_uri(uri: str) -> str:
    """The uri without user:password, for messages and :class:`StoreInfo`."""
    parts = urlsplit(uri)
    if parts.scheme and "@" in parts.netloc:
        return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))
    return uri


def is_lite(uri: str) -> bool:
    return "://" not in uri


def milvus_index(index_type: str, count: int, exact_below: int) -> str:
    """Milvus' index type for lookalike's ``index_type`` setting: ``auto`` is FLAT (exact) under ``exact_below``
    images and HNSW above; Milvus names pass through; a FAISS factory string maps to its family."""
    name = (index_type or "auto").strip()
    if name.lower() == "auto":
        return "FLAT" if count < exact_below else "HNSW"
    if name.upper() in MILVUS_INDEXES:
        return name.upper()
    if name.lower() == "flat":
        return "FLAT"
    if "HNSW" in name.upper():
        return "HNSW"
    if name.upper().startswith("IVF") or ",IVF" in name.upper():
        return "IVF_SQ8" if "SQ8" in name.upper() else "IVF_FLAT"
    raise ValueError(
        f"index_type={index_type!r} has no Milvus equivalent; use auto or one of {', '.join(MILVUS_INDEXES)}"
    )


def index_params(kind: str, count: int) -> dict[str, Any]:
    if kind in ("HNSW", "HNSW_SQ"):
        return dict(HNSW_BUILD)
    if kind.startswith("IVF"):
        nlist = int(min(65536, max(16, 4 * np.sqrt(max(count, 1)))))
        return {"nlist": nlist, **({"m": 16, "nbits": 8} if kind == "IVF_PQ" else {})}
    return {}


def search_params(kind: str, metric: str, limit: int, index_params: Mapping[str, Any]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    if kind in ("HNSW", "HNSW_SQ"):
        params["ef"] = max(HNSW_SEARCH["ef"], limit)
    elif kind.startswith("IVF"):
        params["nprobe"] = max(16, int(index_params.get("nlist", 64)) // 8)
    return {"metric_type": metric, "params": params}


def native_grouping(version: str) -> bool:
    """Whether the server groups search hits itself: Milvus Lite and servers from 2.5 do; 2.3/2.4 do not
    (2.3 silently ignores ``group_by_field``, so a probe cannot tell)."""
    if "lite" in version and not version.startswith("v2."):
        return True
    found = re.search(r"(\d+)\.(\d+)", version)
    return bool(found) and (int(found.group(1)), int(found.group(2))) >= (2, 5)


CONSISTENCY = ("Strong", "Session", "Bounded", "Eventually")


def check_options(collection: str, *, metric: str, consistency: str, grouping: str) -> None:
    """ValueError naming the option when one of MilvusStore's arguments cannot work."""
    if metric not in ("cosine", "l2"):
        raise ValueError(f"metric={metric!r} is not allowed: expected cosine or l2")
    if consistency not in CONSISTENCY:
        raise ValueError(f"consistency={consistency!r} is not allowed: expected one of {', '.join(CONSISTENCY)}")
    if grouping not in ("auto", "native", "client"):
        raise ValueError(f"grouping={grouping!r} is not allowed: expected auto, native or client")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,200}", collection or ""):
        raise ValueError(f"collection={collection!r}: Milvus wants letters, digits and '_', not starting with a digit")


def to_hit(raw: Mapping[str, Any], metric: str) -> StoreHit:
    """A Milvus search hit as a StoreHit: l2 distances come squared from Milvus; score is lookalike's similarity."""
    entity = raw.get("entity", {})
    value = float(raw["distance"])
    distance = float(np.sqrt(max(value, 0.0))) if metric == "l2" else None
    score = 1.0 / (1.0 + distance) if distance is not None else value
    extra = dict(entity.get("extra") or {})
    extra["format"] = entity.get("format", "")
    return StoreHit(str(raw["id"]), entity.get("product_id", ""), score, entity.get("path", ""), distance, extra)


def order_groups(hits: list[StoreHit], k: int, group_size: int) -> list[StoreHit]:
    """Best ``k`` products (by their best image), up to ``group_size`` images each, product by product."""
    groups: dict[str, list[StoreHit]] = {}
    for hit in sorted(hits, key=lambda h: -h.score):
        members = groups.setdefault(hit.product_id, [])
        if len(members) < group_size:
            members.append(hit)
    return [h for members in list(groups.values())[:k] for h in members]


def create_vector_collection(client, name: str, dim: int, kind: str, metric: str, params: Mapping[str, Any]) -> None:
    """Create the image collection: id, vector, product_id, path, format, extra (JSON), with its vector index."""
    from pymilvus import DataType, MilvusClient

    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=MAX_ID)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
    schema.add_field("product_id", DataType.VARCHAR, max_length=MAX_PRODUCT)
    schema.add_field("path", DataType.VARCHAR, max_length=MAX_PATH)
    schema.add_field("format", DataType.VARCHAR, max_length=64)
    schema.add_field("extra", DataType.JSON)
    schema.add_field("record", DataType.JSON)  # the product's record ({} without one), for filters
    index = client.prepare_index_params()
    index.add_index("vector", index_type=kind, metric_type=metric, params=dict(params))
    client.create_collection(name, schema=schema, index_params=index, consistency_level="Strong")


def ensure_manifest_collection(client, name: str) -> None:
    """Load the manifest/generation collection, creating it first if missing."""
    from pymilvus import DataType, MilvusClient

    if client.has_collection(name):
        client.load_collection(name)
        return
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("key", DataType.VARCHAR, is_primary=True, max_length=64)
    schema.add_field("data", DataType.VARCHAR, max_length=65535)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=2)  # Milvus 2.3 wants a vector field in every collection
    index = client.prepare_index_params()
    index.add_index("vector", index_type="FLAT", metric_type="L2")
    client.create_collection(name, schema=schema, index_params=index, consistency_level="Strong")


def manifest_rows(manifest: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The manifest as rows of the manifest collection: ``manifest:1..n`` hold the JSON text in chunks,
    ``manifest:0`` (last) says how many."""
    text = json.dumps(dict(manifest), sort_keys=True, ensure_ascii=False)
    chunks = [text[i : i + CHUNK // 4] for i in range(0, len(text), CHUNK // 4)] or [""]  # 4 bytes/char at most
    rows = [{"key": f"manifest:{i}", "data": c, "vector": [0.0, 0.0]} for i, c in enumerate(chunks, 1)]
    rows.append({"key": "manifest:0", "data": json.dumps({"chunks": len(chunks)}), "vector": [0.0, 0.0]})
    return rows


def records_rows(records: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The product records table as rows of the manifest collection: ``records:1..n`` hold canonical JSON in
    chunks, ``records:0`` (written last) the number of chunks and the table's checksum."""
    import hashlib

    table = [dict(records[p], product_id=p) for p in sorted(records)]
    text = json.dumps(table, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    chunks = [text[i : i + CHUNK // 4] for i in range(0, len(text), CHUNK // 4)] or [""]
    rows = [{"key": f"records:{i}", "data": c, "vector": [0.0, 0.0]} for i, c in enumerate(chunks, 1)]
    head = json.dumps({"chunks": len(chunks), "sha256": digest})
    rows.append({"key": "records:0", "data": head, "vector": [0.0, 0.0]})
    return rows


def join_records(rows: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """The records table from the ``records:*`` rows :func:`records_rows` wrote (ValueError when damaged)."""
    import hashlib

    head = json.loads(rows["records:0"])
    text = "".join(rows.get(f"records:{i}", "") for i in range(1, int(head["chunks"]) + 1))
    if hashlib.sha256(text.encode("utf-8")).hexdigest() != head.get("sha256"):
        raise ValueError("the records rows do not match their checksum")
    return {str(r["product_id"]): dict(r) for r in json.loads(text)}


def join_manifest(rows: Mapping[str, str]) -> str:
    """The manifest's JSON text from the ``manifest:*`` rows (key -> data) :func:`manifest_rows` wrote."""
    head = json.loads(rows["manifest:0"])
    return "".join(rows.get(f"manifest:{i}", "") for i in range(1, int(head["chunks"]) + 1))


def unreachable_error(exc: BaseException, uri: str, location: str, token: str | None) -> StoreError:
    """The error for a Milvus that cannot be opened or reached, naming ``location`` and never the token."""
    reason = str(exc)
    for secret in filter(None, (token, uri if uri != location else None)):
        reason = reason.replace(secret, "***")
    if is_lite(uri):
        cause = exc.__cause__ or exc.__context__
        detail = f"{reason} ({cause})" if cause else reason
        return StoreError(
            f"cannot open the Milvus Lite file {location}: {detail}. Milvus Lite allows one process at a "
            "time per file; stop the other process or use a Milvus server (milvus_uri: http://host:19530)"
        )
    return StoreError(
        f"cannot reach Milvus at {location}: {reason}. Start the server (docs/scaling.md, make "
        "milvus-server) or fix milvus_uri; set LOOKALIKE_MILVUS_TOKEN if the server requires authentication"
    )


def server_answers(uri: str, timeout: float = 3.0) -> bool:
    """Whether a Milvus server answers at ``uri`` (tests and benchmarks wait for one with this)."""
    from pymilvus import MilvusClient

    try:
        MilvusClient(uri=uri, timeout=timeout).get_server_version()
        return True
    except Exception:  # noqa: BLE001 - any failure means "not (yet) there"
        return False
