"""Issue 8 item 5 against real server processes: the same Rotate secret form sent twice at once
(a double click, or a re-sent POST racing the first) rotates once, both answers are clean, and
the secret the game servers still use stays live in its grace period."""
from __future__ import annotations

import re
import sys
import time

import pytest

import mmoref_server as mm
from tests.support import Browser
from tests.support import HttpClient
from tests.support import add_server
from tests.support import race
from tests.support import scalar

pytestmark = pytest.mark.slow

PASSWORD = "correct horse battery"
SERVER_ID = "srv_rotate"
TAB = f"/dashboard/mygame/{SERVER_ID}/referrals"
ROUNDS = 5            # each round races one fresh form; more rounds, more chances to overlap
GUNICORN_WORKERS = 2
SERVERS = {
    "waitress threads": None,   # python mmoref_server.py serve
    "gunicorn -w 2": [sys.executable, "-m", "gunicorn", "-w", str(GUNICORN_WORKERS), "-b", "127.0.0.1:{port}",
                      "mmoref_server:create_app()"],
}


def started(live_server, command: list[str] | None) -> int:
    """The port of a real server on the test's database, every gunicorn worker booted."""
    server = live_server(env={"MMOREF_ADMIN_PASSWORD": PASSWORD}, command=command)
    if command is not None:
        deadline = time.monotonic() + 20
        while server.output().count("Booting worker with pid") < GUNICORN_WORKERS:
            assert time.monotonic() < deadline, f"gunicorn did not boot its workers:\n{server.output()}"
            time.sleep(0.1)
    return server.port


def rotate_form(owner: Browser) -> dict[str, str]:
    """The Rotate secret form's fields as the tab shows them (CSRF token and one-time value)."""
    status, _, page = owner.request("GET", TAB)
    assert status == 200, page
    fields = {name: re.search(rf'name="{name}" value="([^"]+)"', page) for name in ("csrf_token", "rotation")}
    assert all(fields.values()), page
    return {"grace": "86400", **{name: match.group(1) for name, match in fields.items()}}


def dry_run_status(port: int, secret: str) -> tuple[int, object]:
    """A signed `"test": true` event with `secret`: 200 while the secret is live."""
    body = mm.build_body("registered", "any-token", SERVER_ID, "evt-dry", referee_identity="p", test=True)
    client = HttpClient(port)
    try:
        return client.post_event(secret, body)
    finally:
        client.close()


@pytest.mark.parametrize("command", SERVERS.values(), ids=SERVERS.keys())
def test_the_same_rotate_form_sent_twice_at_once_rotates_once(live_server, store, db_path, command) -> None:
    in_use = add_server(store, SERVER_ID)   # the secret the game servers run with
    port = started(live_server, command)
    owner = Browser(port)
    assert owner.log_in(PASSWORD)[0] == 302

    for round_number in range(1, ROUNDS + 1):
        form = rotate_form(owner)
        answers = race(port, [lambda _, form=form: owner.request("POST", f"{TAB}/secret", form)] * 2)

        for status, headers, page in answers:
            assert (status, headers["Location"]) == (302, TAB), page   # both clean: no 500, no error page
        assert scalar(db_path, "SELECT count(*) FROM secrets WHERE server_id = ?", SERVER_ID) == 1 + round_number
        assert scalar(db_path, "SELECT count(*) FROM secrets WHERE rotation_nonce = ?", form["rotation"]) == 1
        assert dry_run_status(port, in_use) == (200, {"ok": True, "test": True}), \
            "the secret in use was revoked: the form rotated twice"
        in_use = scalar(db_path, "SELECT secret FROM secrets WHERE server_id = ? AND expires_at IS NULL", SERVER_ID)
