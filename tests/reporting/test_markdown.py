"""The Markdown evaluation report, rendered from a record written by the real writer."""

from __future__ import annotations

from fedspine.evaluation.records import read_evaluation
from fedspine.reporting.markdown import render_evaluation, utility_lines
from fedspine.reporting.tables import arm_cells
from tests.reporting.test_html import make_evaluation


def test_the_report_leads_with_signal_retained_and_shares_the_arm_cells(tmp_path):
    record = read_evaluation(make_evaluation(tmp_path / "ev"))
    md = render_evaluation(record)
    assert md.startswith(
        "# fedspine evaluation report\n\n**TSTR: signal retained 0.66 [0.30, 0.90]**"
    )
    assert (
        md.index("signal retained") < md.index("TSTR / TRTR = 0.871") < md.index("## Classifiers")
    )
    for name, arm in record.arms.items():
        assert "| " + " | ".join(arm_cells(name, arm)) + " |" in md
    assert "| TSTR | 200 synthetic | 0.706 [0.610, 0.790] | 0.800 | 0.600 |" in md
    assert "12.300 ± 1.000 | 0.4321 |" in md  # KID × 10³ leads, FID beside it
    assert "![closest synthetic / training pairs](closest_pairs.png)" in md


def test_an_evaluation_without_utility_has_no_lead(tmp_path):
    record = read_evaluation(make_evaluation(tmp_path / "ev"))
    assert utility_lines(record.__class__.from_json({**record.to_json(), "utility": None})) == []
