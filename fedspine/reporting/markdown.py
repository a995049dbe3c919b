"""The Markdown evaluation report (report.md), rendered from an :class:`EvaluationRecord`.

It leads with signal retained and says in words whether TSTR's interval contains chance; then
the arms, TRTS, the distribution metrics, the memorisation audit and the inputs.
"""

from __future__ import annotations

from fedspine.evaluation.config import PRECISION_K
from fedspine.evaluation.records import DatasetInfo, EvaluationRecord, Utility
from fedspine.formatting import auc_ci, num, pct
from fedspine.reporting.tables import ARM_HEAD, arm_cells, arms_of, counts_text, per_output_auc


def utility_lines(report: EvaluationRecord) -> list[str]:
    """The lead of every report: signal retained with its interval and whether there is any."""
    utility = report.utility
    if utility is None:
        return []
    lines = []
    for arm, u in (utility.arms or {}).items():
        ci = u.signal_retained_ci
        diff_ci = u.difference_ci
        verdict = (u.verdict or "").split(";")[0]
        lines += [
            f"**{arm}: signal retained {num(u.signal_retained, 2)}"
            + (f" [{num(ci[0], 2)}, {num(ci[1], 2)}]" if ci else " [interval unbounded]")
            + f"** ({arm} AUC {auc_ci(u.auc, u.ci)}, TRTR AUC "
            f"{num(u.reference_auc)}; {arm} − TRTR = {num(u.difference)}"
            + (f" [{num(diff_ci[0])}, {num(diff_ci[1])}]" if diff_ci else "")
            + f"). {verdict[:1].upper()}{verdict[1:]}.",
            "",
        ]
        for name, one in (u.per_output or {}).items():
            one_ci = one.signal_retained_ci
            lines.append(
                f"- {name}: signal retained {num(one.signal_retained, 2)}"
                + (f" [{num(one_ci[0], 2)}, {num(one_ci[1], 2)}]" if one_ci else "")
                + f", AUC {auc_ci(one.auc, one.ci)}"
                + ("; interval contains chance" if one.ci_contains_chance else "")
            )
        if u.per_output:
            lines.append("")
    lines += [_utility_method(utility), ""]
    return lines


def render_evaluation(report: EvaluationRecord) -> str:
    """The human-readable report: signal retained first, then arms, metrics and memorisation."""
    lines: list[str] = ["# fedspine evaluation report", ""]
    lines += utility_lines(report)
    lines += _ratios(report)
    lines += _inputs(report)
    lines += _classifiers(report)
    lines += _class_fidelity(report)
    lines += _generative(report)
    lines += _memorisation(report)
    lines += _samples_and_settings(report)
    return "\n".join(lines)


def _utility_method(utility: Utility) -> str:
    return (
        "Signal retained is (AUC − 0.5) / (TRTR AUC − 0.5): 0 means the synthetic data teach "
        "nothing beyond chance, 1 as much as the real training data. Intervals: "
        f"{utility.method} ({utility.bootstrap} resamples)."
    )


def _ratios(report: EvaluationRecord) -> list[str]:
    arms = arms_of(report)
    ratios = report.ratios
    tstr_ratio = ratios.tstr_over_trtr if ratios else None
    mixed_ratio = ratios.mixed_over_trtr if ratios else None
    return [
        f"For comparison with published ratios: TSTR / TRTR = {num(tstr_ratio)} "
        f"(TSTR AUC {num(arms['TSTR'].auc)}, TRTR AUC {num(arms['TRTR'].auc)})"
        + (
            f"; mixed / TRTR = {num(mixed_ratio)} (mixed AUC {num(arms['mixed'].auc)})"
            if "mixed" in arms
            else ""
        )
        + ". A ratio of AUCs credits every arm with the 0.5 any classifier gets by chance; "
        "signal retained does not.",
        "",
    ]


def _split_text(info: DatasetInfo) -> str:
    return "; ".join(
        f"{split}: {s.images} images of {s.patients} patients ({counts_text(s.class_counts)})"
        for split, s in (info.splits or {}).items()
    )


def _inputs(report: EvaluationRecord) -> list[str]:
    inputs = report.inputs
    synthetic, train, test = inputs.synthetic, inputs.train, inputs.test
    config = report.config or {}
    return [
        f"- synthetic: `{synthetic.path}` ({synthetic.kind}, "
        f"{synthetic.images} images, {counts_text(synthetic.class_counts)})",
        f"- real training data: `{train.path}` ({_split_text(train)})",
        f"- real test data: `{test.path}` ({_split_text(test)})",
        f"- task: {report.task} over classes {report.class_names}; outputs "
        f"{report.output_names}; classifier `{config.get('arch')}`",
        "",
    ]


def _classifiers(report: EvaluationRecord) -> list[str]:
    arms = arms_of(report)
    config = report.config or {}
    lines = [
        "## Classifiers on the real test split",
        "",
        "| " + " | ".join(ARM_HEAD) + " | selected at step (val AUC) | steps run |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, arm in arms.items():
        history = arm.history or {}
        cells = arm_cells(name, arm) + [
            f"{history.get('best_steps', '?')} ({num(history.get('best_val_auc'))})",
            f"{history.get('steps', '?')}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    budget = report.classifier_budget
    if budget is not None:
        lines += ["", f"Training budget, the same for every arm: {budget.rule}."]
    for name, arm in arms.items():
        if arm.trained_elsewhere:
            lines += ["", _trained_elsewhere(name, arm.trained_elsewhere)]
    multi = len(report.output_names or []) > 1
    test_set, selection = report.test_set, report.selection
    lines += [
        "",
        f"Test set: the 'test' split of `{test_set.dataset}`, {test_set.images} images of "
        f"{test_set.patients} patients. 95 % intervals: percentile bootstrap over patients "
        f"({config.get('bootstrap')} resamples; all images of a drawn patient). "
        + (
            "AUC is the macro mean of the one-vs-rest AUCs (interval on the mean); sensitivity "
            "and specificity are macro means over the outputs. "
            if multi
            else ""
        )
        + "Sensitivity and specificity are at the threshold that maximises Youden's J on the "
        "validation split.",
        "",
        f"Model selection: every arm chose its checkpoint (best validation AUC) and its threshold on "
        f"the 'val' split of `{selection.dataset}` ({selection.images} images, "
        f"{selection.patients} patients), the same real split for all arms so they are "
        "comparable. That split is private real data: the classifiers use it only for "
        "selection, never for training (it is also the floor sample of the metrics table "
        "below). The test split was used for nothing but the numbers above"
        + (" and the memorisation calibration." if config.get("heldout") == "test" else "."),
    ]
    if test_set.patients_shared_with_train_or_val:
        lines += [
            "",
            f"**Warning:** {test_set.patients_shared_with_train_or_val} patient id(s) of the "
            "test split also appear in the training or validation split; if they are the same "
            "people the test AUCs are optimistic.",
        ]
    if multi:
        lines += ["", "| output | " + " | ".join(arms) + " |", "| --- |" + " --- |" * len(arms)]
        for out_name in report.output_names or []:
            cells = []
            for arm in arms.values():
                o = (arm.per_output or {})[out_name]
                cells.append(
                    f"{per_output_auc(arm, out_name)}, sens {num(o.sensitivity)}, "
                    f"spec {num(o.specificity)}"
                )
            lines.append(f"| {out_name} | " + " | ".join(cells) + " |")
    lines += ["", f"![ROC curves of the arms]({report.files.roc})", ""]
    return lines


def _class_fidelity(report: EvaluationRecord) -> list[str]:
    trts = report.class_fidelity
    if trts is None:
        return []
    lines = [
        "## Does each synthetic class look like its real class?",
        "",
        f"TRTS (train real, test synthetic): {trts.classifier} scored on the "
        f"{trts.images} synthetic images against the class they were generated for: "
        f"AUC {auc_ci(trts.auc, trts.ci)}. 0.5 means the generator's classes are "
        "indistinguishable to a classifier that knows the real ones; the TRTR AUC above is "
        "what real images of the two classes give. Intervals bootstrap synthetic images.",
        "",
    ]
    if trts.judge is not None and trts.judge.independence:
        lines += [
            "The judge must be a classifier the generator never trained against; "
            f"independence: {trts.judge.independence}.",
            "",
        ]
    for name, o in (trts.per_output or {}).items():
        if o.auc is None:
            continue
        pos, neg = o.mean_score_positive, o.mean_score_negative
        saturated = (
            pos is not None and neg is not None and (min(pos, neg) > 0.95 or max(pos, neg) < 0.05)
        )
        lines.append(
            f"- {name}: mean score {num(pos)} on images generated as {name}, {num(neg)} on "
            "the others"
            + (
                "; **the scores are saturated**: the classifier sees the synthetic images "
                "as far from the real ones, and the AUC ranks tiny differences, not classes."
                if saturated
                else "."
            )
        )
    lines.append("")
    return lines


def _times_1e3(value: float | None) -> float | None:
    return None if value is None else value * 1e3


def _generative(report: EvaluationRecord) -> list[str]:
    gen = report.generative
    lines = [
        "## Synthetic vs real images",
        "",
        f"Reference: {gen.reference}. The {gen.equal_n}. Precision/recall and "
        f"density/coverage with k = {PRECISION_K}. Every number holds only for the extractor "
        "named beside it.",
        "",
        "| extractor | compared | KID × 10³ (± std) | FID | precision | recall | density | "
        "coverage |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in gen.results or []:
        lines.append(
            f"| {row.extractor} | {row.compared} | "
            f"{num(_times_1e3(row.kid), 3)} ± {num(_times_1e3(row.kid_std), 3)} | "
            f"{num(row.fid, 4)} | {num(row.precision)} | "
            f"{num(row.recall)} | {num(row.density)} | "
            f"{num(row.coverage)} |"
        )
    lines += [
        "",
        "The floor rows show what a second real sample of this distribution gives, at the same "
        "size and class mix as the synthetic rows: a perfect generator would match them. KID "
        "leads because it is unbiased; FID is biased upward at small n, which is why the two "
        "rows are compared at equal n and never against a floor of another size.",
        "",
        "Extractors:",
        "",
    ]
    lines += [f"- {d}" for d in gen.extractors or []]
    return lines


def _memorisation(report: EvaluationRecord) -> list[str]:
    mem = report.memorisation
    rule = mem.rule or ""
    lines = [
        "",
        "## Memorisation audit",
        "",
        f"Euclidean distances in the space of **{mem.extractor}** between each synthetic "
        f"image and its closest real training image, calibrated on real held-out images: "
        f"{mem.heldout} ({mem.n_heldout} images), which the generator never saw. "
        f"{rule[:1].upper()}{rule[1:]}.",
        "",
        f"- verdict: **{mem.verdict}**",
        f"- exact copies of a training image: {mem.exact_copies} of {mem.n_synthetic}",
        f"- synthetic images closer to training than 99 % of held-out images are: "
        f"{pct(mem.share_below_p1)} (about 1 % expected without memorisation)",
        f"- closer than 95 % of held-out images are: {pct(mem.share_below_p5)} "
        "(about 5 % expected)",
        f"- closer to training than to held-out images (same-size sets): "
        f"{pct(mem.share_closer_to_train)} (about 50 % expected)",
        f"- median distance synthetic→train {num(mem.median_syn_to_train, 4)}, "
        f"held-out→train {num(mem.median_heldout_to_train, 4)}",
        "",
        f"![closest synthetic / training pairs]({report.files.closest_pairs})",
        "",
        "| pair | synthetic file | closest training file | distance |",
        "| --- | --- | --- | --- |",
    ]
    for i, pair in enumerate(mem.closest_pairs or []):
        lines.append(
            f"| {i} | {pair.synthetic_file} | {pair.train_file} | {num(pair.distance, 4)} |"
        )
    return lines


def _samples_and_settings(report: EvaluationRecord) -> list[str]:
    files = report.files
    lines = [
        "",
        "## Samples",
        "",
        f"![synthetic and real images per class]({files.samples})",
        "",
        "Each class shows a row of synthetic images above a row of real training images. The "
        "real images (and the closest-pairs figure) come from the private training data: this "
        "report is for the data owner and must not be released with the synthetic data.",
        "",
        "## Inputs and settings",
        "",
        f"- fedspine {report.fedspine_version}, written {report.created}",
    ]
    for key, info in report.inputs.items():
        lines.append(f"- {key}: `{info.path}`, content hash `{info.content_hash}`")
    lines += [
        f"- settings: [{files.config}]({files.config}); every number "
        f"above is in [{files.json}]({files.json})",
        "",
    ]
    return lines


def _trained_elsewhere(name: str, info: dict) -> str:
    """A classifier scored here but trained elsewhere: where, and under which DP guarantee."""
    dp = info.get("dp")
    how = (
        f"trained with DP-SGD, ε = {num(dp.get('epsilon'), 2)} at δ = {dp.get('delta')}"
        if dp
        else "trained without DP"
    )
    return (
        f"{name}: not trained by this evaluation but scored on the same splits "
        f"(`{info.get('classifier')}`, sha256 {str(info.get('sha256'))[:16]}…), {how}. "
        "Trained directly on the real training split, it is the ceiling a synthetic set at "
        "the same ε is compared against."
    )
