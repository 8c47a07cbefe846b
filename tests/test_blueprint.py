"""Embedding: an owner's own Flask app registers `mm.blueprint` under /mmoref."""
from __future__ import annotations

import json
import urllib.parse

import pytest
from flask import Flask

import mmoref_server as mm
from tests.support import INGEST
from tests.support import assert_good_hint
from tests.support import send
from tests.support import signed_post

PREFIX = "/mmoref"
SERVER = "srv_1"


@pytest.fixture
def host(db_path) -> Flask:
    """The owner's app: its own routes and JSON settings, our blueprint under /mmoref."""
    app = Flask("owners_site")
    app.config.update(MMOREF_DB=db_path, TESTING=True)
    app.json.sort_keys = True     # would put "error" before "ok" if it reached our bodies
    app.json.compact = False

    @app.get("/")
    def home():
        return "the owner's home page"

    @app.get("/api/status")
    def status():
        return {"zeta": 1, "alpha": 2}

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
    app.config.update(MMOREF_DB=db_path, MMOREF_TOKEN_TTL=60)
    app.register_blueprint(mm.blueprint, url_prefix=PREFIX)
    assert app.config["MMOREF_TOKEN_TTL"] == 60
    assert app.config["MMOREF_REPLAY_WINDOW"] == mm.SETTINGS["MMOREF_REPLAY_WINDOW"][1]
    with app.app_context():
        mm.get_store().add_server(SERVER, "g", "", "https://game.example/join")
    cookie = app.test_client().get(f"{PREFIX}/r/{SERVER}", query_string={"ref": "a"}).headers["Set-Cookie"]
    assert "Max-Age=60" in cookie
