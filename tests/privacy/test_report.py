"""The privacy summary a run writes and the report a data steward reads."""

from __future__ import annotations

import html
import json

import pytest
from typer.testing import CliRunner

from fedspine.cli.main import app
from fedspine.privacy.accounting import Mechanism, epsilon
from fedspine.privacy.report import (
    PrivacyReportError,
    build_report,
    site_entry,
    write_privacy_summary,
)
from fedspine.reporting.privacy import write_privacy_report as write_report

MECHS = [{"noise_multiplier": 1.0, "sample_rate": 0.05, "steps": 200, "clip_norm": 1.0}]


def _run(tmp_path, reasons=()):
    eps = epsilon([Mechanism(1.0, 0.05, 200)], 1e-5, "prv")
    sites = {
        "site_1": site_entry(eps, 1e-5, MECHS, unit="patient", patients=100),
        "site_2": site_entry(
            eps / 2, 1e-5, [{**MECHS[0], "steps": 50}], unit="patient", patients=80
        ),
    }
    components = {"discriminator": "DP-SGD (patient-level)", "label_prior": "public: uniform"}
    write_privacy_summary(tmp_path, sites, components, not_private_reasons=reasons)
    return tmp_path, eps


def test_report_recomputes_and_takes_the_max(tmp_path):
    run, eps = _run(tmp_path)
    report = build_report(run)
    assert report["private"] is True
    assert report["overall_epsilon"] == pytest.approx(eps)
    assert report["sites"]["site_1"]["epsilon_recomputed"] == pytest.approx(eps, rel=1e-6)
    assert report["sites"]["site_2"]["epsilon_recomputed"] < eps


@pytest.mark.parametrize("fmt", ["md", "json", "html"])
def test_report_formats(tmp_path, fmt):
    run, eps = _run(tmp_path)
    path = write_report(run, fmt)
    text = html.unescape(path.read_text())
    assert path.name == f"privacy_report.{fmt}"
    if fmt == "json":
        data = json.loads(text)
        assert data["overall_epsilon"] == pytest.approx(eps)
    else:
        assert f"{eps:.3f}" in text
        assert "seeded from OS entropy" in text
        assert "public: uniform" in text
    if fmt == "html":
        assert "data:image/png;base64," in text
    if fmt == "md":
        assert (run / "privacy_report.png").is_file()


def test_not_private_run_says_so(tmp_path):
    run, _ = _run(tmp_path, reasons=["SpineGAN classifier trained on private data without DP"])
    result = CliRunner().invoke(app, ["privacy", "report", str(run)])
    assert result.exit_code == 0, result.output
    assert "NOT PRIVATE" in result.output
    assert "without DP" in (run / "privacy_report.md").read_text()


def test_missing_summary_is_a_clear_error(tmp_path):
    with pytest.raises(PrivacyReportError, match="no privacy summary"):
        build_report(tmp_path)
    result = CliRunner().invoke(app, ["privacy", "report", str(tmp_path)])
    assert result.exit_code != 0 and "no privacy summary" in result.output
