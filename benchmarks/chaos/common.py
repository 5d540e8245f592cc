"""What every campaign shares: a throw-away catalog of synthetic photos with the tiny test backbone, the environment
that makes every process (CLI, worker, server) use it, the ledger of acknowledged changes, and the judge that says
whether the catalog folder, the embedding cache and the index agree and hold every acknowledged change."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
SRC = REPO / "src"
RESULTS = REPO / "results" / "chaos"
TOKEN = "chaos-admin-token-0123456789"
SEED_PRODUCTS = 6  # products in the starting catalog
SEED_IMAGES = 2  # photos each

COLOURS = [(230, 40, 40), (40, 160, 40), (40, 60, 220), (240, 200, 30), (20, 20, 20), (0, 200, 220), (250, 130, 0)]


def photo(look: int, variant: int, size: int = 64) -> Image.Image:
    """A small synthetic product photo; seeded, so every run makes the same files."""
    rng = np.random.default_rng(7919 * look + variant)
    img = np.empty((size, size, 3), np.float32)
    img[:] = COLOURS[look % len(COLOURS)]
    c = size // 2 + int(rng.integers(-8, 9))
    img[c - size // 6 : c + size // 6, :, :] = COLOURS[(look + 3) % len(COLOURS)]
    img += rng.normal(0, 10, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")


@dataclass
class Workdir:
    """``root/catalog`` (the catalog), ``root/cache`` (index and cache), ``root/pool`` (photos to add)."""

    root: Path
    threads: int = 1

    @property
    def catalog(self) -> Path:
        return self.root / "catalog"

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def pool(self) -> Path:
        return self.root / "pool"

    @property
    def config_file(self) -> Path:
        """An empty YAML file: no process of a campaign reads the repository's configs/configs.yaml."""
        path = self.root / "chaos-config.yaml"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("{}\n")
        return path

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of every process of a campaign: the tiny backbone, these folders, the admin token."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("LOOKALIKE_")}
        env.update(
            PYTHONPATH=os.pathsep.join([str(SRC), str(Path(__file__).resolve().parents[1])]),
            LOOKALIKE_CONFIG=str(self.config_file),
            LOOKALIKE_MODEL_NAME="test_tiny",
            LOOKALIKE_RUNTIME="torch",
            LOOKALIKE_DATA_DIR=str(self.catalog),
            LOOKALIKE_CACHE_DIR=str(self.cache),
            LOOKALIKE_BATCH_SIZE="4",
            LOOKALIKE_NUM_WORKERS="0",
            LOOKALIKE_THREADS=str(self.threads),
            LOOKALIKE_ADMIN_TOKEN=TOKEN,
            LOOKALIKE_MAX_CONCURRENT_SEARCHES="1",
            OMP_NUM_THREADS=str(self.threads),
            PYTHONUNBUFFERED="1",
        )
        env.update(extra)
        return env

    def settings(self, **overrides: Any):
        from lookalike import Settings

        values = dict(
            model_name="test_tiny",
            runtime="torch",
            data_dir=self.catalog,
            cache_dir=self.cache,
            batch_size=4,
            num_workers=0,
            threads=self.threads,
            admin_token=TOKEN,
            max_concurrent_searches=1,
        )
        values.update(overrides)
        return Settings(config_file=None, environ={}, **values)

    def pool_photos(self, n: int) -> list[Path]:
        """``n`` photos outside the catalog (what `lookalike add` copies in)."""
        self.pool.mkdir(parents=True, exist_ok=True)
        out = []
        for i in range(n):
            path = self.pool / f"pool-{i:03d}.jpg"
            if not path.exists():
                photo(10 + i, 1).save(path, quality=85)
            out.append(path)
        return out


def make_workdir(root: Path, *, threads: int = 1, pool: int = 16) -> Workdir:
    """A fresh catalog of ``SEED_PRODUCTS`` products, indexed through the library (what `lookalike index` does)."""
    from lookalike import ImageSearchEngine

    wd = Workdir(Path(root), threads)
    _ = wd.config_file  # written now, not during a campaign's first edit
    for p in range(SEED_PRODUCTS):
        folder = wd.catalog / f"seed-{p}"
        folder.mkdir(parents=True, exist_ok=True)
        for v in range(SEED_IMAGES):
            photo(p, v).save(folder / f"seed-{p}-{v}.jpg", quality=85)
    wd.pool_photos(pool)
    ImageSearchEngine(wd.settings()).build_index(progress=False)
    return wd


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


# --- the ledger and the judge --------------------------------------------------------------------------------

PRESENT, ABSENT, UNKNOWN = "present", "absent", "unknown"


@dataclass
class Ledger:
    """What each product of a campaign must look like: present with these file names, absent, or unknown (an edit
    was in flight when its process died: either outcome is fine, half of it is not)."""

    expect: dict[str, tuple[str, frozenset[str]]] = field(default_factory=dict)
    acked: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def ack_add(self, product: str, names) -> None:
        with self.lock:
            self.expect[product] = (PRESENT, frozenset(names))
            self.acked += 1

    def ack_remove(self, product: str) -> None:
        with self.lock:
            self.expect[product] = (ABSENT, frozenset())
            self.acked += 1

    def in_flight(self, product: str) -> None:
        with self.lock:
            self.expect[product] = (UNKNOWN, frozenset())

    def items(self, products=None) -> list[tuple[str, tuple[str, frozenset[str]]]]:
        with self.lock:
            return [(p, e) for p, e in self.expect.items() if products is None or p in products]


@dataclass
class Verdict:
    loads: bool = True
    load_error: str = ""
    lost: list[str] = field(default_factory=list)  # acknowledged changes not in the index
    half: list[str] = field(default_factory=list)  # products whose folder and index disagree
    cache_off: list[str] = field(default_factory=list)  # products whose cache entries differ from the folder
    checked: int = 0
    observed: dict[str, set[str]] = field(default_factory=dict)  # the index's file names of the products checked

    def merge(self, other: Verdict) -> None:
        self.loads = self.loads and other.loads
        self.load_error = self.load_error or other.load_error
        self.lost += other.lost
        self.half += other.half
        self.cache_off += other.cache_off
        self.checked += other.checked


class Judge:
    """Opens the index as a fresh process would and compares it with the catalog folder, the cache and a ledger."""

    def __init__(self, wd: Workdir):
        from lookalike.embedding import FeatureExtractor

        self.wd = wd
        self.settings = wd.settings()
        self.extractor = FeatureExtractor(self.settings)
        self._lock = threading.Lock()

    def view(self) -> tuple[dict[str, set[str]], dict[str, set[str]], dict[str, set[str]], str]:
        """(index, catalog, cache): file names per product; and the build id. Raises if the index does not load."""
        from lookalike import ImageSearchEngine

        engine = ImageSearchEngine(self.settings, extractor=self.extractor)
        engine.load_index()
        changing = getattr(engine, "_changing", None)  # as the next writer: the catalog lock, a crashed edit's
        with changing() if changing else contextlib.nullcontext():  # journal replayed, and a quiescent view
            return self._view(engine)

    def _view(self, engine):
        from lookalike.catalog import scan_catalog

        index: dict[str, set[str]] = {}
        for path, pid in _rows(engine):
            index.setdefault(pid, set()).add(Path(path).name)
        catalog: dict[str, set[str]] = {}
        for im in scan_catalog(self.wd.catalog):
            catalog.setdefault(im.product_id, set()).add(im.path.name)
        root = engine.data_root
        cache: dict[str, set[str]] = {}
        for p in _cache_class().for_catalog(self.settings.cache_dir, self.extractor.fingerprint, root).load().paths:
            rel = Path(p).relative_to(root) if Path(p).is_relative_to(root) else Path(p)
            cache.setdefault(rel.parts[0], set()).add(rel.name)
        return index, catalog, cache, str(engine.snapshot.manifest.get("build_id", ""))

    def check(self, ledger: Ledger, products=None) -> Verdict:
        """Every product of ``ledger`` (or of ``products``): acknowledged state held, folder = cache = index."""
        out = Verdict()
        with self._lock:
            try:
                index, catalog, cache, _ = self.view()
            except Exception as exc:  # the index must load after any crash: record why it did not
                return Verdict(loads=False, load_error=f"{type(exc).__name__}: {exc}")
        for product, (state, names) in ledger.items(products):
            got_i, got_f, got_c = index.get(product, set()), catalog.get(product, set()), cache.get(product, set())
            out.checked += 1
            out.observed[product] = got_i
            if got_i != got_f:
                out.half.append(f"{product}: index {sorted(got_i)} folder {sorted(got_f)} cache {sorted(got_c)}")
            if got_c != got_f:
                out.cache_off.append(f"{product}: folder {sorted(got_f)} cache {sorted(got_c)}")
            if state == PRESENT and not names <= got_i:
                out.lost.append(f"{product}: acknowledged add not in the index")
            elif state == ABSENT and got_i:
                out.lost.append(f"{product}: acknowledged remove undone")
        return out


def _rows(engine) -> list[tuple[str, str]]:
    """(catalog-relative path, product id) of every indexed image: through the store protocol where the engine
    has one (``store.ids()`` / ``store.fetch()``), else the seed-era snapshot's columns."""
    store = getattr(engine, "_store", None)
    if store is not None and hasattr(store, "fetch"):
        fields = store.fetch(store.ids())
        return [(f["path"], f["product_id"]) for f in fields.values()]
    snap = engine.snapshot
    return list(zip(snap.paths, snap.product_ids))


def _cache_class():
    try:
        from lookalike.cache import EmbeddingCache
    except ImportError:
        from lookalike.store import EmbeddingCache
    return EmbeddingCache


# --- output ---------------------------------------------------------------------------------------------------


def write_result(name: str, result: dict[str, Any], folder: Path | None = None) -> Path:
    """``results/chaos/<name>.json`` (atomically, through the library), and a table on stdout."""
    from lookalike.store import atomic_write_bytes

    folder = Path(folder or RESULTS)
    path = folder / f"{name}.json"
    atomic_write_bytes(path, json.dumps(result, indent=2, default=str).encode())
    print_table(name, result)
    return path


def print_table(name: str, result: dict[str, Any]) -> None:
    rows = [(k, v) for k, v in result.items() if isinstance(v, (int, float, str, bool)) or v is None]
    width = max([len(k) for k, _ in rows] + [10])
    lines = [f"## chaos: {name}", f"{'figure'.ljust(width)}  value", f"{'-' * width}  -----"]
    lines += [f"{k.ljust(width)}  {v}" for k, v in rows]
    print("\n".join(lines), file=sys.stdout, flush=True)


@contextlib.contextmanager
def timer():
    box = {"s": 0.0}
    start = time.perf_counter()
    try:
        yield box
    finally:
        box["s"] = time.perf_counter() - start
