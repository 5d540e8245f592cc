"""The server under conditions that are nobody's request error: ids that look alike, a full or read-only disk, a
client that hangs up, a full search queue before the upload is read, big uploads spooled to disk, and the names
photos keep when added over HTTP.

Fast: the tiny random backbone over the synthetic catalog; raw ASGI calls where the body's timing matters.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import shutil
import threading
import unicodedata
import warnings
from urllib.parse import quote

import httpx
import pytest
from starlette.requests import Request

from conftest import PRODUCTS, jpeg_bytes, product_image
from lookalike import ImageSearchEngine
from lookalike.ids import MAX_PRODUCT_ID_BYTES
from lookalike.server import create_app
from lookalike.server.uploads import SPOOL_BYTES, receive_uploads, safe_file_name

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*httpx2", category=UserWarning)
    from fastapi.testclient import TestClient

TOKEN = "test-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
N_IMAGES = sum(PRODUCTS.values())


@pytest.fixture
def engine(make_settings, catalog) -> ImageSearchEngine:
    eng = ImageSearchEngine(make_settings(admin_token=TOKEN))
    eng.build_index()
    return eng


@pytest.fixture
def client(engine):
    with TestClient(create_app(engine=engine), raise_server_exceptions=False) as c:
        yield c


def photo(look: int = 4, variant: int = 60) -> bytes:
    return jpeg_bytes(product_image(look, variant))


def add(client, product_id: str, files) -> httpx.Response:
    return client.post(f"/products/{quote(product_id, safe='')}/images", files=files, headers=AUTH)


def detail(response, status: int) -> str:
    assert response.status_code == status, response.text
    assert "Traceback" not in response.text
    return response.json()["detail"]


# --- product ids at the HTTP edge -----------------------------------------------------------------------------


def test_composed_and_decomposed_ids_are_one_product(client, engine, catalog):
    composed, decomposed = "caf\u00e9", "cafe\u0301"
    assert composed != decomposed and unicodedata.normalize("NFC", decomposed) == composed
    first = add(client, decomposed, {"images": ("a.jpg", photo(4, 1))})
    second = add(client, composed, {"images": ("b.jpg", photo(4, 2))})
    assert first.status_code == second.status_code == 201, (first.text, second.text)
    assert first.json()["product_id"] == second.json()["product_id"] == composed
    assert sorted(p.name for p in catalog.iterdir() if not p.name.startswith(".")) == sorted([*PRODUCTS, composed])
    assert engine.get_statistics()["products"] == len(PRODUCTS) + 1
    similar = client.get(f"/products/{quote(decomposed)}/similar")
    assert similar.status_code == 200 and similar.json()["product_id"] == composed
    gone = client.delete(f"/products/{quote(decomposed)}", headers=AUTH)
    assert gone.status_code == 200 and gone.json()["removed"] == 2


@pytest.mark.parametrize(
    ("product_id", "words"),
    [
        ("evil\u202egpj.exe", "bidirectional"),
        ("left\u200fmark", "bidirectional"),
        ("bell\x07", "control"),
        ("del\x7fete", "control"),
        ("\u00e9" * 130, "bytes"),
        ("x" * (MAX_PRODUCT_ID_BYTES + 1), "bytes"),
        (" padded", "whitespace"),
    ],
    ids=["rlo", "rlm", "bell", "del", "long-non-ascii", "long-ascii", "padded"],
)
def test_an_unsafe_product_id_is_422_with_the_rule_everywhere(client, catalog, product_id, words):
    before = sorted(p.name for p in catalog.iterdir())
    for response in (
        add(client, product_id, {"images": ("a.jpg", photo())}),
        client.delete(f"/products/{quote(product_id, safe='')}", headers=AUTH),
        client.get(f"/products/{quote(product_id, safe='')}/similar"),
    ):
        text = detail(response, 422)
        assert words in text and f"{MAX_PRODUCT_ID_BYTES} bytes" in text  # the reason and the rule
    assert sorted(p.name for p in catalog.iterdir()) == before


def test_the_longest_allowed_non_ascii_id_can_be_added_and_removed(client, catalog):
    product_id = "\u00e9" * (MAX_PRODUCT_ID_BYTES // 2)  # exactly the byte limit
    assert add(client, product_id, {"images": ("a.jpg", photo())}).status_code == 201
    assert client.delete(f"/products/{quote(product_id)}", headers=AUTH).status_code == 200
    assert not (catalog / product_id).exists()


# --- failed catalog writes: 507 / 503 with a reason, never 500 ------------------------------------------------


def failing(code: int):
    def fail(*args, **kwargs):
        raise OSError(code, f"{os.strerror(code)} at /srv/secret/cache", "/srv/secret")

    return fail


@pytest.mark.parametrize(
    ("code", "status", "words"),
    [(errno.ENOSPC, 507, "disk is full"), (errno.EDQUOT, 507, "disk is full"), (errno.EROFS, 503, "read-only")],
    ids=["enospc", "edquot", "erofs"],
)
def test_a_failed_add_answers_507_or_503_with_the_reason(client, engine, monkeypatch, code, status, words):
    monkeypatch.setattr(shutil, "copyfile", failing(code))  # the engine copies each photo into the catalog
    r = add(client, "teal-bar", {"images": ("a.jpg", photo())})
    text = detail(r, status)
    assert words in text and "/srv/secret" not in text
    if status == 503:
        assert int(r.headers["retry-after"]) >= 1


@pytest.mark.parametrize(
    ("code", "status"), [(errno.ENOSPC, 507), (errno.EROFS, 503), (errno.EACCES, 503), (errno.EIO, 503)]
)
def test_a_failed_remove_answers_507_or_503_never_500(client, engine, monkeypatch, code, status):
    monkeypatch.setattr(engine, "remove_product", failing(code))
    text = detail(client.delete("/products/red-disc", headers=AUTH), status)
    assert "remove product 'red-disc'" in text and "/srv/secret" not in text


def test_the_engines_write_error_answers_without_the_servers_paths(client, engine, monkeypatch):
    class CatalogWriteError(OSError):  # what lookalike.errors defines: an OSError whose message names the path
        reason = "disk full"

    def full(*args, **kwargs):
        raise CatalogWriteError(errno.ENOSPC, "cannot write /srv/secret/cache/x.npz: disk full", "/srv/secret")

    monkeypatch.setattr(engine, "add_images", full)
    text = detail(add(client, "teal-bar", {"images": ("a.jpg", photo())}), 507)
    assert "disk full" in text and "/srv" not in text


def test_a_busy_catalog_answers_503_with_retry_after(client, engine, monkeypatch):
    def busy(*args, **kwargs):
        raise TimeoutError("the catalog lock is held by another process")

    monkeypatch.setattr(engine, "add_images", busy)
    r = add(client, "teal-bar", {"images": ("a.jpg", photo())})
    assert "in progress" in detail(r, 503) and r.headers["retry-after"] == "2"


# --- a client that hangs up mid-upload ------------------------------------------------------------------------


def asgi(app, method: str, path: str, headers: dict[str, str], chunks: list[bytes], *, then_disconnect: bool):
    """Call ``app`` directly; the body arrives in ``chunks``, then (optionally) the client disconnects. Returns
    (status or None, number of receive() calls)."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()] + [(b"host", b"test")],
        "client": ("127.0.0.1", 50000),
        "server": ("test", 80),
    }
    pending = list(chunks)
    calls = 0
    sent: list[dict] = []

    async def receive():
        nonlocal calls
        calls += 1
        if pending:
            chunk = pending.pop(0)
            return {"type": "http.request", "body": chunk, "more_body": bool(pending) or then_disconnect}
        if then_disconnect:
            return {"type": "http.disconnect"}
        await asyncio.sleep(3600)

    async def send(message):
        sent.append(message)

    async def main():
        async with app.router.lifespan_context(app):
            await app(scope, receive, send)

    asyncio.run(main())
    return (sent[0]["status"] if sent else None), calls


@pytest.mark.parametrize("kind", ["search-multipart", "search-raw", "add-multipart"])
def test_a_client_that_hangs_up_mid_upload_is_one_info_line(engine, caplog, kind):
    app = create_app(engine=engine)
    boundary = "b0undary"
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n\r\n'.encode()
    half = photo()[:2000]
    if kind == "search-raw":
        path, headers, chunks = "/search", {"content-type": "image/jpeg"}, [half]
    else:
        path = "/search" if kind == "search-multipart" else "/products/teal-bar/images"
        headers = {"content-type": f"multipart/form-data; boundary={boundary}", **AUTH}
        chunks = [head + half]
    caplog.set_level(logging.DEBUG)
    asgi(app, "POST", path, {**headers, "content-length": "100000"}, chunks, then_disconnect=True)
    noisy = [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
    gone = [r for r in caplog.records if "hung up" in r.getMessage()]
    assert noisy == [] and len(gone) == 1 and gone[0].levelno == logging.INFO
    assert engine.get_statistics()["images"] == N_IMAGES


# --- admission before buffering -------------------------------------------------------------------------------


def test_a_search_that_cannot_get_a_place_is_refused_before_its_body_is_read(make_settings, catalog):
    real = ImageSearchEngine(make_settings(max_concurrent_searches=1, search_queue_size=0))
    real.build_index()
    release, started = threading.Event(), threading.Event()

    class Slow:
        settings = real.settings
        is_ready = True
        snapshot = property(lambda self: real.snapshot)

        def search(self, *args, **kwargs):
            started.set()
            release.wait(10)
            return real.search(*args, **kwargs)

        def __getattr__(self, name):
            return getattr(real, name)

    app = create_app(engine=Slow())
    reads = {"second": 0}

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            first = asyncio.create_task(c.post("/search", content=photo(0), headers={"content-type": "image/jpeg"}))
            while not started.is_set():
                await asyncio.sleep(0.01)

            async def body():
                reads["second"] += 1
                yield photo(1)

            refused = await c.post("/search", content=body(), headers={"content-type": "image/jpeg"})
            release.set()
            return await first, refused

    try:
        first, refused = asyncio.run(scenario())
    finally:
        app.state.lookalike.gate.shutdown()
    assert first.status_code == 200
    assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1
    assert reads["second"] == 0  # not a byte of the refused upload was asked for
    assert app.state.lookalike.gate.stats()["running"] == 0


def test_places_are_given_back_after_refusals_errors_and_hang_ups(engine):
    app = create_app(engine=engine)
    gate = app.state.lookalike.gate
    with TestClient(app, raise_server_exceptions=False) as c:
        for _ in range(gate.capacity + 3):
            assert c.post("/search", content=b"not an image", headers={"content-type": "image/jpeg"}).status_code == 415
            assert c.post("/search", content=b"", headers={"content-type": "text/plain"}).status_code == 415
        asgi(app, "POST", "/search", {"content-type": "image/jpeg"}, [b"\xff\xd8"], then_disconnect=True)
        assert c.post("/search", content=photo(0), headers={"content-type": "image/jpeg"}).status_code == 200
    assert gate.stats()["running"] == 0 and gate.stats()["waiting"] == 0


# --- uploads spooled to disk ----------------------------------------------------------------------------------


def test_a_big_upload_is_spooled_to_disk_not_held_in_memory():
    big = b"\xff" * (3 * SPOOL_BYTES)
    scope = {"type": "http", "method": "POST", "path": "/", "headers": [(b"content-type", b"image/jpeg")]}
    chunks = [big[i : i + 65536] for i in range(0, len(big), 65536)]

    async def receive():
        chunk = chunks.pop(0)
        return {"type": "http.request", "body": chunk, "more_body": bool(chunks)}

    async def main():
        uploads = await receive_uploads(Request(scope, receive), 10 * len(big), many=True)
        try:
            (up,) = uploads
            return up.size, up.file._rolled, up.read() == big
        finally:
            await uploads.close()

    size, rolled, same = asyncio.run(main())
    assert size == len(big) and rolled and same


# --- the names of photos added over HTTP ----------------------------------------------------------------------


def test_photos_added_over_http_keep_their_sanitised_names(client, catalog):
    files = [
        ("images", ("Front View.JPG", photo(4, 1))),
        ("images", ("back\u202e.jpg", photo(4, 2))),  # a bidi override is dropped
        ("images", ("side.png", photo(4, 3))),  # JPEG bytes: the extension follows the content
        ("images", ("..\\..\\top.jpeg", photo(4, 4))),
        ("images", ("Front View.JPG", photo(4, 5))),  # same name, other photo: both kept
        ("images", ("again.jpg", photo(4, 1))),  # the same photo twice in one request: once
    ]
    r = add(client, "teal-bar", files)
    assert r.status_code == 201, r.text
    names = sorted(p.name for p in (catalog / "teal-bar").iterdir())
    assert r.json()["added"] == 5 and len(names) == 5
    assert {"Front View.jpg", "back.jpg", "side.jpg", "top.jpeg"} <= set(names)
    assert any(n.startswith("Front View-") and n.endswith(".jpg") for n in names)


def test_a_raw_photo_body_is_named_by_its_content(client, catalog):
    data = photo(4, 7)
    r = client.post("/products/teal-bar/images", content=data, headers={**AUTH, "content-type": "image/jpeg"})
    assert r.status_code == 201
    import hashlib

    assert [p.name for p in (catalog / "teal-bar").iterdir()] == [hashlib.sha256(data).hexdigest()[:20] + ".jpg"]


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("photo.jpg", "photo.jpg"),
        ("../../etc/passwd", "passwd.jpg"),
        ("C:\\Users\\me\\IMG 1.JPEG", "IMG 1.jpeg"),
        (".hidden.jpg", "hidden.jpg"),
        ("...", "fallback.jpg"),
        ("", "fallback.jpg"),
        (None, "fallback.jpg"),
        ("a\x00b\nc.jpg", "abc.jpg"),
        ('what?<is>:"this"|*.jpg', "what__is___this___.jpg"),
        ("caf" + "e\u0301.jpg", "caf\u00e9.jpg"),
        ("x" * 300 + ".jpg", "x" * 100 + ".jpg"),
        ("\u00e9" * 300 + ".jpg", "\u00e9" * 50 + ".jpg"),
    ],
)
def test_safe_file_name(given, expected):
    assert safe_file_name(given, (".jpg", ".jpeg"), "fallback") == expected


def test_a_hang_up_over_a_real_socket_is_one_info_line_too(engine, caplog):
    import socket
    import time

    import uvicorn

    caplog.set_level(logging.INFO)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(engine=engine), host="127.0.0.1", port=port, log_config=None))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        for path, extra in (("/search", ""), ("/products/teal-bar/images", f"Authorization: Bearer {TOKEN}\r\n")):
            with socket.create_connection(("127.0.0.1", port)) as c:
                head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 5000000\r\n"
                c.sendall((head + extra + "\r\n").encode() + photo()[:3000])
                time.sleep(0.3)
        deadline = time.monotonic() + 10
        while sum("hung up" in r.getMessage() for r in caplog.records) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        server.should_exit = True
        thread.join(10)
    gone = [r for r in caplog.records if "hung up" in r.getMessage()]
    noisy = [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
    assert len(gone) == 2 and all(r.levelno == logging.INFO for r in gone), [r.getMessage() for r in caplog.records]
    assert noisy == [], [r.getMessage() for r in noisy]


def test_a_running_server_serves_another_processs_commit(client, engine, make_settings):
    import time

    other = ImageSearchEngine(make_settings(admin_token=TOKEN))  # another process's engine over the same folders
    other.load_index()
    photo_path = engine.settings.cache_dir / "teal.jpg"
    photo_path.write_bytes(photo(4, 9))
    other.add_images("teal-bar", [photo_path])
    deadline = time.monotonic() + 10  # the engine looks for a newer commit about once a second (docs)
    status = 404
    while status != 200 and time.monotonic() < deadline:
        status = client.get("/products/teal-bar/similar").status_code
        time.sleep(0.1)
    assert status == 200
    assert client.get("/stats").json()["images"] == N_IMAGES + 1
