"""One self-contained HTML page that tells a clinician or a data steward what a run produced.

It reads what fedspine already wrote and recomputes nothing: the evaluation folder (report.json
as an :class:`~fedspine.evaluation.records.EvaluationRecord`, roc.png, samples.png,
closest_pairs.png), the run or federation folder (privacy.json as a
:class:`~fedspine.reporting.privacy_records.PrivacySummary`, rounds.jsonl, federation.json, the
training or federation config, privacy_report.png) and the release folder (manifest.json,
privacy_report.json, audit/*.json, the synthetic images). Every image is inlined as a base64
data URI and a Content-Security-Policy forbids anything else, so the file can be mailed or
archived and still open offline. Text that came from a file is escaped. A part that is missing
says "not available: <why>", so one page serves a centralised run, a federated run, with or
without a release.

The page checks itself: a short inline script counts, after load, the images that failed to
decode and writes the count on ``<body data-broken-images>`` (the tests read it back from
headless Chromium) and shows a warning on the page when it is not zero.

The page may show real training images (the evaluation's sample grid and closest pairs): it is
for the data owner and the steward, never for publication with the synthetic data, and it says
so at the top when it does.

Reading lives in :mod:`~fedspine.reporting.html_inputs`, the sections in
:mod:`~fedspine.reporting.html_evaluation` and :mod:`~fedspine.reporting.html_privacy`, the
pieces and the style in :mod:`~fedspine.reporting.html_parts`.
"""

from __future__ import annotations

import datetime as dt
import os
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedspine import __version__
from fedspine.fileio import FEDERATION_CONFIG, RUN_CONFIG_TOML, write_text_atomic
from fedspine.formatting import finite, num
from fedspine.privacy.report import describe_unit
from fedspine.reporting.html_evaluation import (
    classifiers_section,
    evaluate_command,
    fidelity_section,
    samples_section,
    utility_html,
)
from fedspine.reporting.html_inputs import (
    HtmlReportError,
    ReportInputs,
    load_inputs,
    shows_real_images,
)
from fedspine.reporting.html_parts import CSS, SELF_CHECK, esc, na, pre, settings_list, table
from fedspine.reporting.html_privacy import (
    audits_section,
    privacy_section,
    public_private_section,
    release_section,
    release_verdict,
    site_epsilons,
)
from fedspine.reporting.tables import ARM_HEAD, arm_cells, arms_of, general

__all__ = ["DEFAULT_TITLE", "SECTIONS", "HtmlReportError", "render_html", "write_html_report"]

DEFAULT_TITLE = "fedspine report"
SECTIONS = (
    ("summary", "Summary"),
    ("samples", "Images per class"),
    ("classifiers", "Classifiers on real test images"),
    ("fidelity", "Synthetic against real images"),
    ("privacy", "Differential privacy"),
    ("audits", "Privacy audits"),
    ("public-private", "What was private and what was public"),
    ("release", "Release"),
    ("provenance", "Commands and configuration"),
)


def write_html_report(
    out_html: str | os.PathLike,
    *,
    evaluation: str | os.PathLike | None = None,
    run: str | os.PathLike | None = None,
    release: str | os.PathLike | None = None,
    commands: Sequence[str] | None = None,
    title: str = DEFAULT_TITLE,
    release_refused: str | None = None,
    steward_audit: str | os.PathLike | None = None,
    config: Mapping[str, Any] | None = None,
) -> Path:
    """Write the report to ``out_html`` (temporary file, then rename) and return its path.

    ``evaluation`` is a folder written by ``fedspine evaluate``; ``run`` a training run or a
    federation output folder; ``release`` a folder written by ``fedspine release``. A release
    that was refused writes nothing, so its reason comes as ``release_refused``.
    ``steward_audit`` is the folder given to ``fedspine release --steward-audit`` (the gate's
    closest-pairs figure). ``commands`` are the command lines that produced the inputs (lines
    starting with ``#`` are comments) and ``config`` any further settings to print, by name.
    """
    if evaluation is None and run is None and release is None:
        raise HtmlReportError(
            "nothing to report: give an evaluation folder, a run folder or a release folder"
        )
    inputs = load_inputs(evaluation, run, release, steward_audit, release_refused)
    page = render_html(inputs, commands=commands or (), config=config or {}, title=title)
    return write_text_atomic(Path(out_html), page, mode=0o644)


def render_html(
    inputs: ReportInputs,
    *,
    commands: Sequence[str] = (),
    config: Mapping[str, Any] | None = None,
    title: str = DEFAULT_TITLE,
) -> str:
    """The whole page as a string: summary box first, then one section per topic."""
    sections = {
        "summary": summary_section(inputs),
        "samples": samples_section(inputs),
        "classifiers": classifiers_section(inputs),
        "fidelity": fidelity_section(inputs),
        "privacy": privacy_section(inputs),
        "audits": audits_section(inputs),
        "public-private": public_private_section(inputs),
        "release": release_section(inputs),
        "provenance": provenance_section(inputs, commands, config or {}),
    }
    body = []
    for key, heading in SECTIONS:
        cls = ' class="summary"' if key == "summary" else ""
        body.append(
            f'<section id="{key}"{cls}>\n<h2>{esc(heading)}</h2>\n{sections[key]}\n</section>'
        )
    nav = " · ".join(f'<a href="#{key}">{esc(heading)}</a>' for key, heading in SECTIONS)
    created = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    sources = [
        f"{label}: {path.name}"
        for label, path in (
            ("evaluation", inputs.evaluation),
            ("run", inputs.run),
            ("release", inputs.release),
        )
        if path is not None
    ]
    warning = ""
    if shows_real_images(inputs):
        warning = (
            '<p class="banner warn">This page shows real training images (sample grid, closest '
            "pairs) and private real-data statistics. It is for the data owner and the data "
            "steward: do not publish it with the synthetic data.</p>"
        )
    problems = ""
    if inputs.problems:
        problems = (
            '<div class="banner warn"><b>Some files could not be read:</b><ul>'
            + "".join(f"<li>{esc(p)}</li>" for p in inputs.problems)
            + "</ul></div>"
        )
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<meta name="color-scheme" content="light">
<title>{esc(title)}</title>
<style>{CSS}</style>
</head>
<body data-self-check="pending">
<header>
<h1>{esc(title)}</h1>
<p class="meta">Written {esc(created)} by fedspine {esc(__version__)} from {esc("; ".join(sources))}.</p>
<p id="self-check-failed" class="banner bad" hidden>Some images in this page failed to decode.</p>
{warning}
{problems}
<nav>{nav}</nav>
</header>
<main>
{chr(10).join(body)}
</main>
<footer><p>fedspine {esc(__version__)}: every number above was read from the output files named
in each section; nothing was recomputed for this page (a release's signature and hashes are
checked afresh).</p></footer>
<script>{SELF_CHECK}</script>
</body>
</html>
"""


def summary_section(inp: ReportInputs) -> str:
    """The verdicts first: release, privacy with ε per site, AUCs, memorisation, membership."""
    parts = [release_verdict(inp)]
    privacy = inp.privacy
    if privacy is None:
        parts.append(na("privacy: no privacy.json in the run or release given"))
    else:
        private = privacy.private is True
        reasons = [str(r) for r in privacy.not_private_reasons or []]
        verdict = "private" if private else "NOT PRIVATE"
        details = [
            f"accountant {'?' if privacy.accountant is None else privacy.accountant}",
            f"unit of privacy: {describe_unit(privacy.unit)}",
        ]
        if finite(privacy.delta) is not None:
            details.append(f"δ = {general(privacy.delta)}")
        parts.append(
            f'<p><b class="{"ok" if private else "bad"}">Training was {verdict}</b>'
            f" ({esc(', '.join(details))})"
            + ("".join(f"; not private: {esc(r)}" for r in reasons))
            + ".</p>"
        )
        rows = site_epsilons(inp)
        if not rows:
            parts.append("<p>No site spent ε: nothing in this run was trained with DP.</p>")
        else:
            parts.append(table(["site", "ε spent", "δ", "source"], rows))
            overall = max((finite(r[1]) for r in rows if finite(r[1]) is not None), default=None)
            if overall is not None:
                parts.append(
                    f"<p>Overall ε = <b>{overall:.3f}</b>: the released generator is "
                    "(max over sites ε, δ)-DP when no patient is at two sites.</p>"
                )
    report = inp.eval_report
    if report is None:
        parts.append(na("classifier AUCs: no evaluation given"))
    else:
        rows = [arm_cells(name, arm)[:3] for name, arm in arms_of(report).items()]
        parts.append(table(list(ARM_HEAD[:3]), rows))
        parts.append(utility_html(report))
        ratios = report.ratios
        parts.append(
            f"<p>TSTR / TRTR = {num(ratios.tstr_over_trtr if ratios else None)}; mixed / TRTR = "
            f"{num(ratios.mixed_over_trtr if ratios else None)} (ratios of AUCs credit the 0.5 "
            "any classifier gets by chance; signal retained does not).</p>"
        )
        if report.memorisation is not None:
            parts.append(
                "<p>Memorisation audit (evaluation): "
                f"<b>{esc(report.memorisation.verdict)}</b>.</p>"
            )
    if inp.membership:
        near = inp.membership.get("nearest") or {}
        parts.append(
            f"<p>Membership inference (release audit): AUC {num(near.get('auc'))}, "
            f"TPR at 1 % FPR {num(near.get('tpr_at_1pct_fpr'))} (0.5 and 0.01 = chance).</p>"
        )
    return "\n".join(parts)


def provenance_section(
    inp: ReportInputs, commands: Sequence[str], config: Mapping[str, Any]
) -> str:
    """The commands, any further settings, and the settings of every input folder."""
    parts = ["<h3>Commands</h3>"]
    if commands:
        parts.append(pre("\n".join(str(c) for c in commands)))
    else:
        parts.append(na("the commands were not recorded by whoever wrote this page"))
    for name, value in config.items():
        parts.append(f"<h3>Configuration: {esc(name)}</h3>")
        parts.append(pre(value) if isinstance(value, str) else settings_list(value))
    report = inp.eval_report
    if report is not None:
        parts.append(f"<h3>Evaluation ({esc(inp.evaluation.name)})</h3>")
        command, outside = evaluate_command(report, inp.eval_config or {}, inp.evaluation)
        parts.append("<p>Equivalent command, rebuilt from its report.json:</p>")
        parts.append(pre(command))
        if outside:
            parts.append(f"<p>Set outside the command line: {esc(outside)}.</p>")
        rows = [
            [key, _or_unknown(info.path), _or_unknown(info.content_hash)]
            for key, info in (report.inputs.items() if report.inputs else [])
        ]
        parts.append(table(["input", "path", "content hash"], rows))
        parts.append(settings_list(inp.eval_config or {}))
        parts.append(
            f"<p>fedspine {esc(_or_unknown(report.fedspine_version))}, written "
            f"{esc(_or_unknown(report.created))}.</p>"
        )
    if inp.run is not None:
        parts.append(f"<h3>Run ({esc(inp.run.name)})</h3>")
        if inp.federation_config is not None:
            parts.append(f"<p>{esc(FEDERATION_CONFIG)}:</p>")
            parts.append(settings_list(inp.federation_config))
        if inp.run_config_text is not None:
            parts.append(f"<p>{esc(RUN_CONFIG_TOML)}:</p>")
            try:
                parts.append(settings_list(tomllib.loads(inp.run_config_text)))
            except tomllib.TOMLDecodeError:
                parts.append(pre(inp.run_config_text))
        if inp.federation_config is None and inp.run_config_text is None:
            parts.append(na(f"{inp.run.name} has no {FEDERATION_CONFIG} or {RUN_CONFIG_TOML}"))
    if inp.manifest is not None:
        parts.append(f"<h3>Release ({esc(inp.release.name)})</h3>")
        keys = ("configuration", "audit_data", "run")
        parts.append(settings_list({k: inp.manifest.get(k) for k in keys}))
    return "\n".join(parts)


def _or_unknown(value: Any) -> str:
    return "?" if value is None else str(value)
