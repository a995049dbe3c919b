"""`fedspine evaluate`: the report, selection hygiene, synthetic input forms, sanity anchors, CLI.

The real stand-in: 24-px noisy images where normal ones carry a bright 2x18 bar and abnormal ones
a bright 6x6 square of the same area (so brightness alone does not tell them apart), two images
per patient. Runs are small (2-3 epochs of the small CNN) so the file takes well under a minute.
"""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from PIL import Image
from typer.testing import CliRunner

from fedspine.cli.evaluate import register
from fedspine.data.prepared import PreparedDataset, load_prepared, write_prepared
from fedspine.evaluation.config import WORK_DIR, EvaluateConfig, EvaluateError
from fedspine.evaluation.records import read_evaluation
from fedspine.reporting.evaluation_report import evaluate

SIZE = 24
COUNTS = {"train": [60, 60], "val": [20, 20], "test": [40, 40]}
FILES = ("report.md", "report.json", "roc.png", "samples.png", "closest_pairs.png", "config.json")


def draw(rng: np.random.Generator, label: int, size: int = SIZE) -> np.ndarray:
    img = rng.normal(70, 20, (size, size))
    if label == 1:
        y, x = rng.integers(0, size - 6, 2)
        img[y : y + 6, x : x + 6] += 120
    elif label == 2:
        y, x = rng.integers(0, size - 18), rng.integers(0, size - 2)
        img[y : y + 18, x : x + 2] += 120
    else:
        y, x = rng.integers(0, size - 2), rng.integers(0, size - 18)
        img[y : y + 2, x : x + 18] += 120
    return np.clip(img, 0, 255).astype(np.uint8)


def make_real(
    root: Path,
    counts: dict[str, list[int]] = COUNTS,
    class_names: tuple[str, ...] = ("normal", "abnormal"),
    seed: int = 0,
) -> PreparedDataset:
    rng = np.random.default_rng(seed)
    images, files, patients, splits, labels = [], [], [], [], []
    for split, per_class in counts.items():
        for label, n in enumerate(per_class):
            for j in range(n):
                images.append(draw(rng, label))
                files.append(f"img_{len(files):04d}.png")
                patients.append(f"{split}-{label}-{j // 2}")
                splits.append(split)
                labels.append(label)
    lab = np.array(labels)
    findings = np.stack([lab == k for k in range(len(class_names))], axis=1).astype(np.uint8)
    write_prepared(
        root,
        np.stack(images),
        files,
        patients,
        splits,
        labels,
        findings,
        [f"finding {c}" for c in class_names],
        list(class_names),
        [],
        {"source": "test"},
    )
    return load_prepared(root)


def write_generated(
    root: Path, images: np.ndarray, labels: np.ndarray, class_names: list[str], seed: int = 0
) -> Path:
    """The folder layout `fedspine generate` writes, rows in shuffled order."""
    (root / "images").mkdir(parents=True)
    order = np.random.default_rng(seed).permutation(len(images))
    rows = []
    for n, i in enumerate(order):
        rel = f"images/syn-{n:06d}.png"
        Image.fromarray(np.ascontiguousarray(images[i])).save(root / rel)
        rows.append((rel, class_names[labels[i]], f"syn-{n:06d}"))
    with open(root / "labels.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["file", "label", "patient_id"])
        writer.writerows(rows)
    (root / "classes.txt").write_text("".join(f"{c}\n" for c in class_names))
    return root


class _FakeInception(torch.nn.Module):
    """Stands in for a user's Inception-v3 file: uint8 [N, 3, 299, 299] -> 192 features.

    Fewer than Inception's 2048 keep the test fast (a 2048-d FID takes CPU-seconds); the
    extractor warns about the width, which the test expects.
    """

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        assert return_features and x.dtype == torch.uint8 and x.shape[1:] == (3, 299, 299)
        return torch.nn.functional.adaptive_avg_pool2d(x.float(), 8).flatten(1)


def _fake_inception(path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(_FakeInception()).save(str(path))
    return path


def fast_cfg(**overrides) -> EvaluateConfig:
    values = dict(
        epochs=3,
        batch=16,
        bootstrap=200,
        domain_epochs=2,
        kid_subsets=10,
        device="cpu",
        threads=1,
    )
    values.update(overrides)
    return EvaluateConfig(**values)


@pytest.fixture(scope="module")
def copies_run(tmp_path_factory):
    """TRAIN = TEST (one folder); SYN = a generated folder of copies of the real train images."""
    root = tmp_path_factory.mktemp("copies")
    real = make_real(root / "real")
    train = real.select("train")
    syn = write_generated(root / "syn", np.asarray(train.images), train.labels, real.class_names)
    report = evaluate(syn, root / "real", root / "real", root / "report", fast_cfg())
    return root, real, report


def test_report_has_every_file_and_numbers_in_range(copies_run):
    root, _, report = copies_run
    out = root / "report"
    for name in FILES:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert not list(root.glob(".report.partial-*"))
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["ratios"] == report["ratios"]
    assert EvaluateConfig.from_dict(json.loads((out / "config.json").read_text())) == fast_cfg()
    assert set(report["arms"]) == {"TRTR", "TSTR", "mixed"}
    for arm in report["arms"].values():
        lo, hi = arm["ci"]
        assert 0.0 <= lo <= arm["auc"] <= hi <= 1.0
        assert 0.0 <= arm["sensitivity"] <= 1.0 and 0.0 <= arm["specificity"] <= 1.0
        assert arm["test_images"] == 80 and arm["test_patients"] == 40
    ratios, arms = report["ratios"], report["arms"]
    assert ratios["tstr_over_trtr"] == pytest.approx(arms["TSTR"]["auc"] / arms["TRTR"]["auc"])
    assert ratios["mixed_over_trtr"] == pytest.approx(arms["mixed"]["auc"] / arms["TRTR"]["auc"])
    assert arms["TRTR"]["auc"] > 0.9, "the stand-in task must be learnable for the anchors to mean"

    gen = report["generative"]
    names = {row["extractor"] for row in gen["results"]}
    assert any(n.startswith("fedspine-domain-cnn") for n in names)
    assert any(n.startswith("pixels") for n in names)
    for row in gen["results"]:
        assert row["fid"] >= 0.0 and row["density"] >= 0.0
        for key in ("precision", "recall", "coverage"):
            assert 0.0 <= row[key] <= 1.0
    assert (out / WORK_DIR / "domain_extractor.pt").is_file()
    for arm in arms:
        assert (out / WORK_DIR / "classifiers" / f"{arm}.pt").is_file()

    md = (out / "report.md").read_text()
    assert md.index("TSTR / TRTR") < md.index("## Classifiers")
    assert f"{ratios['tstr_over_trtr']:.3f}" in md
    for name in names:
        assert name in md
    for png in ("roc.png", "samples.png", "closest_pairs.png"):
        assert f"]({png})" in md
    assert "must not be released" in md
    inputs = report["inputs"]
    assert inputs["train"]["content_hash"] == load_prepared(root / "real").content_hash
    assert len(inputs["synthetic"]["content_hash"]) == 64
    assert report["fedspine_version"]


def test_report_json_is_exactly_its_record(copies_run):
    """Every key `evaluate` writes has a typed field: the record rewrites the file unchanged."""
    root, _, report = copies_run
    text = (root / "report" / "report.json").read_text()
    record = read_evaluation(root / "report")
    assert record.to_json() == json.loads(text) == report
    assert json.dumps(record.to_json(), indent=2) + "\n" == text
    assert record.arms["TRTR"].train_data.real_train > 0
    assert record.memorisation.closest_pairs[0].train_file


def test_selection_uses_only_real_val_and_training_no_test_rows(copies_run):
    _, real, report = copies_run
    n_val = int(np.sum(real.splits == "val"))
    n_train = int(np.sum(real.splits == "train"))
    expected_splits = {"TRTR": ["train"], "TSTR": ["synthetic"], "mixed": ["synthetic", "train"]}
    for name, arm in report["arms"].items():
        history = arm["history"]
        assert history["val_splits"] == ["val"] and history["val_rows"] == n_val
        assert "test" not in history["train_splits"]
        assert history["train_splits"] == expected_splits[name]
        composition = arm["train_data"]
        assert history["train_rows"] == composition["real_train"] + composition["synthetic"]
    assert report["arms"]["TRTR"]["train_data"]["real_train"] == n_train
    assert report["selection"]["split"] == "val" and report["selection"]["images"] == n_val
    assert report["test_set"]["patients_shared_with_train_or_val"] == 0


def test_generated_folder_is_ingested_at_the_real_resolution(copies_run):
    root, real, report = copies_run
    syn_info = report["inputs"]["synthetic"]
    assert syn_info["kind"] == "generated folder"
    assert syn_info["ingested_to"] == f"{WORK_DIR}/synthetic_prepared"
    ingested = load_prepared(root / "report" / WORK_DIR / "synthetic_prepared")
    assert ingested.resolution == real.resolution
    assert set(ingested.splits.tolist()) == {"train"}
    assert len(ingested) == int(np.sum(real.splits == "train")) == syn_info["images"]
    assert ingested.class_names == real.class_names


def test_copies_of_real_train_give_ratio_near_one_and_are_flagged(copies_run):
    _, real, report = copies_run
    assert report["ratios"]["tstr_over_trtr"] == pytest.approx(1.0, abs=0.05)
    # Copies of the real training images carry their true labels: the real-trained classifier
    # separates them at least as well as the real test images.
    trts = report["class_fidelity"]
    assert trts["images"] == int(np.sum(real.splits == "train"))
    assert trts["auc"] > 0.9 and trts["ci"][0] <= trts["auc"] <= trts["ci"][1]
    assert "TRTS" in (copies_run[0] / "report" / "report.md").read_text()
    scores = trts["per_output"]["abnormal"]
    assert scores["mean_score_positive"] > scores["mean_score_negative"]
    assert "mean score" in (copies_run[0] / "report" / "report.md").read_text()
    mem = report["memorisation"]
    n = int(np.sum(real.splits == "train"))
    assert mem["flagged"] and mem["verdict"].startswith("memorisation suspected")
    assert mem["exact_copies"] == n and mem["share_below_p1"] == 1.0
    assert mem["heldout"].startswith("the 'test' split")
    pair = mem["closest_pairs"][0]
    assert pair["distance"] == 0.0 and pair["train_file"] in real.files


def test_pure_noise_gives_chance_tstr_and_no_memorisation(tmp_path):
    real = make_real(tmp_path / "real")
    train = real.select("train")
    rng = np.random.default_rng(7)
    mean, std = float(np.mean(train.images)), float(np.std(train.images))
    n = len(train)
    # Noise with the real images' pixel mean and spread: no class signal, same grey range.
    noise = np.clip(rng.normal(mean, std, (n, SIZE, SIZE)), 0, 255).astype(np.uint8)
    labels = np.repeat([0, 1], n // 2)
    write_prepared(
        tmp_path / "noise",
        noise,
        [f"n{i}.png" for i in range(n)],
        [f"n{i}" for i in range(n)],
        ["train"] * n,
        labels,
        np.zeros((n, 0), np.uint8),
        [],
        real.class_names,
        [],
        {"source": "noise"},
    )
    inception = _fake_inception(tmp_path / "fake-inception.pt")
    cfg = fast_cfg(mix_per_class=0, heldout="val", inception=str(inception))
    with pytest.warns(UserWarning, match="not Inception-v3's 2048"):
        report = evaluate(
            tmp_path / "noise", tmp_path / "real", tmp_path / "real", tmp_path / "r", cfg
        )
    names = [row["extractor"] for row in report["generative"]["results"]]
    assert names[0].startswith("inception-v3 (user file fake-inception.pt, sha256")
    assert names[0] in (tmp_path / "r" / "report.md").read_text()
    assert not (tmp_path / "r" / WORK_DIR / "domain_extractor.pt").exists()
    arms = report["arms"]
    assert set(arms) == {"TRTR", "TSTR"} and report["ratios"]["mixed_over_trtr"] is None
    assert arms["TRTR"]["auc"] > 0.9
    # A network trained on noise learns no class signal, but it still ranks the real bars and
    # squares by whatever its spurious features respond to: its AUC is 0.5 in expectation over
    # training runs, with a spread of about 0.1 (0.40 to 0.70 over six stand-ins like this).
    # A TSTR arm that leaked real labels would score near TRTR (about 1) and fail both checks.
    assert abs(arms["TSTR"]["auc"] - 0.5) < 0.25
    assert arms["TRTR"]["auc"] - arms["TSTR"]["auc"] > 0.2
    # Noise carries no class: the real classifier's scores do not follow its labels.
    assert abs(report["class_fidelity"]["auc"] - 0.5) < 0.2
    mem = report["memorisation"]
    assert not mem["flagged"] and mem["exact_copies"] == 0
    assert mem["heldout"].startswith("the 'val' split")


def test_class_order_mismatch_and_bad_inputs_fail_before_any_work(tmp_path):
    real = make_real(tmp_path / "real", counts={"train": [4, 4], "val": [2, 2], "test": [2, 2]})
    train = real.select("train")
    images, labels = np.asarray(train.images), train.labels
    swapped = write_generated(tmp_path / "swapped", images, labels, ["abnormal", "normal"])
    with pytest.raises(EvaluateError, match=r"classes.txt.*class order.*differs"):
        evaluate(swapped, tmp_path / "real", tmp_path / "real", tmp_path / "out", fast_cfg())
    make_real(tmp_path / "other", counts={"train": [4, 4]}, class_names=("a", "b"))
    with pytest.raises(EvaluateError, match="class order"):
        evaluate(
            tmp_path / "other", tmp_path / "real", tmp_path / "real", tmp_path / "o", fast_cfg()
        )
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.partial-*"))
    with pytest.raises(EvaluateError, match="--train .*not a prepared dataset"):
        evaluate(
            tmp_path / "other", tmp_path / "nope", tmp_path / "real", tmp_path / "o", fast_cfg()
        )
    no_val = make_real(tmp_path / "noval", counts={"train": [4, 4], "test": [2, 2]})
    assert len(no_val.select("val")) == 0
    with pytest.raises(EvaluateError, match="'val' split"):
        evaluate(
            tmp_path / "other", tmp_path / "noval", tmp_path / "real", tmp_path / "o", fast_cfg()
        )
    (tmp_path / "exists").mkdir()
    with pytest.raises(EvaluateError, match="already exists"):
        evaluate(tmp_path / "other", tmp_path / "real", tmp_path / "real", tmp_path / "exists")
    with pytest.raises(EvaluateError, match="--arch"):
        evaluate(swapped, tmp_path / "real", tmp_path / "real", tmp_path / "o", fast_cfg(arch="x"))


def test_cli_multiclass_summary_and_errors(tmp_path):
    names = ("normal", "square", "bar")
    counts = {"train": [24, 24, 24], "val": [8, 8, 8], "test": [12, 12, 12]}
    real = make_real(tmp_path / "real", counts=counts, class_names=names)
    train = real.select("train")
    syn = write_generated(tmp_path / "syn", np.asarray(train.images), train.labels, list(names))
    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)  # a second command keeps `evaluate` a subcommand
    runner = CliRunner()
    args = ["evaluate", "--synthetic", str(syn), "--train", str(tmp_path / "real")]
    args += ["--test", str(tmp_path / "real"), "--out", str(tmp_path / "report")]
    args += ["--epochs", "2", "--domain-epochs", "1", "--bootstrap", "50", "--mix-per-class", "5"]
    args += ["--batch", "16", "--threads", "1", "--device", "cpu"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    for text in ("TRTR AUC", "TSTR AUC", "TSTR/TRTR =", "KID", "FID", "fedspine-domain-cnn"):
        assert text in result.output
    # The summary says whether the synthetic data carry any signal, in words.
    lines = result.output.splitlines()
    assert any(line.startswith("TSTR: ") and "chance" in line for line in lines), lines[-12:]
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["task"] == "multiclass" and report["output_names"] == list(names)
    assert report["arms"]["mixed"]["train_data"]["synthetic"] == 15
    for arm in report["arms"].values():
        assert set(arm["per_output"]) == set(names)
        per_class = [arm["per_output"][n]["auc"] for n in names]
        assert arm["auc"] == pytest.approx(np.mean(per_class))
        assert arm["ci"][0] <= arm["auc"] <= arm["ci"][1]
    assert "square" in (tmp_path / "report" / "report.md").read_text()

    again = runner.invoke(app, args)
    assert again.exit_code == 1 and "already exists" in again.output

    at = args.index("--train")
    missing = runner.invoke(app, args[:at] + args[at + 2 :])
    assert missing.exit_code != 0 and "--train" in missing.output
    absent = list(args)
    absent[absent.index("--train") + 1] = str(tmp_path / "nowhere")
    absent[absent.index("--out") + 1] = str(tmp_path / "r2")
    bad = runner.invoke(app, absent)
    assert bad.exit_code == 1
    assert bad.output.strip().splitlines()[-1].startswith("error: --train")
    assert not (tmp_path / "r2").exists()
