"""Security (SPEC 6): constant-time checks, file mode, loopback bind, no leaked secrets, throttling, 413."""
from __future__ import annotations

import ast
import contextlib
import hmac
import inspect
import json
import logging
import os
import re
import socket
import stat
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest

import mmoref_server as mm
from tests.support import INGEST, rows

PASSWORD = "correct horse battery staple"


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


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match, "no CSRF token in the page"
    return match.group(1)


def log_in(client: Any, password: str = PASSWORD) -> Any:
    token = csrf_of(client.get("/dashboard/login").get_data(as_text=True))
    return client.post("/dashboard/login", data={"password": password, "csrf_token": token})


@pytest.fixture
def owner(app, client):
    """The test client, logged in with the MMOREF_ADMIN_PASSWORD password."""
    app.config["MMOREF_ADMIN_PASSWORD"] = PASSWORD
    assert log_in(client).status_code == 302
    return client


# Constant-time comparisons ###################################################

SECRET_NAMES = {"mac", "macs", "expected", "secret", "secrets", "live_secrets", "password", "configured",
                "stored", "sent"}


def equality_tests_on_secrets(function: Callable[..., Any]) -> list[str]:
    """`==` / `!=` comparisons in `function` whose operands name a secret-looking variable."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and any(isinstance(op, (ast.Eq, ast.NotEq)) for op in node.ops):
            names = {n.id for operand in (node.left, *node.comparators) for n in ast.walk(operand)
                     if isinstance(n, ast.Name)}
            if names & SECRET_NAMES:
                found.append(ast.unparse(node))
    return found


@pytest.mark.parametrize("function, primitive", [
    (mm.verify, "hmac.compare_digest"),
    (mm.diagnose_mac_mismatch, "hmac.compare_digest"),
    (mm.check_password, "hmac.compare_digest"),
    (mm.check_password, "check_password_hash"),
    (mm._guard, "hmac.compare_digest"),
])
def test_secret_checks_use_constant_time_primitives(function, primitive):
    assert primitive in inspect.getsource(function)
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


def test_env_password_and_csrf_checks_go_through_compare_digest(app, client, compare_digest):
    app.config["MMOREF_ADMIN_PASSWORD"] = PASSWORD
    page = client.get("/dashboard/login").get_data(as_text=True)

    response = client.post("/dashboard/login", data={"password": "wrong password", "csrf_token": csrf_of(page)})

    assert response.status_code == 401
    assert compare_digest.saw(csrf_of(page).encode())   # the CSRF guard
    assert compare_digest.saw(PASSWORD.encode()) and compare_digest.saw(b"wrong password")


def test_stored_password_goes_through_check_password_hash(client, store, monkeypatch):
    store.set_admin_password(PASSWORD)
    spy = Spy(mm.check_password_hash)
    monkeypatch.setattr(mm, "check_password_hash", spy)

    assert log_in(client).status_code == 302
    assert len(spy.calls) == 1 and spy.calls[0][1] == PASSWORD


# The database file is owner-only ##############################################

@contextlib.contextmanager
def permissive_umask() -> Iterator[None]:
    """Umask 0: files would be world-readable unless created 0600 on purpose."""
    previous = os.umask(0)
    try:
        yield
    finally:
        os.umask(previous)


def assert_owner_only(db_path: str) -> None:
    files = [Path(db_path + suffix) for suffix in ("", "-wal", "-shm")]
    assert files[0].exists()
    for path in files:
        if path.exists():
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


@pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX")
def test_store_creates_the_database_0600(db_path):
    with permissive_umask():
        store = mm.Store(db_path)
        store.add_server("srv_1", "game")  # a write: the -wal and -shm files exist now
        assert Path(db_path + "-wal").exists()
    assert_owner_only(db_path)
    store.close()


@pytest.mark.slow
@pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX")
def test_serve_creates_the_database_0600(live_server, db_path):
    assert not Path(db_path).exists()
    with permissive_umask():
        server = live_server()
    assert "database" in server.output()
    assert_owner_only(db_path)


# serve binds 127.0.0.1 by default ############################################

def non_loopback_address() -> str | None:
    """This machine's outward IPv4 address, if it has one (UDP connect sends no packet)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: only picks the route
            address = probe.getsockname()[0]
    except OSError:
        return None
    return None if address.startswith("127.") or address == "0.0.0.0" else address


@pytest.mark.slow
def test_serve_binds_loopback_by_default(live_server):
    server = live_server()  # `serve --port P`, no --host, no MMOREF_HOST

    assert f"http://127.0.0.1:{server.port}/dashboard" in server.output()
    with socket.create_connection(("127.0.0.1", server.port), timeout=5):
        pass
    address = non_loopback_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address to try")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((address, server.port), timeout=5).close()


# Secrets stay out of logs, answers, lists and pages ##########################

def test_secrets_never_leak(owner, kit, store, db_path, caplog):
    caplog.set_level(logging.DEBUG, logger="mmoref")
    tab = f"/dashboard/mygame/{kit.server_id}/referrals"
    csrf = csrf_of(owner.get(tab).get_data(as_text=True))
    rotated = owner.post(f"{tab}/secret", data={"grace": "86400", "csrf_token": csrf}).get_data(as_text=True)
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
    test_event = owner.post(f"{tab}/test-event", data={"csrf_token": csrf}).get_data(as_text=True)
    assert "&#34;test&#34;: true" in test_event or '"test": true' in test_event
    detail_id = rows(db_path, "SELECT id FROM delivery_log")[0][0]
    pages = [owner.get(path).get_data(as_text=True) for path in (
        tab, "/dashboard/", f"{tab}/log.csv", f"{tab}/log/{detail_id}")]
    rejected = json.dumps(rows(db_path, "SELECT * FROM rejected_requests"))
    logged = caplog.text + json.dumps([[r.getMessage(), str(r.args)] for r in caplog.records])

    assert len(rows(db_path, "SELECT * FROM rejected_requests")) == 5
    for secret in (old_secret, new_secret):
        assert secret not in logged
        assert not any(secret in a.get_data(as_text=True) for a in answers)
        assert secret not in rejected
        assert not any(secret in page for page in pages + [test_event])
    assert token not in logged and token not in rejected
    assert PASSWORD not in logged


# Failed logins are slowed down ################################################

def test_login_is_throttled_after_five_failures(app, client, monkeypatch):
    app.config["MMOREF_ADMIN_PASSWORD"] = PASSWORD
    monkeypatch.setattr(mm, "login_throttle", mm._LoginThrottle())
    clock = [1_800_000_000]
    monkeypatch.setattr(mm, "now", lambda: clock[0])

    assert [log_in(client, "wrong password").status_code for _ in range(5)] == [401] * 5
    throttled = log_in(client, PASSWORD)  # even the right password waits

    assert throttled.status_code == 429
    assert "Too many failed logins" in throttled.get_data(as_text=True)
    assert client.get("/dashboard/").status_code == 302  # not logged in
    clock[0] += mm.LOGIN_MAX_WAIT
    assert log_in(client, PASSWORD).status_code == 302
    assert client.get("/dashboard/").status_code == 200


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
