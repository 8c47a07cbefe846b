"""The one log line per ingest request reaches the operator under `serve`, under gunicorn and when
the blueprint is embedded in a host app (whose logging configuration then decides)."""
from __future__ import annotations

import logging
import time

import pytest
from flask import Flask

import mmoref_server as mm
from tests.support import INGEST
from tests.support import PYTHON
from tests.support import HttpClient

LINE = "mmoref: ingest status=400 error=missing signature header"


def post_unsigned(port: int) -> None:
    client = HttpClient(port)
    try:
        assert client.request("POST", INGEST, b"{}")[0] == 400
    finally:
        client.close()


def wait_for(server, text: str, seconds: float = 10) -> str:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if text in server.output():
            return server.output()
        time.sleep(0.1)
    return server.output()


def test_serve_logs_each_ingest_request(live_server):
    server = live_server()
    post_unsigned(server.port)
    assert "INFO " + LINE in wait_for(server, LINE)


def test_gunicorn_error_log_has_each_ingest_request(live_server, tmp_path):
    pytest.importorskip("gunicorn")
    error_log = tmp_path / "gunicorn-error.log"
    server = live_server(command=[PYTHON, "-m", "gunicorn", "-w", "1", "-k", "gthread", "--threads", "2",
                                  "-b", "127.0.0.1:{port}", "--log-level", "info", "--error-logfile",
                                  str(error_log), "mmoref_server:create_app()"])
    post_unsigned(server.port)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and "ingest status=400" not in error_log.read_text():
        time.sleep(0.1)
    assert "[INFO] ingest status=400 error=missing signature header" in error_log.read_text()


def test_embedded_app_logging_decides(db_path, caplog):
    host = Flask("host")
    host.config.update(MMOREF_DB=db_path, SECRET_KEY="the host's own key")  # registering needs one
    host.register_blueprint(mm.blueprint, url_prefix="/mmoref")

    with caplog.at_level(logging.INFO):
        response = host.test_client().post("/mmoref" + INGEST, data=b"{}")

    assert response.status_code == 400
    lines = [record.getMessage() for record in caplog.records if record.name == "mmoref"]
    assert lines == ["ingest status=400 error=missing signature header reason=- outcome=- server=- token=-"]
    assert mm.log.handlers == [] and mm.log.propagate   # no handler of ours: the host's config decides
