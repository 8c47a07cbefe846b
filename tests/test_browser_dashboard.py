"""The dashboard in Chromium after issues 7 and 8: the Content-Security-Policy leaves the page styled,
a button's result is scrolled into view, and the event page fits a 390 px phone."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests import test_browser as ui
from tests.test_browser import ENV
from tests.test_browser import follow
from tests.test_browser import log_rows
from tests.test_browser import login
from tests.test_browser import new_server
from tests.test_browser import open_tab
from tests.test_browser import screenshot
from tests.test_browser import send

pytestmark = pytest.mark.browser
browser, page = ui.browser, ui.page  # test_browser.py's fixtures: Chromium, and a fresh page per test

PHONE = {"width": 390, "height": 844}


def sideways_overflow(page: Any) -> int:
    return page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")


def test_pages_are_styled_under_the_content_security_policy(page: Any, live_server: Any, db_path: str) -> None:
    new_server(db_path)
    server = live_server(env=ENV)
    violations: list[str] = []
    page.on("console", lambda message: violations.append(message.text)
            if "Content Security Policy" in message.text else None)
    login(page, server.url)
    open_tab(page, server.url, "browsergame", "srv_browser")
    assert page.evaluate("getComputedStyle(document.body).backgroundColor") == "rgb(246, 247, 249)"
    assert page.evaluate("getComputedStyle(document.querySelector('section')).borderRadius") == "8px"
    assert violations == []


def test_the_test_events_answer_is_scrolled_into_view(page: Any, live_server: Any, db_path: str,
                                                      tmp_path: Path) -> None:
    new_server(db_path)
    server = live_server(env=ENV)
    page.set_viewport_size({"width": 1280, "height": 600})
    login(page, server.url)
    open_tab(page, server.url, "browsergame", "srv_browser")
    follow(page.get_by_role("button", name="Send test event", exact=True))
    result = page.locator("#test-result")
    result.wait_for()
    box = result.bounding_box()
    assert box is not None and -1 <= box["y"] < 600, f"the answer is at y={box}, outside the 600 px window"
    assert page.evaluate("window.scrollY") > 0
    screenshot(page, tmp_path / "test-result-in-view.png")


def test_the_event_page_fits_a_phone(page: Any, live_server: Any, db_path: str, tmp_path: Path) -> None:
    secret = new_server(db_path)
    server = live_server(env=ENV)
    login(page, server.url)
    open_tab(page, server.url, "browsergame", "srv_browser")
    page.fill("#ref", "a-rather-long-referrer-code-1234")
    follow(page.get_by_role("button", name="Mint a test token"))
    token = page.locator("#token-value").inner_text().strip()
    send(server.url, secret, "srv_browser", "registered", token, "registration-event-0001",
         referee="player-with-a-long-name-7842@example.com")
    open_tab(page, server.url, "browsergame", "srv_browser")
    [row] = log_rows(page)
    page.set_viewport_size(PHONE)
    follow(page.locator(f'#delivery-log tr[data-id="{row["id"]}"] a.detail'))
    screenshot(page, tmp_path / "detail-phone.png", full_page=True)
    overflow = sideways_overflow(page)
    assert overflow <= 0, f"the event page scrolls sideways by {overflow} px on a 390 px phone"

    open_tab(page, server.url, "browsergame", "srv_browser")  # the tab, connect box included, fits too
    assert sideways_overflow(page) <= 0
