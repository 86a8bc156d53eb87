"""The pieces of tlearn's self-contained HTML pages (the run report, the comparison): style, tables, embedded
figures, sections and the page itself."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

from tlearn.fileio import atomic_write_text

CSS = """body{font-family:system-ui,sans-serif;max-width:1180px;margin:2em auto;padding:0 1em;color:#222}
h1{margin-bottom:.2em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}td,th{border:1px solid #ddd;padding:.25em .6em;
text-align:left}th{background:#f3f3f3}td.n{text-align:right;font-variant-numeric:tabular-nums}
img{max-width:100%;border:1px solid #eee}.muted{color:#666}.kv td:first-child{font-weight:600}
.big{font-size:1.3em;font-weight:600}"""


def png_tag(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}">'


def html_table(rows: list[list[Any]], header: list[str], cls: str = "") -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f'<td class="n">{v:.4f}</td>'
        if isinstance(v, int):
            return f'<td class="n">{v:,}</td>'
        return f"<td>{html.escape(str(v))}</td>"

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(cell(v) for v in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><tr>{head}</tr>{body}</table>'


def section(title: str, *parts: str) -> str:
    return f"<h2>{html.escape(title)}</h2>\n" + "\n".join(parts)


def page(run_dir: Path, shown_as: Path, body: str) -> Path:
    """Write ``body`` as the run's self-contained ``report.html``, titled with the run's name."""
    text = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>tlearn report: "
            f"{html.escape(shown_as.name)}</title><style>{CSS}</style></head><body>{body}</body></html>\n")
    atomic_write_text(run_dir / "report.html", text)
    return run_dir / "report.html"
