"""The one helper module of the tests: answers, a clock, the CLI, a kit, database peeks, dashboard
pages and logins, and real server processes on 127.0.0.1. Fixtures built on these live in fixtures.py."""
from __future__ import annotations

import contextlib
import http.client
import itertools
import json
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from collections.abc import Sequence
from html.parser import HTMLParser
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any
from typing import Callable
from typing import NoReturn
from urllib.parse import urlencode

import pytest
from click.testing import CliRunner

import mmoref_server as mm

ROOT = Path(mm.__file__).resolve().parent
SERVER_SCRIPT = ROOT / "mmoref_server.py"
PYTHON = sys.executable
INGEST = mm.INGEST_PATH
ISO_UTC = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z")
PASSWORD = "correct horse battery staple"   # the dashboard password of the `app` fixture
HTTP_TIMEOUT = 20.0     # seconds any one request to a real server may take before the test fails


# JSON answers of the ingest endpoint ##########################################

UNFILLED_PLACEHOLDER = re.compile(r"\{[A-Za-z_]\w*\}")   # "{window}", not the "{...}" a hint may show


BODY_FIELDS = ("event", "token", "server_id", "server_event_id", "referee_identity", "ts", "test")


def hint_facts(body: dict[str, Any]) -> list[str]:
    """What an error's hint must name, read from the error body itself."""
    facts = [str(body[name]) for name in ("state", "event") if name in body]
    if body["error"] in ("missing field", "invalid field") and body["field"] in BODY_FIELDS:
        facts.append(body["field"])
    if body["error"] == "missing signature header":
        facts.append(mm.SIGNATURE_HEADER)
    if body["error"] == "body too large":
        facts.append(f"{mm.MAX_BODY_BYTES // 1024} KiB")
    if body.get("reason") == "stale_timestamp":
        facts.append(" s of the server clock")
    return facts


def assert_good_hint(body: dict[str, Any]) -> str:
    """An error body's hint: one line of text, every placeholder filled, naming the key facts."""
    hint = body.get("hint")
    assert isinstance(hint, str) and hint.strip() and "\n" not in hint, body
    assert not UNFILLED_PLACEHOLDER.search(hint), f"unfilled placeholder in hint: {hint!r}"
    if body["error"] == "invalid transition" and hint == mm.HINTS["other referee"]:
        return hint   # the one 422 whose fix is not about the state
    for fact in hint_facts(body):
        assert fact in hint, f"hint {hint!r} does not name {fact!r}"
    return hint


def reply(response: Any) -> tuple[int, dict[str, Any]]:
    """(status, JSON body); an error's `hint` is checked by assert_good_hint and removed."""
    body = response.get_json()
    assert isinstance(body, dict), response.get_data()
    if body.get("ok") is False:
        assert_good_hint(body)
        del body["hint"]
    return response.status_code, body


def error(status: int, message: str, **extra: Any) -> tuple[int, dict[str, Any]]:
    return status, {"ok": False, "error": message, **extra}


def ok(**fields: Any) -> tuple[int, dict[str, Any]]:
    return 200, {"ok": True, **fields}


TEST_OK = ok(test=True)


# The clock ####################################################################

class Clock:
    """Stands in for mm.now: a fixed Unix time the test moves by hand (`clock.t += 10`)."""

    def __init__(self, t: int):
        self.t = t

    def __call__(self) -> int:
        return self.t


# The CLI ######################################################################

class CliResult:
    def __init__(self, result: Any):
        self.exit_code, self.stdout, self.stderr = result.exit_code, result.stdout, result.stderr

    def json(self) -> Any:
        return json.loads(self.stdout)


def _stderr_apart_runner() -> CliRunner:
    """A CliRunner keeping stderr apart: click 8.1 (Python 3.9) needs asking; 8.2 removed the option."""
    try:
        return CliRunner(mix_stderr=False)
    except TypeError:
        return CliRunner()


class Runner:
    """Runs `mmoref_server.py COMMAND ...` in-process against the test database."""

    def __init__(self, db_path: str):
        self.db_path = db_path

    def __call__(self, *args: str, db: bool = True) -> CliResult:
        argv = list(args) + (["--db", self.db_path] if db else [])
        return CliResult(_stderr_apart_runner().invoke(mm.cli, argv, prog_name="mmoref_server.py"))


def assert_one_error_line(exit_code: int, stderr: str, *fragments: str) -> str:
    """A user mistake: non-zero exit, exactly one `error: ...` line on stderr, no traceback."""
    assert exit_code != 0
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


# A game server's side: signed posts ###########################################

KIT_SERVER_ID, KIT_GAME = "srv_123", "mygame"
KIT_REGISTRATION_URL = "https://game.example/register?lang=en"
KIT_TAB = f"/dashboard/{KIT_GAME}/{KIT_SERVER_ID}/referrals"   # the kit server's Referrals tab


class Kit:
    """A game server's side of the contract: one server, its secret, signed posts."""

    def __init__(self, client: Any, store: mm.Store, server_id: str = KIT_SERVER_ID):
        self.client, self.store, self.server_id = client, store, server_id
        self.secret, self.kid = store.add_server(server_id, KIT_GAME, "My Server", KIT_REGISTRATION_URL)

    def token(self, code: str = "alice", server_id: str | None = None) -> str:
        return self.store.mint_referral(server_id or self.server_id, code)[0]

    def body(self, event: str, token: str, event_id: str, **extra: Any) -> dict[str, Any]:
        body = {"event": event, "token": token, "server_id": self.server_id, "server_event_id": event_id}
        if event == "registered":
            body["referee_identity"] = "player-7842"
        body.update(extra)
        return {k: v for k, v in body.items() if v is not ...}  # `...` drops a field

    def post(self, body: dict | bytes | str, *, secret: str | None = None, t: int | None = None,
             kid: str | None = None, header: str | None = None, **headers: str) -> Any:
        raw = body if isinstance(body, bytes) else (body if isinstance(body, str) else json.dumps(body)).encode()
        if header is None:
            header = mm.signature_header(secret or self.secret, raw, t=t, kid=kid)
        headers = {mm.SIGNATURE_HEADER: header, **headers} if header else headers
        return self.client.post(INGEST, data=raw, headers=headers)

    def send(self, event: str, token: str, event_id: str, **extra: Any) -> Any:
        return self.post(self.body(event, token, event_id, **extra))


def signed_post(client: Any, secret: str, raw_body: bytes, path: str = INGEST, **headers: str) -> Any:
    """POST exactly `raw_body`, signed with `secret` now, through a Flask test client."""
    header = mm.signature_header(secret, raw_body)
    return client.post(path, data=raw_body, headers={mm.SIGNATURE_HEADER: header, **headers})


def send(client: Any, secret: str, event: str, token: str, server_id: str, server_event_id: str,
         path: str = INGEST, **fields: Any) -> Any:
    """Build a body the way the kit does (`mm.build_body`), sign it and post it."""
    body = mm.build_body(event, token, server_id, server_event_id, **fields)
    return signed_post(client, secret, body, path)


SIGNING_VECTORS = ROOT / "docs" / "test-vectors.json"


def signing_vectors() -> dict[str, Any]:
    """docs/test-vectors.json: the signing vectors the signer, a live server and every kit are checked against."""
    return json.loads(SIGNING_VECTORS.read_text(encoding="utf-8"))


SERVER_ID = "srv_robust"
REFEREE = "player-7842"


def add_server(store: mm.Store, server_id: str = SERVER_ID) -> str:
    """A server with referrals enabled; return its secret."""
    secret, _ = store.add_server(server_id, "mygame", "Robustness", "https://game.example/register")
    return secret


def mint_tokens(store: mm.Store, codes: Sequence[str], server_id: str = SERVER_ID) -> list[str]:
    """One token per referrer code, as the share link would mint them."""
    return [store.mint_referral(server_id, code)[0] for code in codes]


def event_body(event: str, token: str, server_event_id: str, referee: str = REFEREE,
               server_id: str = SERVER_ID) -> bytes:
    """The bytes a kit would send (referee_identity only on `registered`)."""
    return mm.build_body(event, token, server_id, server_event_id,
                         referee_identity=referee if event == "registered" else None)


def referral_id_of(store: mm.Store, token: str) -> str:
    claims = mm.read_token(store.token_key, token)
    assert claims is not None
    return claims.referral_id


def revoke_every_secret(store: mm.Store, server_id: str) -> None:
    """No public path leaves a server without a live secret (add-server mints one): set it up in SQL."""
    with store.transaction() as transaction:
        transaction.db.execute("UPDATE secrets SET expires_at = ? WHERE server_id = ?", (mm.now(), server_id))


def limit_writer_pages(store: mm.Store, pages: int | None = None) -> int:
    """PRAGMA max_page_count on the connection every write of this process uses: `pages`, or the
    database's current size (the disk is full from its next growth). Returns the old limit."""
    with store.transaction() as transaction:
        db = transaction.db
        previous = db.execute("PRAGMA max_page_count").fetchone()[0]
        db.execute(f"PRAGMA max_page_count = {pages or db.execute('PRAGMA page_count').fetchone()[0]}")
    return previous


def send_ok(kit: Kit, event: str, token: str, event_id: str, **extra: Any) -> dict[str, Any]:
    """Send through the kit; the answer must be a 200, whose JSON body is returned."""
    response = kit.send(event, token, event_id, **extra)
    assert response.status_code == 200, response.get_json()
    return response.get_json()


# Database peeks ###############################################################

@contextlib.contextmanager
def database(path: str | Path, *, read_only: bool = False) -> Iterator[sqlite3.Connection]:
    """A plain sqlite3 connection to `path`, closed afterwards (read_only: touches no file)."""
    target = f"file:{Path(path).resolve()}?mode=ro&immutable=1" if read_only else str(path)
    db = sqlite3.connect(target, uri=read_only, isolation_level=None)
    try:
        yield db
    finally:
        db.close()


def rows(path: str | Path, sql: str, *params: Any) -> list[tuple]:
    """All rows of one query (written with ? placeholders) against the SQLite file or PostgreSQL URL."""
    if mm.is_database_url(str(path)):
        import psycopg

        import mmoref_postgres
        with psycopg.connect(str(path), autocommit=True) as db:
            cursor = db.execute(mmoref_postgres._postgres_sql(sql), params)
            found = cursor.fetchall() if cursor.description else []  # (an UPDATE returns no rows)
            return [tuple(_as_sqlite_value(value) for value in row) for row in found]
    with database(path) as db:
        return db.execute(sql, params).fetchall()


def _as_sqlite_value(value: Any) -> Any:
    """PostgreSQL's sum() is NUMERIC and EXISTS boolean: compare them as SQLite gives them."""
    if isinstance(value, bool):
        return int(value)
    if type(value).__name__ == "Decimal":
        return int(value) if value == value.to_integral_value() else float(value)
    return value


def scalar(path: str | Path, sql: str, *params: Any) -> Any:
    return rows(path, sql, *params)[0][0]


def snapshot(db_path: str | Path) -> dict[str, list[tuple]]:
    """Every row of every table: to show a refused request changed nothing."""
    if mm.is_database_url(str(db_path)):
        tables = [row[0] for row in rows(db_path, "SELECT table_name FROM information_schema.tables"
                                                  " WHERE table_schema = 'public' ORDER BY table_name")]
    else:
        tables = [row[0] for row in rows(db_path, "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
    return {table: rows(db_path, f"SELECT * FROM {table} ORDER BY 1") for table in tables}


@contextlib.contextmanager
def permissive_umask() -> Iterator[None]:
    """Umask 0: files would be world-readable unless mmoref creates them 0600 on purpose."""
    previous = os.umask(0)
    try:
        yield
    finally:
        os.umask(previous)


def log_rows_for(db_path: str | Path, referral_id: str, event: str, server_event_id: str) -> int:
    """How many delivery-log rows carry this idempotency key."""
    return scalar(db_path, "SELECT count(*) FROM delivery_log WHERE token_referral_id = ? AND event = ?"
                           " AND server_event_id = ?", referral_id, event, server_event_id)


# Dashboard pages: a tiny HTML tree ##########################################

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


def location(response: Any) -> str:
    assert response.status_code == 302, response.get_data(as_text=True)[:500]
    return response.headers["Location"]


# Logging in: the one login and CSRF helper ####################################

def csrf(page: Doc) -> str:
    """The CSRF token of a page's forms (all forms of one page carry the same one)."""
    values = {node.attrs["value"] for node in page.all("input", name="csrf_token")}
    assert len(values) == 1, values
    return values.pop()


def login(client: Any, password: str = PASSWORD, next_url: str | None = None, prefix: str = "",
          **request: Any) -> Any:
    """Open the login page (for its CSRF token) and post the password; the answer. `prefix`: where a
    host app mounts the blueprint."""
    url = prefix + "/dashboard/login" + (f"?{urlencode({'next': next_url})}" if next_url is not None else "")
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
        """The page a form post leads to: its redirect's target (post/redirect/get), or its own answer."""
        response = self.post(path, **form)
        return html(self.client.get(location(response)) if response.status_code == 302 else response, status)

    def follow(self, response: Any) -> Doc:
        """The page a 302 leads to (where its flashed message shows)."""
        return self.page(location(response))


# Reading the dashboard's tables ###############################################

def log_rows(page: Doc) -> list[dict[str, Any]]:
    """The delivery-log rows of a Referrals tab, top to bottom."""
    found = []
    for tr in page.by_id("delivery-log").all("tr"):
        if "data-id" in tr.attrs:
            cells = [td.text for td in tr.all("td")]
            found.append({"id": int(tr.attrs["data-id"]), "event": tr.attrs["data-event"],
                         "state": tr.attrs["data-state"], "outcome": tr.attrs["data-outcome"],
                         "received": cells[0], "server_event_id": cells[4], "referrer": cells[5],
                         "referee": cells[6], "token": cells[7], "detail": tr.one("a", class_="detail").attrs["href"]})
    return found


def event_ids(page: Doc) -> list[str]:
    return [row["server_event_id"] for row in log_rows(page)]


def rejected_rows(page: Doc) -> list[dict[str, Any]]:
    """The rejected-requests table of a page (tab or index), newest first."""
    tables = page.all("table", class_="rejected")
    if not tables:
        return []
    found = []
    for tr in tables[0].all("tr"):
        if "data-status" in tr.attrs:
            cells = tr.all("td")
            diagnosis = cells[4].all("strong", class_="diagnosis")
            found.append({"status": int(tr.attrs["data-status"]), "error": cells[2].text, "reason": cells[3].text,
                         "hint": cells[4].text, "diagnosis": diagnosis[0].text if diagnosis else None,
                         "snippet": cells[5].text})
    return found


def selected(select: Node) -> list[str]:
    """The texts of a <select>'s selected options."""
    return [option.text for option in select.all("option") if "selected" in option.attrs]


def detail_table(page: Doc) -> dict[str, str]:
    return {tr.one("th").text: tr.one("td").text for tr in page.by_id("event-detail").all("tr")}


# Real server processes on 127.0.0.1 ###########################################

def required_program(name: str, install: str) -> str:
    """The path of a program a test needs; missing, the test skips, or fails under CI=true."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if found is None:
        unavailable(f"{name} is not installed ({install})")
    return found


def unavailable(reason: str) -> NoReturn:
    """Something a test needs is missing from this machine: skip, or fail under CI=true."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; CI=true requires it", pytrace=False)
    pytest.skip(reason)


def run_ok(argv: Sequence[str | Path], *, timeout: float = 120, **options: Any) -> subprocess.CompletedProcess[str]:
    """Run a program to its end, its output captured as text; a non-zero exit fails the test, showing both streams."""
    done = subprocess.run([str(part) for part in argv], capture_output=True, text=True, timeout=timeout, **options)
    assert done.returncode == 0, f"{argv[0]} exited with {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def refused_port() -> Iterator[int]:
    """A 127.0.0.1 port held bound but not listening: connecting to it is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


class LiveServer:
    """A server process on a free 127.0.0.1 port, started and waited for until /healthz answers.

    `command` defaults to `python mmoref_server.py serve --port {port}`; "{port}" in the command
    or in an `env` value becomes the port. `db_path` (MMOREF_DB) None leaves the server its default.
    `stderr_apart` writes stderr to its own file, `stderr_path`, instead of with stdout.
    """

    def __init__(self, db_path: str | None, log_dir: Path, *, env: dict[str, str] | None = None,
                 command: list[str] | None = None, cwd: Path = ROOT, stderr_apart: bool = False):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        full_env = {**os.environ, **({"MMOREF_DB": db_path} if db_path else {}), **(env or {})}
        full_env = {name: value.replace("{port}", str(self.port)) for name, value in full_env.items()}
        argv = command or [PYTHON, str(SERVER_SCRIPT), "serve", "--port", "{port}"]
        argv = [part.replace("{port}", str(self.port)) for part in argv]
        self.log_path = log_dir / f"server-{self.port}.log"
        self.stderr_path = log_dir / f"server-{self.port}.stderr" if stderr_apart else self.log_path
        with open(self.log_path, "w") as log_file, open(self.stderr_path, "a") as stderr_file:
            # files, not pipes: a full pipe would block the server
            self.process = subprocess.Popen(argv, cwd=cwd, env=full_env, stdout=log_file,
                                            stderr=stderr_file if stderr_apart else subprocess.STDOUT)
        self._wait_until_healthy()

    def _wait_until_healthy(self, seconds: float = 20) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.output()}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=1) as response:
                    if response.status == 200 and json.loads(response.read()) == {"ok": True}:
                        return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server did not become healthy in {seconds} s:\n{self.output()}")

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> str:
        """Stop the server; return everything it printed."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.output()


LOOPBACK_HEX = "0100007F"   # 127.0.0.1 as /proc/net/tcp writes it


def listening_addresses(port: int) -> set[str]:
    """The local addresses (as /proc/net/tcp{,6} write them) with a LISTEN socket on `port`. Linux only."""
    found = set()
    for table in (Path("/proc/net/tcp"), Path("/proc/net/tcp6")):
        if not table.exists():
            continue
        for line in table.read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, _, port_hex = local.rpartition(":")
            if state == "0A" and int(port_hex, 16) == port:
                found.add(address)
    return found


GUNICORN_ACCESS_LOG = ["--access-logfile", "-", "--access-logformat", "answered-by %(p)s %(s)s %(m)s %(U)s"]


def gunicorn_command(*options: str, workers: int = 1) -> list[str]:
    """`gunicorn -w WORKERS OPTIONS mmoref_server:create_app()` with this Python, on the "{port}"
    that `live_server` fills in."""
    return [PYTHON, "-m", "gunicorn", "-w", str(workers), "-b", "127.0.0.1:{port}", *options,
            "mmoref_server:create_app()"]
ANSWERED = re.compile(r"answered-by <(\d+)> (\d+) (\w+) (\S+)")   # worker pid, status, method, path


def raw_request(method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None) -> bytes:
    """One HTTP/1.1 request as bytes, on a connection it closes."""
    headers = {"Host": "127.0.0.1", "Content-Length": str(len(body)), "Connection": "close", **(headers or {})}
    head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    return f"{method} {path} HTTP/1.1\r\n{head}\r\n".encode() + body


def signed_request(secret: str, body: bytes) -> bytes:
    """The raw request that posts the event `body`, signed now with `secret`."""
    return raw_request("POST", INGEST, body, {"Content-Type": "application/json",
                                              mm.SIGNATURE_HEADER: mm.signature_header(secret, body)})


def one_per_sync_worker(port: int, requests: Sequence[bytes]) -> list[tuple[int, bytes]]:
    """Send `requests` so that each is served by another gunicorn sync worker; (status, body)
    in the order answered: the last request first, then the others in order.

    Which worker accepts a connection is the kernel's choice, so a test must not hope for a
    spread. A sync worker serves one request at a time: each request but the last is held
    back by one byte, keeping the worker that accepted it busy, so the next connection must go
    to another worker. Then the held requests are finished, one after another.
    """
    held = []
    for request in requests[:-1]:
        connection = socket.create_connection(("127.0.0.1", port), timeout=HTTP_TIMEOUT)
        connection.sendall(request[:-1])
        held.append((connection, request[-1:]))
    with socket.create_connection(("127.0.0.1", port), timeout=HTTP_TIMEOUT) as last:
        last.sendall(requests[-1])
        answers = [_read_answer(last)]
    for connection, rest in held:
        with connection:
            connection.sendall(rest)
            answers.append(_read_answer(connection))
    return answers


def _read_answer(connection: socket.socket) -> tuple[int, bytes]:
    response = http.client.HTTPResponse(connection)
    response.begin()
    return response.status, response.read()


def answering_workers(server: LiveServer, log_start: int, count: int, method: str) -> list[tuple[str, int]]:
    """(worker pid, status) of the `count` requests of `method` in the access log since `log_start`
    (GUNICORN_ACCESS_LOG), in the order they were answered; waits for lines that trail the answer."""
    deadline = time.monotonic() + 5
    while True:
        lines = [(pid, int(status)) for pid, status, logged, _ in ANSWERED.findall(server.output()[log_start:])
                 if logged == method]
        if len(lines) >= count or time.monotonic() > deadline:
            assert len(lines) == count, f"{count} answers, {len(lines)} access-log lines"
            return lines
        time.sleep(0.05)


class HttpClient:
    """One keep-alive connection to a server on 127.0.0.1 (reconnects when the server closes it)."""

    def __init__(self, port: int, timeout: float = HTTP_TIMEOUT):
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, Any]:
        """(status, parsed JSON body, or the text when it is not JSON)."""
        self.connection.request(method, path, body=body, headers=headers or {})
        response = self.connection.getresponse()
        text = response.read().decode("utf-8", "replace")
        try:
            return response.status, json.loads(text)
        except ValueError:
            return response.status, text

    def post_event(self, secret: str, raw_body: bytes, header: str | None = None) -> tuple[int, Any]:
        """POST `raw_body` signed now with `secret` (or with the given header as is)."""
        header = header or mm.signature_header(secret, raw_body)
        return self.request("POST", INGEST, raw_body, {mm.SIGNATURE_HEADER: header,
                                                        "Content-Type": "application/json"})

    def close(self) -> None:
        self.connection.close()


class Browser:
    """One client of the real server: keeps every cookie it is given (the session's, the login's device
    cookie) whatever its Secure flag and path say."""

    def __init__(self, port: int, **headers: str):
        self.port, self.headers = port, headers
        self.cookies: dict[str, str] = {}

    @property
    def cookie(self) -> str:
        """The Cookie header this client sends."""
        return "; ".join(f"{name}={value}" for name, value in self.cookies.items())

    def request(self, method: str, path: str, form: dict[str, str] | None = None,
                **headers: str) -> tuple[int, http.client.HTTPMessage, str]:
        body = None
        if form is not None:
            body = "&".join(f"{name}={value}" for name, value in form.items()).encode()
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        return self.send(method, path, body, headers)

    def connection(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=HTTP_TIMEOUT)

    def send(self, method: str, path: str, body: bytes | None,
             headers: dict[str, str]) -> tuple[int, http.client.HTTPMessage, str]:
        """One request on a new connection, with this client's headers and session cookie."""
        connection = self.connection()
        try:
            connection.request(method, path, body=body, headers={**self.headers, **headers, "Cookie": self.cookie})
            response = connection.getresponse()
            text = response.read().decode("utf-8", "replace")
        finally:
            connection.close()
        for header in response.headers.get_all("Set-Cookie") or []:
            self.cookies.update({name: morsel.value for name, morsel in SimpleCookie(header).items()})
        return response.status, response.headers, text

    def log_in(self, password: str) -> tuple[int, http.client.HTTPMessage, str]:
        status, _, page = self.request("GET", "/dashboard/login")
        assert status == 200, page
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', page)
        assert csrf is not None, page
        return self.request("POST", "/dashboard/login", {"csrf_token": csrf.group(1), "password": password})


def poster(secret: str, raw_body: bytes) -> Callable[[HttpClient], tuple[int, Any]]:
    """An action for `race`: post this signed body."""
    return lambda client: client.post_event(secret, raw_body)


def race(port: int | Sequence[int], actions: Sequence[Callable[[HttpClient], Any]], timeout: float = 60) -> list[Any]:
    """Run each action in its own thread with its own connection, all released at once by a barrier.

    With several ports (server processes), action i goes to ports[i % len(ports)].

    Returns the actions' results in order; an action's exception fails the test here.
    """
    barrier = threading.Barrier(len(actions), timeout=timeout)
    results: list[Any] = [None] * len(actions)
    errors: list[BaseException] = []

    ports = [port] if isinstance(port, int) else list(port)

    def run(index: int, action: Callable[[HttpClient], Any]) -> None:
        client = HttpClient(ports[index % len(ports)])
        try:
            barrier.wait()
            results[index] = action(client)
        except BaseException as exc:  # reported in the test's thread below
            errors.append(exc)
        finally:
            client.close()

    threads = [threading.Thread(target=run, args=(i, action), daemon=True) for i, action in enumerate(actions)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    assert not any(thread.is_alive() for thread in threads), f"a racing request took longer than {timeout} s"
    if errors:
        raise errors[0]
    return results


# A throwaway PostgreSQL cluster ###############################################

POSTGRES_BIN_GLOB = "/usr/lib/postgresql/*/bin"
POSTGRES_MISSING = ("PostgreSQL tests need the server binaries (Debian: apt-get install postgresql)"
                    " and psycopg (pip install -r requirements-postgres.txt)")


def postgres_bin() -> Path | None:
    """The newest Debian PostgreSQL bin folder with initdb, or the one on PATH; None without psycopg too."""
    try:
        import psycopg  # noqa: F401
        import psycopg_pool  # noqa: F401
    except ImportError:
        return None
    found = sorted(Path("/").glob(POSTGRES_BIN_GLOB.lstrip("/")), key=lambda path: int(path.parent.name))
    folders = [path for path in found if (path / "initdb").exists()]
    on_path = shutil.which("initdb")
    return folders[-1] if folders else (Path(on_path).parent if on_path else None)


class PostgresCluster:
    """initdb + pg_ctl in a temporary folder, on a free 127.0.0.1 port; as the `postgres` user when we
    are root (PostgreSQL refuses root).

    A commit is acknowledged after PostgreSQL wrote its WAL (synchronous_commit on), as in
    production; fsync is off because no test crashes the machine itself (a SIGKILLed node or a
    fast restart loses nothing either way), and flushing hundreds of test databases would take
    minutes. The benchmark's cluster keeps fsync on.
    """

    def __init__(self, bin_dir: Path, *, durable: bool = False):
        self.bin_dir, self.durable = bin_dir, durable
        self.root = Path(tempfile.mkdtemp(prefix="mmoref-pg-"))
        self.data, self.sockets = self.root / "data", self.root / "sockets"
        self.sockets.mkdir()
        self.port = free_port()
        self._names = itertools.count(1)
        self._given_back: list[str] = []
        if os.geteuid() == 0:
            os.chmod(self.root, 0o755)
            shutil.chown(self.root, "postgres")
            shutil.chown(self.sockets, "postgres")
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        self.start()

    def _run(self, program: str, *args: str) -> None:
        argv = [str(self.bin_dir / program), *args]
        if os.geteuid() == 0:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        completed = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        if completed.returncode != 0:
            raise RuntimeError(f"{program} failed:\n{completed.stdout}\n{completed.stderr}")

    def _pg_ctl(self, action: str, *args: str) -> None:
        options = (f"-k {self.sockets} -p {self.port} -c listen_addresses=127.0.0.1 -c max_connections=400"
                   f" -c fsync={'on' if self.durable else 'off'} -c synchronous_commit=on")
        self._run("pg_ctl", action, "-D", str(self.data), "-l", str(self.root / "server.log"), "-w",
                  "-t", "60", "-o", options, *args)

    def start(self) -> None:
        self._pg_ctl("start")

    def shut_down(self) -> None:
        """`pg_ctl stop -m fast`: every connection is cut, the data stays; `start()` brings it back."""
        self._pg_ctl("stop", "-m", "fast")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """An empty database; its URL. One a finished test gave back, emptied, when there is one.

        CREATE DATABASE copies the template, 7.5 MB in some 300 files: 60 to 300 ms, and the
        suite's ~380 databases made 3 GB for stop() to delete, in the teardown of the last test
        (1 s to over 100 s, with the disk busy). Emptying a given-back one takes about 15 ms.
        """
        import psycopg
        while self._given_back:
            url = self._given_back.pop()
            try:
                self._empty(url)
                return url
            except psycopg.Error:  # then it is not reused
                with psycopg.connect(self.url(), autocommit=True) as admin:
                    admin.execute(f"DROP DATABASE IF EXISTS {self._name(url)} WITH (FORCE)")
        name = f"mmoref_test_{os.getpid()}_{next(self._names)}"
        with psycopg.connect(self.url(), autocommit=True) as admin:
            admin.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def give_back(self, url: str) -> None:
        """The test that had the database is over: the next new_database() empties it and hands it
        out, after this test's every teardown (its servers are stopped by then)."""
        self._given_back.append(url)

    @staticmethod
    def _name(url: str) -> str:
        return url.rsplit("/", 1)[1]

    def _empty(self, url: str) -> None:
        """Cut every connection to the database (a pool a test left open), then drop and create
        its one schema again: no table, sequence or row of the test that had it is left. The
        tests connect as the superuser, so the schema's privileges do not matter."""
        import psycopg
        with psycopg.connect(self.url(), autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity"   # waits: PostgreSQL 14+
                          " WHERE datname = %s AND pid <> pg_backend_pid()", (self._name(url),))
        with psycopg.connect(url, autocommit=True) as db:
            db.execute("DROP SCHEMA public CASCADE")
            db.execute("CREATE SCHEMA public")

    def stop(self) -> None:
        """Stop at once (no checkpoint: the folder is deleted next)."""
        with contextlib.suppress(RuntimeError):
            self._pg_ctl("stop", "-m", "immediate")
        shutil.rmtree(self.root, ignore_errors=True)


class IngestLoad:
    """Signed `registered` events posted by `threads` threads, one per token, while a test does
    something else; each answer is recorded with the monotonic time it arrived.

    Bounded: at most one event per token, and `seconds` in all. `pause` seconds between one thread's
    events spread the tokens over time. Use as a context manager.
    """

    def __init__(self, port: int, secret: str, tokens: Sequence[str], threads: int = 4, seconds: float = 60,
                 pause: float = 0):
        self.port, self.secret, self.seconds, self.pause = port, secret, seconds, pause
        self.todo = list(enumerate(tokens))
        self.answers: list[tuple[str, float, int, float]] = []   # (token, acked at, status, latency)
        self.lock, self.stopping = threading.Lock(), threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self) -> None:
        client, deadline = HttpClient(self.port), time.monotonic() + self.seconds
        try:
            while not self.stopping.is_set() and time.monotonic() < deadline:
                with self.lock:
                    if not self.todo:
                        return
                    index, token = self.todo.pop(0)
                started = time.monotonic()
                status, _ = client.post_event(self.secret, event_body("registered", token, f"reg-{index}",
                                                                      referee=f"player-{index}"))
                with self.lock:
                    self.answers.append((token, time.monotonic(), status, time.monotonic() - started))
                self.stopping.wait(self.pause)
        finally:
            client.close()

    def acked_between(self, start: float, end: float) -> list[str]:
        """The tokens whose event was answered 200 from `start` to `end` (time.monotonic())."""
        with self.lock:
            return [token for token, at, status, _ in self.answers if status == 200 and start <= at < end]

    def wait_for(self, count: int, seconds: float = 30) -> None:
        deadline = time.monotonic() + seconds
        while len(self.answers) < count:
            assert time.monotonic() < deadline, f"only {len(self.answers)} of {count} events answered"
            time.sleep(0.01)

    def __enter__(self) -> IngestLoad:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(self.seconds)
        assert not any(thread.is_alive() for thread in self.threads), "a load thread did not stop"
