"""The quality subcommands of ``lookalike``: ``eval``, ``tune`` (projection or fine-tuning) and ``doctor``.
Kept apart from ``cli.py``, which registers their flags and lists them in its ``COMMANDS``."""

from __future__ import annotations

import json
from pathlib import Path

from .settings import Settings


def cmd_eval(args, settings: Settings) -> int:
    from .cli import _table
    from .evaluation import evaluate

    result = evaluate(
        settings,
        args.catalog,
        args.queries,
        iconic_dir=args.iconic,
        leave_one_out=not args.no_loo,
        leave_out_products=args.leave_out,
    )
    tuning = result["tuning"].get("status", "off")
    print(
        f"catalog {args.catalog}: {result['catalog_images']} images of {result['catalog_products']} products; "
        f"model {result['model']['model_name']} at {result['model']['input_size']}px, tuning {tuning}"
    )
    # recall@1 is the top image's product; product_recall@1 the first product search() answers by default
    keys = ["recall@1", "precision@5", "map@r", "product_hit@5", "mrr", "product_recall@1"]
    rows = [
        [name, p["metrics"]["queries"], *(f"{p['metrics'].get(k, 0.0):.3f}" for k in keys)]
        for name, p in result["protocols"].items()
    ]
    print(_table(rows, ["protocol", "queries", *keys]))
    if result["tuning"].get("finetune"):
        from .finetuned import describe

        print(describe(result["tuning"]["finetune"]))
    if "no_match" in result:
        from .evaluation import describe_no_match

        print(describe_no_match(result["no_match"]))
    if args.json_out:
        from .store import atomic_write_bytes

        atomic_write_bytes(Path(args.json_out), json.dumps(result, indent=2).encode())
        print(f"wrote {args.json_out}")
    if args.report:
        from .report import write_report

        print(f"wrote {write_report(result, Path(args.report))}")
    return 0


def cmd_tune(args, settings: Settings) -> int:
    if args.method == "finetune":
        return _cmd_finetune(args, settings)
    from .engine import ImageSearchEngine

    report = ImageSearchEngine(settings).build_index(tune=True)
    tuning = report.tuning
    if tuning.get("status") != "tuned":
        print(f"tuning declined: {tuning.get('reason')}; the index was rebuilt untuned")
        return 0
    val = tuning["validation"]
    print(
        f"tuned: {tuning['dim']}-d projection from {tuning['images']} images of {tuning['products']} products "
        f"(shrinkage {tuning['shrinkage']}); on held-out catalog images recall@1 "
        f"{val['untuned']['product_recall@1']:.3f} -> {val['tuned']['product_recall@1']:.3f}, MAP@R "
        f"{val['untuned']['map@r']:.3f} -> {val['tuned']['map@r']:.3f}. Index rebuilt with it: {report.images} images."
    )
    print("Later builds refit it (tune is on by default; tune: false turns it off).")
    return 0


def cmd_doctor(args, settings: Settings) -> int:
    from .doctor import diagnose

    report = diagnose(settings, data_dir=args.catalog, out_dir=Path(args.out))
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    c = report["counts"]
    print(f"checked {c['checked']} of {c['images']} photos of {c['products']} products")
    for key, what in (
        ("duplicates", "duplicate pair(s) across products"),
        ("mislabelled", "photo(s) that look like another product"),
        ("outliers", "outlier(s) within their product"),
        ("tiny", "tiny photo(s)"),
        ("blurred", "blurred photo(s)"),
        ("unreadable", "unreadable file(s)"),
    ):
        print(f"{len(report[key]):5d} {what}")
    print(f"wrote {Path(args.out) / 'doctor.html'} and doctor.json")
    return 0


def _cmd_finetune(args, settings: Settings) -> int:
    if args.out:  # only the checkpoint, for use elsewhere (weights_path)
        return _export_finetuned(args, settings)
    from .engine import ImageSearchEngine

    report = ImageSearchEngine(settings).build_index(tune="finetune")
    info = report.tuning.get("finetune") or {}
    if info.get("status") != "finetuned":
        print(f"fine-tuning declined: {info.get('reason')}; the index was rebuilt with the projection (tune: true)")
        return 0
    from .finetuned import describe

    print(describe(info))
    print(f"Index rebuilt with it: {report.images} images. Later builds keep tune: finetune and reuse the model "
          "while the catalog is unchanged.")  # fmt: skip
    return 0


def _export_finetuned(args, settings: Settings) -> int:
    from .finetune import FinetuneDeclined, finetune

    try:
        result = finetune(settings, out_path=args.out)
    except FinetuneDeclined as exc:
        print(f"fine-tuning declined: {exc}")
        return 0
    val = result.info["validation"]
    best = max(val["finetuned"]["map@r"], val["finetuned+lda"]["map@r"])
    secs = result.info["seconds"]
    print(
        f"fine-tuned {result.info['base_model']} on {result.info['images']} photos of {result.info['products']} "
        f"products in {secs['wall']:.0f} s: on held-out catalog photos MAP@R {val['untuned']['map@r']:.3f} untuned, "
        f"{val['lda']['map@r']:.3f} LDA, {best:.3f} fine-tuned.\nwrote {result.path} ({result.fingerprint})"
    )
    print(f"Use it elsewhere with weights_path: {result.path}; here, tune: finetune builds and reuses it itself.")
    return 0
