"""docs/contract.md §6: the dashboard's door: a login on every page and form, the password, CSRF, the session."""
from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qs
from urllib.parse import urlsplit

import pytest
from werkzeug.security import check_password_hash

import mmoref_server as mm
from tests.support import KIT_TAB
from tests.support import PASSWORD
from tests.support import Clock
from tests.support import Owner
from tests.support import csrf
from tests.support import database
from tests.support import html
from tests.support import is_logged_in
from tests.support import location
from tests.support import login
from tests.support import snapshot

pytestmark = pytest.mark.both_engines  # the same on SQLite and on PostgreSQL

# Login required everywhere #####################################################

GET_ROUTES = ["/dashboard/", KIT_TAB, f"{KIT_TAB}/log/1", f"{KIT_TAB}/log.csv?event=registered"]

# Every state-changing form; {referral_id} is the `registered` fixture's referral.
POST_ROUTES = [
    ("/dashboard/servers", {"server_id": "srv_new", "game": "g2", "registration_url": "https://new.example/"}),
    (f"{KIT_TAB}/enabled", {"enabled": "0"}),
    (f"{KIT_TAB}/secret", {"grace": "0"}),
    (f"{KIT_TAB}/settings", {"registration_url": "https://new.example/join", "identity_field": "email"}),
    (f"{KIT_TAB}/token", {"ref": "mallory"}),
    (f"{KIT_TAB}/test-event", {}),
    (f"{KIT_TAB}/referral/{{referral_id}}/reverse", {}),
    (f"{KIT_TAB}/referral/{{referral_id}}/reject", {}),
]
POST_IDS = ["add-server", "disable", "rotate", "settings", "mint-token", "test-event", "reverse", "reject"]


@pytest.mark.parametrize("path", GET_ROUTES)
def test_every_page_redirects_to_login_and_back(client: Any, registered: dict, path: str) -> None:
    target = urlsplit(location(client.get(path)))
    assert target.path == "/dashboard/login"
    next_url = parse_qs(target.query)["next"][0]
    assert urlsplit(next_url).path == urlsplit(path).path

    back = location(login(client, next_url=next_url))
    assert back == next_url.removesuffix("?")  # an empty query ("/dashboard/?") is dropped
    response = client.get(back)
    assert response.status_code == 200
    assert response.mimetype in ("text/html", "text/csv")


@pytest.mark.parametrize(("path", "form"), POST_ROUTES, ids=POST_IDS)
def test_every_form_refuses_without_login(client: Any, registered: dict, db_path: str, path: str,
                                          form: dict[str, str]) -> None:
    token = csrf(html(client.get("/dashboard/login")))  # a valid token: only the login is missing
    before = snapshot(db_path)
    response = client.post(path.format(**registered), data={"csrf_token": token, **form})
    assert urlsplit(location(response)).path == "/dashboard/login"
    assert snapshot(db_path) == before


@pytest.mark.parametrize(("next_url", "landing"), [
    (KIT_TAB, KIT_TAB),
    (f"{KIT_TAB}?q=reg-1", f"{KIT_TAB}?q=reg-1"),
    ("https://evil.example/dashboard/", "/dashboard/"),
    ("//evil.example/dashboard/", "/dashboard/"),
    ("/dashboard//evil.example/", "/dashboard/"),
    ("/healthz", "/dashboard/"),
    ("javascript:alert(1)", "/dashboard/"),
])
def test_login_next_only_leads_inside_the_dashboard(client: Any, kit: Any, next_url: str, landing: str) -> None:
    assert location(login(client, next_url=next_url)) == landing


def test_wrong_password_is_401_and_logs_nobody_in(client: Any) -> None:
    page = html(login(client, "not-the-password"), 401)
    assert page.one("p", role="alert").text == "Wrong password."
    assert page.by_id("reset-password").text == (  # how the owner resets it, whichever way it is set
        "Forgotten it? On the server, run python mmoref_server.py set-password (with --db when its database is"
        " not ./referrals.db ); when MMOREF_ADMIN_PASSWORD is set, change that and restart.")
    assert page.has_id("password")
    assert not is_logged_in(client)


def test_the_wrong_password_page_names_the_command_the_owner_started(client: Any, monkeypatch: Any) -> None:
    monkeypatch.setattr(mm, "COMMAND", "mmoref")   # as main() sets it under the installed command
    page = html(login(client, "not-the-password"), 401)
    assert page.by_id("reset-password").text.startswith("Forgotten it? On the server, run mmoref set-password (")


def test_failed_logins_are_slowed_down(client: Any, clock: Clock) -> None:
    for _ in range(mm.LOGIN_FREE_FAILURES):
        html(login(client, "guess"), 401)

    refused = html(login(client, PASSWORD), 429)  # even the right password waits
    assert refused.one("p", role="alert").text == "Too many failed logins: wait 1 s and try again."
    assert not is_logged_in(client)

    clock.t += 1
    html(login(client, "guess"), 401)  # the wait has passed; the next failure doubles it
    assert "wait 2 s" in html(login(client, PASSWORD), 429).one("p", role="alert").text

    clock.t += 2
    assert location(login(client, PASSWORD)) == "/dashboard/"
    assert is_logged_in(client)


def test_logout_clears_the_session(owner: Owner) -> None:
    response = owner.post("/dashboard/logout")
    assert location(response) == "/dashboard/login"
    assert any(cookie.startswith(f"{mm.SESSION_COOKIE}=;") for cookie in response.headers.getlist("Set-Cookie"))
    assert not is_logged_in(owner.client)
    # the old CSRF token went with the session
    html(owner.post("/dashboard/servers", server_id="srv_late", game="g"), 400)


def test_with_env_password_the_stored_password_does_not_log_in(client: Any, runner: Any) -> None:
    assert runner("set-password", "--password", "another-password").exit_code == 0
    html(login(client, "another-password"), 401)
    assert location(login(client, PASSWORD)) == "/dashboard/"


@pytest.mark.parametrize("how", ["cli", "store"])
def test_changing_the_password_logs_every_session_out(bare_app: Any, runner: Any, how: str) -> None:
    store = bare_app.extensions["mmoref"]
    store.set_admin_password(PASSWORD)
    client = bare_app.test_client()
    assert location(login(client)) == "/dashboard/"
    assert is_logged_in(client)

    if how == "cli":
        result = runner("set-password", "--password", "a-new-password")
        assert result.exit_code == 0 and "dashboard password changed" in result.stdout
    else:
        store.set_admin_password("a-new-password")

    assert not is_logged_in(client)
    html(login(client, PASSWORD), 401)
    assert location(login(client, "a-new-password")) == "/dashboard/"


def test_without_a_password_the_login_page_says_how_to_set_one(bare_app: Any) -> None:
    client = bare_app.test_client()
    page = html(client.get("/dashboard/login"))
    advice = page.one("p", class_="error").text
    assert "No dashboard password is set yet" in advice
    assert "python mmoref_server.py set-password" in advice and "MMOREF_ADMIN_PASSWORD" in advice
    assert not is_logged_in(client)  # no password is not an open door
    html(login(client, ""), 401)


@pytest.mark.sqlite_only  # reads the SQLite file
def test_the_password_is_stored_only_as_a_hash(bare_app: Any, runner: Any, db_path: str) -> None:
    assert runner("set-password", "--password", PASSWORD).exit_code == 0
    with database(db_path) as db:
        values = [row[0] for row in db.execute("SELECT value FROM meta")]
        stored = db.execute("SELECT value FROM meta WHERE key = 'admin_password_hash'").fetchone()[0]
    assert not any(PASSWORD in value for value in values)
    assert stored.startswith(("scrypt:", "pbkdf2:"))
    assert check_password_hash(stored, PASSWORD)
    client = bare_app.test_client()
    assert "No dashboard password" not in html(client.get("/dashboard/login")).raw
    assert location(login(client)) == "/dashboard/"


def test_first_run_banner_makes_a_password_and_shows_it_once(bare_app: Any) -> None:
    first = "\n".join(mm._login_lines(bare_app))
    match = re.search(r"password (\S+) +\(shown once", first)
    assert match, first
    password = match.group(1)
    assert len(password) >= 12

    second = "\n".join(mm._login_lines(bare_app))
    assert password not in second and "set-password" in second

    client = bare_app.test_client()
    html(login(client, "wrong-password"), 401)
    assert location(login(client, password)) == "/dashboard/"


# CSRF ##########################################################################

BAD_TOKENS = {"missing": None, "empty": "", "wrong": "x" * 43}


@pytest.mark.parametrize("bad", BAD_TOKENS.values(), ids=BAD_TOKENS.keys())
@pytest.mark.parametrize(("path", "form"), [*POST_ROUTES, ("/dashboard/logout", {})], ids=[*POST_IDS, "logout"])
def test_every_form_post_needs_the_csrf_token(owner: Owner, registered: dict, db_path: str, path: str,
                                              form: dict[str, str], bad: str | None) -> None:
    before = snapshot(db_path)
    data = form if bad is None else {"csrf_token": bad, **form}
    page = html(owner.client.post(path.format(**registered), data=data), 400)
    assert page.one("h1").text == "Form expired"
    assert "security token is missing or out of date" in page.text
    assert snapshot(db_path) == before
    assert is_logged_in(owner.client)


@pytest.mark.parametrize("bad", BAD_TOKENS.values(), ids=BAD_TOKENS.keys())
def test_login_needs_the_csrf_token(client: Any, bad: str | None) -> None:
    html(client.get("/dashboard/login"))  # the session now has a token, which is not sent
    data = {"password": PASSWORD} if bad is None else {"password": PASSWORD, "csrf_token": bad}
    page = html(client.post("/dashboard/login", data=data), 400)
    assert page.one("h1").text == "Form expired"
    assert not is_logged_in(client)


def test_login_without_a_session_refuses_an_empty_csrf_token(client: Any) -> None:
    """A client that never opened the login page has no token in its session: an empty one must not match it."""
    page = html(client.post("/dashboard/login", data={"password": PASSWORD, "csrf_token": ""}), 400)
    assert page.one("h1").text == "Form expired"
    assert "security token is missing or out of date" in page.text
    assert not is_logged_in(client)


# Session cookie and key ########################################################

def session_cookie(response: Any) -> dict[str, str | bool]:
    """The attributes of the response's session Set-Cookie (names lower-cased)."""
    for header in response.headers.getlist("Set-Cookie"):
        if header.startswith(f"{mm.SESSION_COOKIE}="):
            attributes = [part.strip() for part in header.split(";")[1:]]
            return {name.lower(): value or True for name, _, value in (a.partition("=") for a in attributes)}
    raise AssertionError("no session cookie set")


@pytest.mark.parametrize(("base_url", "secure"), [("https://localhost", True), ("http://localhost", False)])
def test_session_cookie_flags(client: Any, base_url: str, secure: bool) -> None:
    response = login(client, base_url=base_url)
    assert location(response) == "/dashboard/"
    flags = session_cookie(response)
    assert flags["httponly"] is True
    assert flags["samesite"] == "Lax"
    assert ("secure" in flags) is secure


def test_secret_key_is_per_installation_and_stable(tmp_path: Any) -> None:
    def make(name: str) -> Any:
        return mm.create_app({"MMOREF_DB": str(tmp_path / name), "TESTING": True, "MMOREF_ADMIN_PASSWORD": PASSWORD})

    first, other, first_again = make("a.db"), make("b.db"), make("a.db")
    assert len(first.config["SECRET_KEY"]) >= 32
    assert first.config["SECRET_KEY"] != other.config["SECRET_KEY"]
    assert first.config["SECRET_KEY"] == first_again.config["SECRET_KEY"]

    # same password, different installation: a session cookie of one is worthless in the other
    client = first.test_client()
    assert location(login(client)) == "/dashboard/"
    cookie = client.get_cookie(mm.SESSION_COOKIE).value
    for app, accepted in ((first_again, True), (other, False)):
        replay = app.test_client()
        replay.set_cookie(mm.SESSION_COOKIE, cookie)
        assert is_logged_in(replay) is accepted
