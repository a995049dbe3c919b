"""The README's main command, end to end on a smaller phantom: every stage, every output."""

from __future__ import annotations

import json

import pytest

from fedspine.experiments.demo import DemoConfig, run_demo
from fedspine.federated.processes import pid_alive, read_pid_file

SMALL = dict(
    images_per_site=90,
    phantom_size=128,
    per_class=40,
    classifier_epochs=2,
    release_per_class=20,
)


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    """The default route: a public checkpoint pretrained here, one DP-MEPF release per site
    over a real SuperLink, the fit, and the public-only baseline evaluated beside it."""
    config = DemoConfig(public_images=60, public_kimg=0.1, fit_steps=5, **SMALL)
    stages = []
    result = run_demo(tmp_path / "demo", config, stage=stages.append)
    out = tmp_path / "demo"

    assert result.sites == ["site_1", "site_2", "site_3"]
    (record,) = result.rounds
    assert record["phase"] == "embedding" and len(record["sites"]) == 3
    # The sites released the public D's features, received over the wire, hashed as the
    # checkpoint's D.
    from fedspine.training.checkpoint import load_checkpoint, state_sha256
    from fedspine.training.mean_embedding import read_release
    from fedspine.training.public_init import load_public_init

    public = load_public_init(result.public_run, "")
    D = load_checkpoint(public.path, kind="trainer")["trainer"]["D"]
    for path in sorted((out / "federation" / "releases").glob("*.npz")):
        parts = read_release(path).metadata["feature_map"]["parts"]
        assert [p["kind"] for p in parts] == ["rff", "network"]
        assert parts[1]["weights_sha256"] == state_sha256(D)
    # The public-only baseline was evaluated the same way, on the same real test split.
    base = result.public_only
    assert 0.0 <= base["tstr_auc"] <= 1.0 and base["trtr_auc"] == result.evaluation["trtr_auc"]
    assert (out / "public-only" / "evaluation" / "report.md").is_file()
    assert "public-only baseline" in (out / "report.html").read_text()
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
    # The ceiling: the evaluation's classifier trained with DP-SGD at the demo's ε on the
    # pooled patients, in a privacy home of its own, scored on the same test split.
    from fedspine.privacy.home import PrivacyHome

    assert 0.0 <= ev["ceiling_auc"] <= 1.0 and len(ev["ceiling_ci"]) == 2
    (ceiling_record,) = PrivacyHome(out / "ceiling" / "privacy").ledger().records()
    assert ceiling_record["steps"] > 0
    assert "DP classifier ceiling" in (out / "report.html").read_text()
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
    assert "fedspine demo" in html and "fedspine pretrain" in html
    # Every process the demo started is gone.
    for pid_file in [out / "server" / "superlink.pid", *out.glob("sites/*/supernode.pid")]:
        pid = read_pid_file(pid_file)
        assert pid is None or not pid_alive(pid)
    assert any("SuperLink" in s for s in stages)


def test_the_demo_routes_configure_the_federation_they_name(tmp_path):
    from fedspine.experiments.demo import _federation_config, demo_command

    sites = ["site_1", "site_2"]
    mepf = _federation_config(tmp_path, sites, DemoConfig(), "/public/run")
    assert mepf.route == "dp-mean-embedding" and mepf.embedding.features == "rff+public"
    assert mepf.initial_checkpoint == "/public/run" and mepf.dp and mepf.dp_epsilon == 10.0
    mepf.validate()
    sgd = _federation_config(tmp_path, sites, DemoConfig(route="dp-sgd", rounds=3), None)
    assert sgd.route == "gan" and sgd.rounds == 3 and sgd.initial_checkpoint is None
    sgd.validate()
    assert "--route dp-sgd --rounds 3" in demo_command(
        tmp_path, DemoConfig(route="dp-sgd", rounds=3)
    )
    assert "--public-run /p" in demo_command(tmp_path, DemoConfig(public_run="/p"))
    with pytest.raises(ValueError, match="--route"):
        DemoConfig(route="gan").check()


def test_a_demo_run_again_starts_its_federation_afresh_and_keeps_its_data(tmp_path):
    from fedspine.experiments.demo import _fresh_federation

    for name in ("federation", "server", "sites/site_1/privacy", "phantom", "prepared", "public"):
        (tmp_path / name).mkdir(parents=True)
    said = []
    _fresh_federation(tmp_path, said.append)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["phantom", "prepared", "public"]
    assert "ledgers" in said[0]
    _fresh_federation(tmp_path, said.append)
    assert len(said) == 1  # nothing to remove: nothing said
