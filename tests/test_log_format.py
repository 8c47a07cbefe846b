"""MMOREF_LOG_FORMAT: `serve`'s log lines as text (the default) or one JSON object a line."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import mmoref_server as mm
from tests.support import PYTHON
from tests.support import ROOT
from tests.support import SERVER_SCRIPT
from tests.support import HttpClient
from tests.support import assert_one_error_line
from tests.support import free_port
from tests.support import gunicorn_command

pytestmark = pytest.mark.slow

SERVER = "srv_logs"


def serve_events(live_server, db_path: str, **env: str) -> tuple[str, str]:
    """A real server gets one accepted event, one bad signature and one oversized body; (stderr, token)."""
    store = mm.open_store(db_path)
    secret, _ = store.add_server(SERVER, "mygame", "Logs", "https://game.example/register")
    token, _ = store.mint_referral(SERVER, "alice")
    server = live_server(env=env, stderr_apart=True)
    client = HttpClient(server.port)
    try:
        body = mm.build_body("registered", token, SERVER, "reg-1", referee_identity="player-1")
        assert client.post_event(secret, body)[0] == 200
        assert client.post_event("not-the-secret", mm.build_body("qualified", token, SERVER, "q-1"))[0] == 401
        assert client.post_event(secret, b"x" * (mm.MAX_BODY_BYTES + 1))[0] == 413
    finally:
        client.close()
    server.stop()
    return server.stderr_path.read_text(), token


def test_json_log_is_one_object_a_line_with_the_ingest_fields_as_keys(live_server, db_path):
    stderr, token = serve_events(live_server, db_path, MMOREF_LOG_FORMAT="json")
    entries = [json.loads(line) for line in stderr.splitlines()]   # every line is JSON, or this raises
    assert all(isinstance(entry, dict) and {"time", "level", "logger", "message"} <= entry.keys()
               for entry in entries), entries
    ingest = [entry for entry in entries if entry["message"].startswith("ingest ")]
    assert [entry["status"] for entry in ingest] == [200, 401, 413], ingest
    accepted, refused, too_large = ingest
    assert accepted["level"] == "INFO" and accepted["logger"] == "mmoref"
    assert accepted["time"].endswith("Z") and accepted["time"][10] == "T"
    assert {key: accepted[key] for key in ("error", "reason", "outcome", "server", "token")} == {
        "error": None, "reason": None, "outcome": "registered", "server": SERVER, "token": mm.mask(token)}
    assert (refused["error"], refused["reason"], refused["outcome"]) == ("bad_signature", "mac_mismatch", None)
    assert too_large["error"] == "body too large"
    assert token not in stderr


@pytest.mark.skipif(sys.platform == "win32", reason="gunicorn runs on POSIX only")
def test_json_log_under_gunicorn_with_the_shipped_logging_config(live_server, db_path):
    pytest.importorskip("gunicorn")
    server = live_server(env={"MMOREF_LOG_FORMAT": "json"}, stderr_apart=True, command=gunicorn_command(
        "--log-config-json", str(ROOT / "deploy" / "gunicorn-logging.json")))
    client = HttpClient(server.port)
    assert client.request("POST", mm.INGEST_PATH, b"{}")[0] == 400
    client.close()
    access = [json.loads(line) for line in server.stop().splitlines()]             # stdout: the access log
    errors = [json.loads(line) for line in server.stderr_path.read_text().splitlines()]   # every line is JSON
    assert any(entry["message"].startswith("Starting gunicorn") for entry in errors), errors   # the master's too
    [ingest] = [entry for entry in errors if entry["logger"] == "mmoref"]
    assert (ingest["level"], ingest["status"], ingest["error"]) == ("INFO", 400, "missing signature header")
    assert any('"POST /api/referral/events HTTP/1.1" 400' in entry["message"] for entry in access), access


def test_text_log_is_the_default(live_server, db_path):
    stderr, token = serve_events(live_server, db_path)
    ingest = [line for line in stderr.splitlines() if " mmoref: ingest " in line]
    assert len(ingest) == 3, stderr
    assert ingest[0].endswith(f"INFO mmoref: ingest status=200 error=- reason=- outcome=registered "
                              f"server={SERVER} token={mm.mask(token)}")
    assert "ingest status=401 error=bad_signature reason=mac_mismatch outcome=- " in ingest[1]
    assert ingest[2].endswith("ingest status=413 error=body too large")
    assert not stderr.lstrip().startswith("{")


def test_an_unknown_log_format_is_one_error_line(tmp_path):
    env = {**os.environ, "MMOREF_PORT": str(free_port()), "MMOREF_LOG_FORMAT": "xml"}
    result = subprocess.run([PYTHON, str(SERVER_SCRIPT)], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=30)
    assert_one_error_line(result.returncode, result.stderr, "MMOREF_LOG_FORMAT='xml' is not valid",
                          "expected text or json")
    assert result.stdout == ""
