"""python -m chaos [--short] [CAMPAIGN ...]   (from benchmarks/; `make chaos` runs the long version of all)

Campaigns: kill, writers, faults, fuzz (mutated HTTP uploads + hostile requests + atheris + RSS burst), restart.
Each writes results/chaos/<name>.json and prints a table; the exit status is 1 if any promise was broken.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from .common import RESULTS, make_workdir, write_result

LONG = {
    "kill": {"kills": 1000, "max_seconds": 5400},
    "writers": {"rounds": 100},
    "fuzz": {"requests": 100_000, "atheris_runs": 100_000},
    "restart": {"images": 100_000, "restarts": 5},
}
SHORT = {
    "kill": {"kills": 12, "workers": 2, "max_seconds": 120},
    "writers": {"rounds": 6, "cli_every": 3},
    "fuzz": {"requests": 1500, "atheris_runs": 0},
    "restart": {"images": 12_000, "restarts": 1},
}


def broken(name: str, r: dict) -> list[str]:
    """The promises a campaign's result breaks (empty: all kept)."""
    out = []
    for key in ("lost_acknowledged", "half_applied", "http_5xx", "crashes", "http_500", "search_failures"):
        if r.get(key):
            out.append(f"{name}: {key} = {r[key]}")
    if r.get("index_loaded_every_time") is False:
        out.append(f"{name}: the index failed to load after a kill")
    if r.get("after_over_idle", 0) > 1.3:
        out.append(f"{name}: RSS after the burst is {r['after_over_idle']}x idle (> 1.3)")
    if r.get("written_outside_catalog"):
        out.append(f"{name}: files written outside the catalog")
    if name == "restart" and r.get("ready_max_s", 0) > 10:
        out.append(f"restart: /readyz took {r['ready_max_s']} s (> 10 s)")
    return out


def run(name: str, root: Path, params: dict, out: Path) -> list[str]:
    from .faults import fault_campaign
    from .fuzz import atheris_decode, hostile, http_fuzz, rss_burst
    from .restart import restart_campaign
    from .writers import kill_campaign, writers_campaign

    load = {"load_average_1m_at_start": round(os.getloadavg()[0], 2)}
    problems = []
    if name == "kill":
        results = {"kill": kill_campaign(root, **params)}
    elif name == "writers":
        results = {"writers": writers_campaign(root, **params)}
    elif name == "faults":
        results = {"faults": fault_campaign(root, **params)}
    elif name == "fuzz":
        wd = make_workdir(root)
        results = {
            "http_fuzz": http_fuzz(root, requests=params["requests"], wd=wd),
            "hostile": hostile(root, wd=wd),
            "rss_burst": rss_burst(root, wd=wd),
        }
        if params.get("atheris_runs"):
            results["atheris_decode"] = atheris_decode(params["atheris_runs"])
    elif name == "restart":
        results = {"restart": restart_campaign(root, **params)}
    else:
        raise SystemExit(f"unknown campaign {name!r}; available: kill, writers, faults, fuzz, restart")
    for key, result in results.items():
        result.update(load, load_average_1m_at_end=round(os.getloadavg()[0], 2))
        write_result(key, result, out)
        problems += broken(key, result)
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chaos", description=__doc__.split("\n")[2])
    parser.add_argument("campaigns", nargs="*", default=["faults", "writers", "kill", "fuzz", "restart"])
    parser.add_argument("--short", action="store_true", help="the few-seconds version (what the tests run)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON results")
    parser.add_argument("--set", action="append", default=[], metavar="CAMPAIGN.KEY=N", help="override a size")
    args = parser.parse_args(argv)
    sizes = SHORT if args.short else LONG
    problems = []
    for name in args.campaigns:
        params = dict(sizes.get(name, {}))
        for item in args.set:
            key, value = item.split("=", 1)
            campaign, _, field = key.partition(".")
            if campaign == name:
                params[field] = type(params.get(field, 0))(float(value)) if field in params else int(value)
        with tempfile.TemporaryDirectory(prefix=f"chaos-{name}-") as tmp:
            problems += run(name, Path(tmp), params, args.out)
    for p in problems:
        print(f"BROKEN: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
