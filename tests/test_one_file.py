"""mmoref_server.py alone is a complete installation: copied by itself into an empty folder, it runs an
owner's walkthrough as real processes (add a server, serve, a share link, a signed event, the dashboard,
backup, prune, forget, restore). A postgresql:// database needs the companion mmoref_postgres.py, and
without it is one error line naming that file.

Every process runs `python -E -s mmoref_server.py` in that folder: no PYTHONPATH, no user site, so it
finds nothing of this checkout but the copied file."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

import mmoref_server as mm
from tests.support import PYTHON
from tests.support import SERVER_SCRIPT
from tests.support import Browser
from tests.support import assert_one_error_line
from tests.support import free_port
from tests.support import run_ok

pytestmark = pytest.mark.slow

SERVER, GAME, REGISTRATION_URL = "srv_alone", "mygame", "https://game.example/register"
POSTGRES_URL = "postgresql://mmoref@127.0.0.1:1/referrals"   # never reached: the companion is missing
COMPANION_MISSING = "needs mmoref_postgres.py, which is not beside mmoref_server.py"


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """An empty folder holding a copy of mmoref_server.py and nothing else."""
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy2(SERVER_SCRIPT, alone / "mmoref_server.py")
    return alone


def script(folder: Path, *args: str) -> list[str]:
    return [PYTHON, "-E", "-s", str(folder / "mmoref_server.py"), *args]


def command(folder: Path, *args: str) -> Any:
    """Run a command of the copied file in its folder; its --json output, parsed."""
    return json.loads(run_ok(script(folder, *args), cwd=folder).stdout)


def failed(folder: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(script(folder, *args), cwd=folder, capture_output=True, text=True, timeout=60,
                          env={**os.environ, **env})


def test_the_file_alone_runs_the_owners_walkthrough(folder: Path, live_server: Any) -> None:
    created = command(folder, "add-server", SERVER, "--game", GAME, "--registration-url", REGISTRATION_URL, "--json")
    server = live_server(db_path=None, cwd=folder, command=script(folder, "serve", "--port", "{port}"))
    password = re.search(r"login +password (\S+)", server.output())
    assert password is not None, server.output()

    status, headers, _ = Browser(server.port).request("GET", f"/r/{SERVER}?ref=alice")
    assert status == 302
    token = re.fullmatch(re.escape(REGISTRATION_URL) + r"\?mmref=([A-Za-z0-9_.-]+)", headers["Location"])
    assert token is not None, headers["Location"]

    sent = command(folder, "send", "registered", "--endpoint", f"{server.url}{mm.INGEST_PATH}", "--server-id", SERVER,
                   "--secret", created["secret"], "--token", token.group(1), "--referee-identity", "player-1",
                   "--json")
    assert (sent["status"], sent["body"]["state"]) == (200, "registered"), sent

    owner = Browser(server.port)
    status, _, page = owner.request("GET", "/dashboard/login")
    assert status == 200, page
    status, headers, page = owner.log_in(password.group(1))
    assert status == 302 and headers["Location"].endswith("/dashboard/"), page
    status, _, page = owner.request("GET", f"/dashboard/{GAME}/{SERVER}/referrals")
    assert status == 200, page

    backup = command(folder, "backup", str(folder / "backup.db"), "--json")
    assert (backup["integrity"], backup["rows"]["delivery_log"]) == ("ok", 1)
    server.stop()
    pruned = command(folder, "prune", "--older-than", "180d", "--json")
    assert pruned["deleted"] == {"delivery_log": 0, "rejected_requests": 0}
    forgotten = command(folder, "forget", "--server", SERVER, "--identity", "player-1", "--json")
    assert forgotten["rows_changed"]["anchors"] == 1
    restored = command(folder, "restore", str(folder / "backup.db"), "--json")
    assert restored["previous"] is not None and (folder / restored["previous"]).is_file()
    assert command(folder, "log", SERVER, "--json")[0]["event"] == "registered"
    assert sorted(path.name for path in folder.glob("*.py")) == ["mmoref_server.py"]


def test_a_postgresql_database_without_the_companion_is_one_error_line(folder: Path) -> None:
    result = failed(folder, "log", SERVER, "--db", POSTGRES_URL)
    assert_one_error_line(result.returncode, result.stderr, f"a postgresql:// database {COMPANION_MISSING}",
                          str(folder))
    assert result.returncode == 1


def test_serve_on_postgresql_without_the_companion_is_one_error_line(folder: Path) -> None:
    result = failed(folder, "serve", "--port", str(free_port()), MMOREF_DB=POSTGRES_URL)
    assert_one_error_line(result.returncode, result.stderr, f"a postgresql:// database {COMPANION_MISSING}")
    assert result.returncode == 1
    assert result.stdout == ""


def test_copy_db_without_the_companion_is_one_error_line(folder: Path) -> None:
    result = failed(folder, "copy-db", "referrals.db", POSTGRES_URL)
    assert_one_error_line(result.returncode, result.stderr, f"the copy-db command {COMPANION_MISSING}")
    assert result.returncode == 1
    assert sorted(path.name for path in folder.iterdir()) == ["mmoref_server.py"]   # nothing created
