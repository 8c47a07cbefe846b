"""Sessions, the login throttle, per-client limits and scrubbing (security issue, items 2-18).

Each test here failed before its fix. Sessions and failed logins live in the database, so
one test runs two real server processes on one database file.
"""
from __future__ import annotations

import csv
import hashlib
import http.client
import io
import json
import re
import sqlite3
import threading
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

import pytest

import mmoref_server as mm
from tests.support import HTTP_TIMEOUT
from tests.support import KIT_REGISTRATION_URL
from tests.support import PASSWORD
from tests.support import Clock
from tests.support import Kit
from tests.support import Owner
from tests.support import csrf
from tests.support import html
from tests.support import is_logged_in
from tests.support import location
from tests.support import login
from tests.support import rejected_rows
from tests.support import rows
from tests.support import scalar

pytestmark = pytest.mark.both_engines  # the same on SQLite and on PostgreSQL

ROOT = Path(mm.__file__).resolve().parent
TAB = "/dashboard/{game}/{server}/referrals"


def address(n: int) -> dict[str, Any]:
    """Test-client keyword arguments for a request from documentation address number `n`."""
    return {"environ_base": {"REMOTE_ADDR": f"198.51.{n // 256}.{n % 256}"}}


def replay(app: Any, cookie: str) -> Any:
    """A fresh client presenting a captured session cookie."""
    client = app.test_client()
    client.set_cookie(mm.SESSION_COOKIE, cookie)
    return client


# Item 2: the session cookie carries nothing derived from the password ########

def test_the_session_cookie_holds_a_random_id_not_a_password_hash(app: Any) -> None:
    cookies = []
    for _ in range(2):
        client = app.test_client()
        assert location(login(client)) == "/dashboard/"
        cookies.append(client.get_cookie(mm.SESSION_COOKIE).value)
    contents = [app.session_interface.get_signing_serializer(app).loads(cookie) for cookie in cookies]
    fast_hash = hashlib.sha256(f"env:{PASSWORD}".encode()).hexdigest()
    for content in contents:
        assert fast_hash[:16] not in json.dumps(content)
        assert "mmoref_session" in content and set(content) <= {"mmoref_session", "mmoref_csrf"}
    assert contents[0]["mmoref_session"] != contents[1]["mmoref_session"]


def test_a_new_env_password_logs_every_session_out(app: Any, db_path: str) -> None:
    client = app.test_client()
    assert location(login(client)) == "/dashboard/"
    cookie = client.get_cookie(mm.SESSION_COOKIE).value
    assert is_logged_in(replay(app, cookie))
    restarted = mm.create_app({"MMOREF_DB": db_path, "TESTING": True, "MMOREF_ADMIN_PASSWORD": "a different one"})
    assert not is_logged_in(replay(restarted, cookie))


# Item 7: logout revokes the cookie ############################################

def test_logout_revokes_a_captured_session_cookie(app: Any, owner: Owner) -> None:
    captured = owner.client.get_cookie(mm.SESSION_COOKIE).value
    assert is_logged_in(replay(app, captured))
    assert location(owner.post("/dashboard/logout")) == "/dashboard/login"
    assert not is_logged_in(replay(app, captured))
    assert location(replay(app, captured).get("/dashboard/")).startswith("/dashboard/login")


# Item 8: the login throttle counts first, evicts, has a global budget, is shared

def test_parallel_guesses_after_the_wait_get_one_try(bare_app: Any, clock: Clock) -> None:
    """16 guesses at once, just after the back-off expired: one is checked, the rest wait."""
    bare_app.extensions["mmoref"].set_admin_password(PASSWORD)
    client = bare_app.test_client()
    for _ in range(mm.LOGIN_FREE_FAILURES):
        html(login(client, "guess"), 401)
    clock.t += 1
    guessers = [bare_app.test_client() for _ in range(16)]
    tokens = [csrf(html(guesser.get("/dashboard/login"))) for guesser in guessers]
    barrier, statuses = threading.Barrier(len(guessers), timeout=30), []

    def guess(guesser: Any, token: str) -> None:
        barrier.wait()
        statuses.append(guesser.post("/dashboard/login", data={"csrf_token": token, "password": "guess"}).status_code)

    threads = [threading.Thread(target=guess, args=pair, daemon=True) for pair in zip(guessers, tokens)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(statuses) == [401] + [429] * 15


def test_many_addresses_do_not_clear_a_locked_out_client(client: Any, db_path: str, clock: Clock,
                                                         monkeypatch: Any) -> None:
    monkeypatch.setattr(mm, "LOGIN_CLIENTS_KEPT", 20)
    for _ in range(mm.LOGIN_FREE_FAILURES):
        html(login(client, "guess", **address(0)), 401)
    for n in range(1, 26):
        html(login(client, "guess", **address(n)), 401)
    assert scalar(db_path, "SELECT count(*) FROM login_failures") == 20
    refused = html(login(client, PASSWORD, **address(0)), 429)
    assert refused.one("p", role="alert").text.startswith("Too many failed logins: wait")


def test_the_global_budget_makes_everyone_wait(client: Any, clock: Clock, monkeypatch: Any) -> None:
    monkeypatch.setattr(mm, "LOGIN_BUDGET", 10)
    clock.t -= clock.t % mm.LOGIN_BUDGET_WINDOW  # the start of a window
    for n in range(10):
        html(login(client, "guess", **address(n)), 401)
    refused = html(login(client, PASSWORD, **address(99)), 429)  # a fresh address, the right password
    assert refused.one("p", role="alert").text == \
        f"Too many failed logins: wait {mm.LOGIN_BUDGET_WINDOW} s and try again."
    clock.t += mm.LOGIN_BUDGET_WINDOW
    assert location(login(client, PASSWORD, **address(99))) == "/dashboard/"


def test_strangers_spending_the_budget_lock_out_neither_the_owners_browser_nor_loopback(app: Any,
                                                                                       clock: Clock) -> None:
    """120 wrong passwords from 24 addresses: every stranger waits, the owner does not."""
    clock.t -= clock.t % mm.LOGIN_BUDGET_WINDOW + 86400  # yesterday, at the start of a window
    owner = app.test_client()
    first_login = login(owner, **address(200))
    assert location(first_login) == "/dashboard/"
    assert location(Owner(owner).post("/dashboard/logout")) == "/dashboard/login"
    clock.t += 86400

    statuses = []
    for n in range(24):
        stranger = app.test_client()
        statuses += [login(stranger, "guess", **address(n)).status_code for _ in range(mm.LOGIN_FREE_FAILURES)]
    assert sorted(statuses) == [401] * mm.LOGIN_BUDGET + [429] * (24 * mm.LOGIN_FREE_FAILURES - mm.LOGIN_BUDGET)

    assert location(login(owner, **address(200))) == "/dashboard/"  # the browser that logged in before
    assert is_logged_in(owner)
    on_the_machine = app.test_client()  # 127.0.0.1: an SSH tunnel, say
    assert location(login(on_the_machine)) == "/dashboard/"
    assert is_logged_in(on_the_machine)

    forged = app.test_client()
    forged.set_cookie(mm.LOGIN_DEVICE_COOKIE, "made-up", path="/dashboard/login")
    for newcomer in (app.test_client(), forged):  # the budget still holds for every other browser
        refused = html(login(newcomer, PASSWORD, **address(300)), 429)
        assert refused.one("p", role="alert").text.startswith("Too many failed logins: wait")
    device_cookie = [c for c in first_login.headers.getlist("Set-Cookie") if c.startswith(f"{mm.LOGIN_DEVICE_COOKIE}=")]
    assert len(device_cookie) == 1
    assert {"HttpOnly", "Path=/dashboard/login", f"Max-Age={mm.LOGIN_DEVICE_LIFETIME}"} \
        <= {part.strip() for part in device_cookie[0].split(";")}


def test_a_device_cookie_from_before_a_password_change_spends_the_shared_budget(bare_app: Any, clock: Clock,
                                                                                monkeypatch: Any) -> None:
    monkeypatch.setattr(mm, "LOGIN_BUDGET", 3)
    clock.t -= clock.t % mm.LOGIN_BUDGET_WINDOW + 86400  # yesterday, at the start of a window
    store = bare_app.extensions["mmoref"]
    store.set_admin_password(PASSWORD)
    owner = bare_app.test_client()
    assert location(login(owner, **address(200))) == "/dashboard/"
    store.set_admin_password("a-new-password")
    clock.t += 86400
    for n in range(3):
        html(login(bare_app.test_client(), "guess", **address(n)), 401)
    html(login(owner, "a-new-password", **address(200)), 429)


def post_login(port: int, password: str) -> tuple[int, str]:
    """Log in to a real server over HTTP (login page for the cookie and CSRF token, then the post)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=HTTP_TIMEOUT)
    try:
        connection.request("GET", "/dashboard/login")
        response = connection.getresponse()
        page = response.read().decode()
        cookie = SimpleCookie(response.headers["Set-Cookie"])[mm.SESSION_COOKIE].value
        token = re.search(r'name="csrf_token" value="([^"]+)"', page)
        assert response.status == 200 and token is not None, page
        form = f"csrf_token={token.group(1)}&password={password}"
        connection.request("POST", "/dashboard/login", body=form, headers={
            "Cookie": f"{mm.SESSION_COOKIE}={cookie}", "Content-Type": "application/x-www-form-urlencoded"})
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


@pytest.mark.slow
def test_two_server_processes_share_the_count(live_server: Any) -> None:
    env = {"MMOREF_ADMIN_PASSWORD": "correct-horse"}
    first, second = live_server(env=env), live_server(env=env)
    for _ in range(mm.LOGIN_FREE_FAILURES):
        assert post_login(first.port, "guess")[0] == 401
    status, page = post_login(second.port, "correct-horse")
    assert status == 429, page
    assert "Too many failed logins" in page


# Item 9: CSV formulas after any separator #####################################

@pytest.mark.parametrize(("identity", "cell"), [
    ("x;=1+1", "x;'=1+1"), ("a|@SUM(A1)", "a|'@SUM(A1)"), ("a\t+1", "a\t'+1"), ("a b=c", "a b=c"),
    ("=HYPERLINK(1)", "'=HYPERLINK(1)"), ("player-7842", "player-7842"), ("x;＝1+1", "x;'＝1+1"),
    ("ＡＢ＝1", "ＡＢ＝1")])
def test_csv_neutralises_a_formula_after_any_separator(owner: Owner, kit: Kit, identity: str, cell: str) -> None:
    assert kit.send("registered", kit.token(), "reg-1", referee_identity=identity).status_code == 200
    response = owner.client.get(TAB.format(game="mygame", server=kit.server_id) + "/log.csv")
    assert response.status_code == 200, response.get_data(as_text=True)
    table = list(csv.DictReader(io.StringIO(response.get_data(as_text=True))))
    assert [row["referee_identity"] for row in table] == [cell]


# Item 10: every secret of the installation, on the decoded text ################

def test_accepted_events_keep_no_revoked_or_other_servers_secret(kit: Kit, store: mm.Store, db_path: str) -> None:
    revoked = kit.secret
    current, _ = store.rotate_secret(kit.server_id, grace=0)
    other, _ = store.add_server("srv_other", "mygame")
    body = kit.body("registered", kit.token(), "reg-1", note=f"{revoked} {other}")
    response = kit.post(body, secret=current)
    assert response.status_code == 200, response.get_json()
    payload = scalar(db_path, "SELECT payload FROM delivery_log")
    assert revoked not in payload and other not in payload
    assert payload.count("[secret]") == 2


def test_a_json_escaped_secret_is_scrubbed_from_the_rejected_snippet(kit: Kit, db_path: str) -> None:
    escaped = kit.secret.replace("_", "\\u005f").replace("k", "\\u006B")
    assert escaped != kit.secret
    raw = f'{{"event": "registered", "note": "{escaped}"}}'
    response = kit.post(raw.encode())
    assert response.status_code == 400, response.get_json()
    snippet = scalar(db_path, "SELECT snippet FROM rejected_requests")
    assert json.loads(snippet)["note"] == "[secret]"


# Item 13: limits on unauthenticated writes ###################################

# The limits count per clock minute: a loop that crossed into the next minute would start a
# fresh count, so these tests hold the clock still.
FROZEN_CLOCK = pytest.mark.usefixtures("clock")


def clicks(db_path: str) -> int:
    return scalar(db_path, "SELECT count(*) FROM referrals")


@FROZEN_CLOCK
def test_clicks_past_the_per_client_limit_write_nothing(kit: Kit, client: Any, db_path: str) -> None:
    path = f"/r/{kit.server_id}?ref=alice"
    for _ in range(mm.CLICKS_PER_CLIENT_MINUTE):
        assert "mmref=" in location(client.get(path))
    limited = client.get(path)
    assert limited.status_code == 302
    assert location(limited) == KIT_REGISTRATION_URL
    assert "Set-Cookie" not in limited.headers
    assert clicks(db_path) == mm.CLICKS_PER_CLIENT_MINUTE
    assert "mmref=" in location(client.get(path, **address(1)))  # another client is not held up
    assert clicks(db_path) == mm.CLICKS_PER_CLIENT_MINUTE + 1


@FROZEN_CLOCK
def test_an_ipv6_client_is_counted_by_its_64_network(kit: Kit, client: Any, db_path: str) -> None:
    path = f"/r/{kit.server_id}?ref=alice"
    for n in range(mm.CLICKS_PER_CLIENT_MINUTE + 5):
        client.get(path, environ_base={"REMOTE_ADDR": f"2001:db8:1:2::{n + 1:x}"})
    assert clicks(db_path) == mm.CLICKS_PER_CLIENT_MINUTE


def test_head_on_a_share_link_writes_nothing(kit: Kit, client: Any, db_path: str) -> None:
    response = client.head(f"/r/{kit.server_id}?ref=alice")
    assert response.status_code == 302
    assert location(response) == KIT_REGISTRATION_URL
    assert "Set-Cookie" not in response.headers
    assert clicks(db_path) == 0


@FROZEN_CLOCK
def test_refusals_past_the_per_client_limit_are_answered_not_recorded(kit: Kit, client: Any, db_path: str) -> None:
    def refuse(n: int, **request: Any) -> None:
        response = client.post(mm.INGEST_PATH, data=b'{"event": "registered", "n": %d}' % n, **request)
        assert response.status_code == 400 and response.get_json()["error"] == "missing signature header"

    for n in range(mm.REJECTIONS_PER_CLIENT_MINUTE + 10):
        refuse(n)
    assert scalar(db_path, "SELECT sum(repeats) FROM rejected_requests") == mm.REJECTIONS_PER_CLIENT_MINUTE
    refuse(0, **address(1))
    assert scalar(db_path, "SELECT sum(repeats) FROM rejected_requests") == mm.REJECTIONS_PER_CLIENT_MINUTE + 1


def test_identical_refusals_share_a_row_and_keep_the_owners_one_in_view(owner: Owner, kit: Kit) -> None:
    real = kit.post(kit.body("registered", kit.token(), "reg-1"), secret="mmsk_not-the-secret")
    assert real.status_code == 401
    for n in range(25):  # a stranger who knows the server id, one kind of junk, from other addresses
        junk = kit.client.post(mm.INGEST_PATH, data=json.dumps({"server_id": kit.server_id, "n": n}),
                               headers={mm.SIGNATURE_HEADER: "t=1,v1=sha256=" + "0" * 64}, **address(n))
        assert junk.status_code == 400
    page = owner.page(TAB.format(game="mygame", server=kit.server_id))
    shown = rejected_rows(page)
    assert [(row["status"], row["error"]) for row in shown] == [(400, "missing field"), (401, "bad_signature")]
    assert "25 times" in page.one("span", class_="repeats").text


@pytest.mark.sqlite_only  # SQLite's query plan
def test_the_leaderboard_reads_an_index(kit: Kit, owner: Owner, store: mm.Store, db_path: str) -> None:
    with sqlite3.connect(db_path) as db:
        db.executemany("INSERT INTO referrer_counts (server_id, referrer_code, clicked, qualified) VALUES (?, ?, 1, ?)",
                       [(kit.server_id, f"code{n}", n % 3) for n in range(3000)])
        db.execute("ANALYZE")
    statements: list[str] = []
    owner.client.application.extensions["mmoref"].connect().set_trace_callback(statements.append)
    page = owner.page(TAB.format(game="mygame", server=kit.server_id))
    assert len(page.by_id("leaderboard").all("tr")) == 1 + 20  # the tab shows the top 20
    leaders = [sql for sql in statements if "qualified > 0" in sql]
    assert len(leaders) == 1
    plan = " ".join(row[3] for row in rows(db_path, "EXPLAIN QUERY PLAN " + leaders[0]))
    assert "USING INDEX referrer_counts_by_qualified" in plan and "TEMP B-TREE" not in plan, plan


# Item 18: the security notes say what an IP hash is ###########################

def test_readme_calls_ip_hashes_pseudonymised() -> None:
    text = (ROOT / "docs" / "security.md").read_text()
    security = text[text.index("## Security notes"):]
    assert "pseudonymised, not anonymous" in security
    assert "not the IP itself" not in text
    assert "not the IP itself" not in (ROOT / "README.md").read_text()
