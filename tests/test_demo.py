"""`python mmoref_server.py demo PATH` and the committed referrals.db.example."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

import mmoref_server as mm
from tests.support import PYTHON
from tests.support import SERVER_SCRIPT
from tests.support import database
from tests.support import rows
from tests.support import send

EXAMPLE = SERVER_SCRIPT.parent / "referrals.db.example"
ALL_STATES = {"clicked", "registered", "qualified", "reversed", "expired", "rejected"}


@pytest.fixture(scope="module")
def demo_db(tmp_path_factory) -> Path:
    """One demo database written by a real `demo` process (read-only for the tests)."""
    path = tmp_path_factory.mktemp("demo") / "demo.db"
    completed = subprocess.run([PYTHON, str(SERVER_SCRIPT), "demo", str(path)],
                               capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr
    assert str(path) in completed.stdout
    assert not Path(f"{path}-wal").exists() and not Path(f"{path}-shm").exists()
    return path


def schema(path: Path) -> tuple[int, list[tuple]]:
    """(user_version, every CREATE statement), without creating -wal/-shm files."""
    with database(path, read_only=True) as db:
        version = db.execute("PRAGMA user_version").fetchone()[0]
        statements = db.execute("SELECT type, name, sql FROM sqlite_master ORDER BY type, name").fetchall()
    return version, statements


def test_one_demo_server(demo_db):
    assert rows(demo_db, "SELECT server_id, game, referrals_enabled FROM servers") == [
        (mm.DEMO_SERVER_ID, mm.DEMO_GAME, 1)]


def test_the_demo_secret_verifies(demo_db, tmp_path):
    copy = tmp_path / "copy.db"
    shutil.copy(demo_db, copy)
    client = mm.create_app({"MMOREF_DB": str(copy), "TESTING": True}).test_client()

    def dry_run(secret: str):
        return send(client, secret, "registered", "tok", mm.DEMO_SERVER_ID, "e-1", referee_identity="p", test=True)

    accepted = dry_run(mm.DEMO_SECRET)
    assert (accepted.status_code, accepted.json) == (200, {"ok": True, "test": True})
    refused = dry_run("not-the-demo-secret")
    assert (refused.status_code, refused.json["reason"]) == (401, "mac_mismatch")


def test_referrals_in_every_state(demo_db):
    assert {state for (state,) in rows(demo_db, "SELECT state FROM referrals")} == ALL_STATES


def test_delivery_log_rows(demo_db):
    outcomes = {outcome for (outcome,) in rows(demo_db, "SELECT outcome FROM delivery_log")}
    assert {"advanced", "first_touch_conflict", "owner_action"} <= outcomes


def test_rejected_requests_per_server_and_installation_wide(demo_db):
    per_server = rows(demo_db, "SELECT status, error FROM rejected_requests WHERE server_id = ?", mm.DEMO_SERVER_ID)
    assert {status for status, _ in per_server} >= {401, 404, 422}
    installation_wide = rows(demo_db, "SELECT status FROM rejected_requests WHERE server_id IS NULL")
    assert installation_wide  # the request whose body names no server


def test_committed_example_matches_a_fresh_demo(demo_db):
    assert EXAMPLE.is_file(), "generate it: python3 mmoref_server.py demo referrals.db.example --force"
    version, statements = schema(EXAMPLE)
    assert version == mm.SCHEMA_VERSION
    assert (version, statements) == schema(demo_db)
    with database(EXAMPLE, read_only=True) as db:
        assert db.execute("SELECT server_id FROM servers").fetchall() == [(mm.DEMO_SERVER_ID,)]
        assert {state for (state,) in db.execute("SELECT state FROM referrals")} == ALL_STATES


def test_committed_example_has_no_wal_leftovers():
    assert not [p.name for p in EXAMPLE.parent.glob(EXAMPLE.name + "-*")]
