"""Races across 4 gunicorn workers sharing one database file (docs/contract.md §2: UNIQUE + BEGIN IMMEDIATE)."""
from __future__ import annotations

import collections
import re
import sys
import time

import pytest

from tests.support import REFEREE
from tests.support import SERVER_ID
from tests.support import add_server
from tests.support import event_body
from tests.support import gunicorn_command
from tests.support import log_rows_for
from tests.support import mint_tokens
from tests.support import poster
from tests.support import race
from tests.support import referral_id_of
from tests.support import rows
from tests.support import scalar

if sys.platform == "win32":
    pytest.skip("gunicorn runs on POSIX only", allow_module_level=True)
pytest.importorskip("gunicorn", reason="gunicorn is not installed (pip install gunicorn)")

pytestmark = [pytest.mark.slow, pytest.mark.both_engines]

WORKERS = 4
GUNICORN = gunicorn_command(workers=WORKERS)


@pytest.fixture
def workers(live_server, store):
    """(server, secret): gunicorn with WORKERS processes on the test's database file."""
    secret = add_server(store)
    server = live_server(command=GUNICORN)
    deadline = time.monotonic() + 20
    while len(re.findall(r"Booting worker with pid", server.output())) < WORKERS:
        assert time.monotonic() < deadline, f"gunicorn did not boot {WORKERS} workers:\n{server.output()}"
        time.sleep(0.1)
    yield server, secret
    output = server.stop()
    assert "Traceback" not in output, output


def test_identical_deliveries_are_logged_once(workers, store, db_path):
    server, secret = workers
    token = mint_tokens(store, ["alice"])[0]
    body = event_body("registered", token, "reg-1")

    answers = race(server.port, [poster(secret, body)] * 100)

    assert collections.Counter(status for status, _ in answers) == {200: 100}
    bodies = [answer for _, answer in answers]
    assert bodies.count({"ok": True, "duplicate": True}) == 99
    advanced = [b for b in bodies if b != {"ok": True, "duplicate": True}]
    assert advanced == [{"ok": True, "referral_id": referral_id_of(store, token), "state": "registered"}]
    assert log_rows_for(db_path, referral_id_of(store, token), "registered", "reg-1") == 1
    assert scalar(db_path, "SELECT count(*) FROM delivery_log") == 1


def test_referrers_racing_for_one_referee_make_one_anchor(workers, store, db_path):
    server, secret = workers
    codes = [f"referrer{i}" for i in range(20)]
    tokens = mint_tokens(store, codes)
    bodies = [event_body("registered", token, f"reg-{i}") for i, token in enumerate(tokens)]

    answers = race(server.port, [poster(secret, body) for body in bodies])

    assert [status for status, _ in answers] == [200] * 20
    conflicts = [b for _, b in answers if b == {"ok": True, "ignored": "first_touch_conflict"}]
    winners = [b for _, b in answers if b.get("state") == "registered"]
    assert len(conflicts) == 19 and len(winners) == 1
    assert rows(db_path, "SELECT referral_id FROM anchors WHERE server_id = ? AND referee_identity = ?",
                 SERVER_ID, REFEREE) == [(winners[0]["referral_id"],)]
    assert rows(db_path, "SELECT state, count(*) FROM referrals GROUP BY state ORDER BY state") == [
        ("clicked", 19), ("registered", 1)]
    assert rows(db_path, "SELECT outcome, count(*) FROM delivery_log GROUP BY outcome ORDER BY outcome") == [
        ("advanced", 1), ("first_touch_conflict", 19)]


RACE_ROUNDS = 100        # at most this many rounds ...
RACE_SECONDS = 120      # ... and this long, to see both orders happen


def race_registered_against_qualified(server, secret, store, db_path, round_: int) -> int:
    """One round: a fresh referral gets `registered` and `qualified` at once; check it ended consistent.

    Returns the qualified event's status: 200 when it landed after the registration, 422 before it.
    """
    token = mint_tokens(store, [f"racer{round_}"])[0]
    referral_id = referral_id_of(store, token)
    registered = event_body("registered", token, "reg", referee=f"player-{round_}")
    qualified = event_body("qualified", token, "qual")

    (reg_status, reg_body), (qual_status, qual_body) = race(
        server.port, [poster(secret, registered), poster(secret, qualified)])

    assert (reg_status, reg_body) == (200, {"ok": True, "referral_id": referral_id, "state": "registered"})
    state = scalar(db_path, "SELECT state FROM referrals WHERE referral_id = ?", referral_id)
    assert log_rows_for(db_path, referral_id, "registered", "reg") == 1
    if qual_status == 200:
        assert qual_body == {"ok": True, "referral_id": referral_id, "state": "qualified"}
        assert state == "qualified"
        assert log_rows_for(db_path, referral_id, "qualified", "qual") == 1
    else:
        assert (qual_status, qual_body["error"], qual_body["state"]) == (422, "invalid transition", "clicked")
        assert state == "registered"
        assert log_rows_for(db_path, referral_id, "qualified", "qual") == 0
    return qual_status


def test_registered_and_qualified_racing_end_consistent_in_both_orders(workers, store, db_path):
    """Both orders must actually happen: a race that always lands one way proves nothing about the other."""
    server, secret = workers
    outcomes = collections.Counter()
    deadline = time.monotonic() + RACE_SECONDS
    for round_ in range(RACE_ROUNDS):
        outcomes[race_registered_against_qualified(server, secret, store, db_path, round_)] += 1
        if set(outcomes) == {200, 422} or time.monotonic() > deadline:
            break
    assert set(outcomes) == {200, 422}, f"only one order happened in {sum(outcomes.values())} rounds: {outcomes}"
