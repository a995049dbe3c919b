"""The privacy records the renderers read: round trips, the real writer, and older files."""

from __future__ import annotations

import json

import pytest

from fedspine.privacy.report import build_report, site_entry, write_privacy_summary
from fedspine.reporting import privacy_records
from fedspine.reporting.privacy_records import (
    PrivacyReport,
    PrivacySummary,
    read_privacy_record,
)
from fedspine.reporting.tables import privacy_site_table
from tests.evaluation.test_records import filled

RECORD_TYPES = [
    privacy_records.MechanismRecord,
    privacy_records.RoundEpsilon,
    privacy_records.PhaseSpend,
    privacy_records.SitePrivacy,
    PrivacySummary,
    PrivacyReport,
]
MECH = {"noise_multiplier": 1.1, "sample_rate": 0.2, "steps": 8, "clip_norm": 1.0, "label": "d"}


@pytest.mark.parametrize("cls", RECORD_TYPES, ids=lambda c: c.__name__)
def test_every_privacy_record_round_trips_through_json(cls):
    record = filled(cls)
    data = json.loads(json.dumps(record.to_json()))
    assert cls.from_json(data) == record
    assert cls.from_json(data).to_json() == data


def write_run(run, phases=None):
    site = site_entry(
        4.5,
        1e-5,
        [MECH, {**MECH, "noise_multiplier": 1.3}],
        unit="patient",
        patients=60,
        epsilon_per_round=[{"round": 1, "epsilon": 2.0}, {"round": 2, "epsilon": 4.5}],
    )
    sites = {"site_1": site, "site_2": {**site, "phases": phases} if phases else site}
    write_privacy_summary(run, sites, {"discriminator": "DP-SGD"}, accountant="prv")


def test_a_summary_written_by_the_engine_reads_back_unchanged(tmp_path):
    write_run(tmp_path)
    written = json.loads((tmp_path / "privacy.json").read_text())
    record = read_privacy_record(tmp_path)
    assert record.to_json() == written
    assert record.sites["site_1"].steps == 16 and record.private is True


def test_the_privacy_report_content_reads_back_unchanged(tmp_path):
    write_run(tmp_path)
    public = {k: v for k, v in build_report(tmp_path).items() if not k.startswith("_")}
    record = PrivacyReport.from_json(public)
    assert record.to_json() == json.loads(json.dumps(public))
    assert record.overall_epsilon == pytest.approx(4.5)


def test_one_site_table_with_phases_and_distinct_settings(tmp_path):
    phases = {"classifier": {"epsilon": 1.5, "steps": 4}, "gan": {"epsilon": 4.0, "steps": 12}}
    write_run(tmp_path, phases)
    header, rows = privacy_site_table(read_privacy_record(tmp_path))
    assert header[:5] == ["site", "ε (total)", "classifier ε", "GAN ε", "δ"]
    assert rows[0] == ["site_1", "4.500", "-", "-", "1e-05", "1.1, 1.3", "1", "0.2", "16", "yes"]
    assert rows[1][2:4] == ["1.500 (4 steps)", "4.000 (12 steps)"]


def test_a_hand_written_summary_with_odd_sites_still_reads():
    record = PrivacySummary.from_json({"sites": {"a": {"epsilon": 1.0}, "b": "not a site"}})
    assert list(record.sites) == ["a"] and record.sites["a"].mechanisms is None
    header, rows = privacy_site_table(record)
    assert header[1] == "ε" and rows == [["a", "1.000", "n/a", "-", "-", "-", "0", "NO"]]
