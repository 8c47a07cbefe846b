"""SPEC 4 and 6: the owner's dashboard through the Flask test client.

Pages are parsed with the standard library's HTMLParser into a tiny tree (`Doc`), so
assertions name elements by id and data attributes instead of matching raw HTML.
"""
from __future__ import annotations

import csv
import datetime
import io
import json
import re
from html.parser import HTMLParser
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
from support import database, signed_post
from werkzeug.security import check_password_hash

import mmoref_server as mm

PASSWORD = "correct-horse-battery"
SERVER, GAME = "srv_123", "mygame"  # the conftest kit's server
TAB = f"/dashboard/{GAME}/{SERVER}/referrals"
ORIGINAL_URL = "https://game.example/register?lang=en"
XSS = "<img src=x onerror=alert(1)>"
CSV_HEADER = ["id", "received_at", "event", "outcome", "state", "referral_id", "referrer_code",
              "referee_identity", "server_event_id"]
ISO_UTC = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z")


# A tiny HTML tree ##############################################################

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class Node:
    def __init__(self, tag: str, attrs: list[tuple[str, str | None]], parent: Node | None = None):
        self.tag, self.attrs, self.parent = tag, dict(attrs), parent
        self.children: list[Node | str] = []

    def iter(self):
        for child in self.children:
            if isinstance(child, Node):
                yield child
                yield from child.iter()

    def all(self, tag: str | None = None, **attrs: str) -> list[Node]:
        """Descendants with this tag and these attribute values (data_event= is data-event=)."""
        wanted = {name.rstrip("_").replace("_", "-"): value for name, value in attrs.items()}
        return [node for node in self.iter() if (tag is None or node.tag == tag)
                and all(node.attrs.get(name) == value for name, value in wanted.items())]

    def one(self, tag: str | None = None, **attrs: str) -> Node:
        found = self.all(tag, **attrs)
        assert len(found) == 1, f"expected one <{tag or '*'} {attrs}>, found {len(found)}"
        return found[0]

    @property
    def raw_text(self) -> str:
        return "".join(child if isinstance(child, str) else child.raw_text for child in self.children)

    @property
    def text(self) -> str:
        """The text content with whitespace collapsed."""
        parts = [child if isinstance(child, str) else child.text for child in self.children]
        return " ".join(" ".join(parts).split())

    def ancestor(self, tag: str) -> Node:
        node = self.parent
        while node is not None and node.tag != tag:
            node = node.parent
        assert node is not None, f"no <{tag}> around <{self.tag}>"
        return node


class _TreeBuilder(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.root = self.current = Node("#document", [])

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, attrs, self.current)
        self.current.children.append(node)
        if tag not in VOID:
            self.current = node

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.current.children.append(Node(tag, attrs, self.current))

    def handle_endtag(self, tag: str) -> None:
        node = self.current
        while node is not None and node.tag != tag:
            node = node.parent
        if node is not None and node.parent is not None:
            self.current = node.parent

    def handle_data(self, data: str) -> None:
        self.current.children.append(data)


class Doc(Node):
    """A parsed HTML page that keeps its raw text (for "never appears" checks)."""

    def __init__(self, raw: str):
        builder = _TreeBuilder()
        builder.feed(raw)
        builder.close()
        super().__init__("#document", [])
        self.children, self.raw = builder.root.children, raw

    def by_id(self, element_id: str) -> Node:
        return self.one(id=element_id)

    def has_id(self, element_id: str) -> bool:
        return bool(self.all(id=element_id))

    @property
    def flashes(self) -> list[str]:
        return [node.text for node in self.all("p", class_="flash")]


def html(response: Any, status: int = 200) -> Doc:
    """The response as a parsed page, after checking its status and type."""
    assert response.status_code == status, response.get_data(as_text=True)[:500]
    assert response.mimetype == "text/html"
    return Doc(response.get_data(as_text=True))


def csrf(page: Doc) -> str:
    """The CSRF token of a page's forms (all forms of one page carry the same one)."""
    values = {node.attrs["value"] for node in page.all("input", name="csrf_token")}
    assert len(values) == 1, values
    return values.pop()


def location(response: Any) -> str:
    assert response.status_code == 302, response.get_data(as_text=True)[:500]
    return response.headers["Location"]


# Reading the dashboard's tables ###############################################

def log_rows(page: Doc) -> list[dict[str, Any]]:
    """The delivery-log rows of a Referrals tab, top to bottom."""
    rows = []
    for tr in page.by_id("delivery-log").all("tr"):
        if "data-id" in tr.attrs:
            cells = [td.text for td in tr.all("td")]
            rows.append({"id": int(tr.attrs["data-id"]), "event": tr.attrs["data-event"],
                         "state": tr.attrs["data-state"], "outcome": tr.attrs["data-outcome"],
                         "received": cells[0], "server_event_id": cells[4], "referrer": cells[5],
                         "referee": cells[6], "token": cells[7], "detail": tr.one("a", class_="detail").attrs["href"]})
    return rows


def event_ids(page: Doc) -> list[str]:
    return [row["server_event_id"] for row in log_rows(page)]


def rejected_rows(page: Doc) -> list[dict[str, Any]]:
    """The rejected-requests table of a page (tab or index), newest first."""
    tables = page.all("table", class_="rejected")
    if not tables:
        return []
    rows = []
    for tr in tables[0].all("tr"):
        if "data-status" in tr.attrs:
            cells = tr.all("td")
            diagnosis = cells[4].all("strong", class_="diagnosis")
            rows.append({"status": int(tr.attrs["data-status"]), "error": cells[2].text, "reason": cells[3].text,
                         "hint": cells[4].text, "diagnosis": diagnosis[0].text if diagnosis else None,
                         "snippet": cells[5].text})
    return rows


def selected(select: Node) -> list[str]:
    """The texts of a <select>'s selected options."""
    return [option.text for option in select.all("option") if "selected" in option.attrs]


def detail_table(page: Doc) -> dict[str, str]:
    return {tr.one("th").text: tr.one("td").text for tr in page.by_id("event-detail").all("tr")}


def snapshot(db_path: str) -> dict[str, list[tuple]]:
    """Every row of every table: to show a refused request changed nothing."""
    with database(db_path) as db:
        tables = [row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        return {table: db.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall() for table in tables}


# Logging in ###################################################################

def login(client: Any, password: str = PASSWORD, next_url: str | None = None, **request: Any) -> Any:
    """Open the login page (for its CSRF token) and post the password."""
    url = "/dashboard/login" + (f"?{urlencode({'next': next_url})}" if next_url is not None else "")
    token = csrf(html(client.get(url, **request)))
    return client.post(url, data={"csrf_token": token, "password": password}, **request)


def is_logged_in(client: Any) -> bool:
    response = client.get("/dashboard/")
    assert response.status_code in (200, 302)
    return response.status_code == 200


class Owner:
    """A logged-in test client: pages, and form posts carrying the session's CSRF token."""

    def __init__(self, client: Any):
        self.client = client
        self.csrf = csrf(self.page("/dashboard/"))  # login cleared the session: read the new token

    def page(self, path: str, status: int = 200) -> Doc:
        return html(self.client.get(path), status)

    def post(self, path: str, **form: str) -> Any:
        return self.client.post(path, data={"csrf_token": self.csrf, **form})

    def post_page(self, path: str, status: int = 200, **form: str) -> Doc:
        return html(self.post(path, **form), status)

    def follow(self, response: Any) -> Doc:
        """The page a 302 leads to (where its flashed message shows)."""
        return self.page(location(response))


class Clock:
    def __init__(self) -> None:
        self.t = mm.now()


# Fixtures #####################################################################

@pytest.fixture(autouse=True)
def _fresh_login_throttle(monkeypatch: pytest.MonkeyPatch) -> None:
    """The throttle is module state: each test starts with no failed logins."""
    monkeypatch.setattr(mm, "login_throttle", mm._LoginThrottle())


@pytest.fixture
def app(db_path: str):
    """Overrides conftest's app: the dashboard password comes from MMOREF_ADMIN_PASSWORD."""
    return mm.create_app({"MMOREF_DB": db_path, "TESTING": True, "MMOREF_ADMIN_PASSWORD": PASSWORD})


@pytest.fixture
def bare_app(db_path: str):
    """An installation with no password configured (the stored-hash and first-run paths)."""
    return mm.create_app({"MMOREF_DB": db_path, "TESTING": True})


@pytest.fixture
def owner(client: Any) -> Owner:
    assert location(login(client)) == "/dashboard/"
    return Owner(client)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """Freeze the server clock (mm.now); tests move it by hand."""
    frozen = Clock()
    monkeypatch.setattr(mm, "now", lambda: frozen.t)
    return frozen


@pytest.fixture
def registered(kit: Any) -> dict[str, Any]:
    """A referral of alice's, registered by player-7842 (delivery-log row 1)."""
    token = kit.token("alice")
    response = kit.send("registered", token, "reg-1")
    assert response.status_code == 200 and response.get_json()["state"] == "registered"
    return {"token": token, "referral_id": response.get_json()["referral_id"]}


def revoke_every_secret(store: mm.Store, server_id: str) -> None:
    """No public path leaves a server without a live secret (add-server mints one): set it up in SQL."""
    with store.transaction() as transaction:
        transaction.db.execute("UPDATE secrets SET expires_at = ? WHERE server_id = ?", (mm.now(), server_id))


def send_ok(kit: Any, event: str, token: str, event_id: str, **extra: Any) -> dict[str, Any]:
    response = kit.send(event, token, event_id, **extra)
    assert response.status_code == 200, response.get_json()
    return response.get_json()


# Login required everywhere #####################################################

GET_ROUTES = ["/dashboard/", TAB, f"{TAB}/log/1", f"{TAB}/log.csv?event=registered"]

# Every state-changing form; {referral_id} is the `registered` fixture's referral.
POST_ROUTES = [
    ("/dashboard/servers", {"server_id": "srv_new", "game": "g2", "registration_url": "https://new.example/"}),
    (f"{TAB}/enabled", {"enabled": "0"}),
    (f"{TAB}/secret", {"grace": "0"}),
    (f"{TAB}/settings", {"registration_url": "https://new.example/join", "identity_field": "email"}),
    (f"{TAB}/token", {"ref": "mallory"}),
    (f"{TAB}/test-event", {}),
    (f"{TAB}/referral/{{referral_id}}/reverse", {}),
    (f"{TAB}/referral/{{referral_id}}/reject", {}),
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
    (TAB, TAB),
    (f"{TAB}?q=reg-1", f"{TAB}?q=reg-1"),
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
    assert page.has_id("password")
    assert not is_logged_in(client)


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
    assert any(cookie.startswith("session=;") for cookie in response.headers.getlist("Set-Cookie"))
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


# Session cookie and key ########################################################

def session_cookie(response: Any) -> dict[str, str | bool]:
    """The attributes of the response's session Set-Cookie (names lower-cased)."""
    for header in response.headers.getlist("Set-Cookie"):
        if header.startswith("session="):
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
    cookie = client.get_cookie("session").value
    for app, accepted in ((first_again, True), (other, False)):
        replay = app.test_client()
        replay.set_cookie("session", cookie)
        assert is_logged_in(replay) is accepted


# Servers ########################################################################

def test_add_server_shows_its_secret_once(owner: Owner, client: Any) -> None:
    page = owner.post_page("/dashboard/servers", server_id="srv_new", game="g2", name="New World",
                           registration_url="https://new.example/join", identity_field="email")
    secret = page.by_id("secret-value").text
    kid = page.by_id("new-secret").one("p", class_="muted").text.removeprefix("kid ")
    assert secret.startswith("mmsk_") and kid.startswith("k_")
    assert page.one("tr", data_server="srv_new").all("a")[0].attrs["href"] == "/dashboard/g2/srv_new/referrals"

    body = mm.build_body("registered", "any-token", "srv_new", "t-1", referee_identity="p", test=True)
    check = client.post("/api/referral/events", data=body,
                        headers={mm.SIGNATURE_HEADER: mm.signature_header(secret, body, kid=kid)})
    assert check.status_code == 200 and check.get_json() == {"ok": True, "test": True}

    index, tab = owner.page("/dashboard/"), owner.page("/dashboard/g2/srv_new/referrals")
    assert secret not in index.raw and secret not in tab.raw
    assert not index.has_id("secret-value") and not tab.has_id("secret-value")
    assert [td.text for td in tab.by_id("secrets").one("tbody").all("tr")[0].all("td")][:2] == [kid, "…" + secret[-4:]]
    assert selected(tab.by_id("identity_field")) == ["email"]


@pytest.mark.parametrize(("form", "message"), [
    ({"server_id": "bad id!"}, "must be 1-64 characters of A-Z"),
    ({"game": "g/2"}, "must be 1-64 characters of A-Z"),
    ({"registration_url": "http://example.com/join"}, "must start with https://"),
    ({"server_id": SERVER}, f"server '{SERVER}' already exists"),
    ({"identity_field": "phone"}, "identity field must be one of"),
], ids=["bad-id", "bad-game", "http-url", "duplicate", "identity"])
def test_add_server_refuses_bad_input(owner: Owner, kit: Any, db_path: str, form: dict[str, str],
                                      message: str) -> None:
    before = snapshot(db_path)
    fields = {"server_id": "srv_new", "game": "g2", "registration_url": "https://new.example/join", **form}
    page = owner.post_page("/dashboard/servers", 400, **fields)
    assert message in page.one("p", role="alert").text
    assert not page.has_id("new-secret")
    assert page.by_id("server_id").attrs["value"] == fields["server_id"]  # the form keeps what was typed
    assert snapshot(db_path) == before
    assert [tr.attrs["data-server"] for tr in owner.page("/dashboard/").all("tr") if "data-server" in tr.attrs] \
        == [SERVER]


@pytest.mark.parametrize("path", [
    f"/dashboard/othergame/{SERVER}/referrals", f"/dashboard/{GAME}/nosuch/referrals",
    f"/dashboard/othergame/{SERVER}/referrals/log/1", f"/dashboard/othergame/{SERVER}/referrals/log.csv",
    f"{TAB}/log/999"])
def test_unknown_game_server_or_row_is_404(owner: Owner, registered: dict, path: str) -> None:
    response = owner.client.get(path)
    assert response.status_code == 404
    assert "Not Found" in response.get_data(as_text=True)


def test_a_form_for_a_server_of_another_game_is_404(owner: Owner, kit: Any, db_path: str) -> None:
    before = snapshot(db_path)
    assert owner.post(f"/dashboard/othergame/{SERVER}/referrals/enabled", enabled="0").status_code == 404
    assert snapshot(db_path) == before


# Referrals tab: enable, secrets, settings, test token ###########################

def test_disabling_referrals_makes_ingest_answer_404(owner: Owner, kit: Any) -> None:
    token = kit.token()
    tab = owner.follow(owner.post(f"{TAB}/enabled", enabled="0"))
    assert tab.flashes == ["Referrals disabled: events now get 404 referrals not enabled."]
    assert tab.by_id("status").one("button").text == "Enable referrals"
    assert owner.page("/dashboard/").one("tr", data_server=SERVER).all("td")[2].text == "off"
    refused = kit.send("registered", token, "e-1")
    assert refused.status_code == 404 and refused.get_json()["error"] == "referrals not enabled"

    tab = owner.follow(owner.post(f"{TAB}/enabled", enabled="1"))
    assert tab.flashes == ["Referrals enabled."]
    assert not tab.has_id("new-secret")  # the live secret is kept, not replaced
    assert tab.by_id("status").one("button").text == "Disable referrals"
    assert send_ok(kit, "registered", token, "e-1")["state"] == "registered"


def test_enabling_a_server_without_a_live_secret_mints_one_shown_once(owner: Owner, kit: Any, store: Any) -> None:
    revoke_every_secret(store, SERVER)
    assert location(owner.post(f"{TAB}/enabled", enabled="0")) == TAB
    assert owner.page(TAB).by_id("secrets").all("button")[0].text == "Generate secret"

    page = owner.post_page(f"{TAB}/enabled", enabled="1")
    secret = page.by_id("secret-value").text
    kid = page.by_id("new-secret").one("p", class_="muted").text.removeprefix("kid ")
    assert secret.startswith("mmsk_") and secret != kit.secret
    token = kit.token()
    accepted = kit.post(kit.body("registered", token, "e-1"), secret=secret)
    assert accepted.status_code == 200 and accepted.get_json()["state"] == "registered"

    later = owner.page(TAB)
    assert secret not in later.raw and kid in later.by_id("secrets").text
    assert "…" + secret[-4:] in later.by_id("secrets").text


GRACES = [("0", False, "revoke now"), ("3600", True, "1 hour"), ("86400", True, "24 hours"),
          ("604800", True, "7 days")]


@pytest.mark.parametrize(("grace", "old_still_valid", "label"), GRACES, ids=[g[0] for g in GRACES])
def test_rotating_the_secret(owner: Owner, kit: Any, grace: str, old_still_valid: bool, label: str) -> None:
    old = kit.secret
    page = owner.post_page(f"{TAB}/secret", grace=grace)
    new = page.by_id("secret-value").text
    new_kid = page.by_id("new-secret").one("p", class_="muted").text.removeprefix("kid ")
    assert new.startswith("mmsk_") and new != old
    assert f"The previous secret: {label}." in page.by_id("new-secret").text

    token = kit.token()
    with_old = kit.post(kit.body("registered", token, "e-old"), secret=old)
    if old_still_valid:
        assert with_old.status_code == 200 and with_old.get_json()["state"] == "registered"
    else:
        assert with_old.status_code == 401 and with_old.get_json()["reason"] == "mac_mismatch"
    with_new = kit.post(kit.body("registered", token, "e-new"), secret=new)
    assert with_new.status_code == 200 and with_new.get_json()["state"] == "registered"

    later = owner.page(TAB)
    assert old not in later.raw and new not in later.raw
    rows = [[td.text for td in tr.all("td")] for tr in later.by_id("secrets").one("tbody").all("tr")]
    assert rows[0] == [new_kid, "…" + new[-4:], "current"]
    assert rows[1][:2] == [kit.kid, "…" + old[-4:]]
    assert rows[1][2].startswith("valid until") if old_still_valid else rows[1][2] == "revoked"


def test_rotating_twice_inside_the_grace_period_revokes_the_oldest(owner: Owner, kit: Any) -> None:
    first = kit.secret
    second = owner.post_page(f"{TAB}/secret", grace="86400").by_id("secret-value").text
    third = owner.post_page(f"{TAB}/secret", grace="86400").by_id("secret-value").text
    token = kit.token()
    statuses = [kit.post(kit.body("registered", token, f"e-{n}"), secret=secret).status_code
                for n, secret in enumerate((first, second, third))]
    assert statuses == [401, 200, 200]


def test_an_unknown_grace_choice_is_refused(owner: Owner, kit: Any, db_path: str) -> None:
    before = snapshot(db_path)
    assert owner.post(f"{TAB}/secret", grace="5").status_code == 400
    assert snapshot(db_path) == before


@pytest.mark.parametrize("url", ["https://game.example/join", "http://localhost:8000/join",
                                 "http://127.0.0.1/join", "http://[::1]:5000/join"])
def test_registration_url_accepted(owner: Owner, kit: Any, client: Any, url: str) -> None:
    tab = owner.follow(owner.post(f"{TAB}/settings", registration_url=url, identity_field="username"))
    assert tab.flashes == ["Settings saved."]
    assert tab.by_id("registration_url").attrs["value"] == url
    assert location(client.get(f"/r/{SERVER}?ref=bob")).startswith(url + "?mmref=")


@pytest.mark.parametrize("url", ["http://example.com/join", "http://localhost.example.com/join",
                                 "ftp://game.example/join", "javascript:alert(1)", "https://"])
def test_registration_url_refused(owner: Owner, kit: Any, url: str) -> None:
    tab = owner.follow(owner.post(f"{TAB}/settings", registration_url=url, identity_field="email"))
    assert len(tab.flashes) == 1 and "must start with https://" in tab.flashes[0]
    assert tab.by_id("registration_url").attrs["value"] == ORIGINAL_URL
    assert selected(tab.by_id("identity_field")) == ["username"]  # nothing saved


def test_identity_field_is_saved(owner: Owner, kit: Any) -> None:
    tab = owner.follow(owner.post(f"{TAB}/settings", registration_url=ORIGINAL_URL, identity_field="character"))
    assert tab.flashes == ["Settings saved."]
    assert selected(tab.by_id("identity_field")) == ["character"]

    tab = owner.follow(owner.post(f"{TAB}/settings", registration_url=ORIGINAL_URL, identity_field="phone"))
    assert tab.flashes == ["identity field must be one of username, account, character, email"]
    assert selected(tab.by_id("identity_field")) == ["character"]


def test_share_link_template_and_test_token(owner: Owner, kit: Any, client: Any) -> None:
    tab = owner.page(TAB)
    template = tab.by_id("share-link").attrs["value"]
    assert template == f"http://localhost/r/{SERVER}?ref=PLAYERCODE"
    assert location(client.get(template.replace("PLAYERCODE", "carol"))).startswith(ORIGINAL_URL + "&mmref=")

    page = owner.post_page(f"{TAB}/token", ref="bob")
    token = page.by_id("token-value").text
    referral_id = page.by_id("new-token").one("h2").text.removeprefix("Test token for referral ")
    answer = send_ok(kit, "registered", token, "e-1")
    assert answer == {"ok": True, "referral_id": referral_id, "state": "registered"}
    assert token not in owner.page(TAB).raw  # shown once

    bad = owner.follow(owner.post(f"{TAB}/token", ref="not a code"))
    assert "must be 1-64 characters" in bad.flashes[0] and not bad.has_id("token-value")


# Send test event ###############################################################

def test_send_test_event_shows_the_answer_and_logs_nothing(owner: Owner, kit: Any) -> None:
    button = owner.page(TAB).by_id("send-test-event")
    assert button.raw_text == "Send test event" and "disabled" not in button.attrs

    page = owner.post_page(f"{TAB}/test-event")
    result = page.by_id("test-result")
    assert result.attrs["data-status"] == "200"
    assert result.one("p").text == "HTTP 200"
    shown = result.one("pre").raw_text
    assert '"ok": true' in shown and '"test": true' in shown
    assert json.loads(shown) == {"ok": True, "test": True}

    tab = owner.page(TAB)
    assert log_rows(tab) == [] and rejected_rows(tab) == []
    assert not tab.has_id("test-result")
    assert tab.by_id("funnel-clicked").text == "0"  # no referral was made either


def test_send_test_event_with_referrals_disabled_shows_the_404(owner: Owner, kit: Any) -> None:
    assert location(owner.post(f"{TAB}/enabled", enabled="0")) == TAB
    result = owner.post_page(f"{TAB}/test-event").by_id("test-result")
    assert result.attrs["data-status"] == "404" and result.one("p").text == "HTTP 404"
    assert json.loads(result.one("pre").raw_text) == {"ok": False, "error": "referrals not enabled",
                                                      "hint": mm.HINTS["referrals not enabled"]}


def test_send_test_event_goes_through_the_real_pipeline(owner: Owner, kit: Any, app: Any) -> None:
    app.config["MMOREF_REPLAY_WINDOW"] = -1  # no timestamp can pass: the pipeline's own check refuses
    result = owner.post_page(f"{TAB}/test-event").by_id("test-result")
    assert result.attrs["data-status"] == "401"
    answer = json.loads(result.one("pre").raw_text)
    assert (answer["error"], answer["reason"]) == ("bad_signature", "stale_timestamp")
    # handle_ingest remembered the refusal, as for any request to the HTTP route
    rejected = rejected_rows(owner.page(TAB))
    assert [(r["status"], r["error"], r["reason"]) for r in rejected] == [(401, "bad_signature", "stale_timestamp")]
    assert log_rows(owner.page(TAB)) == []


def test_send_test_event_without_a_live_secret_is_disabled(owner: Owner, kit: Any, store: Any) -> None:
    revoke_every_secret(store, SERVER)
    section = owner.page(TAB).by_id("test-event")
    assert "disabled" in section.one("button").attrs
    assert "Generate a secret first: the test event is signed with it." in section.text

    tab = owner.follow(owner.post(f"{TAB}/test-event"))
    assert tab.flashes == ["Generate a secret first: the test event is signed with it."]
    assert not tab.has_id("test-result")


# Delivery log ##################################################################

def test_delivery_log_shows_current_state_newest_first(owner: Owner, kit: Any) -> None:
    alice, bob = kit.token("alice"), kit.token("bob")
    send_ok(kit, "registered", alice, "a-reg")
    assert send_ok(kit, "registered", bob, "b-reg") == {"ok": True, "ignored": "first_touch_conflict"}
    send_ok(kit, "registered", alice, "a-reg-again")
    assert send_ok(kit, "registered", alice, "a-reg") == {"ok": True, "duplicate": True}  # adds no row
    send_ok(kit, "qualified", alice, "a-q")

    rows = log_rows(owner.page(TAB))
    assert [(r["server_event_id"], r["event"], r["state"], r["outcome"], r["referrer"]) for r in rows] == [
        ("a-q", "qualified", "qualified", "advanced", "alice"),
        ("a-reg-again", "registered", "qualified", "no_op", "alice"),
        ("b-reg", "registered", "clicked", "first_touch_conflict", "bob"),
        ("a-reg", "registered", "qualified", "advanced", "alice"),  # registered then, qualified now
    ]
    assert [r["id"] for r in rows] == sorted((r["id"] for r in rows), reverse=True)
    assert all(ISO_UTC.fullmatch(r["received"]) for r in rows)


def pages_of(owner: Owner, first: str, link: str, limit: int = 5) -> list[Doc]:
    """The page at `first`, then the pages its `#older`/`#newer` links lead to (bounded)."""
    pages = [owner.page(first)]
    for _ in range(limit):
        if not pages[-1].has_id(link):
            break
        pages.append(owner.page(pages[-1].by_id(link).attrs["href"]))
    assert not pages[-1].has_id(link), "more pages than expected"
    return pages


def test_delivery_log_is_keyset_paged_by_50(owner: Owner, kit: Any) -> None:
    token = kit.token()
    for n in range(120):  # one advanced row, then 119 no-ops: one row per event
        kit_answer = kit.send("registered", token, f"ev-{n:03}")
        assert kit_answer.status_code == 200
    expected = [f"ev-{n:03}" for n in reversed(range(120))]

    older = pages_of(owner, TAB, "older")
    assert [len(log_rows(page)) for page in older] == [50, 50, 20]
    assert [event_id for page in older for event_id in event_ids(page)] == expected  # no overlap, no gap
    assert not older[0].has_id("newer")

    newer = pages_of(owner, older[-1].by_id("newer").attrs["href"], "newer")
    assert [event_ids(page) for page in newer] == [event_ids(older[1]), event_ids(older[0])]

    filtered = pages_of(owner, f"{TAB}?outcome=no_op", "older")  # the links keep the filter
    assert all("outcome=no_op" in page.by_id("newer").attrs["href"] for page in filtered[1:])
    assert [event_id for page in filtered for event_id in event_ids(page)] == expected[:-1]


@pytest.fixture
def log_scenario(kit: Any) -> dict[str, str]:
    """alice registered and qualified; bob registered twice; carol hit first touch."""
    tokens = {code: kit.token(code) for code in ("alice", "bob", "carol")}
    send_ok(kit, "registered", tokens["alice"], "a-reg", referee_identity="p-alice")
    send_ok(kit, "registered", tokens["bob"], "b-reg", referee_identity="p-bob")
    send_ok(kit, "qualified", tokens["alice"], "a-q")
    send_ok(kit, "registered", tokens["bob"], "b-reg2", referee_identity="p-bob")
    send_ok(kit, "registered", tokens["carol"], "c-reg", referee_identity="p-alice")
    return tokens


LOG_QUERIES = [
    ({}, ["c-reg", "b-reg2", "a-q", "b-reg", "a-reg"]),
    ({"event": "qualified"}, ["a-q"]),
    ({"outcome": "no_op"}, ["b-reg2"]),
    ({"outcome": "first_touch_conflict"}, ["c-reg"]),
    ({"q": "a-q"}, ["a-q"]),
    ({"q": "bob"}, ["b-reg2", "b-reg"]),
    ({"q": "alice", "event": "registered"}, ["a-reg"]),
    ({"q": "nobody"}, []),
    ({"event": "bogus", "outcome": "bogus"}, ["c-reg", "b-reg2", "a-q", "b-reg", "a-reg"]),
]


@pytest.mark.parametrize(("query", "expected"), LOG_QUERIES, ids=[urlencode(q) or "all" for q, _ in LOG_QUERIES])
def test_delivery_log_filters_and_search(owner: Owner, log_scenario: dict, query: dict, expected: list) -> None:
    page = owner.page(f"{TAB}?{urlencode(query)}")
    assert event_ids(page) == expected
    if not expected:
        assert page.by_id("delivery-log").one("tbody").text == "No events match these filters."
    assert page.by_id("f-q").attrs["value"] == query.get("q", "")


def test_search_merges_event_ids_and_referrer_codes_across_pages(owner: Owner, kit: Any) -> None:
    """"zed" is a referrer code and also another referral's server_event_id: both kinds of row
    match, merged newest first, and the older/newer links page through the merge."""
    zed, other = kit.token("zed"), kit.token("other")
    send_ok(kit, "registered", other, "o-reg", referee_identity="p-other")
    expected = []
    for n in range(110):  # zed's rows match by code; two of other's rows match by server_event_id
        send_ok(kit, "registered", zed, f"zed-{n:02}", referee_identity="p-zed")
        expected.append(f"zed-{n:02}")
        if n == 60:
            send_ok(kit, "qualified", other, "zed")
            expected.append("zed")
        send_ok(kit, "registered", other, f"o-{n:02}", referee_identity="p-other")  # matches neither
    send_ok(kit, "reversed", other, "zed")
    expected.append("zed")
    expected.reverse()

    older = pages_of(owner, f"{TAB}?q=zed", "older")
    assert [len(log_rows(page)) for page in older] == [50, 50, 12]
    assert [event_id for page in older for event_id in event_ids(page)] == expected
    newer = pages_of(owner, older[-1].by_id("newer").attrs["href"], "newer")
    assert [event_ids(page) for page in newer] == [event_ids(older[1]), event_ids(older[0])]


@pytest.mark.parametrize("token_key", ['"token"', '"\\u0074oken"'], ids=["plain-key", "escaped-key"])
def test_delivery_log_masks_referee_and_token(owner: Owner, kit: Any, token_key: str) -> None:
    identity = "player-with-a-rather-long-name"
    token = kit.token()
    raw = json.dumps(kit.body("registered", token, "e-1", referee_identity=identity)).replace('"token"', token_key)
    accepted = kit.post(raw.encode())
    assert accepted.status_code == 200 and accepted.get_json()["state"] == "registered"

    tab = owner.page(TAB)
    [row] = log_rows(tab)
    assert (row["referee"], row["token"]) == ("pl…me", token[:4] + "…")
    assert identity not in tab.raw and token not in tab.raw
    detail = owner.page(row["detail"])
    assert json.loads(detail.one("pre").raw_text)["token"] == token[:4] + "…"
    assert token not in detail.raw


def test_player_supplied_text_is_escaped_on_every_page(owner: Owner, kit: Any) -> None:
    token = kit.token()
    send_ok(kit, "registered", token, "<script>alert(2)</script>", referee_identity=XSS)
    ghost = {"event": "registered", "token": "t", "server_id": XSS, "server_event_id": "e", "referee_identity": XSS}
    assert kit.post(ghost).status_code == 404  # lands in the installation-wide list on /dashboard

    tab = owner.page(TAB)
    [row] = log_rows(tab)
    pages = {"tab": tab, "detail": owner.page(row["detail"]), "index": owner.page("/dashboard/"),
             "search": owner.page(f"{TAB}?{urlencode({'q': XSS})}")}
    for name, page in pages.items():
        assert "<img" not in page.raw and "<script>alert" not in page.raw, name
    assert row["server_event_id"] == "<script>alert(2)</script>"  # shown, as text
    assert detail_table(pages["detail"])["Referee"] == XSS
    assert "&lt;img src=x onerror=alert(1)&gt;" in pages["detail"].raw
    assert XSS in rejected_rows(pages["index"])[0]["snippet"]


def test_log_detail_shows_payload_history_and_actions(owner: Owner, kit: Any) -> None:
    token = kit.token("alice")
    referral_id = send_ok(kit, "registered", token, "e-reg")["referral_id"]
    send_ok(kit, "qualified", token, "e-q")
    registered_row = log_rows(owner.page(TAB))[1]

    page = owner.page(registered_row["detail"])
    assert page.one("h1").text == f"Event {registered_row['id']}: registered"
    details = detail_table(page)
    assert details["Outcome"] == "advanced" and details["server_event_id"] == "e-reg"
    assert ISO_UTC.fullmatch(details["Received"])
    assert details["Referral"] == f"{referral_id} (referrer alice)"
    assert page.by_id("referral-state").text == "qualified"
    payload = json.loads(page.one("pre").raw_text)
    assert payload["token"] == token[:4] + "…" and payload["server_event_id"] == "e-reg"
    assert token not in page.raw
    assert [(tr.attrs["data-event"], tr.attrs["data-outcome"]) for tr in page.by_id("history").all("tr")] == [
        ("registered", "advanced"), ("qualified", "advanced")]
    assert page.by_id("action-reverse").text == "Reverse referral"
    assert page.by_id("action-reject").text == "Reject referral"


def test_log_detail_of_another_servers_row_is_404(owner: Owner, kit: Any, store: Any, client: Any) -> None:
    other_secret, _ = store.add_server("srv_other", GAME)
    token, _ = store.mint_referral("srv_other", "alice")
    body = mm.build_body("registered", token, "srv_other", "e-1", referee_identity="p")
    assert signed_post(client, other_secret, body).status_code == 200
    [row] = log_rows(owner.page(f"/dashboard/{GAME}/srv_other/referrals"))
    assert owner.client.get(f"{TAB}/log/{row['id']}").status_code == 404


@pytest.mark.parametrize(("action", "state"), [("reverse", "reversed"), ("reject", "rejected")])
def test_owner_action_from_the_detail_page(owner: Owner, kit: Any, action: str, state: str) -> None:
    token = kit.token()
    referral_id = send_ok(kit, "registered", token, "e-reg")["referral_id"]
    detail_url = log_rows(owner.page(TAB))[0]["detail"]
    form = owner.page(detail_url).by_id(f"action-{action}").ancestor("form")
    back = form.one("input", name="back").attrs["value"]
    assert back == detail_url

    page = owner.follow(owner.post(form.attrs["action"], back=back))
    assert page.flashes == [f"Referral {referral_id} is now {state}."]
    assert page.by_id("referral-state").text == state
    assert not page.all("button", id=f"action-{action}")

    newest = log_rows(owner.page(TAB))[0]
    assert (newest["event"], newest["state"], newest["outcome"]) == (state, state, "owner_action")
    late = kit.send("qualified", token, "e-late")
    assert late.status_code == 422 and late.get_json()["state"] == state


@pytest.mark.parametrize(("steps", "action", "state"), [
    ([], "reverse", "clicked"),
    (["registered", "reversed"], "reject", "reversed"),
    (["registered", "reversed"], "reverse", "reversed"),
])
def test_owner_action_refused_when_not_allowed(owner: Owner, kit: Any, store: Any, steps: list, action: str,
                                               state: str) -> None:
    token, referral_id = store.mint_referral(SERVER, "alice")
    for event in steps:
        send_ok(kit, event, token, f"e-{event}")
    rows_before = log_rows(owner.page(TAB))

    tab = owner.follow(owner.post(f"{TAB}/referral/{referral_id}/{action}"))
    assert tab.flashes == [f"cannot {action} referral {referral_id} in state '{state}'"
                           f" (only from {', '.join(mm.OWNER_ACTIONS[action][0])})"]
    assert log_rows(tab) == rows_before
    assert store.referral(referral_id)["state"] == state


def test_owner_action_checks_its_target(owner: Owner, kit: Any, registered: dict, store: Any, db_path: str) -> None:
    store.add_server("srv_other", GAME)
    before = snapshot(db_path)
    referral_id = registered["referral_id"]
    assert owner.post(f"{TAB}/referral/{referral_id}/delete").status_code == 404
    assert owner.post(f"{TAB}/referral/ref_nosuch/reverse").status_code == 404
    assert owner.post(f"/dashboard/{GAME}/srv_other/referrals/referral/{referral_id}/reverse").status_code == 404
    assert snapshot(db_path) == before
    # `back` may only lead back into this server's tab
    assert location(owner.post(f"{TAB}/referral/{referral_id}/reverse", back="https://evil.example/")) == TAB


# CSV export ####################################################################

def read_csv(response: Any) -> list[list[str]]:
    assert response.status_code == 200
    assert response.mimetype == "text/csv"
    assert response.headers["Content-Disposition"] == f'attachment; filename="delivery-log-{SERVER}.csv"'
    return list(csv.reader(io.StringIO(response.get_data(as_text=True))))


def test_csv_export_follows_the_filters(owner: Owner, log_scenario: dict) -> None:
    link = [a for a in owner.page(f"{TAB}?event=registered").all("a") if a.text == "Export CSV"][0]
    assert link.attrs["href"] == f"{TAB}/log.csv?event=registered"
    header, *rows = read_csv(owner.client.get(link.attrs["href"]))
    assert header == CSV_HEADER
    assert [row[8] for row in rows] == ["c-reg", "b-reg2", "b-reg", "a-reg"]
    assert [int(row[0]) for row in rows] == sorted((int(row[0]) for row in rows), reverse=True)
    assert {row[2] for row in rows} == {"registered"}
    assert rows[-1][3:5] == ["advanced", "qualified"]  # the referral's current state
    assert all(ISO_UTC.fullmatch(row[1]) for row in rows)

    header, *everything = read_csv(owner.client.get(f"{TAB}/log.csv"))
    assert len(everything) == 5


@pytest.mark.parametrize("identity", ['=HYPERLINK("https://evil.example","x")', "+1+1", "-2+3", "@SUM(A1)"])
def test_csv_neutralises_formulas(owner: Owner, kit: Any, identity: str) -> None:
    send_ok(kit, "registered", kit.token(), "e-1", referee_identity=identity)
    _, row = read_csv(owner.client.get(f"{TAB}/log.csv"))
    assert row[CSV_HEADER.index("referee_identity")] == "'" + identity


# Rejected requests #############################################################

def test_rejected_requests_with_reasons_and_diagnoses(owner: Owner, kit: Any) -> None:
    token, clicked = kit.token(), kit.token("bob")
    body = kit.body("registered", token, "e-1")
    raw = json.dumps(body).encode()
    assert kit.post(body, header="").status_code == 400
    assert kit.post(raw + b"\n", header=mm.signature_header(kit.secret, raw)).status_code == 401
    ts = mm.now() - 10
    raw_ts = json.dumps({**body, "ts": ts}).encode()
    assert kit.post(raw_ts, header=f"t={mm.now()},v1=sha256={mm.sign(kit.secret, ts, raw_ts)}").status_code == 401
    new_secret = owner.post_page(f"{TAB}/secret", grace="0").by_id("secret-value").text
    assert kit.post(body).status_code == 401  # still signed with the revoked secret
    assert kit.post(kit.body("qualified", clicked, "q-1"), secret=new_secret).status_code == 422

    tab = owner.page(TAB)
    rows = rejected_rows(tab)
    assert [(r["status"], r["error"], r["reason"]) for r in rows] == [
        (422, "invalid transition", ""),
        (401, "bad_signature", "mac_mismatch"),
        (401, "bad_signature", "mac_mismatch"),
        (401, "bad_signature", "mac_mismatch"),
        (400, "missing signature header", ""),
    ]
    assert [r["diagnosis"] for r in rows] == [
        None,
        "this MAC was made with a previous, revoked secret: use the current secret",
        "the MAC matches a different t (the body's ts): sign with the t you put in the header",
        "the MAC matches this body without its trailing newline: sign the exact bytes you send",
        None,
    ]
    assert "trailing newline" in rows[3]["diagnosis"] and "different t" in rows[2]["diagnosis"]
    assert "revoked secret" in rows[1]["diagnosis"]
    assert rows[0]["hint"] == mm.HINTS["invalid transition"].format(state="clicked", event="qualified")
    assert rows[1]["hint"].startswith(mm.HINTS["mac_mismatch"])
    assert rows[4]["hint"].startswith("send the X-MMOLove-Signature header")
    assert token not in tab.raw and clicked not in tab.raw  # snippets mask tokens
    assert kit.secret not in tab.raw and new_secret not in tab.raw


def test_a_request_naming_no_known_server_shows_on_the_index_only(owner: Owner, kit: Any) -> None:
    ghost = {"event": "registered", "token": "t", "server_id": "ghost", "server_event_id": "e",
             "referee_identity": "p"}
    answer = kit.post(ghost)
    assert answer.status_code == 404 and answer.get_json()["error"] == "unknown server"

    [row] = rejected_rows(owner.page("/dashboard/"))
    assert (row["status"], row["error"], row["hint"]) == (404, "unknown server", mm.HINTS["unknown server"])
    assert '"server_id": "ghost"' in row["snippet"]
    assert rejected_rows(owner.page(TAB)) == []
    assert "None." in owner.page(TAB).by_id("rejected").text


def test_secrets_appear_only_in_their_one_time_showing(owner: Owner, kit: Any, client: Any) -> None:
    old = kit.secret
    token = kit.token()
    send_ok(kit, "registered", token, "e-1", note=old)  # a secret pasted into a signed body
    pasted = {"note": old, **kit.body("registered", token, "e-2")}  # first: inside the shown snippet
    assert kit.post(pasted, header="").status_code == 400  # ... and into refused ones, named or not
    assert kit.post({**pasted, "server_id": "ghost"}, header="").status_code == 400
    assert owner.post_page(f"{TAB}/test-event").by_id("test-result").attrs["data-status"] == "200"
    rotated = owner.post_page(f"{TAB}/secret", grace="86400")
    new = rotated.by_id("secret-value").text
    assert old not in rotated.raw

    detail = log_rows(owner.page(TAB))[0]["detail"]
    pages = [owner.page(path) for path in ("/dashboard/", TAB, f"{TAB}?q=e-1", detail)]
    csv_text = owner.client.get(f"{TAB}/log.csv").get_data(as_text=True)
    for text in [page.raw for page in pages] + [csv_text]:
        assert old not in text and new not in text
    assert "[secret]" in rejected_rows(pages[0])[0]["snippet"]
    assert "[secret]" in rejected_rows(pages[1])[0]["snippet"]


# Analytics and the servers list ################################################

def click(client: Any, code: str) -> str:
    """Follow the share link as a player; return the minted token."""
    return parse_qs(urlsplit(location(client.get(f"/r/{SERVER}?ref={code}"))).query)["mmref"][0]


def test_funnel_leaderboard_and_chart(owner: Owner, kit: Any, client: Any, store: Any, clock: Clock) -> None:
    plan = {"alice": ["qualified", "reversed", "qualified", "registered"], "bob": ["qualified", "clicked"],
            "carol": ["registered"]}
    steps = {"clicked": [], "registered": ["registered"], "qualified": ["registered", "qualified"],
             "reversed": ["registered", "qualified", "reversed"]}
    for code, finals in plan.items():
        for n, final in enumerate(finals):
            token = click(client, code)
            for event in steps[final]:
                send_ok(kit, event, token, f"{code}-{n}-{event}", referee_identity=f"{code}-{n}")
    store.add_server("srv_quiet", GAME, "Quiet")

    tab = owner.page(TAB)
    funnel = {kind: tab.by_id(f"funnel-{kind}").text for kind in ("clicked", "registered", "qualified", "reversed")}
    assert funnel == {"clicked": "7", "registered": "6", "qualified": "4", "reversed": "1"}
    analytics = tab.by_id("analytics").text
    assert "85.7% of clicks" in analytics and "66.7% of registered" in analytics

    leaders = [[td.text for td in tr.all("td")] for tr in tab.by_id("leaderboard").one("tbody").all("tr")]
    assert leaders == [["alice", "4", "4", "3"], ["bob", "2", "1", "1"]]

    chart = tab.by_id("daily-chart")
    assert chart.tag == "svg"
    bars = chart.all("rect")
    assert len(bars) == 90
    today = datetime.datetime.fromtimestamp(clock.t, datetime.timezone.utc).date().isoformat()
    assert [bar.one("title").text for bar in bars[-3:]] == [f"{today}: 7 clicked", f"{today}: 6 registered",
                                                           f"{today}: 4 qualified"]
    assert bars[-3].attrs["height"] == "100.0"
    assert {bar.attrs["height"] for bar in bars[:-3]} == {"0.0"}

    index = owner.page("/dashboard/")
    assert index.one("tr", data_server=SERVER).all("td")[3].text == "7 → 6 → 4 (1)"
    assert index.one("tr", data_server="srv_quiet").all("td")[3].text == "0 → 0 → 0 (0)"
    assert "Quiet" in index.one("tr", data_server="srv_quiet").text


def test_empty_analytics(owner: Owner, kit: Any) -> None:
    tab = owner.page(TAB)
    assert [tab.by_id(f"funnel-{kind}").text for kind in ("clicked", "registered", "qualified", "reversed")] \
        == ["0"] * 4
    assert tab.by_id("leaderboard").one("tbody").text == "No qualified referrals yet."
    assert len(tab.by_id("daily-chart").all("rect")) == 90


def test_leaderboard_is_ordered_by_qualified_and_keeps_20(owner: Owner, kit: Any) -> None:
    codes = ["top", "top"] + [f"r{n:02}" for n in range(22)]
    for n, code in enumerate(codes):
        token = kit.token(code)
        send_ok(kit, "registered", token, f"reg-{n}", referee_identity=f"player-{n}")
        send_ok(kit, "qualified", token, f"q-{n}")
    rows = owner.page(TAB).by_id("leaderboard").one("tbody").all("tr")
    leaders = [(tr.all("td")[0].text, tr.all("td")[3].text) for tr in rows]
    assert len(leaders) == 20
    assert leaders == [("top", "2")] + [(f"r{n:02}", "1") for n in range(19)]
