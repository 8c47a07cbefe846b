"""`forget --server S --identity X` and the detail page's button: the identity is gone from
every table and from the database files, first touch still holds, counters stay exact."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

import mmoref_server as mm
from tests.support import KIT_TAB
from tests.support import PYTHON
from tests.support import REFEREE
from tests.support import SERVER_ID
from tests.support import SERVER_SCRIPT
from tests.support import HttpClient
from tests.support import add_server
from tests.support import assert_one_error_line
from tests.support import database
from tests.support import event_body
from tests.support import login
from tests.support import mint_tokens
from tests.support import rows
from tests.support import scalar
from tests.support import send_ok
from tests.support import snapshot

pytestmark = pytest.mark.both_engines  # the same on SQLite and on PostgreSQL

PLAYER = "Zoë.Player+1@example.com"
COUNTERS = ("SELECT 'daily', * FROM daily_counts UNION ALL SELECT 'referrer', * FROM referrer_counts"
            " ORDER BY 1, 2, 3")


def spellings_in_files(db_path: str, identity: str) -> list[str]:
    """Which database files (the file, -wal, -shm) hold the identity, as UTF-8 or JSON-escaped."""
    needles = {identity.encode(), json.dumps(identity)[1:-1].encode()}
    return [path.name for path in (Path(db_path + suffix) for suffix in ("", "-wal", "-shm"))
            if path.exists() and any(needle in path.read_bytes() for needle in needles)]


@pytest.mark.sqlite_only  # reads the SQLite files' bytes
@pytest.mark.slow
def test_forget_erases_the_identity_everywhere_and_first_touch_still_holds(live_server, store, db_path, app):
    secret = add_server(store)
    alice, bob, carol, alice_again = mint_tokens(store, ["alice", "bob", "carol", "alice"])
    server = live_server()
    client = HttpClient(server.port)
    post = client.post_event
    assert post(secret, event_body("registered", alice, "reg-1", referee=PLAYER))[1]["state"] == "registered"
    assert post(secret, event_body("qualified", alice, "qual-1"))[1]["state"] == "qualified"
    assert post(secret, event_body("registered", bob, "reg-2", referee=PLAYER))[1] == {
        "ok": True, "ignored": "first_touch_conflict"}
    assert post("wrong-secret", event_body("registered", carol, "reg-3", referee=PLAYER))[0] == 401
    assert spellings_in_files(db_path, PLAYER)   # the test can see it while it is there
    counters = rows(db_path, COUNTERS)

    forgotten = subprocess.run([PYTHON, str(SERVER_SCRIPT), "forget", "--server", SERVER_ID, "--identity", PLAYER,
                                "--db", db_path, "--json"], capture_output=True, text=True, timeout=60)

    assert forgotten.returncode == 0, forgotten.stderr
    result = json.loads(forgotten.stdout)
    keyed = mm.forgotten_form(store.identity_key, SERVER_ID, PLAYER)
    assert result == {"server_id": SERVER_ID, "forgotten_as": keyed, "rows_changed": {
        "referrals": 1, "anchors": 1, "delivery_log": 2, "rejected_requests": 1}}
    assert spellings_in_files(db_path, PLAYER) == []          # while the server runs ...
    assert rows(db_path, "SELECT referee_identity FROM anchors") == [(keyed,)]
    assert rows(db_path, COUNTERS) == counters
    dashboard = app.test_client()
    login(dashboard)
    export = dashboard.get(f"/dashboard/mygame/{SERVER_ID}/referrals/log.csv").get_data(as_text=True)
    assert keyed in export and PLAYER not in export

    # first touch holds for the forgotten player: another referrer is still refused ...
    assert post(secret, event_body("registered", carol, "reg-4", referee=PLAYER))[1] == {
        "ok": True, "ignored": "first_touch_conflict"}
    # ... the same referrer's second link reaches the anchored referral, and a retry stays a no-op
    assert post(secret, event_body("registered", alice_again, "reg-5", referee=PLAYER))[1]["state"] == "qualified"
    assert post(secret, event_body("registered", alice, "reg-late", referee=PLAYER))[1]["state"] == "qualified"
    assert rows(db_path, COUNTERS) == counters
    client.close()
    assert "Traceback" not in server.stop()
    assert scalar(db_path, "SELECT count(*) FROM referrals WHERE referee_identity = ?", PLAYER) == 0


def test_forget_refuses_unknown_servers_and_empty_identities(runner, store):
    add_server(store)
    unknown = runner("forget", "--server", "nope", "--identity", REFEREE)
    assert_one_error_line(unknown.exit_code, unknown.stderr, "unknown server 'nope'")
    empty = runner("forget", "--server", SERVER_ID, "--identity", "  ")
    assert_one_error_line(empty.exit_code, empty.stderr, "--identity is empty")


def test_the_detail_page_forgets_after_a_confirm_step(owner, registered, store, db_path):
    detail = f"{KIT_TAB}/log/1"
    page = owner.page(detail)
    action = page.by_id("forget").ancestor("form").attrs["action"]
    assert action == f"{KIT_TAB}/forget/{registered['referral_id']}"

    confirm = owner.post_page(action)
    assert confirm.one("h1").text == f"Forget {REFEREE}?"
    assert confirm.has_id("forget-confirm")
    assert scalar(db_path, "SELECT referee_identity FROM referrals") == REFEREE   # nothing yet

    done = owner.post(action, confirm="yes")
    tab = owner.follow(done)
    assert f"The player of referral {registered['referral_id']} is forgotten." in tab.flashes
    assert scalar(db_path, "SELECT referee_identity FROM referrals").startswith("forgotten:")
    assert REFEREE not in owner.page(detail).raw
    assert not owner.page(detail).has_id("forget")


def test_the_forget_button_needs_the_csrf_token(owner, registered, db_path):
    response = owner.client.post(f"{KIT_TAB}/forget/{registered['referral_id']}", data={"confirm": "yes"})
    assert response.status_code == 400
    assert scalar(db_path, "SELECT referee_identity FROM referrals") == REFEREE


@pytest.mark.sqlite_only
def test_forget_says_so_when_a_reader_keeps_the_write_ahead_log(kit, store, db_path):
    send_ok(kit, "registered", kit.token("alice"), "reg-1", referee_identity=PLAYER)
    impatient = mm.open_store(db_path, busy_timeout=0.2)
    with database(db_path) as reader:
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM delivery_log").fetchone()   # a snapshot that needs the log
        with pytest.raises(mm.StoreError, match="run the command again"):
            mm.forget(impatient, kit.server_id, PLAYER)
        reader.execute("COMMIT")
    mm.forget(impatient, kit.server_id, PLAYER)   # repeated once the reader is gone: done
    assert spellings_in_files(db_path, PLAYER) == []


def rewrite_marker(db_path: str) -> list[tuple]:
    """What forget's rewrite changes: SQLite's schema cookie (VACUUM adds one), PostgreSQL's table
    files (VACUUM FULL gives each table a new one)."""
    if mm.is_database_url(db_path):
        return rows(db_path, "SELECT pg_relation_filenode('referrals'), pg_relation_filenode('delivery_log')")
    return rows(db_path, "PRAGMA schema_version")


def test_forget_says_so_when_nothing_matches_and_rewrites_nothing(runner, kit, db_path):
    send_ok(kit, "registered", kit.token("alice"), "reg-1", referee_identity=PLAYER)
    before, marker = snapshot(db_path), rewrite_marker(db_path)

    typo = runner("forget", "--server", kit.server_id, "--identity", "nobody-here")
    as_json = runner("forget", "--server", kit.server_id, "--identity", "nobody-here", "--json")

    assert_one_error_line(typo.exit_code, typo.stderr, f"nothing on {kit.server_id} matches 'nobody-here'",
                          "nothing was changed")
    assert typo.stdout == ""
    assert_one_error_line(as_json.exit_code, as_json.stderr, "nothing was changed")
    assert as_json.json() == {"server_id": kit.server_id, "nothing_matched": True,
                              "forgotten_as": mm.forgotten_form(kit.store.identity_key, kit.server_id, "nobody-here"),
                              "rows_changed": {"referrals": 0, "anchors": 0, "delivery_log": 0,
                                               "rejected_requests": 0}}
    assert snapshot(db_path) == before
    assert rewrite_marker(db_path) == marker   # no VACUUM: writers were never held up
    done = runner("forget", "--server", kit.server_id, "--identity", PLAYER)
    assert done.exit_code == 0, done.stderr
    assert rewrite_marker(db_path) != marker   # (the marker does see a rewrite)


def test_forgetting_twice_says_the_player_was_forgotten_before(runner, kit):
    send_ok(kit, "registered", kit.token("alice"), "reg-1", referee_identity=PLAYER)
    first = runner("forget", "--server", kit.server_id, "--identity", PLAYER, "--json")
    assert first.exit_code == 0, first.stderr

    again = runner("forget", "--server", kit.server_id, "--identity", PLAYER, "--json")
    in_words = runner("forget", "--server", kit.server_id, "--identity", PLAYER)

    assert again.exit_code == 0, again.stderr
    assert again.json() == {**first.json(), "rows_changed": dict.fromkeys(first.json()["rows_changed"], 0),
                            "forgotten_before": True}
    assert in_words.exit_code == 0, in_words.stderr
    assert in_words.stdout.startswith(f"already forgotten on {kit.server_id}; stored as forgotten:")


def test_a_forgotten_form_is_not_forgotten_again(runner, kit, db_path):
    """Hashing the stored form again would lose the player's first touch."""
    send_ok(kit, "registered", kit.token("alice"), "reg-1", referee_identity=PLAYER)
    forgotten = runner("forget", "--server", kit.server_id, "--identity", PLAYER, "--json").json()["forgotten_as"]
    before = snapshot(db_path)

    refused = runner("forget", "--server", kit.server_id, "--identity", forgotten)

    assert_one_error_line(refused.exit_code, refused.stderr, "is a forgotten form already")
    assert snapshot(db_path) == before


def test_the_forget_button_of_a_forgotten_player_changes_nothing(owner, registered, db_path):
    action = f"{KIT_TAB}/forget/{registered['referral_id']}"
    assert owner.post(action, confirm="yes").status_code == 302
    before = snapshot(db_path)

    tab = owner.follow(owner.post(action, confirm="yes"))   # the form sent again, by hand

    assert [flash for flash in tab.flashes if "is a forgotten form already" in flash], tab.flashes
    assert snapshot(db_path) == before


VICTIM = "victim.person@example.com"


def head_cutting_the_victim(kept_chars: int) -> str:
    """The start of a body that a cut at `kept_chars` characters ends with the first 20 of VICTIM."""
    around = ('{"note": "', '", "referee_identity": "')
    return around[0] + "x" * (kept_chars - 20 - len("".join(around))) + around[1]


def test_a_rejected_snippet_cut_inside_the_identity_is_forgotten_too(runner, kit, db_path):
    """The snippet keeps 300 characters: here the first 20 of the identity, "victim.person@exampl"."""
    head = head_cutting_the_victim(mm.REJECTED_SNIPPET_CHARS)
    raw = (f'{head}{VICTIM}", "event": "registered", "token": "t", "server_id": "{kit.server_id}",'
           ' "server_event_id": "reg-1"}')
    assert kit.post(raw.encode(), secret="wrong-secret").status_code == 401
    [(snippet,)] = rows(db_path, "SELECT snippet FROM rejected_requests")
    assert snippet.endswith(VICTIM[:20]) and len(snippet) == mm.REJECTED_SNIPPET_CHARS   # (set up as meant)

    forgotten = runner("forget", "--server", kit.server_id, "--identity", VICTIM, "--json")

    assert forgotten.exit_code == 0, forgotten.stderr
    assert forgotten.json()["rows_changed"] == {"referrals": 0, "anchors": 0, "delivery_log": 0,
                                                "rejected_requests": 1}
    [(snippet,)] = rows(db_path, "SELECT snippet FROM rejected_requests")
    assert snippet == head + forgotten.json()["forgotten_as"]


def test_a_stored_payload_cut_inside_the_identity_is_forgotten_too(runner, kit, db_path):
    """A delivery-log row keeps 2,000 characters of the body: here the first 20 of the identity."""
    head = head_cutting_the_victim(mm.DELIVERY_PAYLOAD_CHARS)
    raw = (f'{head}{VICTIM}", "event": "registered", "token": "{kit.token("alice")}",'
           f' "server_id": "{kit.server_id}", "server_event_id": "reg-1"}}')
    assert kit.post(raw.encode()).get_json()["state"] == "registered"
    [(payload,)] = rows(db_path, "SELECT payload FROM delivery_log")
    assert payload == head + VICTIM[:20]   # (set up as meant)

    forgotten = runner("forget", "--server", kit.server_id, "--identity", VICTIM, "--json")

    assert forgotten.exit_code == 0, forgotten.stderr
    assert forgotten.json()["rows_changed"] == {"referrals": 1, "anchors": 1, "delivery_log": 1,
                                                "rejected_requests": 0}
    [(payload,)] = rows(db_path, "SELECT payload FROM delivery_log")
    assert payload == head + forgotten.json()["forgotten_as"]
    assert not [VICTIM[:length] for length in range(3, len(VICTIM) + 1) if VICTIM[:length] in payload]


def test_forget_lists_the_log_rows_whose_server_event_id_holds_the_identity(runner, kit, db_path):
    token = kit.token("alice")
    send_ok(kit, "registered", token, f"reg-{VICTIM}", referee_identity=VICTIM)
    send_ok(kit, "qualified", token, f"qual-{VICTIM}")
    send_ok(kit, "registered", kit.token("bob"), "reg-other", referee_identity="someone-else")

    as_json = runner("forget", "--server", kit.server_id, "--identity", VICTIM, "--json")
    in_words = runner("forget", "--server", kit.server_id, "--identity", VICTIM)

    assert as_json.exit_code == 0, as_json.stderr
    assert as_json.json()["server_event_id_kept"] == [1, 2]
    assert as_json.json()["rows_changed"] == {"referrals": 1, "anchors": 1, "delivery_log": 2, "rejected_requests": 0}
    assert in_words.exit_code == 0, in_words.stderr   # forgotten before: the rows are listed again
    assert in_words.stdout.splitlines()[-1] == (
        "kept: the server_event_id of delivery-log rows 1, 2 holds the identity; it is the key that makes a"
        " retry of those events a duplicate (docs/operations.md, Forgetting a player)")
    assert rows(db_path, "SELECT server_event_id FROM delivery_log ORDER BY id") == [
        (f"reg-{VICTIM}",), (f"qual-{VICTIM}",), ("reg-other",)]
    assert all(VICTIM not in payload for (payload,) in rows(db_path, "SELECT payload FROM delivery_log"))
    # a retry of a listed event is still a duplicate
    assert kit.send("qualified", token, f"qual-{VICTIM}").get_json() == {"ok": True, "duplicate": True}


def test_the_forget_button_names_the_log_rows_it_keeps(owner, kit):
    referral_id = send_ok(kit, "registered", kit.token("alice"), f"reg-{REFEREE}")["referral_id"]

    tab = owner.follow(owner.post(f"{KIT_TAB}/forget/{referral_id}", confirm="yes"))

    forgotten, kept = tab.flashes
    assert forgotten == f"The player of referral {referral_id} is forgotten."
    assert kept.startswith("kept: the server_event_id of delivery-log rows 1 holds the identity; ")
