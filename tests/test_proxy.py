"""MMOREF_TRUSTED_PROXY against a real `python mmoref_server.py` process behind a pretend TLS proxy.

All traffic goes to 127.0.0.1 (the "proxy"); 203.0.113.x and 198.51.100.x are documentation
addresses that only appear inside X-Forwarded-For headers.
"""
from __future__ import annotations

import http.client

import pytest

import mmoref_server as mm
from tests.support import INGEST
from tests.support import Browser
from tests.support import gunicorn_command

pytestmark = pytest.mark.slow

SERVER = "srv_proxy"
PASSWORD = "correct horse battery"
FORWARDED_HTTPS = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "refer.game.example",
                   "X-Forwarded-Port": "443"}


@pytest.fixture
def proxied_server(live_server, db_path):
    """start(command=None, **env) -> the port of a real server (`serve`, or `command`) with srv_proxy and a
    known dashboard password."""
    store = mm.open_store(db_path)
    store.add_server(SERVER, "mygame", "Proxy", "https://game.example/register")
    store.set_admin_password(PASSWORD)

    def start(command: list[str] | None = None, **env: str) -> int:
        return live_server(env=env, command=command).port
    return start


def set_cookie(headers: http.client.HTTPMessage, name: str) -> str:
    """The Set-Cookie header that sets `name`."""
    matching = [value for value in headers.get_all("Set-Cookie") or [] if value.startswith(f"{name}=")]
    assert len(matching) == 1, headers.get_all("Set-Cookie")
    return matching[0]


def is_secure(set_cookie_header: str) -> bool:
    return "secure" in [part.strip().lower() for part in set_cookie_header.split(";")]


def lock_out(port: int, forwarded_for: str) -> None:
    """Five wrong passwords from one client; the sixth try is refused with 429."""
    browser = Browser(port, **{"X-Forwarded-For": forwarded_for})
    for _ in range(mm.LOGIN_FREE_FAILURES):
        status, _, page = browser.log_in("wrong password")
        assert status == 401, page
        assert "Wrong password." in page
    status, _, page = browser.log_in(PASSWORD)
    assert status == 429, page
    assert "Too many failed logins" in page


def test_share_link_cookie_is_secure_behind_the_trusted_proxy(proxied_server):
    port = proxied_server(MMOREF_TRUSTED_PROXY="127.0.0.1")
    status, headers, _ = Browser(port, **FORWARDED_HTTPS).request("GET", f"/r/{SERVER}?ref=alice")
    assert status == 302
    assert headers["Location"].startswith("https://game.example/register?mmref=")
    assert is_secure(set_cookie(headers, "mmref"))


def test_login_throttle_counts_the_forwarded_client(proxied_server):
    port = proxied_server(MMOREF_TRUSTED_PROXY="127.0.0.1")
    lock_out(port, "203.0.113.9")
    owner = Browser(port, **{"X-Forwarded-For": "203.0.113.10"}, **FORWARDED_HTTPS)
    status, headers, page = owner.log_in(PASSWORD)
    assert status == 302, page
    assert headers["Location"].endswith("/dashboard/")
    assert is_secure(set_cookie(headers, mm.SESSION_COOKIE))


def test_a_spoofed_hop_before_the_proxy_does_not_count(proxied_server):
    """The proxy appends the real client; what a client put before it is ignored."""
    port = proxied_server(MMOREF_TRUSTED_PROXY="127.0.0.1")
    for spoofed in range(mm.LOGIN_FREE_FAILURES):
        chain = f"198.51.100.{spoofed}, 203.0.113.20"
        status, _, page = Browser(port, **{"X-Forwarded-For": chain}).log_in("wrong password")
        assert status == 401, page
    status, _, page = Browser(port, **{"X-Forwarded-For": "203.0.113.20"}).log_in(PASSWORD)
    assert status == 429, page
    assert "Too many failed logins" in page


def test_dashboard_share_link_uses_the_forwarded_scheme_and_host(proxied_server):
    port = proxied_server(MMOREF_TRUSTED_PROXY="127.0.0.1")
    owner = Browser(port, **{"X-Forwarded-For": "203.0.113.9"}, **FORWARDED_HTTPS)
    status, _, page = owner.log_in(PASSWORD)
    assert status == 302, page
    status, _, page = owner.request("GET", f"/dashboard/mygame/{SERVER}/referrals")
    assert status == 200, page
    assert f"https://refer.game.example/r/{SERVER}?ref=" in page
    assert "127.0.0.1" not in page


# The old switch, still read: MMOREF_TRUST_PROXY=1 trusted MMOREF_TRUSTED_PROXY, which defaulted to loopback
OLD_SETTINGS = {
    "neither": ({}, ()),
    "addresses-alone": ({"MMOREF_TRUSTED_PROXY": "192.0.2.1"}, ("192.0.2.1",)),
    "old-switch-on": ({"MMOREF_TRUST_PROXY": "1"}, ("127.0.0.1", "::1")),
    "old-switch-on-with-addresses": ({"MMOREF_TRUST_PROXY": "on", "MMOREF_TRUSTED_PROXY": "192.0.2.1"}, ("192.0.2.1",)),
    "old-switch-off-with-addresses": ({"MMOREF_TRUST_PROXY": "0", "MMOREF_TRUSTED_PROXY": "192.0.2.1"}, ()),
}


@pytest.mark.parametrize(("env", "trusted"), OLD_SETTINGS.values(), ids=OLD_SETTINGS.keys())
def test_the_deprecated_switch_keeps_trusting_what_it_trusted(env, trusted):
    assert mm.load_settings(env)["MMOREF_TRUSTED_PROXY"] == trusted


def test_an_installation_with_the_deprecated_switch_keeps_working_and_is_told_once(proxied_server, live_server):
    server = live_server(env={"MMOREF_TRUST_PROXY": "1"})   # the database proxied_server set up
    status, headers, _ = Browser(server.port, **FORWARDED_HTTPS).request("GET", f"/r/{SERVER}?ref=alice")
    assert status == 302
    assert is_secure(set_cookie(headers, "mmref"))
    told = [line for line in server.stop().splitlines() if "MMOREF_TRUST_PROXY" in line]
    assert told == ["MMOREF_TRUST_PROXY is deprecated: for the same effect, set MMOREF_TRUSTED_PROXY=127.0.0.1,::1"
                    " and remove MMOREF_TRUST_PROXY"]


@pytest.mark.parametrize("env", [{}, {"MMOREF_TRUSTED_PROXY": "192.0.2.1"}],
                         ids=["setting-off", "not-the-trusted-proxy"])
def test_forwarded_headers_from_an_untrusted_peer_are_ignored(proxied_server, env):
    port = proxied_server(**env)
    status, headers, _ = Browser(port, **FORWARDED_HTTPS).request("GET", f"/r/{SERVER}?ref=alice")
    assert status == 302
    assert not is_secure(set_cookie(headers, "mmref"))
    # every try counts against 127.0.0.1, whatever X-Forwarded-For says
    for attempt in range(mm.LOGIN_FREE_FAILURES):
        status, _, page = Browser(port, **{"X-Forwarded-For": f"203.0.113.{attempt}"}).log_in("wrong password")
        assert status == 401, page
    status, _, page = Browser(port, **{"X-Forwarded-For": "203.0.113.99"}).log_in(PASSWORD)
    assert status == 429, page


TRUST = {"setting-off": ({}, False),
         "not-the-trusted-proxy": ({"MMOREF_TRUSTED_PROXY": "192.0.2.1"}, False),
         "trusted-proxy": ({"MMOREF_TRUSTED_PROXY": "127.0.0.1"}, True)}


@pytest.mark.parametrize(("env", "trusted"), TRUST.values(), ids=TRUST.keys())
def test_under_gunicorn_the_forwarded_scheme_counts_only_from_the_trusted_proxy(proxied_server, env, trusted):
    """gunicorn applies X-Forwarded-Proto from loopback itself (its forwarded_allow_ips): mmoref decides again."""
    port = proxied_server(command=gunicorn_command(), **env)
    browser = Browser(port, **FORWARDED_HTTPS)
    status, headers, _ = browser.request("GET", f"/r/{SERVER}?ref=alice")
    assert status == 302
    assert is_secure(set_cookie(headers, "mmref")) is trusted
    status, headers, page = browser.log_in(PASSWORD)
    assert status == 302, page
    assert is_secure(set_cookie(headers, mm.SESSION_COOKIE)) is trusted
    status, _, page = browser.request("GET", f"/dashboard/mygame/{SERVER}/referrals")
    assert status == 200, page
    origin = "https://refer.game.example" if trusted else f"http://127.0.0.1:{port}"
    assert f'<code id="connect-url">{origin}{INGEST}</code>' in page
