"""One self-contained HTML page that tells a clinician or a data steward what a run produced.

It reads what fedspine already wrote and recomputes nothing: the evaluation folder (report.json,
roc.png, samples.png, closest_pairs.png), the run or federation folder (privacy.json,
rounds.jsonl, federation.json, the training or federation config, privacy_report.png) and the
release folder (manifest.json, privacy_report.json, audit/*.json, the synthetic images). Every
image is inlined as a base64 data URI and a Content-Security-Policy forbids anything else, so
the file can be mailed or archived and still open offline. Text that came from a file is
escaped. A part that is missing says "not available: <why>", so one page serves a centralised
run, a federated run, with or without a release.

The page checks itself: a short inline script counts, after load, the images that failed to
decode and writes the count on ``<body data-broken-images>`` (the tests read it back from
headless Chromium) and shows a warning on the page when it is not zero.

The page may show real training images (the evaluation's sample grid and closest pairs): it is
for the data owner and the steward, never for publication with the synthetic data, and it says
so at the top when it does.
"""

from __future__ import annotations

import base64
import csv
import datetime as dt
import html
import io
import json
import math
import os
import shlex
import tempfile
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedspine import __version__
from fedspine.privacy.report import PHASE_COLUMNS, describe_unit, phase_cells

DEFAULT_TITLE = "fedspine report"
EVAL_REPORT = "report.json"
EVAL_CONFIG = "config.json"
EVAL_PNGS = {"roc": "roc.png", "samples": "samples.png", "closest_pairs": "closest_pairs.png"}
PRIVACY_JSON = "privacy.json"
ROUNDS_LOG = "rounds.jsonl"
FEDERATION_STATUS = "federation.json"
FEDERATION_CONFIG = "federation_config.json"
RUN_CONFIG = "config.toml"
PRIVACY_PLOT = "privacy_report.png"
RELEASE_MANIFEST = "manifest.json"
RELEASE_PRIVACY = "privacy_report.json"
RELEASE_MEMORISATION = "memorisation.json"
"""In the steward's audit folder: a release carries no audit statistic of private data."""
RELEASE_MEMBERSHIP = "membership.json"
STEWARD_PAIRS = "closest_pairs.png"
CANARY_FILES = ("canary_audit.json", "audit/canary.json")
SAMPLES_PER_CLASS = 8
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
# `fedspine evaluate` options, in the order its --help lists them (EvaluateConfig field names).
EVALUATE_OPTIONS = (
    "arch",
    "task",
    "epochs",
    "batch",
    "patience",
    "input_size",
    "weights",
    "mix_per_class",
    "inception",
    "domain_epochs",
    "bootstrap",
    "heldout",
    "max_train_images",
    "max_metric_images",
    "seed",
    "device",
    "threads",
)


class HtmlReportError(Exception):
    """An input folder cannot be reported on; the message names it and says what to do."""


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
    inputs = _load(evaluation, run, release, steward_audit, release_refused)
    page = render_html(inputs, commands=commands or (), config=config or {}, title=title)
    out = Path(out_html)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(page)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


@dataclass
class ReportInputs:
    """Everything the page shows, as read from the output folders (nothing recomputed)."""

    evaluation: Path | None = None
    eval_report: dict[str, Any] | None = None
    eval_config: dict[str, Any] | None = None
    eval_pngs: dict[str, bytes] = field(default_factory=dict)
    run: Path | None = None
    privacy: dict[str, Any] | None = None
    privacy_source: str = ""
    rounds: list[dict[str, Any]] = field(default_factory=list)
    federation_status: dict[str, Any] | None = None
    federation_config: dict[str, Any] | None = None
    run_config_text: str | None = None
    privacy_plot: bytes | None = None
    run_samples: tuple[str, bytes] | None = None
    release: Path | None = None
    manifest: dict[str, Any] | None = None
    release_privacy: dict[str, Any] | None = None
    release_memorisation: dict[str, Any] | None = None
    membership: dict[str, Any] | None = None
    verification: Any = None
    release_grids: list[tuple[str, bytes, int, int]] = field(default_factory=list)
    release_refused: str | None = None
    steward_pairs: bytes | None = None
    canary: dict[str, Any] | None = None
    canary_source: str = ""
    problems: list[str] = field(default_factory=list)


def render_html(
    inputs: ReportInputs,
    *,
    commands: Sequence[str] = (),
    config: Mapping[str, Any] | None = None,
    title: str = DEFAULT_TITLE,
) -> str:
    """The whole page as a string: summary box first, then one section per topic."""
    sections = {
        "summary": _summary(inputs),
        "samples": _samples(inputs),
        "classifiers": _classifiers(inputs),
        "fidelity": _fidelity(inputs),
        "privacy": _privacy(inputs),
        "audits": _audits(inputs),
        "public-private": _public_private(inputs),
        "release": _release(inputs),
        "provenance": _provenance(inputs, commands, config or {}),
    }
    body = []
    for key, heading in SECTIONS:
        cls = ' class="summary"' if key == "summary" else ""
        body.append(
            f'<section id="{key}"{cls}>\n<h2>{_e(heading)}</h2>\n{sections[key]}\n</section>'
        )
    nav = " · ".join(f'<a href="#{key}">{_e(heading)}</a>' for key, heading in SECTIONS)
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
    if _shows_real_images(inputs):
        warning = (
            '<p class="banner warn">This page shows real training images (sample grid, closest '
            "pairs) and private real-data statistics. It is for the data owner and the data "
            "steward: do not publish it with the synthetic data.</p>"
        )
    problems = ""
    if inputs.problems:
        problems = (
            '<div class="banner warn"><b>Some files could not be read:</b><ul>'
            + "".join(f"<li>{_e(p)}</li>" for p in inputs.problems)
            + "</ul></div>"
        )
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<meta name="color-scheme" content="light">
<title>{_e(title)}</title>
<style>{_CSS}</style>
</head>
<body data-self-check="pending">
<header>
<h1>{_e(title)}</h1>
<p class="meta">Written {_e(created)} by fedspine {_e(__version__)} from {_e("; ".join(sources))}.</p>
<p id="self-check-failed" class="banner bad" hidden>Some images in this page failed to decode.</p>
{warning}
{problems}
<nav>{nav}</nav>
</header>
<main>
{chr(10).join(body)}
</main>
<footer><p>fedspine {_e(__version__)}: every number above was read from the output files named
in each section; nothing was recomputed for this page (a release's signature and hashes are
checked afresh).</p></footer>
<script>{_SELF_CHECK}</script>
</body>
</html>
"""


def _load(
    evaluation: str | os.PathLike | None,
    run: str | os.PathLike | None,
    release: str | os.PathLike | None,
    steward_audit: str | os.PathLike | None,
    release_refused: str | None,
) -> ReportInputs:
    inputs = ReportInputs(release_refused=release_refused)
    if evaluation is not None:
        _load_evaluation(inputs, Path(evaluation))
    if run is not None:
        _load_run(inputs, Path(run))
    if release is not None:
        _load_release(inputs, Path(release))
    if steward_audit is not None:
        folder = _folder(Path(steward_audit), "steward audit", "the --steward-audit folder")
        inputs.steward_pairs = _png(folder / STEWARD_PAIRS, inputs.problems)
        mem = _json(folder / RELEASE_MEMORISATION, inputs.problems)
        inputs.release_memorisation = mem if isinstance(mem, dict) else None
        membership = _json(folder / RELEASE_MEMBERSHIP, inputs.problems)
        inputs.membership = membership if isinstance(membership, dict) else None
    for folder in (inputs.run, inputs.release, inputs.evaluation):
        if folder is None or inputs.canary is not None:
            continue
        for name in CANARY_FILES:
            data = _json(folder / name, inputs.problems)
            if isinstance(data, dict):
                inputs.canary, inputs.canary_source = data, f"{folder.name}/{name}"
                break
    return inputs


def _load_evaluation(inputs: ReportInputs, folder: Path) -> None:
    folder = _folder(folder, "evaluation", "the --out folder of `fedspine evaluate`")
    path = folder / EVAL_REPORT
    if not path.is_file():
        raise HtmlReportError(
            f"{path}: missing; pass the folder that `fedspine evaluate --out` wrote"
        )
    report = _json(path, [])
    if not isinstance(report, dict) or "arms" not in report:
        raise HtmlReportError(f"{path}: not an evaluation report of fedspine (no 'arms')")
    inputs.evaluation, inputs.eval_report = folder, report
    config = _json(folder / EVAL_CONFIG, inputs.problems)
    inputs.eval_config = config if isinstance(config, dict) else report.get("config")
    files = report.get("files") if isinstance(report.get("files"), dict) else {}
    for key, default in EVAL_PNGS.items():
        name = str(files.get(key, default))
        if Path(name).name != name:  # only files inside the folder
            name = default
        png = _png(folder / name, inputs.problems)
        if png is not None:
            inputs.eval_pngs[key] = png


def _load_run(inputs: ReportInputs, folder: Path) -> None:
    folder = _folder(folder, "run", "a training run or federation output folder")
    known = (PRIVACY_JSON, ROUNDS_LOG, FEDERATION_STATUS, RUN_CONFIG, "generator.pt")
    if not any((folder / name).exists() for name in known):
        raise HtmlReportError(
            f"{folder}: none of {', '.join(known)}; pass a folder written by `fedspine train` "
            "or by a federation"
        )
    inputs.run = folder
    privacy = _json(folder / PRIVACY_JSON, inputs.problems)
    if isinstance(privacy, dict):
        inputs.privacy, inputs.privacy_source = privacy, f"{folder.name}/{PRIVACY_JSON}"
    inputs.rounds = _jsonl(folder / ROUNDS_LOG, inputs.problems)
    status = _json(folder / FEDERATION_STATUS, inputs.problems)
    inputs.federation_status = status if isinstance(status, dict) else None
    fed_config = _json(folder / FEDERATION_CONFIG, inputs.problems)
    inputs.federation_config = fed_config if isinstance(fed_config, dict) else None
    if (folder / RUN_CONFIG).is_file():
        inputs.run_config_text = (folder / RUN_CONFIG).read_text(errors="replace")
    inputs.privacy_plot = _png(folder / PRIVACY_PLOT, inputs.problems)
    fakes = sorted((folder / "samples").glob("fakes_*.png"))
    if fakes:
        png = _png(fakes[-1], inputs.problems)
        if png is not None:
            inputs.run_samples = (f"samples/{fakes[-1].name}", png)


def _load_release(inputs: ReportInputs, folder: Path) -> None:
    from fedspine.privacy.signing import verify_release

    folder = _folder(folder, "release", "a folder written by `fedspine release`")
    path = folder / RELEASE_MANIFEST
    manifest = _json(path, [])
    if not isinstance(manifest, dict):
        raise HtmlReportError(
            f"{path}: missing or unreadable; pass a folder written by `fedspine release`"
        )
    inputs.release, inputs.manifest = folder, manifest
    inputs.verification = verify_release(folder)
    privacy_report = _json(folder / RELEASE_PRIVACY, inputs.problems)
    if isinstance(privacy_report, dict):
        inputs.release_privacy = privacy_report
        if inputs.privacy is None and isinstance(privacy_report.get("privacy"), dict):
            inputs.privacy = privacy_report["privacy"]
            inputs.privacy_source = f"{folder.name}/{RELEASE_PRIVACY}"
    inputs.release_grids = _class_grids(folder / "synthetic", inputs.problems)


def _summary(inp: ReportInputs) -> str:
    parts = [_release_verdict(inp)]
    privacy = inp.privacy
    if privacy is None:
        parts.append(_na("privacy: no privacy.json in the run or release given"))
    else:
        private = privacy.get("private") is True
        reasons = [str(r) for r in privacy.get("not_private_reasons") or []]
        verdict = "private" if private else "NOT PRIVATE"
        details = [
            f"accountant {privacy.get('accountant', '?')}",
            f"unit of privacy: {describe_unit(privacy.get('unit'))}",
        ]
        if _float(privacy.get("delta")) is not None:
            details.append(f"δ = {_g(privacy.get('delta'))}")
        parts.append(
            f'<p><b class="{"ok" if private else "bad"}">Training was {verdict}</b>'
            f" ({_e(', '.join(details))})"
            + ("".join(f"; not private: {_e(r)}" for r in reasons))
            + ".</p>"
        )
        rows = _site_epsilons(inp)
        if not rows:
            parts.append("<p>No site spent ε: nothing in this run was trained with DP.</p>")
        else:
            parts.append(_table(["site", "ε spent", "δ", "source"], rows))
            overall = max((_float(r[1]) for r in rows if _float(r[1]) is not None), default=None)
            if overall is not None:
                parts.append(
                    f"<p>Overall ε = <b>{overall:.3f}</b>: the released generator is "
                    "(max over sites ε, δ)-DP when no patient is at two sites.</p>"
                )
    report = inp.eval_report
    if report is None:
        parts.append(_na("classifier AUCs: no evaluation given"))
    else:
        arms = report.get("arms", {})
        rows = [
            [name, _train_text(arm.get("train_data")), _auc_ci(arm.get("auc"), arm.get("ci"))]
            for name, arm in arms.items()
        ]
        parts.append(_table(["arm", "trained on", "test AUC [95 % CI]"], rows))
        parts.append(_utility_html(report))
        ratios = report.get("ratios", {})
        parts.append(
            f"<p>TSTR / TRTR = {_num(ratios.get('tstr_over_trtr'))}; mixed / TRTR = "
            f"{_num(ratios.get('mixed_over_trtr'))} (ratios of AUCs credit the 0.5 any "
            "classifier gets by chance; signal retained does not).</p>"
        )
        mem = report.get("memorisation") or {}
        if mem:
            parts.append(
                f"<p>Memorisation audit (evaluation): <b>{_e(mem.get('verdict'))}</b>.</p>"
            )
    if inp.membership:
        near = inp.membership.get("nearest") or {}
        parts.append(
            f"<p>Membership inference (release audit): AUC {_num(near.get('auc'))}, "
            f"TPR at 1 % FPR {_num(near.get('tpr_at_1pct_fpr'))} (0.5 and 0.01 = chance).</p>"
        )
    return "\n".join(parts)


def _release_verdict(inp: ReportInputs) -> str:
    if inp.manifest is not None:
        ver = inp.verification
        n_files = len(inp.manifest.get("files") or [])
        if ver is not None and ver.ok:
            return (
                f'<p class="verdict ok">Released: a signed release of {n_files} files, signature '
                f"and every SHA-256 verified (key {_e(ver.fingerprint)}).</p>"
            )
        problems = "; ".join(ver.problems) if ver is not None else "not checked"
        return f'<p class="verdict bad">Release present but NOT verified: {_e(problems)}.</p>'
    if inp.release_refused:
        return f'<p class="verdict bad">Release refused: {_e(inp.release_refused)}</p>'
    return '<p class="verdict none">No release: none was made or none was given.</p>'


def _site_epsilons(inp: ReportInputs) -> list[list[str]]:
    """(site, ε, δ, source) rows: the release's checked ε where there is one, else privacy.json."""
    if inp.manifest is not None:
        sites = (inp.manifest.get("privacy") or {}).get("sites") or {}
        if sites:
            return [
                [name, _num(s.get("epsilon")), _g(s.get("delta")), "release manifest (checked)"]
                for name, s in sites.items()
            ]
    sites = (inp.privacy or {}).get("sites") or {}
    return [
        [name, _num(s.get("epsilon")), _g(s.get("delta")), inp.privacy_source]
        for name, s in sites.items()
        if isinstance(s, dict)
    ]


def _samples(inp: ReportInputs) -> str:
    parts = []
    if "samples" in inp.eval_pngs:
        parts.append(
            _figure(
                inp.eval_pngs["samples"],
                "Per class: a row of synthetic images above a row of real training images "
                f"({inp.evaluation.name}/{EVAL_PNGS['samples']}). The real rows are private.",
                pixelated=True,
            )
        )
    elif inp.eval_report is not None:
        parts.append(_na(f"{inp.evaluation.name} has no readable {EVAL_PNGS['samples']}"))
    if inp.release_grids:
        parts.append("<h3>Released synthetic images, per class</h3>")
        for name, png, shown, total in inp.release_grids:
            parts.append(
                _figure(png, f"synthetic: {name} ({shown} of {total} in the release)", True)
            )
    if not parts and inp.run_samples is not None:
        name, png = inp.run_samples
        parts.append(
            _figure(png, f"The run's G_ema at its last snapshot, one row per class ({name})", True)
        )
    return "\n".join(parts) or _na(
        "no evaluation (samples.png), release (synthetic images) or run samples were given"
    )


def _classifiers(inp: ReportInputs) -> str:
    report = inp.eval_report
    if report is None:
        return _na("no evaluation given; `fedspine evaluate` writes the classifier results")
    arms = report.get("arms", {})
    rows = []
    for name, arm in arms.items():
        history = arm.get("history") or {}
        rows.append(
            [
                name,
                _train_text(arm.get("train_data")),
                _auc_ci(arm.get("auc"), arm.get("ci")),
                _num(arm.get("sensitivity")),
                _num(arm.get("specificity")),
                f"step {history.get('best_steps', '?')} of {history.get('steps', '?')} "
                f"(val AUC {_num(history.get('best_val_auc'))})",
            ]
        )
    ratios = report.get("ratios", {})
    test_set = report.get("test_set", {})
    selection = report.get("selection", {})
    budget = report.get("classifier_budget") or {}
    parts = [
        _utility_html(report),
        f"<p>Task: {_e(report.get('task'))} over classes {_e(', '.join(map(str, report.get('class_names', []))))}. "
        "TRTR trains on real images, TSTR on synthetic images only, mixed on both; all are "
        f"tested on the same real test split ({_e(test_set.get('images', '?'))} images of "
        f"{_e(test_set.get('patients', '?'))} patients), with 95 % intervals from a "
        "patient-level bootstrap.</p>",
        _table(
            [
                "arm",
                "trained on",
                "test AUC [95 % CI]",
                "sensitivity",
                "specificity",
                "selected checkpoint",
            ],
            rows,
        ),
        f"<p>Training budget, the same for every arm: {_e(budget['rule'])}.</p>"
        if budget.get("rule")
        else "",
        _table(
            ["ratio (credits chance; see signal retained above)", "value"],
            [
                ["TSTR / TRTR (AUC)", _num(ratios.get("tstr_over_trtr"))],
                ["mixed / TRTR (AUC)", _num(ratios.get("mixed_over_trtr"))],
            ],
        ),
        f"<p>Every arm chose its epoch and threshold on the real validation split "
        f"({_e(selection.get('images', '?'))} images of {_e(selection.get('patients', '?'))} "
        "patients); sensitivity and specificity are at the threshold maximising Youden's J "
        "there.</p>",
    ]
    trts = report.get("class_fidelity")
    if trts:
        parts.append(
            "<p>Does each synthetic class look like its real class? TRTS (train real, test "
            f"synthetic): {_e(trts.get('classifier', 'the TRTR classifier'))} scored on the "
            f"{_e(trts.get('images', '?'))} synthetic images against the class each was "
            f"generated for: AUC <b>{_auc_ci(trts.get('auc'), trts.get('ci'))}</b> "
            "(0.5: the generator's classes are indistinguishable to a classifier that knows the "
            "real ones).</p>"
        )
        independence = (trts.get("judge") or {}).get("independence")
        if independence:
            parts.append(
                "<p>The judge must be a classifier the generator never trained against; "
                f"independence: {_e(independence)}.</p>"
            )
        scores = [
            f"{_e(name)}: mean score {_num(o.get('mean_score_positive'))} on images generated "
            f"as {_e(name)}, {_num(o.get('mean_score_negative'))} on the others"
            for name, o in (trts.get("per_output") or {}).items()
            if o.get("auc") is not None
        ]
        if scores:
            parts.append(
                "<p>"
                + "; ".join(scores)
                + ". Scores all near 0 or all near 1 mean the synthetic images lie outside what "
                "the classifier has seen, and the AUC then ranks tiny differences.</p>"
            )
    if test_set.get("patients_shared_with_train_or_val"):
        parts.append(
            f'<p class="bad">{_e(test_set["patients_shared_with_train_or_val"])} test patient '
            "id(s) also appear in the training or validation split: the AUCs may be optimistic.</p>"
        )
    names = report.get("output_names") or []
    if len(names) > 1:
        per = [
            [out]
            + [
                _auc_ci(
                    (arm.get("per_output") or {}).get(out, {}).get("auc"),
                    (arm.get("per_output") or {}).get(out, {}).get("ci"),
                )
                for arm in arms.values()
            ]
            for out in names
        ]
        parts.append("<h3>Per output (one-vs-rest)</h3>")
        parts.append(_table(["output", *arms], per))
    if "roc" in inp.eval_pngs:
        parts.append(
            _figure(
                inp.eval_pngs["roc"],
                f"ROC curves of TRTR, TSTR and mixed on the real test split "
                f"({inp.evaluation.name}/{EVAL_PNGS['roc']})",
            )
        )
    else:
        parts.append(_na(f"ROC curves: {inp.evaluation.name} has no readable {EVAL_PNGS['roc']}"))
    return "\n".join(parts)


def _utility_html(report: dict[str, Any]) -> str:
    """Signal retained per arm with its paired interval, and whether TSTR beats chance."""
    utility = (report.get("utility") or {}).get("arms") or {}
    if not utility:
        return _na("signal retained: this evaluation predates it; rerun `fedspine evaluate`")
    rows = []
    for arm, u in utility.items():
        ci = u.get("signal_retained_ci")
        rows.append(
            [
                arm,
                _num(u.get("signal_retained"))
                + (f" [{_num(ci[0])}, {_num(ci[1])}]" if ci else " [unbounded]"),
                _auc_ci(u.get("auc"), u.get("ci")),
                _num(u.get("reference_auc")),
                _e(u.get("verdict", "")),
            ]
        )
    return (
        "<p>Signal retained = (AUC − 0.5) / (TRTR AUC − 0.5): 0 = no more than chance, 1 = as "
        "much as the real training data; paired patient-level bootstrap intervals.</p>"
        + _table(["arm", "signal retained [95 % CI]", "AUC [95 % CI]", "TRTR AUC", "verdict"], rows)
    )


def _fidelity(inp: ReportInputs) -> str:
    report = inp.eval_report
    if report is None:
        return _na("no evaluation given; `fedspine evaluate` computes FID, KID and the rest")
    gen = report.get("generative") or {}
    results = gen.get("results") or []
    if not results:
        return _na(f"{inp.evaluation.name}/{EVAL_REPORT} holds no distribution metrics")
    rows = [
        [
            r.get("extractor", "?"),
            r.get("compared", "?"),
            f"{_num(_times(r.get('kid'), 1e3))} ± {_num(_times(r.get('kid_std'), 1e3))}",
            _num(r.get("fid"), 4),
            _num(r.get("precision")),
            _num(r.get("recall")),
            _num(r.get("density")),
            _num(r.get("coverage")),
        ]
        for r in results
    ]
    return "\n".join(
        [
            f"<p>Reference: {_e(gen.get('reference') or str(gen.get('n_real', '?')) + ' real images')}. "
            + (f"The {_e(gen['equal_n'])}. " if gen.get("equal_n") else "")
            + f"Precision/recall and density/coverage with k = {_e(gen.get('k', '?'))}. Each "
            "number holds only for the feature extractor named in its row. The floor rows are "
            "what a second real sample reaches at the same size and class mix; KID leads "
            "because it is unbiased, while FID grows at small n.</p>",
            _table(
                [
                    "extractor",
                    "compared",
                    "KID × 10³ (± std)",
                    "FID",
                    "precision",
                    "recall",
                    "density",
                    "coverage",
                ],
                rows,
            ),
            "<p>Extractors:</p><ul>"
            + "".join(f"<li>{_e(d)}</li>" for d in gen.get("extractors") or [])
            + "</ul>",
        ]
    )


def _privacy(inp: ReportInputs) -> str:
    privacy = inp.privacy
    if privacy is None:
        why = (
            f"{inp.run.name} has no {PRIVACY_JSON}"
            if inp.run is not None
            else "no run or release was given"
        )
        return _na(f"privacy ledger: {why}")
    parts = [f"<p>From {_e(inp.privacy_source)}.</p>"]
    sites = {k: v for k, v in (privacy.get("sites") or {}).items() if isinstance(v, dict)}
    if sites:
        phased = any(
            isinstance(site.get("phases"), dict) and site["phases"] for site in sites.values()
        )
        rows = []
        for name, site in sites.items():
            mechs = [m for m in site.get("mechanisms") or [] if isinstance(m, dict)]
            rows.append(
                [
                    name,
                    _num(site.get("epsilon")),
                    *(phase_cells(site) if phased else []),
                    _g(site.get("delta")),
                    _distinct(_g(m.get("noise_multiplier")) for m in mechs),
                    _distinct(_g(m.get("clip_norm")) for m in mechs),
                    _distinct(_g(m.get("sample_rate")) for m in mechs),
                    str(sum(int(m.get("steps") or 0) for m in mechs)),
                    "yes" if site.get("ledger_complete") is True else "NO",
                ]
            )
        parts.append(
            _table(
                [
                    "site",
                    *(["ε (total)", *(label for _, label in PHASE_COLUMNS)] if phased else ["ε"]),
                    "δ",
                    "σ",
                    "clip C",
                    "sample rate q",
                    "steps",
                    "ledger complete",
                ],
                rows,
            )
        )
    else:
        parts.append(_na("per-site ε: no site spent ε (the run was not trained with DP)"))
    parts.append("<h3>ε per site over the rounds</h3>")
    series = _epsilon_series(inp, sites)
    if series:
        caps = _site_caps(inp)
        max_eps = ((inp.manifest or {}).get("configuration") or {}).get("max_epsilon")
        png = _epsilon_plot(series, caps, _float(max_eps), _float(privacy.get("delta")))
        parts.append(
            _figure(png, "ε each site had spent after each federated round (from the run's ledger)")
        )
        rounds = sorted({r for pts in series.values() for r, _ in pts})
        table = [
            [str(r)]
            + [_num(dict(series[s]).get(r)) if r in dict(series[s]) else "-" for s in series]
            for r in rounds
        ]
        parts.append(_table(["round", *series], table))
    elif inp.rounds or inp.federation_status is not None:
        parts.append(_na("ε per round: the federation's sites reported no DP spending"))
    else:
        steps = "; ".join(
            f"{name}: ε = {_num(site.get('epsilon'))} after "
            f"{sum(int(m.get('steps') or 0) for m in site.get('mechanisms') or [])} D steps"
            for name, site in sites.items()
        )
        parts.append(
            _na("ε per round: a centralised run has no rounds" + (f" ({steps})" if steps else ""))
        )
    if inp.privacy_plot is not None:
        parts.append(
            _figure(
                inp.privacy_plot,
                f"ε against discriminator steps per site ({inp.run.name}/{PRIVACY_PLOT}, "
                "written by `fedspine privacy report`)",
            )
        )
    if inp.rounds:
        parts.append("<h3>Federated rounds</h3>")
        if inp.federation_status:
            st = inp.federation_status
            parts.append(
                f"<p>Federation {_e(st.get('federation'))}: {_e(st.get('state'))}, "
                f"{_e(st.get('completed_rounds'))} of {_e(st.get('rounds'))} rounds completed"
                + (f" ({_e(st['reason'])})" if st.get("reason") else "")
                + ".</p>"
            )
        rows = [
            [
                str(r.get("round", "?")),
                ", ".join(str(s.get("site", "?")) for s in r.get("sites") or []) or "-",
                "; ".join(
                    f"{f.get('site', '?')}: {f.get('reason', '?')}" for f in r.get("failures") or []
                )
                or "-",
                _num(r.get("seconds"), 1),
                str(r.get("finished", "")),
            ]
            for r in inp.rounds
        ]
        parts.append(
            _table(["round", "sites that replied", "failures", "seconds", "finished"], rows)
        )
    elif inp.federation_status is not None:
        parts.append(_na(f"federated rounds: {inp.run.name} has no {ROUNDS_LOG} yet"))
    return "\n".join(parts)


def _audits(inp: ReportInputs) -> str:
    parts = ["<h3>Memorisation: distance to the closest training image</h3>"]
    mem = (inp.eval_report or {}).get("memorisation")
    if mem:
        parts.append(
            f'<p>Verdict: <b class="{"bad" if mem.get("flagged") else "ok"}">'
            f"{_e(mem.get('verdict'))}</b>. Distances in the space of {_e(mem.get('extractor'))}, "
            f"calibrated on {_e(mem.get('heldout'))} ({_e(mem.get('n_heldout'))} images the "
            f"generator never saw). Rule: {_e(mem.get('rule'))}.</p>"
        )
        parts.append(
            _table(
                ["measure", "value", "expected without memorisation"],
                [
                    [
                        "exact copies of a training image",
                        f"{mem.get('exact_copies', '?')} of {mem.get('n_synthetic', '?')}",
                        "0",
                    ],
                    [
                        "closer to training than 99 % of held-out images",
                        _pct(mem.get("share_below_p1")),
                        "about 1 %",
                    ],
                    [
                        "closer to training than 95 % of held-out images",
                        _pct(mem.get("share_below_p5")),
                        "about 5 %",
                    ],
                    [
                        "closer to training than to held-out images",
                        _pct(mem.get("share_closer_to_train")),
                        "about 50 %",
                    ],
                    [
                        "median distance synthetic → training",
                        _num(mem.get("median_syn_to_train"), 4),
                        f"held-out → training: {_num(mem.get('median_heldout_to_train'), 4)}",
                    ],
                ],
            )
        )
        if "closest_pairs" in inp.eval_pngs:
            parts.append(
                _figure(
                    inp.eval_pngs["closest_pairs"],
                    "The synthetic images closest to a training image (top) and that training "
                    f"image (bottom), with their distance ({inp.evaluation.name}/"
                    f"{EVAL_PNGS['closest_pairs']}). The bottom row is private.",
                )
            )
        else:
            parts.append(_na(f"closest pairs figure: {inp.evaluation.name} has none readable"))
    else:
        parts.append(_na("evaluation memorisation audit: no evaluation given"))
    gate = inp.release_memorisation
    if gate:
        decision = gate.get("gate") or {}
        parts.append("<h4>Release gate</h4>")
        parts.append(
            f'<p><b class="{"ok" if decision.get("passed") else "bad"}">'
            f"{'passed' if decision.get('passed') else 'failed'}</b>: "
            f"{_e(decision.get('flagged', '?'))} of {_e(decision.get('n_synthetic', '?'))} "
            f"synthetic images ({_pct(decision.get('share_flagged'))}) lie within the threshold "
            f"{_num(decision.get('threshold'), 4)} of a training image; expected by chance "
            f"{_pct(decision.get('expected_share'))}, allowed {_pct(decision.get('allowed_share'))}"
            f" (in {_e(gate.get('extractor', 'raw pixels'))})."
            + (f" Rule: {_e(decision['rule'])}." if decision.get("rule") else "")
            + "</p>"
        )
    elif inp.release is not None:
        parts.append(_na(f"release gate: no {RELEASE_MEMORISATION} in the steward's audit folder"))
    if inp.steward_pairs is not None:
        parts.append(
            _figure(
                inp.steward_pairs,
                "The release gate's closest synthetic/training pairs (steward's audit folder; "
                "shows real images, never part of the release)",
            )
        )
    parts.append("<h3>Membership inference from the synthetic images alone</h3>")
    mia = inp.membership
    if mia:
        rows = [
            [
                label,
                _num((mia.get(key) or {}).get("auc")),
                _num((mia.get(key) or {}).get("tpr_at_1pct_fpr")),
            ]
            for key, label in (
                ("nearest", "nearest synthetic image"),
                ("monte_carlo", "Monte-Carlo"),
            )
        ]
        parts.append(
            f"<p>{_e(mia.get('attack'))} in {_e(mia.get('features'))}: "
            f"{_e(mia.get('n_members'))} members (training images) against "
            f"{_e(mia.get('n_nonmembers'))} non-members (held out), "
            f"{_e(mia.get('n_synthetic'))} synthetic images.</p>"
        )
        parts.append(_table(["attack", "AUC", "TPR at 1 % FPR"], rows))
        parts.append(
            f"<p>{_e(mia.get('interpretation'))}. This attack compares populations: the "
            "generator's ε gives no formal bound on its AUC or TPR, and a low AUC is "
            "evidence, never a proof of privacy.</p>"
        )
    else:
        parts.append(
            _na("membership inference: `fedspine release` runs it; no release was given")
            if inp.release is None
            else _na(f"membership inference: {inp.release.name} has no {RELEASE_MEMBERSHIP}")
        )
    parts.append("<h3>One-run canary audit of the DP step</h3>")
    canary = inp.canary
    if canary:
        passed = canary.get("passed")
        parts.append(
            f'<p>From {_e(inp.canary_source)}: <b class="{"ok" if passed else "bad"}">'
            f"{'no evidence against the claim' if passed else 'the audit bound exceeds the claim'}"
            "</b>.</p>"
        )
        keys = (
            ("eps_lower_bound", "empirical ε lower bound"),
            ("claimed_epsilon", "accountant's ε"),
            ("delta", "δ"),
            ("num_canaries", "canaries"),
            ("correct", "correct guesses"),
            ("guesses", "guesses"),
            ("noise_multiplier", "σ"),
            ("beta", "confidence β"),
        )
        parts.append(
            _table(["measure", "value"], [[label, _g(canary.get(k))] for k, label in keys])
        )
    else:
        looked = " or ".join(CANARY_FILES)
        parts.append(
            _na(
                f"no canary audit output ({looked}) in the folders given; the one-run canary "
                "audit of the DP step (Steinke, Nasr and Jagielski 2023) runs in the test suite"
            )
        )
    return "\n".join(parts)


def _public_private(inp: ReportInputs) -> str:
    parts = []
    components = (inp.privacy or {}).get("components") or {}
    if components:
        parts.append(
            "<p>From the training's privacy summary:</p><ul>"
            + "".join(f"<li><b>{_e(k)}</b>: {_e(v)}</li>" for k, v in components.items())
            + "</ul>"
        )
    else:
        parts.append(_na("training components: no privacy.json was given"))
    items = []
    report = inp.eval_report
    if report is not None:
        selection = report.get("selection") or {}
        items.append(
            f"<li><b>Real validation split</b> ({_e(selection.get('dataset', '?'))}): "
            f"{_e(selection.get('use', 'selection only'))}.</li>"
        )
        items.append(
            "<li><b>Real test split</b>: private real data, used only for the final AUCs and "
            "the memorisation calibration; not covered by the DP guarantee.</li>"
        )
    if inp.release is not None:
        items.append(
            "<li><b>Public (in the release)</b>: the synthetic images and labels, the generator "
            "G_ema (never the discriminator, a membership oracle), the privacy report and the "
            "audit summaries (no per-image values, no real images).</li>"
        )
    if _shows_real_images(inp):
        items.append(
            "<li><b>This page</b>: shows real training images and statistics of private data; "
            "it is for the data owner and the steward only.</li>"
        )
    if items:
        parts.append("<ul>" + "".join(items) + "</ul>")
    prng = (inp.privacy or {}).get("prng")
    if prng:
        parts.append(f"<p>Caveat: {_e(prng)}</p>")
    return "\n".join(parts)


def _release(inp: ReportInputs) -> str:
    manifest = inp.manifest
    if manifest is None:
        if inp.release_refused:
            return (
                f'<p class="bad">The release was refused: {_e(inp.release_refused)}</p>'
                "<p>A refused release writes nothing; the reason above is all there is.</p>"
            )
        return _na(
            "no release given; `fedspine release RUN --out RELEASE --max-epsilon E "
            "--audit-data PREPARED` makes one"
        )
    parts = [_release_verdict(inp)]
    ver = inp.verification
    if ver is not None:
        for note in ver.notes:
            parts.append(f"<p>Note: {_e(note)}</p>")
        if ver.problems:
            parts.append("<ul>" + "".join(f"<li>{_e(p)}</li>" for p in ver.problems) + "</ul>")
    files = manifest.get("files") or []
    size = sum(int(f.get("bytes") or 0) for f in files if isinstance(f, dict))
    run = manifest.get("run") or {}
    rows = [
        ["release folder", inp.release.name],
        ["created", str(manifest.get("created", "?"))],
        ["fedspine version", str(manifest.get("fedspine_version", "?"))],
        ["run", str(run.get("name", "?"))],
        ["generator SHA-256", str(run.get("generator_sha256", "?"))],
        ["signing key", str(manifest.get("signing_key", "?"))],
        ["files", f"{len(files)} ({size / 1e6:.2f} MB)"],
    ]
    parts.append(_table(["", ""], rows))
    decision = (inp.release_privacy or {}).get("release_decision") or {}
    if decision.get("checks"):
        parts.append(
            "<p>Gates passed:</p><ul>"
            + "".join(f"<li>{_e(c)}</li>" for c in decision["checks"])
            + "</ul>"
        )
    for warning in decision.get("warnings") or []:
        parts.append(f'<p class="bad">Warning: {_e(warning)}</p>')
    coverage = decision.get("audit_coverage") or {}
    if coverage:
        parts.append(
            "<p>Audit data covered: "
            + _e(", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in coverage.items()))
            + ".</p>"
        )
    parts.append(
        f"<p>Anyone can check it with <code>fedspine verify {_e(inp.release.name)} "
        "--public-key steward.pub</code> (the steward's key, obtained separately).</p>"
    )
    return "\n".join(parts)


def _provenance(inp: ReportInputs, commands: Sequence[str], config: Mapping[str, Any]) -> str:
    parts = ["<h3>Commands</h3>"]
    if commands:
        parts.append(_pre("\n".join(str(c) for c in commands)))
    else:
        parts.append(_na("the commands were not recorded by whoever wrote this page"))
    for name, value in config.items():
        parts.append(f"<h3>Configuration: {_e(name)}</h3>")
        parts.append(_pre(value) if isinstance(value, str) else _settings(value))
    report = inp.eval_report
    if report is not None:
        parts.append(f"<h3>Evaluation ({_e(inp.evaluation.name)})</h3>")
        command, outside = _evaluate_command(report, inp.eval_config or {}, inp.evaluation)
        parts.append("<p>Equivalent command, rebuilt from its report.json:</p>")
        parts.append(_pre(command))
        if outside:
            parts.append(f"<p>Set outside the command line: {_e(outside)}.</p>")
        rows = [
            [key, str(info.get("path", "?")), str(info.get("content_hash", "?"))]
            for key, info in (report.get("inputs") or {}).items()
            if isinstance(info, dict)
        ]
        parts.append(_table(["input", "path", "content hash"], rows))
        parts.append(_settings(inp.eval_config or {}))
        parts.append(
            f"<p>fedspine {_e(report.get('fedspine_version', '?'))}, written "
            f"{_e(report.get('created', '?'))}.</p>"
        )
    if inp.run is not None:
        parts.append(f"<h3>Run ({_e(inp.run.name)})</h3>")
        if inp.federation_config is not None:
            parts.append(f"<p>{_e(FEDERATION_CONFIG)}:</p>")
            parts.append(_settings(inp.federation_config))
        if inp.run_config_text is not None:
            parts.append(f"<p>{_e(RUN_CONFIG)}:</p>")
            try:
                parts.append(_settings(tomllib.loads(inp.run_config_text)))
            except tomllib.TOMLDecodeError:
                parts.append(_pre(inp.run_config_text))
        if inp.federation_config is None and inp.run_config_text is None:
            parts.append(_na(f"{inp.run.name} has no {FEDERATION_CONFIG} or {RUN_CONFIG}"))
    if inp.manifest is not None:
        parts.append(f"<h3>Release ({_e(inp.release.name)})</h3>")
        keys = ("configuration", "audit_data", "run")
        parts.append(_settings({k: inp.manifest.get(k) for k in keys}))
    return "\n".join(parts)


def _evaluate_command(
    report: dict[str, Any], cfg: dict[str, Any], evaluation: Path
) -> tuple[str, str]:
    """The `fedspine evaluate` line that reproduces ``report``, and settings it cannot carry."""
    from fedspine.evaluation.report import EvaluateConfig

    inputs = report.get("inputs") or {}
    words = ["fedspine", "evaluate"]
    for option, key in (("--synthetic", "synthetic"), ("--train", "train"), ("--test", "test")):
        words += [option, str((inputs.get(key) or {}).get("path", "?"))]
    words += ["--out", str(evaluation)]
    for key in EVALUATE_OPTIONS:
        value = cfg.get(key)
        if value is not None:
            words += ["--" + key.replace("_", "-"), str(value)]
    defaults = EvaluateConfig().to_dict()
    outside = [
        f"{key} = {cfg[key]!r}"
        for key in defaults
        if key not in EVALUATE_OPTIONS and key in cfg and cfg[key] != defaults[key]
    ]
    return shlex.join(words), ", ".join(outside)


def _epsilon_series(
    inp: ReportInputs, sites: dict[str, dict[str, Any]]
) -> dict[str, list[tuple[int, float]]]:
    """(round, ε) per site: privacy.json's epsilon_per_round, else the sites' round reports."""
    series: dict[str, list[tuple[int, float]]] = {}
    for name, site in sites.items():
        points = [
            (int(p["round"]), float(p["epsilon"]))
            for p in site.get("epsilon_per_round") or []
            if isinstance(p, dict) and _float(p.get("epsilon")) is not None
        ]
        if points:
            series[name] = sorted(points)
    if series:
        return series
    for record in inp.rounds:
        for site in record.get("sites") or []:
            eps = _float((site.get("privacy") or {}).get("epsilon"))
            if eps is not None and eps >= 0:
                series.setdefault(str(site.get("site")), []).append((int(record["round"]), eps))
    return {k: sorted(v) for k, v in series.items()}


def _site_caps(inp: ReportInputs) -> dict[str, float]:
    caps: dict[str, float] = {}
    for record in inp.rounds:
        for site in record.get("sites") or []:
            cap = _float((site.get("privacy") or {}).get("cap"))
            if cap is not None:
                caps[str(site.get("site"))] = cap
    return caps


def _epsilon_plot(
    series: dict[str, list[tuple[int, float]]],
    caps: dict[str, float],
    release_cap: float | None,
    delta: float | None,
) -> bytes:
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(7.0, 3.6), dpi=110)
    ax = fig.add_subplot()
    for name, points in series.items():
        rounds, eps = zip(*points, strict=True)
        ax.plot(rounds, eps, marker="o", label=name.replace("$", r"\$"))
    for cap in sorted(set(caps.values())):
        ax.axhline(cap, ls="--", lw=1, color="0.45", label=f"site cap ε = {cap:g}")
    if release_cap is not None:
        ax.axhline(
            release_cap, ls=":", lw=1.2, color="C3", label=f"release cap ε = {release_cap:g}"
        )
    ax.set_xlabel("federated round")
    ax.set_ylabel("ε spent" + (f" (δ = {delta:g})" if delta is not None else ""))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _class_grids(folder: Path, problems: list[str]) -> list[tuple[str, bytes, int, int]]:
    """One PNG row of the first released images of each class, in classes.txt order."""
    from PIL import Image, UnidentifiedImageError

    labels = folder / "labels.csv"
    if not labels.is_file():
        return []
    try:
        with open(labels, newline="") as fh:
            rows = [(r["file"], r["label"]) for r in csv.DictReader(fh)]
    except (OSError, KeyError, csv.Error) as err:
        problems.append(f"{folder.name}/labels.csv: unreadable ({err})")
        return []
    classes_txt = folder / "classes.txt"
    order = (
        [c.strip() for c in classes_txt.read_text().splitlines() if c.strip()]
        if classes_txt.is_file()
        else []
    )
    order += [label for _, label in rows if label not in order]
    root = folder.resolve()
    grids = []
    for name in order:
        files = [f for f, label in rows if label == name]
        tiles = []
        for rel in files[:SAMPLES_PER_CLASS]:
            path = (folder / rel).resolve()
            if not path.is_relative_to(root):
                problems.append(f"{folder.name}/labels.csv: {rel} lies outside the folder")
                continue
            try:
                with Image.open(path) as im:
                    tiles.append(im.convert("L"))
            except (OSError, UnidentifiedImageError) as err:
                problems.append(f"{folder.name}/{rel}: not a readable image ({err})")
        if tiles:
            grids.append((name, _row_png(tiles), len(tiles), len(files)))
    return grids


def _row_png(tiles: list) -> bytes:
    from PIL import Image

    side = max(t.width for t in tiles)
    cell = min(128, max(64, side))
    gap = 4
    canvas = Image.new("L", (len(tiles) * (cell + gap) - gap, cell), color=255)
    for i, tile in enumerate(tiles):
        resample = Image.NEAREST if cell >= tile.width else Image.LANCZOS
        canvas.paste(tile.resize((cell, cell), resample), (i * (cell + gap), 0))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()


def _folder(path: Path, what: str, hint: str) -> Path:
    if not path.is_dir():
        raise HtmlReportError(f"{path}: no such {what} folder; pass {hint}")
    return path


def _json(path: Path, problems: list[str]) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        problems.append(f"{path.parent.name}/{path.name}: not readable JSON ({err})")
        return None


def _jsonl(path: Path, problems: list[str]) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    records = []
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as err:
            problems.append(f"{path.parent.name}/{path.name} line {n}: not JSON ({err})")
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _png(path: Path, problems: list[str]) -> bytes | None:
    """The file's bytes if it is a PNG that decodes, else None (and a note unless it's absent)."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        return None
    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.format != "PNG":
                raise UnidentifiedImageError(f"a {im.format} image, not a PNG")
            im.load()
    except (OSError, UnidentifiedImageError, ValueError) as err:
        problems.append(f"{path.parent.name}/{path.name}: not a readable PNG ({err})")
        return None
    return data


def _shows_real_images(inp: ReportInputs) -> bool:
    return bool({"samples", "closest_pairs"} & set(inp.eval_pngs)) or inp.steward_pairs is not None


def _figure(png: bytes, caption: str, pixelated: bool = False) -> str:
    from PIL import Image

    with Image.open(io.BytesIO(png)) as im:
        width, height = im.size
    data = base64.b64encode(png).decode("ascii")
    cls = ' class="pixelated"' if pixelated else ""
    return (
        f'<figure><img{cls} alt="{_e(caption)}" width="{width}" height="{height}" '
        f'src="data:image/png;base64,{data}"><figcaption>{_e(caption)}</figcaption></figure>'
    )


def _table(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    if not rows:
        return ""
    header = "".join(f"<th>{_e(h)}</th>" for h in head) if any(head) else ""
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table>{f'<thead><tr>{header}</tr></thead>' if header else ''}<tbody>{body}</tbody></table>"


def _pre(text: str) -> str:
    return f"<pre>{_e(text)}</pre>"


def _na(why: str) -> str:
    return f'<p class="na">not available: {_e(why)}</p>'


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _settings(value: Any) -> str:
    """Settings as compact ``key = value`` lines (nested keys dotted), in columns."""
    items = "".join(f"<li>{_e(k)} = {_e(v)}</li>" for k, v in _flatten(value))
    return f'<ul class="settings">{items}</ul>' if items else _na("no settings recorded")


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


def _distinct(values: Any) -> str:
    return ", ".join(dict.fromkeys(values)) or "-"


def _float(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _num(value: Any, digits: int = 3) -> str:
    number = _float(value)
    return "n/a" if number is None else f"{number:.{digits}f}"


def _g(value: Any) -> str:
    number = _float(value)
    return "n/a" if number is None else f"{number:.4g}"


def _pct(value: Any) -> str:
    number = _float(value)
    return "n/a" if number is None else f"{100 * number:.1f} %"


def _times(value: Any, factor: float) -> float | None:
    number = _float(value)
    return None if number is None else number * factor


def _auc_ci(value: Any, ci: Any) -> str:
    if _float(value) is None:
        return "n/a"
    if isinstance(ci, list | tuple) and len(ci) == 2 and all(_float(c) is not None for c in ci):
        return f"{float(value):.3f} [{float(ci[0]):.3f}, {float(ci[1]):.3f}]"
    return f"{float(value):.3f} [no interval]"


def _train_text(train_data: Any) -> str:
    if not isinstance(train_data, dict):
        return "?"
    parts = []
    if train_data.get("real_train"):
        parts.append(f"{train_data['real_train']} real")
    if train_data.get("synthetic"):
        parts.append(f"{train_data['synthetic']} synthetic")
    return " + ".join(parts) or "?"


_CSS = """
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

_SELF_CHECK = """
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
