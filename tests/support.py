"""Helpers shared by the tests in this folder: signed posts, CLI error checks, database peeks."""
from __future__ import annotations

import contextlib
import re
import socket
import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mmoref_server as mm

SERVER_SCRIPT = Path(mm.__file__).resolve()
INGEST = "/api/referral/events"
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


def free_port() -> int:
    """A 127.0.0.1 port nothing listens on right now."""
    with refused_port() as port:
        return port
