"""The README's "Speed" tables, as Markdown, from the JSON that `make bench` (and `make bench-1m`) wrote.

python benchmarks/tables.py [results/bench]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from common import RESULTS


def main() -> None:
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS
    extract = _load(folder / "extract.json")
    if extract:
        _table(
            ["model", "setting", "input", "images/s", "x seed"],
            [
                [r["model"], r["setting"], r["img_size"], f"{r['images_per_s']:.1f}", f"{r['ratio_to_seed']:.2f}"]
                for r in extract["results"]
            ],
        )
    search = _load(folder / "search.json")
    if search:
        _table(
            ["vectors", "index", "factory", "MB", "p50 ms", "batch q/s", "recall@10", "p50 x seed"],
            [
                [
                    f"10k x {r['dim']}",
                    r["index"],
                    f"`{r['factory']}`",
                    f"{r['mb']:.1f}",
                    f"{r['p50_ms']:.2f}",
                    f"{r['batch_qps']:.0f}",
                    f"{r['recall@10']:.3f}",
                    f"{r['p50_ratio_to_seed']:.1f}",
                ]
                for r in search["index"]
            ],
        )
        _table(
            ["model", "setting", "p50 ms", "p90 ms", "x seed"],
            [
                [r["model"], r["setting"], f"{r['p50_ms']:.1f}", f"{r['p90_ms']:.1f}", f"{r['ratio_to_seed']:.2f}"]
                for r in search["end_to_end"]
            ],
        )
    big = _load(folder / "index_1m.json")
    if big:
        _table(
            ["vectors", "factory", "build s", "bytes/vector", "memory vs flat fp32", "p50 ms", "p90 ms", "recall@10"],
            [
                [
                    f"{r['n']:,} x {r['dim']}",
                    f"`{r['factory']}`",
                    f"{r['build_s']:.0f}",
                    f"{r['bytes_per_vector']:.0f}",
                    f"1/{1 / r['memory_vs_flat_fp32']:.1f}",
                    f"{r['p50_ms']:.2f}",
                    f"{r['p90_ms']:.2f}",
                    f"{r['recall@10']:.3f}",
                ]
                for r in big["results"]
            ],
        )


def _table(columns: list[str], rows: list[list]) -> None:
    """A Markdown table, then a blank line."""
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for cells in rows:
        print("| " + " | ".join(str(c) for c in cells) + " |")
    print()


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


if __name__ == "__main__":
    main()
