"""Embedding: an owner's own Flask app registers `mm.blueprint` under /mmoref."""
from __future__ import annotations

import json
import urllib.parse

import pytest
from flask import Flask
from flask import flash
from flask import get_flashed_messages
from flask import session

import mmoref_server as mm
from tests.support import INGEST
from tests.support import PASSWORD
from tests.support import assert_good_hint
from tests.support import csrf
from tests.support import html
from tests.support import location
from tests.support import login
from tests.support import send
from tests.support import signed_post

PREFIX = "/mmoref"
DASHBOARD = PREFIX + "/dashboard/"
SERVER = "srv_1"
HOST_KEY = "the owner's own secret key"


@pytest.fixture
def host(db_path) -> Flask:
    """The owner's app: its own routes and JSON settings, our blueprint under /mmoref."""
    app = Flask("owners_site")
    app.config.update(MMOREF_DB=db_path, TESTING=True, SECRET_KEY=HOST_KEY, MMOREF_ADMIN_PASSWORD=PASSWORD)
    app.json.sort_keys = True     # would put "error" before "ok" if it reached our bodies
    app.json.compact = False

    @app.get("/")
    def home():
        return "the owner's home page"

    @app.get("/api/status")
    def status():
        return {"zeta": 1, "alpha": 2}

    @app.post("/account/login")  # the host's own login, in the host's own session
    def host_login():
        session["user"] = "host-user"
        flash("Welcome back")
        return "logged in"

    @app.post("/account/logout")
    def host_logout():
        session.clear()
        return "logged out"

    @app.get("/account")
    def account():
        return {"user": session.get("user"), "messages": get_flashed_messages()}

    app.register_blueprint(mm.blueprint, url_prefix=PREFIX)
    return app


@pytest.fixture
def client(host):
    return host.test_client()


@pytest.fixture
def secret(host) -> str:
    with host.app_context():
        return mm.get_store().add_server(SERVER, "g", "", "https://game.example/join")[0]


@pytest.fixture
def token(host, secret) -> str:
    with host.app_context():
        return mm.get_store().mint_referral(SERVER, "alice")[0]


def keys_in_order(response) -> list[str]:
    return list(json.loads(response.data))


def test_signed_ingest_under_the_prefix(client, secret, token):
    response = send(client, secret, "registered", token, SERVER, "reg-1", path=PREFIX + INGEST,
                    referee_identity="player-1")
    assert response.status_code == 200
    assert keys_in_order(response) == ["ok", "referral_id", "state"]
    assert response.json["state"] == "registered"
    assert response.data.startswith(b'{"ok": true')


def test_error_bodies_keep_ok_first_despite_sort_keys(client, secret, token):
    raw = mm.build_body("qualified", token, SERVER, "qua-1")
    response = signed_post(client, "wrong-secret", raw, path=PREFIX + INGEST)
    assert response.status_code == 401
    assert keys_in_order(response) == ["ok", "error", "hint", "reason"]
    assert (response.json["error"], response.json["reason"]) == ("bad_signature", "mac_mismatch")
    assert_good_hint(response.json)


def test_method_not_allowed_under_the_prefix(client):
    response = client.get(PREFIX + INGEST)
    assert response.status_code == 405
    assert response.headers["Allow"] == "POST"
    assert keys_in_order(response)[0] == "ok"
    assert response.json["error"] == "method not allowed"
    assert_good_hint(response.json)


def test_share_link_under_the_prefix(client, secret):
    response = client.get(f"{PREFIX}/r/{SERVER}", query_string={"ref": "alice"})
    assert response.status_code == 302
    location = urllib.parse.urlsplit(response.headers["Location"])
    assert location.netloc == "game.example" and "mmref=" in location.query


def test_healthz_under_the_prefix(client):
    response = client.get(PREFIX + "/healthz")
    assert (response.status_code, response.data) == (200, b'{"ok": true}')


def test_the_hosts_own_routes_still_work(client, secret):
    home = client.get("/")
    assert (home.status_code, home.data) == (200, b"the owner's home page")
    status = client.get("/api/status")
    assert status.status_code == 200
    assert keys_in_order(status) == ["alpha", "zeta"]  # the host's sort_keys applies to the host's routes


@pytest.mark.parametrize("path", [INGEST, "/healthz", f"/r/{SERVER}?ref=alice"])
def test_nothing_is_served_outside_the_prefix(client, secret, path):
    assert client.get(path).status_code == 404


def test_mmoref_settings_default_without_overriding_the_hosts(db_path):
    app = Flask("owners_site")
    app.config.update(MMOREF_DB=db_path, MMOREF_TOKEN_TTL=60, SECRET_KEY=HOST_KEY)
    app.register_blueprint(mm.blueprint, url_prefix=PREFIX)
    assert app.config["MMOREF_TOKEN_TTL"] == 60
    assert app.config["MMOREF_REPLAY_WINDOW"] == mm.SETTINGS["MMOREF_REPLAY_WINDOW"][1]
    with app.app_context():
        mm.get_store().add_server(SERVER, "g", "", "https://game.example/join")
    cookie = app.test_client().get(f"{PREFIX}/r/{SERVER}", query_string={"ref": "a"}).headers["Set-Cookie"]
    assert "Max-Age=60" in cookie


# The host's session: the dashboard keeps its own keys in it, and touches no other ##

def dashboard_csrf(client) -> str:
    return csrf(html(client.get(DASHBOARD)))


def test_logging_in_and_out_of_the_dashboard_leaves_the_hosts_user_logged_in(client):
    assert client.post("/account/login").status_code == 200
    assert location(login(client, prefix=PREFIX)) == DASHBOARD
    assert client.get("/account").json["user"] == "host-user"

    assert location(client.post(PREFIX + "/dashboard/logout", data={"csrf_token": dashboard_csrf(client)})) \
        == PREFIX + "/dashboard/login"
    assert location(client.get(DASHBOARD)).startswith(PREFIX + "/dashboard/login")  # the owner is logged out
    assert client.get("/account").json["user"] == "host-user"


def test_the_host_and_the_dashboard_each_keep_their_flashed_messages(client, secret):
    assert client.post("/account/login").status_code == 200  # flashes "Welcome back" for the host's next page
    assert location(login(client, prefix=PREFIX)) == DASHBOARD
    assert html(client.get(DASHBOARD)).flashes == []
    disabled = client.post(f"{PREFIX}/dashboard/g/{SERVER}/referrals/enabled",
                           data={"csrf_token": dashboard_csrf(client), "enabled": "0"})
    assert client.get("/account").json["messages"] == ["Welcome back"]  # the host's only, untouched
    assert html(client.get(location(disabled))).flashes == [
        "Referrals disabled: events now get 404 referrals not enabled."]


def test_the_hosts_session_clear_logs_the_owner_out_and_a_new_login_works(client):
    assert location(login(client, prefix=PREFIX)) == DASHBOARD
    assert client.post("/account/logout").data == b"logged out"
    assert location(client.get(DASHBOARD)) == f"{PREFIX}/dashboard/login?next={DASHBOARD}"
    assert location(login(client, prefix=PREFIX)) == DASHBOARD
    assert html(client.get(DASHBOARD)).one("h1").text == "Servers"


def test_a_host_without_a_secret_key_is_refused_in_one_line_at_registration(db_path):
    app = Flask("owners_site")
    app.config.update(MMOREF_DB=db_path)
    with pytest.raises(mm.ConfigError) as refused:
        app.register_blueprint(mm.blueprint, url_prefix=PREFIX)
    message = str(refused.value)
    assert "\n" not in message
    assert "SECRET_KEY" in message and "before register_blueprint()" in message
