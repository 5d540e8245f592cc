"""The store contract against Milvus Lite (embedded, in every run) and a real Milvus server process (marked).

The server is the PyPI ``milvus`` 2.3.5 embedded standalone build in its own virtual environment
(``make milvus-server-venv``); ``LOOKALIKE_TEST_MILVUS_URI`` points the tests at an already running server
instead. Milvus 2.3 has no grouped search, so the server run also covers the client-side grouping path.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from store_contract import DIM, StoreContract, clustered

pytest.importorskip("pymilvus", reason="pymilvus is not installed (pip install 'lookalike[scale]')")
pytest.importorskip("milvus_lite", reason="milvus-lite is not installed (pip install 'lookalike[scale]')")

from lookalike.stores.base import StoreError, StoreMismatchError  # noqa: E402
from lookalike.stores.milvus import MilvusStore  # noqa: E402
from lookalike.stores.milvus_support import milvus_index, native_grouping, public_uri, quote  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


class TestMilvusLite(StoreContract):
    @pytest.fixture(scope="class")
    @classmethod
    def make_store(cls, tmp_path_factory):
        uri = str(tmp_path_factory.mktemp("milvus") / "contract.db")
        return lambda name, *, metric="cosine", dim=DIM: MilvusStore(uri, name, metric=metric, dim=dim)


@pytest.fixture(scope="module")
def lite_uri(tmp_path_factory):
    return str(tmp_path_factory.mktemp("milvus_extra") / "extra.db")


def test_quote_escapes_quotes_and_backslashes():
    assert quote('a"b\\c') == '"a\\"b\\\\c"'
    assert quote("é中") == '"é中"'
    with pytest.raises(ValueError, match="U\\+000A"):
        quote("a\nb")


def test_index_choice_by_size():
    assert milvus_index("auto", 9_999, 10_000) == "FLAT"
    assert milvus_index("auto", 10_000, 10_000) == "HNSW"
    assert milvus_index("HR128,HNSW32,SQ8", 0, 10) == "HNSW"
    assert milvus_index("ivf_sq8", 0, 10) == "IVF_SQ8"
    assert milvus_index("Flat", 10**6, 10) == "FLAT"
    with pytest.raises(ValueError, match="no Milvus equivalent"):
        milvus_index("LSH", 0, 10)


def test_grouping_support_by_version():
    assert native_grouping("milvus_lite-3.2.2")
    assert native_grouping("v2.5.4") and native_grouping("2.6.0")
    assert not native_grouping("v2.3.5-lite") and not native_grouping("v2.4.9")


def test_public_uri_hides_credentials():
    assert public_uri("http://root:secret@db:19530") == "http://db:19530"
    assert public_uri("/data/m.db") == "/data/m.db"


def test_auto_index_switches_to_hnsw_past_exact_below(lite_uri):
    ids, vectors, fields = clustered(60, 6, seed=11)
    with MilvusStore(lite_uri, "growing", dim=DIM, exact_below=50) as store:
        store.upsert(ids[:40], vectors[:40], fields[:40])
        assert store.describe().index_type == "FLAT"
        store.upsert(ids[40:], vectors[40:], fields[40:])
        assert store.describe().index_type == "HNSW"
        assert store.search(vectors[45:46], 1)[0][0].image_id == ids[45]
    with MilvusStore(lite_uri, "rebuilt", dim=DIM, exact_below=50) as store:
        store.replace_all(ids, vectors, fields)
        assert store.describe().index_type == "HNSW"
        store.replace_all(ids[:10], vectors[:10], fields[:10])
        assert store.describe().index_type == "FLAT" and store.count() == 10


def test_client_side_grouping_widens_until_k_products(lite_uri):
    """One product owns the 300 images nearest the query: the first over-fetch sees only it and must widen."""
    rng = np.random.default_rng(12)
    query = rng.normal(size=DIM).astype(np.float32)
    near = query + 0.01 * rng.normal(size=(300, DIM))
    far = rng.normal(size=(40, DIM)) - 2 * query
    vectors = np.vstack([near, far]).astype(np.float32)
    ids = [f"i{i}" for i in range(len(vectors))]
    fields = [{"product_id": "big" if i < 300 else f"p{i % 4}", "path": f"{i}.jpg", "format": "JPEG"}
              for i in range(len(vectors))]  # fmt: skip
    scores = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)) @ (query / np.linalg.norm(query))
    native = MilvusStore(lite_uri, "widen", dim=DIM)
    native.upsert(ids, vectors, fields)
    client = MilvusStore(lite_uri, "widen", grouping="client")
    assert native.native_grouping and not client.native_grouping
    for k, size in [(3, 1), (5, 2), (10, 3)]:
        best: dict[str, list[int]] = {}
        for row in np.argsort(-scores):
            best.setdefault(fields[row]["product_id"], []).append(row)
        want = [ids[row] for product in list(best)[:k] for row in best[product][:size]]
        for store in (client, native):  # native: Lite's own grouping comes back short, then the store widens
            got = store.search(query[None], k, group_by_product=True, group_size=size)[0]
            assert [h.image_id for h in got] == want
            assert len({h.product_id for h in got}) == min(k, 5)
    client.close()
    native.close()


def test_an_explicit_other_dimension_is_refused(lite_uri):
    with MilvusStore(lite_uri, "sized", dim=DIM):
        pass
    with pytest.raises(StoreMismatchError, match="another model"):
        MilvusStore(lite_uri, "sized", dim=DIM + 1)


def test_bad_names_are_refused(lite_uri):
    with pytest.raises(ValueError, match="collection"):
        MilvusStore(lite_uri, "bad-name", dim=DIM)
    with pytest.raises(ValueError, match=r"\.db"):
        MilvusStore(str(Path(lite_uri).parent / "folder"), "c", dim=DIM)


def test_unreachable_server_names_the_uri_not_the_token():
    with pytest.raises(StoreError) as caught:
        MilvusStore("http://127.0.0.1:9", "c", dim=DIM, token="s3cret-token", timeout=3)
    message = str(caught.value)
    assert "http://127.0.0.1:9" in message and "s3cret-token" not in message and "milvus-server" in message


# --- a real server process ----------------------------------------------------------------------------------
@pytest.mark.milvus_server
class TestMilvusServer(StoreContract):
    @pytest.fixture(scope="class")
    @classmethod
    def make_store(cls, server_uri):
        prefix = f"t{os.getpid()}_"
        return lambda name, *, metric="cosine", dim=DIM: MilvusStore(
            server_uri, prefix + name, metric=metric, dim=dim, token=os.environ.get("LOOKALIKE_MILVUS_TOKEN")
        )


@pytest.mark.milvus_server
def test_server_groups_on_the_client_and_another_process_sees_writes(server_uri):
    """Milvus 2.3 has no grouped search (fallback path); a write from another process is visible at once."""
    ids, vectors, fields = clustered(50, 5, seed=13)
    name = f"t{os.getpid()}_procs"
    store = MilvusStore(server_uri, name, dim=DIM)
    store.upsert(ids, vectors, fields)
    if store.server_version.startswith("v2.3"):
        assert not store.native_grouping
    code = (
        "import sys, numpy as np; from lookalike.stores.milvus import MilvusStore\n"
        f"s = MilvusStore({server_uri!r}, {name!r})\n"
        "row = {'product_id': 'added', 'path': 'n.jpg', 'format': 'PNG'}\n"
        "s.upsert(['new'], np.ones((1, s.dim), np.float32), [row])\n"
        "print(s.delete(product_id='p001'))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "10"
    assert store.refresh()
    assert store.fetch(["new"])["new"]["product_id"] == "added"
    assert "p001" not in store.product_counts() and store.count() == 41
    hits = store.search(np.ones((1, DIM), np.float32), 3, group_by_product=True, group_size=2)[0]
    assert hits[0].product_id == "added" and len({h.product_id for h in hits}) == 3
    store._client.drop_collection(name)
    store._client.drop_collection(name + "__manifest")
    store.close()
