"""The one table of ``reproduce.md``: each experiment's published value beside ours, and its ε.

Cells are built from each arm's record (its evaluation summary, privacy and ablation): replicate
0 with its patient-level interval, then the mean and range across training seeds when there are
several. The table is stored in ``reproduce.json`` as rows of text, so the CLI, the Markdown and
a later reader all show the same cells.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from fedspine.experiments.paper import PAPER
from fedspine.experiments.plan import (
    CEILING_ARM,
    DP_ARM_PREFIX,
    DP_EMBEDDING_PREFIX,
    DP_PUBLIC_PREFIX,
    PUBLIC_ONLY_ARM,
)
from fedspine.experiments.record import TableRow
from fedspine.experiments.summaries import done, is_replicate, status, utility
from fedspine.formatting import auc_ci, num, signed

NO_DP = "∞ (no DP)"
PUBLIC_EPSILON = "0 (public data only)"


def build_table(
    results: dict[str, dict[str, Any]],
    data_info: dict[str, dict[str, Any]],
    seeds: dict[str, dict[str, Any]] | None = None,
) -> list[TableRow]:
    """The rows of the one table, each with the paper's value beside ours and the ε it has.

    Cells hold replicate 0 with its patient-level interval; with several training seeds
    (``seeds``, from :func:`fedspine.experiments.summaries.seed_summary`) they add the mean and
    range across them.
    """
    seeds = seeds or {}
    rows = _real_and_cgan_rows(results.get("cgan", {}), seeds.get("cgan"))
    lesion = results.get("lesion", {})
    lev = done(lesion)
    ours, signal = _tstr_cells(lesion, seeds.get("lesion"))
    rows.append(
        TableRow(
            "3. cGAN (lesion type; the paper's 8 classes): TSTR, one-vs-rest mean AUC",
            PAPER["lesion"],
            ours,
            signal,
            _join(_ratio_note(lev), _lesion_details(lev, data_info.get("lesion", {})))
            if lev
            else "",
            NO_DP,
        )
    )
    spine = results.get("spinegan", {})
    sev = done(spine)
    ours, signal = _tstr_cells(spine, seeds.get("spinegan"))
    rows.append(
        TableRow(
            "4. SpineGAN (abnormality, clinical loss): TSTR",
            _paper_tstr("spinegan"),
            ours,
            signal,
            _join(
                _ratio_note(sev),
                f"paper: {PAPER['spinegan_metrics']}; ours: " + _gan_metrics(sev),
                "not private: its classifier saw the real images (error 7)",
            )
            if sev
            else "",
            NO_DP,
        )
    )
    public = public_auc(results)
    rows.append(
        _with_contribution(
            _dp_spinegan_row(results.get("dp_spinegan", {}), seeds.get("dp_spinegan")),
            results.get("dp_spinegan", {}),
            public,
        )
    )
    sigmas: dict[float, float] = {}
    for name, result in results.items():
        if not name.startswith(DP_ARM_PREFIX) or is_replicate(name):
            continue
        rows.append(
            _with_contribution(_dp_row(name, result, seeds.get(name), sigmas), result, public)
        )
    rows += _ablation_rows(results, sigmas, seeds)
    rows += _public_rows(results, seeds, public)
    return rows


def public_auc(results: dict[str, dict[str, Any]]) -> float | None:
    """The public-only arm's TSTR AUC (replicate 0), the baseline every DP arm is set against."""
    ev = done(results.get(PUBLIC_ONLY_ARM))
    return (ev.get("tstr") or {}).get("auc") if ev else None


def dp_minus_public(result: dict[str, Any], public: float | None) -> str:
    """'+0.012' (a DP arm's TSTR AUC minus the public-only arm's), '' when either is missing."""
    ev = done(result)
    auc = (ev.get("tstr") or {}).get("auc") if ev else None
    if auc is None or public is None:
        return ""
    difference = float(auc) - float(public)
    return ("+" if difference >= 0 else "") + signed(difference, 3)


def _with_contribution(row: TableRow, result: dict[str, Any], public: float | None) -> TableRow:
    cell = dp_minus_public(result, public)
    return dataclasses.replace(row, dp_minus_public=cell) if cell else row


def _public_rows(
    results: dict[str, dict[str, Any]],
    seeds: dict[str, dict[str, Any]],
    public: float | None,
) -> list[TableRow]:
    """Issue 15's routes from a public checkpoint: the checkpoint alone, then per ε DP-SGD from
    it on few D parameters and the DP mean embedding fitted from it; each DP row with what it
    adds to the public-only arm."""
    if PUBLIC_ONLY_ARM not in results:
        return []
    base = results[PUBLIC_ONLY_ARM]
    ev = done(base)
    ours, signal = _tstr_cells(base, seeds.get(PUBLIC_ONLY_ARM))
    checkpoint = base.get("public_run") or {}
    rows = [
        TableRow(
            "6. public checkpoint only: its own generator, no private data",
            "not in the paper",
            ours,
            signal,
            _join(
                f"public checkpoint sha256:{checkpoint.get('sha256', '?')[:12]} (declared "
                f"public: {checkpoint.get('declaration', '?')}); the baseline of "
                "'DP − public-only'",
                _ratio_note(ev),
                _gan_metrics(ev),
            )
            if ev
            else "",
            PUBLIC_EPSILON,
        )
    ]
    for prefix in (DP_PUBLIC_PREFIX, DP_EMBEDDING_PREFIX):
        for name, result in results.items():
            if name.startswith(prefix) and not is_replicate(name):
                rows.append(_public_dp_row(prefix, name, result, seeds.get(name), public))
    return rows


def _public_dp_row(
    prefix: str,
    name: str,
    result: dict[str, Any],
    summary: dict[str, Any] | None,
    public: float | None,
) -> TableRow:
    """A DP arm that starts from the public checkpoint: its spent ε (the run's summary and the
    arm's own privacy home), its mechanism, the ceiling at its ε and what it adds."""
    eps = result.get("epsilon_target")
    target = f", target ε = {eps:g}" if eps else f" ({name})"
    title = (
        "6. DP-SGD from the public checkpoint, few D parameters privatised" + target
        if prefix == DP_PUBLIC_PREFIX
        else "6. DP mean embedding (one release), G fitted from the public checkpoint" + target
    )
    dev = done(result)
    details = spent = ""
    if dev:
        p = result.get("privacy", {})
        mech = (p.get("mechanisms") or [{}])[-1]
        spent = _spent(p)
        mechanism = (
            f"one Gaussian release: σ = {num(mech.get('noise_multiplier'), 3)}, "
            f"{mech.get('steps', '?')} step at q = {num(mech.get('sample_rate'), 3)}"
            if prefix == DP_EMBEDDING_PREFIX
            else f"σ = {num(mech.get('noise_multiplier'), 3)}, q = "
            f"{num(mech.get('sample_rate'), 3)}, {mech.get('steps', '?')} D steps"
        )
        details = _join(
            f"spent ε = {spent} ({p.get('accountant')}, patient level), "
            f"{num(result.get('epsilon_home'), 2)} in the arm's own privacy home; {mechanism}",
            _ceiling_note(dev),
            _contribution_note(result, public),
            _ratio_note(dev),
            _gan_metrics(dev),
        )
    ours, signal = _tstr_cells(result, summary)
    return TableRow(
        title,
        "not in the paper",
        ours,
        signal,
        details,
        spent,
        dp_minus_public(result, public),
    )


def _contribution_note(result: dict[str, Any], public: float | None) -> str:
    cell = dp_minus_public(result, public)
    return f"DP − public-only {cell} (TSTR AUC, point estimates)" if cell else ""


def _real_and_cgan_rows(cgan: dict[str, Any], summary: dict[str, Any] | None) -> list[TableRow]:
    """Rows 1 and 2: the real classifier, the cGAN's TSTR and its mixed arm (one evaluation)."""
    ev = done(cgan)
    rows = [
        TableRow(
            "1. real classifier (TRTR), normal vs abnormal",
            PAPER["trtr"],
            _join(
                _auc_cell(ev["trtr"]) if ev else status(cgan),
                _over_seeds(summary, "trtr_auc"),
            ),
            "1 (reference)" if ev else "",
            "trained once per seed on the real training split and shared by every arm's "
            f"evaluation; {ev['test_images']} test images"
            if ev
            else "",
            "— (real images, nothing released)",
        )
    ]
    ours, signal = _tstr_cells(cgan, summary)
    rows.append(
        TableRow(
            "2. cGAN (abnormality): TSTR",
            _paper_tstr("cgan"),
            ours,
            signal,
            _join(_ratio_note(ev), _gan_metrics(ev)) if ev else "",
            NO_DP,
        )
    )
    rows.append(
        TableRow(
            "2. cGAN (abnormality): mixed, real + synthetic",
            PAPER["mixed"],
            _join(
                _auc_cell(ev.get("mixed")) if ev else status(cgan),
                _over_seeds(summary, "mixed_auc"),
            ),
            _signal_cell(ev, "mixed") if ev and ev.get("mixed") else "",
            _join(
                _ratio_note(ev, key="mixed_over_trtr", label="mixed/TRTR"),
                "all synthetic images added to the real training split",
            )
            if ev
            else "",
            NO_DP,
        )
    )
    return rows


def _dp_row(
    name: str,
    result: dict[str, Any],
    summary: dict[str, Any] | None,
    sigmas: dict[float, float],
) -> TableRow:
    """A DP-SGD arm: its spent ε, σ, q and steps; records its σ in ``sigmas`` for the ablation."""
    dev = done(result)
    eps = result.get("epsilon_target")
    title = f"5. DP-SGD cGAN, target ε = {eps:g}" if eps else f"5. DP-SGD cGAN ({name})"
    details = spent = ""
    if dev:
        p = result.get("privacy", {})
        mech = (p.get("mechanisms") or [{}])[-1]
        if eps and mech.get("noise_multiplier") is not None:
            sigmas[float(eps)] = float(mech["noise_multiplier"])
        spent = _spent(p)
        details = _join(
            f"spent ε = {spent} ({p.get('accountant')}, patient level), σ = "
            f"{num(mech.get('noise_multiplier'), 3)}, q = "
            f"{num(mech.get('sample_rate'), 3)}, {mech.get('steps', '?')} D steps",
            _ceiling_note(dev),
            _ratio_note(dev),
            _gan_metrics(dev),
        )
    ours, signal = _tstr_cells(result, summary)
    return TableRow(title, PAPER["dp"], ours, signal, details, spent)


def _tstr_cells(result: dict[str, Any], summary: dict[str, Any] | None) -> tuple[str, str]:
    """(ours, signal retained) of a generator arm: replicate 0 with its intervals, then the mean
    and range across training seeds when there are several."""
    ev = done(result)
    return (
        _join(
            _auc_cell(ev["tstr"]) if ev else status(result),
            _over_seeds(summary, "tstr_auc"),
        ),
        _join(
            _signal_cell(ev, "TSTR") if ev else "",
            _over_seeds(summary, "signal_retained", digits=2),
        ),
    )


def _signal_cell(ev: dict[str, Any], arm: str) -> str:
    """Signal retained [95 % CI]; an interval containing chance, or none at all, is said in
    words, since the point estimate alone would read as a result."""
    u = utility(ev, arm)
    value, ci = u.get("signal_retained"), u.get("signal_retained_ci")
    if value is None:
        cell = "n/a (TRTR's own interval contains chance)" if u else "n/a"
    else:
        bounds = f"{signed(ci[0])}, {signed(ci[1])}" if ci else "interval unbounded"
        cell = f"{signed(value)} [{bounds}]"
    if u.get("ci_contains_chance"):
        cell += f"; {arm}'s interval contains chance: no evidence of signal"
    return cell


def _paper_tstr(arm: str) -> str:
    """The paper's TSTR with the signal retained and ratio derived from it, marked derived."""
    return (
        f"{PAPER[f'{arm}_tstr']}; signal retained {PAPER[f'{arm}_signal']}; "
        f"TSTR/TRTR {PAPER[f'{arm}_ratio']}"
    )


def _ratio_note(ev: dict[str, Any], key: str = "tstr_over_trtr", label: str = "TSTR/TRTR") -> str:
    """The plain ratio, for the details: a chance-level TSTR already scores 0.5 / TRTR on it."""
    return f"{label} {num(ev['ratios'].get(key))}"


def _over_seeds(summary: dict[str, Any] | None, metric: str, digits: int = 3) -> str:
    """'mean over N seeds X (min–max)' of one metric; empty when the arm has one replicate."""
    if not summary or summary.get("replicates", 1) < 2:
        return ""
    stats = summary.get(metric) or {}
    n, planned = stats.get("n", 0), summary["replicates"]
    if not n:
        return ""
    low, high = signed(stats["min"], digits), signed(stats["max"], digits)
    span = f"{low} to {high}" if stats["min"] < 0 else f"{low}–{high}"
    of = f" of {planned}" if n < planned else ""
    return f"mean over {n}{of} seeds {signed(stats['mean'], digits)} ({span})"


def _spent(privacy: dict[str, Any]) -> str:
    """'ε at δ = δ' of an arm's privacy summary."""
    return f"{num(privacy.get('epsilon'), 2)} at δ = {num(privacy.get('delta'), 2, 'g')}"


def _dp_spinegan_row(result: dict[str, Any], summary: dict[str, Any] | None = None) -> TableRow:
    """SpineGAN with a DP classifier and DP-SGD on D: ε of both phases from the arm's ledger."""
    ev = done(result)
    details = spent = ""
    if ev:
        p = result.get("privacy", {})
        mechs = p.get("mechanisms") or []
        phases = "; ".join(
            f"{m.get('label', '?')}: σ = {num(m.get('noise_multiplier'), 3)}, q = "
            f"{num(m.get('sample_rate'), 3)}, {m.get('steps', '?')} steps"
            for m in mechs
        )
        spent = _spent(p)
        details = _join(
            f"classifier and GAN in one ledger, spent ε = {spent} ({p.get('accountant')}, "
            f"patient level; {phases})",
            _ceiling_note(ev),
            _ratio_note(ev),
            _gan_metrics(ev),
        )
    eps = result.get("epsilon_target")
    ours, signal = _tstr_cells(result, summary)
    return TableRow(
        "4. SpineGAN under DP (DP classifier, DP-SGD on D)"
        + (f", target ε = {eps:g} in all" if eps else ""),
        "not in the paper (its SpineGAN had no DP)",
        ours,
        signal,
        details,
        spent,
    )


_ABLATION_TITLES = {
    "dp_clip_only": (
        "5. ablation: clipping only (DP-SGD's per-patient clip, no noise), NOT private",
        "dp_ablation",
    ),
    "dp_noise_only": (
        "5. ablation: noise only (DP-SGD's noise σC, no clipping), NOT private",
        "dp_ablation",
    ),
    "dp_paper": (
        "5. the paper's own 'DP' (noise before whole-model clipping, G and D, batch 1), "
        "NOT private",
        "dp_paper",
    ),
}


def _ablation_rows(
    results: dict[str, dict[str, Any]],
    dp_sigmas: dict[float, float],
    seeds: dict[str, dict[str, Any]],
) -> list[TableRow]:
    """The DP ablation rows: ε = ∞ for clip-only and noise-only, the paper scheme's ε from
    standard accounting, each with its mechanism and GAN metrics."""
    rows = []
    for name, (title, paper) in _ABLATION_TITLES.items():
        result = results.get(name)
        if result is None:
            continue
        ev = done(result)
        details, eps = "", ""
        if ev:
            details, eps = _ablation_details(name, result.get("ablation") or {}, dp_sigmas)
            details = _join(details, _ratio_note(ev), _gan_metrics(ev))
        ours, signal = _tstr_cells(result, seeds.get(name))
        rows.append(TableRow(title, PAPER[paper], ours, signal, details, eps))
    return rows


def _ablation_details(
    name: str, ablation: dict[str, Any], dp_sigmas: dict[float, float]
) -> tuple[str, str]:
    """(details, ε cell) of an ablation row, from the run's ablation.json."""
    mech = ablation.get("mechanism") or {}
    if "error" in ablation or not mech:
        return f"no ablation.json: {ablation.get('error', 'missing')}", "?"
    if name == "dp_paper":
        return _paper_scheme_details(ablation)
    q = f"q = {num(mech.get('sample_rate'), 3)}, {mech.get('d_steps', '?')} D steps"
    if name == "dp_clip_only":
        return f"per-patient clip C = {mech.get('clip_norm')}, no noise; {q}", "∞ (no noise)"
    sigma = mech.get("noise_multiplier")
    calib = ablation.get("noise_calibration") or {}
    ref = calib.get("noise_for_epsilon")
    same = ""
    if ref is not None and float(ref) in dp_sigmas and sigma is not None:
        theirs = dp_sigmas[float(ref)]
        same = (
            f", the same σ as the ε = {ref:g} arm"
            if abs(theirs - sigma) <= 1e-9 * max(1.0, theirs)
            else f"; NOTE the ε = {ref:g} arm used σ = {theirs:.4g}"
        )
    return (
        f"noise std σC = {num(mech.get('noise_std'), 3)} (σ = {num(sigma, 3)}"
        + (f" calibrated for ε = {ref:g}" if ref is not None else "")
        + f", C = {mech.get('noise_scale_c')}{same}), no clipping; {q}",
        "∞ (no clipping)",
    )


def _paper_scheme_details(ablation: dict[str, Any]) -> tuple[str, str]:
    """The paper's scheme: ε from standard accounting here and at the paper's own settings."""
    acc = ablation.get("accounting") or {}
    paper = ablation.get("paper_settings") or {}
    eps = (
        f"{acc['epsilon']:.2g} ({acc['accountant'].upper()}, per image)"
        if acc.get("epsilon") is not None
        else "?"
    )
    text = ablation.get("epsilon_text", "")
    if paper.get("epsilon") is not None:
        text += (
            f"; at the paper's own settings ({paper['images']:,} images, 8000 kimg at batch "
            f"1, {paper['steps']:,} D steps): ε = {paper['epsilon']:.3g} "
            f"({paper['accountant'].upper()})"
        )
    return text, eps


def _lesion_details(ev: dict[str, Any], info: dict[str, Any]) -> str:
    dropped = info.get("classes_dropped") or {}
    classes = (
        f"{len(ev['class_names'])} of 8 classes (dropped, too few images: "
        + "; ".join(f"{name}: {why}" for name, why in dropped.items())
        + ")"
        if dropped
        else "all 8 classes"
    )
    skipped = ev["tstr"].get("skipped_outputs") or []
    return f"TRTR on the lesion task {_auc_cell(ev['trtr'])}; {classes}" + (
        f"; left out of the mean, no test positives: {', '.join(map(str, skipped))}"
        if skipped
        else ""
    )


def _gan_metrics(ev: dict[str, Any]) -> str:
    m = ev.get("gan_metrics")
    if not m:
        return "no GAN metrics"
    ref = ev.get("gan_metrics_real_reference") or {}
    trts = ""
    if ev.get("trts") is not None:
        scores = ev.get("trts_scores") or []
        mean = (
            f" (mean score {num(scores[0][0], 2)} / {num(scores[0][1], 2)})"
            if len(scores) == 1
            else ""
        )
        judge = f" by {ev['trts_judge']}" if ev.get("trts_judge") else ""
        trts = f"TRTS {num(ev['trts'])}{mean}{judge}; "
    return trts + (
        f"KID {num(m.get('kid'), 2, 'e')} (real val floor at equal n: "
        f"{num(ref.get('kid'), 2, 'e')}), FID {num(m.get('fid'), 3, 'g')} (floor "
        f"{num(ref.get('fid'), 3, 'g')}), precision {num(m.get('precision'), 2)}, recall "
        f"{num(m.get('recall'), 2)} ({m['extractor']})"
    )


def _auc_cell(arm: dict[str, Any] | None) -> str:
    """AUC [CI] of a classifier arm; just the AUC when it has no interval (no suffix)."""
    if not arm or arm.get("auc") is None:
        return num(None)
    return auc_ci(arm["auc"], arm["ci"]) if arm.get("ci") else num(arm["auc"])


def _join(*parts: str) -> str:
    """The non-empty parts of a cell, separated by '; '."""
    return "; ".join(p for p in parts if p)


def _ceiling_note(ev: dict[str, Any]) -> str:
    """The DP-SGD classifier trained directly at the arm's ε: the ceiling to compare against."""
    ceiling = ev.get("dp_classifier")
    if not ceiling or ceiling.get("auc") is None:
        return ""
    return (
        f"ceiling: a DP-SGD classifier at the same ε, trained directly, AUC "
        f"{auc_ci(ceiling['auc'], ceiling.get('ci'))}, signal retained "
        f"{_signal_cell(ev, CEILING_ARM)}"
    )
