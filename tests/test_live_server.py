"""Real server processes on 127.0.0.1: the no-argument start, and races under real concurrency."""
from __future__ import annotations

import collections
import json
from pathlib import Path
from typing import Any

import pytest

import mmoref_server as mm
from tests.support import INGEST
from tests.support import LOOPBACK_HEX
from tests.support import PYTHON
from tests.support import SERVER_SCRIPT
from tests.support import listening_addresses
from tests.support import poster
from tests.support import race
from tests.support import rows

pytestmark = pytest.mark.slow

SERVER = "srv_race"


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads the bound address from Linux's /proc/net/tcp")
def test_no_arguments_serves_on_loopback_only_with_referrals_db_in_cwd(live_server, tmp_path):
    # the autouse fixture removed every MMOREF_* but the port set here; no --host, no MMOREF_HOST
    server = live_server(db_path=None, cwd=tmp_path, command=[PYTHON, str(SERVER_SCRIPT)],
                         env={"MMOREF_PORT": "{port}"})

    assert listening_addresses(server.port) == {LOOPBACK_HEX}   # 127.0.0.1 only: not 0.0.0.0, not ::
    assert (tmp_path / "referrals.db").is_file()
    output = server.stop()
    assert f"POST http://127.0.0.1:{server.port}{INGEST}" in output
    assert str(tmp_path / "referrals.db") in output
    assert f"curl -i http://127.0.0.1:{server.port}{INGEST}" in output
    assert f"http://127.0.0.1:{server.port}/dashboard" in output


@pytest.fixture
def prepared(db_path) -> Any:
    """prepared(n) -> (secret, [(token, referral_id)] for n different referrers), written before the server runs."""
    def prepare(referrers: int) -> tuple[str, list[tuple[str, str]]]:
        store = mm.open_store(db_path)
        secret, _ = store.add_server(SERVER, "g", "", "https://game.example/join")
        minted = [store.mint_referral(SERVER, f"referrer{number}") for number in range(referrers)]
        store.close()
        return secret, minted
    return prepare


def test_fifty_identical_deliveries_make_one_log_row(db_path, live_server, prepared):
    secret, [(token, referral_id)] = prepared(1)
    live = live_server(env={"MMOREF_THREADS": "16"})
    body = mm.build_body("registered", token, SERVER, "reg-1", referee_identity="player-1")

    answers = race(live.port, [poster(secret, body)] * 50)

    tally = collections.Counter(json.dumps(answer, sort_keys=True) for answer in answers)
    advanced = (200, {"ok": True, "referral_id": referral_id, "state": "registered"})
    assert tally == {json.dumps(advanced, sort_keys=True): 1,
                     json.dumps((200, {"ok": True, "duplicate": True}), sort_keys=True): 49}
    assert rows(db_path, "SELECT referral_id, event, server_event_id, outcome FROM delivery_log") == [
        (referral_id, "registered", "reg-1", "advanced")]
    assert rows(db_path, "SELECT state FROM referrals") == [("registered",)]


def test_twelve_referrers_racing_for_one_referee_make_one_anchor(db_path, live_server, prepared):
    secret, minted = prepared(12)
    live = live_server(env={"MMOREF_THREADS": "16"})
    bodies = [mm.build_body("registered", token, SERVER, f"reg-{number}", referee_identity="player-1")
              for number, (token, _) in enumerate(minted)]

    answers = race(live.port, [poster(secret, body) for body in bodies])

    winners = [body for _, body in answers if "state" in body]
    assert len(winners) == 1 and winners[0]["state"] == "registered"
    assert sorted(answers, key=lambda answer: "state" in answer[1])[:11] == [
        (200, {"ok": True, "ignored": "first_touch_conflict"})] * 11
    assert rows(db_path, "SELECT referee_identity, referral_id FROM anchors") == [
        ("player-1", winners[0]["referral_id"])]
    assert dict(rows(db_path, "SELECT outcome, count(*) FROM delivery_log GROUP BY 1")) == {
        "advanced": 1, "first_touch_conflict": 11}
    assert dict(rows(db_path, "SELECT state, count(*) FROM referrals GROUP BY 1")) == {
        "registered": 1, "clicked": 11}
