"""Shared pytest fixtures: a fresh database per test, the Flask test client, the CLI, a kit."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import mmoref_server as mm

ROOT = Path(__file__).resolve().parent
SERVER_SCRIPT = ROOT / "mmoref_server.py"
INGEST = mm.INGEST_PATH


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never see the machine's MMOREF_* settings."""
    for name in list(os.environ):
        if name.startswith("MMOREF_"):
            monkeypatch.delenv(name)


@pytest.fixture
def db_path(tmp_path: Path) -> str:
    return str(tmp_path / "referrals.db")


@pytest.fixture
def app(db_path: str):
    return mm.create_app({"MMOREF_DB": db_path, "TESTING": True})


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def store(app) -> mm.Store:
    with app.app_context():
        return mm.get_store()


class CliResult:
    def __init__(self, result: Any):
        self.exit_code, self.stdout, self.stderr = result.exit_code, result.stdout, result.stderr

    def json(self) -> Any:
        return json.loads(self.stdout)


class Runner:
    """Runs `mmoref_server.py COMMAND ...` in-process against the test database."""

    def __init__(self, db_path: str):
        self.db_path = db_path

    def __call__(self, *args: str, db: bool = True) -> CliResult:
        argv = list(args) + (["--db", self.db_path] if db else [])
        return CliResult(_stderr_apart_runner().invoke(mm.cli, argv, prog_name="mmoref_server.py"))


def _stderr_apart_runner() -> CliRunner:
    """A CliRunner keeping stderr apart: click 8.1 (Python 3.9) needs asking; 8.2 removed the option."""
    try:
        return CliRunner(mix_stderr=False)
    except TypeError:
        return CliRunner()


@pytest.fixture
def runner(db_path: str) -> Runner:
    return Runner(db_path)


class Kit:
    """A game server's side of the contract: one server, its secret, signed posts."""

    def __init__(self, client: Any, store: mm.Store, server_id: str = "srv_123"):
        self.client, self.store, self.server_id = client, store, server_id
        self.secret, self.kid = store.add_server(server_id, "mygame", "My Server",
                                                 "https://game.example/register?lang=en")

    def token(self, code: str = "alice", server_id: str | None = None) -> str:
        return self.store.mint_referral(server_id or self.server_id, code)[0]

    def body(self, event: str, token: str, event_id: str, **extra: Any) -> dict[str, Any]:
        body = {"event": event, "token": token, "server_id": self.server_id, "server_event_id": event_id}
        if event == "registered":
            body["referee_identity"] = "player-7842"
        body.update(extra)
        return {k: v for k, v in body.items() if v is not ...}  # `...` drops a field

    def post(self, body: dict | bytes | str, *, secret: str | None = None, t: int | None = None,
             kid: str | None = None, header: str | None = None, **headers: str):
        raw = body if isinstance(body, bytes) else (body if isinstance(body, str) else json.dumps(body)).encode()
        if header is None:
            header = mm.signature_header(secret or self.secret, raw, t=t, kid=kid)
        headers = {mm.SIGNATURE_HEADER: header, **headers} if header else headers
        return self.client.post(INGEST, data=raw, headers=headers)

    def send(self, event: str, token: str, event_id: str, **extra: Any):
        return self.post(self.body(event, token, event_id, **extra))


@pytest.fixture
def kit(client, store) -> Kit:
    return Kit(client, store)


# A real server process on 127.0.0.1, for races, crashes and the browser.

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LiveServer:
    def __init__(self, db_path: str, env: dict[str, str] | None = None, command: list[str] | None = None):
        self.db_path, self.port = db_path, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        full_env = {**os.environ, "MMOREF_DB": db_path, **(env or {})}
        argv = command or [sys.executable, str(SERVER_SCRIPT), "serve", "--port", str(self.port)]
        argv = [part.replace("{port}", str(self.port)) for part in argv]
        self.log_path = Path(db_path).with_name(f"server-{self.port}.log")
        with open(self.log_path, "w") as log_file:  # a file, not a pipe: a full pipe would block the server
            self.process = subprocess.Popen(argv, cwd=ROOT, env=full_env, stdout=log_file, stderr=subprocess.STDOUT)
        self._wait_until_healthy()

    def _wait_until_healthy(self, seconds: float = 20) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.output()}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("server did not become healthy in time")

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


@pytest.fixture
def live_server(db_path: str):
    """Start with `live_server()` (optionally env=..., command=...); stopped after the test."""
    started: list[LiveServer] = []

    def start(**kwargs: Any) -> LiveServer:
        server = LiveServer(db_path, **kwargs)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
