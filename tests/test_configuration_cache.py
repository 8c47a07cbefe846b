"""Servers and secrets are kept in memory per configuration generation: a change made by another
process (the CLI, another gunicorn worker) is seen by every worker from its next request on."""
from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import PYTHON, SERVER_ID, SERVER_SCRIPT, HttpClient, add_server, event_body, mint_tokens

if sys.platform == "win32":
    pytest.skip("gunicorn runs on POSIX only", allow_module_level=True)
pytest.importorskip("gunicorn", reason="gunicorn is not installed (pip install gunicorn)")

pytestmark = [pytest.mark.slow, pytest.mark.both_engines]  # every engine keeps the configuration alike

WORKERS = 2
GUNICORN = [sys.executable, "-m", "gunicorn", "-w", str(WORKERS), "-b", "127.0.0.1:{port}",
            "--access-logfile", "-", "--access-logformat", "answered-by %(p)s %(s)s %(m)s",
            "mmoref_server:create_app()"]
MAX_REQUESTS = 200   # bound on the requests sent to reach every worker
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


def _answers_from_every_worker(server, secret: str, body: bytes) -> dict[str, set[tuple[int, str | None]]]:
    """Post `body` on fresh connections until every worker has answered at least once since the
    call began; {worker pid: {(status, error), ...}}."""
    log_start = len(server.output())
    sent: list[tuple[int, str | None]] = []
    for _ in range(MAX_REQUESTS):
        client = HttpClient(server.port)
        status, answer = client.post_event(secret, body)
        client.close()
        sent.append((status, answer.get("error")))
        by_worker = _answering_workers(server, log_start, sent)
        if len(by_worker) == WORKERS:
            return by_worker
    raise AssertionError(f"{MAX_REQUESTS} requests did not reach {WORKERS} workers")


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
