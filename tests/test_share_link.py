"""docs/contract.md §3: GET /r/<server_id>?ref=<code> records a click, mints a token, sets the cookie, redirects."""
from __future__ import annotations

import hashlib
import re
import urllib.parse

import pytest

import mmoref_server as mm
from tests.support import scalar
from tests.support import send

pytestmark = pytest.mark.both_engines  # the same on SQLite and on PostgreSQL

SERVER = "srv_123"   # the `kit` fixture's server
REGISTRATION = urllib.parse.urlsplit("https://game.example/register?lang=en")
URL_SAFE = re.compile(r"[A-Za-z0-9_.-]+")
BASE64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
NOT_FOUND_TEXT = b"This referral link is not valid."


def follow_link(client, server_id: str = SERVER, code: str | None = "alice", **kwargs):
    query = {} if code is None else {"ref": code}
    return client.get(f"/r/{server_id}", query_string=query, **kwargs)


def minted_token(response) -> str:
    """The token the redirect carries (and the cookie must carry the same)."""
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(response.headers["Location"]).query)
    return query["mmref"][0]


def mmref_cookie(response) -> dict[str, str]:
    """The mmref Set-Cookie header as {attribute (lower case): value}, the value under "mmref"."""
    headers = [h for h in response.headers.getlist("Set-Cookie") if h.startswith("mmref=")]
    assert len(headers) == 1, response.headers.getlist("Set-Cookie")
    pairs = (part.strip().partition("=") for part in headers[0].split(";"))
    return {(key if key == "mmref" else key.lower()): value for key, _, value in pairs}


def referral_count(db_path: str) -> int:
    return scalar(db_path, "SELECT count(*) FROM referrals")


def assert_not_found_page(response) -> None:
    assert response.status_code == 404
    assert response.mimetype == "text/html"
    assert NOT_FOUND_TEXT in response.data
    assert "Set-Cookie" not in response.headers


def test_redirects_to_the_registration_url_with_the_token_added(kit, client, store):
    response = follow_link(client)
    assert response.status_code == 302
    location = urllib.parse.urlsplit(response.headers["Location"])
    assert (location.scheme, location.netloc, location.path) == (REGISTRATION.scheme, REGISTRATION.netloc,
                                                                 REGISTRATION.path)
    token = minted_token(response)
    assert urllib.parse.parse_qs(location.query) == {"lang": ["en"], "mmref": [token]}
    assert mmref_cookie(response)["mmref"] == token


def test_an_existing_mmref_parameter_is_replaced_not_doubled(kit, client, store):
    store.update_server(SERVER, registration_url="https://game.example/join?mmref=old&x=1&x=2")
    response = follow_link(client)
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(response.headers["Location"]).query)
    assert query == {"x": ["1", "2"], "mmref": [minted_token(response)]}


@pytest.fixture
def app_with_server(db_path, monkeypatch):
    """make(env) -> a test client of an app created under the MMOREF_* `env`, with srv_123."""
    def make(env: dict[str, str]):
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        app = mm.create_app({"MMOREF_DB": db_path, "TESTING": True})
        with app.app_context():
            mm.get_store().add_server(SERVER, "g", "", "https://game.example/register?lang=en")
        return app.test_client()
    return make


@pytest.mark.parametrize(("base_url", "env", "headers", "secure"), [
    ("http://localhost", {}, {}, False),
    ("https://localhost", {}, {}, True),
    ("http://localhost", {}, {"X-Forwarded-Proto": "https"}, False),     # untrusted proxy header
    ("http://localhost", {"MMOREF_TRUSTED_PROXY": "127.0.0.1"}, {"X-Forwarded-Proto": "https"}, True),
    ("http://localhost", {"MMOREF_TRUSTED_PROXY": "127.0.0.1"}, {"X-Forwarded-Proto": "http"}, False),
    ("http://localhost", {"MMOREF_TRUSTED_PROXY": "127.0.0.1"}, {}, False),
], ids=["http", "https", "forwarded-untrusted", "forwarded-trusted", "trusted-http", "trusted-no-header"])
def test_cookie_attributes(app_with_server, base_url, env, headers, secure):
    response = follow_link(app_with_server(env), base_url=base_url, headers=headers)
    assert response.status_code == 302
    cookie = mmref_cookie(response)
    assert cookie["mmref"] == minted_token(response)
    assert cookie["max-age"] == str(90 * 24 * 3600)   # the default MMOREF_TOKEN_TTL
    assert cookie["samesite"] == "Lax"
    assert "httponly" in cookie
    assert ("secure" in cookie) is secure


def test_cookie_max_age_follows_the_token_ttl(app_with_server):
    response = follow_link(app_with_server({"MMOREF_TOKEN_TTL": "1234"}))
    assert response.status_code == 302
    assert mmref_cookie(response)["max-age"] == "1234"


@pytest.mark.parametrize("code", [None, "", "a" * 65, "a b", "<x>", "alice/bob", "ali%ce"],
                         ids=["absent", "empty", "65-chars", "space", "markup", "slash", "percent"])
def test_bad_referrer_code_is_a_plain_404(kit, client, db_path, code):
    response = follow_link(client, code=code)
    assert_not_found_page(response)
    assert b"<x>" not in response.data
    assert referral_count(db_path) == 0


def test_a_64_character_code_is_accepted(kit, client, store):
    response = follow_link(client, code="a" * 64)
    assert response.status_code == 302
    claims = mm.read_token(store.token_key, minted_token(response))
    assert store.referral(claims.referral_id)["referrer_code"] == "a" * 64


def _disable_referrals(store):
    store.update_server(SERVER, referrals_enabled=0)


def _drop_registration_url(store):
    store.update_server(SERVER, registration_url=None)


@pytest.mark.parametrize(("server_id", "setup"), [
    pytest.param("nosuch", lambda store: None, id="unknown-server"),
    pytest.param(SERVER, _disable_referrals, id="referrals-disabled"),
    pytest.param(SERVER, _drop_registration_url, id="no-registration-url"),
])
def test_link_that_cannot_be_followed_is_a_plain_404(kit, client, store, db_path, server_id, setup):
    setup(store)
    assert_not_found_page(follow_link(client, server_id))
    assert referral_count(db_path) == 0


def test_the_click_is_recorded(kit, client, store):
    before = mm.now()
    response = follow_link(client, headers={"User-Agent": "U" * 300},
                           environ_base={"REMOTE_ADDR": "203.0.113.7"})
    assert response.status_code == 302
    claims = mm.read_token(store.token_key, minted_token(response))
    referral = store.referral(claims.referral_id)
    assert (referral["server_id"], referral["referrer_code"], referral["state"]) == (SERVER, "alice", "clicked")
    assert before <= referral["issued_at"] <= mm.now()
    assert referral["user_agent"] == "U" * 200
    ip_hash = referral["ip_hash"]
    assert ip_hash and "203.0.113.7" not in ip_hash
    assert not hashlib.sha256(b"203.0.113.7").hexdigest().startswith(ip_hash)  # salted, not a bare hash


def test_ip_hash_is_stable_per_address(kit, client, store):
    def ip_hash_of(address: str) -> str:
        response = follow_link(client, environ_base={"REMOTE_ADDR": address})
        return store.referral(mm.read_token(store.token_key, minted_token(response)).referral_id)["ip_hash"]

    first, again, other = ip_hash_of("198.51.100.1"), ip_hash_of("198.51.100.1"), ip_hash_of("198.51.100.2")
    assert first == again != other


def test_token_for_a_64_character_server_id_is_short_url_safe_and_works(client, store):
    server_id = "s" * 64
    secret, _ = store.add_server(server_id, "g", "", "https://game.example/register")
    response = follow_link(client, server_id)
    assert response.status_code == 302
    token = minted_token(response)
    assert len(token) <= 200 and URL_SAFE.fullmatch(token)
    referral_id = mm.read_token(store.token_key, token).referral_id

    registered = send(client, secret, "registered", token, server_id, "reg-1", referee_identity="player-1")
    assert registered.status_code == 200
    assert registered.json == {"ok": True, "referral_id": referral_id, "state": "registered"}


def flip(token: str, index: int) -> str:
    """`token` with the lowest bit of its base64url character at `index` flipped."""
    character = BASE64URL[BASE64URL.index(token[index]) ^ 1]
    return token[:index] + character + token[index + 1:]


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_a_token_with_a_flipped_character_is_refused(kit, client, store, where):
    token = minted_token(follow_link(client))
    letters = [i for i, c in enumerate(token) if c != "."]
    index = {"first": letters[0], "middle": letters[len(letters) // 2], "last": letters[-1]}[where]
    forged = flip(token, index)
    assert forged != token

    response = kit.send("registered", forged, "reg-1")
    assert response.status_code == 404
    assert (response.json["ok"], response.json["error"]) == (False, "unknown token")
    assert kit.send("registered", token, "reg-1").json["state"] == "registered"  # the genuine one still works
