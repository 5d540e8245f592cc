"""The self-contained HTML (and JSON) page of a ``lookalike doctor`` report."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from .files import atomic_write_bytes
from .imaging import ImageError, open_image

THUMB = 112


def _thumb(path: Path) -> str:
    try:
        img = open_image(path, 100_000_000).image
    except (ImageError, OSError):
        return ""
    img.thumbnail((THUMB, THUMB))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _fig(root: Path, rel: str, caption: str) -> str:
    src = _thumb(root / rel)
    img = f'<img src="{src}" alt="">' if src else '<div class="missing">?</div>'
    return f"<figure>{img}<figcaption>{html.escape(caption)}</figcaption></figure>"


def _section(title: str, note: str, rows: list[str], empty: str) -> str:
    body = "".join(rows) if rows else f'<p class="ok">{html.escape(empty)}</p>'
    head = f"<h2>{html.escape(title)} <span class=n>{len(rows)}</span></h2>"
    return f"<section>{head}<p>{html.escape(note)}</p>{body}</section>"


def render_html(report: dict[str, Any]) -> str:
    root = Path(report["catalog"])
    t = report["thresholds"]
    c = report["counts"]
    dup_rows = [
        f'<div class="row">{_fig(root, d["a"]["path"], d["a"]["path"])}{_fig(root, d["b"]["path"], d["b"]["path"])}'
        f'<p class="why">{d["kind"]} duplicate: cosine {d["cosine"]:.3f}, {d["hash_bits"]} of 64 hash bits differ. '
        f"Keep it in the right product only.</p></div>"
        for d in report["duplicates"]
    ]
    mis_rows = [
        f'<div class="row">{_fig(root, d["path"], d["path"])}<p class="why">'
        f"filed under <b>{html.escape(d['product_id'])}</b> but looks like <b>{html.escape(d['looks_like'])}</b> "
        f"({d['other_score']:.3f} vs {d['own_score']:.3f} "
        f"for its own folder).</p></div>"
        for d in report["mislabelled"]
    ]
    out_rows = [
        f'<div class="row">{_fig(root, d["path"], d["path"])}<p class="why">unlike the rest of '
        f"<b>{html.escape(d['product_id'])}</b> (robust z {d['z']:.1f}). "
        "Another product, a wrong crop, or clutter?</p></div>"
        for d in report["outliers"]
    ]
    conf_rows = [
        f"<tr><td>{html.escape(d['a'])}</td><td>{html.escape(d['b'])}</td><td>{d['close_photos']}</td>"
        f"<td>{d['mean_margin']:+.3f}</td></tr>"
        for d in report["confused_pairs"]
    ]
    conf = (
        "<section><h2>Products the engine confuses</h2><p>Photos whose nearest other product scores within 0.1 of "
        "their own. More photos that show what tells these apart (labels, colours, sides) help most.</p>"
        "<table><tr><th>product</th><th>product</th><th>close photos</th><th>mean margin</th></tr>"
        + "".join(conf_rows)
        + "</table></section>"
    )
    small_rows = [
        f'<div class="row">{_fig(root, d["path"], d["path"])}<p class="why">{d["width"]}x{d["height"]} px: '
        f"under {t['min_side']} px on its shorter side.</p></div>"
        for d in report["tiny"]
    ] + [
        f'<div class="row">{_fig(root, d["path"], d["path"])}<p class="why">blurred: Laplacian variance '
        f"{d['laplacian_variance']} (under {t['blur_variance']}).</p></div>"
        for d in report["blurred"]
    ]
    bad_rows = [f"<p>{html.escape(d['path'])}: {html.escape(d['reason'])}</p>" for d in report["unreadable"]]
    summary = (
        f"{c['checked']} of {c['images']} photos of {c['products']} products checked with "
        f"{html.escape(report['model']['model_name'])} ({html.escape(report['space'])}) in {report['seconds']} s."
    )
    sections = [
        _section(
            "Duplicates across products",
            "The same photo filed under two products: a search then cannot tell which is meant.",
            dup_rows,
            "No photo is filed under two products.",
        ),
        _section(
            "Likely mislabelled",
            f"Photos that another product's photos resemble more than their own folder's (by over "
            f"{t['mislabel_margin']}).",
            mis_rows,
            "Every photo looks most like its own product.",
        ),
        _section(
            "Outliers within a product",
            "Photos much less like their product than its other photos are.",
            out_rows,
            "No outliers.",
        ),
        conf,
        _section("Tiny or blurred photos", "Too little detail to tell products apart.", small_rows, "None."),
        _section("Unreadable files", "Skipped by every build.", bad_rows, "None."),
    ]
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>lookalike doctor</title>
<style>
body{{font:14px/1.4 system-ui,sans-serif;margin:24px;max-width:1100px;color:#222}}
h1{{font-size:22px}} h2{{font-size:17px;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:28px}}
.n{{background:#eee;border-radius:10px;padding:1px 8px;font-size:13px}}
.row{{display:flex;gap:10px;align-items:center;border-bottom:1px solid #f0f0f0;padding:6px 0}}
figure{{margin:0;width:{THUMB + 8}px}} figure img{{max-width:{THUMB}px;max-height:{THUMB}px;display:block}}
figcaption{{font-size:11px;color:#555;word-break:break-all}} .why{{flex:1}} .ok{{color:#276227}}
table{{border-collapse:collapse}} td,th{{border:1px solid #ddd;padding:3px 8px;text-align:left}}
.missing{{width:{THUMB}px;height:{THUMB}px;background:#eee}}
</style></head><body>
<h1>Catalog health: {html.escape(str(root))}</h1><p>{summary}</p>
{"".join(sections)}
</body></html>"""


def write_report(report: dict[str, Any], out_dir: Path) -> Path:
    """``doctor.json`` and ``doctor.html`` in ``out_dir``; returns the HTML's path."""
    out_dir = Path(out_dir)
    atomic_write_bytes(out_dir / "doctor.json", json.dumps(report, indent=1, ensure_ascii=False).encode("utf-8"))
    page = out_dir / "doctor.html"
    atomic_write_bytes(page, render_html(report).encode("utf-8"))
    return page


__all__ = ["THUMB", "render_html", "write_report"]
