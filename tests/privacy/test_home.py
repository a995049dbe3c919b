"""The site's privacy home: where it is, its key, and patients named by keyed hash."""

from __future__ import annotations

import multiprocessing
import re
from pathlib import Path

import pytest

from fedspine.privacy.accounting import Mechanism
from fedspine.privacy.engine import PrivacyEngine
from fedspine.privacy.home import (
    ENV_VAR,
    PrivacyHome,
    PrivacyHomeError,
    default_home,
    resolve_home,
)
from tests.conftest import spend


def test_the_option_wins_then_the_variable_then_the_default(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "env"))
    assert resolve_home(tmp_path / "opt") == tmp_path / "opt"
    assert resolve_home(None) == tmp_path / "env"
    monkeypatch.delenv(ENV_VAR)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert resolve_home(None) == default_home() == tmp_path / "xdg" / "fedspine" / "privacy"


def test_patients_are_named_by_a_keyed_hash_that_survives_reopening(tmp_path) -> None:
    home = PrivacyHome(tmp_path / "home")
    keys = home.keys_of(["p1", "p2", "p1"])
    assert len(keys) == 2 and all(re.fullmatch(r"[0-9a-f]{32}", k) for k in keys)
    assert "p1" not in "".join(keys)
    assert PrivacyHome(tmp_path / "home").keys_of(["p2", "p1"]) == keys
    assert oct((tmp_path / "home" / "site.key").stat().st_mode & 0o777) == "0o600"
    # Another site's key names the same identifiers differently: the ledger links no one.
    assert PrivacyHome(tmp_path / "other").keys_of(["p1", "p2"]) != keys


def test_a_lost_key_beside_a_ledger_with_records_is_an_error_not_a_new_key(tmp_path) -> None:
    spend(tmp_path / "home", ["p1"], Mechanism(1.0, 0.1, 5))
    (tmp_path / "home" / "site.key").unlink()
    with pytest.raises(PrivacyHomeError, match="Restore the key"):
        PrivacyHome(tmp_path / "home").keys_of(["p1"])
    assert not (tmp_path / "home" / "site.key").exists()


def test_a_deleted_ledger_beside_its_key_is_an_error_not_a_fresh_budget(tmp_path) -> None:
    """Deleting ledger.json must not reset the site: the key says a ledger existed."""
    spend(tmp_path / "home", ["p1"], Mechanism(1.0, 0.1, 5))
    (tmp_path / "home" / "ledger.json").unlink()
    with pytest.raises(PrivacyHomeError, match="ledger.json is missing"):
        PrivacyEngine(["p1"], unit="patient", home=tmp_path / "home")
    assert not (tmp_path / "home" / "ledger.json").exists()


def test_an_empty_ledger_left_by_a_crash_on_first_use_gets_its_key(tmp_path) -> None:
    """The ledger is made before the key: a crash between them leaves an empty ledger, which
    names no one, so the next start may make the key."""
    from fedspine.privacy.ledger import PrivacyLedger

    PrivacyLedger.open(tmp_path / "home" / "ledger.json", create=True)
    assert len(PrivacyHome(tmp_path / "home").keys_of(["p1"])) == 1


def test_a_damaged_key_is_an_error(tmp_path) -> None:
    from fedspine.privacy.ledger import PrivacyLedger

    PrivacyLedger.open(tmp_path / "home" / "ledger.json", create=True)
    (tmp_path / "home" / "site.key").write_text("not hex\n")
    with pytest.raises(PrivacyHomeError, match="not a fedspine site key"):
        PrivacyHome(tmp_path / "home").keys_of(["p1"])


def test_a_file_is_not_a_home(tmp_path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(PrivacyHomeError, match="is a file"):
        PrivacyHome(tmp_path / "f")


def _keys(path: str, barrier, out) -> None:
    barrier.wait()
    out.put(PrivacyHome(path).keys_of(["p1"])[0])


def test_two_processes_starting_at_once_agree_on_one_key(tmp_path) -> None:
    context = multiprocessing.get_context("spawn")
    barrier, out = context.Barrier(2), context.Queue()
    workers = [
        context.Process(target=_keys, args=(str(tmp_path / "home"), barrier, out)) for _ in range(2)
    ]
    for w in workers:
        w.start()
    got = {out.get(timeout=120) for _ in workers}
    for w in workers:
        w.join(timeout=120)
    assert len(got) == 1
    names = sorted(p.name for p in Path(tmp_path / "home").iterdir())
    assert names == [".home.lock", "ledger.json", "ledger.json.lock", "site.key"]
