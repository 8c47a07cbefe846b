"""The database file going wrong under a real server: deleted or replaced while serving, another
process holding the write lock, a read-only file, a damaged file, a full disk. Each is refused
with its cause in one line, and /healthz tells the truth quickly."""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import sqlite3
import stat
import subprocess
import time
from pathlib import Path

import pytest

import mmoref_server as mm
from tests.support import INGEST
from tests.support import PYTHON
from tests.support import ROOT
from tests.support import SERVER_SCRIPT
from tests.support import HttpClient
from tests.support import add_server
from tests.support import event_body
from tests.support import limit_writer_pages
from tests.support import mint_tokens
from tests.support import scalar

# As root, file permissions do not bind: run the server without the capability that overrides them.
NO_OVERRIDE = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
needs_permissions = pytest.mark.skipif(bool(NO_OVERRIDE) and shutil.which("setpriv") is None,
                                       reason="running as root without setpriv: permissions cannot be enforced")


def post(port: int, secret: str, raw_body: bytes, timeout: float = 20) -> tuple[int, dict, dict]:
    """(status, JSON body, headers) of one signed POST."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("POST", INGEST, raw_body, {mm.SIGNATURE_HEADER: mm.signature_header(secret, raw_body)})
        response = connection.getresponse()
        return response.status, json.loads(response.read()), dict(response.getheaders())
    finally:
        connection.close()


def timed_healthz(port: int) -> tuple[float, int, dict]:
    """(seconds taken, status, body) of GET /healthz."""
    started = time.monotonic()
    client = HttpClient(port, timeout=10)
    try:
        status, body = client.request("GET", "/healthz")
    finally:
        client.close()
    return time.monotonic() - started, status, body


def healthz_once_it_changes(port: int) -> tuple[float, int, dict]:
    """(seconds until /healthz stopped saying 200, status, body): it checks the file, folder and
    disk at most once every HEALTH_CHECK_SECONDS, so a change shows within about a second."""
    started = time.monotonic()
    while True:
        _, status, body = timed_healthz(port)
        waited = time.monotonic() - started
        if status != 200 or waited > mm.HEALTH_CHECK_SECONDS + 5:
            return waited, status, body
        time.sleep(0.05)


def run_cli(*args: str, prefix: list[str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*(prefix or []), PYTHON, str(SERVER_SCRIPT), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def assert_refused_at_start(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """The server did not start: exit 1, one `error:` line naming the cause, no traceback."""
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def serving(store, db_path, live_server):
    """A real server on db_path with one server added and tokens minted: (server, secret, tokens)."""
    secret = add_server(store)
    tokens = mint_tokens(store, [f"code{i}" for i in range(20)])
    store.close()
    return live_server(), secret, tokens


# The file deleted or replaced while serving ##################################

def test_deleted_database_answers_503_and_healthz_says_so(serving, db_path):
    server, secret, tokens = serving
    assert post(server.port, secret, event_body("registered", tokens[0], "reg-0", referee="p0"))[0] == 200
    for suffix in ("", "-wal", "-shm"):
        Path(db_path + suffix).unlink(missing_ok=True)

    status, body, headers = post(server.port, secret, event_body("registered", tokens[1], "reg-1", referee="p1"))

    assert (status, body["ok"], body["error"]) == (503, False, "database unavailable"), body
    assert "same server_event_id" in body["hint"]
    assert headers["Retry-After"] == str(mm.RETRY_AFTER_SECONDS)
    seconds, status, health = timed_healthz(server.port)
    assert (status, health["ok"], health["reason"]) == (503, False, "deleted"), health
    assert "was deleted while the server was running" in health["hint"]
    assert seconds < 1.5


def test_healthz_says_deleted_within_a_second_without_any_write(serving, db_path):
    server, _, _ = serving
    assert timed_healthz(server.port)[1:] == (200, {"ok": True})   # its checks are fresh for a second now
    Path(db_path).unlink()

    seconds, status, health = healthz_once_it_changes(server.port)

    assert (status, health.get("reason")) == (503, "deleted"), health
    assert seconds < mm.HEALTH_CHECK_SECONDS + 3   # the next check after the cached one, with room for a busy machine


def test_database_replaced_by_a_restore_answers_503(serving, db_path, tmp_path):
    server, secret, tokens = serving
    backup = tmp_path / "backup.db"
    with sqlite3.connect(db_path) as source, sqlite3.connect(backup) as target:
        source.backup(target)
    assert post(server.port, secret, event_body("registered", tokens[0], "reg-0", referee="p0"))[0] == 200
    restored = hashlib.sha256(backup.read_bytes()).digest()
    os.replace(backup, db_path)   # the restore by `mv` the issue describes, with the server still running

    status, body, headers = post(server.port, secret, event_body("registered", tokens[1], "reg-1", referee="p1"))

    assert (status, body["error"], headers["Retry-After"]) == (503, "database unavailable", "5"), body
    seconds, status, health = timed_healthz(server.port)
    assert (status, health["reason"]) == (503, "replaced"), health
    assert "stop the server before restoring" in health["hint"]
    assert hashlib.sha256(Path(db_path).read_bytes()).digest() == restored  # nothing written into it
    assert "was replaced while the server was running" in server.stop()


# Another process holding the write lock ######################################

def test_foreign_write_lock_is_a_quick_503_and_healthz_does_not_wait(serving, db_path):
    server, secret, tokens = serving
    holder = sqlite3.connect(db_path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        seconds, status, health = timed_healthz(server.port)
        assert (status, health) == (200, {"ok": True})   # reads still work: it says so at once
        assert seconds < 1.5

        started = time.monotonic()
        status, body, headers = post(server.port, secret, event_body("registered", tokens[0], "reg-0"))
        waited = time.monotonic() - started

        assert (status, body["ok"], body["error"]) == (503, False, "database busy"), body
        assert "same server_event_id" in body["hint"]
        assert headers["Retry-After"] == str(mm.RETRY_AFTER_SECONDS)
        assert mm.REQUEST_BUSY_TIMEOUT - 0.5 < waited < mm.REQUEST_BUSY_TIMEOUT + 5
        seconds, status, health = timed_healthz(server.port)
        assert (status, health["reason"]) == (503, "locked"), health
        assert seconds < 1.5
    finally:
        holder.execute("ROLLBACK")
        holder.close()

    retry = post(server.port, secret, event_body("registered", tokens[0], "reg-0"))
    assert (retry[0], retry[1]["state"]) == (200, "registered"), retry
    assert timed_healthz(server.port)[1:] == (200, {"ok": True})


# A read-only file ###########################################################

@pytest.fixture
def read_only(db_path):
    """Make the database file and its folder read-only; undo it afterwards (pytest must clean up)."""
    folder = Path(db_path).parent

    def apply() -> None:
        os.chmod(db_path, 0o444)
        os.chmod(folder, 0o555)

    yield apply
    os.chmod(folder, 0o755)
    os.chmod(db_path, 0o644)


@needs_permissions
def test_read_only_database_is_refused_at_start_with_its_cause(store, db_path, read_only):
    add_server(store)
    store.close()
    read_only()

    result = run_cli("serve", "--port", "1", "--db", db_path, prefix=NO_OVERRIDE)

    line = assert_refused_at_start(result, os.path.abspath(db_path), "cannot be written", "read-only")
    assert "not a usable SQLite database" not in line


@needs_permissions
def test_healthz_turns_503_when_the_file_becomes_read_only(store, db_path, live_server, read_only):
    add_server(store)
    store.close()
    server = live_server(command=[*NO_OVERRIDE, PYTHON, str(SERVER_SCRIPT), "serve", "--port", "{port}"])
    read_only()

    seconds, status, health = healthz_once_it_changes(server.port)

    assert (status, health.get("error"), health.get("reason")) == (503, "database unavailable", "read-only"), health
    assert seconds < mm.HEALTH_CHECK_SECONDS + 3   # the next check after the cached one, with room for a busy machine


def test_read_only_command_on_a_missing_folder_is_one_line(tmp_path):
    result = run_cli("add-server", "srv_1", "--game", "g", "--db", str(tmp_path / "nowhere" / "referrals.db"))
    assert_refused_at_start(result, "folder", "does not exist")


# A damaged file #############################################################

PAGE = 4096


def _damaged_database(db_path: str, first_page: int, pages: int, filler: bytes) -> None:
    """A real database of many pages, then `pages` pages from `first_page` (1-based) overwritten."""
    store = mm.open_store(db_path)
    secret = add_server(store)
    tokens = mint_tokens(store, [f"code{i}" for i in range(400)])
    store.close()
    assert secret and tokens
    with sqlite3.connect(db_path) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    size = os.stat(db_path).st_size
    assert size > (first_page + pages) * PAGE
    with open(db_path, "r+b") as file:
        file.seek((first_page - 1) * PAGE)
        file.write((filler * PAGE)[:PAGE] * pages)


def test_garbage_in_the_middle_is_refused_at_start(db_path):
    _damaged_database(db_path, first_page=8, pages=3, filler=b"garbage!")

    result = run_cli("serve", "--port", "1", "--db", db_path)

    assert_refused_at_start(result, os.path.abspath(db_path), "is damaged", "restore a backup")


def test_zeroed_early_pages_are_one_line_not_a_traceback(db_path):
    _damaged_database(db_path, first_page=2, pages=4, filler=b"\0")  # the header page kept

    result = run_cli("serve", "--port", "1", "--db", db_path)

    assert_refused_at_start(result, os.path.abspath(db_path))


def test_a_damaged_database_is_refused_by_read_commands_too(db_path):
    _damaged_database(db_path, first_page=8, pages=3, filler=b"garbage!")
    result = run_cli("log", "srv_robust", "--db", db_path)
    assert_refused_at_start(result, "is damaged")


# A full disk ################################################################

def test_healthz_reports_a_full_disk_until_a_write_succeeds(kit, store, client):
    tokens = [kit.token(f"code{i}") for i in range(300)]
    unlimited = limit_writer_pages(store)
    for i, token in enumerate(tokens):
        if kit.send("registered", token, f"reg-{i}", referee_identity=f"player-{i}").status_code != 200:
            break
    else:
        pytest.fail("the database never filled up")

    health = client.get("/healthz")
    assert health.status_code == 503
    assert (health.json["error"], health.json["reason"]) == ("database unavailable", "disk full")
    assert "free some space" in health.json["hint"]

    limit_writer_pages(store, unlimited)
    assert kit.send("registered", tokens[i], f"reg-{i}", referee_identity=f"player-{i}").status_code == 200
    assert client.get("/healthz").json == {"ok": True}


def test_file_mode_survives_the_checks(db_path):
    mm.open_store(db_path).close()
    assert stat.S_IMODE(os.stat(db_path).st_mode) == 0o600
    assert scalar(db_path, "PRAGMA journal_mode") == "wal"
