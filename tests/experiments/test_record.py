"""reproduce.json as a typed record: it round-trips, and reproduce.md renders from it alone."""

from __future__ import annotations

import json

from fedspine.experiments.budgets import BUDGETS, ReproduceBudget
from fedspine.experiments.plan import make_plan
from fedspine.experiments.prepare import RunContext
from fedspine.experiments.record import ReproduceRecord, TableRow
from fedspine.experiments.reproduce import build_record, render_markdown


def _evaluation(auc: float) -> dict:
    return {
        "trtr": {"auc": 0.8, "ci": [0.7, 0.9]},
        "tstr": {"auc": auc, "ci": [auc - 0.1, auc + 0.1]},
        "mixed": None,
        "ratios": {"tstr_over_trtr": auc / 0.8},
        "gan_metrics": {"extractor": "domain CNN", "fid": 12.5, "precision": 0.4, "recall": 0.3},
        "gan_metrics_real_reference": {"fid": 1.0},
        "test_images": 10,
    }


def _record(tmp_path) -> ReproduceRecord:
    plan = make_plan(tmp_path, tmp_path / "o", "smoke", {"seeds": 2})
    ctx = RunContext(plan=plan, stage=lambda _m: None)
    ctx.data_info["abnormality"] = {"images": 120, "rejected": 0, "counts": {}}
    done = {"status": "done", "seconds": {"train": 6.0}}
    results = {
        "cgan": {**done, "evaluation": _evaluation(0.6)},
        "cgan-seed1": {**done, "evaluation": _evaluation(0.7)},
        "dp_eps10": {"status": "failed", "reason": "`fedspine train` stopped: boom"},
        "lesion": {"status": "not run", "reason": "not run: the lesion task needs VinDr"},
    }
    return build_record(ctx, results, 12.0)


def test_the_record_round_trips_through_json(tmp_path):
    record = _record(tmp_path)
    text = json.dumps(record.to_json())
    again = ReproduceRecord.from_json(json.loads(text))
    assert again == record
    assert json.dumps(again.to_json()) == text, "same keys, same order"
    assert render_markdown(again) == render_markdown(record) == render_markdown(json.loads(text))


def test_the_record_keeps_the_format_reproduce_json_always_had(tmp_path):
    written = _record(tmp_path).to_json()
    assert list(written) == [
        "format",
        "fedspine_version",
        "created",
        "seconds",
        "budget",
        "spinegan_available",
        "data",
        "table",
        "paper",
        "errors",
        "arms",
        "seeds",
        "options",
    ]
    assert written["format"] == "fedspine-reproduce/2"
    assert list(written["table"][0]) == [
        "experiment",
        "paper",
        "ours",
        "signal",
        "epsilon",
        "details",
    ]
    assert set(written["spinegan_available"]) == {"available", "how"}
    assert written["options"] == {"inception": None, "classifier_weights": None}
    assert written["seeds"]["cgan"]["tstr_auc"]["values"] == [0.6, 0.7]


def test_a_record_with_a_public_checkpoint_names_it_and_gives_dp_minus_public(tmp_path):
    from fedspine.experiments.public_run import PublicRun

    public = PublicRun(
        path=tmp_path / "public" / "run",
        checkpoint="snapshots/snapshot_00001.000.pt",
        sha256="ab" * 32,
        declaration="fedspine phantom simulator",
        dataset_content_hash="cd" * 32,
        resolution=32,
        classes=2,
    )
    plan = make_plan(tmp_path, tmp_path / "o", "smoke", public_run=public)
    ctx = RunContext(plan=plan, stage=lambda _m: None)
    ctx.data_info["abnormality"] = {"images": 120, "rejected": 0, "counts": {}}
    done = {"status": "done", "seconds": {"train": 6.0}}
    privacy = {"private": True, "epsilon": 9.5, "delta": 1e-5, "accountant": "prv"}
    dp = {**done, "epsilon_target": 10.0, "epsilon_home": 9.5, "privacy": privacy}
    results = {
        "cgan": {**done, "evaluation": _evaluation(0.6)},
        "dp_eps10": {**dp, "evaluation": _evaluation(0.55)},
        "public_only": {
            **done,
            "evaluation": _evaluation(0.58),
            "epsilon_home": 0.0,
            "public_run": public.to_json(),
        },
        "dp_public_eps10": {**dp, "evaluation": _evaluation(0.65)},
        "dp_embedding_eps10": {**dp, "evaluation": _evaluation(0.58)},
    }
    record = build_record(ctx, results, 12.0)
    written = record.to_json()
    assert list(written)[-1] == "public_run" and written["public_run"]["sha256"] == "ab" * 32
    assert ReproduceRecord.from_json(json.loads(json.dumps(written))) == record
    rows = {r["experiment"].split(",")[0]: r for r in written["table"]}
    assert rows["5. DP-SGD cGAN"]["dp_minus_public"] == "−0.030"
    assert rows["6. DP-SGD from the public checkpoint"]["dp_minus_public"] == "+0.070"
    embedding = rows["6. DP mean embedding (one release)"]
    assert embedding["dp_minus_public"] == "+0.000" and embedding["epsilon"].startswith("9.50")
    assert "9.50 in the arm's own privacy home" in embedding["details"]
    only = rows["6. public checkpoint only: its own generator"]
    assert only["epsilon"] == "0 (public data only)" and "dp_minus_public" not in only
    assert "dp_minus_public" not in rows["2. cGAN (abnormality): TSTR"], "DP arms only"
    md = render_markdown(written)
    assert "| signal retained [95 % CI] | DP − public-only | ε | details |" in md
    assert "What DP contributes is the DP arm minus the public-only arm" in md


def test_a_table_row_and_a_budget_read_back_what_they_wrote():
    row = TableRow("e", "p", "o", "s", "d", "ε")
    assert TableRow.from_json(row.to_json()) == row
    for budget in BUDGETS.values():
        assert ReproduceBudget.from_json(json.loads(json.dumps(budget.to_json()))) == budget
