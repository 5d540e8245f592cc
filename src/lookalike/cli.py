"""``lookalike``: a thin command line over the library. Each subcommand calls one library function and prints."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

from . import __version__, cli_products
from .cli_quality import cmd_doctor, cmd_eval, cmd_tune
from .settings import SECRET_SETTINGS, Settings, default_text, describe_setting, settings_fields

logger = logging.getLogger("lookalike")


# Which settings each subcommand shows in its --help. The others (e.g. build settings on search: the index records
# them, and a value given there is only checked against it) are accepted without a help line.
_PATHS = ("cache_dir", "index_file", "metadata_file")
_CATALOG = ("data_dir",)
_BUILD = (
    "model_name",
    "weights_path",
    "pretrained",
    "img_size",
    "embedding_dim",
    "pooling",
    "similarity_metric",
    "tune",
    "index_type",
    "exact_below",
)
_RUN = ("device", "runtime", "precision", "threads", "batch_size", "num_workers", "max_image_pixels")
_STORE = ("store", "milvus_uri", "collection")
_EXECUTOR = ("executor", "ray_address")
_SERVER = ("host", "port", "max_upload_bytes", "max_concurrent_searches", "search_queue_size")
_OPEN = (*_PATHS, *_CATALOG, *_RUN, *_STORE)  # commands that open a built index
COMMAND_SETTINGS: dict[str, tuple[str, ...]] = {
    "index": (*_CATALOG, *_PATHS, *_BUILD, *_RUN, *_STORE, *_EXECUTOR),
    "tune": (*_CATALOG, *_PATHS, *_BUILD, *_RUN, *_STORE, *_EXECUTOR),
    "search": _OPEN,
    "stats": _OPEN,
    "add": _OPEN,
    "remove": _OPEN,
    "serve": (*_OPEN, *_SERVER),
    "eval": ("cache_dir", *_BUILD, *_RUN, *_STORE),
    "records": (*_PATHS, *_CATALOG, *_STORE),
    "doctor": (*_CATALOG, *_PATHS, *_BUILD, *_RUN),
    "regions": _OPEN,
    "export": _OPEN,
    "demo": _BUILD + _RUN,
}


def _settings_parser(command: str) -> argparse.ArgumentParser:
    """The settings flags of one subcommand, each with its one-line description."""
    shown = COMMAND_SETTINGS[command]
    names = {f.name: f for f in settings_fields()}
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("settings (override configs/configs.yaml and LOOKALIKE_* variables)")
    group.add_argument("--config", metavar="FILE", help="YAML settings file (default: configs/configs.yaml)")
    grouped = {n for names_ in COMMAND_SETTINGS.values() for n in names_}
    if command in {"index", "tune"}:  # settings that no group names yet (added by other work) go with the build
        shown = (*shown, *(n for n in names if n not in grouped and n not in _SERVER))
    # The others are accepted without a line in --help (a config file or a script may pass them everywhere);
    # the server's only by serve.
    accepted = [n for n in shown if n in names] + [
        n for n in names if n not in shown and (n not in _SERVER or command == "serve")
    ]
    for name in accepted:
        if name in SECRET_SETTINGS:  # secrets come from the environment or the file, never from `ps`
            continue
        help_text = describe_setting(name) if name in shown else argparse.SUPPRESS
        default = default_text(name)
        if help_text is not argparse.SUPPRESS and default is not None:
            help_text += f" (default: {default})"
        group.add_argument("--" + name.replace("_", "-"), dest=name, metavar="VALUE", default=None, help=help_text)
    group.add_argument("-v", "--verbose", action="count", default=0, help="progress messages (-vv: debug)")
    return common


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lookalike", description="Visual product search over a catalog of photos.")
    parser.add_argument("--version", action="version", version=f"lookalike {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[_settings_parser(name)], help=help_text, description=help_text)

    p = command("index", "build or update the index of data_dir")
    p.add_argument("--force", action="store_true", help="extract every image again, ignoring the cache")

    p = command("search", "find the products that look like one or more photos")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="photo files, or folders of photos, to search with")
    p.add_argument("--top-k", type=int, default=5, help="results per photo (default: 5)")
    p.add_argument("--images", dest="by_image", action="store_true", help="one row per image, not per product")
    p.add_argument("--min-similarity", type=float, default=None, help="drop results under this similarity")
    p.add_argument("--only-matches", action="store_true", help="drop results under the calibrated no-match threshold")
    p.add_argument("--where", action="append", metavar="CLAUSE", help="only products whose record passes, e.g. "
                   "'category=dairy', 'price<=20', 'tags~organic' (repeat: all must hold)")  # fmt: skip
    p.add_argument("--box", metavar="X0,Y0,X1,Y1", help="search only this part of each photo (pixels)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="one JSON object per result line (JSON lines)")
    out.add_argument("--csv", action="store_true", help="CSV with a header line")

    p = command("stats", "catalog and index statistics")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = command("eval", "measure retrieval quality on a labelled catalog")
    p.add_argument("--catalog", required=True, help="catalog folder to index (<product>/<images>)")
    p.add_argument("--queries", help="photos to search with, same layout (the folder names the right product)")
    p.add_argument("--iconic", help="studio shots to search with, same layout (cross-domain protocol)")
    p.add_argument("--no-loo", action="store_true", help="skip leave-one-out over the catalog")
    p.add_argument(
        "--leave-out",
        type=int,
        default=0,
        metavar="N",
        help="also measure 'not in my catalog' with N products left out of the index (needs --queries)",
    )
    p.add_argument("--json", dest="json_out", metavar="OUT", help="also write the results to this JSON file")
    p.add_argument("--report", metavar="DIR", help="write an HTML report (worst queries, confusions) to DIR")

    p = command("tune", "fit catalog tuning now and reindex (lda), or fine-tune the backbone (finetune)")
    p.add_argument(
        "--method",
        choices=("lda", "finetune"),
        default="lda",
        help="lda: a projection over the frozen features (seconds); finetune: train the backbone's last block on "
        "the catalog (minutes), then reindex with it and the projection (as tune: finetune)",
    )
    p.add_argument("--out", metavar="FILE", help="finetune: only write the checkpoint here (.safetensors), no reindex")

    p = command("doctor", "check the catalog: duplicates, mislabels, outliers, blur")
    p.add_argument("--catalog", help="catalog folder to check (default: data_dir)")
    p.add_argument("--out", default="doctor-report", metavar="DIR", help="where to write doctor.html and doctor.json")
    p.add_argument("--json", action="store_true", help="print the whole report as JSON")

    p = command("add", "add images to a product (copied into data_dir) and index them")
    p.add_argument("product_id", help="the product the photos show (its folder name)")
    p.add_argument("images", nargs="+", help="photo files to add")

    p = command("remove", "remove a product from the index")
    p.add_argument("product_id", help="the product to remove")

    p = command("serve", "HTTP API and web page over the index (see docs/server.md)")
    p.add_argument("--no-access-log", action="store_true", help="do not log every request")

    p = command("demo", "offline demo on photos shipped with scikit-image")
    p.add_argument("--workdir", help="where to write the demo catalog and index (default: a temporary folder)")
    cli_products.add_parsers(command)  # records, regions, export
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    overrides = {f.name: getattr(args, f.name) for f in settings_fields() if getattr(args, f.name, None) is not None}
    if args.config:
        return Settings(config_file=Path(args.config), **overrides)
    return Settings(**overrides)


def _engine(settings: Settings):
    from .engine import ImageSearchEngine

    engine = ImageSearchEngine(settings)
    engine.load_index()
    return engine


def _table(rows: list[list[Any]], header: list[str]) -> str:
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def cmd_index(args, settings: Settings) -> int:
    from .engine import ImageSearchEngine

    report = ImageSearchEngine(settings).build_index(force_rebuild=args.force)
    print(
        f"indexed {report.images} images of {report.products} products "
        f"({report.extracted} extracted, {report.reused} from cache) in {report.seconds:.1f}s"
    )
    print(_tuning_line(report.tuning))
    if report.records.get("source") or report.records.get("error"):
        print("\n".join(cli_products.records_lines(report.records, settings.data_dir)))
    if report.tuning.get("finetune"):
        from .finetuned import describe

        print(describe(report.tuning["finetune"]))
    for s in report.skipped:
        print(f"skipped {s['path']}: {s['reason']}")
    return 0


def _tuning_line(tuning: dict) -> str:
    """What the build did about catalog tuning, in one line (it is on by default and may decline)."""
    status = tuning.get("status", "off")
    if status == "tuned":
        val = tuning.get("validation", {})
        try:
            before, after = val["untuned"]["product_recall@1"], val["tuned"]["product_recall@1"]
            return f"tuning: tuned (held-out catalog recall@1 {before:.3f} -> {after:.3f})"
        except (KeyError, TypeError):
            return "tuning: tuned"
    if status == "declined":
        return f"tuning: declined ({tuning.get('reason')})"
    return "tuning: off (tune: false)"


def cmd_search(args, settings: Settings) -> int:
    from .filters import FilterError
    from .products import BoxError

    queries = _query_files(args.images)
    try:
        results = _engine(settings).search_batch(
            [str(q) for q in queries],
            top_k=args.top_k,
            by_product=not args.by_image,
            min_similarity=args.min_similarity,
            only_matches=args.only_matches,
            where=args.where,
            boxes=None if args.box is None else [args.box] * len(queries),
        )
    except (FilterError, BoxError) as exc:  # a usage error: one line, exit 2 (as argparse does)
        print(f"lookalike: error: {exc}", file=sys.stderr)
        return 2
    rows = [{"query": str(q), **hit} for q, hits in zip(queries, results) for hit in hits]
    shown = [k for k in ("name", "price") if any(k in (r.get("record") or {}) for r in rows)]
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    columns = ["query", "rank", "product_id", *shown, "similarity"]
    if any("match" in r for r in rows):
        columns.append("match")
    columns += ["image_id", "image_path"]
    for r in rows:
        r.update({k: (r.get("record") or {}).get(k) for k in shown})
    if args.csv:
        import csv

        writer = csv.DictWriter(sys.stdout, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return 0
    if not rows:
        print("no match")
        return 0
    header = ["rank", "product", *shown, "similarity", "image"]
    table = []
    for r in rows:
        extra = ["" if r[k] is None else (f"{r[k]:.2f}" if k == "price" else r[k]) for k in shown]
        row = [r["rank"], r["product_id"], *extra, f"{r['similarity']:.3f}", r["image_path"]]
        if "match" in columns:
            row.insert(3 + len(shown), "yes" if r.get("match") else "no")
        if len(queries) > 1:
            row.insert(0, r["query"])
        table.append(row)
    if "match" in columns:
        header.insert(3 + len(shown), "match")
    if len(queries) > 1:
        header.insert(0, "query")
    print(_table(table, header))
    return 0


def _query_files(items: list[str]) -> list[Path]:
    """The photos to search with: files as given, folders expanded to the photos inside them (sorted, nested
    folders included, hidden entries skipped)."""
    from .catalog import is_image_name

    out: list[Path] = []
    for item in items:
        path = Path(item).expanduser()
        if not path.is_dir():
            out.append(path)  # a missing or bad file is reported by the search, naming it
            continue
        found = sorted(
            p
            for p in path.rglob("*")
            if is_image_name(p.name)
            and p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not found:
            raise ValueError(f"folder {path} holds no photos (.jpg, .jpeg, .png, .webp)")
        out.extend(found)
    return out


def cmd_stats(args, settings: Settings) -> int:
    stats = _engine(settings).get_statistics()
    if args.json:
        print(json.dumps(stats, indent=2))
        return 0
    for key, value in stats.items():
        if key == "skipped_files":
            for s in value:
                print(f"  skipped {s['path']}: {s['reason']}")
        elif key == "duplicate_files":
            for group in value:
                print(f"  same photo in several products: {', '.join(group)}")
        else:
            print(f"{key}: {json.dumps(value) if isinstance(value, dict) else value}")
    return 0


def cmd_add(args, settings: Settings) -> int:
    out = _engine(settings).add_images(args.product_id, args.images)
    print(f"added {out['added']} image(s) to {out['product_id']}; the index now holds {out['images']} images")
    return 0


def cmd_remove(args, settings: Settings) -> int:
    out = _engine(settings).remove_product(args.product_id)
    moved = f"; its folder moved to {out['moved_to']}" if out["moved_to"] else ""
    print(f"removed {out['product_id']} ({out['removed']} images){moved}; the index now holds {out['images']} images")
    return 0


def cmd_serve(args, settings: Settings) -> int:
    try:
        from .server import serve
    except ImportError as exc:
        raise RuntimeError(
            f"the server needs the 'server' extra ({exc.name} is missing): pip install 'lookalike[server]'"
        ) from None
    if not args.verbose:  # say when the index is loaded and searches can start
        logging.getLogger("lookalike.server").setLevel(logging.INFO)
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn has shut down gracefully and passes the Ctrl+C on
        serve(settings, access_log=not args.no_access_log)
    return 0


def cmd_demo(args, settings: Settings) -> int:
    from .demo import run_demo

    if args.workdir:
        queries = run_demo(settings, Path(args.workdir))
    else:
        with tempfile.TemporaryDirectory(prefix="lookalike-demo-") as tmp:
            queries = run_demo(settings, Path(tmp))
    rows = []
    for q in queries:
        found = [f"{h['product_id']} ({h['similarity']:.2f})" for h in q.results]
        rows.append([f"{q.expected}/{q.path.name}", q.expected, *found, "yes" if q.found_first else "NO"])
    k = max(len(q.results) for q in queries)
    print(_table(rows, ["held-out query view", "its product", *[f"match {i + 1}" for i in range(k)], "first?"]))
    hits = sum(q.found_first for q in queries)
    print(f"\n{hits}/{len(queries)} held-out views found their own product first (model {settings.model_name})")
    return 0 if hits == len(queries) else 1


COMMANDS = {
    "index": cmd_index,
    "search": cmd_search,
    "stats": cmd_stats,
    "eval": cmd_eval,
    "tune": cmd_tune,
    "doctor": cmd_doctor,
    "add": cmd_add,
    "remove": cmd_remove,
    "serve": cmd_serve,
    "demo": cmd_demo,
    **cli_products.COMMANDS,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("faiss").setLevel(logging.WARNING)
    try:
        settings = settings_from_args(args)
        return COMMANDS[args.command](args, settings)
    except KeyboardInterrupt:
        print("lookalike: interrupted", file=sys.stderr)
        return 130
    except (ValueError, RuntimeError, OSError, LookupError) as exc:
        logger.debug("failure", exc_info=True)
        print(f"lookalike: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
