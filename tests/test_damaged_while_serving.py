"""Issue 8.11: a database damaged in the middle while the real server runs. Once a request has
hit the damage, /healthz must stop saying 200 and name the cause (`malformed`) quickly."""
from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from tests.support import add_server
from tests.support import event_body
from tests.support import mint_tokens
from tests.test_storage_faults import PAGE
from tests.test_storage_faults import post
from tests.test_storage_faults import timed_healthz

DAMAGED_PAGES = 3


def damage_pages(db_path: str) -> None:
    """Checkpoint the WAL into the file, then overwrite a few pages in its middle (header kept): from
    the referrals table's first page on, which every event reads."""
    with sqlite3.connect(db_path) as db:
        assert db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0] == 0  # 0: not blocked
        first_damaged_page = db.execute("SELECT rootpage FROM sqlite_master WHERE name = 'referrals'").fetchone()[0]
    assert os.stat(db_path).st_size > (first_damaged_page + DAMAGED_PAGES) * PAGE
    with open(db_path, "r+b") as file:
        file.seek((first_damaged_page - 1) * PAGE)
        file.write(b"garbage!" * (PAGE // 8) * DAMAGED_PAGES)


def test_healthz_says_malformed_once_a_request_hit_the_damage(store, db_path, live_server):
    secret = add_server(store)
    tokens = mint_tokens(store, [f"code{i}" for i in range(400)])
    store.close()
    server = live_server()
    assert post(server.port, secret, event_body("registered", tokens[0], "reg-0", referee="p0"))[0] == 200

    damage_pages(db_path)
    answers = [post(server.port, secret, event_body("registered", token, f"reg-{i}", referee=f"p{i}"))[:2]
               for i, token in enumerate(tokens[1:40:3], start=1)]
    seconds, status, health = timed_healthz(server.port)

    assert {status for status, _ in answers} != {200}, answers  # the requests did reach the damage
    assert (status, health["ok"], health.get("reason")) == (503, False, "malformed"), health
    assert "is damaged" in health["hint"] and "restore a backup" in health["hint"]
    assert seconds < 1.5


def test_a_refusal_that_cannot_be_recorded_is_one_warning_line(store, db_path, live_server):
    """The database deleted while serving: requests signed with a wrong secret still get their 401
    (the open connections still read the unlinked file), and each refusal the list cannot keep is
    one log line, not a traceback."""
    secret = add_server(store)
    [token] = mint_tokens(store, ["alice"])
    store.close()
    server = live_server(env={"MMOREF_THREADS": "1"})   # the one request thread has its connection open
    assert post(server.port, secret, event_body("registered", token, "reg-0"))[0] == 200
    for suffix in ("", "-wal", "-shm"):
        Path(db_path + suffix).unlink()

    answers = [post(server.port, "wrong-secret", event_body("registered", token, f"reg-{i}"))[:2] for i in (1, 2)]

    assert [(status, body["error"], body["reason"]) for status, body in answers] == [
        (401, "bad_signature", "mac_mismatch")] * 2
    output = server.stop()
    assert "Traceback" not in output
    warnings = [line for line in output.splitlines() if "could not record a rejected request" in line]
    assert len(warnings) == 2, output
    assert all(" WARNING mmoref: " in line and "was deleted while the server was running" in line
               for line in warnings), warnings
