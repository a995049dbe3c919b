"""The self-contained HTML report (``fedspine.reporting.html``): every section, graceful gaps,
escaping, and a real browser.

Inputs are small but valid outputs of the kinds fedspine writes (an evaluation folder, a DP
federation folder, a signed release); the evaluation record and the privacy summary are built
by their real constructors and written by their real writers. One slow test renders the report
of a real `evaluate`.
The browser checks run headless Chromium (Debian package `chromium`): they skip without it,
except under CI (environment variable CI set), where a missing browser fails.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import typer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from PIL import Image
from typer.testing import CliRunner

from fedspine.evaluation.records import (
    ArmRecord,
    ClosestPair,
    DatasetInfo,
    EvaluationRecord,
    Generative,
    Inputs,
    Memorisation,
    MetricRow,
    OutputScore,
    Ratios,
    ReportFiles,
    Selection,
    SyntheticInfo,
    TestSet,
    TrainData,
    Utility,
    UtilityResult,
    write_evaluation,
)
from fedspine.experiments.demo import DemoConfig, DemoResult, write_demo_report
from fedspine.fileio import write_json_atomic
from fedspine.privacy.report import site_entry, write_privacy_summary
from fedspine.privacy.signing import (
    encode_signature,
    fingerprint,
    public_key_line,
    sha256_file,
)
from fedspine.reporting.html import SECTIONS, HtmlReportError, write_html_report

HOSTILE = '<script>alert("x")</script>&'
SITES = ("site_1", "site_2")


# --- inputs -------------------------------------------------------------------------------


def write_png(path: Path, size: tuple[int, int] = (96, 48), seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0]), dtype=np.uint8)
    pixels[: size[1] // 2] //= 4  # a dark half: a screenshot of it is not uniform
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="PNG")
    return path


def _arm(auc: float, ci: list[float], real: int, synthetic: int) -> ArmRecord:
    return ArmRecord(
        auc=auc,
        ci=ci,
        sensitivity=0.8,
        specificity=0.6,
        threshold=0.5,
        per_output={"abnormal": OutputScore(auc=auc, ci=ci)},
        output_names=["abnormal"],
        history={"best_epoch": 2, "best_val_auc": 0.7, "epochs": [{}, {}, {}]},
        train_data=TrainData(real_train=real, synthetic=synthetic),
    )


def make_evaluation(root: Path, extractor: str = "fedspine-domain-cnn v1") -> Path:
    """An evaluation folder as `fedspine evaluate` writes it: the record built by its real
    constructors and written by the real writer (numbers made up)."""
    config = {"arch": "small", "epochs": 3, "seed": 0, "bootstrap": 200, "norm": "group"}
    record = EvaluationRecord(
        fedspine_version="0.1.0",
        created="2026-01-01T00:00:00+00:00",
        config=config,
        task="binary",
        class_names=["normal", "abnormal"],
        output_names=["abnormal"],
        inputs=Inputs(
            synthetic=SyntheticInfo(path="syn", content_hash="aa11"),
            train=DatasetInfo(path="pooled", content_hash="bb22"),
            test=DatasetInfo(path="pooled", content_hash="bb22"),
        ),
        selection=Selection(dataset="pooled", images=40, patients=20, use="selection only"),
        test_set=TestSet(images=80, patients=40, patients_shared_with_train_or_val=0),
        ratios=Ratios(tstr_over_trtr=0.871, mixed_over_trtr=1.012),
        utility=Utility(
            arms={
                "TSTR": UtilityResult(
                    auc=0.7055,
                    ci=[0.61, 0.79],
                    reference_auc=0.81,
                    signal_retained=0.6629,
                    signal_retained_ci=[0.3, 0.9],
                    ci_contains_chance=False,
                    verdict="signal above chance: TSTR's 95 % interval excludes AUC 0.5",
                )
            }
        ),
        arms={
            "TRTR": _arm(0.81, [0.74, 0.88], 120, 0),
            "TSTR": _arm(0.7055, [0.61, 0.79], 0, 200),
            "mixed": _arm(0.8197, [0.75, 0.89], 120, 200),
        },
        generative=Generative(
            n_real=120,
            n_synthetic=200,
            k=3,
            extractors=[f"{extractor}: a CNN trained on the real train split"],
            results=[
                MetricRow(
                    compared="synthetic vs real train",
                    extractor=extractor,
                    fid=0.4321,
                    kid=0.0123,
                    kid_std=0.001,
                    precision=0.5,
                    recall=0.6,
                    density=0.7,
                    coverage=0.8,
                )
            ],
        ),
        memorisation=Memorisation(
            extractor="pixels 24x24",
            heldout="the 'test' split",
            n_heldout=80,
            n_synthetic=200,
            verdict="no sign of memorisation",
            flagged=False,
            rule="suspected when ...",
            exact_copies=0,
            share_below_p1=0.01,
            share_below_p5=0.05,
            share_closer_to_train=0.5,
            median_syn_to_train=3.2,
            median_heldout_to_train=3.1,
            closest_pairs=[
                ClosestPair(synthetic_file="images/syn-1.png", train_file="a.dcm", distance=1.0)
            ],
        ),
        files=ReportFiles(roc="roc.png", samples="samples.png", closest_pairs="closest_pairs.png"),
    )
    root.mkdir(parents=True)
    write_evaluation(root, record)
    write_json_atomic(root / "config.json", config)
    for i, name in enumerate(("roc.png", "samples.png", "closest_pairs.png")):
        write_png(root / name, seed=i)
    return root


def make_federation(root: Path, rounds: int = 3, site_name: str = SITES[1]) -> Path:
    """A DP federation's output folder: privacy.json (written by the real writer),
    rounds.jsonl, federation*.json."""
    root.mkdir(parents=True)
    names = (SITES[0], site_name)
    records, per_round = [], {n: [] for n in names}
    for r in range(1, rounds + 1):
        sites = []
        for k, name in enumerate(names):
            eps = 2.0 * r + k
            per_round[name].append({"round": r, "epsilon": eps})
            mech = {"noise_multiplier": 1.1, "sample_rate": 0.2, "steps": 8, "clip_norm": 1.0}
            sites.append(
                {
                    "node_id": 100 + k,
                    "site": name,
                    "epsilon": eps,
                    "privacy": {"epsilon": eps, "delta": 1e-5, "cap": 10.0, "mechanisms": [mech]},
                }
            )
        failures = [{"site": site_name, "reason": "timeout"}] if r == 2 else []
        records.append({"round": r, "sites": sites, "failures": failures, "seconds": 12.5})
    (root / "rounds.jsonl").write_text("".join(json.dumps(rec) + "\n" for rec in records))
    mech = {"noise_multiplier": 1.1, "sample_rate": 0.2, "steps": 8, "clip_norm": 1.0}
    write_privacy_summary(
        root,
        {
            name: site_entry(
                per_round[name][-1]["epsilon"],
                1e-5,
                [mech] * rounds,
                unit="patient",
                patients=50,
                epsilon_per_round=per_round[name],
            )
            for name in names
        },
        {"discriminator": "DP-SGD at each site", "aggregation": "post-processing"},
        accountant="prv",
    )
    status = {"federation": "demo", "state": "completed", "completed_rounds": rounds}
    (root / "federation.json").write_text(json.dumps({**status, "rounds": rounds}))
    (root / "federation_config.json").write_text(json.dumps({"name": "demo", "rounds": rounds}))
    return root


def make_release(root: Path, privacy: dict, key: Ed25519PrivateKey) -> Path:
    """A signed release folder with the layout `fedspine release` writes."""
    syn = root / "synthetic"
    rows = []
    for k, label in enumerate(("normal", "abnormal")):
        for i in range(3):
            rel = f"images/syn-{k}{i}.png"
            write_png(syn / rel, size=(32, 32), seed=10 * k + i)
            rows.append((rel, label, f"syn-{k}{i}"))
    with open(syn / "labels.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([("file", "label", "patient_id"), *rows])
    (syn / "classes.txt").write_text("normal\nabnormal\n")
    audit = root.parent / "steward"  # the audit figures stay with the steward, not the release
    audit.mkdir(exist_ok=True)
    gate = {"passed": True, "flagged": 0, "n_synthetic": 6, "share_flagged": 0.0}
    (audit / "memorisation.json").write_text(json.dumps({"gate": gate, "extractor": "pixels"}))
    membership = {
        "attack": "synthetic-only membership inference",
        "features": "raw pixels",
        "n_members": 60,
        "n_nonmembers": 40,
        "n_synthetic": 6,
        "nearest": {"auc": 0.537, "tpr_at_1pct_fpr": 0.0167},
        "monte_carlo": {"auc": 0.5496, "tpr_at_1pct_fpr": 0.0667},
        "interpretation": "AUC 0.5 means chance",
    }
    (audit / "membership.json").write_text(json.dumps(membership))
    decision = {"released": True, "max_epsilon": 10.0, "checks": ["memorisation gate passed"]}
    (root / "privacy_report.json").write_text(
        json.dumps({"privacy": privacy, "release_decision": decision})
    )
    (root / "generator.pt").write_bytes(b"not really a generator")
    (root / "steward.pub").write_bytes(public_key_line(key.public_key()))
    files = sorted((p.relative_to(root).as_posix(), p) for p in root.rglob("*") if p.is_file())
    sites = {n: {"epsilon": s["epsilon"], "delta": s["delta"]} for n, s in privacy["sites"].items()}
    manifest = {
        "format": "fedspine-release/1",
        "fedspine_version": "0.1.0",
        "created": "2026-01-01T00:00:00+00:00",
        "run": {"name": "federation", "generator_sha256": sha256_file(root / "generator.pt")},
        "configuration": {"max_epsilon": 10.0, "per_class": 3, "seed": 0},
        "privacy": {"accountant": "prv", "delta": 1e-5, "unit": "patient", "sites": sites},
        "signing_key": fingerprint(key),
        "files": [
            {"path": rel, "sha256": sha256_file(p), "bytes": p.stat().st_size} for rel, p in files
        ],
    }
    data = (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode()
    (root / "manifest.json").write_bytes(data)
    (root / "manifest.sig").write_bytes(encode_signature(key.sign(data)))
    return root


@pytest.fixture
def full(tmp_path):
    """Evaluation, federation (with a canary audit), signed release and steward audit."""
    ev = make_evaluation(tmp_path / "evaluation")
    fed = make_federation(tmp_path / "federation")
    canary = {"eps_lower_bound": 0.4, "claimed_epsilon": 2.0, "delta": 1e-5, "passed": True}
    (fed / "canary_audit.json").write_text(json.dumps(canary))
    privacy = json.loads((fed / "privacy.json").read_text())
    release = make_release(tmp_path / "release", privacy, Ed25519PrivateKey.generate())
    steward = tmp_path / "steward"
    write_png(steward / "closest_pairs.png", seed=7)
    return {"evaluation": ev, "run": fed, "release": release, "steward_audit": steward}


# --- reading the page ---------------------------------------------------------------------


class Page(HTMLParser):
    """What a test needs from a page: section ids, images, scripts, external references."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.sections: list[str] = []
        self.images: list[str] = []
        self.scripts = 0
        self.body: dict[str, str] = {}
        self.external: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "section":
            self.sections.append(a.get("id", ""))
        elif tag == "img":
            self.images.append(a.get("src", ""))
        elif tag == "script":
            self.scripts += 1
        elif tag == "body":
            self.body = a
        if tag == "link" or a.get("src", "").startswith(("http:", "https:", "//", "file:")):
            self.external.append(f"{tag} {a}")
        if tag == "a" and not a.get("href", "#").startswith("#"):
            self.external.append(f"{tag} {a}")


def section_text(html_text: str, key: str) -> str:
    start = html_text.index(f'<section id="{key}"')
    return html_text[start : html_text.index("</section>", start)]


# --- the browser --------------------------------------------------------------------------

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        reason = "headless Chromium is not installed (Debian package `chromium`)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI must install it")
        pytest.skip(reason)
    return path


def browse(page: Path, *args: str) -> str:
    """Run Chromium on ``page`` with a fresh profile; returns its stdout."""
    with tempfile.TemporaryDirectory() as profile:
        result = subprocess.run(
            [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args, page.as_uri()],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def rendered(page: Path) -> Page:
    return Page(browse(page, "--dump-dom"))


def screenshot(page: Path, png: Path) -> np.ndarray:
    browse(page, f"--screenshot={png}", "--window-size=1280,4000", "--hide-scrollbars")
    return np.asarray(Image.open(png).convert("L"), dtype=np.float32)


# --- tests --------------------------------------------------------------------------------


def test_full_report_has_every_section_and_renders_in_chromium(full, tmp_path):
    out = write_html_report(
        tmp_path / "report.html",
        commands=["fedspine evaluate --synthetic syn --train pooled --test pooled --out ev"],
        config={"demo": {"sites": 2, "epsilon": 10.0}},
        **full,
    )
    text = out.read_text()
    static = Page(text)
    assert static.sections == [key for key, _ in SECTIONS]
    assert static.external == [] and static.scripts == 1
    assert all(src.startswith("data:image/png;base64,") for src in static.images)
    # samples, 2 release class grids, ROC, ε per round, closest pairs ×2
    assert len(static.images) == 7
    for src in static.images:
        Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()

    summary = section_text(text, "summary")
    assert "Released: a signed release of" in summary and "verified" in summary
    assert "0.810 [0.740, 0.880]" in summary and "0.871" in summary
    assert "0.663 [0.300, 0.900]" in summary and "signal above chance" in summary
    for site, eps in ((SITES[0], "6.000"), (SITES[1], "7.000")):
        assert f"<td>{site}</td><td>{eps}</td>" in summary
    assert "1e-05" in summary
    fidelity = section_text(text, "fidelity")
    row = "<td>fedspine-domain-cnn v1</td><td>synthetic vs real train</td><td>12.300 ± 1.000</td>"
    assert row + "<td>0.4321" in fidelity  # KID leads, FID beside it
    privacy = section_text(text, "privacy")
    assert "<td>3</td><td>6.000</td><td>7.000</td>" in privacy  # ε per round table
    assert "site_2: timeout" in privacy
    audits = section_text(text, "audits")
    assert "0.537" in audits and "0.017" in audits and "0.4" in audits
    assert "not available" not in text
    provenance = section_text(text, "provenance")
    assert (
        "fedspine evaluate --synthetic syn" in provenance
        and "<li>epsilon = 10.0</li>" in provenance
    )
    assert "norm = &#x27;group&#x27;" in provenance  # a setting the command line cannot carry

    dom = rendered(out)
    assert dom.body.get("data-self-check") == "passed"
    assert dom.body.get("data-broken-images") == "0"
    assert dom.body.get("data-images") == str(len(static.images))
    assert dom.sections == static.sections
    pixels = screenshot(out, tmp_path / "shot.png")
    assert pixels.shape == (4000, 1280)
    assert pixels.std() > 20  # not one flat colour
    dark = float((pixels < 100).mean())
    assert 0.005 < dark < 0.5, dark  # text and images on a light page


def test_self_check_counts_an_image_that_does_not_decode(full, tmp_path):
    out = write_html_report(tmp_path / "report.html", evaluation=full["evaluation"])
    broken = '<img alt="broken" src="data:image/png;base64,iVBORw0KGgoAAAAA">'
    out.write_text(out.read_text().replace("<main>", "<main>" + broken, 1))
    dom = rendered(out)
    assert dom.body.get("data-broken-images") == "1"
    assert dom.body.get("data-self-check") == "failed"


def test_text_from_files_is_escaped(tmp_path):
    ev = make_evaluation(tmp_path / "ev", extractor=HOSTILE)
    fed = make_federation(tmp_path / "fed", site_name=HOSTILE)
    out = write_html_report(
        tmp_path / "r.html",
        evaluation=ev,
        run=fed,
        commands=[HOSTILE],
        title=HOSTILE,
        release_refused=HOSTILE,
    )
    text = out.read_text()
    assert HOSTILE not in text
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;" in text
    assert Page(text).scripts == 1


def test_centralised_evaluation_only_says_what_is_missing(tmp_path):
    out = write_html_report(tmp_path / "r.html", evaluation=make_evaluation(tmp_path / "ev"))
    text = out.read_text()
    assert Page(text).sections == [key for key, _ in SECTIONS]
    assert "No release" in section_text(text, "summary")
    assert "not available: privacy ledger: no run or release was given" in text
    audits = section_text(text, "audits")
    assert "not available: membership inference" in audits
    assert "not available: no canary audit output" in audits
    assert "not available: no release given" in section_text(text, "release")
    assert "This page shows real training images" in text


def test_centralised_dp_run_has_no_rounds_but_its_config_and_steps(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    mech = {"noise_multiplier": 1.14, "sample_rate": 0.28, "steps": 32, "clip_norm": 1.0}
    site = site_entry(9.01, 1e-5, [mech], unit="patient", patients=40)
    write_privacy_summary(run, {"abnormality": site}, {}, accountant="prv")
    (run / "config.toml").write_text('model = "cgan"\n[train]\nbatch = 32\n')
    write_png(run / "samples" / "fakes_00001.024.png")
    text = write_html_report(tmp_path / "r.html", run=run).read_text()
    privacy_html = section_text(text, "privacy")
    assert (
        "a centralised run has no rounds (abnormality: ε = 9.010 after 32 D steps)" in privacy_html
    )
    assert "<td>1.14</td><td>1</td><td>0.28</td><td>32</td><td>yes</td>" in privacy_html
    assert "fakes_00001.024.png" in section_text(text, "samples")
    provenance = section_text(text, "provenance")
    assert "<li>model = &quot;cgan&quot;</li>" in provenance
    assert "<li>train.batch = 32</li>" in provenance
    assert "not available: classifier AUCs: no evaluation given" in text


def test_a_spinegan_run_shows_each_phase_beside_the_total(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    mechs = [
        {"noise_multiplier": 2.0, "sample_rate": 0.1, "steps": 4, "clip_norm": 1.0},
        {"noise_multiplier": 1.1, "sample_rate": 0.2, "steps": 30, "clip_norm": 1.0},
    ]
    phases = {"classifier": {"epsilon": 1.5, "steps": 4}, "gan": {"epsilon": 7.25, "steps": 30}}
    site = site_entry(8.0, 1e-5, mechs, unit="patient", patients=40)
    sites = {"site-a": {**site, "phases": phases}, "site-b": site}  # as a federation adds them
    write_privacy_summary(run, sites, {}, accountant="prv")
    privacy_html = section_text(
        write_html_report(tmp_path / "r.html", run=run).read_text(), "privacy"
    )
    assert "<th>ε (total)</th><th>classifier ε</th><th>GAN ε</th><th>δ</th>" in privacy_html
    assert "<td>site-a</td><td>8.000</td><td>1.500 (4 steps)</td><td>7.250 (30 steps)</td>" in (
        privacy_html
    )
    assert "<td>site-b</td><td>8.000</td><td>-</td><td>-</td>" in privacy_html


def test_release_alone_plots_epsilon_from_its_privacy_report(full, tmp_path):
    text = write_html_report(tmp_path / "r.html", release=full["release"]).read_text()
    assert "Released: a signed release" in text
    assert "synthetic: normal (3 of 3 in the release)" in text
    assert "release/privacy_report.json" in section_text(text, "privacy")
    assert "This page shows real training images" not in text


def test_tampered_release_is_reported_as_not_verified(full, tmp_path):
    write_png(full["release"] / "synthetic" / "images" / "syn-00.png", size=(32, 32), seed=99)
    text = write_html_report(tmp_path / "r.html", release=full["release"]).read_text()
    summary = section_text(text, "summary")
    assert "NOT verified" in summary and "synthetic/images/syn-00.png" in summary


def test_refused_release_reason_leads_the_summary(full, tmp_path):
    reason = "site site_2 spent epsilon 12.3, over the cap --max-epsilon 10"
    text = write_html_report(
        tmp_path / "r.html", run=full["run"], release_refused=reason
    ).read_text()
    assert f"Release refused: {reason}" in section_text(text, "summary")
    assert "release was refused" in section_text(text, "release")


def test_errors_leave_no_file_and_unreadable_images_are_named(full, tmp_path):
    out = tmp_path / "r.html"
    with pytest.raises(HtmlReportError, match="nothing to report"):
        write_html_report(out)
    with pytest.raises(HtmlReportError, match="no-such-folder"):
        write_html_report(out, evaluation=tmp_path / "no-such-folder")
    with pytest.raises(HtmlReportError, match="report.json: missing"):
        write_html_report(out, evaluation=full["steward_audit"])
    assert not out.exists()

    out.write_text("old")
    (full["evaluation"] / "roc.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    text = write_html_report(out, evaluation=full["evaluation"]).read_text()
    assert "not available: ROC curves" in text and "roc.png: not a readable PNG" in text
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".r.html")] == []


def test_cli_writes_the_report_and_fails_in_one_line(full, tmp_path):
    from fedspine.cli.report import register

    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)  # a second command keeps `report` a named subcommand
    out = tmp_path / "page.html"
    args = ["report", "--evaluation", str(full["evaluation"]), "--run", str(full["run"])]
    result = CliRunner().invoke(app, [*args, "--out", str(out), "--command", "fedspine train x"])
    assert result.exit_code == 0, result.output
    assert str(out) in result.output
    provenance = section_text(out.read_text(), "provenance")
    assert "fedspine train x" in provenance and "fedspine report --evaluation" in provenance
    result = CliRunner().invoke(app, ["report", "--run", str(tmp_path / "gone"), "--out", "x"])
    assert result.exit_code == 1 and "error:" in result.output and "gone" in result.output
    result = CliRunner().invoke(app, ["report", "--out", str(out)])
    assert result.exit_code == 1 and "at least one of" in result.output


@pytest.mark.parametrize("released", [True, False])
def test_demo_report_records_its_commands_and_release(full, tmp_path, released):
    out = tmp_path / "demo"
    out.mkdir()
    for name in ("evaluation", "release"):
        shutil.copytree(full[name], out / name)
    shutil.copytree(full["run"], out / "federation")
    shutil.copytree(full["steward_audit"], out / "steward" / "audit")
    config = DemoConfig(sites=2, rounds=3, epsilon=10.0)
    release = {"released": True} if released else {"released": False, "reason": "over the cap"}
    if not released:
        shutil.rmtree(out / "release")
    result = DemoResult(out=out, sites=list(SITES), release=release)
    text = write_demo_report(out, result, config, command="fedspine demo --out demo").read_text()
    provenance = section_text(text, "provenance")
    assert "fedspine demo --out demo" in provenance
    assert f"--audit-data {out / 'prepared' / 'site_2'}" in provenance
    assert "--max-epsilon 10 --per-class 100" in provenance
    assert "<li>patients_per_step = 16</li>" in provenance  # the demo's own configuration
    summary = section_text(text, "summary")
    assert ("Released: a signed release" in summary) == released
    assert ("Release refused: over the cap" in summary) == (not released)


@pytest.mark.slow
def test_report_of_a_real_evaluation_renders(tmp_path):
    from fedspine.reporting.evaluation_report import evaluate
    from tests.evaluation.test_report import fast_cfg, make_real, write_generated

    real = make_real(
        tmp_path / "real", counts={"train": [30, 30], "val": [10, 10], "test": [20, 20]}
    )
    train = real.select("train")
    syn = write_generated(
        tmp_path / "syn", np.asarray(train.images), train.labels, real.class_names
    )
    cfg = fast_cfg(epochs=1, domain_epochs=1, bootstrap=50, kid_subsets=5)
    evaluate(syn, tmp_path / "real", tmp_path / "real", tmp_path / "ev", cfg)
    out = write_html_report(tmp_path / "r.html", evaluation=tmp_path / "ev")
    text = out.read_text()
    assert "not available: ROC" not in text and "n/a [" not in text
    assert "TRTS (train real, test synthetic)" in text
    assert len(Page(text).images) == 3
    dom = rendered(out)
    assert dom.body.get("data-broken-images") == "0" and dom.body.get("data-images") == "3"
