"""The commands also work as `flask --app mmoref_server COMMAND` (create_app attaches them)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import click
from flask.cli import ScriptInfo

import mmoref_server as mm
from tests.support import ROOT
from tests.support import HttpClient
from tests.support import free_port
from tests.support import is_logged_in
from tests.support import login


def flask_command(tmp_path: Path, *args: str, **env_vars: str) -> subprocess.CompletedProcess:
    """Run `python -m flask --app mmoref_server ARGS` in `tmp_path`, with no MMOREF_* setting but `env_vars`."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("MMOREF_", "FLASK_"))}
    env.update(PYTHONPATH=str(ROOT), **env_vars)
    return subprocess.run([sys.executable, "-m", "flask", "--app", "mmoref_server", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)


def test_add_server_through_flask(tmp_path: Path) -> None:
    db = str(tmp_path / "referrals.db")
    result = flask_command(tmp_path, "add-server", "srv_flask", "--game", "mygame", "--db", db, "--json")
    assert result.returncode == 0, result.stderr
    created = json.loads(result.stdout)
    assert (created["server_id"], created["game"]) == ("srv_flask", "mygame")
    assert created["secret"].startswith("mmsk_") and created["kid"].startswith("k_")
    listed = flask_command(tmp_path, "log", "srv_flask", "--db", db, "--json")
    assert (listed.returncode, json.loads(listed.stdout)) == (0, [])


def test_a_companion_files_command_through_flask(tmp_path: Path) -> None:
    source, copy = tmp_path / "source.db", tmp_path / "copy.db"
    assert flask_command(tmp_path, "demo", str(source)).returncode == 0
    result = flask_command(tmp_path, "copy-db", str(source), str(copy))   # found in mmoref_postgres.py
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"copied {source} to {copy}: "), result.stdout


def test_a_user_error_through_flask_is_one_line(tmp_path: Path) -> None:
    mm.open_store(str(tmp_path / "referrals.db")).close()
    result = flask_command(tmp_path, "rotate-secret", "nope", "--db", str(tmp_path / "referrals.db"))
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        f"Error: unknown server 'nope' in {tmp_path / 'referrals.db'}: "
        "check the id, or pass --db with the right database"]


def test_a_read_only_command_from_the_wrong_folder_creates_no_database(tmp_path: Path) -> None:
    result = flask_command(tmp_path, "log", "srv_1")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"Error: no database at {tmp_path / 'referrals.db'}: pass --db or set MMOREF_DB"]
    assert list(tmp_path.iterdir()) == []


def test_flask_run_opens_the_database_on_first_request_and_keeps_sessions(tmp_path: Path) -> None:
    db = tmp_path / "referrals.db"
    with click.Context(click.Command("run"), obj=ScriptInfo()):  # as `flask run` loads the app
        app = mm.create_app({"MMOREF_DB": str(db), "MMOREF_ADMIN_PASSWORD": "pw for flask run"})
    assert not db.exists()
    client = app.test_client()
    assert login(client, "pw for flask run").status_code == 302
    assert is_logged_in(client)
    assert app.secret_key == mm.open_store(str(db)).installation_key("session_key")


def test_serve_through_flask_prints_the_banner_and_serves(tmp_path: Path) -> None:
    """`flask --app mmoref_server serve` opens its database before the banner, as `python mmoref_server.py` does."""
    port, log_path = free_port(), tmp_path / "serve.log"
    env = {key: value for key, value in os.environ.items() if not key.startswith(("MMOREF_", "FLASK_"))}
    with open(log_path, "w") as log_file:
        process = subprocess.Popen([sys.executable, "-m", "flask", "--app", "mmoref_server", "serve", "--port",
                                    str(port), "--db", str(tmp_path / "referrals.db")], cwd=tmp_path,
                                   env={**env, "PYTHONPATH": str(ROOT)}, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while "  login " not in log_path.read_text() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "  login      password " in log_path.read_text(), log_path.read_text()
        client = HttpClient(port)
        assert client.request("GET", "/healthz") == (200, {"ok": True})
        client.close()
    finally:
        process.terminate()
        process.wait(timeout=10)
