"""Single-query latency when other processes keep the CPU busy: p50 alone vs p50 with CPU burners beside it.

An index of real Grocery photos is built once per setting; then one query at a time (a real JPEG file -> products),
first on a machine with nothing of ours beside it, then with ``--burners`` pure-Python busy loops in other
processes (what two busy neighbours on a 2-core machine look like). Reported: p50/p90 in each state and their
ratio. The machine is shared, so the phases are interleaved: idle and busy alternate for every setting, round by
round, and the best round of each is kept.

    python benchmarks/contention_bench.py [--settings default "torch (old default)"] [--burners 2] [--rounds 2]
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import tempfile
import time
from pathlib import Path

from common import grocery_photos, latencies_ms, print_table, write_results
from lookalike import ImageSearchEngine, Settings

# (label, settings overrides): the default, and the settings the default replaced, for comparison in one run.
SETTINGS = [
    ("default settings", {}),
    ("default, threads 1", {"threads": 1}),
    ("default, threads 2 (fixed: no one-thread queries when busy)", {"threads": 2}),
    ("torch, threads unset (old default)", {"runtime": "torch"}),
    ("torch, threads 1", {"runtime": "torch", "threads": 1}),
]


def burn(stop) -> None:  # pragma: no cover - runs in a child process
    x = 0
    while not stop.is_set():
        for _ in range(100_000):
            x += 1


class Burners:
    """``n`` processes that keep one core each busy until stopped."""

    def __init__(self, n: int):
        self.stop = mp.Event()
        self.procs = [mp.Process(target=burn, args=(self.stop,), daemon=True) for _ in range(n)]

    def __enter__(self):
        for p in self.procs:
            p.start()
        time.sleep(1.0)  # let them reach full speed
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for p in self.procs:
            p.join(5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", default=None, help="labels to run (default: all)")
    parser.add_argument("--catalog-images", type=int, default=300, help="catalog photos to index")
    parser.add_argument("--queries", type=int, default=30, help="query photos timed per phase")
    parser.add_argument("--burners", type=int, default=2, help="CPU-busy processes beside the queries")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--cache-dir", default=None, help="where indexes and exported models go (default: temp)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    cache = Path(args.cache_dir) if args.cache_dir else Path(tempfile.mkdtemp(prefix="lookalike-contention-"))
    catalog = grocery_photos("catalog", every=max(1, 2640 // args.catalog_images))[: args.catalog_images]
    queries = [str(p) for p in grocery_photos("queries", every=max(1, 296 // args.queries))[: args.queries]]
    root = catalog[0].parents[1]
    engines = {}
    for label, overrides in SETTINGS:
        if args.settings and label not in args.settings:
            continue
        folder = cache / label.split(",")[0].replace(" ", "-") / str(len(engines))
        settings = Settings(config_file=None, environ={}, data_dir=_subset(root, catalog, cache), cache_dir=folder)
        settings = settings.replace(**overrides)
        engine = ImageSearchEngine(settings)
        engine.build_index(progress=False)
        engines[label] = engine

    best: dict[tuple[str, str], dict] = {}
    for _ in range(args.rounds):
        for label, engine in engines.items():
            for phase in ("idle", "busy"):

                def search(path, engine=engine):
                    return engine.search(path, top_k=5)

                if phase == "idle":
                    stats = latencies_ms(search, queries)
                else:
                    with Burners(args.burners):
                        stats = latencies_ms(search, queries)
                key = (label, phase)
                if key not in best or stats["p50_ms"] < best[key]["p50_ms"]:
                    best[key] = stats
    rows = []
    for label in engines:
        idle, busy = best[(label, "idle")], best[(label, "busy")]
        rows.append(
            {
                "setting": label,
                "runtime": engines[label].extractor.runtime,
                "idle_p50_ms": idle["p50_ms"],
                "busy_p50_ms": busy["p50_ms"],
                "busy_over_idle": busy["p50_ms"] / idle["p50_ms"],
                "idle_p90_ms": idle["p90_ms"],
                "busy_p90_ms": busy["p90_ms"],
            }
        )
    columns = ["setting", "runtime", "idle_p50_ms", "busy_p50_ms", "busy_over_idle", "idle_p90_ms", "busy_p90_ms"]
    print_table(rows, columns, f"single-query latency, alone vs beside {args.burners} CPU-busy processes")
    payload = {"burners": args.burners, "queries": len(queries), "catalog_images": len(catalog), "results": rows}
    print(f"\nwrote {write_results('contention', payload, args.json)}")


def _subset(root: Path, photos: list[Path], cache: Path) -> Path:
    """A catalog folder of symbolic links to ``photos`` (never copies of the real photos)."""
    folder = cache / "catalog"
    for photo in photos:
        link = folder / photo.parent.name / photo.name
        if not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(photo)
    return folder


if __name__ == "__main__":
    main()
