"""Which database a command uses: commands that only read or use an installation never create one,
their errors name the database they looked in, set-password hints carry --db, `log --json` has ts."""
from __future__ import annotations

import subprocess
from types import SimpleNamespace

import pytest

import mmoref_server as mm
from tests.support import PYTHON
from tests.support import SERVER_SCRIPT
from tests.support import assert_one_error_line

USING_AN_INSTALLATION = {
    "log": ["log", "srv_1"],
    "mint-token": ["mint-token", "srv_1", "--ref", "alice"],
    "rotate-secret": ["rotate-secret", "srv_1"],
    "reverse": ["reverse", "ref_x"],
    "reject": ["reject", "ref_x"],
}


def run(cwd, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, str(SERVER_SCRIPT), *argv], cwd=cwd, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("argv", USING_AN_INSTALLATION.values(), ids=USING_AN_INSTALLATION.keys())
def test_command_run_from_the_wrong_folder_creates_nothing(tmp_path, argv):
    completed = run(tmp_path, *argv)
    assert_one_error_line(completed.returncode, completed.stderr,
                          f"no database at {tmp_path / 'referrals.db'}: pass --db or set MMOREF_DB")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv", [USING_AN_INSTALLATION["log"], USING_AN_INSTALLATION["mint-token"],
                                  USING_AN_INSTALLATION["rotate-secret"]], ids=["log", "mint-token", "rotate-secret"])
def test_unknown_server_names_the_database(tmp_path, argv):
    mm.open_store(str(tmp_path / "referrals.db")).close()
    completed = run(tmp_path, *argv)
    assert_one_error_line(completed.returncode, completed.stderr,
                          f"unknown server 'srv_1' in {tmp_path / 'referrals.db'}")


def test_unknown_referral_names_the_database(tmp_path):
    mm.open_store(str(tmp_path / "referrals.db")).close()
    completed = run(tmp_path, "reject", "ref_x")
    assert_one_error_line(completed.returncode, completed.stderr, "unknown referral 'ref_x'",
                          f"(database {tmp_path / 'referrals.db'})")


def test_log_json_has_ts(runner, kit, db_path):
    token = kit.token()
    assert kit.send("registered", token, "reg-1", ts=1733500000).status_code == 200
    assert kit.send("qualified", token, "q-1").status_code == 200

    listed = runner("log", kit.server_id, "--json")

    assert listed.exit_code == 0, listed.stderr
    assert [(row["server_event_id"], row["ts"]) for row in listed.json()] == [("q-1", None), ("reg-1", 1733500000)]


def test_set_password_hint_names_a_database_that_is_not_the_default(tmp_path):
    other = tmp_path / "other.db"
    assert mm.set_password_command_line("referrals.db") == "python mmoref_server.py set-password"
    assert mm.set_password_command_line(str(other)) == f"python mmoref_server.py set-password --db {other}"


def test_login_page_hint_carries_the_database(bare_app, db_path):
    page = bare_app.test_client().get("/dashboard/login")
    assert page.status_code == 200
    assert f"python mmoref_server.py set-password --db {db_path}" in page.get_data(as_text=True)


def test_serve_banner_hint_carries_the_database(live_server, db_path):
    server = live_server()
    banner = server.stop()
    assert f"change it with python mmoref_server.py set-password --db {db_path})" in banner


def test_serve_banner_names_python_m_when_started_that_way(live_server, db_path):
    server = live_server(command=[PYTHON, "-m", "mmoref_server", "serve", "--port", "{port}"])
    banner = server.stop()
    assert f"change it with python -m mmoref_server set-password --db {db_path})" in banner
    assert "mmoref_server.py" not in banner


@pytest.mark.parametrize(("module_name", "spec", "program", "command"), [
    ("mmoref_server", None, "/home/owner/.local/bin/mmoref", "mmoref"),   # the console script (pip, pipx)
    ("__main__", None, "mmoref_server.py", "python mmoref_server.py"),   # the file
    ("__main__", SimpleNamespace(name="mmoref_server"), "/srv/mmoref_server.py", "python -m mmoref_server"),
    ("mmoref_server", None, "manage.py", "python mmoref_server.py"),     # a host's own script calling main()
])
def test_the_command_messages_name_is_the_way_mmoref_was_started(module_name, spec, program, command):
    assert mm.command_started_as(module_name, spec, program) == command


def test_pages_and_hints_name_the_command_main_found(monkeypatch, bare_app, db_path):
    monkeypatch.setattr(mm, "COMMAND", "mmoref")
    assert mm.set_password_command_line("referrals.db") == "mmoref set-password"
    page = bare_app.test_client().get("/dashboard/login").get_data(as_text=True)
    assert f"<code>mmoref set-password --db {db_path}</code>" in page
