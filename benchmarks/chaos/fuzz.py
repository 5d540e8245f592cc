"""Campaign (d): fuzzed and hostile uploads, and memory after a burst of big uploads.

- ``http_fuzz``: mutated photos (bit flips, truncations, spliced chunks, forged dimensions, polyglots, random bytes)
  sent to POST /search and the admin upload as raw bodies and multipart parts, with odd content types, file names
  and parameters, through the app in-process; every answer must be a 2xx or a 4xx, never a 5xx or an exception.
- ``hostile``: traversal in every path parameter, bad tokens, unsafe product ids (bidi, controls, too many bytes,
  decomposed forms), against every endpoint: 0 5xx, nothing written outside the catalog.
- ``atheris_decode``: coverage-guided fuzzing of the image decoder (chaos.decode_fuzz) in a child process.
- ``rss_burst``: `lookalike serve` on 127.0.0.1; 40 simultaneous uploads of 10 MB; its RSS after the burst
  against its RSS when idle (after warm-up searches).
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import re
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import warnings
import zlib
from pathlib import Path
from urllib.parse import quote

import httpx
from PIL import Image

from .common import TOKEN, Workdir, free_port, make_workdir, photo, rss_bytes, timer

AUTH = {"Authorization": f"Bearer {TOKEN}"}


def seeds() -> list[bytes]:
    """Small valid images in every accepted format and a few refused ones, to mutate."""
    out = []
    img = photo(1, 1, size=48)
    for fmt, kw in [("JPEG", {"quality": 80}), ("PNG", {}), ("WEBP", {}), ("GIF", {}), ("BMP", {}), ("TIFF", {})]:
        buf = io.BytesIO()
        (img.convert("P") if fmt == "GIF" else img).save(buf, fmt, **kw)
        out.append(buf.getvalue())
    buf = io.BytesIO()
    img.convert("RGBA").save(buf, "PNG")
    out.append(buf.getvalue())
    buf = io.BytesIO()
    img.convert("CMYK").save(buf, "JPEG")
    out.append(buf.getvalue())
    out.append(png_header(60_000, 60_000))
    return out


def png_header(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    body = struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    return b"\x89PNG\r\n\x1a\n" + body + b"\x00\x00\x00\x00IEND\xaeB`\x82"


def mutate(data: bytes, rng: random.Random) -> bytes:
    kind = rng.randrange(9)
    buf = bytearray(data)
    if kind == 0 and buf:  # flip bits
        for _ in range(rng.randint(1, 20)):
            buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
    elif kind == 1:  # truncate
        del buf[rng.randint(0, len(buf)) :]
    elif kind == 2 and buf:  # duplicate a chunk
        a = rng.randrange(len(buf))
        b = min(len(buf), a + rng.randint(1, 512))
        buf[a:a] = buf[a:b] * rng.randint(1, 8)
    elif kind == 3:  # random bytes
        return os.urandom(rng.randint(0, 4096))
    elif kind == 4 and len(buf) > 24:  # forge dimensions: big-endian 16/32-bit fields near the header
        pos = rng.randrange(2, min(len(buf) - 4, 200))
        buf[pos : pos + 4] = struct.pack(">I", rng.choice([0, 1, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF]))
    elif kind == 5:  # polyglot: an image followed by another format, or the other way round
        other = rng.choice([b"<html><script>alert(1)</script></html>", b"PK\x03\x04" + os.urandom(64), b"%PDF-1.4\n"])
        return bytes(buf) + other if rng.random() < 0.5 else other + bytes(buf)
    elif kind == 6 and buf:  # overwrite a run of bytes
        a = rng.randrange(len(buf))
        for i in range(a, min(len(buf), a + rng.randint(1, 64))):
            buf[i] = rng.randrange(256)
    elif kind == 7:  # unchanged (valid images must keep working)
        pass
    else:  # splice two seeds
        return bytes(buf[: rng.randint(0, len(buf))]) + rng.choice(seeds())[rng.randint(0, 64) :]
    return bytes(buf)


NAMES = [
    "photo.jpg",
    "../../../../etc/passwd",
    "..\\..\\boot.ini",
    "a" * 400 + ".jpg",
    "\u202egpj.exe",
    "nul\x00byte.jpg",
    ".hidden.png",
    "",
    "caf\u0065\u0301.webp",
    "con.jpg",
]
CTYPES = ["image/jpeg", "image/png", "image/webp", "application/octet-stream", "text/plain", "", "image/svg+xml"]
PRODUCT_IDS = [
    "fuzz-product",
    "..",
    "../etc",
    "%2e%2e",
    "\u202eevil",
    "x" * 300,
    "\u00e9" * 100,
    "cafe\u0301",
    " space",
    "a/b",
    "nul\x00",
    ".removed",
]


def _client(app):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*httpx2", category=UserWarning)
        from fastapi.testclient import TestClient
    return TestClient(app, raise_server_exceptions=True)


def _app(wd: Workdir):
    from lookalike import ImageSearchEngine
    from lookalike.server import create_app

    engine = ImageSearchEngine(wd.settings(max_upload_bytes=256_000, max_image_pixels=4_000_000))
    engine.load_index()
    return create_app(engine=engine), engine


def http_fuzz(root: Path, *, requests: int = 100_000, seed: int = 0, wd: Workdir | None = None) -> dict:
    """Mutated uploads through the app; counts answers by status, 5xx and exceptions that escaped."""
    import logging

    rng = random.Random(seed)
    wd = wd or make_workdir(root)
    app, engine = _app(wd)
    corpus = seeds()
    statuses: dict[str, int] = {}
    crashes: list[str] = []
    five: list[str] = []
    quiet = logging.getLogger("lookalike")  # thousands of expected errors; the level is given back afterwards
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    with timer() as took, _client(app) as client, contextlib.ExitStack() as stack:
        stack.callback(quiet.setLevel, level)
        for n in range(requests):
            data = mutate(rng.choice(corpus), rng)
            ctype = rng.choice(CTYPES)
            target = rng.random()
            params = {"top_k": rng.choice(["5", "1", "100", "0", "-1", "1e9", "x"])} if rng.random() < 0.1 else {}
            try:
                if target < 0.9:
                    if rng.random() < 0.5:
                        r = client.post("/search", content=data, headers={"content-type": ctype}, params=params)
                    else:
                        files = {"image": (rng.choice(NAMES), data, ctype or "image/jpeg")}
                        r = client.post("/search", files=files, params=params)
                else:
                    product = quote(rng.choice(PRODUCT_IDS), safe="")
                    auth = (
                        AUTH if rng.random() < 0.7 else {"Authorization": "Bearer " + rng.choice(["", "x", TOKEN[:-1]])}
                    )
                    files = [("images", (rng.choice(NAMES), data, "image/jpeg")) for _ in range(rng.randint(1, 3))]
                    r = client.post(f"/products/{product}/images", files=files, headers=auth)
                    if r.status_code == 201:
                        client.delete(f"/products/{r.json()['product_id']}", headers=AUTH)
            except Exception as exc:  # an exception out of the app: a crash
                crashes.append(f"request {n}: {type(exc).__name__}: {exc}"[:300])
                continue
            statuses[str(r.status_code)] = statuses.get(str(r.status_code), 0) + 1
            if r.status_code >= 500:
                five.append(f"request {n}: {r.status_code} {r.text[:200]}")
    return {
        "campaign": "http_fuzz",
        "requests": requests,
        "http_5xx": len(five),
        "crashes": len(crashes),
        "requests_per_s": round(requests / took["s"], 1),
        "seconds": round(took["s"], 1),
        "statuses": dict(sorted(statuses.items())),
        "examples": {"5xx": five[:10], "crashes": crashes[:10]},
        "index_images_after": engine.get_statistics()["images"],
    }


def hostile(root: Path, *, wd: Workdir | None = None) -> dict:
    """Traversal, tokens and ids against every endpoint; 0 5xx and nothing written outside the catalog."""
    wd = wd or make_workdir(root)
    app, _ = _app(wd)
    outside_before = _files_outside(wd)
    attempts = [
        "..",
        "../..",
        "..%2f..%2fetc%2fpasswd",
        "%2e%2e%2f",
        "....//",
        "%252e%252e",
        "/etc/passwd",
        ".removed",
        "seed-0/../seed-1",
        "\u202eseed-0",
        "seed\u200f-0",
        "x" * 5000,
        "\u00e9" * 91,
        "cafe\u0301",
        "%00",
        "a\tb",
    ]
    tokens = [
        "",
        "Bearer",
        "Bearer ",
        f"Bearer {TOKEN}x",
        f"Basic {TOKEN}",
        TOKEN,
        f"Bearer {TOKEN[:-1]}",
        "Bearer " + "x" * 10000,
    ]
    good = photo(2, 5)
    buf = io.BytesIO()
    Image.open(io.BytesIO(_jpeg(good))).save(buf, "JPEG")
    statuses: dict[str, int] = {}
    five: list[str] = []
    count = 0
    with _client(app) as client:

        def note(r, what):
            nonlocal count
            count += 1
            statuses[str(r.status_code)] = statuses.get(str(r.status_code), 0) + 1
            if r.status_code >= 500:
                five.append(f"{what}: {r.status_code} {r.text[:200]}")

        for a in attempts:
            q = quote(a, safe="%")  # a "/" sent raw would be a different route (clients resolve dot segments)
            note(client.get(f"/images/{q}"), f"GET /images/{a!r}")
            note(client.get(f"/images/{q}", params={"size": 64}), "thumbnail")
            note(client.get(f"/products/{q}/similar"), "similar")
            note(client.get(f"/static/{q}"), "static")
            note(client.delete(f"/products/{q}", headers=AUTH), "delete")
            files = {"images": (a, buf.getvalue(), "image/jpeg")}
            r = client.post(f"/products/{q}/images", files=files, headers=AUTH)
            note(r, "add")
            if r.status_code == 201:
                client.delete(f"/products/{quote(r.json()['product_id'], safe='')}", headers=AUTH)
        for t in tokens:
            headers = {"Authorization": t} if t else {}
            note(
                client.post("/products/seed-0/images", files={"images": ("a.jpg", buf.getvalue())}, headers=headers),
                "token",
            )
            note(client.delete("/products/seed-0", headers=headers), "token delete")
    outside_after = _files_outside(wd)
    return {
        "campaign": "hostile",
        "requests": count,
        "http_5xx": len(five),
        "written_outside_catalog": sorted(set(outside_after) - set(outside_before))[:10],
        "statuses": dict(sorted(statuses.items())),
        "examples": {"5xx": five[:10]},
    }


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG")
    return buf.getvalue()


def _files_outside(wd: Workdir) -> list[str]:
    out = []
    for path in wd.root.rglob("*"):
        if wd.catalog in path.parents or wd.cache in path.parents or path in (wd.catalog, wd.cache):
            continue
        out.append(str(path.relative_to(wd.root)))
    return out


def atheris_decode(runs: int = 100_000, *, seconds: int = 600, max_len: int = 65536) -> dict:
    """chaos.decode_fuzz for ``runs`` inputs (or ``seconds``); libFuzzer's own report parsed."""
    with tempfile.TemporaryDirectory(prefix="chaos-corpus-") as corpus:
        for i, data in enumerate(seeds()):
            Path(corpus, f"seed-{i}").write_bytes(data)
        env = dict(
            os.environ,
            PYTHONPATH=os.pathsep.join(
                [str(Path(__file__).resolve().parents[2] / "src"), str(Path(__file__).resolve().parents[1])]
            ),
        )
        cmd = [
            sys.executable,
            "-m",
            "chaos.decode_fuzz",
            corpus,
            f"-runs={runs}",
            f"-max_len={max_len}",
            f"-max_total_time={seconds}",
            "-rss_limit_mb=4096",
            "-timeout=20",
            "-print_final_stats=1",
        ]
        with timer() as took:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=corpus, timeout=seconds + 120)
    log = proc.stdout + proc.stderr
    done = re.search(r"Done (\d+) runs in (\d+) second", log)
    execs = re.search(r"stat::number_of_executed_units:\s*(\d+)", log)
    return {
        "campaign": "atheris_decode",
        "inputs": int(done.group(1)) if done else int(execs.group(1)) if execs else 0,
        "exit_status": proc.returncode,
        "crashes": 0 if proc.returncode == 0 else 1,
        "seconds": round(took["s"], 1),
        "log_tail": log[-1500:] if proc.returncode else log[-300:],
    }


def rss_burst(root: Path, *, uploads: int = 40, size: int = 10_000_000, wd: Workdir | None = None) -> dict:
    """RSS of `lookalike serve` after ``uploads`` simultaneous uploads of ``size`` bytes, against idle."""
    wd = wd or make_workdir(root)
    port = free_port()
    env = wd.env(LOOKALIKE_MAX_UPLOAD_BYTES=str(size + 100_000), LOOKALIKE_MAX_CONCURRENT_SEARCHES="2")
    proc = subprocess.Popen(
        [sys.executable, "-m", "lookalike.cli", "serve", "--host", "127.0.0.1", "--port", str(port), "--no-access-log"],
        env=env, cwd=wd.root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, proc)
        small = _jpeg(photo(3, 3, size=256))
        with httpx.Client(base_url=url, timeout=60) as c:
            for _ in range(20):  # warm: the first searches allocate the model's buffers
                c.post("/search", content=small, headers={"content-type": "image/jpeg"})
        time.sleep(1.0)
        idle = rss_bytes(proc.pid)
        big = _jpeg(photo(4, 4, size=1024))
        body = big + os.urandom(size - len(big))  # a real photo and trailing bytes: decoders ignore them
        statuses: dict[str, int] = {}
        lock = threading.Lock()
        start = threading.Barrier(uploads)
        peak = [idle]

        def one(i: int) -> None:
            start.wait()
            try:
                with httpx.Client(base_url=url, timeout=120) as c:
                    if i % 2:
                        r = c.post("/search", content=body, headers={"content-type": "image/jpeg"})
                    else:
                        r = c.post("/search", files={"image": ("big.jpg", body, "image/jpeg")})
                code = str(r.status_code)
            except httpx.HTTPError as exc:
                code = type(exc).__name__
            with lock:
                statuses[code] = statuses.get(code, 0) + 1

        def watch(stop: threading.Event) -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], rss_bytes(proc.pid))
                time.sleep(0.05)

        stop = threading.Event()
        watcher = threading.Thread(target=watch, args=(stop,), daemon=True)
        watcher.start()
        threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(uploads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        time.sleep(2.0)
        stop.set()
        after = rss_bytes(proc.pid)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    tracebacks = err.count("Traceback")
    return {
        "campaign": "rss_burst",
        "uploads": uploads,
        "upload_bytes": size,
        "idle_rss_mb": round(idle / 2**20, 1),
        "peak_rss_mb": round(peak[0] / 2**20, 1),
        "after_rss_mb": round(after / 2**20, 1),
        "after_over_idle": round(after / idle, 3),
        "statuses": statuses,
        "http_5xx_not_503": sum(v for k, v in statuses.items() if k.isdigit() and int(k) >= 500 and k != "503"),
        "server_tracebacks": tracebacks,
    }


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float = 180) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"lookalike serve exited with {proc.returncode} before it was ready")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return time.monotonic() - start
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"lookalike serve was not ready within {timeout} s")
