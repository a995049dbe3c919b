"""The pieces every section of the HTML page is made of, and the page's style and self-check.

Text that came from a file always passes through :func:`esc`; images are inlined as base64
data URIs, so the page opens offline and the Content-Security-Policy can forbid the rest.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections.abc import Sequence
from typing import Any

from PIL import Image


def figure(png: bytes, caption: str, pixelated: bool = False) -> str:
    """A captioned figure with the PNG inlined, its size set so the layout does not jump."""
    with Image.open(io.BytesIO(png)) as im:
        width, height = im.size
    data = base64.b64encode(png).decode("ascii")
    cls = ' class="pixelated"' if pixelated else ""
    return (
        f'<figure><img{cls} alt="{esc(caption)}" width="{width}" height="{height}" '
        f'src="data:image/png;base64,{data}"><figcaption>{esc(caption)}</figcaption></figure>'
    )


def table(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """An escaped table; nothing at all for no rows."""
    if not rows:
        return ""
    header = "".join(f"<th>{esc(h)}</th>" for h in head) if any(head) else ""
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table>{f'<thead><tr>{header}</tr></thead>' if header else ''}<tbody>{body}</tbody></table>"


def pre(text: str) -> str:
    """Preformatted, escaped text."""
    return f"<pre>{esc(text)}</pre>"


def na(why: str) -> str:
    """A part without its input says so, and why."""
    return f'<p class="na">not available: {esc(why)}</p>'


def esc(value: Any) -> str:
    """Escaped text; None reads as empty."""
    return html.escape("" if value is None else str(value), quote=True)


def settings_list(value: Any) -> str:
    """Settings as compact ``key = value`` lines (nested keys dotted), in columns."""
    items = "".join(f"<li>{esc(k)} = {esc(v)}</li>" for k, v in _flatten(value))
    return f'<ul class="settings">{items}</ul>' if items else na("no settings recorded")


def _flatten(value: Any, prefix: str = "") -> list[tuple[str, str]]:
    if isinstance(value, dict) and value:
        return [
            pair
            for k, v in value.items()
            for pair in _flatten(v, f"{prefix}.{k}" if prefix else str(k))
        ]
    if isinstance(value, list) and any(isinstance(v, dict | list) for v in value):
        return [pair for i, v in enumerate(value) for pair in _flatten(v, f"{prefix}[{i}]")]
    return [(prefix or "value", json.dumps(value, ensure_ascii=False, default=str))]


CSS = """
:root { color-scheme: light; }
html { background: #fff; }
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
  color: #1a1a1a; background: #fff; max-width: 64em; margin: 1.5em auto; padding: 0 1.2em; }
h1 { font-size: 1.7em; margin: 0 0 .2em; }
h2 { font-size: 1.3em; border-bottom: 2px solid #2b5d8a; padding-bottom: .15em; margin-top: 1.8em; }
h3 { font-size: 1.08em; margin: 1.3em 0 .4em; }
h4 { font-size: 1em; margin: 1em 0 .3em; }
.meta { color: #555; margin-top: 0; }
nav { font-size: .9em; margin: .8em 0; line-height: 1.8; }
a { color: #1f4e79; }
table { border-collapse: collapse; margin: .6em 0; font-size: .92em; }
th, td { border: 1px solid #b8b8b8; padding: .25em .6em; text-align: left; vertical-align: top; }
th { background: #eef2f6; }
tbody tr:nth-child(even) td { background: #fafafa; }
figure { margin: 1em 0; }
figure img { display: block; max-width: 100%; height: auto; border: 1px solid #ddd; }
img.pixelated { image-rendering: pixelated; }
figcaption { font-size: .88em; color: #444; margin-top: .3em; }
pre { background: #f5f5f5; border: 1px solid #ddd; padding: .6em; font-size: .82em;
  white-space: pre-wrap; overflow-wrap: anywhere; }
ul.settings { columns: 3 16em; list-style: none; padding: 0; font-size: .82em;
  font-family: ui-monospace, "DejaVu Sans Mono", monospace; }
ul.settings li { break-inside: avoid; overflow-wrap: anywhere; padding: .05em 0; }
code { background: #f2f2f2; padding: 0 .2em; }
.summary { border: 2px solid #2b5d8a; border-radius: 6px; padding: .2em 1.1em .8em;
  background: #f7fafd; }
.summary h2 { border: none; margin-top: .6em; }
.verdict { font-weight: 600; padding: .4em .7em; border-radius: 4px; }
.verdict.ok { background: #e3f3e6; color: #14532d; }
.verdict.bad { background: #fbe6e6; color: #7f1d1d; }
.verdict.none { background: #eee; color: #333; }
.ok { color: #14632d; }
.bad { color: #a01515; }
.na { color: #5b5b5b; font-style: italic; }
.banner { padding: .5em .8em; border-radius: 4px; }
.banner.warn { background: #fff4d6; border: 1px solid #e0b84a; }
.banner.bad { background: #fbe6e6; border: 1px solid #c44; }
footer { margin-top: 2.5em; color: #666; font-size: .85em; border-top: 1px solid #ddd; }
@media print {
  body { max-width: none; margin: 0; font-size: 11pt; }
  nav { display: none; }
  section, figure, table, pre { break-inside: avoid; }
  h2, h3 { break-after: avoid; }
  a { color: inherit; text-decoration: none; }
  .summary, th, .verdict, .banner { -webkit-print-color-adjust: exact; print-color-adjust: exact; }
}
"""


SELF_CHECK = """
window.addEventListener("load", function () {
  var images = document.images, broken = 0;
  for (var i = 0; i < images.length; i++) {
    if (!images[i].complete || images[i].naturalWidth === 0) { broken++; }
  }
  document.body.setAttribute("data-images", String(images.length));
  document.body.setAttribute("data-broken-images", String(broken));
  document.body.setAttribute("data-self-check", broken ? "failed" : "passed");
  if (broken) { document.getElementById("self-check-failed").hidden = false; }
});
"""
