"""Starting `python mmoref_server.py`: settings checked first, the port bound before the database
is created and the first-run password made, one `error:` line for every failure, serve's options
without `serve`, and the banner when listening beyond loopback."""
from __future__ import annotations

import http.client
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import mmoref_server as mm
from tests.support import HTTP_TIMEOUT
from tests.support import PYTHON
from tests.support import SERVER_SCRIPT
from tests.support import assert_one_error_line
from tests.support import free_port

pytestmark = pytest.mark.slow

START_TIMEOUT = 30   # seconds a start that should fail may take before the test fails


def failed_start(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """Run the server in `cwd` expecting it to stop at once; a server that keeps running fails the test."""
    full_env = {**os.environ, "MMOREF_PORT": str(free_port()), **env}
    try:
        return subprocess.run([PYTHON, str(SERVER_SCRIPT), *args], cwd=cwd, env=full_env,
                              capture_output=True, text=True, timeout=START_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the server started instead of refusing: {args} {env}")


def test_busy_port_is_one_error_line_and_no_password_until_a_good_start(tmp_path, live_server, db_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = failed_start(tmp_path, "--port", str(port), "--db", db_path)
    assert_one_error_line(result.returncode, result.stderr, f"port {port} on 127.0.0.1 is in use",
                          "pass --port or set MMOREF_PORT")
    assert "password" not in result.stdout
    assert sorted(os.listdir(tmp_path)) == []   # bound before the database is touched: no referrals.db made

    output = live_server().stop()
    assert "login      password " in output
    assert mm.open_store(db_path).admin_password_hash() is not None


def test_address_not_on_this_machine_is_one_error_line(tmp_path):
    result = failed_start(tmp_path, "serve", "--host", "192.0.2.1")   # a documentation address: never local
    assert_one_error_line(result.returncode, result.stderr, "cannot listen on 192.0.2.1",
                          "pass --host or set MMOREF_HOST")
    assert "password" not in result.stdout


@pytest.mark.parametrize(("name", "value", "accepted"), [
    ("MMOREF_PORT", "70000", "a whole number from 1 to 65535"),
    ("MMOREF_PORT", "abc", "a whole number from 1 to 65535"),
    ("MMOREF_THREADS", "0", "a whole number from 1 to 1000"),
    ("MMOREF_REPLAY_WINDOW", "0", "a whole number, at least 1"),
    ("MMOREF_TOKEN_TTL", "-5", "a whole number, at least 1"),
    ("MMOREF_TRUST_PROXY", "maybe", "one of 1, true, yes, on, 0, false, no, off"),
    ("MMOREF_SYNCHRONOUS", "OFF", "FULL, NORMAL or EXTRA"),
    ("MMOREF_TRUSTED_PROXY", "proxy.local", "IP addresses separated by commas"),
])
def test_bad_setting_is_one_error_line_naming_it(tmp_path, name, value, accepted):
    result = failed_start(tmp_path, **{name: value})
    assert_one_error_line(result.returncode, result.stderr, f"{name}={value!r} is not valid", accepted)
    assert result.stdout == ""
    assert not (tmp_path / "referrals.db").exists()


def test_serve_options_work_without_the_command(tmp_path, live_server):
    other_db = tmp_path / "other.db"
    server = live_server(command=[PYTHON, str(SERVER_SCRIPT), "--port", "{port}", "--db", str(other_db)])
    output = server.stop()
    assert f"POST http://127.0.0.1:{server.port}{mm.INGEST_PATH}" in output
    assert f"database   {other_db}" in output
    assert other_db.is_file()


def test_bad_option_without_the_command_points_at_serve_help(tmp_path):
    result = failed_start(tmp_path, "--prot", "5055")
    assert_one_error_line(result.returncode, result.stderr, "No such option", "serve --help")


def test_help_and_version_still_answer_the_group(tmp_path):
    help_text = subprocess.run([PYTHON, str(SERVER_SCRIPT), "--help"], capture_output=True, text=True,
                               timeout=START_TIMEOUT)
    assert help_text.returncode == 0, help_text.stderr
    assert "Commands:" in help_text.stdout
    assert "serve's options" in help_text.stdout
    version = subprocess.run([PYTHON, str(SERVER_SCRIPT), "--version"], capture_output=True, text=True,
                             timeout=START_TIMEOUT)
    assert (version.returncode, version.stdout) == (0, f"mmoref, version {mm.__version__}\n")


def banner_of(tmp_path: Path, *args: str, while_up: Callable[[int], None] | None = None) -> tuple[int, str]:
    """Start the server with `args` on a free port, wait for its banner (printed once it listens), call
    `while_up(port)` if given, stop it."""
    port = free_port()
    log_path = tmp_path / "banner.log"
    with open(log_path, "w") as log_file:
        process = subprocess.Popen([PYTHON, str(SERVER_SCRIPT), "serve", *args, "--port", str(port)], cwd=tmp_path,
                                   stdout=log_file, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while "  login " not in log_path.read_text() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert process.poll() is None, log_path.read_text()
        assert "  login " in log_path.read_text(), f"no banner within {START_TIMEOUT} s:\n{log_path.read_text()}"
        if while_up is not None:
            while_up(port)
    finally:
        process.terminate()
        process.wait(timeout=10)
    return port, log_path.read_text()


def test_every_interface_prints_loopback_urls_and_a_network_warning(tmp_path):
    port, output = banner_of(tmp_path, "--host", "0.0.0.0")
    assert f"dashboard  http://127.0.0.1:{port}/dashboard" in output
    assert "http://0.0.0.0" not in output
    assert f"other machines use http://<this machine's address>:{port}" in output
    assert "warning    the dashboard and the ingest endpoint are reachable from the network" in output
    assert "TLS proxy" in output


def test_loopback_has_no_network_warning(tmp_path):
    port, output = banner_of(tmp_path, "--host", "127.0.0.1")
    assert f"dashboard  http://127.0.0.1:{port}/dashboard" in output
    assert "warning" not in output


def ipv6_loopback_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not ipv6_loopback_available(), reason="no IPv6 loopback here")
def test_ipv6_host_is_shown_in_brackets(tmp_path):
    port, output = banner_of(tmp_path, "--host", "::1")
    assert f"dashboard  http://[::1]:{port}/dashboard" in output
    assert "warning" not in output


def test_before_pip_install_one_line_says_what_to_run(tmp_path):
    """`python -I -S`: no site-packages, as on a machine where `pip install -r requirements.txt` never ran."""
    result = subprocess.run([PYTHON, "-I", "-S", str(SERVER_SCRIPT)], cwd=tmp_path, capture_output=True, text=True,
                            timeout=START_TIMEOUT)
    requirements = SERVER_SCRIPT.parent / "requirements.txt"
    assert_one_error_line(result.returncode, result.stderr, "No module named 'click'",
                          f"run: pip install -r {requirements}")
    assert result.stdout == ""
    assert os.listdir(tmp_path) == []
    importing = f"import sys; sys.path.insert(0, {str(SERVER_SCRIPT.parent)!r}); import mmoref_server"
    embedded = subprocess.run([PYTHON, "-I", "-S", "-c", importing], capture_output=True, text=True,
                              timeout=START_TIMEOUT)   # a host app that imports it gets the exception as is
    assert embedded.returncode == 1 and "ModuleNotFoundError: No module named 'click'" in embedded.stderr


def test_a_lone_copy_before_pip_install_names_the_packages(tmp_path):
    """The drop-in way: the file copied alone, no requirements.txt beside it to point at."""
    lone = tmp_path / "game-backend"
    lone.mkdir()
    shutil.copy2(SERVER_SCRIPT, lone / SERVER_SCRIPT.name)
    result = subprocess.run([PYTHON, "-I", "-S", SERVER_SCRIPT.name], cwd=lone, capture_output=True, text=True,
                            timeout=START_TIMEOUT)
    assert_one_error_line(result.returncode, result.stderr, "No module named 'click'",
                          "mmoref needs Flask and waitress; run: pip install Flask waitress")
    assert "requirements.txt" not in result.stderr
    assert sorted(os.listdir(lone)) == [SERVER_SCRIPT.name]


def test_the_packages_a_lone_copy_names_are_requirements_txts():
    lines = (SERVER_SCRIPT.parent / "requirements.txt").read_text().splitlines()
    names = [re.match(r"[A-Za-z0-9._-]+", line)[0] for line in lines if line.strip() and not line.startswith("#")]
    assert names == list(mm.REQUIRED_PACKAGES)


def healthz_over(address: str, port: int) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection(address, port, timeout=HTTP_TIMEOUT)
    try:
        connection.request("GET", "/healthz")
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


@pytest.mark.skipif(not ipv6_loopback_available(), reason="no IPv6 loopback here")
def test_every_interface_on_ipv6_means_ipv4_too(tmp_path):
    """Issue 20.13: `--host ::` listened on IPv6 only, while the banner said every interface."""
    answers: dict[str, tuple[int, bytes]] = {}

    def reach_both(port: int) -> None:
        for address in ("127.0.0.1", "::1"):
            answers[address] = healthz_over(address, port)

    port, output = banner_of(tmp_path, "--host", "::", while_up=reach_both)

    assert answers == {"127.0.0.1": (200, b'{"ok": true}'), "::1": (200, b'{"ok": true}')}
    assert "listening on every network interface (:: and 0.0.0.0: IPv6 and IPv4)" in output
    assert f"dashboard  http://[::1]:{port}/dashboard" in output
