"""Property tests of privacy composition: adding a mechanism never lowers ε, neither in the
accountant (fedspine.privacy.accounting) nor for any patient of a site's ledger
(fedspine.privacy.ledger). RDP (the planning accountant) keeps them fast; the others are
checked against it in test_accounting.py."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from fedspine.privacy.accounting import PLAN_ACCOUNTANT, Mechanism, epsilon, merge_mechanisms
from fedspine.privacy.ledger import PrivacyLedger

FAST = settings(max_examples=40, deadline=None, database=None)
DELTA = 1e-5
PATIENTS = ("p1", "p2", "p3", "p4")

MECHANISMS = st.builds(
    Mechanism,
    # A few (σ, q) pairs, so the accountant's per-(σ, q) cache keeps the examples fast.
    noise_multiplier=st.sampled_from([0.6, 1.0, 1.7, 4.0]),
    sample_rate=st.sampled_from([0.004, 0.1, 1.0]),
    steps=st.integers(0, 300),
    label=st.sampled_from(["", "gan-discriminator", "clinical-classifier"]),
)
COHORTS = st.sets(st.sampled_from(PATIENTS), min_size=1).map(sorted)


@FAST
@given(prior=st.lists(MECHANISMS, max_size=5), new=MECHANISMS)
def test_adding_a_mechanism_never_lowers_epsilon(prior: list[Mechanism], new: Mechanism) -> None:
    before = epsilon(prior, DELTA, PLAN_ACCOUNTANT)
    after = epsilon([*prior, new], DELTA, PLAN_ACCOUNTANT)
    assert after >= before >= 0.0
    if new.steps == 0:
        assert after == before


@FAST
@given(mechanisms=st.lists(MECHANISMS, max_size=5), data=st.data())
def test_composition_does_not_depend_on_order(mechanisms: list[Mechanism], data) -> None:
    shuffled = data.draw(st.permutations(mechanisms))
    ordered = epsilon(mechanisms, DELTA, PLAN_ACCOUNTANT)
    assert abs(epsilon(shuffled, DELTA, PLAN_ACCOUNTANT) - ordered) <= 1e-9 * max(1.0, ordered)
    merged = merge_mechanisms(mechanisms)
    assert sum(m.steps for m in merged) == sum(m.steps for m in mechanisms)
    assert all(m.steps > 0 for m in merged)


@settings(max_examples=15, deadline=None, database=None)
@given(records=st.lists(st.tuples(COHORTS, MECHANISMS), min_size=1, max_size=4))
def test_no_patient_spends_less_after_a_record_is_added(records) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        ledger = PrivacyLedger.open(Path(tmp) / "ledger.json")
        spent = {p: 0.0 for p in PATIENTS}
        for index, (cohort, mechanism) in enumerate(records):
            decision = ledger.check_cap(cohort, mechanism, DELTA, cap=1e6)
            assert decision.projected >= decision.spent
            record = ledger.reserve(cohort, mechanism, f"run-{index}", 1.0, unit="patient")
            ledger.settle(record, mechanism.steps)
            for patient in PATIENTS:
                now = ledger.spent([patient], DELTA, PLAN_ACCOUNTANT)
                assert now >= spent[patient]
                if patient not in cohort:
                    assert now == spent[patient]
                spent[patient] = now
            # The worst of a group is its worst member.
            assert ledger.spent(list(PATIENTS), DELTA, PLAN_ACCOUNTANT) == max(spent.values())
