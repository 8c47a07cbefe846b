"""Security (docs/contract.md §6): constant-time checks, the file mode, no leaked secrets, 413 before the body.

The loopback bind is checked in test_live_server.py, login throttling in test_dashboard_login.py.
"""
from __future__ import annotations

import ast
import hmac
import inspect
import json
import logging
import os
import socket
import stat
import textwrap
from pathlib import Path
from typing import Any
from typing import Callable

import pytest

import mmoref_server as mm
from tests.support import INGEST
from tests.support import KIT_TAB
from tests.support import PASSWORD
from tests.support import csrf
from tests.support import html
from tests.support import location
from tests.support import login
from tests.support import permissive_umask
from tests.support import rows

pytestmark = pytest.mark.both_engines  # the same on SQLite and on PostgreSQL


class Spy:
    """Wraps a function, recording every call's arguments."""

    def __init__(self, real: Callable[..., Any]):
        self.real, self.calls = real, []

    def __call__(self, *args: Any) -> Any:
        self.calls.append(args)
        return self.real(*args)

    def saw(self, value: Any) -> bool:
        return any(value in call for call in self.calls)


@pytest.fixture
def compare_digest(monkeypatch) -> Spy:
    spy = Spy(hmac.compare_digest)
    monkeypatch.setattr(mm.hmac, "compare_digest", spy)
    return spy


# Constant-time comparisons ###################################################

SECRET_NAMES = {"mac", "macs", "expected", "secret", "secrets", "live_secrets", "password", "configured",
                "stored", "sent"}


def parsed(function: Callable[..., Any]) -> ast.AST:
    return ast.parse(textwrap.dedent(inspect.getsource(function)))


def equality_tests_on_secrets(function: Callable[..., Any]) -> list[str]:
    """`==` / `!=` comparisons in `function` whose operands name a secret-looking variable."""
    found = []
    for node in ast.walk(parsed(function)):
        if isinstance(node, ast.Compare) and any(isinstance(op, (ast.Eq, ast.NotEq)) for op in node.ops):
            names = {n.id for operand in (node.left, *node.comparators) for n in ast.walk(operand)
                     if isinstance(n, ast.Name)}
            if names & SECRET_NAMES:
                found.append(ast.unparse(node))
    return found


def calls(function: Callable[..., Any]) -> set[str]:
    """The callables `function` calls, as written (a comment or a string naming one does not count)."""
    return {ast.unparse(node.func) for node in ast.walk(parsed(function)) if isinstance(node, ast.Call)}


@pytest.mark.parametrize("function, primitive", [
    (mm.verify, "hmac.compare_digest"),
    (mm.diagnose_mac_mismatch, "hmac.compare_digest"),
    (mm.check_password, "hmac.compare_digest"),
    (mm.check_password, "check_password_hash"),
    (mm._guard, "hmac.compare_digest"),
])
def test_secret_checks_use_constant_time_primitives(function, primitive):
    assert primitive in calls(function)
    assert equality_tests_on_secrets(function) == []


def test_mac_check_goes_through_compare_digest(kit, compare_digest):
    token = kit.token()
    raw = json.dumps(kit.body("registered", token, "e1")).encode()
    header = mm.signature_header(kit.secret, raw)
    sent_mac = header.split("sha256=")[1]

    assert kit.post(raw, header=header).status_code == 200
    assert compare_digest.saw(sent_mac)


def test_mac_mismatch_diagnosis_goes_through_compare_digest(kit, compare_digest):
    raw = json.dumps(kit.body("registered", kit.token(), "e1")).encode()
    header = mm.signature_header(kit.secret, raw)  # signed without the newline that is then sent

    response = kit.post(raw + b"\n", header=header)

    assert response.get_json()["reason"] == "mac_mismatch"
    assert "trailing newline" in response.get_json()["hint"]
    # verify found no equal pair, so the diagnosis's match was found by compare_digest
    assert any(a == b for a, b in compare_digest.calls)


def test_env_password_and_csrf_checks_go_through_compare_digest(client, compare_digest):
    token = csrf(html(client.get("/dashboard/login")))

    response = client.post("/dashboard/login", data={"password": "wrong password", "csrf_token": token})

    assert response.status_code == 401
    assert compare_digest.saw(token.encode())   # the CSRF guard
    assert compare_digest.saw(PASSWORD.encode()) and compare_digest.saw(b"wrong password")


def test_stored_password_goes_through_check_password_hash(bare_app, monkeypatch):
    bare_app.extensions["mmoref"].set_admin_password(PASSWORD)
    spy = Spy(mm.check_password_hash)
    monkeypatch.setattr(mm, "check_password_hash", spy)

    assert location(login(bare_app.test_client())) == "/dashboard/"
    assert len(spy.calls) == 1 and spy.calls[0][1] == PASSWORD


# The database file is owner-only ##############################################

def assert_owner_only(db_path: str) -> None:
    files = [Path(db_path + suffix) for suffix in ("", "-wal", "-shm")]
    assert files[0].exists()
    for path in files:
        if path.exists():
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


@pytest.mark.sqlite_only  # the SQLite file's mode
@pytest.mark.slow
@pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX")
def test_serve_creates_the_database_0600(live_server, db_path):
    assert not Path(db_path).exists()
    with permissive_umask():
        server = live_server()
    assert "database" in server.output()
    assert_owner_only(db_path)


# Secrets stay out of logs, answers, lists and pages ##########################

def test_secrets_never_leak(owner, kit, store, db_path, caplog):
    caplog.set_level(logging.DEBUG, logger="mmoref")
    tab = KIT_TAB
    rotated = owner.post_page(f"{tab}/secret", grace="86400").raw
    (new_kid, new_secret), (_, old_secret) = store.live_secrets(kit.server_id, mm.now())
    assert old_secret == kit.secret and new_secret in rotated  # shown exactly once, here
    token = kit.token()

    answers = [
        kit.post(kit.body("registered", token, "ok-1"), secret=new_secret),                       # 200
        kit.post(kit.body("qualified", token, "ok-2"), secret=old_secret, kid=new_kid),           # 401 mac_mismatch
        kit.post(kit.body("qualified", token, "bad", note=new_secret), secret="not-the-secret"),  # 401, secret pasted
        kit.post(f'{{"oops": "{old_secret}", '.encode(), secret=old_secret),                     # 400 not JSON
        kit.post({"event": "registered", "server_id": kit.server_id, "secret": new_secret}),     # 400 field
        kit.post(kit.body("qualified", "forged-" + token[-8:], "x")),                            # 404 token
    ]
    assert [a.status_code for a in answers] == [200, 401, 401, 400, 400, 404]
    test_event = owner.post_page(f"{tab}/test-event").raw
    assert "&#34;test&#34;: true" in test_event or '"test": true' in test_event
    detail_id = rows(db_path, "SELECT id FROM delivery_log")[0][0]
    pages = [owner.client.get(path).get_data(as_text=True) for path in (
        tab, "/dashboard/", f"{tab}/log.csv", f"{tab}/log/{detail_id}")]
    rejected = json.dumps(rows(db_path, "SELECT * FROM rejected_requests"))
    html(login(kit.client, "not " + PASSWORD), 401)   # inside the captured phase: no log may show it
    logged = caplog.text + json.dumps([[r.getMessage(), str(r.args)] for r in caplog.records])

    # the two mac_mismatch refusals are alike: one row, counted twice
    assert rows(db_path, "SELECT count(*), sum(repeats) FROM rejected_requests") == [(4, 5)]
    for secret in (old_secret, new_secret):
        assert secret not in logged
        assert not any(secret in a.get_data(as_text=True) for a in answers)
        assert secret not in rejected
        assert not any(secret in page for page in pages + [test_event])
    assert token not in logged and token not in rejected
    assert PASSWORD not in logged


# Oversized bodies are refused before they are read ############################

def post_headers_only(port: int, content_length: int, timeout: float) -> bytes:
    """Send a POST's headers announcing `content_length` bytes, send no body, return what comes back."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(f"POST {INGEST} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {content_length}\r\n\r\n".encode())
        return sock.recv(4096)  # socket.timeout (the bound) if the server waits for the body


@pytest.mark.slow
def test_huge_content_length_is_refused_before_the_body(live_server):
    server = live_server()
    answer = post_headers_only(server.port, 10_000_000, timeout=5)
    assert answer.startswith(b"HTTP/1.1 413 "), answer
