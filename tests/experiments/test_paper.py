"""The paper's seven errors as data: each names arms a budget plans, each gets a note."""

from __future__ import annotations

from fedspine.experiments.budgets import get_budget
from fedspine.experiments.paper import PAPER, PAPER_ERRORS, error_notes
from fedspine.experiments.plan import ArmKind, make_plan


def test_seven_errors_each_with_a_correction():
    assert len(PAPER_ERRORS) == 7
    assert len({e.error for e in PAPER_ERRORS}) == 7
    for error in PAPER_ERRORS:
        assert error.fedspine_does.startswith("Corrected: ")
        assert error.demonstrated_by and all(isinstance(k, ArmKind) for k in error.demonstrated_by)


def test_every_error_names_arms_the_full_budget_plans(tmp_path):
    plan = make_plan(tmp_path, tmp_path / "o", "full")
    planned = {a.kind for a in plan.arms}
    running = {a.kind for a in plan.arms if not a.not_run}
    for error in PAPER_ERRORS:
        assert set(error.demonstrated_by) <= planned, error.error
        if plan.spinegan[0]:
            assert set(error.demonstrated_by) <= running, error.error


def test_the_notes_follow_the_errors_and_say_what_this_run_did():
    budget = get_budget("quick")
    nothing = error_notes(budget, {}, {})
    assert [n.error for n in nothing] == [e.error for e in PAPER_ERRORS]
    assert "? decoded, ? rejected" in nothing[1].here
    assert nothing[4].here.startswith("Not exercised in this run (SpineGAN arm: not run)")
    assert nothing[5].here.startswith("Not exercised in this run: no DP arm completed")
    assert nothing[6].here.startswith("Not exercised (no SpineGAN arm ran)")
    static = [e for e in PAPER_ERRORS if e.note is None]
    assert {e.error for e in static} <= {n.error for n in nothing}
    for error, note in zip(PAPER_ERRORS, nothing, strict=True):
        if error.note is None:
            assert note.here == error.fedspine_does

    results = {
        "spinegan": {"status": "done"},
        "dp_spinegan": {"status": "done", "privacy": {"epsilon": 9.5}},
        "dp_eps3": {"status": "done", "epsilon_target": 3.0, "privacy": {"epsilon": 2.98}},
        "dp_eps3-seed1": {"status": "done", "epsilon_target": 3.0, "privacy": {"epsilon": 2.9}},
    }
    info = {"abnormality": {"images": 120, "rejected": 2}}
    notes = error_notes(budget, results, info)
    assert "120 decoded, 2 rejected" in notes[1].here
    assert notes[4].here.startswith("Corrected: SpineGAN's frozen classifier")
    assert "target 3 → spent 2.98" in notes[5].here and "2.90" not in notes[5].here
    assert notes[6].here.startswith("Corrected in the `dp_spinegan` arm")
    assert "ε = 9.50 covers both" in notes[6].here


def test_the_published_numbers_name_their_source():
    assert PAPER["cgan_tstr"] == "0.814" and PAPER["spinegan_tstr"] == "0.830"
    assert all(isinstance(v, str) and v for v in PAPER.values())
