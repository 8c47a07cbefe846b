"""deploy/mmoref.service: what the unit promises, and `systemd-analyze verify` where it exists."""
from __future__ import annotations

import subprocess
from pathlib import PurePosixPath

from tests.support import PYTHON
from tests.support import ROOT
from tests.support import SERVER_SCRIPT
from tests.support import required_program

UNIT = ROOT / "deploy" / "mmoref.service"


def service_section() -> dict[str, list[str]]:
    """The [Service] settings, each with every value it is given (Environment= repeats)."""
    settings: dict[str, list[str]] = {}
    section = ""
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def test_the_unit_runs_as_its_own_user_with_only_the_database_folder_writable():
    service = service_section()
    assert service["User"] == ["mmoref"]
    assert service["Restart"] == ["on-failure"]
    assert service["ProtectSystem"] == ["strict"]
    environment = dict(line.split("=", 1) for line in service["Environment"])
    database = PurePosixPath(environment["MMOREF_DB"])
    assert database.is_absolute()
    assert str(database.parent) in service["ReadWritePaths"]
    assert service["StateDirectory"] == [database.parent.name]   # made and owned for the user
    assert environment["MMOREF_HOST"] == "127.0.0.1"
    assert environment["MMOREF_TRUSTED_PROXY"] == "127.0.0.1,::1"
    assert service["NoNewPrivileges"] == ["yes"]


def test_systemd_analyze_verify_accepts_the_unit(tmp_path):
    analyze = required_program("systemd-analyze", "apt-get install systemd")
    # the shipped unit with its ExecStart pointing at this checkout: verify checks the program exists
    shipped = UNIT.read_text()
    assert "ExecStart=/opt/mmoref/venv/bin/python /opt/mmoref/mmoref_server.py serve" in shipped
    unit = tmp_path / "mmoref.service"
    unit.write_text(shipped.replace("/opt/mmoref/venv/bin/python", PYTHON)
                    .replace("/opt/mmoref/mmoref_server.py", str(SERVER_SCRIPT)))
    result = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    complaints = [line for line in result.stderr.splitlines() if "mmoref.service" in line]
    assert result.returncode == 0, result.stderr
    assert complaints == [], result.stderr
