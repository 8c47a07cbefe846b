"""Idle and trickling connections must not take the service down (real server processes)."""
from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from collections.abc import Iterator

import pytest

import mmoref_server as mm
from tests.support import HttpClient
from tests.support import add_server
from tests.support import event_body
from tests.support import mint_tokens

pytestmark = pytest.mark.slow

OPEN_CONNECTIONS = 200
ANSWER_WITHIN = 5.0        # seconds a signed event may take while the connections are open
TRICKLE_EVERY = 1.0        # seconds between the bytes a trickling connection sends
PARTIAL_REQUEST = b"POST /api/referral/events HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "

@contextlib.contextmanager
def open_connections(port: int, count: int, trickling_count: int, deadline: float,
                     wrap: Callable[[socket.socket], socket.socket] | None = None) -> Iterator[list[socket.socket]]:
    """`count` connections to 127.0.0.1:port: `trickling_count` of them send the start of a request and
    then one byte every TRICKLE_EVERY s, the others stay silent (not even a TLS handshake). `wrap` (e.g.
    a TLS handshake) is applied to each trickling connection before it sends."""
    sockets: list[socket.socket] = []
    stop = threading.Event()

    def trickle(trickling: list[socket.socket]) -> None:
        while not stop.wait(TRICKLE_EVERY) and time.monotonic() < deadline:
            for sock in trickling:
                with contextlib.suppress(OSError):
                    sock.send(b"x")

    try:
        for index in range(count):
            sockets.append(socket.create_connection(("127.0.0.1", port), timeout=ANSWER_WITHIN))
            if wrap and index < trickling_count:
                sockets[-1] = wrap(sockets[-1])
        trickling = sockets[:trickling_count]
        for sock in trickling:
            sock.send(PARTIAL_REQUEST)
        thread = threading.Thread(target=trickle, args=(trickling,), daemon=True)
        thread.start()
        yield sockets
    finally:
        stop.set()
        for sock in sockets:
            sock.close()


def test_signed_events_are_answered_while_200_connections_idle_or_trickle(live_server, db_path):
    """waitress stopped accepting at 100 connections and closed an idle one after ~2 minutes."""
    store = mm.open_store(db_path)
    secret = add_server(store)
    tokens = mint_tokens(store, [f"code{i}" for i in range(5)])
    server = live_server()
    with open_connections(server.port, OPEN_CONNECTIONS, OPEN_CONNECTIONS // 2, deadline=time.monotonic() + 20):
        time.sleep(2 * TRICKLE_EVERY)   # the trickling ones have each sent a few bytes
        for index, token in enumerate(tokens):
            raw_body = event_body("registered", token, f"reg-{index}", referee=f"player-{index}")
            client = HttpClient(server.port, timeout=ANSWER_WITHIN)
            started = time.monotonic()
            try:
                status, body = client.post_event(secret, raw_body)
            except OSError as exc:
                pytest.fail(f"event {index}: no answer within {ANSWER_WITHIN} s ({exc!r})\n{server.output()}")
            finally:
                client.close()
            assert status == 200, body
            assert (body["ok"], body["state"]) == (True, "registered")
            assert time.monotonic() - started < ANSWER_WITHIN
