"""Several servers, one catalog: two `lookalike serve` processes over one Milvus server.

A product added through one server is found through the other, and a product removed through one is gone from
both, as soon as the write has returned. Needs the Milvus 2.3.5 standalone server (``make milvus-server-venv``)
or ``LOOKALIKE_TEST_MILVUS_URI``; skipped with the reason otherwise.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from conftest import PRODUCTS, jpeg_bytes, product_image, write_catalog

pytestmark = pytest.mark.milvus_server

TOKEN = "two-servers-admin-token-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lookalike(*args: str, cache: Path, catalog: Path, uri: str, collection: str) -> list[str]:
    return [
        sys.executable, "-m", "lookalike.cli", *args, "--model-name", "test_tiny", "--store", "milvus",
        "--milvus-uri", uri, "--collection", collection, "--data-dir", str(catalog), "--cache-dir", str(cache),
    ]  # fmt: skip


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOOKALIKE_")}
    env["LOOKALIKE_ADMIN_TOKEN"] = TOKEN
    return env


def wait_ready(proc: subprocess.Popen, url: str) -> None:
    deadline = time.monotonic() + 240
    while True:
        assert proc.poll() is None, proc.stdout.read()
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"server never became ready:\n{proc.communicate()[0][-3000:]}")
        time.sleep(0.3)


def search(url: str, look: int, variant: int) -> list[str]:
    photo = jpeg_bytes(product_image(look, variant))
    r = httpx.post(f"{url}/search", files={"image": ("q.jpg", photo, "image/jpeg")}, params={"top_k": 5}, timeout=30)
    assert r.status_code == 200, r.text
    return [h["product_id"] for h in r.json()["results"]]


def test_two_servers_over_one_milvus_see_each_others_writes(server_uri, tmp_path):
    catalog = tmp_path / "catalog"  # shared by both servers (on several machines: a shared folder)
    write_catalog(catalog, PRODUCTS)
    collection = f"two_servers_{os.getpid()}"
    env = clean_env()
    built = subprocess.run(
        lookalike("index", cache=tmp_path / "a", catalog=catalog, uri=server_uri, collection=collection),
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    procs, urls = [], []
    try:
        for name in ("a", "b"):
            port = free_port()
            argv = lookalike("serve", cache=tmp_path / name, catalog=catalog, uri=server_uri, collection=collection)
            argv += ["--port", str(port), "--no-access-log"]
            procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
            urls.append(f"http://127.0.0.1:{port}")
        for proc, url in zip(procs, urls):
            wait_ready(proc, url)
        a, b = urls
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert "grey-cross" not in search(b, 5, 3)

        photos = [("images", (f"new-{v}.jpg", jpeg_bytes(product_image(5, v)), "image/jpeg")) for v in (1, 2)]
        added = httpx.post(f"{a}/products/grey-cross/images", files=photos, headers=auth, timeout=120)
        assert added.status_code == 201, added.text
        assert search(b, 5, 3)[0] == "grey-cross"  # through the other server, once the add has returned
        assert search(a, 5, 3)[0] == "grey-cross"

        removed = httpx.delete(f"{b}/products/red-disc", headers=auth, timeout=120)
        assert removed.status_code == 200, removed.text
        assert "red-disc" not in search(a, 0, 77)  # gone from both, once the remove has returned
        assert "red-disc" not in search(b, 0, 77)
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGINT)
        for proc in procs:
            try:
                proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
