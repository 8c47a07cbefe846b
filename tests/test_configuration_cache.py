"""Servers and secrets are kept in memory per configuration generation: a change made by another
process (the CLI, another gunicorn worker) is seen by every worker from its next request on."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import GUNICORN_ACCESS_LOG
from tests.support import PYTHON
from tests.support import SERVER_ID
from tests.support import SERVER_SCRIPT
from tests.support import add_server
from tests.support import answering_workers
from tests.support import event_body
from tests.support import gunicorn_command
from tests.support import mint_tokens
from tests.support import one_per_sync_worker
from tests.support import signed_request

if sys.platform == "win32":
    pytest.skip("gunicorn runs on POSIX only", allow_module_level=True)
pytest.importorskip("gunicorn", reason="gunicorn is not installed (pip install gunicorn)")

pytestmark = [pytest.mark.slow, pytest.mark.both_engines]  # every engine keeps the configuration alike

WORKERS = 2
GUNICORN = gunicorn_command(*GUNICORN_ACCESS_LOG, workers=WORKERS)


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
    """Post `body` once to each worker; {worker pid: {(status, error)}}."""
    log_start = len(server.output())
    answers = [(status, json.loads(text).get("error"))
               for status, text in one_per_sync_worker(server.port, [signed_request(secret, body)] * WORKERS)]
    by_worker: dict[str, set[tuple[int, str | None]]] = {}
    for (pid, logged_status), answer in zip(answering_workers(server, log_start, WORKERS, "POST"), answers):
        assert logged_status == answer[0]
        by_worker.setdefault(pid, set()).add(answer)
    assert len(by_worker) == WORKERS, f"answered by {sorted(by_worker)}"
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
                       " mm.open_store(sys.argv[1]).update_server(sys.argv[2], referrals_enabled=0)",
         db_path, SERVER_ID],
        cwd=Path(SERVER_SCRIPT).parent, capture_output=True, text=True, timeout=60)
    assert disabled.returncode == 0, disabled.stderr

    after = _answers_from_every_worker(server, secret, body)
    assert after == {pid: {(404, "referrals not enabled")} for pid in after}
