"""The HTTP app: every endpoint, every error, the token rules, and no way from a request to a file outside the catalog.

Fast: the tiny random backbone over the synthetic catalog, the built engine injected into the app factory.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import warnings
import zlib
from pathlib import Path
from urllib.parse import unquote

import httpx
import pytest
from PIL import Image

from conftest import PRODUCTS, jpeg_bytes, product_image
from lookalike import ImageSearchEngine, Settings, SettingsError
from lookalike.cli import build_parser, main
from lookalike.server import create_app
from lookalike.server.gate import Overloaded, SearchGate

with warnings.catch_warnings():  # newer Starlette nudges towards httpx2; httpx is what FastAPI documents
    warnings.filterwarnings("ignore", message=".*httpx2", category=UserWarning)
    from fastapi.testclient import TestClient

TOKEN = "test-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
N_IMAGES = sum(PRODUCTS.values())
JPEG = {"content-type": "image/jpeg"}


# --- fixtures and helpers -------------------------------------------------------------------------------------


@pytest.fixture
def engine(make_settings, catalog) -> ImageSearchEngine:
    eng = ImageSearchEngine(make_settings(admin_token=TOKEN))
    eng.build_index()
    return eng


@pytest.fixture
def client(engine):
    with TestClient(create_app(engine=engine)) as c:
        yield c


def query(look: int = 0) -> bytes:
    """A held-out view (never indexed) of product ``look`` of PRODUCTS, as JPEG bytes."""
    return jpeg_bytes(product_image(look, 50))


def upload(data: bytes, name: str = "photo.jpg", ctype: str = "image/jpeg") -> dict:
    return {"image": (name, data, ctype)}


def strings(value):
    """Every string inside a JSON value."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from strings(v)
    elif isinstance(value, str):
        yield value


def assert_no_paths(body, tmp_path: Path) -> None:
    """No server-side file path in a JSON body: nothing names the test folder, no absolute path but our URLs."""
    text = json.dumps(body)
    assert str(tmp_path) not in text and "image_path" not in text
    for s in strings(body):
        assert not s.startswith("/") or s.startswith("/images/"), s


def assert_json_error(response, status: int) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    detail = response.json()["detail"]
    assert "Traceback" not in response.text
    return detail if isinstance(detail, str) else json.dumps(detail)


def truncated_jpeg() -> bytes:
    data = jpeg_bytes(product_image(0, 1, size=200))
    return data[: len(data) // 2]


def png_header_bomb(width: int = 50_000, height: int = 50_000) -> bytes:
    """A few hundred bytes that claim 2.5 gigapixels: a PNG decompression bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def files_outside(root: Path, *inside: Path) -> set[Path]:
    """Every file under ``root`` except those under ``inside`` (to see that nothing was written elsewhere)."""
    return {p for p in root.rglob("*") if p.is_file() and not any(p.is_relative_to(i) for i in inside)}


class Blocking:
    """An engine whose searches (or index load) wait for ``release``: to hold the gate or the start-up open."""

    def __init__(self, engine: ImageSearchEngine, *, block_load: bool = False):
        self._engine = engine
        self._block_load = block_load
        self.started = threading.Event()
        self.release = threading.Event()

    def __getattr__(self, name):
        return getattr(self._engine, name)

    @property
    def is_ready(self) -> bool:
        return self._engine.is_ready

    def _wait(self) -> None:
        self.started.set()
        assert self.release.wait(30), "test never released the engine"

    def search(self, *args, **kwargs):
        if not self._block_load:
            self._wait()
        return self._engine.search(*args, **kwargs)

    def load_index(self):
        if self._block_load:
            self._wait()
        return self._engine.load_index()


def wait_until(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# --- POST /search ---------------------------------------------------------------------------------------------


def test_search_a_multipart_upload_finds_the_right_product_first(client, tmp_path):
    r = client.post("/search", files=upload(query(0)), params={"top_k": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [h["rank"] for h in body["results"]] == [1, 2, 3]
    first = body["results"][0]
    assert first["product_id"] == "red-disc"
    assert first["image_url"] == f"/images/{first['image_id']}"
    assert first["thumbnail_url"].startswith(first["image_url"] + "?size=")
    sims = [h["similarity"] for h in body["results"]]
    assert sims == sorted(sims, reverse=True)
    assert len({h["product_id"] for h in body["results"]}) == 3  # one entry per product by default
    assert body["top_k"] == 3 and body["by_product"] is True and body["min_similarity"] is None
    assert set(body["timings"]) == {"queue_ms", "search_ms", "total_ms"}
    assert body["timings"]["total_ms"] >= body["timings"]["search_ms"] >= 0
    assert body["build_id"]
    assert_no_paths(body, tmp_path)


@pytest.mark.parametrize("ctype", ["image/jpeg", "image/png", "application/octet-stream"])
def test_search_a_raw_image_body(client, ctype):
    r = client.post("/search", content=query(1), headers={"content-type": ctype})
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["product_id"] == "green-bar"


def test_search_a_png_upload(client):
    buf = io.BytesIO()
    product_image(2, 50).save(buf, "PNG")
    r = client.post("/search", files=upload(buf.getvalue(), "q.png", "image/png"))
    assert r.json()["results"][0]["product_id"] == "blue-cross"


def test_search_image_level_results(client):
    r = client.post("/search", files=upload(query(0)), params={"by_product": "false", "top_k": 5})
    body = r.json()
    assert body["by_product"] is False
    assert len(body["results"]) == 5
    assert len({h["image_id"] for h in body["results"]}) == 5
    assert [h["product_id"] for h in body["results"][:3]] == ["red-disc"] * 3  # all three red-disc photos first


def test_search_min_similarity_drops_weak_matches(client):
    everything = client.post("/search", files=upload(query(0)), params={"top_k": 10}).json()["results"]
    cut = (everything[0]["similarity"] + everything[1]["similarity"]) / 2
    strong = client.post("/search", files=upload(query(0)), params={"top_k": 10, "min_similarity": cut}).json()
    assert [h["product_id"] for h in strong["results"]] == [everything[0]["product_id"]]
    assert strong["min_similarity"] == cut


def test_search_top_k_above_the_catalog_returns_what_exists(client):
    assert len(client.post("/search", files=upload(query(0)), params={"top_k": 100}).json()["results"]) == 4


@pytest.mark.parametrize(
    "params",
    [
        {"top_k": 0},
        {"top_k": 101},
        {"top_k": "three"},
        {"top_k": "1.5"},
        {"min_similarity": "nan"},
        {"min_similarity": "inf"},
        {"min_similarity": 2},
        {"min_similarity": "high"},
        {"by_product": "maybe"},
    ],
)
def test_search_refuses_bad_parameters_with_422(client, params):
    r = client.post("/search", files=upload(query(0)), params=params)
    assert_json_error(r, 422)


# --- upload errors --------------------------------------------------------------------------------------------


@pytest.fixture
def small_client(make_settings, catalog):
    """Uploads above 2,000 bytes and images above 10,000 pixels are refused."""
    eng = ImageSearchEngine(make_settings(max_upload_bytes=2000, max_image_pixels=10_000, admin_token=TOKEN))
    eng.build_index()
    with TestClient(create_app(engine=eng)) as c:
        yield c


def test_a_body_over_max_upload_bytes_is_413(small_client):
    big = jpeg_bytes(product_image(0, 50, size=300), quality=95)
    assert len(big) > 2000
    detail = assert_json_error(small_client.post("/search", content=big, headers=JPEG), 413)
    assert "2,000 bytes" in detail
    assert_json_error(small_client.post("/search", files=upload(big)), 413)
    assert_json_error(
        small_client.post("/products/red-disc/images", files={"images": ("a.jpg", big)}, headers=AUTH), 413
    )


def test_a_body_over_the_limit_without_content_length_is_413_while_streaming(small_client):
    def chunks():
        for _ in range(100):
            yield b"\xff" * 1000

    r = small_client.post("/search", content=chunks(), headers=JPEG)
    assert "content-length" not in r.request.headers
    assert_json_error(r, 413)


def test_a_lying_content_length_cannot_get_past_the_limit(small_client):
    # The ASGI layer only passes on the body; the counted bytes decide even when the header says less.
    r = small_client.post("/search", content=b"\xff" * 5000, headers={**JPEG, "content-length": "10"})
    assert r.status_code in (400, 413, 422)


def test_a_decompression_bomb_is_refused_without_decoding(client):
    bomb = png_header_bomb()
    assert len(bomb) < 1000
    detail = assert_json_error(client.post("/search", content=bomb, headers={"content-type": "image/png"}), 413)
    assert "too large" in detail


def test_an_image_above_max_image_pixels_is_413(small_client):
    big = jpeg_bytes(Image.new("RGB", (200, 200), (10, 200, 30)))  # 40,000 pixels, few bytes
    assert len(big) < 2000
    detail = assert_json_error(small_client.post("/search", content=big, headers=JPEG), 413)
    assert "10,000" in detail


@pytest.mark.parametrize(
    ("data", "status", "words"),
    [
        (b"this is not an image", 415, "not a supported image"),
        (b"%PDF-1.4\n" + b"0" * 100, 415, "not a supported image"),
        (truncated_jpeg(), 422, "truncated"),
    ],
    ids=["text", "pdf", "truncated-jpeg"],
)
def test_non_image_or_corrupt_uploads_say_why(client, data, status, words):
    for r in (
        client.post("/search", content=data, headers=JPEG),
        client.post("/search", files=upload(data)),
    ):
        assert words in assert_json_error(r, status)


def test_an_empty_upload_is_422(client):
    assert "empty" in assert_json_error(client.post("/search", content=b"", headers=JPEG), 422)
    assert "empty" in assert_json_error(client.post("/search", files=upload(b"")), 422)


@pytest.mark.parametrize("ctype", ["text/plain", "application/json", "application/x-www-form-urlencoded", None])
def test_a_body_that_is_not_an_image_type_is_415(client, ctype):
    headers = {"content-type": ctype} if ctype else {}
    r = client.post("/search", content=query(0), headers=headers)
    assert "multipart/form-data" in assert_json_error(r, 415)


def test_a_form_with_only_text_fields_is_422(client):
    body = b'--xyz\r\nContent-Disposition: form-data; name="image"\r\n\r\nhello\r\n--xyz--\r\n'
    r = client.post("/search", content=body, headers={"content-type": "multipart/form-data; boundary=xyz"})
    assert "no file part" in assert_json_error(r, 422)


def test_two_photos_in_one_search_are_422(client):
    files = [("image", ("a.jpg", query(0))), ("image", ("b.jpg", query(1)))]
    assert "one photo" in assert_json_error(client.post("/search", files=files), 422)


def test_a_malformed_multipart_body_is_a_client_error(client):
    r = client.post("/search", content=b"garbage", headers={"content-type": "multipart/form-data"})
    assert 400 <= r.status_code < 500


def test_an_unexpected_failure_is_a_json_500_without_a_traceback(engine):
    class Broken:
        settings = engine.settings
        is_ready = True

        def search(self, *args, **kwargs):
            raise RuntimeError("secret detail at /srv/private/path")

    with TestClient(create_app(engine=Broken()), raise_server_exceptions=False) as c:
        r = c.post("/search", files=upload(query(0)))
    assert r.status_code == 500
    assert r.json() == {"detail": "internal server error (the server log has the details)"}
    assert "secret" not in r.text and "Traceback" not in r.text


# --- the bounded queue ----------------------------------------------------------------------------------------


def run_async(coro):
    return asyncio.run(coro)


def test_an_overloaded_server_answers_503_with_retry_after(make_settings, catalog):
    real = ImageSearchEngine(make_settings(max_concurrent_searches=1, search_queue_size=1))
    real.build_index()
    slow = Blocking(real)
    app = create_app(engine=slow)

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            running = asyncio.create_task(c.post("/search", content=query(0), headers=JPEG))
            while not slow.started.is_set():
                await asyncio.sleep(0.01)
            waiting = asyncio.create_task(c.post("/search", content=query(1), headers=JPEG))
            await asyncio.sleep(0.05)
            refused = await c.post("/search", content=query(2), headers=JPEG)  # 1 running + 1 waiting: full
            health = await c.get("/healthz")  # the event loop is not blocked by the searches
            metrics = await c.get("/metrics")
            slow.release.set()
            return await running, await waiting, refused, health, metrics

    try:
        running, waiting, refused, health, metrics = run_async(scenario())
    finally:
        app.state.lookalike.gate.shutdown()
    assert running.status_code == 200 and running.json()["results"][0]["product_id"] == "red-disc"
    assert waiting.status_code == 200 and waiting.json()["results"][0]["product_id"] == "green-bar"
    assert waiting.json()["timings"]["queue_ms"] > 0
    assert "busy" in assert_json_error(refused, 503)
    assert int(refused.headers["retry-after"]) >= 1
    assert health.status_code == 200
    assert "lookalike_searches_running 1" in metrics.text
    assert "lookalike_searches_waiting 1" in metrics.text
    assert "lookalike_searches_rejected_total 1" in metrics.text
    assert 'route="/search",status="503"' in app.state.lookalike.metrics.render()


def test_the_gate_bounds_running_plus_waiting_and_frees_places():
    gate = SearchGate(workers=1, queue_size=0)
    release = threading.Event()

    async def scenario():
        first = asyncio.create_task(gate.run(release.wait, 10))
        await asyncio.sleep(0.05)
        with pytest.raises(Overloaded) as refused:
            await gate.run(lambda: None)
        release.set()
        await first
        result, waited, ran = await gate.run(lambda: 42)  # the place is free again
        return refused.value, result, waited, ran

    refused, result, waited, ran = run_async(scenario())
    gate.shutdown()
    assert refused.retry_after >= 1 and result == 42 and waited >= 0 and ran >= 0
    assert gate.stats() == {"running": 0, "waiting": 0, "rejected": 1, "workers": 1, "queue_size": 0}


# --- GET /products/{id}/similar -------------------------------------------------------------------------------


def test_more_like_this_leaves_the_product_out(client, tmp_path):
    r = client.get("/products/red-disc/similar", params={"top_k": 2})
    assert r.status_code == 200
    body = r.json()
    assert body["product_id"] == "red-disc"
    ids = [h["product_id"] for h in body["results"]]
    assert len(ids) == 2 and "red-disc" not in ids
    assert_no_paths(body, tmp_path)


def test_more_like_this_of_an_unknown_product_is_404(client):
    assert "unknown product" in assert_json_error(client.get("/products/nope/similar"), 404)


def test_more_like_this_refuses_bad_parameters(client):
    assert_json_error(client.get("/products/red-disc/similar", params={"top_k": 0}), 422)
    assert_json_error(client.get("/products/red-disc/similar", params={"min_similarity": "nan"}), 422)
    assert_json_error(client.get(f"/products/{'x' * 300}/similar"), 422)


# --- GET /images/{id} -----------------------------------------------------------------------------------------


def first_hit(client) -> dict:
    return client.post("/search", files=upload(query(0))).json()["results"][0]


def test_an_image_is_served_by_id(client, engine):
    hit = first_hit(client)
    r = client.get(hit["image_url"])
    assert r.status_code == 200
    assert r.headers["content-type"] == "image/jpeg"
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.content == engine.image_file(hit["image_id"]).read_bytes()


def test_a_thumbnail_fits_the_size_asked_for(client):
    hit = first_hit(client)
    for size in (16, 48):
        r = client.get(hit["image_url"], params={"size": size})
        assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
        thumb = Image.open(io.BytesIO(r.content))
        assert max(thumb.size) == size
    assert client.get(hit["thumbnail_url"]).status_code == 200


@pytest.mark.parametrize("size", [0, 15, 1025, "big", "-1"])
def test_a_thumbnail_size_out_of_range_is_422(client, size):
    assert_json_error(client.get(first_hit(client)["image_url"], params={"size": size}), 422)


def test_an_unknown_image_id_is_404(client):
    assert "unknown image" in assert_json_error(client.get("/images/0123456789abcdef"), 404)


def test_an_index_entry_pointing_outside_the_catalog_is_not_served(engine, tmp_path):
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(query(0))

    class Tampered:  # as if the manifest named a file outside the catalog
        settings = engine.settings
        is_ready = True

        def image_file(self, image_id):
            return engine.settings.data_dir / ".." / "secret.jpg"

    with TestClient(create_app(engine=Tampered())) as c:
        assert_json_error(c.get("/images/0123456789abcdef"), 404)
        assert_json_error(c.get("/images/0123456789abcdef", params={"size": 64}), 404)


def test_a_catalog_image_deleted_from_disk_is_404(client, engine):
    hit = first_hit(client)
    engine.image_file(hit["image_id"]).unlink()
    assert_json_error(client.get(hit["image_url"]), 404)
    assert_json_error(client.get(hit["thumbnail_url"]), 404)


# --- traversal: no request parameter ever reaches the file system ---------------------------------------------

TRAVERSALS = [
    "..",
    ".",
    "../..",
    "../../../../etc/passwd",
    "..%2F..%2F..%2Fetc%2Fpasswd",
    "%2e%2e",
    "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "..%5c..%5cwindows",
    "....//....//etc/passwd",
    "%252e%252e%252fetc%252fpasswd",
    "/etc/passwd",
    "%2Fetc%2Fpasswd",
    "red-disc%2Fred-disc-00.jpg",
    "red-disc/red-disc-00.jpg",
    ".removed",
    "..%00",
    "%00",
]


def raw(app, method: str, path: str, **request) -> tuple[int, bytes]:
    """Send ``path`` exactly as a client could put it on the wire (HTTP clients would tidy up the dot segments);
    the ASGI path is the percent-decoded raw path, as uvicorn gives it."""
    req = httpx.Request(method, "http://test/", **request)
    body = req.read()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": unquote(path),
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in req.headers.items() if k.lower() != "host"]
        + [(b"host", b"test")],
        "client": ("127.0.0.1", 50000),
        "server": ("test", 80),
    }
    sent: list[dict] = []

    async def receive():
        nonlocal body
        if body is None:
            return {"type": "http.disconnect"}
        chunk, body = body, None
        return {"type": "http.request", "body": chunk, "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


def check_refused(status: int, content: bytes, what: str) -> None:
    assert status in (404, 405, 422), (what, status)
    assert b"root:" not in content and not content.startswith(b"\xff\xd8"), what


@pytest.mark.parametrize("attempt", TRAVERSALS)
def test_traversal_in_an_image_id_reads_nothing(client, attempt):
    for path in (f"/images/{attempt}", f"/images/{attempt}?size=64"):
        check_refused(*raw(client.app, "GET", path), path)


@pytest.mark.parametrize("attempt", TRAVERSALS)
def test_traversal_in_a_product_id_reads_or_writes_nothing(client, engine, catalog, tmp_path, attempt):
    before = files_outside(tmp_path, catalog, tmp_path / "cache")
    app = client.app
    check_refused(*raw(app, "GET", f"/products/{attempt}/similar"), "similar")
    check_refused(*raw(app, "DELETE", f"/products/{attempt}", headers=AUTH), "delete")
    files = {"images": ("x.jpg", query(4), "image/jpeg")}
    status, content = raw(app, "POST", f"/products/{attempt}/images", headers=AUTH, files=files)
    if status == 201:  # a strange but harmless product id (%2e is not decoded twice): one folder, named literally
        name = unquote(attempt)
        assert json.loads(content)["product_id"] == name and "/" not in name and name[0] != "."
        assert {p.name for p in catalog.iterdir()} == set(PRODUCTS) | {name}
    else:
        check_refused(status, content, "add")
        assert {p.name for p in catalog.iterdir()} == set(PRODUCTS)
    assert files_outside(tmp_path, catalog, tmp_path / "cache") == before
    assert engine.get_statistics()["products"] == 4 + (status == 201)
    assert all(len(list((catalog / product).iterdir())) == n for product, n in PRODUCTS.items())


@pytest.mark.parametrize("attempt", ["../app.py", "..%2Fapp.py", "%2e%2e%2fapp.py", "index.html", "app.py", ".", ".."])
def test_traversal_in_a_static_file_name_reads_nothing(client, attempt):
    status, content = raw(client.app, "GET", f"/static/{attempt}")
    assert status == 404 and b"import" not in content


@pytest.mark.parametrize("param", ["top_k", "min_similarity", "by_product"])
def test_traversal_in_a_query_parameter_is_just_a_bad_value(client, param):
    assert_json_error(client.post("/search", files=upload(query(0)), params={param: "../../etc/passwd"}), 422)
    if param != "by_product":
        assert_json_error(client.get("/products/red-disc/similar", params={param: "/etc/passwd"}), 422)
    else:
        assert_json_error(client.get(first_hit(client)["image_url"], params={"size": "../../etc/passwd"}), 422)


def test_the_client_file_name_of_an_upload_is_only_a_sanitised_name(client, catalog, tmp_path):
    files = {"images": ("../../../evil.jpg", query(4), "image/jpeg")}
    r = client.post("/products/new-product/images", files=files, headers=AUTH)
    assert r.status_code == 201, r.text
    assert [p for p in tmp_path.rglob("evil*") if p.parent != catalog / "new-product"] == []
    (stored,) = (catalog / "new-product").iterdir()
    assert stored.name == "evil.jpg"  # its last component only, like `lookalike add` keeps a file's name


# --- admin: POST /products/{id}/images and DELETE /products/{id} ---------------------------------------------


def test_adding_photos_makes_them_searchable(client, catalog, tmp_path):
    files = [("images", ("a.jpg", jpeg_bytes(product_image(4, 1)))), ("images", ("b.png", png(product_image(4, 2))))]
    r = client.post("/products/teal-bar/images", files=files, headers=AUTH)
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["product_id"] == "teal-bar" and body["added"] == 2 and body["images"] == N_IMAGES + 2
    assert body["image_urls"] == [f"/images/{i}" for i in body["image_ids"]]
    assert_no_paths(body, tmp_path)
    assert sorted(p.suffix for p in (catalog / "teal-bar").iterdir()) == [".jpg", ".png"]
    assert client.get(body["image_urls"][0]).status_code == 200
    hits = client.post("/search", files=upload(query(4))).json()["results"]
    assert hits[0]["product_id"] == "teal-bar"
    again = client.post("/products/teal-bar/images", files=files[:1], headers=AUTH).json()
    assert again["added"] == 0  # the same photo twice is indexed once


def test_adding_a_raw_photo_body(client):
    r = client.post("/products/red-disc/images", content=query(0), headers={**AUTH, **JPEG})
    assert r.status_code == 201 and r.json()["added"] == 1


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.parametrize(
    ("data", "status", "words"),
    [
        (b"not an image", 415, "not a supported image"),
        (truncated_jpeg(), 422, "truncated"),
        (png_header_bomb(), 413, "too large"),
        ("gif", 415, "JPEG, PNG or WebP"),
    ],
    ids=["text", "truncated", "bomb", "gif"],
)
def test_adding_a_bad_photo_changes_nothing(client, engine, catalog, data, status, words):
    if data == "gif":
        buf = io.BytesIO()
        product_image(4, 1).save(buf, "GIF")
        data = buf.getvalue()
    files = [("images", ("good.jpg", query(4))), ("images", ("bad.jpg", data))]
    r = client.post("/products/teal-bar/images", files=files, headers=AUTH)
    assert words in assert_json_error(r, status)
    assert not (catalog / "teal-bar").exists()
    assert engine.get_statistics()["images"] == N_IMAGES


@pytest.mark.parametrize("product", [".hidden", "  ", "tab\there", "new\nline"])
def test_adding_to_an_invalid_product_id_is_422(client, catalog, product):
    from urllib.parse import quote

    r = client.post(f"/products/{quote(product, safe='')}/images", files={"images": ("a.jpg", query(4))}, headers=AUTH)
    assert_json_error(r, 422)
    assert sorted(p.name for p in catalog.iterdir()) == sorted(PRODUCTS)


def test_removing_a_product(client, engine, catalog):
    r = client.delete("/products/red-disc", headers=AUTH)
    assert r.status_code == 200
    assert r.json() == {"product_id": "red-disc", "removed": 3, "images": N_IMAGES - 3}
    assert not (catalog / "red-disc").exists()  # moved to .removed/, which is never served
    assert "red-disc" not in [h["product_id"] for h in client.post("/search", files=upload(query(0))).json()["results"]]
    assert_json_error(client.get("/products/red-disc/similar"), 404)
    assert_json_error(client.delete("/products/red-disc", headers=AUTH), 404)


def test_admin_endpoints_are_disabled_without_a_configured_token(make_settings, catalog):
    eng = ImageSearchEngine(make_settings())  # no admin_token
    eng.build_index()
    with TestClient(create_app(engine=eng)) as c:
        for headers in ({}, AUTH, {"Authorization": "Bearer "}, {"Authorization": "Bearer None"}):
            add = c.post("/products/red-disc/images", files={"images": ("a.jpg", query(0))}, headers=headers)
            assert "disabled" in assert_json_error(add, 403)
            assert "disabled" in assert_json_error(c.delete("/products/red-disc", headers=headers), 403)
        assert c.get("/stats").json()["server"]["admin_enabled"] is False
    assert eng.get_statistics()["images"] == N_IMAGES


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": ""},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer wrong-token-0123456789"},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": f"Bearer {TOKEN[:-1]}"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": TOKEN},
        {"X-Admin-Token": TOKEN},
    ],
    ids=["none", "empty", "no-token", "wrong", "longer", "shorter", "basic", "no-scheme", "other-header"],
)
def test_admin_endpoints_refuse_a_missing_or_wrong_token(client, engine, catalog, headers):
    add = client.post("/products/red-disc/images", files={"images": ("a.jpg", query(0))}, headers=headers)
    assert_json_error(add, 401)
    assert add.headers["www-authenticate"] == "Bearer"
    assert_json_error(client.delete("/products/red-disc", headers=headers), 401)
    assert engine.get_statistics()["images"] == N_IMAGES
    assert len(list((catalog / "red-disc").iterdir())) == 3


def test_the_token_is_checked_before_the_upload_is_read(small_client):
    big = b"\xff" * 50_000
    r = small_client.post("/products/red-disc/images", content=big, headers=JPEG)
    assert_json_error(r, 401)


def test_the_token_is_compared_in_constant_time(client, monkeypatch):
    import lookalike.server.app as app_module

    calls = []
    real = app_module.hmac.compare_digest
    monkeypatch.setattr(app_module.hmac, "compare_digest", lambda a, b: calls.append((a, b)) or real(a, b))
    client.delete("/products/nope", headers={"Authorization": "Bearer wrong-token-0123456789"})
    assert calls == [(b"wrong-token-0123456789", TOKEN.encode())]


# --- operations: /stats /healthz /readyz /metrics /openapi.json /docs ----------------------------------------


def test_stats_count_the_catalog_and_hide_paths(make_settings, catalog, tmp_path):
    (catalog / "red-disc" / "broken.jpg").write_bytes(b"not a jpeg")
    eng = ImageSearchEngine(make_settings())
    eng.build_index()
    with TestClient(create_app(engine=eng)) as c:
        body = c.get("/stats").json()
    assert body["products"] == 4 and body["images"] == N_IMAGES and body["skipped"] == 1
    assert body["skipped_files"][0]["path"] == "red-disc/broken.jpg"
    assert "data_dir" not in body
    assert body["server"]["search_queue"]["workers"] == eng.settings.max_concurrent_searches
    assert_no_paths(body, tmp_path)


def test_healthz(client):
    assert client.get("/healthz").json() == {"status": "ok"}


def test_readyz_once_loaded(client):
    body = client.get("/readyz").json()
    assert body["status"] == "ready" and body["images"] == N_IMAGES and body["build_id"]


def test_the_index_is_loaded_at_start_up_and_readyz_waits_for_it(make_settings, catalog):
    ImageSearchEngine(make_settings()).build_index()
    slow = Blocking(ImageSearchEngine(make_settings()), block_load=True)  # not loaded: the app loads it
    with TestClient(create_app(engine=slow)) as c:
        assert slow.started.wait(10)
        assert c.get("/healthz").status_code == 200
        loading = c.get("/readyz")
        assert loading.status_code == 503 and loading.json()["status"] == "loading"
        assert loading.headers["retry-after"]
        search = c.post("/search", files=upload(query(0)))
        assert "loading" in assert_json_error(search, 503) and search.headers["retry-after"]
        assert "lookalike_index_ready 0" in c.get("/metrics").text
        slow.release.set()
        wait_until(lambda: c.get("/readyz").status_code == 200)
        assert c.post("/search", files=upload(query(0))).json()["results"][0]["product_id"] == "red-disc"
        assert "lookalike_index_ready 1" in c.get("/metrics").text


def test_create_app_from_settings_loads_the_index_itself(make_settings, catalog):
    ImageSearchEngine(make_settings()).build_index()
    with TestClient(create_app(make_settings())) as c:
        wait_until(lambda: c.get("/readyz").status_code == 200)
        assert c.post("/search", files=upload(query(1))).json()["results"][0]["product_id"] == "green-bar"


def test_an_index_that_cannot_be_loaded_is_reported_without_paths(make_settings, catalog, tmp_path):
    failures = []
    with TestClient(create_app(make_settings(), on_load_failure=failures.append)) as c:  # nothing built
        wait_until(lambda: bool(failures))
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["status"] == "failed"
        assert str(tmp_path) not in r.text
        assert "failed to load" in assert_json_error(c.post("/search", files=upload(query(0))), 503)
    assert failures[0].startswith("cannot load the index:")


def test_metrics_are_prometheus_text_by_route_template(client):
    hit = first_hit(client)
    client.get(hit["thumbnail_url"])
    client.get("/images/0123456789abcdef")
    client.get("/no/such/route/../x")
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = r.text
    assert 'lookalike_http_requests_total{method="POST",route="/search",status="200"} 1' in text
    assert 'lookalike_http_requests_total{method="GET",route="/images/{image_id}",status="200"} 1' in text
    assert 'lookalike_http_requests_total{method="GET",route="/images/{image_id}",status="404"} 1' in text
    assert 'route="unmatched",status="404"' in text and "no/such" not in text
    assert 'lookalike_http_request_duration_seconds_bucket{route="/search",le="+Inf"} 1' in text
    assert 'lookalike_http_request_duration_seconds_count{route="/search"} 1' in text
    assert 'lookalike_search_duration_seconds_count{phase="run"} 1' in text
    assert f"lookalike_index_images {N_IMAGES}" in text
    assert "lookalike_index_products 4" in text
    assert "# TYPE lookalike_searches_rejected_total counter" in text
    for line in text.splitlines():  # every sample line is "name{labels} number"
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            float(value)
            assert name.startswith("lookalike_")


def test_openapi_describes_every_endpoint(client):
    schema = client.get("/openapi.json").json()
    paths = schema["paths"]
    assert set(paths) == {
        "/search",
        "/search/regions",
        "/facets",
        "/products/{product_id}/similar",
        "/images/{image_id}",
        "/products/{product_id}/images",
        "/products/{product_id}",
        "/stats",
        "/healthz",
        "/readyz",
        "/metrics",
    }
    assert "multipart/form-data" in paths["/search"]["post"]["requestBody"]["content"]
    assert "multipart/form-data" in paths["/search/regions"]["post"]["requestBody"]["content"]
    assert "HTTPBearer" in schema["components"]["securitySchemes"]


def test_openapi_docs_page_works_offline(client):
    page = client.get("/docs")
    assert page.status_code == 200
    assert "/openapi.json" in page.text
    assets = re.findall(r"""['"](/static/swagger/[^'"]+)['"]""", page.text)
    assert sorted(assets) == ["/static/swagger/swagger-ui-bundle.js", "/static/swagger/swagger-ui.css"]
    for asset in assets:  # bundled with the package, not fetched from a CDN
        response = client.get(asset)
        assert response.status_code == 200 and len(response.content) > 10_000
    assert "cdn." not in page.text
    assert client.get("/static/swagger/../app.py").status_code == 404
    assert client.get("/static/swagger/LICENSE").status_code == 404


# --- the page -------------------------------------------------------------------------------------------------


def test_the_page_and_its_assets_are_served_without_any_cdn(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    html = page.text
    scripts = re.findall(r'<script src="static/([\w.]+)" defer></script>', html)
    assert scripts[0] == "app.js" and len(scripts) == len(set(scripts)) > 1 and 'href="static/style.css"' in html
    for name, ctype in [(s, "text/javascript") for s in scripts] + [("style.css", "text/css")]:
        r = client.get(f"/static/{name}")
        assert r.status_code == 200 and r.headers["content-type"].startswith(ctype)
        assert "http://" not in r.text and "https://" not in r.text and "//cdn" not in r.text
        assert "innerHTML" not in r.text  # server text only ever goes in as textContent
    assert "http://" not in html and "https://" not in html


# --- settings and the command line ----------------------------------------------------------------------------


def server_settings(**kw) -> Settings:
    return Settings(config_file=None, environ=kw.pop("environ", {}), **kw)


def test_server_settings_defaults_and_environment():
    s = server_settings()
    assert (s.host, s.port, s.admin_token) == ("127.0.0.1", 8000, None)
    assert s.max_upload_bytes == 10_000_000 and s.max_concurrent_searches >= 1 and s.search_queue_size >= 0
    env = {
        "LOOKALIKE_PORT": "9000",
        "LOOKALIKE_HOST": "0.0.0.0",
        "LOOKALIKE_ADMIN_TOKEN": TOKEN,
        "LOOKALIKE_MAX_UPLOAD_BYTES": "5000",
        "LOOKALIKE_MAX_CONCURRENT_SEARCHES": "3",
        "LOOKALIKE_SEARCH_QUEUE_SIZE": "0",
    }
    s = server_settings(environ=env)
    assert (s.port, s.host, s.admin_token, s.max_upload_bytes) == (9000, "0.0.0.0", TOKEN, 5000)
    assert (s.max_concurrent_searches, s.search_queue_size) == (3, 0)
    assert server_settings(environ=env, admin_token=None).admin_token is None  # an explicit None wins


def test_the_admin_token_never_shows(tmp_path):
    s = server_settings(admin_token=TOKEN)
    assert "admin_token" not in s.to_dict()
    assert TOKEN not in repr(s) and TOKEN not in str(s)
    assert TOKEN not in json.dumps(s.replace(port=9001).to_dict())
    with pytest.raises(SettingsError) as err:
        server_settings(admin_token="short-secret")
    assert "short-secret" not in str(err.value) and "admin_token" in str(err.value) and "16" in str(err.value)
    with pytest.raises(SettingsError) as err:
        server_settings(admin_token="has a space in it, so no")
    assert "space" not in str(err.value).split("(value not shown)")[0]


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("port", 0),
        ("port", 70000),
        ("port", "http"),
        ("host", "local host"),
        ("host", ""),
        ("max_upload_bytes", 10),
        ("max_concurrent_searches", 0),
        ("search_queue_size", -1),
    ],
)
def test_bad_server_settings_are_refused_with_the_key(key, value):
    with pytest.raises(SettingsError, match=key):
        server_settings(**{key: value})


def test_the_index_manifest_never_holds_the_token(engine):
    assert TOKEN not in engine.settings.metadata_path.read_text(encoding="utf-8")


def test_the_cli_has_a_serve_command_and_no_token_flag(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    out = capsys.readouterr().out
    assert "--port" in out and "--host" in out and "--max-upload-bytes" in out
    assert "admin-token" not in out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_lookalike_serve_without_an_index_stops_with_one_error_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.startswith("LOOKALIKE_"):
            monkeypatch.delenv(name)
    argv = ["serve", "--model-name", "test_tiny", "--data-dir", str(tmp_path / "none"), "--cache-dir", str(tmp_path)]
    assert main([*argv, "--port", str(free_port())]) == 1
    err = capsys.readouterr().err
    assert "lookalike: error: cannot load the index" in err
    assert "Traceback" not in err


def test_lookalike_serve_answers_over_http(make_settings, catalog, tmp_path):
    """The real command, as a process: searches over a socket, then stops cleanly on SIGINT."""
    settings = make_settings()
    ImageSearchEngine(settings).build_index()
    port = free_port()
    argv = [sys.executable, "-m", "lookalike.cli", "serve", "--no-access-log", "--port", str(port)]
    argv += ["--model-name", "test_tiny", "--data-dir", str(settings.data_dir), "--cache-dir", str(settings.cache_dir)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOKALIKE_")}
    proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server never became ready"
            time.sleep(0.2)
        r = httpx.post(f"{url}/search", files=upload(query(2)), timeout=10)
        assert r.json()["results"][0]["product_id"] == "blue-cross"
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "index loaded" in out


def test_the_library_never_imports_the_server():
    code = (
        "import sys, lookalike, lookalike.cli, lookalike.engine, lookalike.evaluation, lookalike.demo\n"
        "from lookalike.cli import build_parser; build_parser()\n"
        "bad = [m for m in sys.modules if m.startswith(('lookalike.server', 'fastapi', 'uvicorn', 'starlette'))]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
