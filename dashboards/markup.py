"""HTML building blocks of the report page: the page container (sections, figures, the JSON data
block), its stylesheet, and escaped paragraphs and tables. Nothing here knows what a sweep is."""

from __future__ import annotations

import html
import json
import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import plotly.graph_objects as go

__all__ = ["CSS", "PLOT_CONFIG", "Page", "attr_num", "esc", "how", "json_safe", "note", "table"]

PLOT_CONFIG = {"displaylogo": False, "responsive": True}
CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#243447;color:#fff;padding:14px 28px}header h1{margin:0;font-size:1.4em}
header p{margin:4px 0 0;opacity:.8;font-size:.9em}
nav{padding:8px 28px;background:#e8edf2;font-size:.9em}nav a{margin-right:14px;color:#243447}
main{padding:8px 28px 40px;max-width:1400px}
section{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px 20px 16px;margin:16px 0}
h2{font-size:1.2em;border-bottom:1px solid #eee;padding-bottom:4px}h3{font-size:1.05em}
p.how{color:#444;font-size:.93em;max-width:1000px}p.note{color:#8a5300;font-size:.9em}
table{border-collapse:collapse;font-size:.88em;margin:8px 0}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}th{background:#f1f4f7}
td.num{text-align:right;font-variant-numeric:tabular-nums}
table.decisions td:nth-child(4){min-width:320px}table.decisions td:nth-child(5){font-size:.92em}
.cards{display:flex;gap:16px;flex-wrap:wrap}.card{border:1px solid #cfd8e3;border-radius:6px;padding:6px 14px;
min-width:300px;background:#f7f9fb}.card h3{margin:6px 0}
dl.facts{display:grid;grid-template-columns:max-content auto;gap:2px 14px;font-size:.92em}dl.facts dt{color:#555}
dl.facts dd{margin:0}code{font-size:.9em}details summary{cursor:pointer;margin:6px 0}
"""


def esc(value: Any) -> str:
    """``value`` as text escaped for HTML content and attribute values."""
    return html.escape(str(value), quote=True)


def json_safe(value: Any) -> Any:
    """``value`` with non-finite floats as None (JSON has no NaN or infinity) and keys as strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def attr_num(value: float | None) -> str:
    """A number at full precision for a ``data-*`` attribute; empty for None."""
    return "" if value is None else repr(float(value))


class Page:
    """Collects sections and figures; ``html()`` assembles the file."""

    def __init__(self, title: str, subtitle: str) -> None:
        self.title, self.subtitle = title, subtitle
        self.sections: list[tuple[str, str, str]] = []   # (id, heading, body)
        self.figures: list[str] = []
        self.data: dict[str, Any] = {"figures": self.figures}

    def figure(self, fig: go.Figure, div_id: str) -> str:
        """The figure as an HTML fragment (plotly.js is embedded once, by ``html()``)."""
        self.figures.append(div_id)
        return fig.to_html(full_html=False, include_plotlyjs=False, div_id=div_id, config=PLOT_CONFIG)

    def section(self, sid: str, heading: str, body: str) -> None:
        self.sections.append((sid, heading, body))

    def html(self) -> str:
        from plotly.offline import get_plotlyjs

        nav = "".join(f'<a href="#{esc(sid)}">{esc(h)}</a>' for sid, h, _ in self.sections)
        body = "".join(f'<section id="{esc(sid)}"><h2>{esc(h)}</h2>{b}</section>' for sid, h, b in self.sections)
        data = json.dumps(json_safe(self.data), allow_nan=False, default=str).replace("</", "<\\/")
        return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
                f'<meta name="viewport" content="width=device-width, initial-scale=1">'
                f"<title>{esc(self.title)}</title><style>{CSS}</style>"
                f'<script type="text/javascript">{get_plotlyjs()}</script></head>'
                f"<body><header><h1>{esc(self.title)}</h1><p>{esc(self.subtitle)}</p></header>"
                f"<nav>{nav}</nav><main>{body}</main>"
                f'<script type="application/json" id="report-data">{data}</script></body></html>\n')


def how(text: str) -> str:
    """A paragraph saying how to read what follows."""
    return f'<p class="how">{esc(text)}</p>'


def note(text: str) -> str:
    """A paragraph noting something missing or unusual."""
    return f'<p class="note">{esc(text)}</p>'


def table(headers: list[str], rows: list[list[str]], cls: str = "", raw: bool = False) -> str:
    """An HTML table; cells are escaped unless ``raw`` (then they are HTML already)."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    cell = (lambda c: c) if raw else (lambda c: f"<td>{esc(c)}</td>")
    body = "".join("<tr>" + "".join(cell(c) for c in row) + "</tr>" for row in rows)
    return f'<table class="{esc(cls)}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
