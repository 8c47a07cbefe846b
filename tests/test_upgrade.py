"""Upgrading from the previous release: a database mmoref 1.0.0 wrote (schema v3) migrates when the
current server starts, with every row kept, its keys, secrets and tokens still working; a
database newer than the code is refused with one error line."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

import mmoref_server as mm
from tests.support import PYTHON
from tests.support import SERVER_SCRIPT
from tests.support import HttpClient
from tests.support import assert_one_error_line
from tests.support import database
from tests.support import free_port
from tests.support import rows
from tests.support import scalar

pytestmark = pytest.mark.slow

PREVIOUS_RELEASE_SCHEMA = 3   # mmoref 1.0.0
# The released migrations never change (a database already ran them): their SQL, pinned.
RELEASED_MIGRATIONS_SHA256 = "51e9ab8b327717d93d2d1c545afb7f4c5924d8680306c761a80db1cb259561ea"
T = 1_790_000_000             # when 1.0.0 wrote these rows
SERVER, SECRET, KID = "srv_old", "old-secret-0123456789abcdef", "kid_old"
TOKEN_KEY = "token-key-of-the-old-installation"

# Rows as 1.0.0 wrote them, table by table, in its column order.
OLD_ROWS: dict[str, list[tuple]] = {
    "meta": [("token_key", TOKEN_KEY), ("session_key", "session-key-old"), ("ip_salt", "ip-salt-old"),
             ("admin_password_hash", "scrypt:32768:8:1$salt$0123abcd")],
    "servers": [(SERVER, "oldgame", "Old Server", "https://old.example/register", "username", 1, T)],
    "secrets": [(KID, SERVER, SECRET, T, None), ("kid_gone", SERVER, "revoked-secret-xyz", T - 99, T - 1)],
    "referrals": [("ref_1", SERVER, "alice", "registered", "player-1", T, T + 60, "iphash1", "Mozilla/5.0", None),
                  ("ref_2", SERVER, "bob", "clicked", None, T + 5, T + 5, None, None, None)],
    "anchors": [(SERVER, "player-1", "ref_1", T + 60)],
    "delivery_log": [(1, SERVER, "ref_1", "ref_1", "registered", "reg-1", "advanced", T + 60,
                      '{"event": "registered"}', "alice", T + 59)],
    "rejected_requests": [(1, SERVER, 401, "bad_signature", "mac_mismatch", "use the secret", None, "{…}", T + 70)],
    "daily_counts": [(SERVER, "2026-09-21", 2, 1, 0, 0)],
    "referrer_counts": [(SERVER, "alice", 1, 1, 0, 0), (SERVER, "bob", 1, 0, 0, 0)],
}


def released_migrations_digest() -> str:
    return hashlib.sha256(json.dumps(mm.MIGRATIONS[:PREVIOUS_RELEASE_SCHEMA]).encode()).hexdigest()


def write_previous_release_database(path: str) -> None:
    """Schema v3 from the released migrations, filled with OLD_ROWS."""
    with database(path) as db:
        for migration in mm.MIGRATIONS[:PREVIOUS_RELEASE_SCHEMA]:
            for statement in migration:
                db.execute(statement)
        for table, table_rows in OLD_ROWS.items():
            marks = ", ".join("?" * len(table_rows[0]))
            db.executemany(f"INSERT INTO {table} VALUES ({marks})", table_rows)
        db.execute(f"PRAGMA user_version = {PREVIOUS_RELEASE_SCHEMA}")


def old_columns_of(path: str, table: str) -> list[tuple]:
    """The table's rows, only the columns 1.0.0 had (a migration may add more), sorted."""
    count = len(OLD_ROWS[table][0])
    columns = [row[1] for row in rows(path, f"PRAGMA table_info({table})")][:count]
    return sorted(rows(path, f"SELECT {', '.join(columns)} FROM {table}"), key=repr)


def test_the_released_migrations_are_unchanged():
    assert released_migrations_digest() == RELEASED_MIGRATIONS_SHA256


def test_a_previous_release_database_migrates_on_start_with_nothing_lost(live_server, db_path):
    write_previous_release_database(db_path)
    server = live_server()   # healthy: the schema was migrated at start-up
    assert scalar(db_path, "PRAGMA user_version") == mm.SCHEMA_VERSION
    for table, old in OLD_ROWS.items():
        now_there = old_columns_of(db_path, table)
        assert set(old) <= set(now_there), table   # every old row, unchanged
        if table != "meta":                       # where a new release may add installation keys
            assert len(now_there) == len(old), table

    # the old key still reads the old tokens, the old secret still signs: ref_1 qualifies
    client = HttpClient(server.port)
    try:
        body = mm.build_body("qualified", mm.mint_token(TOKEN_KEY, SERVER, "ref_1", T), SERVER, "q-1")
        status, answer = client.post_event(SECRET, body)
    finally:
        client.close()
    assert status == 200, answer
    assert (answer["state"], answer["referral_id"]) == ("qualified", "ref_1")


def test_a_database_newer_than_the_code_is_refused_with_one_line(tmp_path: Path, db_path):
    write_previous_release_database(db_path)
    with database(db_path) as db:
        db.execute(f"PRAGMA user_version = {mm.SCHEMA_VERSION + 1}")
    env = {**os.environ, "MMOREF_PORT": str(free_port()), "MMOREF_DB": db_path}
    result = subprocess.run([PYTHON, str(SERVER_SCRIPT)], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=30)
    assert_one_error_line(result.returncode, result.stderr, f"schema v{mm.SCHEMA_VERSION + 1}",
                          "upgrade mmoref_server.py")
    assert scalar(db_path, "PRAGMA user_version") == mm.SCHEMA_VERSION + 1
    assert old_columns_of(db_path, "servers") == OLD_ROWS["servers"]
