"""``reproduce.md``, rendered from the typed ``reproduce.json`` record alone.

The one table (the paper's published value beside ours), then what the numbers mean, the data,
the budget, the paper's seven errors and what this run did about each, and every arm's folder.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedspine.experiments.budgets import fmt_setting
from fedspine.experiments.plan import ABLATION_ARMS, ARMS_DIR, DATA_DIR, EVALUATION_DIR
from fedspine.experiments.record import DataSection, ReproduceRecord, TableRow
from fedspine.fileio import EVAL_REPORT_MD, PREPARED_REJECTED, REPRODUCE_JSON

_SPLIT_ORDER = {"train": 0, "val": 1, "test": 2}


def render_markdown(record: ReproduceRecord | Mapping[str, Any]) -> str:
    """reproduce.md: the one table (paper beside ours), then data, budget and the 7 errors.

    Takes the record, or ``reproduce.json`` as read from the file.
    """
    if not isinstance(record, ReproduceRecord):
        record = ReproduceRecord.from_json(record)
    lines = _header(record)
    contribution = any(row.dp_minus_public for row in record.table)
    lines += [
        "| experiment | paper (published) | ours: test AUC [95 % CI] | signal retained [95 % CI] "
        + ("| DP − public-only " if contribution else "")
        + "| ε | details |",
        "| --- | --- | --- | --- | --- | --- |" + (" --- |" if contribution else ""),
    ]
    lines += [_md_row(row, contribution) for row in record.table]
    lines += _reading_notes(record)
    lines += ["## Data", ""]
    lines += _data_lines(record.data)
    lines += ["", "## Budget", "", "| setting | value |", "| --- | --- |"]
    lines += [f"| {k} | {fmt_setting(v)} |" for k, v in record.budget.to_json().items()]
    lines += ["", "## The paper's seven errors and what this reproduction does instead", ""]
    lines += [f"{i}. **{e.error}** {e.here}" for i, e in enumerate(record.errors, 1)]
    lines += ["", "## Arms", ""]
    lines += _arm_lines(record.arms)
    lines.append("")
    return "\n".join(lines)


def _header(record: ReproduceRecord) -> list[str]:
    b, data = record.budget, record.data
    lines = [
        "# fedspine reproduction of Schonfeld & Veeravagu (arXiv:2205.02843; Sci. Rep. 2023)",
        "",
        f"Budget **{b.name}** ({b.purpose}); data: **{data.kind}**, "
        f"{data.abnormality.get('images', '?')} images; wall time "
        f"{record.seconds / 60:.1f} min"
        + (
            f" for this invocation, which reused arms built earlier (all arms together took "
            f"{_arm_minutes(record.arms):.1f} min to build)"
            if record.reused_arms
            else ""
        )
        + f"; fedspine {record.fedspine_version}.",
        "",
    ]
    if data.phantom:
        lines += [
            "These numbers come from phantom radiographs, not from VinDr-SpineXR, at a "
            f"{b.name} budget: they show that each stage runs end to end, not how well the "
            "method works on real spines. Low TSTR AUCs here are the honest result of a "
            "generator trained for minutes on a CPU.",
            "",
        ]
    return lines


def _reading_notes(record: ReproduceRecord) -> list[str]:
    """How to read the table: the ablation rows, signal retained, TRTR, seeds, budgets."""
    lines: list[str] = []
    if any(record.arms.get(n, {}).get("status") == "done" for n in ABLATION_ARMS):
        lines += [
            "",
            "Read rows 5 together: the DP-SGD rows are private at the ε shown; the ablation "
            "rows keep one of DP-SGD's two impositions on the same data, patients per step and "
            "length (clipping only, or the ε = "
            f"{record.budget.ablation_noise_epsilon:g} arm's noise only), and the "
            "paper's own scheme is run as its code did. None of the ablation rows is private: "
            "with no noise, or with unbounded sensitivity, ε = ∞, and the paper's scheme has the "
            "astronomical ε shown.",
        ]
    if record.public_run:
        p = record.public_run
        lines += [
            "",
            "Rows 6 start from a public checkpoint (`"
            + str(p.get("path"))
            + f"`, sha256:{str(p.get('sha256'))[:12]}, declared public: "
            f"{p.get('declaration')}), which costs no ε. The public-only row is that "
            "checkpoint's own generator: no private image at all. What DP contributes is the DP "
            "arm minus the public-only arm: **DP − public-only** is each DP arm's TSTR AUC minus "
            "the public-only arm's (point estimates; each has its interval in its own cell). A DP "
            "arm that only matches public-only learned nothing from the private data.",
        ]
    lines += [
        "",
        "**Signal retained** = (TSTR AUC − 0.5) / (TRTR AUC − 0.5): the share of the real-data "
        "classifier's lead over chance that a classifier trained on synthetic images keeps; "
        "0 = chance, 1 = as good as real data, with its interval from the evaluation's "
        "bootstrap. Where TSTR's own interval contains chance the cell says so: there is then no "
        "evidence of any signal, whatever the point estimate. The plain ratio TSTR/TRTR is in "
        "the details; it flatters, since a classifier at chance already scores 0.5 / TRTR on it. "
        "The paper's signal retained is derived from its published AUCs.",
        "",
        "AUCs are on the real test split (VinDr's own test images, or the phantom site's), with "
        "patient-level bootstrap intervals; each classifier's epoch and threshold were chosen on "
        "a validation split carved by patient from the training data. One TRTR classifier per "
        f"task and seed is trained once (`{DATA_DIR}/trtr/`) and shared by every arm's "
        "evaluation, so every row is measured against the same real-data reference. TRTS "
        "(in the details) scores each arm's synthetic images with that real-trained classifier "
        "against the class they were generated for: 0.5 means the generator has not learned "
        "its classes yet, whatever its TSTR.",
        "",
        _seeds_paragraph(record.budget.seeds, record.budget.seed),
        "",
    ]
    budgets = {
        (arm.get("evaluation") or {}).get("classifier_budget", {}).get("rule")
        for arm in record.arms.values()
        if arm.get("status") == "done"
    } - {None}
    if budgets:
        lines += [
            "Classifier training budget (matched in optimizer steps, not epochs, so an arm with "
            "more rows gets no more steps): " + "; ".join(sorted(budgets)) + ".",
            "",
        ]
    weak = _weak_references(record.arms)
    if weak:
        lines += [
            "**Signal retained means little here:** the real-data classifier is itself near "
            f"chance ({weak}), so the real images at this size teach it little; with TRTR − 0.5 "
            "that small, signal retained and TSTR/TRTR can leave [0, 1] by noise alone.",
            "",
        ]
    return lines


def _data_lines(data: DataSection) -> list[str]:
    lines = []
    for schema in ("abnormality", "lesion"):
        info = data.schema(schema)
        if "not_run" in info:
            lines.append(f"- {schema}: {info['not_run']}")
            continue
        counts = info.get("counts", {})
        parts = "; ".join(
            f"{split} {c.get('total', 0)} ("
            + ", ".join(f"{k} {v}" for k, v in c.items() if k != "total" and v)
            + ")"
            for split, c in sorted(counts.items(), key=lambda kv: _SPLIT_ORDER.get(kv[0], 9))
        )
        lines.append(
            f"- {schema}: {info.get('images', '?')} images decoded, {info.get('rejected', 0)} "
            "rejected (listed with reasons in "
            f"`{info.get('ingested')}/{PREPARED_REJECTED}`); {parts}"
        )
        if info.get("classes_dropped"):
            lines.append(
                f"  - the lesion arm uses {len(info['class_names'])} classes "
                f"({', '.join(info['class_names'])}); dropped for want of train and val images: "
                + "; ".join(f"{k} ({v})" for k, v in info["classes_dropped"].items())
            )
    lines.append(f"- source: `{data.root}` ({data.kind})")
    return lines


def _arm_lines(arms: dict[str, dict[str, Any]]) -> list[str]:
    lines = []
    for name, arm in arms.items():
        if arm["status"] == "done":
            secs = sum(arm.get("seconds", {}).values())
            lines.append(
                f"- `{name}`: done in {secs / 60:.1f} min; "
                f"evaluation `{ARMS_DIR}/{name}/{EVALUATION_DIR}/{EVAL_REPORT_MD}`"
                + ("" if not arm.get("skipped_this_time") else " (complete from an earlier run)")
            )
        else:
            reason = arm.get("reason", "")
            status = "" if reason.startswith(arm["status"]) else f"{arm['status']}: "
            lines.append(f"- `{name}`: {status}{reason}")
    return lines


def _seeds_paragraph(n: int, first: int) -> str:
    """What the intervals cover, and where the training-seed variation they leave out is."""
    if n < 2:
        return (
            "The intervals cover test sampling only: they resample the test patients of one "
            "trained model and leave out the training-seed variation (how far a number moves "
            "when the GAN and classifiers are trained again with another seed). This run trained "
            "each arm once; `--seeds N` trains every arm with N seeds and gives the spread."
        )
    listed = ", ".join(str(first + r) for r in range(n))
    return (
        "The intervals cover test sampling only: they resample the test patients of one trained "
        f"model. Every arm was trained {n} times, with seeds {listed} (GAN, synthetic images, "
        'classifiers and evaluation); "mean over N seeds X (min–max)" is the spread across '
        "them: the training-seed variation the intervals do not cover. The cells' AUC and "
        f"interval are seed {first}'s; every replicate is in {REPRODUCE_JSON} (`arms`, by "
        "folder; `seeds`, by arm)."
    )


def _arm_minutes(arms: dict[str, dict[str, Any]]) -> float:
    return sum(sum(a.get("seconds", {}).values()) for a in arms.values()) / 60


def _weak_references(arms: dict[str, dict[str, Any]]) -> str:
    """The TRTR AUCs below 0.6, named by task."""
    weak = []
    for name, task in (("cgan", "abnormality"), ("lesion", "lesion type")):
        ev = arms.get(name, {}).get("evaluation")
        auc = (ev or {}).get("trtr", {}).get("auc") if ev else None
        if auc is not None and auc < 0.6:
            weak.append(f"{task} TRTR {auc:.3f}")
    return ", ".join(weak)


def _md_row(row: TableRow, contribution: bool = False) -> str:
    cells = [row.experiment, row.paper, row.ours, row.signal]
    cells += [row.dp_minus_public] if contribution else []
    cells += [row.epsilon, row.details]
    return "| " + " | ".join(c.replace("|", "/") for c in cells) + " |"
