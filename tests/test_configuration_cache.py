"""Servers and secrets are kept in memory per configuration generation: a change made by another
process (the CLI, another gunicorn worker) is seen by every worker from its next request on."""
from __future__ import annotations

import http.client
import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import mmoref_server as mm
from tests.support import HTTP_TIMEOUT
from tests.support import INGEST
from tests.support import PYTHON
from tests.support import SERVER_ID
from tests.support import SERVER_SCRIPT
from tests.support import add_server
from tests.support import event_body
from tests.support import mint_tokens

if sys.platform == "win32":
    pytest.skip("gunicorn runs on POSIX only", allow_module_level=True)
pytest.importorskip("gunicorn", reason="gunicorn is not installed (pip install gunicorn)")

pytestmark = [pytest.mark.slow, pytest.mark.both_engines]  # every engine keeps the configuration alike

WORKERS = 2
GUNICORN = [sys.executable, "-m", "gunicorn", "-w", str(WORKERS), "-b", "127.0.0.1:{port}",
            "--access-logfile", "-", "--access-logformat", "answered-by %(p)s %(s)s %(m)s",
            "mmoref_server:create_app()"]
ANSWERED_POST = r"answered-by <(\d+)> (\d+) POST"   # not the /healthz GETs that found the server up


@pytest.fixture
def workers(live_server, store):
    """(server, secret, body): gunicorn with WORKERS processes; `body` is a signed-able event."""
    secret = add_server(store)
    server = live_server(command=GUNICORN, env={"PYTHONUNBUFFERED": "1"})  # access-log lines as they happen
    body = event_body("registered", mint_tokens(store, ["alice"])[0], "reg-1")
    yield server, secret, body
    output = server.stop()
    assert "Traceback" not in output, output


def _signed_request(secret: str, body: bytes) -> bytes:
    """The raw HTTP/1.1 request that posts `body`, signed now with `secret`."""
    headers = {"Host": "127.0.0.1", "Content-Type": "application/json", "Content-Length": str(len(body)),
               "Connection": "close", mm.SIGNATURE_HEADER: mm.signature_header(secret, body)}
    head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    return f"POST {INGEST} HTTP/1.1\r\n{head}\r\n".encode() + body


def _answer(connection: socket.socket) -> tuple[int, str | None]:
    response = http.client.HTTPResponse(connection)
    response.begin()
    return response.status, json.loads(response.read()).get("error")


def _answers_from_every_worker(server, secret: str, body: bytes) -> dict[str, set[tuple[int, str | None]]]:
    """Post `body` once to each worker; {worker pid: {(status, error)}}.

    Which worker accepts a connection is the kernel's choice, so the test does not hope for a
    spread: a sync worker serves one request at a time, so each request but the last is held
    back by one byte, keeping the worker that accepted it busy; the next connection must go to
    another worker. Then the held requests are finished, one after another.
    """
    log_start = len(server.output())
    held = []
    for _ in range(WORKERS - 1):
        connection = socket.create_connection(("127.0.0.1", server.port), timeout=HTTP_TIMEOUT)
        request = _signed_request(secret, body)
        connection.sendall(request[:-1])
        held.append((connection, request[-1:]))
    with socket.create_connection(("127.0.0.1", server.port), timeout=HTTP_TIMEOUT) as last:
        last.sendall(_signed_request(secret, body))
        sent = [_answer(last)]
    for connection, rest in held:
        with connection:
            connection.sendall(rest)
            sent.append(_answer(connection))
    by_worker = _answering_workers(server, log_start, sent)
    assert len(by_worker) == WORKERS, f"answered by {sorted(by_worker)}"
    return by_worker


def _answering_workers(server, log_start: int, sent: list[tuple[int, str | None]]) -> dict[str, set]:
    """Pair the access-log lines since `log_start` (in order) with the answers received (in order)."""
    deadline = time.monotonic() + 5
    lines = re.findall(ANSWERED_POST, server.output()[log_start:])
    while len(lines) < len(sent) and time.monotonic() < deadline:  # the log line may trail the answer
        time.sleep(0.05)
        lines = re.findall(ANSWERED_POST, server.output()[log_start:])
    assert len(lines) == len(sent), f"{len(sent)} answers, {len(lines)} access-log lines"
    by_worker: dict[str, set[tuple[int, str | None]]] = {}
    for (pid, logged_status), answer in zip(lines, sent):
        assert int(logged_status) == answer[0]
        by_worker.setdefault(pid, set()).add(answer)
    return by_worker


def test_a_secret_revoked_by_the_cli_is_refused_by_every_worker(workers, db_path):
    server, secret, body = workers
    before = _answers_from_every_worker(server, secret, body)   # each worker now keeps the servers and secrets
    assert set().union(*before.values()) <= {(200, None)}

    rotated = subprocess.run([PYTHON, str(SERVER_SCRIPT), "rotate-secret", SERVER_ID, "--grace", "0",
                              "--db", db_path], capture_output=True, text=True, timeout=60)
    assert rotated.returncode == 0, rotated.stderr

    after = _answers_from_every_worker(server, secret, body)
    assert after == {pid: {(401, "bad_signature")} for pid in after}


def test_referrals_disabled_by_another_process_are_refused_by_every_worker(workers, db_path):
    server, secret, body = workers
    before = _answers_from_every_worker(server, secret, body)
    assert set().union(*before.values()) <= {(200, None)}

    disabled = subprocess.run(
        [PYTHON, "-c", "import sys, mmoref_server as mm;"
                       " mm.Store(sys.argv[1]).update_server(sys.argv[2], referrals_enabled=0)", db_path, SERVER_ID],
        cwd=Path(SERVER_SCRIPT).parent, capture_output=True, text=True, timeout=60)
    assert disabled.returncode == 0, disabled.stderr

    after = _answers_from_every_worker(server, secret, body)
    assert after == {pid: {(404, "referrals not enabled")} for pid in after}
