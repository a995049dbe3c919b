"""``fedspine privacy report``: the privacy report a data steward reads, as Markdown, JSON or a
self-contained HTML page, rendered from a :class:`PrivacyReport` record.

The content (the run's privacy.json plus ε recomputed per site) is built by
:func:`fedspine.privacy.report.build_report`, which also draws the ε-against-steps plot (it
asks the accountant, so it is computing, not rendering). The per-site table is the one the HTML
page of ``fedspine report`` draws (:func:`fedspine.reporting.tables.privacy_site_table`).
"""

from __future__ import annotations

import base64
import html
import os
from pathlib import Path

from fedspine.fileio import json_text, write_text_atomic
from fedspine.formatting import num
from fedspine.privacy.report import (
    FORMATS,
    PrivacyReportError,
    build_report,
    describe_unit,
    plot_report,
)
from fedspine.reporting.privacy_records import PrivacyReport
from fedspine.reporting.tables import privacy_site_table


def write_privacy_report(
    run: str | os.PathLike, fmt: str = "md", out: str | os.PathLike | None = None
) -> Path:
    """Write the privacy report as Markdown, JSON or self-contained HTML; returns its path
    (default ``RUN/privacy_report.FORMAT``, the plot beside it as ``.png``)."""
    if fmt not in FORMATS:
        raise PrivacyReportError(f"unknown format {fmt!r}; choose one of {FORMATS}")
    report = build_report(run)
    out_path = Path(out) if out else Path(run) / f"privacy_report.{fmt}"
    plot = plot_report(report, out_path.with_suffix(".png")) if fmt != "json" else None
    public = {k: v for k, v in report.items() if not k.startswith("_")}
    if fmt == "json":
        text = json_text(public)
    else:
        record = PrivacyReport.from_json(public)
        if fmt == "md":
            text = render_privacy_markdown(record, plot.name if plot else None)
        else:
            text = render_privacy_html(record, plot.read_bytes() if plot else None)
    return write_text_atomic(out_path, text)


def render_privacy_markdown(report: PrivacyReport, plot_name: str | None = None) -> str:
    """The report in Markdown; ``plot_name`` is the ε-against-steps figure beside it."""
    lines = [f"# Privacy report: {report.run}", ""]
    lines += [f"**{_verdict(report)}** {_overall(report)}", ""]
    for reason in report.not_private_reasons or []:
        lines.append(f"- not private: {reason}")
    lines += ["", report.overall_note or "", "", "## Sites", ""]
    header, rows = privacy_site_table(report)
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for row in rows:
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "## What was private and what was public", ""]
    for part, status in (report.components or {}).items():
        lines.append(f"- **{part}**: {status}")
    lines += ["", "## Caveats", "", f"- {report.prng}"]
    if plot_name:
        lines += ["", "## ε against discriminator steps", "", f"![ε against steps]({plot_name})"]
    lines += ["", f"_fedspine {report.report_fedspine_version}_", ""]
    return "\n".join(lines)


def render_privacy_html(report: PrivacyReport, plot_png: bytes | None = None) -> str:
    """The report as one HTML page, the ε-against-steps figure inlined."""
    esc = html.escape
    header, rows = privacy_site_table(report)
    body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    parts = "".join(
        f"<li><b>{esc(k)}</b>: {esc(v)}</li>" for k, v in (report.components or {}).items()
    )
    reasons = "".join(f"<li>not private: {esc(r)}</li>" for r in report.not_private_reasons or [])
    img = ""
    if plot_png is not None:
        data = base64.b64encode(plot_png).decode()
        img = (
            "<h2>ε against discriminator steps</h2>"
            f'<img alt="epsilon curve" src="data:image/png;base64,{data}">'
        )
    run = esc(str(report.run))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Privacy report: {run}</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #999;padding:.3em .6em}}img{{max-width:100%}}</style></head><body>
<h1>Privacy report: {run}</h1>
<p><b>{_verdict(report)}</b> {esc(_overall(report, sizes=False))}</p>
<ul>{reasons}</ul><p>{esc(report.overall_note or "")}</p>
<h2>Sites</h2><table><tr>{head}</tr>{body}</table>
<h2>What was private and what was public</h2><ul>{parts}</ul>
<h2>Caveats</h2><p>{esc(str(report.prng))}</p>{img}
<p><i>fedspine {esc(str(report.report_fedspine_version))}</i></p></body></html>
"""


def _verdict(report: PrivacyReport) -> str:
    return f"This run is {'private' if report.private else 'NOT PRIVATE'}."


def _overall(report: PrivacyReport, sizes: bool = True) -> str:
    """Overall ε and how it was accounted; ``sizes`` adds that dataset sizes are public."""
    return (
        f"Overall ε = {num(report.overall_epsilon)} at δ = {report.delta} (accountant: "
        f"{report.accountant}, unit of privacy: {describe_unit(report.unit)})."
        + (
            " Dataset sizes (patients per site) are treated as public, as in Opacus."
            if sizes
            else ""
        )
    )
