"""`prune --older-than` and MMOREF_PRUNE_AFTER: old log rows go in small batches, referrals,
anchors and counters stay exact, the space comes back, and a late retry of a pruned event
still cannot count twice."""
from __future__ import annotations

import time

import pytest

import mmoref_server as mm
from tests.support import IngestLoad
from tests.support import add_server
from tests.support import assert_one_error_line
from tests.support import database
from tests.support import mint_tokens
from tests.support import rows
from tests.support import scalar
from tests.support import send_ok

pytestmark = pytest.mark.both_engines  # the same on SQLite and on PostgreSQL

DAY = 86400
COUNTERS = "SELECT * FROM daily_counts ORDER BY 1, 2"


def test_prune_deletes_only_old_log_rows_and_keeps_referrals_anchors_and_counters(kit, store, clock, db_path,
                                                                                  runner):
    old = kit.token("alice")
    send_ok(kit, "registered", old, "reg-old")
    kit.post(b"{not json")                                      # an old rejected request
    clock.t += 200 * DAY
    recent = kit.token("bob")
    send_ok(kit, "registered", recent, "reg-new", referee_identity="player-2")
    before = {table: rows(db_path, f"SELECT * FROM {table} ORDER BY 1")
              for table in ("referrals", "anchors", "daily_counts", "referrer_counts", "event_counts")}

    result = runner("prune", "--older-than", "180d", "--json")

    assert result.exit_code == 0, result.stderr
    assert result.json()["deleted"] == {"delivery_log": 1, "rejected_requests": 1}
    assert rows(db_path, "SELECT server_event_id FROM delivery_log") == [("reg-new",)]
    assert scalar(db_path, "SELECT count(*) FROM rejected_requests") == 0
    assert {table: rows(db_path, f"SELECT * FROM {table} ORDER BY 1") for table in before} == before
    assert runner("prune", "--older-than", "180d", "--json").json()["deleted"] == {
        "delivery_log": 0, "rejected_requests": 0}


@pytest.mark.parametrize("event, then", [("registered", "registered"), ("qualified", "qualified")])
def test_a_very_late_retry_of_a_pruned_event_is_a_no_op(kit, store, clock, db_path, runner, event, then):
    token = kit.token("alice")
    registered = send_ok(kit, "registered", token, "reg-1")
    if event == "qualified":
        send_ok(kit, "qualified", token, "qual-1")
    counters = rows(db_path, COUNTERS)
    clock.t += 365 * DAY
    assert runner("prune", "--older-than", "180d").exit_code == 0
    assert scalar(db_path, "SELECT count(*) FROM delivery_log") == 0   # the idempotency keys are gone

    retry = send_ok(kit, event, token, "reg-1" if event == "registered" else "qual-1")

    assert retry == {"ok": True, "referral_id": registered["referral_id"], "state": then}
    assert rows(db_path, "SELECT event, outcome FROM delivery_log") == [(event, "no_op")]
    assert rows(db_path, COUNTERS) == counters
    assert scalar(db_path, "SELECT state FROM referrals WHERE referral_id = ?", registered["referral_id"]) == then


@pytest.mark.sqlite_only  # SQLite's file size
def test_prune_gives_the_space_back(store, clock, db_path, runner):
    add_server(store)
    with database(db_path) as db:   # 20,000 old log rows with 500-byte payloads, written directly
        db.executemany("INSERT INTO delivery_log (server_id, referral_id, event, outcome, received_at, payload)"
                       " VALUES ('srv_robust', 'ref_x', 'registered', 'advanced', ?, ?)",
                       [(clock.t - 400 * DAY, "x" * 500) for _ in range(20_000)])
    store.connect().execute("PRAGMA wal_checkpoint(TRUNCATE)")
    grown = scalar(db_path, "PRAGMA page_count")

    result = runner("prune", "--older-than", "30d", "--json").json()

    assert result["deleted"]["delivery_log"] == 20_000 and result["space_reclaimed"] is True
    assert result["bytes_after"] < result["bytes_before"] - 10_000_000
    assert scalar(db_path, "PRAGMA page_count") < grown / 10
    assert scalar(db_path, "PRAGMA freelist_count") == 0


@pytest.mark.parametrize("bad", ["180", "5x", "0d", "-3h", "d"])
def test_a_bad_age_is_one_clear_line(runner, bad):
    result = runner("prune", "--older-than", bad)
    assert_one_error_line(result.exit_code, result.stderr, "--older-than", "180d, 12h, 30m or 3600s")


def test_durations_and_the_setting():
    assert [mm.parse_duration(raw) for raw in ("180d", "12h", "30m", "3600s", " 2D ")] == [
        180 * DAY, 12 * 3600, 1800, 3600, 2 * DAY]
    assert mm.load_settings({})["MMOREF_PRUNE_AFTER"] is None   # off by default
    assert mm.load_settings({"MMOREF_PRUNE_AFTER": "90d"})["MMOREF_PRUNE_AFTER"] == 90 * DAY
    with pytest.raises(mm.ConfigError, match=r"MMOREF_PRUNE_AFTER='soon' is not valid: expected a duration like"):
        mm.load_settings({"MMOREF_PRUNE_AFTER": "soon"})


@pytest.mark.sqlite_only  # reads the SQLite file
@pytest.mark.slow
def test_the_server_prunes_at_start_up_when_the_setting_is_on(live_server, kit, db_path):
    send_ok(kit, "registered", kit.token("alice"), "reg-old")
    with database(db_path) as db:
        db.execute("UPDATE delivery_log SET received_at = received_at - 100 * 86400")
    send_ok(kit, "registered", kit.token("bob"), "reg-new", referee_identity="player-2")

    server = live_server(env={"MMOREF_PRUNE_AFTER": "30d"})
    pruned = "pruned rows older than 2592000 s: {'delivery_log': 1, 'rejected_requests': 0}"
    deadline = time.monotonic() + 20
    while pruned not in server.output():
        assert time.monotonic() < deadline, server.output()
        time.sleep(0.1)

    assert rows(db_path, "SELECT server_event_id FROM delivery_log") == [("reg-new",)]


@pytest.mark.sqlite_only  # reads the SQLite file
@pytest.mark.slow
def test_prune_while_the_server_takes_events_loses_none(live_server, store, db_path, runner):
    secret = add_server(store)
    with database(db_path) as db:
        db.executemany("INSERT INTO delivery_log (server_id, referral_id, event, outcome, received_at, payload)"
                       " VALUES ('srv_robust', 'ref_x', 'registered', 'advanced', 1, ?)",
                       [("x" * 300,) for _ in range(30_000)])
    tokens = mint_tokens(store, [f"code{i}" for i in range(300)])
    server = live_server()

    with IngestLoad(server.port, secret, tokens) as load:
        load.wait_for(20)
        result = runner("prune", "--older-than", "1d", "--json")
        load.wait_for(len(tokens), seconds=60)

    assert result.exit_code == 0 and result.json()["deleted"]["delivery_log"] == 30_000
    assert sorted(status for _, _, status, _ in load.answers) == [200] * len(tokens)
    assert scalar(db_path, "SELECT count(*) FROM delivery_log") == len(tokens)
    slowest = max(latency for _, _, _, latency in load.answers)
    assert slowest < 5, f"an event waited {slowest:.2f} s for the prune"
