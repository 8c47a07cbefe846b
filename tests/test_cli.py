"""docs/contract.md §5: every command through the in-process runner, a few through a real subprocess."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

import mmoref_server as mm
from tests.support import INGEST
from tests.support import ISO_UTC
from tests.support import PYTHON
from tests.support import SERVER_SCRIPT
from tests.support import assert_one_error_line
from tests.support import refused_port
from tests.support import send

pytestmark = pytest.mark.both_engines  # docs/contract.md holds on SQLite and on PostgreSQL

SERVER = "srv_1"
REGISTRATION_URL = "https://game.example/join?lang=en"


def ok(result):
    """The result of a command that must succeed."""
    assert result.exit_code == 0, result.stderr
    return result


@pytest.fixture
def server(runner) -> dict:
    """`add-server srv_1 --json`: {"server_id", "game", "secret", "kid"}."""
    return ok(runner("add-server", SERVER, "--game", "g", "--registration-url", REGISTRATION_URL, "--json")).json()


@pytest.fixture
def minted(runner, server) -> dict:
    """`mint-token srv_1 --ref alice --json`: {"token", "referral_id"}."""
    return ok(runner("mint-token", SERVER, "--ref", "alice", "--json")).json()


def test_add_server_json_is_exactly_the_documented_object(runner, client):
    data = ok(runner("add-server", SERVER, "--game", "g", "--json")).json()
    assert set(data) == {"server_id", "game", "secret", "kid"}
    assert (data["server_id"], data["game"]) == (SERVER, "g")
    assert data["secret"] and data["kid"]
    response = send(client, data["secret"], "registered", "tok", SERVER, "e1", referee_identity="p", test=True)
    assert (response.status_code, response.json) == (200, {"ok": True, "test": True})


def test_add_server_text_output_shows_the_secret_once(runner):
    result = ok(runner("add-server", SERVER, "--game", "g"))
    assert result.stdout.count("mmsk_") == 1


@pytest.mark.parametrize("as_json", [[], ["--json"]], ids=["text", "json"])
def test_add_server_without_a_registration_url_warns_that_the_share_link_is_404(runner, client, as_json):
    result = ok(runner("add-server", SERVER, "--game", "g", *as_json))
    assert result.stderr == (f"warning: no --registration-url, so the share link /r/{SERVER} answers 404 until one"
                             f" is set: on the dashboard, /dashboard/g/{SERVER}/referrals, under Registration\n")
    if as_json:
        assert set(result.json()) == {"server_id", "game", "secret", "kid"}  # stdout is still the one object
    assert client.get(f"/r/{SERVER}?ref=alice").status_code == 404  # what the warning says


def test_add_server_with_a_registration_url_warns_of_nothing(runner):
    assert ok(runner("add-server", SERVER, "--game", "g", "--registration-url", REGISTRATION_URL)).stderr == ""


@pytest.mark.parametrize(("grace", "old_secret_status"), [("86400", 200), ("0", 401)])
def test_rotate_secret_json_and_grace(runner, client, server, grace, old_secret_status):
    rotated = ok(runner("rotate-secret", SERVER, "--grace", grace, "--json")).json()
    assert set(rotated) == {"secret", "kid"}
    assert rotated["secret"] != server["secret"] and rotated["kid"] != server["kid"]

    def dry_run(secret):
        return send(client, secret, "registered", "tok", SERVER, "e1", referee_identity="p", test=True)

    new = dry_run(rotated["secret"])
    assert (new.status_code, new.json) == (200, {"ok": True, "test": True})
    old = dry_run(server["secret"])
    assert old.status_code == old_secret_status
    assert old.json.get("reason") == (None if old_secret_status == 200 else "mac_mismatch")


def test_mint_token_json_names_a_usable_referral(client, server, minted):
    assert set(minted) == {"token", "referral_id"}
    response = send(client, server["secret"], "registered", minted["token"], SERVER, "reg-1",
                    referee_identity="player-1")
    assert response.status_code == 200
    assert response.json == {"ok": True, "referral_id": minted["referral_id"], "state": "registered"}


def test_log_json_newest_first_with_current_state(runner, client, server, minted):
    other = ok(runner("mint-token", SERVER, "--ref", "bob", "--json")).json()
    deliveries = [("registered", minted, "reg-1", "player-1"), ("qualified", minted, "qua-1", None),
                  ("registered", other, "reg-2", "player-2")]
    for event, referral, event_id, referee in deliveries:
        assert send(client, server["secret"], event, referral["token"], SERVER, event_id,
                    referee_identity=referee).status_code == 200

    log = ok(runner("log", SERVER, "--json")).json()
    assert [row["server_event_id"] for row in log] == ["reg-2", "qua-1", "reg-1"]
    assert [(row["event"], row["state"], row["outcome"], row["referral_id"]) for row in log] == [
        ("registered", "registered", "advanced", other["referral_id"]),
        ("qualified", "qualified", "advanced", minted["referral_id"]),
        ("registered", "qualified", "advanced", minted["referral_id"]),  # the referral's current state
    ]
    assert all(ISO_UTC.fullmatch(row["received_at"]) for row in log)
    assert [row["server_event_id"] for row in ok(runner("log", SERVER, "--limit", "2", "--json")).json()] == [
        "reg-2", "qua-1"]


def test_log_of_a_server_without_events(runner, server):
    assert ok(runner("log", SERVER, "--json")).json() == []
    assert ok(runner("log", SERVER)).stdout.strip() == "(no events yet)"


@pytest.mark.parametrize(("action", "registered_first", "state"), [
    ("reverse", True, "reversed"),
    ("reject", False, "rejected"),
    ("reject", True, "rejected"),
])
def test_owner_actions_are_logged_and_terminal(runner, client, server, minted, action, registered_first, state):
    def deliver(event, event_id):
        return send(client, server["secret"], event, minted["token"], SERVER, event_id, referee_identity="player-1")

    if registered_first:
        assert deliver("registered", "reg-1").status_code == 200
    result = ok(runner(action, minted["referral_id"], "--json")).json()
    assert result == {"referral_id": minted["referral_id"], "state": state}

    newest = ok(runner("log", SERVER, "--json")).json()[0]
    assert (newest["outcome"], newest["event"], newest["state"], newest["referral_id"]) == (
        "owner_action", state, state, minted["referral_id"])
    assert ISO_UTC.fullmatch(newest["received_at"])

    after = deliver("qualified", "qua-1")
    assert after.status_code == 422
    assert (after.json["error"], after.json["state"]) == ("invalid transition", state)


@pytest.mark.parametrize("url", [
    "https://game.example/register", "http://localhost:8080/register", "http://127.0.0.1/register",
    "http://[::1]:8000/register",
])
def test_registration_url_accepted(runner, client, url):
    ok(runner("add-server", "srv_2", "--game", "g", "--registration-url", url))
    response = client.get("/r/srv_2", query_string={"ref": "alice"})
    assert response.status_code == 302
    assert response.headers["Location"].startswith(url + "?mmref=")


@pytest.mark.parametrize("url", [
    "http://example.com", "http://localhost.example.com/r", "ftp://example.com/r", "https://", "example.com",
    "javascript:alert(1)",
])
def test_registration_url_refused(runner, client, url):
    result = runner("add-server", "srv_2", "--game", "g", "--registration-url", url)
    assert_one_error_line(result.exit_code, result.stderr, "https://")
    assert client.get("/r/srv_2", query_string={"ref": "alice"}).status_code == 404  # nothing was created


USER_MISTAKES = {
    "unknown server (log)": (["log", "nosuch"], "unknown server 'nosuch'"),
    "unknown server (rotate-secret)": (["rotate-secret", "nosuch"], "unknown server 'nosuch'"),
    "unknown server (mint-token)": (["mint-token", "nosuch", "--ref", "alice"], "unknown server 'nosuch'"),
    "duplicate server": (["add-server", SERVER, "--game", "g"], "already exists"),
    "bad server id": (["add-server", "bad id", "--game", "g"], "server id"),
    "missing option": (["add-server", "srv_2"], "--game"),
    "bad identity field": (["add-server", "srv_2", "--game", "g", "--identity-field", "phone"], "identity"),
    "bad referrer code": (["mint-token", SERVER, "--ref", "a b"], "referrer code"),
    "unknown referral (reverse)": (["reverse", "ref_nope"], "unknown referral 'ref_nope'"),
    "unknown referral (reject)": (["reject", "ref_nope"], "unknown referral 'ref_nope'"),
    "limit out of range": (["log", SERVER, "--limit", "0"], "--limit"),
    "negative grace": (["rotate-secret", SERVER, "--grace", "-1"], "grace"),
    "unknown command": (["frobnicate"], "frobnicate"),
}


@pytest.mark.parametrize(("argv", "fragment"), USER_MISTAKES.values(), ids=USER_MISTAKES.keys())
def test_user_mistakes_are_one_error_line(runner, server, argv, fragment):
    result = runner(*argv)
    assert_one_error_line(result.exit_code, result.stderr, fragment)
    assert result.stdout == ""


def test_owner_action_from_the_wrong_state_is_one_error_line(runner, minted):
    result = runner("reverse", minted["referral_id"])
    assert_one_error_line(result.exit_code, result.stderr, "cannot reverse", "clicked")


def test_send_to_an_unreachable_endpoint_is_one_error_line(runner):
    with refused_port() as port:
        endpoint = f"http://127.0.0.1:{port}{INGEST}"
        result = runner("send", "registered", "--endpoint", endpoint, "--server-id", SERVER, "--secret", "s",
                        "--token", "t", "--referee-identity", "p", db=False)
    assert_one_error_line(result.exit_code, result.stderr, "cannot reach", endpoint)


@pytest.mark.slow
@pytest.mark.parametrize(("extra", "expected_body", "log_rows"), [
    (["--test"], {"ok": True, "test": True}, 0),
    ([], {"ok": True, "state": "registered"}, 1),
])
def test_send_against_a_real_server(runner, live_server, server, minted, extra, expected_body, log_rows):
    live = live_server()
    result = ok(runner("send", "registered", "--endpoint", live.url + INGEST, "--server-id", SERVER,
                       "--secret", server["secret"], "--token", minted["token"], "--referee-identity", "player-1",
                       "--server-event-id", "reg-1", "--json", *extra, db=False))
    if "state" in expected_body:
        expected_body = {**expected_body, "referral_id": minted["referral_id"]}
    assert result.json() == {"status": 200, "body": expected_body}
    assert len(ok(runner("log", SERVER, "--json")).json()) == log_rows


@pytest.mark.slow
def test_send_exits_non_zero_on_4xx(runner, live_server, server, minted):
    live = live_server()
    common = ["--endpoint", live.url + INGEST, "--server-id", SERVER, "--token", minted["token"], "--json"]
    cases = [
        (["qualified", "--secret", "wrong-secret"], 401, "bad_signature"),
        (["qualified", "--secret", server["secret"]], 422, "invalid transition"),
        (["registered", "--secret", server["secret"]], 400, "missing field"),  # no --referee-identity
    ]
    for argv, status, error in cases:
        result = runner("send", *argv, *common, db=False)
        assert result.exit_code != 0
        assert "Traceback" not in result.stderr
        output = result.json()
        assert (output["status"], output["body"]["ok"], output["body"]["error"]) == (status, False, error)


@pytest.mark.slow
def test_send_text_output(runner, live_server, server, minted):
    live = live_server()
    result = ok(runner("send", "registered", "--endpoint", live.url + INGEST, "--server-id", SERVER, "--secret",
                       server["secret"], "--token", minted["token"], "--referee-identity", "p", "--test", db=False))
    assert result.stdout.splitlines() == ["HTTP 200", '{"ok": true, "test": true}']


SUBPROCESS_MISTAKES = {
    "bad registration URL": (["add-server", "srv_2", "--game", "g", "--registration-url", "http://example.com"],
                             "https://"),
    "unknown server": (["log", "nosuch"], "unknown server"),
    "unknown referral": (["reject", "ref_nope"], "unknown referral"),
}


@pytest.mark.parametrize(("argv", "fragment"), SUBPROCESS_MISTAKES.values(), ids=SUBPROCESS_MISTAKES.keys())
def test_user_mistakes_in_a_real_process(db_path, argv, fragment):
    mm.open_store(db_path).close()  # these commands refuse a missing database before anything else
    completed = subprocess.run([PYTHON, str(SERVER_SCRIPT), *argv, "--db", db_path],
                               capture_output=True, text=True, timeout=60)
    assert_one_error_line(completed.returncode, completed.stderr, fragment)


def test_demo_refuses_to_overwrite_without_force(runner, tmp_path: Path):
    target = tmp_path / "existing.db"
    target.write_text("keep me")
    refused = runner("demo", str(target), db=False)
    assert_one_error_line(refused.exit_code, refused.stderr, "exists", "--force")
    assert target.read_text() == "keep me"

    replaced = ok(runner("demo", str(target), "--force", db=False))
    assert mm.DEMO_SERVER_ID in replaced.stdout
    assert target.read_bytes().startswith(b"SQLite format 3\x00")


def test_send_with_a_cacert_that_holds_no_certificate_is_one_error_line(runner, tmp_path: Path):
    not_pem = tmp_path / "ca.pem"
    not_pem.write_text("not a certificate\n")
    result = runner("send", "registered", "--endpoint", f"https://127.0.0.1:1{INGEST}", "--server-id", SERVER,
                    "--secret", "s", "--token", "t", "--referee-identity", "p", "--cacert", str(not_pem), db=False)
    assert_one_error_line(result.exit_code, result.stderr, f"cannot use {not_pem} as the CA certificate")
    assert result.stdout == ""
