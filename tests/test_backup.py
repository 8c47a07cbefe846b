"""`backup` and `restore`: a consistent copy while a live server takes signed events, checked,
and put back; tokens and secrets survive the trip."""
from __future__ import annotations

import json
import subprocess
import time

import pytest

import mmoref_server as mm
from tests.support import PYTHON
from tests.support import SERVER_ID
from tests.support import SERVER_SCRIPT
from tests.support import IngestLoad
from tests.support import add_server
from tests.support import assert_one_error_line
from tests.support import event_body
from tests.support import mint_tokens
from tests.support import referral_id_of
from tests.support import rows
from tests.support import scalar
from tests.support import signed_post

pytestmark = pytest.mark.slow


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python mmoref_server.py ARGS` as its own process (the real thing, beside a live server)."""
    return subprocess.run([PYTHON, str(SERVER_SCRIPT), *args], capture_output=True, text=True, timeout=timeout)


def test_backup_under_ingest_keeps_every_acknowledged_event_and_restores_working_tokens(
        live_server, store, db_path, tmp_path):
    secret = add_server(store)
    tokens = mint_tokens(store, [f"code{i}" for i in range(2000)])
    server = live_server()
    copy = tmp_path / "copy.db"

    # at most about 400 events a second, so the tokens outlast a backup that is slow on a busy machine
    with IngestLoad(server.port, secret, tokens[:-1], pause=0.01) as load:
        load.wait_for(60)
        backup_started = time.monotonic()
        result = run_cli("backup", str(copy), "--db", db_path, "--json")
        backup_ended = time.monotonic()
        load.wait_for(min(len(load.answers) + 20, len(tokens) - 1))  # and it goes on after the copy
    acknowledged = load.acked_between(0, backup_started)
    assert load.acked_between(backup_started, backup_ended), "no event was answered while the backup ran"

    assert result.returncode == 0, result.stderr
    written = json.loads(result.stdout)
    assert written["path"] == str(copy) and written["integrity"] == "ok"
    assert written["bytes"] == copy.stat().st_size > 0
    assert len(acknowledged) >= 60
    in_copy = {row[0] for row in rows(copy, "SELECT token_referral_id FROM delivery_log")}
    assert {referral_id_of(store, token) for token in acknowledged} <= in_copy
    assert written["rows"]["delivery_log"] == len(in_copy)
    assert rows(copy, "PRAGMA integrity_check") == [("ok",)]
    assert not (tmp_path / "copy.db-wal").exists()   # one self-contained file
    server.stop()

    restored = tmp_path / "restored.db"
    result = run_cli("restore", str(copy), "--db", str(restored))
    assert result.returncode == 0, result.stderr
    assert f"restored {restored} from {copy}" in result.stdout

    # the token key and the secrets came along: a token minted before the backup still works
    app = mm.create_app({"MMOREF_DB": str(restored), "TESTING": True})
    first = acknowledged[0]
    answer = signed_post(app.test_client(), secret, event_body("qualified", first, "qual-1"))
    assert (answer.status_code, answer.get_json()) == (
        200, {"ok": True, "referral_id": referral_id_of(store, first), "state": "qualified"})
    unused = tokens[-1]   # minted before the backup, never sent
    answer = signed_post(app.test_client(), secret, event_body("registered", unused, "reg-late"))
    assert (answer.status_code, answer.get_json()["state"]) == (200, "registered")


def test_restore_keeps_the_current_database_aside(store, db_path, tmp_path, runner):
    add_server(store)
    copy = str(tmp_path / "copy.db")
    assert runner("backup", copy).exit_code == 0
    store.add_server("srv_after", "mygame")   # made after the backup: gone once restored
    store.close()

    result = runner("restore", copy, "--json")

    assert result.exit_code == 0, result.stderr
    previous = result.json()["previous"]
    assert previous.startswith(db_path + ".before-restore-")
    assert scalar(previous, "SELECT count(*) FROM servers WHERE server_id = 'srv_after'") == 1
    assert rows(db_path, "SELECT server_id FROM servers") == [(SERVER_ID,)]


def test_restore_refuses_while_a_server_has_the_database_open(live_server, store, db_path, tmp_path, runner):
    add_server(store)
    copy = str(tmp_path / "copy.db")
    assert runner("backup", copy).exit_code == 0
    live_server()

    result = run_cli("restore", copy, "--db", db_path)

    assert_one_error_line(result.returncode, result.stderr, "is in use", "stop the server first")
    assert scalar(db_path, "SELECT count(*) FROM servers") == 1


def test_restore_refuses_a_damaged_backup_and_leaves_the_database_alone(store, db_path, tmp_path, runner):
    add_server(store)
    damaged = tmp_path / "damaged.db"
    damaged.write_bytes(b"SQLite format 3\x00" + b"\x07" * 5000)

    result = runner("restore", str(damaged))

    assert_one_error_line(result.exit_code, result.stderr, str(damaged), "not a usable SQLite database")
    assert scalar(db_path, "SELECT count(*) FROM servers") == 1
    assert not list(tmp_path.glob("*.before-restore-*"))


def test_backup_refuses_to_overwrite_and_names_a_dated_file_in_a_folder(store, tmp_path, runner):
    add_server(store)
    existing = tmp_path / "existing.db"
    existing.write_bytes(b"keep me")

    refused = runner("backup", str(existing))
    assert_one_error_line(refused.exit_code, refused.stderr, "exists", "--force")
    assert existing.read_bytes() == b"keep me"

    replaced = runner("backup", str(existing), "--force")
    assert replaced.exit_code == 0 and "integrity ok" in replaced.stdout
    assert scalar(existing, "SELECT count(*) FROM servers") == 1

    folder = tmp_path / "backups"
    folder.mkdir()
    dated = runner("backup", str(folder), "--json")
    assert dated.exit_code == 0, dated.stderr
    assert [path.name for path in folder.iterdir()] == [dated.json()["path"].rsplit("/", 1)[1]]
    assert dated.json()["path"].startswith(str(folder / "referrals-"))


@pytest.mark.parametrize("command", ["backup", "restore", "prune", "forget"])
def test_every_maintenance_command_has_help(runner, command):
    result = runner(command, "--help", db=False)
    assert result.exit_code == 0
    assert result.stdout.startswith(f"Usage: mmoref_server.py {command} ")
    assert "--db PATH" in result.stdout and "--json" in result.stdout
