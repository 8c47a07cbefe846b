"""The commands also work as `flask --app mmoref_server COMMAND` (create_app attaches them)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mmoref_server as mm
from tests.support import ROOT


def flask_command(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """Run `python -m flask --app mmoref_server ARGS` in `tmp_path`, the app's database there too."""
    env = {key: value for key, value in os.environ.items() if not key.startswith(("MMOREF_", "FLASK_"))}
    env.update(PYTHONPATH=str(ROOT), MMOREF_DB=str(tmp_path / "app.db"))
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


def test_a_user_error_through_flask_is_one_line(tmp_path: Path) -> None:
    mm.Store(str(tmp_path / "referrals.db")).close()
    result = flask_command(tmp_path, "rotate-secret", "nope", "--db", str(tmp_path / "referrals.db"))
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        f"Error: unknown server 'nope' in {tmp_path / 'referrals.db'}: "
        "check the id, or pass --db with the right database"]
