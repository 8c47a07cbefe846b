"""The real nginx in front of a real `serve`, over TLS with a certificate made here.

nginx runs the location snippets deploy/nginx/ ships (root and /mmoref prefix, dashboard
allowlist), so these tests check what an owner installs. Three loopback addresses tell the
parties apart: the player's client connects from 127.0.0.3, the owner's from 127.0.0.1 (the
only one the dashboard allowlist admits), and nginx reaches mmoref from 127.0.0.2.
"""
from __future__ import annotations

import http.client
import json
import os
import re
import shlex
import shutil
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs
from urllib.parse import urlencode
from urllib.parse import urlsplit

import pytest

import mmoref_server as mm
from tests.support import HTTP_TIMEOUT
from tests.support import ROOT
from tests.support import Browser
from tests.support import Doc
from tests.support import assert_one_error_line
from tests.support import csrf
from tests.support import free_port
from tests.support import required_program
from tests.support import rows
from tests.test_idle_connections import ANSWER_WITHIN
from tests.test_idle_connections import OPEN_CONNECTIONS
from tests.test_idle_connections import TRICKLE_EVERY
from tests.test_idle_connections import open_connections

pytestmark = pytest.mark.slow

PLAYER, OWNER, NGINX_ADDRESS = "127.0.0.3", "127.0.0.1", "127.0.0.2"
SPOOFED = "203.0.113.66"   # a documentation address, only ever inside a header
SERVER, PASSWORD = "srv_nginx", "correct horse battery"
REGISTRATION_URL = "https://game.example/register"
SNIPPETS = ROOT / "deploy" / "nginx" / "snippets"
START_SECONDS = 10

NGINX_CONF = """\
{user}
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log;
events {{ worker_connections 512; }}
http {{
    access_log {tmp}/access.log;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    upstream mmoref {{
        server 127.0.0.1:{upstream_port};
        keepalive 4;
    }}
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {tmp}/cert.pem;
        ssl_certificate_key {tmp}/key.pem;
        proxy_bind {nginx_address};
        include snippets/mmoref-locations.conf;
        include snippets/mmoref-prefix-locations.conf;
    }}
}}
"""


def tool(name: str) -> str:
    return required_program(name, "apt-get install nginx-light openssl")


def make_certificate(folder: Path) -> Path:
    """A self-signed certificate for 127.0.0.1 (key.pem, cert.pem in `folder`); the cert's path."""
    subprocess.run([tool("openssl"), "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(folder / "key.pem"), "-out", str(folder / "cert.pem")],
                   check=True, capture_output=True, timeout=30)
    return folder / "cert.pem"


def start_nginx(folder: Path, upstream_port: int) -> tuple[subprocess.Popen, int]:
    """nginx on a free 127.0.0.1 port with the shipped snippets, proxying to `upstream_port`."""
    nginx = tool("nginx")
    make_certificate(folder)
    shutil.copytree(SNIPPETS, folder / "snippets")
    port = free_port()
    user = "user root;" if os.geteuid() == 0 else ""   # workers as root can use the test's 0700 folder
    (folder / "nginx.conf").write_text(NGINX_CONF.format(user=user, tmp=folder, upstream_port=upstream_port,
                                                         port=port, nginx_address=NGINX_ADDRESS))
    process = subprocess.Popen([nginx, "-p", str(folder), "-c", str(folder / "nginx.conf"),
                                "-e", str(folder / "error.log")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline and process.poll() is None:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return process, port
        time.sleep(0.05)
    process.kill()
    process.wait()
    error_log = folder / "error.log"
    pytest.fail(f"nginx did not start:\n{error_log.read_text() if error_log.exists() else ''}")


class TlsClient(Browser):
    """A client of nginx over https from one loopback address; keeps the session cookie."""

    def __init__(self, port: int, certificate: Path, source: str):
        super().__init__(port)
        self.source, self.context = source, ssl.create_default_context(cafile=str(certificate))

    def connection(self) -> http.client.HTTPConnection:
        return http.client.HTTPSConnection("127.0.0.1", self.port, timeout=HTTP_TIMEOUT,
                                           source_address=(self.source, 0), context=self.context)

    def request(self, method: str, path: str, body: bytes | None = None,  # type: ignore[override]
                **headers: str) -> tuple[int, http.client.HTTPMessage, str]:
        return self.send(method, path, body, headers)

    def log_in(self, prefix: str = "", next_url: str | None = None) -> tuple[int, http.client.HTTPMessage, str]:
        url = f"{prefix}/dashboard/login" + (f"?{urlencode({'next': next_url})}" if next_url else "")
        status, _, page = self.request("GET", url)
        assert status == 200, page
        form = urlencode({"csrf_token": csrf(Doc(page)), "password": PASSWORD}).encode()
        return self.request("POST", url, form, **{"Content-Type": "application/x-www-form-urlencoded"})


@dataclass
class Proxied:
    """mmoref behind nginx: the https port, the certificate to trust, the database, the secret."""
    port: int
    certificate: Path
    db_path: str
    secret: str

    def client(self, source: str = PLAYER) -> TlsClient:
        return TlsClient(self.port, self.certificate, source)

    def ingest(self, token: str, event_id: str, prefix: str = "") -> tuple[int, str]:
        raw = mm.build_body("registered", token, SERVER, event_id, referee_identity=f"player-{event_id}")
        status, _, text = self.client().request("POST", prefix + mm.INGEST_PATH, raw, **{
            mm.SIGNATURE_HEADER: mm.signature_header(self.secret, raw), "Content-Type": "application/json"})
        return status, text


@pytest.fixture
def behind_nginx(live_server, db_path, tmp_path):
    """start(trust_proxy) -> Proxied: a real server with srv_nginx, behind nginx over TLS."""
    store = mm.open_store(db_path)
    secret, _ = store.add_server(SERVER, "mygame", "Behind nginx", REGISTRATION_URL)
    store.set_admin_password(PASSWORD)
    started: list[subprocess.Popen] = []

    def start(trust_proxy: bool, command: list[str] | None = None) -> Proxied:
        """`command` runs mmoref instead of `serve` ("{port}" in it: the port to listen on)."""
        server = live_server(command=command, env={"MMOREF_TRUSTED_PROXY": NGINX_ADDRESS if trust_proxy else ""})
        folder = tmp_path / "nginx"
        folder.mkdir()
        process, port = start_nginx(folder, server.port)
        started.append(process)
        return Proxied(port, folder / "cert.pem", db_path, secret)

    yield start
    for process in started:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def cookie_flags(headers: http.client.HTTPMessage, name: str) -> list[str]:
    """The attributes (lower case) of the Set-Cookie header that sets `name`."""
    matching = [value for value in headers.get_all("Set-Cookie") or [] if value.startswith(f"{name}=")]
    assert len(matching) == 1, headers.get_all("Set-Cookie")
    return [part.strip().lower() for part in matching[0].split(";")[1:]]


def click(proxied: Proxied, prefix: str = "") -> tuple[str, list[str]]:
    """Open the share link as a player whose X-Forwarded-For is spoofed: (token, mmref cookie flags)."""
    status, headers, page = proxied.client().request("GET", f"{prefix}/r/{SERVER}?ref=alice",
                                                     **{"X-Forwarded-For": SPOOFED})
    assert status == 302, page
    location = headers["Location"]
    assert location.startswith(f"{REGISTRATION_URL}?mmref="), location
    return location.partition("mmref=")[2], cookie_flags(headers, "mmref")


def recorded_address(proxied: Proxied, token: str) -> str:
    """Which of the candidate addresses the server hashed into the click's ip_hash."""
    store = mm.open_store(proxied.db_path)
    referral_id = mm.read_token(store.token_key, token).referral_id
    [(ip_hash,)] = rows(proxied.db_path, "SELECT ip_hash FROM referrals WHERE referral_id = ?", referral_id)
    candidates = {mm._ip_hash(store, address): address for address in (PLAYER, OWNER, NGINX_ADDRESS, SPOOFED)}
    assert ip_hash in candidates, ip_hash
    return candidates[ip_hash]


def test_signed_ingest_secure_cookies_and_the_forwarded_client_behind_nginx(behind_nginx):
    proxied = behind_nginx(trust_proxy=True)
    token, flags = click(proxied)
    assert "secure" in flags and "httponly" in flags
    assert recorded_address(proxied, token) == PLAYER   # what nginx saw, not what the client claimed

    status, text = proxied.ingest(token, "reg-1")
    assert status == 200, text
    assert '"state": "registered"' in text

    owner = proxied.client(OWNER)
    status, headers, page = owner.log_in()
    assert status == 302, page
    assert headers["Location"] == "/dashboard/"
    assert "secure" in cookie_flags(headers, mm.SESSION_COOKIE)
    status, _, page = owner.request("GET", f"/dashboard/mygame/{SERVER}/referrals")
    assert status == 200, page
    assert f"https://127.0.0.1:{proxied.port}/r/{SERVER}?ref=" in page


def test_the_dashboard_is_refused_to_addresses_off_the_allowlist(behind_nginx):
    proxied = behind_nginx(trust_proxy=True)
    for path in ("/dashboard/", "/dashboard/login", "/mmoref/dashboard/login"):
        status, _, page = proxied.client(PLAYER).request("GET", path)
        assert status == 403, (path, page)
        assert "403 Forbidden" in page and "Log in" not in page
    status, _, page = proxied.client(PLAYER).request("GET", "/healthz")
    assert (status, page) == (200, '{"ok": true}')


def test_under_the_mmoref_prefix_links_and_redirects_carry_it(behind_nginx):
    proxied = behind_nginx(trust_proxy=True)
    token, flags = click(proxied, prefix="/mmoref")
    assert "secure" in flags
    status, text = proxied.ingest(token, "reg-2", prefix="/mmoref")
    assert status == 200, text
    assert '"state": "registered"' in text

    owner = proxied.client(OWNER)
    status, headers, _ = owner.request("GET", f"/mmoref/dashboard/mygame/{SERVER}/referrals")
    assert status == 302
    login_url = urlsplit(headers["Location"])
    assert login_url.path == "/mmoref/dashboard/login", headers["Location"]
    assert parse_qs(login_url.query)["next"] == [f"/mmoref/dashboard/mygame/{SERVER}/referrals"]
    status, headers, page = owner.log_in(prefix="/mmoref", next_url=f"/mmoref/dashboard/mygame/{SERVER}/referrals")
    assert status == 302, page
    assert headers["Location"] == f"/mmoref/dashboard/mygame/{SERVER}/referrals"   # back where it was going
    status, _, page = owner.request("GET", headers["Location"])
    assert status == 200, page
    assert f"https://127.0.0.1:{proxied.port}/mmoref/r/{SERVER}?ref=" in page
    assert 'action="/mmoref/dashboard/logout"' in page


def test_the_session_cookie_stays_on_the_mmoref_prefix(behind_nginx):
    """A site that serves mmoref under /mmoref keeps its own `session` cookie apart."""
    status, headers, page = behind_nginx(trust_proxy=True).client(OWNER).log_in(prefix="/mmoref")
    assert status == 302, page
    assert "path=/mmoref" in cookie_flags(headers, mm.SESSION_COOKIE)


@pytest.mark.parametrize("prefix", ["", "/mmoref"], ids=["root", "under-mmoref"])
def test_a_prefix_a_client_sends_does_not_reach_links_or_redirects(behind_nginx, prefix):
    proxied = behind_nginx(trust_proxy=True)
    status, headers, _ = proxied.client(OWNER).request("GET", f"{prefix}/dashboard/",
                                                       **{"X-Forwarded-Prefix": "//evil.example"})
    assert status == 302
    assert headers["Location"].startswith(f"{prefix}/dashboard/login"), headers["Location"]


def test_with_trust_proxy_off_forwarded_headers_are_ignored(behind_nginx):
    proxied = behind_nginx(trust_proxy=False)
    token, flags = click(proxied)
    assert "secure" not in flags                           # X-Forwarded-Proto: https ignored
    assert recorded_address(proxied, token) == NGINX_ADDRESS   # X-Forwarded-For ignored: the peer counts
    status, headers, _ = proxied.client(OWNER).request("GET", "/mmoref/dashboard/")
    assert status == 302
    assert urlsplit(headers["Location"]).path == "/dashboard/login"   # X-Forwarded-Prefix ignored


def test_the_shipped_site_file_passes_nginx_t(tmp_path):
    """deploy/nginx/mmoref.conf as installed, with the test's certificate where certbot's would be."""
    make_certificate(tmp_path)
    certbot = tmp_path / "letsencrypt"
    certbot.mkdir()
    shutil.copy(tmp_path / "cert.pem", certbot / "fullchain.pem")
    shutil.copy(tmp_path / "key.pem", certbot / "privkey.pem")
    shutil.copytree(SNIPPETS, tmp_path / "snippets")
    site = (SNIPPETS.parent / "mmoref.conf").read_text()
    (tmp_path / "mmoref.conf").write_text(site.replace("/etc/letsencrypt/live/refer.example.org", str(certbot)))
    http_block = NGINX_CONF.split("    upstream mmoref")[0]   # the test's paths, then the shipped site
    (tmp_path / "nginx.conf").write_text(http_block.format(user="", tmp=tmp_path) + "    include mmoref.conf;\n}\n")
    result = subprocess.run([tool("nginx"), "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"),
                             "-e", str(tmp_path / "error.log")], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr
    assert "[warn]" not in result.stderr and "[emerg]" not in result.stderr


def readme_gunicorn_command() -> list[str]:
    """docs/production.md's recommended gunicorn line, run with this Python, listening on "{port}"."""
    found = re.search(r"^gunicorn -w .*-k gthread.*$", (ROOT / "docs" / "production.md").read_text(), re.MULTILINE)
    assert found, "docs/production.md no longer recommends a gthread gunicorn line"
    return [sys.executable, "-m", *shlex.split(found[0]), "-b", "127.0.0.1:{port}"]


def test_gunicorn_behind_nginx_answers_while_200_connections_idle_or_trickle(behind_nginx):
    """Issue 8.3: docs/production.md's setup (gthread gunicorn behind the buffering nginx)."""
    pytest.importorskip("gunicorn", reason="gunicorn is not installed (pip install gunicorn)")
    proxied = behind_nginx(trust_proxy=True, command=readme_gunicorn_command())
    store = mm.open_store(proxied.db_path)
    tokens = [store.mint_referral(SERVER, f"code{index}")[0] for index in range(5)]
    store.close()
    context = ssl.create_default_context(cafile=str(proxied.certificate))

    def handshake(sock: socket.socket) -> socket.socket:
        return context.wrap_socket(sock, server_hostname="127.0.0.1")

    with open_connections(proxied.port, OPEN_CONNECTIONS, OPEN_CONNECTIONS // 2,
                          deadline=time.monotonic() + 20, wrap=handshake):
        time.sleep(2 * TRICKLE_EVERY)   # the trickling ones have each sent a few bytes
        for index, token in enumerate(tokens):
            started = time.monotonic()
            status, text = proxied.ingest(token, f"idle-{index}")
            took = time.monotonic() - started
            assert status == 200, text
            assert '"state": "registered"' in text
            assert took < ANSWER_WITHIN, f"event {index} took {took:.1f} s"


def test_send_reaches_a_self_signed_server_with_cacert_or_ssl_cert_file(behind_nginx, runner):
    """`send` to an https endpoint whose certificate no system CA signed: refused in one line, then
    trusted with --cacert, or with SSL_CERT_FILE set for the process (read when it starts)."""
    proxied = behind_nginx(trust_proxy=True)
    endpoint = f"https://127.0.0.1:{proxied.port}{mm.INGEST_PATH}"
    send = ["send", "registered", "--endpoint", endpoint, "--server-id", SERVER, "--secret", proxied.secret,
            "--token", "tok", "--referee-identity", "player-1", "--test", "--json"]

    untrusted = runner(*send, db=False)
    trusted = runner(*send, "--cacert", str(proxied.certificate), db=False)
    environment = {**os.environ, "SSL_CERT_FILE": str(proxied.certificate)}
    by_environment = subprocess.run([sys.executable, str(ROOT / "mmoref_server.py"), *send], capture_output=True,
                                    text=True, timeout=60, env=environment)

    assert_one_error_line(untrusted.exit_code, untrusted.stderr, f"cannot reach {endpoint}",
                          "certificate verify failed", "pass --cacert FILE or set SSL_CERT_FILE")
    answered = {"status": 200, "body": {"ok": True, "test": True}}
    assert (trusted.exit_code, trusted.json()) == (0, answered), trusted.stderr
    assert (by_environment.returncode, json.loads(by_environment.stdout or "null")) == (0, answered), \
        by_environment.stderr


@pytest.mark.parametrize("prefix", ["", "/mmoref"], ids=["root", "under-mmoref"])
def test_a_body_over_the_proxy_limit_gets_the_json_413_mmoref_gives(behind_nginx, prefix):
    """Issue 20.12: nginx stops bodies over 128 KiB itself; a kit still reads mmoref's JSON answer."""
    proxied = behind_nginx(trust_proxy=True)

    def post(kib: int) -> tuple[int, http.client.HTTPMessage, str]:
        raw = b'{"pad": "' + b"x" * (kib * 1024) + b'"}'
        return proxied.client().request("POST", prefix + mm.INGEST_PATH, raw, **{
            mm.SIGNATURE_HEADER: mm.signature_header(proxied.secret, raw), "Content-Type": "application/json"})

    by_mmoref, by_nginx = post(100), post(200)   # over mmoref's 64 KiB; over nginx's 128 KiB too

    expected = mm.ApiError(413, "body too large", mm.HINTS["body too large"]).body()
    for status, headers, text in (by_mmoref, by_nginx):
        assert (status, headers.get_content_type()) == (413, "application/json"), text
        assert json.loads(text) == expected
    assert by_nginx[2] == by_mmoref[2]
