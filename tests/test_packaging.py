"""The checkout as an installable single-module distribution (issue 21): a wheel built from a copy of
the sources, installed into a fresh venv, gives a `mmoref` command that is `python mmoref_server.py`.
Every step is a real process; the tests share one build and one venv."""
from __future__ import annotations

import email.parser
import json
import re
import shutil
import site
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest

import mmoref_server as mm
from tests.support import PYTHON
from tests.support import ROOT
from tests.support import SERVER_SCRIPT
from tests.support import Browser
from tests.support import HttpClient
from tests.support import run_ok
from tests.support import unavailable

pytestmark = pytest.mark.slow

# What the build reads: the top-level files (a single-module distribution has no package folder).
# Built from a copy, so build/ and mmoref.egg-info/ never land in the checkout.
SOURCES = ("*.py", "*.toml", "*.txt", "*.md")
SECRET = re.compile(r"mmsk_[A-Za-z0-9_-]{43}")
KID = re.compile(r"k_[0-9a-f]{8}")
BANNER_PASSWORD = re.compile(r"^  login      password (\S+)   \(shown once", re.MULTILINE)


@dataclass(frozen=True)
class Installed:
    wheel: Path
    venv: Path
    python: Path   # the venv's
    mmoref: Path   # the console script pip wrote


def require_setuptools_that_builds_wheels() -> None:
    """setuptools 70.1 and newer builds wheels by itself (requirements-dev.txt asks for it), so the build
    uses the test environment's and fetches nothing."""
    try:
        found = metadata.version("setuptools")
    except metadata.PackageNotFoundError:
        found = "0"
    if tuple(int(part) for part in re.findall(r"\d+", found)[:2]) < (70, 1):
        unavailable(f"setuptools>=70.1 is not installed (found {found}; pip install -r requirements-dev.txt)")


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """`pip wheel --no-deps` of a copy of the checkout, installed `--no-deps` into a fresh venv
    that sees the test environment's packages (Flask, waitress) after its own: only the wheel is new."""
    work = tmp_path_factory.mktemp("packaging")
    sources = work / "sources"
    sources.mkdir()
    for pattern in SOURCES:
        for path in ROOT.glob(pattern):
            shutil.copy2(path, sources / path.name)
    require_setuptools_that_builds_wheels()
    run_ok([PYTHON, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", work / "dist", sources],
           timeout=240)
    [wheel] = (work / "dist").glob("*.whl")

    venv = work / "venv"
    run_ok([PYTHON, "-m", "venv", "--without-pip", venv])
    venv_python = venv / "bin" / "python"
    purelib = run_ok([venv_python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]).stdout.strip()
    # a .pth appends the test environment's site-packages to the venv's, which come first
    (Path(purelib) / "test-environment.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    run_ok([PYTHON, "-m", "pip", "--python", venv_python, "install", "--no-deps", "--no-index", wheel])
    return Installed(wheel, venv, venv_python, venv / "bin" / "mmoref")


REQUIREMENT = re.compile(r"\s*([A-Za-z0-9._-]+(?:\[[^\]]*\])?)\s*([^;#]*)")


def requirement(line: str) -> tuple[str, frozenset[str]]:
    """A requirement's name (with extras) and its version bounds, in whatever order they are written."""
    match = REQUIREMENT.match(line)
    assert match is not None, line
    return match[1].lower(), frozenset(bound.strip() for bound in match[2].split(",") if bound.strip())


def requirements_file(name: str) -> set[tuple[str, frozenset[str]]]:
    lines = (ROOT / name).read_text().splitlines()
    return {requirement(line) for line in lines if line.strip() and not line.lstrip().startswith("#")}


def test_the_wheel_holds_the_module_its_version_dependencies_and_command(installed: Installed) -> None:
    with zipfile.ZipFile(installed.wheel) as wheel:
        names = set(wheel.namelist())
        dist_info = f"mmoref-{mm.__version__}.dist-info"
        found = email.parser.Parser().parsestr(wheel.read(f"{dist_info}/METADATA").decode())
        entry_points = wheel.read(f"{dist_info}/entry_points.txt").decode()
    assert installed.wheel.name == f"mmoref-{mm.__version__}-py3-none-any.whl"
    modules = {name for name in names if not name.startswith(dist_info + "/")}
    assert modules == {"mmoref_server.py", "mmoref_postgres.py"}   # the core and its companion
    assert (found["Name"], found["Version"]) == ("mmoref", mm.__version__)
    requires = found.get_all("Requires-Dist") or []
    assert {requirement(line) for line in requires if ";" not in line} == requirements_file("requirements.txt")
    assert {requirement(line) for line in requires if line.endswith('; extra == "postgresql"')} == \
        requirements_file("requirements-postgres.txt")
    assert found.get_all("Provides-Extra") == ["postgresql"]
    assert re.search(r"^\[console_scripts\]\s*^mmoref = mmoref_server:main$", entry_points, re.MULTILINE), entry_points
    # the venv runs the wheel's copy of the module, not the checkout's
    where = run_ok([installed.python, "-c", "import mmoref_server; print(mmoref_server.__file__)"], cwd=installed.venv)
    assert Path(where.stdout.strip()).is_relative_to(installed.venv), where.stdout


def test_mmoref_has_the_scripts_commands_help_and_version(installed: Installed) -> None:
    script = run_ok([PYTHON, SERVER_SCRIPT, "--help"]).stdout
    command = run_ok([installed.mmoref, "--help"]).stdout
    assert script.startswith("Usage: mmoref_server.py [OPTIONS] COMMAND [ARGS]...\n"), script
    assert command == script.replace("Usage: mmoref_server.py ", "Usage: mmoref ", 1)
    for name in ("serve", "add-server", "rotate-secret", "mint-token", "send", "log", "backup", "restore"):
        assert re.search(rf"^  {name}\s", command, re.MULTILINE), f"{name} missing from:\n{command}"
    assert run_ok([installed.mmoref, "add-server", "--help"]).stdout.startswith("Usage: mmoref add-server ")
    assert run_ok([installed.mmoref, "--version"]).stdout == f"mmoref, version {mm.__version__}\n"


def test_mmoref_add_server_then_serve_use_referrals_db_in_the_current_folder(
        installed: Installed, live_server: Any, tmp_path: Path) -> None:
    folder = tmp_path / "installation"
    folder.mkdir()
    added = run_ok([installed.mmoref, "add-server", "srv_pkg", "--game", "mygame", "--json"], cwd=folder)
    created = json.loads(added.stdout)
    assert sorted(created) == ["game", "kid", "secret", "server_id"]
    assert (created["server_id"], created["game"]) == ("srv_pkg", "mygame")
    assert SECRET.fullmatch(created["secret"]) and KID.fullmatch(created["kid"]), created
    assert (folder / "referrals.db").is_file()

    server = live_server(db_path=None, cwd=folder, command=[str(installed.mmoref), "serve", "--port", "{port}"])
    client = HttpClient(server.port)
    try:   # live_server saw /healthz answer 200; the server reads the database add-server wrote
        answer = client.post_event(created["secret"], mm.build_body("registered", "any-token", "srv_pkg",
                                                                    "evt-pkg", referee_identity="p", test=True))
    finally:
        client.close()
    assert answer == (200, {"ok": True, "test": True})
    # the pages name the command the owner started, as the banner does
    password = BANNER_PASSWORD.search(server.output())
    assert password is not None, server.output()
    owner = Browser(server.port)
    status, _, wrong = owner.log_in("not-the-password")
    assert status == 401 and "<code>mmoref set-password</code>" in wrong, wrong
    assert owner.log_in(password[1])[0] == 302
    status, _, tab = owner.request("GET", "/dashboard/mygame/srv_pkg/referrals")
    assert status == 200, tab
    assert '<pre id="connect-python">mmoref send registered --endpoint ' in tab, tab
    assert "mmoref_server" not in wrong + tab

    printed = server.stop().splitlines()
    base = f"http://127.0.0.1:{server.port}"
    assert printed[:6] == [   # the banner, whole: the command it names is the one the owner ran
        f"mmoref {mm.__version__}: referral ingest server",
        f"  ingest     POST {base}/api/referral/events",
        f"  dashboard  {base}/dashboard",
        f"  database   {folder / 'referrals.db'}",
        f"  try        curl -i {base}/api/referral/events -d '{{}}'    "
        "# 400 missing signature header: the server is up",
        f"  login      password {password[1]}   (shown once, stored hashed; change it with mmoref set-password)",
    ]
    assert [line for line in printed if "mmoref_server" in line or "python" in line] == []
