"""The run's privacy summary (``RUN/privacy.json``) and the report a data steward reads.

Training (centralised or federated) writes ``privacy.json``; ``fedspine privacy report`` turns
it into Markdown, JSON or a self-contained HTML page with the ε-against-steps plot. The report
says what was private and what was public, and what fedspine cannot promise (noise from torch's
PRNG, not a cryptographically secure generator).
"""

from __future__ import annotations

import base64
import html
import json
import os
import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedspine import __version__
from fedspine.fileio import file_sha256
from fedspine.privacy.accounting import PLAN_ACCOUNTANT, REPORT_ACCOUNTANT

PRIVACY_FILE = "privacy.json"
GENERATOR_FILE = "generator.pt"
FORMAT = "fedspine-privacy/1"
PRNG_NOTE = (
    "DP noise and the Poisson draws of patients come from torch's and numpy's pseudo-random "
    "generators, seeded from OS entropy for every run (never from the recorded seed): no "
    "cryptographically secure generator (torchcsprng) is installable here, so the guarantee "
    "assumes an attacker cannot predict those generators' state."
)
FORMATS = ("md", "json", "html")


class PrivacyReportError(Exception):
    """The run has no readable privacy summary; the message says what to do."""


def describe_unit(unit: str | None) -> str:
    """The privacy unit in words: VinDr's study is a patient proxy, an image may not be a person."""
    from fedspine.data.prepared import UNIT_DESCRIPTIONS

    parts = [p.strip() for p in str(unit or "?").split("/")]
    return " / ".join(UNIT_DESCRIPTIONS.get(p, p) for p in parts)


def site_entry(
    epsilon: float,
    delta: float,
    mechanisms: Sequence[dict[str, Any]],
    *,
    unit: str,
    patients: int,
    ledger_complete: bool = True,
    epsilon_per_round: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    """One site's part of ``privacy.json``: ε of its worst patient, and every mechanism on its
    patients (noise_multiplier, sample_rate, steps, clip). No fingerprint of the data: the
    patient count is treated as public, as in Opacus."""
    return {
        "epsilon": float(epsilon),
        "delta": float(delta),
        "unit": str(unit),
        "patients": int(patients),
        "ledger_complete": bool(ledger_complete),
        "mechanisms": [dict(m) for m in mechanisms],
        "epsilon_per_round": [dict(r) for r in epsilon_per_round],
    }


def write_privacy_summary(
    run: str | os.PathLike,
    sites: dict[str, dict[str, Any]],
    components: dict[str, str],
    accountant: str = REPORT_ACCOUNTANT,
    not_private_reasons: Sequence[str] = (),
    unit: str = "patient",
    run_id: str | None = None,
) -> Path:
    """Write ``RUN/privacy.json`` atomically. A run with any reason listed is not private.

    It binds itself to ``RUN/generator.pt`` where that exists (its SHA-256), so a release can
    refuse any other generator put in its place.
    """
    deltas = {float(s["delta"]) for s in sites.values()}
    generator = Path(run) / GENERATOR_FILE
    data = {
        "format": FORMAT,
        "fedspine_version": __version__,
        "written": datetime.now(UTC).isoformat(timespec="seconds"),
        "private": not not_private_reasons and bool(sites),
        "not_private_reasons": list(not_private_reasons),
        "accountant": accountant,
        "delta": max(deltas) if deltas else None,
        "unit": unit,
        "run_id": run_id,
        "generator_sha256": file_sha256(generator) if generator.is_file() else None,
        "sites": sites,
        "components": dict(components),
        "prng": PRNG_NOTE,
    }
    path = Path(run) / PRIVACY_FILE
    fd, tmp = tempfile.mkstemp(prefix=f".{PRIVACY_FILE}.", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=2)
        fh.write("\n")
    os.replace(tmp, path)
    return path


def read_privacy_summary(run: str | os.PathLike) -> dict[str, Any]:
    path = Path(run) / PRIVACY_FILE
    if not path.is_file():
        raise PrivacyReportError(
            f"{path}: missing; this run has no privacy summary (was it trained by fedspine "
            "with or without --dp?)"
        )
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise PrivacyReportError(f"{path}: not valid JSON ({err})") from None
    if data.get("format") != FORMAT:
        raise PrivacyReportError(f"{path}: unknown format {data.get('format')!r}")
    return data


def build_report(run: str | os.PathLike) -> dict[str, Any]:
    """The report's content: the summary plus ε recomputed from each site's mechanisms."""
    from fedspine.privacy.accounting import Mechanism, epsilon

    summary = read_privacy_summary(run)
    sites = {}
    for name, site in summary["sites"].items():
        mechanisms = [_mechanism(m) for m in site.get("mechanisms", [])]
        recomputed = (
            epsilon(mechanisms, float(site["delta"]), summary.get("accountant", REPORT_ACCOUNTANT))
            if mechanisms
            else None
        )
        sites[name] = {**site, "epsilon_recomputed": recomputed}
    eps = [s["epsilon"] for s in sites.values() if s.get("epsilon") is not None]
    return {
        **summary,
        "sites": sites,
        "overall_epsilon": max(eps) if eps else None,
        "overall_note": (
            "The released generator is (max over sites ε, δ)-DP when no patient is at two sites: "
            "each site's data is touched only by its own DP-SGD steps, and averaging is "
            "post-processing."
        ),
        "run": Path(run).name,
        "report_fedspine_version": __version__,
        "_mechanisms": {
            n: [Mechanism(**_mech_args(m)) for m in s.get("mechanisms", [])]
            for n, s in sites.items()
        },
    }


def write_report(
    run: str | os.PathLike, fmt: str = "md", out: str | os.PathLike | None = None
) -> Path:
    """Write the privacy report as Markdown, JSON or self-contained HTML; returns its path."""
    if fmt not in FORMATS:
        raise PrivacyReportError(f"unknown format {fmt!r}; choose one of {FORMATS}")
    report = build_report(run)
    run = Path(run)
    out_path = Path(out) if out else run / f"privacy_report.{fmt}"
    plot = _plot(report, out_path.with_suffix(".png")) if fmt != "json" else None
    public = {k: v for k, v in report.items() if not k.startswith("_")}
    if fmt == "json":
        text = json.dumps(public, indent=2) + "\n"
    elif fmt == "md":
        text = _markdown(public, plot.name if plot else None)
    else:
        text = _html(public, plot)
    fd, tmp = tempfile.mkstemp(prefix=f".{out_path.name}.", dir=out_path.parent)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, out_path)
    return out_path


def _mech_args(m: dict[str, Any]) -> dict[str, Any]:
    return {
        "noise_multiplier": float(m["noise_multiplier"]),
        "sample_rate": float(m["sample_rate"]),
        "steps": int(m["steps"]),
        "label": str(m.get("label", "gan-discriminator")),
    }


def _mechanism(m: dict[str, Any]):
    from fedspine.privacy.accounting import Mechanism

    return Mechanism(**_mech_args(m))


def _plot(report: dict[str, Any], path: Path) -> Path | None:
    from fedspine.privacy.accounting import epsilon_curve, plot_epsilon_curve

    curves = {}
    for name, mechanisms in report["_mechanisms"].items():
        if mechanisms:
            curves[name] = epsilon_curve(
                mechanisms, float(report["sites"][name]["delta"]), PLAN_ACCOUNTANT
            )
    if not curves:
        return None
    return plot_epsilon_curve(curves, path)


# A SpineGAN federation spends ε in two phases; their columns show each alone beside the total.
PHASE_COLUMNS = (("classifier", "classifier ε"), ("gan", "GAN ε"))


def _phased(report: dict[str, Any]) -> bool:
    return any(site.get("phases") for site in report["sites"].values())


def phase_cells(site: dict[str, Any]) -> list[str]:
    """One cell per PHASE_COLUMNS: "ε (n steps)" of that phase at this site, "-" where none.
    Tolerates a hand-edited or older privacy.json (the HTML report reads any file given)."""
    phases = site.get("phases") if isinstance(site.get("phases"), dict) else {}
    cells = []
    for key, _ in PHASE_COLUMNS:
        phase = phases.get(key)
        if isinstance(phase, dict):
            try:
                eps = f"{float(phase.get('epsilon')):.3f}"
            except (TypeError, ValueError):
                eps = "n/a"
            cells.append(f"{eps} ({phase.get('steps', '?')} steps)")
        else:
            cells.append("-")
    return cells


def _header(report: dict[str, Any]) -> list[str]:
    if not _phased(report):
        return HEADER
    return [HEADER[0], "ε (total)", *(label for _, label in PHASE_COLUMNS), *HEADER[2:]]


def _rows(report: dict[str, Any]) -> list[list[str]]:
    phased = _phased(report)
    rows = []
    for name, site in report["sites"].items():
        mechs = site.get("mechanisms", [])
        sigma = ", ".join(f"{m['noise_multiplier']:.3g}" for m in mechs) or "-"
        q = ", ".join(f"{m['sample_rate']:.3g}" for m in mechs) or "-"
        steps = sum(int(m["steps"]) for m in mechs)
        clip = ", ".join(f"{m.get('clip_norm', '?')}" for m in mechs) or "-"
        rows.append(
            [
                name,
                _num(site.get("epsilon")),
                *(phase_cells(site) if phased else []),
                f"{site['delta']:.2g}",
                sigma,
                clip,
                q,
                str(steps),
                "yes" if site.get("ledger_complete") else "NO",
            ]
        )
    return rows


HEADER = ["site", "ε", "δ", "σ", "C", "q (sampling rate)", "steps", "ledger complete"]


def _markdown(report: dict[str, Any], plot_name: str | None) -> str:
    lines = [f"# Privacy report: {report['run']}", ""]
    verdict = "private" if report["private"] else "NOT PRIVATE"
    lines += [
        f"**This run is {verdict}.** Overall ε = {_num(report['overall_epsilon'])} at "
        f"δ = {report['delta']} (accountant: {report['accountant']}, unit of privacy: "
        f"{describe_unit(report['unit'])}). Dataset sizes (patients per site) are treated as "
        "public, as in Opacus.",
        "",
    ]
    for reason in report["not_private_reasons"]:
        lines.append(f"- not private: {reason}")
    lines += ["", report["overall_note"], "", "## Sites", ""]
    header = _header(report)
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for row in _rows(report):
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "## What was private and what was public", ""]
    for part, status in report["components"].items():
        lines.append(f"- **{part}**: {status}")
    lines += ["", "## Caveats", "", f"- {report['prng']}"]
    if plot_name:
        lines += ["", "## ε against discriminator steps", "", f"![ε against steps]({plot_name})"]
    lines += ["", f"_fedspine {report['report_fedspine_version']}_", ""]
    return "\n".join(lines)


def _html(report: dict[str, Any], plot: Path | None) -> str:
    esc = html.escape
    verdict = "private" if report["private"] else "NOT PRIVATE"
    rows = "".join(
        "<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in _rows(report)
    )
    head = "".join(f"<th>{esc(h)}</th>" for h in _header(report))
    parts = "".join(f"<li><b>{esc(k)}</b>: {esc(v)}</li>" for k, v in report["components"].items())
    reasons = "".join(f"<li>not private: {esc(r)}</li>" for r in report["not_private_reasons"])
    img = ""
    if plot is not None and plot.is_file():
        data = base64.b64encode(plot.read_bytes()).decode()
        img = f'<h2>ε against discriminator steps</h2><img alt="epsilon curve" src="data:image/png;base64,{data}">'
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Privacy report: {esc(report["run"])}</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #999;padding:.3em .6em}}img{{max-width:100%}}</style></head><body>
<h1>Privacy report: {esc(report["run"])}</h1>
<p><b>This run is {verdict}.</b> Overall ε = {_num(report["overall_epsilon"])} at δ = {report["delta"]}
(accountant: {esc(str(report["accountant"]))}, unit of privacy: {esc(describe_unit(report["unit"]))}).</p>
<ul>{reasons}</ul><p>{esc(report["overall_note"])}</p>
<h2>Sites</h2><table><tr>{head}</tr>{rows}</table>
<h2>What was private and what was public</h2><ul>{parts}</ul>
<h2>Caveats</h2><p>{esc(report["prng"])}</p>{img}
<p><i>fedspine {esc(report["report_fedspine_version"])}</i></p></body></html>
"""


def _num(value) -> str:
    return "n/a" if value is None else f"{float(value):.3f}"
