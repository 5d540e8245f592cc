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
        print("| model | setting | input | images/s | x seed |")
        print("|---|---|---|---|---|")
        for r in extract["results"]:
            print(
                f"| {r['model']} | {r['setting']} | {r['img_size']} | {r['images_per_s']:.1f} | "
                f"{r['ratio_to_seed']:.2f} |"
            )
        print()
    search = _load(folder / "search.json")
    if search:
        print("| vectors | index | factory | MB | p50 ms | batch q/s | recall@10 | p50 x seed |")
        print("|---|---|---|---|---|---|---|---|")
        for r in search["index"]:
            print(
                f"| 10k x {r['dim']} | {r['index']} | `{r['factory']}` | {r['mb']:.1f} | {r['p50_ms']:.2f} | "
                f"{r['batch_qps']:.0f} | {r['recall@10']:.3f} | {r['p50_ratio_to_seed']:.1f} |"
            )
        print()
        print("| model | setting | p50 ms | p90 ms | x seed |")
        print("|---|---|---|---|---|")
        for r in search["end_to_end"]:
            cells = [r["model"], r["setting"], f"{r['p50_ms']:.1f}", f"{r['p90_ms']:.1f}", f"{r['ratio_to_seed']:.2f}"]
            print("| " + " | ".join(cells) + " |")
        print()
    big = _load(folder / "index_1m.json")
    if big:
        print("| vectors | factory | build s | bytes/vector | memory vs flat fp32 | p50 ms | p90 ms | recall@10 |")
        print("|---|---|---|---|---|---|---|---|")
        for r in big["results"]:
            print(
                f"| {r['n']:,} x {r['dim']} | `{r['factory']}` | {r['build_s']:.0f} | {r['bytes_per_vector']:.0f} | "
                f"1/{1 / r['memory_vs_flat_fp32']:.1f} | {r['p50_ms']:.2f} | {r['p90_ms']:.2f} | {r['recall@10']:.3f} |"
            )


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


if __name__ == "__main__":
    main()
