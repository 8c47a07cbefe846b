"""Helpers shared by the tests in this folder: signed posts, CLI error checks, database peeks,
a small keep-alive HTTP client and thread races against a real server."""
from __future__ import annotations

import contextlib
import http.client
import json
import re
import socket
import sqlite3
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Callable

import mmoref_server as mm
from conftest import free_port  # noqa: F401 (re-exported for the tests here)

SERVER_SCRIPT = Path(mm.__file__).resolve()
INGEST = mm.INGEST_PATH
ISO_UTC = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z")
PYTHON = sys.executable


def signed_post(client: Any, secret: str, raw_body: bytes, path: str = INGEST, **headers: str) -> Any:
    """POST exactly `raw_body`, signed with `secret` now, through a Flask test client."""
    header = mm.signature_header(secret, raw_body)
    return client.post(path, data=raw_body, headers={mm.SIGNATURE_HEADER: header, **headers})


def send(client: Any, secret: str, event: str, token: str, server_id: str, server_event_id: str,
         path: str = INGEST, **fields: Any) -> Any:
    """Build a body the way the kit does (`mm.build_body`), sign it and post it."""
    body = mm.build_body(event, token, server_id, server_event_id, **fields)
    return signed_post(client, secret, body, path)


def assert_one_error_line(exit_code: int, stderr: str, *fragments: str) -> str:
    """A user mistake: non-zero exit, exactly one `error: ...` line on stderr, no traceback."""
    assert exit_code != 0
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


@contextlib.contextmanager
def database(path: str | Path, *, read_only: bool = False) -> Iterator[sqlite3.Connection]:
    """A plain sqlite3 connection to `path`, closed afterwards (read_only: touches no file)."""
    target = f"file:{Path(path).resolve()}?mode=ro&immutable=1" if read_only else str(path)
    db = sqlite3.connect(target, uri=read_only, isolation_level=None)
    try:
        yield db
    finally:
        db.close()


def rows(path: str | Path, sql: str, *params: Any) -> list[tuple]:
    """All rows of one query against the database at `path`."""
    with database(path) as db:
        return db.execute(sql, params).fetchall()


def scalar(path: str | Path, sql: str, *params: Any) -> Any:
    return rows(path, sql, *params)[0][0]


@contextlib.contextmanager
def refused_port() -> Iterator[int]:
    """A 127.0.0.1 port held bound but not listening: connecting to it is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


SERVER_ID = "srv_robust"
REFEREE = "player-7842"
HTTP_TIMEOUT = 20.0     # seconds any one request to a real server may take before the test fails


def add_server(store: mm.Store, server_id: str = SERVER_ID) -> str:
    """A server with referrals enabled; return its secret."""
    secret, _ = store.add_server(server_id, "mygame", "Robustness", "https://game.example/register")
    return secret


def mint_tokens(store: mm.Store, codes: Sequence[str], server_id: str = SERVER_ID) -> list[str]:
    """One token per referrer code, as the share link would mint them."""
    return [store.mint_referral(server_id, code)[0] for code in codes]


def event_body(event: str, token: str, server_event_id: str, referee: str = REFEREE,
               server_id: str = SERVER_ID) -> bytes:
    """The bytes a kit would send (referee_identity only on `registered`)."""
    return mm.build_body(event, token, server_id, server_event_id,
                         referee_identity=referee if event == "registered" else None)


def referral_id_of(store: mm.Store, token: str) -> str:
    claims = mm.read_token(store.token_key, token)
    assert claims is not None
    return claims.referral_id


class HttpClient:
    """One keep-alive connection to a server on 127.0.0.1 (reconnects when the server closes it)."""

    def __init__(self, port: int, timeout: float = HTTP_TIMEOUT):
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, Any]:
        """(status, parsed JSON body, or the text when it is not JSON)."""
        self.connection.request(method, path, body=body, headers=headers or {})
        response = self.connection.getresponse()
        text = response.read().decode("utf-8", "replace")
        try:
            return response.status, json.loads(text)
        except ValueError:
            return response.status, text

    def post_event(self, secret: str, raw_body: bytes, header: str | None = None) -> tuple[int, Any]:
        """POST `raw_body` signed now with `secret` (or with the given header as is)."""
        header = header or mm.signature_header(secret, raw_body)
        return self.request("POST", INGEST, raw_body, {mm.SIGNATURE_HEADER: header,
                                                        "Content-Type": "application/json"})

    def close(self) -> None:
        self.connection.close()


def poster(secret: str, raw_body: bytes) -> Callable[[HttpClient], tuple[int, Any]]:
    """An action for `race`: post this signed body."""
    return lambda client: client.post_event(secret, raw_body)


def race(port: int, actions: Sequence[Callable[[HttpClient], Any]], timeout: float = 60) -> list[Any]:
    """Run each action in its own thread with its own connection, all released at once by a barrier.

    Returns the actions' results in order; an action's exception fails the test here.
    """
    barrier = threading.Barrier(len(actions), timeout=timeout)
    results: list[Any] = [None] * len(actions)
    errors: list[BaseException] = []

    def run(index: int, action: Callable[[HttpClient], Any]) -> None:
        client = HttpClient(port)
        try:
            barrier.wait()
            results[index] = action(client)
        except BaseException as exc:  # reported in the test's thread below
            errors.append(exc)
        finally:
            client.close()

    threads = [threading.Thread(target=run, args=(i, action), daemon=True) for i, action in enumerate(actions)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    assert not any(thread.is_alive() for thread in threads), f"a racing request took longer than {timeout} s"
    if errors:
        raise errors[0]
    return results


def log_rows_for(db_path: str | Path, referral_id: str, event: str, server_event_id: str) -> int:
    """How many delivery-log rows carry this idempotency key."""
    return scalar(db_path, "SELECT count(*) FROM delivery_log WHERE token_referral_id = ? AND event = ?"
                           " AND server_event_id = ?", referral_id, event, server_event_id)
