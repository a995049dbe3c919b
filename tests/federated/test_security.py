"""Certificates and site keys (fedspine.federated.security)."""

from __future__ import annotations

import datetime as dt

import pytest

from fedspine.federated.security import (
    EXPIRY_WARNING_DAYS,
    certificate_expiry,
    make_server_certificates,
)


def test_certificate_expiry_reads_the_certificate_and_warns_30_days_ahead(tmp_path):
    certs = make_server_certificates(tmp_path / "certs", hosts=["coordinator.example"], days=825)
    now = dt.datetime.now(dt.UTC)
    fresh = certificate_expiry(certs.server_cert, now=now)
    assert 824 < fresh.days_left <= 825
    assert fresh.warning is None and not fresh.expired

    soon = certificate_expiry(certs.server_cert, now=fresh.not_after - dt.timedelta(days=10))
    assert soon.warning is not None and "10 days left" in soon.warning
    edge = dt.timedelta(days=EXPIRY_WARNING_DAYS + 1)
    assert certificate_expiry(certs.server_cert, now=fresh.not_after - edge).warning is None

    late = certificate_expiry(certs.server_cert, now=fresh.not_after + dt.timedelta(days=1))
    assert late.expired and "expired" in late.warning


def test_certificate_expiry_names_an_unreadable_file(tmp_path):
    bad = tmp_path / "server.crt"
    bad.write_text("not a certificate")
    with pytest.raises(ValueError, match="server.crt: not a readable PEM certificate"):
        certificate_expiry(bad)
