"""The product subcommands of ``lookalike``: ``records``, ``regions`` and ``export``. Kept apart from
``cli.py`` so that file only registers them (:func:`add_parsers`, :data:`COMMANDS`)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from .settings import Settings


def add_parsers(command: Callable[[str, str], argparse.ArgumentParser]) -> None:
    """Register the subcommands with ``command(name, help)`` (cli.build_parser's: it adds their settings)."""
    p = command("records", "re-read products.csv / products.jsonl and save it with the index")
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    p = command("regions", "find every product in a photo of several")
    p.add_argument("image", help="photo file")
    p.add_argument("--top-k", type=int, default=3, help="hits per region")
    p.add_argument("--max-regions", type=int, default=10, help="most regions reported (default: 10)")
    p.add_argument("--min-similarity", type=float, default=None, help="weakest region kept")
    p.add_argument("--where", action="append", metavar="CLAUSE", help="only these products, e.g. 'category=dairy'")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = command("export", "write image ids, product ids, paths, vectors and records")
    p.add_argument("out", help="a .parquet file, or a folder for --format npy")
    p.add_argument(
        "--format",
        dest="export_format",
        choices=("parquet", "npy"),
        default="parquet",
        help="parquet (one file) or npy (vectors.npy + items.json)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing export")


def _engine(settings: Settings):
    from .engine import ImageSearchEngine

    engine = ImageSearchEngine(settings)
    engine.load_index()
    return engine


def cmd_records(args, settings: Settings) -> int:
    from .engine import ImageSearchEngine

    d = ImageSearchEngine(settings).update_records()  # opens the index without the model: no image is read
    if args.json:
        print(json.dumps(d, indent=2, ensure_ascii=False))
        return 0
    for line in records_lines(d, settings.data_dir):
        print(line)
    return 1 if d.get("error") else 0


def records_lines(d: dict, data_dir) -> list[str]:
    """A records report (``RecordsReport.to_dict()``) as the lines ``records`` and ``index`` print."""
    if d.get("error"):
        return [f"records not updated: {d['error']}"]
    if d["source"] is None:
        return [f"no products.csv or products.jsonl in {data_dir}: results carry no records"]
    lines = [
        f"{d['loaded']} record(s) from {d['source']}; {d['skipped_lines']} line(s) skipped; "
        f"{len(d['records_without_folder'])} without a product folder; "
        f"{len(d['products_without_record'])} product folder(s) without a record"
    ]
    lines += [f"  {issue}" for issue in d["issues"]]
    lines += [f"  record without a folder: {pid}" for pid in d["records_without_folder"]]
    return lines


def cmd_regions(args, settings: Settings) -> int:
    from .filters import FilterError

    try:
        regions = _engine(settings).search_regions(
            args.image, top_k=args.top_k, max_regions=args.max_regions, min_similarity=args.min_similarity,
            where=args.where,
        )  # fmt: skip
    except FilterError as exc:
        print(f"lookalike: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([r.to_dict() for r in regions], indent=2, ensure_ascii=False))
    elif not regions:
        print("no product found")
    else:
        for n, r in enumerate(regions, start=1):
            others = ", ".join(f"{h['product_id']} ({h['similarity']:.2f})" for h in r.hits[1:])
            print(
                f"{n}. box {','.join(map(str, r.box))}: {r.product_id} ({r.score:.3f})"
                + (f"; then {others}" if others else "")
            )
    return 0


def cmd_export(args, settings: Settings) -> int:
    from .export import export_index

    out = export_index(_engine(settings), args.out, format=args.export_format, overwrite=args.overwrite)
    print(f"wrote {out} ({args.export_format})")
    return 0


COMMANDS = {"records": cmd_records, "regions": cmd_regions, "export": cmd_export}
