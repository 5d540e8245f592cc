"""Load run: many concurrent clients posting real photos to `lookalike serve` on 127.0.0.1.

Builds (or reuses: the embedding cache makes a rebuild cheap) the index of the Grocery Store catalog, starts
`lookalike serve` as a separate process, waits for /readyz, then runs ``--clients`` clients for ``--duration``
seconds, each posting the next query photo as soon as it has its answer. A 503 (the bounded queue refusing work)
is counted apart from errors, and the client waits its Retry-After before trying again. Prints a table and writes
JSON; exits non-zero if any request failed other than by a deliberate 503.

    python benchmarks/load.py --catalog ../shared/data/grocery/catalog --queries ../shared/data/grocery/queries
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
GROCERY = REPO.parent / "shared" / "data" / "grocery"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--catalog", type=Path, default=GROCERY / "catalog", help="catalog folder to index and serve")
    p.add_argument("--queries", type=Path, default=GROCERY / "queries", help="photos to post (<product>/<photo>)")
    p.add_argument("--cache-dir", type=Path, default=REPO / "cache" / "load-grocery", help="index and embeddings")
    p.add_argument("--model-name", default="efficientnet_lite0")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--port", type=int, default=0, help="0: a free port")
    p.add_argument("--max-concurrent-searches", type=int, help="server setting (default: the server's)")
    p.add_argument("--search-queue-size", type=int, help="server setting (default: the server's)")
    p.add_argument("--json", type=Path, default=REPO / "results" / "load.json", help="where to write the results")
    return p.parse_args(argv)


def lookalike(*args: str) -> list[str]:
    return [sys.executable, "-m", "lookalike.cli", *args]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args, settings_flags: list[str], port: int, log: Path) -> subprocess.Popen:
    flags = [*settings_flags, "--host", "127.0.0.1", "--port", str(port), "--no-access-log"]
    if args.max_concurrent_searches:
        flags += ["--max-concurrent-searches", str(args.max_concurrent_searches)]
    if args.search_queue_size is not None:
        flags += ["--search-queue-size", str(args.search_queue_size)]
    env = {k: v for k, v in os.environ.items() if k != "LOOKALIKE_ADMIN_TOKEN"}
    out = open(log, "w")  # noqa: SIM115 - the server writes to it until stopped
    return subprocess.Popen(lookalike("serve", *flags), cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)


def wait_ready(proc: subprocess.Popen, url: str, log: Path, timeout: float = 600.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with code {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            r = httpx.get(f"{url}/readyz", timeout=5)
            if r.status_code == 200:
                return r.json()
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the server was not ready after {timeout:.0f} s; see {log}")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def run_load(url: str, photos: list[tuple[str, bytes]], clients: int, duration: float, top_k: int) -> dict:
    """``clients`` closed-loop clients for ``duration`` seconds; every request's outcome and latency."""
    ok_latency: list[float] = []
    rejected_latency: list[float] = []
    errors: list[str] = []
    correct = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as http:
        start = time.perf_counter()
        stop = start + duration

        async def client(n: int) -> None:
            nonlocal correct
            i = n
            while time.perf_counter() < stop:
                product, data = photos[i % len(photos)]
                i += clients
                t0 = time.perf_counter()
                try:
                    r = await http.post(
                        "/search", params={"top_k": top_k}, files={"image": ("query.jpg", data, "image/jpeg")}
                    )
                except httpx.HTTPError as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                took = time.perf_counter() - t0
                if r.status_code == 200:
                    ok_latency.append(took)
                    results = r.json()["results"]
                    correct += bool(results) and results[0]["product_id"] == product
                elif r.status_code == 503 and "retry-after" in r.headers:
                    rejected_latency.append(took)
                    await asyncio.sleep(min(float(r.headers["retry-after"]), 5.0))
                else:
                    errors.append(f"HTTP {r.status_code}: {r.text[:200]}")

        await asyncio.gather(*(client(n) for n in range(clients)))
        elapsed = time.perf_counter() - start
    return {
        "elapsed_s": elapsed,
        "ok_latency": ok_latency,
        "rejected_latency": rejected_latency,
        "errors": errors,
        "correct": correct,
    }


def summarise(raw: dict) -> dict:
    lat = np.array(raw["ok_latency"]) * 1000
    ok = len(lat)

    def pct(q: float) -> float | None:
        return round(float(np.percentile(lat, q)), 1) if ok else None

    rejected = len(raw["rejected_latency"])
    return {
        "requests": ok + rejected + len(raw["errors"]),
        "ok": ok,
        "rejected_503": rejected,
        "errors": len(raw["errors"]),
        "error_examples": sorted(set(raw["errors"]))[:5],
        "elapsed_s": round(raw["elapsed_s"], 2),
        "throughput_rps": round(ok / raw["elapsed_s"], 2),
        "latency_ms": {
            "p50": pct(50),
            "p95": pct(95),
            "p99": pct(99),
            "mean": round(float(lat.mean()), 1) if ok else None,
            "max": round(float(lat.max()), 1) if ok else None,
        },
        "rejected_503_latency_ms_p50": round(float(np.median(raw["rejected_latency"])) * 1000, 1) if rejected else None,
        "top1_correct": round(raw["correct"] / ok, 3) if ok else None,
    }


def table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.catalog.is_dir() or not args.queries.is_dir():
        raise SystemExit(f"photos not found: {args.catalog} / {args.queries} (see ../shared/data/README.md)")
    photos = [
        (path.parent.name, path.read_bytes())
        for path in sorted(args.queries.rglob("*"))
        if path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")
    ]
    settings_flags = ["--data-dir", str(args.catalog), "--cache-dir", str(args.cache_dir)]
    settings_flags += ["--model-name", args.model_name]
    args.json.parent.mkdir(parents=True, exist_ok=True)

    print(f"indexing {args.catalog} with {args.model_name} (cached features are reused) ...", flush=True)
    t0 = time.perf_counter()
    subprocess.run(lookalike("index", *settings_flags), cwd=REPO, check=True)
    index_s = time.perf_counter() - t0

    port = args.port or free_port()
    url = f"http://127.0.0.1:{port}"
    log = args.json.with_suffix(".server.log")
    proc = start_server(args, settings_flags, port, log)
    try:
        t0 = time.perf_counter()
        ready = wait_ready(proc, url, log)
        startup_s = time.perf_counter() - t0
        server = httpx.get(f"{url}/stats", timeout=10).json()["server"]
        print(
            f"serving {ready['images']} images at {url} (ready in {startup_s:.1f} s); "
            f"{args.clients} clients for {args.duration:.0f} s ...",
            flush=True,
        )
        raw = asyncio.run(run_load(url, photos, args.clients, args.duration, args.top_k))
        after = httpx.get(f"{url}/stats", timeout=10).json()["server"]["search_queue"]
    finally:
        stop_server(proc)

    result = {
        "config": {
            "clients": args.clients,
            "duration_s": args.duration,
            "top_k": args.top_k,
            "model_name": args.model_name,
            "catalog": str(args.catalog),
            "catalog_images": ready["images"],
            "query_photos": len(photos),
            "max_concurrent_searches": server["search_queue"]["workers"],
            "search_queue_size": server["search_queue"]["queue_size"],
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
            "python": platform.python_version(),
        },
        "index_build_s": round(index_s, 1),
        "server_ready_s": round(startup_s, 1),
        **summarise(raw),
        "server_rejected_503": after["rejected"],
    }
    args.json.write_text(json.dumps(result, indent=2) + "\n")

    lat = result["latency_ms"]
    print()
    print(
        table(
            [
                ("clients x seconds", f"{args.clients} x {args.duration:.0f}"),
                (
                    "server",
                    f"{result['config']['max_concurrent_searches']} concurrent searches, "
                    f"queue {result['config']['search_queue_size']}, {os.cpu_count()} CPUs",
                ),
                ("requests", str(result["requests"])),
                ("answered (200)", str(result["ok"])),
                ("refused (503, deliberate)", str(result["rejected_503"])),
                ("errors", str(result["errors"])),
                ("throughput", f"{result['throughput_rps']} searches/s"),
                ("latency p50 / p95 / p99", f"{lat['p50']} / {lat['p95']} / {lat['p99']} ms"),
                ("right product first", f"{result['top1_correct']}"),
            ]
        )
    )
    print(f"\nwrote {args.json} (server log: {log})")
    for example in result["error_examples"]:
        print(f"error: {example}")
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
