"""The README's main command, end to end on a smaller phantom: every stage, every output."""

from __future__ import annotations

import json

import pytest

from fedspine.experiments.demo import DemoConfig, run_demo
from fedspine.federated.processes import pid_alive, read_pid_file


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    config = DemoConfig(
        images_per_site=90,
        phantom_size=128,
        rounds=2,
        local_kimg=0.128,
        patients_per_step=16,
        per_class=40,
        classifier_epochs=2,
        release_per_class=20,
    )
    stages = []
    result = run_demo(tmp_path / "demo", config, stage=stages.append)
    out = tmp_path / "demo"

    assert result.sites == ["site_1", "site_2", "site_3"]
    assert len(result.rounds) == 2
    assert all(len(r["sites"]) == 3 for r in result.rounds)
    # Patient-level DP at every site, each under its cap.
    assert result.privacy["private"] is True
    assert sorted(result.privacy["sites"]) == ["site_1", "site_2", "site_3"]
    assert all(0 < eps <= config.epsilon for eps in result.privacy["sites"].values())
    assert (out / "federation" / "privacy_report.html").is_file()
    # TSTR and TRTR were measured on the real test split.
    ev = result.evaluation
    assert 0.0 <= ev["tstr_auc"] <= 1.0 and 0.0 <= ev["trtr_auc"] <= 1.0
    assert ev["tstr_over_trtr"] == pytest.approx(ev["tstr_auc"] / ev["trtr_auc"])
    if ev["signal_retained"] is not None:  # None when TRTR's own interval contains chance
        expected = (ev["tstr_auc"] - 0.5) / (ev["trtr_auc"] - 0.5)
        assert ev["signal_retained"] == pytest.approx(expected)
    assert ev["verdict"].split(":")[0] in (
        "no evidence of signal",
        "signal above chance",
        "worse than chance",
    )
    assert (out / "evaluation" / "report.md").is_file()
    # A release was made and verifies, or the refusal says why and nothing was written.
    if result.release["released"]:
        from fedspine.privacy.signing import verify_release

        assert verify_release(out / "release").ok
    else:
        assert result.release["reason"] and not (out / "release").exists()
    summary = json.loads((out / "demo_summary.json").read_text())
    assert set(summary["seconds"]) >= {
        "phantom",
        "ingest",
        "federation",
        "generate",
        "evaluate",
        "report",
    }
    # The one page a person reads: every image inline, the sites' ε and the commands in it.
    html = (out / "report.html").read_text()
    assert 'src="http' not in html and "data:image/png;base64," in html
    assert all(site in html for site in ("site_1", "site_2", "site_3"))
    assert "fedspine demo" in html
    # Every process the demo started is gone.
    for pid_file in [out / "server" / "superlink.pid", *out.glob("sites/*/supernode.pid")]:
        pid = read_pid_file(pid_file)
        assert pid is None or not pid_alive(pid)
    assert any("SuperLink" in s for s in stages)
