"""The owner's dashboard in a real browser: Debian's Chromium driven by Playwright.

Every test starts `python mmoref_server.py serve` on 127.0.0.1 (fixtures.py's `live_server`) and
asserts what a person sees. Game-server traffic is sent over real HTTP with `mm.send_event`;
tokens come from the dashboard's "Mint a test token" form or the `mint-token` CLI.

Screenshots go to pytest's tmp_path. `MMOREF_UPDATE_DOCS=1` also refreshes docs/dashboard.png.
"""
from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs
from urllib.parse import urlsplit

import pytest

import mmoref_server as mm
from tests.support import INGEST
from tests.support import PASSWORD
from tests.support import PYTHON
from tests.support import ROOT
from tests.support import SERVER_SCRIPT
from tests.support import unavailable

pytestmark = pytest.mark.browser

DOCS_SCREENSHOT = ROOT / "docs" / "dashboard.png"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
ENV = {"MMOREF_ADMIN_PASSWORD": PASSWORD}
WAIT_MS = 10_000
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Read at import: fixtures.py hides every MMOREF_* variable from the tests themselves.
UPDATE_DOCS = os.environ.get("MMOREF_UPDATE_DOCS") == "1"


# Browser ##########################################################################################

@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        unavailable("browser tests: the playwright package is not installed (pip install playwright)")
    if not CHROMIUM.is_file():
        unavailable(f"browser tests: no Chromium at {CHROMIUM} (apt-get install chromium)")
    playwright = sync_playwright().start()
    try:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
                                              timeout=30_000)
    except Exception:
        playwright.stop()
        raise
    yield chromium
    chromium.close()
    playwright.stop()


def _only_loopback(route: Any) -> None:
    """The dashboard must work offline: anything but 127.0.0.1 is refused."""
    if urlsplit(route.request.url).hostname == "127.0.0.1":
        route.continue_()
    else:
        route.abort()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(WAIT_MS)
    context.set_default_navigation_timeout(WAIT_MS)
    context.route("**/*", _only_loopback)
    page = context.new_page()
    yield page
    context.close()


# Helpers ##########################################################################################

def login(page: Any, base_url: str, password: str = PASSWORD) -> None:
    """Log in as a person does (support.login is the same for the Flask test client)."""
    page.goto(base_url + "/dashboard/")
    page.fill("#password", password)
    follow(page.get_by_role("button", name="Log in"))


def follow(target: Any) -> None:
    """Click a link or a form's button, as a person does, and wait for the page it leads to."""
    with target.page.expect_navigation():
        target.click()


def screenshot(page: Any, path: Path, **options: Any) -> Path:
    page.screenshot(path=str(path), **options)
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000, f"{path} is not a real PNG"
    return path


def cli(*args: str, db: str) -> Any:
    """Run the CLI as a subprocess on the live server's database (WAL makes sharing it safe)."""
    done = subprocess.run([PYTHON, str(SERVER_SCRIPT), *args, "--json", "--db", db], cwd=ROOT,
                          capture_output=True, text=True, timeout=30, env={**os.environ, "MMOREF_DB": db})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def send(base_url: str, secret: str, server_id: str, event: str, token: str, event_id: str,
         referee: str | None = None) -> dict[str, Any]:
    """What a game server does: build the body once, sign it, POST it over HTTP."""
    body = mm.build_body(event, token, server_id, event_id, referee_identity=referee)
    result = mm.send_event(base_url + INGEST, secret, body, timeout=10)
    assert result["status"] == 200, result
    return result["body"]


def log_rows(page: Any) -> list[dict[str, str]]:
    """The delivery log as the page shows it, top to bottom."""
    return page.eval_on_selector_all("#delivery-log tbody tr[data-id]", """rows => rows.map(r => ({
        id: r.dataset.id, event: r.dataset.event, state: r.dataset.state, outcome: r.dataset.outcome,
        text: r.innerText}))""")


def open_tab(page: Any, base_url: str, game: str, server_id: str) -> None:
    page.goto(f"{base_url}/dashboard/{game}/{server_id}/referrals")
    assert "Referrals" in page.locator("h1").inner_text()


def new_server(db_path: str, server_id: str = "srv_browser", game: str = "browsergame") -> str:
    """Create a server in the database before the live server starts; return its first secret."""
    store = mm.open_store(db_path)
    try:
        return store.add_server(server_id, game, "", "http://127.0.0.1/register")[0]
    finally:
        store.close()


# Flows ############################################################################################

def test_login_wrong_password_then_right(page: Any, live_server: Any, tmp_path: Path) -> None:
    server = live_server(env=ENV)
    page.goto(server.url + "/dashboard/")
    assert urlsplit(page.url).path == "/dashboard/login"  # everything under /dashboard needs a login
    page.fill("#password", "not the password")
    follow(page.get_by_role("button", name="Log in"))
    alert = page.get_by_role("alert")
    alert.wait_for()
    assert alert.inner_text() == "Wrong password."
    assert page.locator("h1").inner_text() == "Log in"
    screenshot(page, tmp_path / "login-error.png")

    page.fill("#password", PASSWORD)
    follow(page.get_by_role("button", name="Log in"))
    page.wait_for_url(server.url + "/dashboard/")
    assert page.locator("h1").inner_text() == "Servers"
    assert page.get_by_role("button", name="Log out").is_visible()
    assert page.locator("#servers").inner_text().count("No servers yet") == 1
    screenshot(page, tmp_path / "servers.png")


def test_add_server_shows_its_secret_once(page: Any, live_server: Any, tmp_path: Path) -> None:
    server = live_server(env=ENV)
    login(page, server.url)
    page.fill("#server_id", "srv_form")
    page.fill("#game", "formgame")
    page.fill("#name", "Form <Server>")
    page.fill("#registration_url", "http://127.0.0.1:8080/register")
    page.select_option("#identity_field", "account")
    follow(page.get_by_role("button", name="Add server"))
    page.locator("#new-secret").wait_for()
    secret = page.locator("#secret-value").inner_text().strip()
    assert len(secret) >= 32 and " " not in secret
    assert "shown once" in page.locator("#new-secret").inner_text()
    row = page.locator('#servers tr[data-server="srv_form"]')
    assert "Form <Server>" in row.inner_text()  # escaped, shown as text
    assert "formgame" in row.inner_text() and "on" in row.inner_text()
    assert page.locator("#server_id").input_value() == ""  # the form is ready for the next server
    screenshot(page, tmp_path / "server-added.png")

    page.fill("#server_id", "srv_form")  # the same id again: an error, the form kept to fix it
    page.fill("#game", "formgame")
    page.select_option("#identity_field", "email")
    follow(page.get_by_role("button", name="Add server"))
    page.get_by_role("alert").wait_for()
    assert "already exists" in page.get_by_role("alert").inner_text()
    assert page.locator("#new-secret").count() == 0
    assert page.locator("#server_id").input_value() == "srv_form"
    assert page.locator("#identity_field").input_value() == "email"

    page.goto(server.url + "/dashboard/")  # the page again, as a person reloading it would see it
    assert page.locator('#servers tr[data-server="srv_form"]').count() == 1
    assert page.locator("#new-secret").count() == 0
    assert secret not in page.content()

    follow(page.get_by_role("link", name="Form <Server>"))
    page.wait_for_url("**/dashboard/formgame/srv_form/referrals")
    assert secret not in page.content()
    assert f"…{secret[-4:]}" in page.locator("#secrets").inner_text()  # only the last 4 characters remain
    assert page.locator("#identity_field").input_value() == "account"


def test_send_test_event_shows_status_and_body_inline(page: Any, live_server: Any, db_path: str,
                                                      tmp_path: Path) -> None:
    new_server(db_path)
    server = live_server(env=ENV)
    login(page, server.url)
    follow(page.get_by_role("link", name="srv_browser").first)
    page.wait_for_url("**/dashboard/browsergame/srv_browser/referrals")
    follow(page.get_by_role("button", name="Send test event", exact=True))
    result = page.locator("#test-result")
    result.wait_for()
    assert result.get_attribute("data-status") == "200"
    assert "HTTP 200" in result.inner_text()
    body = json.loads(result.locator("pre").inner_text())
    assert body["test"] is True and body["ok"] is True
    assert len(log_rows(page)) == 0  # test events add no delivery-log row
    assert "No events yet" in page.locator("#delivery-log").inner_text()
    screenshot(page, tmp_path / "test-event.png", full_page=True)


def test_delivery_log_shows_current_state_and_owner_can_reverse(page: Any, live_server: Any, db_path: str,
                                                                 tmp_path: Path) -> None:
    secret = new_server(db_path)
    server = live_server(env=ENV)
    login(page, server.url)
    open_tab(page, server.url, "browsergame", "srv_browser")

    page.fill("#ref", "alice")  # the "Mint a test token" form
    follow(page.get_by_role("button", name="Mint a test token"))
    page.locator("#token-value").wait_for()
    token = page.locator("#token-value").inner_text().strip()
    send(server.url, secret, "srv_browser", "registered", token, "reg-1", referee="player-7842")

    open_tab(page, server.url, "browsergame", "srv_browser")
    rows = log_rows(page)
    assert [(r["event"], r["state"], r["outcome"]) for r in rows] == [("registered", "registered", "advanced")]
    assert "player-7842" not in rows[0]["text"]  # PII-light: the identity is masked
    assert token not in page.content()

    send(server.url, secret, "srv_browser", "qualified", token, "qua-1")
    page.reload()
    rows = log_rows(page)  # newest first, each with the referral's state *now*
    assert [(r["event"], r["state"], r["outcome"]) for r in rows] == [
        ("qualified", "qualified", "advanced"), ("registered", "qualified", "advanced")]
    assert page.locator("#funnel-qualified").inner_text() == "0"  # a dashboard test token counts nowhere
    screenshot(page, tmp_path / "delivery-log.png", full_page=True)

    follow(page.locator(f'#delivery-log tr[data-id="{rows[1]["id"]}"] a.detail'))
    page.wait_for_url(f"**/referrals/log/{rows[1]['id']}")
    assert page.locator("h1").inner_text() == f"Event {rows[1]['id']}: registered"
    assert page.locator("#referral-state").inner_text() == "qualified"
    assert page.locator("#action-reverse").is_visible() and page.locator("#action-reject").is_visible()
    payload = page.locator("pre").inner_text()
    assert '"token": "' + token[:4] + '…"' in payload and token not in payload  # masked, readable
    follow(page.locator("#action-reverse"))  # final: a page asks first
    assert page.locator("h1").inner_text().startswith("Reverse referral")
    assert page.locator("#referral-state").count() == 0
    follow(page.locator("#confirm-action"))
    page.wait_for_url(f"**/referrals/log/{rows[1]['id']}")
    assert page.locator("#referral-state").inner_text() == "reversed"
    assert "is now reversed" in page.get_by_role("status").inner_text()
    history = page.locator('#history tr[data-outcome="owner_action"]')
    assert history.count() == 1 and history.get_attribute("data-event") == "reversed"
    assert page.locator("#action-reverse").count() == 0 and page.locator("#action-reject").count() == 0
    screenshot(page, tmp_path / "detail-reversed.png", full_page=True)

    follow(page.get_by_role("link", name="← Referrals"))
    page.wait_for_url("**/browsergame/srv_browser/referrals")
    rows = log_rows(page)
    assert [(r["event"], r["state"], r["outcome"]) for r in rows] == [
        ("reversed", "reversed", "owner_action"), ("qualified", "reversed", "advanced"),
        ("registered", "reversed", "advanced")]


def test_delivery_log_pages_and_filters(page: Any, live_server: Any, db_path: str, tmp_path: Path) -> None:
    secret = new_server(db_path)
    server = live_server(env=ENV)
    tokens = [cli("mint-token", "srv_browser", "--ref", code, db=db_path)["token"] for code in ("amy", "ben")]
    for number, token in enumerate(tokens):
        send(server.url, secret, "srv_browser", "registered", token, f"reg-{number}", referee=f"player-{number}")
        send(server.url, secret, "srv_browser", "qualified", token, f"qua-{number}")
    for number in range(56):  # the same referee registering again: a no-op, but an accepted event with a row
        send(server.url, secret, "srv_browser", "registered", tokens[0], f"again-{number}", referee="player-0")
    total = 60

    login(page, server.url)
    open_tab(page, server.url, "browsergame", "srv_browser")
    first = log_rows(page)
    assert len(first) == mm.LOG_PAGE_SIZE
    ids = [int(r["id"]) for r in first]
    assert ids == sorted(ids, reverse=True)  # newest first
    assert first[0]["text"].count("again-55") == 1
    assert page.locator("#newer").count() == 0
    screenshot(page, tmp_path / "log-page-1.png", full_page=True)

    follow(page.locator("#older"))
    page.wait_for_url("**before=*")
    second = log_rows(page)
    assert len(second) == total - mm.LOG_PAGE_SIZE
    older_ids = [int(r["id"]) for r in second]
    assert not set(older_ids) & set(ids) and max(older_ids) < min(ids)  # pages don't overlap
    assert older_ids == sorted(older_ids, reverse=True)
    assert [r["event"] for r in second[-4:]] == ["qualified", "registered", "qualified", "registered"]
    assert page.locator("#older").count() == 0
    screenshot(page, tmp_path / "log-page-2.png", full_page=True)

    follow(page.locator("#newer"))
    page.wait_for_url("**after=*")
    assert [int(r["id"]) for r in log_rows(page)] == ids  # back to exactly the first page
    assert page.locator("#older").count() == 1

    open_tab(page, server.url, "browsergame", "srv_browser")
    page.select_option("#f-event", "qualified")
    follow(page.get_by_role("button", name="Filter"))
    page.wait_for_url("**event=qualified*")
    assert parse_qs(urlsplit(page.url).query)["event"] == ["qualified"]
    rows = log_rows(page)
    assert [(r["event"], r["state"]) for r in rows] == [("qualified", "qualified")] * 2
    assert page.locator("#f-event").input_value() == "qualified"  # the filter stays chosen
    assert page.locator("#older").count() == 0 and page.locator("#newer").count() == 0
    screenshot(page, tmp_path / "log-filtered.png", full_page=True)


# Docs screenshot ##################################################################################

def test_docs_screenshot_of_demo_dashboard(page: Any, live_server: Any, tmp_path: Path) -> None:
    demo_db = tmp_path / "demo.db"
    done = subprocess.run([PYTHON, str(SERVER_SCRIPT), "demo", str(demo_db)], cwd=ROOT,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    server = live_server(env={**ENV, "MMOREF_DB": str(demo_db), "MMOREF_TRUSTED_PROXY": "127.0.0.1"})
    login(page, server.url)
    # as behind an https proxy: the URLs shown (share link, ingest URL) carry a public address, no test port
    page.set_extra_http_headers({"X-Forwarded-Proto": "https", "X-Forwarded-Host": "referrals.example.org"})
    tab = f"/dashboard/{mm.DEMO_GAME}/{mm.DEMO_SERVER_ID}/referrals"
    page.goto(server.url + tab)
    assert page.locator("h1").inner_text().startswith("Demo Server")
    assert page.locator("#connect-url").inner_text() == "https://referrals.example.org" + INGEST
    assert f":{server.port}" not in page.locator("main").inner_text()
    assert {r["state"] for r in log_rows(page)} >= {"qualified", "reversed", "rejected", "registered"}
    assert page.locator("table.rejected tbody tr").count() >= 2

    page.set_viewport_size({"width": 1280, "height": 800})
    laptop = screenshot(page, tmp_path / "dashboard.png", full_page=True)
    if UPDATE_DOCS:
        DOCS_SCREENSHOT.parent.mkdir(exist_ok=True)
        DOCS_SCREENSHOT.write_bytes(laptop.read_bytes())

    page.set_viewport_size({"width": 390, "height": 844})
    screenshot(page, tmp_path / "dashboard-phone.png", full_page=True)
    overflow = page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
    assert overflow <= 0, f"the page scrolls sideways by {overflow} px on a 390 px phone"
