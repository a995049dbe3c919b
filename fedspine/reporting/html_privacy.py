"""The HTML page's privacy parts: ε per site and per round, the audits, what was private and
public, and the release with its verification.

The privacy summary is read as a :class:`PrivacySummary`; the per-site table is the one the
privacy report draws too (:func:`fedspine.reporting.tables.privacy_site_table`). The release's
manifest, its gate decisions and the federation's round log are read as plain JSON.
"""

from __future__ import annotations

import io
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from fedspine.fileio import (
    FEDERATION_ROUNDS,
    PRIVACY_REPORT_PLOT,
    PRIVACY_SUMMARY,
    STEWARD_MEMBERSHIP,
    STEWARD_MEMORISATION,
)
from fedspine.formatting import finite, num, pct
from fedspine.reporting.html_inputs import (
    CANARY_FILES,
    EVAL_PNGS,
    ReportInputs,
    shows_real_images,
)
from fedspine.reporting.html_parts import esc, figure, na, table
from fedspine.reporting.privacy_records import SitePrivacy
from fedspine.reporting.tables import general, privacy_site_table


def privacy_section(inp: ReportInputs) -> str:
    """Per-site ε with each mechanism's settings, ε over the rounds, and the round log."""
    privacy = inp.privacy
    if privacy is None:
        why = (
            f"{inp.run.name} has no {PRIVACY_SUMMARY}"
            if inp.run is not None
            else "no run or release was given"
        )
        return na(f"privacy ledger: {why}")
    parts = [f"<p>From {esc(inp.privacy_source)}.</p>"]
    sites = privacy.sites or {}
    if sites:
        parts.append(table(*privacy_site_table(privacy)))
    else:
        parts.append(na("per-site ε: no site spent ε (the run was not trained with DP)"))
    parts.append("<h3>ε per site over the rounds</h3>")
    series = _epsilon_series(inp, sites)
    if series:
        caps = _site_caps(inp)
        max_eps = ((inp.manifest or {}).get("configuration") or {}).get("max_epsilon")
        png = _epsilon_plot(series, caps, finite(max_eps), finite(privacy.delta))
        parts.append(
            figure(png, "ε each site had spent after each federated round (from the run's ledger)")
        )
        rounds = sorted({r for pts in series.values() for r, _ in pts})
        per_round = [
            [str(r)]
            + [num(dict(series[s]).get(r)) if r in dict(series[s]) else "-" for s in series]
            for r in rounds
        ]
        parts.append(table(["round", *series], per_round))
    elif inp.rounds or inp.federation_status is not None:
        parts.append(na("ε per round: the federation's sites reported no DP spending"))
    else:
        steps = "; ".join(
            f"{name}: ε = {num(site.epsilon)} after {site.steps} D steps"
            for name, site in sites.items()
        )
        parts.append(
            na("ε per round: a centralised run has no rounds" + (f" ({steps})" if steps else ""))
        )
    if inp.privacy_plot is not None:
        parts.append(
            figure(
                inp.privacy_plot,
                f"ε against discriminator steps per site ({inp.run.name}/{PRIVACY_REPORT_PLOT}, "
                "written by `fedspine privacy report`)",
            )
        )
    if inp.rounds:
        parts.append("<h3>Federated rounds</h3>")
        if inp.federation_status:
            st = inp.federation_status
            parts.append(
                f"<p>Federation {esc(st.get('federation'))}: {esc(st.get('state'))}, "
                f"{esc(st.get('completed_rounds'))} of {esc(st.get('rounds'))} rounds completed"
                + (f" ({esc(st['reason'])})" if st.get("reason") else "")
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
                num(r.get("seconds"), 1),
                str(r.get("finished", "")),
            ]
            for r in inp.rounds
        ]
        parts.append(
            table(["round", "sites that replied", "failures", "seconds", "finished"], rows)
        )
    elif inp.federation_status is not None:
        parts.append(na(f"federated rounds: {inp.run.name} has no {FEDERATION_ROUNDS} yet"))
    return "\n".join(parts)


def audits_section(inp: ReportInputs) -> str:
    """The memorisation audit and gate, membership inference and the canary audit."""
    parts = ["<h3>Memorisation: distance to the closest training image</h3>"]
    mem = inp.eval_report.memorisation if inp.eval_report is not None else None
    if mem is not None:
        parts.append(
            f'<p>Verdict: <b class="{"bad" if mem.flagged else "ok"}">'
            f"{esc(mem.verdict)}</b>. Distances in the space of {esc(mem.extractor)}, "
            f"calibrated on {esc(mem.heldout)} ({esc(mem.n_heldout)} images the "
            f"generator never saw). Rule: {esc(mem.rule)}.</p>"
        )
        parts.append(
            table(
                ["measure", "value", "expected without memorisation"],
                [
                    [
                        "exact copies of a training image",
                        f"{_or_unknown(mem.exact_copies)} of {_or_unknown(mem.n_synthetic)}",
                        "0",
                    ],
                    [
                        "closer to training than 99 % of held-out images",
                        pct(mem.share_below_p1),
                        "about 1 %",
                    ],
                    [
                        "closer to training than 95 % of held-out images",
                        pct(mem.share_below_p5),
                        "about 5 %",
                    ],
                    [
                        "closer to training than to held-out images",
                        pct(mem.share_closer_to_train),
                        "about 50 %",
                    ],
                    [
                        "median distance synthetic → training",
                        num(mem.median_syn_to_train, 4),
                        f"held-out → training: {num(mem.median_heldout_to_train, 4)}",
                    ],
                ],
            )
        )
        if "closest_pairs" in inp.eval_pngs:
            parts.append(
                figure(
                    inp.eval_pngs["closest_pairs"],
                    "The synthetic images closest to a training image (top) and that training "
                    f"image (bottom), with their distance ({inp.evaluation.name}/"
                    f"{EVAL_PNGS['closest_pairs']}). The bottom row is private.",
                )
            )
        else:
            parts.append(na(f"closest pairs figure: {inp.evaluation.name} has none readable"))
    else:
        parts.append(na("evaluation memorisation audit: no evaluation given"))
    gate = inp.release_memorisation
    if gate:
        decision = gate.get("gate") or {}
        parts.append("<h4>Release gate</h4>")
        parts.append(
            f'<p><b class="{"ok" if decision.get("passed") else "bad"}">'
            f"{'passed' if decision.get('passed') else 'failed'}</b>: "
            f"{esc(decision.get('flagged', '?'))} of {esc(decision.get('n_synthetic', '?'))} "
            f"synthetic images ({pct(decision.get('share_flagged'))}) lie within the threshold "
            f"{num(decision.get('threshold'), 4)} of a training image; expected by chance "
            f"{pct(decision.get('expected_share'))}, allowed {pct(decision.get('allowed_share'))}"
            f" (in {esc(gate.get('extractor', 'raw pixels'))})."
            + (f" Rule: {esc(decision['rule'])}." if decision.get("rule") else "")
            + "</p>"
        )
    elif inp.release is not None:
        parts.append(na(f"release gate: no {STEWARD_MEMORISATION} in the steward's audit folder"))
    if inp.steward_pairs is not None:
        parts.append(
            figure(
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
                num((mia.get(key) or {}).get("auc")),
                num((mia.get(key) or {}).get("tpr_at_1pct_fpr")),
            ]
            for key, label in (
                ("nearest", "nearest synthetic image"),
                ("monte_carlo", "Monte-Carlo"),
            )
        ]
        parts.append(
            f"<p>{esc(mia.get('attack'))} in {esc(mia.get('features'))}: "
            f"{esc(mia.get('n_members'))} members (training images) against "
            f"{esc(mia.get('n_nonmembers'))} non-members (held out), "
            f"{esc(mia.get('n_synthetic'))} synthetic images.</p>"
        )
        parts.append(table(["attack", "AUC", "TPR at 1 % FPR"], rows))
        parts.append(
            f"<p>{esc(mia.get('interpretation'))}. This attack compares populations: the "
            "generator's ε gives no formal bound on its AUC or TPR, and a low AUC is "
            "evidence, never a proof of privacy.</p>"
        )
    else:
        parts.append(
            na("membership inference: `fedspine release` runs it; no release was given")
            if inp.release is None
            else na(f"membership inference: {inp.release.name} has no {STEWARD_MEMBERSHIP}")
        )
    parts.append("<h3>One-run canary audit of the DP step</h3>")
    canary = inp.canary
    if canary:
        passed = canary.get("passed")
        parts.append(
            f'<p>From {esc(inp.canary_source)}: <b class="{"ok" if passed else "bad"}">'
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
            table(["measure", "value"], [[label, general(canary.get(k))] for k, label in keys])
        )
    else:
        looked = " or ".join(CANARY_FILES)
        parts.append(
            na(
                f"no canary audit output ({looked}) in the folders given; the one-run canary "
                "audit of the DP step (Steinke, Nasr and Jagielski 2023) runs in the test suite"
            )
        )
    return "\n".join(parts)


def public_private_section(inp: ReportInputs) -> str:
    """What each part of the pipeline saw: DP-protected, private real, or public."""
    parts = []
    components = (inp.privacy.components if inp.privacy else None) or {}
    if components:
        parts.append(
            "<p>From the training's privacy summary:</p><ul>"
            + "".join(f"<li><b>{esc(k)}</b>: {esc(v)}</li>" for k, v in components.items())
            + "</ul>"
        )
    else:
        parts.append(na("training components: no privacy.json was given"))
    items = []
    report = inp.eval_report
    if report is not None:
        selection = report.selection
        dataset = selection.dataset if selection and selection.dataset is not None else "?"
        use = selection.use if selection and selection.use is not None else "selection only"
        items.append(f"<li><b>Real validation split</b> ({esc(dataset)}): {esc(use)}.</li>")
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
    if shows_real_images(inp):
        items.append(
            "<li><b>This page</b>: shows real training images and statistics of private data; "
            "it is for the data owner and the steward only.</li>"
        )
    if items:
        parts.append("<ul>" + "".join(items) + "</ul>")
    prng = inp.privacy.prng if inp.privacy else None
    if prng:
        parts.append(f"<p>Caveat: {esc(prng)}</p>")
    return "\n".join(parts)


def release_section(inp: ReportInputs) -> str:
    """The release: verified or not, its files, the gates it passed and how to check it."""
    manifest = inp.manifest
    if manifest is None:
        if inp.release_refused:
            return (
                f'<p class="bad">The release was refused: {esc(inp.release_refused)}</p>'
                "<p>A refused release writes nothing; the reason above is all there is.</p>"
            )
        return na(
            "no release given; `fedspine release RUN --out RELEASE --max-epsilon E "
            "--audit-data PREPARED` makes one"
        )
    parts = [release_verdict(inp)]
    ver = inp.verification
    if ver is not None:
        for note in ver.notes:
            parts.append(f"<p>Note: {esc(note)}</p>")
        if ver.problems:
            parts.append("<ul>" + "".join(f"<li>{esc(p)}</li>" for p in ver.problems) + "</ul>")
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
    parts.append(table(["", ""], rows))
    decision = (inp.release_privacy or {}).get("release_decision") or {}
    if decision.get("checks"):
        parts.append(
            "<p>Gates passed:</p><ul>"
            + "".join(f"<li>{esc(c)}</li>" for c in decision["checks"])
            + "</ul>"
        )
    for warning in decision.get("warnings") or []:
        parts.append(f'<p class="bad">Warning: {esc(warning)}</p>')
    coverage = decision.get("audit_coverage") or {}
    if coverage:
        parts.append(
            "<p>Audit data covered: "
            + esc(", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in coverage.items()))
            + ".</p>"
        )
    parts.append(
        f"<p>Anyone can check it with <code>fedspine verify {esc(inp.release.name)} "
        "--public-key steward.pub</code> (the steward's key, obtained separately).</p>"
    )
    return "\n".join(parts)


def release_verdict(inp: ReportInputs) -> str:
    """One line: released and verified, present but not verified, refused, or none."""
    if inp.manifest is not None:
        ver = inp.verification
        n_files = len(inp.manifest.get("files") or [])
        if ver is not None and ver.ok:
            return (
                f'<p class="verdict ok">Released: a signed release of {n_files} files, signature '
                f"and every SHA-256 verified (key {esc(ver.fingerprint)}).</p>"
            )
        problems = "; ".join(ver.problems) if ver is not None else "not checked"
        return f'<p class="verdict bad">Release present but NOT verified: {esc(problems)}.</p>'
    if inp.release_refused:
        return f'<p class="verdict bad">Release refused: {esc(inp.release_refused)}</p>'
    return '<p class="verdict none">No release: none was made or none was given.</p>'


def site_epsilons(inp: ReportInputs) -> list[list[str]]:
    """(site, ε, δ, source) rows: the release's checked ε where there is one, else privacy.json."""
    if inp.manifest is not None:
        sites = (inp.manifest.get("privacy") or {}).get("sites") or {}
        if sites:
            return [
                [name, num(s.get("epsilon")), general(s.get("delta")), "release manifest (checked)"]
                for name, s in sites.items()
            ]
    sites = (inp.privacy.sites if inp.privacy else None) or {}
    return [
        [name, num(s.epsilon), general(s.delta), inp.privacy_source] for name, s in sites.items()
    ]


def _epsilon_series(
    inp: ReportInputs, sites: dict[str, SitePrivacy]
) -> dict[str, list[tuple[int, float]]]:
    """(round, ε) per site: privacy.json's epsilon_per_round, else the sites' round reports."""
    series: dict[str, list[tuple[int, float]]] = {}
    for name, site in sites.items():
        points = [
            (int(p.round), float(p.epsilon))
            for p in site.epsilon_per_round or []
            if p is not None and finite(p.epsilon) is not None
        ]
        if points:
            series[name] = sorted(points)
    if series:
        return series
    for record in inp.rounds:
        for site in record.get("sites") or []:
            eps = finite((site.get("privacy") or {}).get("epsilon"))
            if eps is not None and eps >= 0:
                series.setdefault(str(site.get("site")), []).append((int(record["round"]), eps))
    return {k: sorted(v) for k, v in series.items()}


def _site_caps(inp: ReportInputs) -> dict[str, float]:
    caps: dict[str, float] = {}
    for record in inp.rounds:
        for site in record.get("sites") or []:
            cap = finite((site.get("privacy") or {}).get("cap"))
            if cap is not None:
                caps[str(site.get("site"))] = cap
    return caps


def _or_unknown(value: Any) -> Any:
    return "?" if value is None else value


def _epsilon_plot(
    series: dict[str, list[tuple[int, float]]],
    caps: dict[str, float],
    release_cap: float | None,
    delta: float | None,
) -> bytes:
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
