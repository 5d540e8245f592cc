"""An HTML page that says where retrieval goes wrong: summary, worst queries with thumbnails, most-confused
product pairs, per-product recall. Self-contained (thumbnails inlined), so it can be mailed or archived."""

from __future__ import annotations

import base64
import html
import io
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from .evaluation import describe_no_match
from .imaging import ImageError, open_image
from .store import atomic_write_bytes

THUMB = 96
WORST = 12
METRIC_KEYS = ("recall@1", "precision@5", "map@r", "product_hit@5", "mrr")


def _thumb(path: str) -> str:
    try:
        img = open_image(path, 100_000_000).image
    except ImageError:
        return ""
    img.thumbnail((THUMB, THUMB))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _cell(path: str, caption: str, good: bool | None = None) -> str:
    css = "" if good is None else (" good" if good else " bad")
    src = _thumb(path)
    img = f'<img src="{src}" alt="">' if src else '<div class="missing">?</div>'
    return f'<figure class="t{css}">{img}<figcaption>{html.escape(caption)}</figcaption></figure>'


def _metrics_table(protocols: dict[str, Any]) -> str:
    head = "".join(f"<th>{k}</th>" for k in ("protocol", "queries", *METRIC_KEYS, "product_recall@1"))
    rows = []
    for name, p in protocols.items():
        m = p["metrics"]
        cells = [html.escape(name), str(m["queries"])] + [
            f"{m.get(k, 0):.3f}" for k in (*METRIC_KEYS, "product_recall@1")
        ]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def _protocol_section(name: str, protocol: dict[str, Any]) -> str:
    details = protocol["details"]
    worst = sorted(details, key=lambda d: (d.get("recall@1", 0), d.get("ap@r", 0)))[:WORST]
    rows = []
    for d in worst:
        cells = [_cell(d["path"], f"query: {d['label']}")]
        cells += [
            _cell(r["path"], f"{r['product_id']} {r['similarity']:.3f}", r["product_id"] == d["label"])
            for r in d["results"]
        ]
        rows.append(f'<div class="row"><span class="ap">AP@R {d.get("ap@r", 0):.2f}</span>{"".join(cells)}</div>')
    confused = Counter(
        (d["label"], d["products"][0]) for d in details if d["products"] and d["products"][0] != d["label"]
    )
    conf_rows = "".join(
        f"<tr><td>{html.escape(a)}</td><td>{html.escape(b)}</td><td>{n}</td></tr>"
        for (a, b), n in confused.most_common(15)
    )
    per_product: dict[str, list[float]] = defaultdict(list)
    for d in details:
        per_product[d["label"]].append(1.0 if d["products"][:1] == [d["label"]] else 0.0)
    recall_rows = "".join(
        f"<tr><td>{html.escape(p)}</td><td>{len(v)}</td><td>{sum(v) / len(v):.2f}</td></tr>"
        for p, v in sorted(per_product.items(), key=lambda kv: (sum(kv[1]) / len(kv[1]), kv[0]))
    )
    return (
        f"<h2>{html.escape(name)}</h2>"
        f"<h3>The {len(worst)} worst queries (top five images; green: right product)</h3>{''.join(rows)}"
        "<h3>Most confused product pairs (query's product, product ranked first)</h3>"
        f"<table><tr><th>query product</th><th>ranked first</th><th>queries</th></tr>{conf_rows}</table>"
        "<h3>Per-product recall@1 (product level), worst first</h3>"
        f"<table><tr><th>product</th><th>queries</th><th>recall@1</th></tr>{recall_rows}</table>"
    )


CSS = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:.5em 0 1.5em}
td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}.row{display:flex;align-items:flex-start;gap:.4em;
margin:.4em 0}.t{margin:0;width:104px;font-size:11px}.t img,.missing{width:96px;height:96px;object-fit:cover;
border:4px solid #eee}.good img{border-color:#3a3}.bad img{border-color:#d33}.ap{width:5em;font-size:12px}
"""


def write_report(result: dict[str, Any], out_dir: Path) -> Path:
    """Write ``out_dir/index.html`` for an :func:`~lookalike.evaluation.evaluate` result; returns its path."""
    model = result["model"]
    tuning = result.get("tuning", {}).get("status", "off")
    parts = [
        f"<h1>lookalike evaluation: {html.escape(result['catalog'])}</h1>",
        f"<p>{result['catalog_images']} catalog images of {result['catalog_products']} products; model "
        f"{html.escape(model['model_name'])} at {model['input_size']}px, "
        f"pooling {html.escape(str(model.get('pooling')))}, metric {html.escape(result['metric'])}, "
        f"tuning {html.escape(tuning)}.</p>",
        _metrics_table(result["protocols"]),
    ]
    if "no_match" in result:
        parts.append(f"<p>{html.escape(describe_no_match(result['no_match']))}</p>")
    for name, protocol in result["protocols"].items():
        parts.append(_protocol_section(name, protocol))
    page = f"<!doctype html><meta charset=utf-8><title>lookalike evaluation</title><style>{CSS}</style>{''.join(parts)}"
    out = Path(out_dir) / "index.html"
    atomic_write_bytes(out, page.encode("utf-8"))
    return out
