"""Hostile input: fuzzed signature headers and bodies, a flood of bad requests, slow clients."""
from __future__ import annotations

import collections
import json
import os
import socket
from typing import Any

import pytest
from hypothesis import HealthCheck
from hypothesis import event
from hypothesis import example
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import mmoref_server as mm
from tests.support import INGEST
from tests.support import SERVER_ID
from tests.support import HttpClient
from tests.support import add_server
from tests.support import assert_good_hint
from tests.support import event_body
from tests.support import mint_tokens

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
VALID_HEADER = mm.signature_header("test-secret", b"{}", t=1733500000, kid="k_1")
NASTY_TEXT = st.sampled_from(["\x00", ",", "=", " ", "t=", "v1=", "sha256=", "kid=", "\ud800", "é", "\u2028",
                              "9" * 40, "f" * 64, "\t", "\ufeff", "\U0001f600"])


@st.composite
def mutated(draw: Any, base: Any, pieces: Any) -> Any:
    """`base` (a str or bytes strategy) with a few inserts, deletes, replacements and repeats of `pieces`."""
    value = draw(base)
    for _ in range(draw(st.integers(0, 4))):
        at = draw(st.integers(0, len(value)))
        operation = draw(st.sampled_from(["insert", "delete", "replace", "repeat"]))
        if operation == "insert":
            value = value[:at] + draw(pieces) + value[at:]
        elif operation == "delete":
            value = value[:at] + value[at + draw(st.integers(1, 8)):]
        elif operation == "replace":
            value = value[:at] + draw(pieces) + value[at + 1:]
        else:
            value = value[:at] + value[at:at + 12] * draw(st.integers(2, 200)) + value[at + 12:]
    return value


# The header parser ###########################################################

HEADERS = st.one_of(
    st.none(),
    st.text(max_size=300),
    st.text(alphabet=" ,=tv1kidsha256abcdef0123456789\x00é", max_size=300),
    mutated(st.just(VALID_HEADER), NASTY_TEXT),
    st.integers(1, 10_000).map(lambda n: f"t={'9' * n},v1=sha256={'a' * 64}"),
    st.integers(1, 10_000).map(lambda n: "," * n + VALID_HEADER + "," * n),
    st.lists(st.sampled_from(["t=1", "v1=sha256=" + "0" * 64, "kid=x", "", " ", "x=y", "v1="]),
             max_size=500).map(",".join),
)


@FUZZ
@given(header=HEADERS)
@example(header="t=0017,v1=sha256=" + "A" * 64)
@example(header="t=\u0661\u0662,v1=sha256=" + "a" * 64)  # Arabic-Indic digits are not [0-9]
def test_header_parser_returns_or_raises_only_signature_errors(header):
    try:
        parsed = mm.parse_signature_header(header)
    except mm.SignatureError as exc:
        assert exc.reason in ("missing", "malformed")
        return
    assert isinstance(parsed, mm.ParsedSignature)
    assert parsed.t.isascii() and parsed.t.isdigit() and parsed.timestamp > 0
    assert parsed.macs and all(len(mac) == 64 for mac in parsed.macs)


# The endpoint ################################################################

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20) | NASTY_TEXT,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20)
FIELDS = ("event", "token", "server_id", "server_event_id", "referee_identity", "ts", "test")


@pytest.fixture
def tokens(kit):
    return [kit.token(f"code{i}") for i in range(3)]


@st.composite
def event_bodies(draw: Any, tokens: list[str]) -> bytes:
    """A body that is nearly right: some fields swapped for random JSON, then serialised."""
    body: dict[str, Any] = {
        "event": draw(st.sampled_from(mm.EVENTS)),
        "token": draw(st.sampled_from(tokens) | st.sampled_from(tokens).map(lambda token: token[:-3] + "abc")),
        "server_id": draw(st.sampled_from(["srv_123", "srv_123", "srv_123", "srv_nobody"])),
        "server_event_id": draw(st.text(min_size=1, max_size=10)),
        "referee_identity": draw(st.text(min_size=1, max_size=10))}
    if draw(st.booleans()):
        for field in draw(st.lists(st.sampled_from(FIELDS), min_size=1, max_size=3)):
            body[field] = draw(JSON_VALUES)
    return json.dumps(body, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")


def raw_bodies(tokens: list[str]) -> Any:
    """Anything from random bytes to mutated near-valid events."""
    valid = event_bodies(tokens)
    return st.one_of(
        mutated(valid, st.sampled_from([b"\x00", b"{", b"}", b"[", b'"', b",", b"\\u", b"\\ud800", b"\xff",
                                        b"\xc3", b"1" * 5000, b"1e999", b"-", b" "])),
        st.binary(max_size=300),
        JSON_VALUES.map(lambda value: json.dumps(value).encode("utf-8", "surrogatepass")),
        st.integers(1, 30_000).map(lambda depth: b'{"event":' * depth + b"1" + b"}" * depth),
        st.integers(1, 30_000).map(lambda depth: b"[" * depth + b"]" * depth),
        st.sampled_from(tokens).map(lambda token: b'{"event":"registered","event":"qualified","token":"'
                                    + token.encode() + b'","server_id":"srv_123","server_event_id":"d"}'),
        st.text(max_size=200).map(lambda text: text.encode("utf-8", "surrogatepass")),
    )


HEADER_VALUES = st.text(st.characters(max_codepoint=255, blacklist_characters="\r\n"), max_size=200)


def assert_well_formed_answer(response: Any) -> None:
    """Never a 500; JSON always; ok True exactly on 2xx, else a string error and a good hint."""
    assert response.status_code != 500, response.get_data()
    assert response.mimetype == "application/json", response.get_data()
    body = response.get_json()
    assert isinstance(body, dict)
    if 200 <= response.status_code < 300:
        assert body["ok"] is True
    else:
        assert body["ok"] is False, body
        assert isinstance(body["error"], str), body
        assert_good_hint(body)


SIGNINGS = ("signed", "signed", "signed", "random", "none", "stale", "other secret")
RANDOM_HEADERS = st.one_of(HEADER_VALUES, mutated(st.just(VALID_HEADER), NASTY_TEXT.filter(
    lambda piece: all(ord(c) < 256 for c in piece))))  # HTTP header values are Latin-1
CONTENT_TYPES = st.sampled_from(["application/json", "text/plain", "", "application/x-www-form-urlencoded"])


def post_fuzzed(kit: Any, data: Any, raw: bytes) -> None:
    """POST `raw` with a drawn signature header (right, random, none, stale, other secret); check the answer."""
    signing = data.draw(st.sampled_from(SIGNINGS), label="signing")
    headers = {"Content-Type": data.draw(CONTENT_TYPES, label="content type")}
    if signing == "random":
        headers[mm.SIGNATURE_HEADER] = data.draw(RANDOM_HEADERS, label="header")
    elif signing != "none":
        t = mm.now() - 10_000 if signing == "stale" else None
        headers[mm.SIGNATURE_HEADER] = mm.signature_header(
            "not-the-secret" if signing == "other secret" else kit.secret, raw, t=t)

    response = kit.client.post(INGEST, data=raw, headers=headers)

    event(f"{response.status_code} {response.get_json().get('error', '')}")  # --hypothesis-show-statistics
    assert_well_formed_answer(response)


@FUZZ
@given(data=st.data())
def test_endpoint_answers_hostile_bodies_with_json_never_500(kit, tokens, data):
    post_fuzzed(kit, data, data.draw(raw_bodies(tokens), label="body"))


@FUZZ
@given(data=st.data())
def test_endpoint_answers_near_valid_events_with_json_never_500(kit, tokens, data):
    post_fuzzed(kit, data, data.draw(event_bodies(tokens), label="body"))


# Flooding ####################################################################

# Each refusal commits about three WAL pages: 2,000 of them push 6,000 pages (24 MB) through the
# WAL, three times the 8 MB bound below, and the per-client limit (30 a minute) after 30. More only
# took longer: 20,000 requests took 10 s on an idle machine and up to two minutes on a busy one.
FLOOD = 2_000
PADDING = "x" * 1000  # every snippet is cut to its maximum length


@pytest.fixture
def flood_app(db_path):
    """synchronous=NORMAL: the flood measures the file's size, not durability (fsync would take minutes)."""
    return mm.create_app({"MMOREF_DB": db_path, "TESTING": True, "MMOREF_SYNCHRONOUS": "NORMAL"})


def bad_request(client: Any, secret: str, token: str, n: int) -> int:
    """One of five refused requests (400/401/404, per-server and installation-wide lists); its status."""
    kind = n % 5
    fields = {"event": "registered", "token": token, "server_id": SERVER_ID, "server_event_id": f"e{n}",
              "referee_identity": "p", "padding": PADDING}
    if kind == 3:
        fields["server_id"] = "srv_nobody"
    if kind == 4:
        fields["token"] = token[:-4] + "AAAA"
    raw = b"{not json " + PADDING.encode() if kind == 2 else json.dumps(fields).encode()
    signed_with = "wrong" if kind == 1 else secret
    headers = {} if kind == 0 else {mm.SIGNATURE_HEADER: mm.signature_header(signed_with, raw)}
    return client.post(INGEST, data=raw, headers=headers).status_code


def wal_restarts(store: mm.Store) -> int:
    """How many times SQLite has started the WAL over: the checkpoint sequence number in its header.
    It starts over after a checkpoint has copied every page back: at most once per 1000 pages
    written (SQLite's automatic checkpoint), or at the first write after a TRUNCATE checkpoint."""
    with open(store.path + "-wal", "rb") as wal:
        header = wal.read(32)
    assert len(header) == 32, "no WAL header: nothing written since the last TRUNCATE checkpoint"
    return int.from_bytes(header[12:16], "big")


def disk_use(store: mm.Store) -> tuple[int, int]:
    """(WAL size as the flood left it, database size once the WAL is checkpointed into it)."""
    wal = os.path.getsize(store.path + "-wal")
    store.connect().execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return wal, os.path.getsize(store.path)


@pytest.mark.slow
def test_a_flood_of_bad_requests_keeps_lists_and_file_bounded(flood_app):
    client = flood_app.test_client()
    with flood_app.app_context():
        store = mm.get_store()
    secret = add_server(store)
    token = mint_tokens(store, ["alice"])[0]
    db = store.connect()

    def flood(first: int) -> collections.Counter:
        statuses = collections.Counter(bad_request(client, secret, token, n) for n in range(first, first + FLOOD))
        for server_id in (SERVER_ID, None):
            # one client, five kinds of refusal: a few rows, counted (per-client limit, identical ones aggregated)
            kept = db.execute("SELECT count(*) FROM rejected_requests WHERE server_id IS ?", (server_id,))
            assert 0 < kept.fetchone()[0] <= mm.REJECTED_KEPT_PER_SERVER
        return statuses

    restarts = wal_restarts(store)
    assert flood(0) == {400: 800, 401: 400, 404: 800}
    # the flood did reach the WAL bound: SQLite filled the WAL (1000 pages), checkpointed it and
    # started it over again and again; 3 restarts take 2,000 pages or more (about 8 MB)
    assert wal_restarts(store) - restarts >= 3
    restarts = wal_restarts(store)
    wal, size_after_one = disk_use(store)
    assert size_after_one < 2 * 1024 * 1024
    assert wal < 8 * 1024 * 1024  # SQLite checkpoints every 1000 pages (4 MB) by default
    flood(FLOOD)
    assert wal_restarts(store) - restarts >= 1 + 3  # one more: the first write after disk_use's TRUNCATE
    wal, size_after_two = disk_use(store)
    assert size_after_two <= size_after_one + 64 * 1024
    assert wal < 8 * 1024 * 1024
    assert db.execute("SELECT count(*) FROM delivery_log").fetchone()[0] == 0


# Slow clients ################################################################

SLOW_CLIENTS = 12          # more than the server's 8 worker threads
TRICKLED_BYTES = 4         # one a second, per slow client
SLOW_REQUEST = f"POST {INGEST} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\n".encode()


@pytest.mark.slow
def test_slow_clients_do_not_hold_up_others(live_server, store):
    secret = add_server(store)
    tokens = mint_tokens(store, [f"code{i}" for i in range(TRICKLED_BYTES)])
    server = live_server()
    slow = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(SLOW_CLIENTS)]
    client = HttpClient(server.port, timeout=5)  # the bound: each request must finish within 5 s
    try:
        for second, token in enumerate(tokens):
            for sock in slow:
                sock.sendall(SLOW_REQUEST[second:second + 1])
            assert client.request("GET", "/healthz") == (200, {"ok": True})
            status, answer = client.post_event(secret, event_body("registered", token, "r", referee=f"player-{second}"))
            assert (status, answer.get("state")) == (200, "registered"), answer
            with pytest.raises(socket.timeout):  # the trickle is still waiting for the rest of its request
                slow[0].settimeout(1)
                slow[0].recv(1)
    finally:
        client.close()
        for sock in slow:
            sock.close()
