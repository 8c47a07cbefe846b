"""Issues 7 and 8: JSON 404s near the ingest path, `/` and `/dashboard` leading to the dashboard,
the dashboard's security headers, logged-in input that gave 500s, and names made only of dots."""
from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qs
from urllib.parse import urlsplit

import pytest
from flask import Flask

import mmoref_server as mm
from tests.support import KIT_TAB
from tests.support import Owner
from tests.support import html
from tests.support import location
from tests.support import login
from tests.support import snapshot

NOT_FOUND = {"ok": False, "error": "not found", "hint": "POST events to /api/referral/events"}


# 404 and the way in ##############################################################

@pytest.mark.parametrize("path", ["/api/referral/events/", "/api/referral/event", "/api/referrals/events",
                                  "/api/nothing"])
@pytest.mark.parametrize("method", ["GET", "POST"])
def test_near_miss_api_paths_answer_json_404(client: Any, path: str, method: str) -> None:
    response = client.open(path, method=method, data=b"{}")
    assert response.status_code == 404 and response.mimetype == "application/json"
    assert response.get_json() == NOT_FOUND
    assert list(response.get_json()) == ["ok", "error", "hint"]


def test_other_paths_keep_the_html_404(client: Any) -> None:
    response = client.get("/nothing-here")
    assert response.status_code == 404 and response.mimetype == "text/html"


def test_under_a_host_app_only_the_blueprints_api_paths_answer_json(db_path: str) -> None:
    host = Flask("owners_site")
    host.config.update(MMOREF_DB=db_path, TESTING=True, SECRET_KEY="the host's own key")  # registering needs one
    host.register_blueprint(mm.blueprint, url_prefix="/mmoref")
    client = host.test_client()
    inside = client.get("/mmoref/api/referral/event")
    assert inside.status_code == 404 and inside.get_json() == NOT_FOUND
    outside = client.get("/api/referral/event")  # the host's own path: its own 404
    assert outside.status_code == 404 and outside.mimetype == "text/html"


def test_root_leads_to_the_dashboard(client: Any) -> None:
    assert location(client.get("/")) == "/dashboard/"


def test_dashboard_without_slash_asks_to_log_in_with_a_clean_next(client: Any) -> None:
    response = client.get("/dashboard", follow_redirects=True)
    assert response.status_code == 200 and response.request.path == "/dashboard/login"
    assert parse_qs(urlsplit(response.request.url).query) == {"next": ["/dashboard/"]}
    with_query = location(client.get(f"{KIT_TAB}?event=registered"))
    assert parse_qs(urlsplit(with_query).query) == {"next": [f"{KIT_TAB}?event=registered"]}


# Security headers ################################################################

@pytest.mark.parametrize("path", ["/dashboard/login", "/dashboard/", KIT_TAB])
def test_dashboard_pages_send_security_headers(client: Any, kit: Any, path: str) -> None:
    login(client)
    response = client.get(path)
    page = html(response)
    headers = response.headers
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Referrer-Policy"] == "same-origin"
    policy = headers["Content-Security-Policy"]
    nonce = page.one("style").attrs["nonce"]
    assert re.fullmatch(r"[A-Za-z0-9_-]{16,}", nonce)
    assert f"style-src 'nonce-{nonce}'" in policy and "default-src 'none'" in policy
    assert "script-src" not in policy and "unsafe-inline" not in policy
    assert "style=" not in page.raw and "<script" not in page.raw  # nothing the policy would block


def test_each_page_gets_its_own_style_nonce(client: Any) -> None:
    first, second = (client.get("/dashboard/login").headers["Content-Security-Policy"] for _ in range(2))
    assert first != second


# Logged-in input that gave 500 ###################################################

@pytest.mark.parametrize("query", ["before=12345678901234567890", "after=12345678901234567890",
                                   "before=-5", "after=abc"])
def test_out_of_range_log_cursor_is_ignored(owner: Owner, kit: Any, query: str) -> None:
    page = owner.page(f"{KIT_TAB}?{query}")
    assert page.by_id("delivery-log").text.count("No events yet") == 1


def test_twenty_digit_log_id_is_404(owner: Owner, kit: Any) -> None:
    response = owner.client.get(f"{KIT_TAB}/log/12345678901234567890")
    assert response.status_code == 404 and response.mimetype == "text/html"


@pytest.mark.parametrize("target", ["/dashboard/\r\nSet-Cookie: a=b", "/dashboard/\n", "/dashboard/\\evil"])
def test_control_characters_in_next_lead_home(client: Any, target: str) -> None:
    response = login(client, next_url=target)
    assert location(response) == "/dashboard/"
    assert "a=b" not in response.headers.get("Set-Cookie", "")


def test_control_characters_in_back_lead_to_the_tab(owner: Owner, registered: dict) -> None:
    url = f"{KIT_TAB}/referral/{registered['referral_id']}/reverse"
    response = owner.post(url, back=f"{KIT_TAB}\r\nX-Injected: 1", confirmed="yes")
    assert location(response) == KIT_TAB and "X-Injected" not in response.headers
    question = owner.client.get(url, query_string={"back": f"{KIT_TAB}\r\n"})
    assert question.status_code == 200 and f'value="{KIT_TAB}"' in question.text


# Names made only of dots #########################################################

@pytest.mark.parametrize(("server_id", "game"), [(".", "g"), ("..", "g"), ("srv_dots", "."), ("srv_dots", "...")])
def test_dots_only_names_are_refused_on_the_dashboard(owner: Owner, db_path: str, server_id: str,
                                                      game: str) -> None:
    before = snapshot(db_path)
    page = owner.post_page("/dashboard/servers", 400, server_id=server_id, game=game)
    assert "must not be only dots" in page.one("p", role="alert").text
    assert snapshot(db_path) == before


def test_dots_only_names_are_refused_by_the_cli(runner: Any) -> None:
    result = runner("add-server", "..", "--game", "g")
    assert result.exit_code != 0 and "must not be only dots" in result.stderr
    assert runner("add-server", "srv.1", "--game", "g.v2").exit_code == 0  # dots among other characters are fine

