"""Crash safety: SIGKILL mid-load loses no acknowledged event; a full disk is a clean, retryable 500."""
from __future__ import annotations

import http.client
import json
import sqlite3
import threading

import pytest

import mmoref_server as mm
from tests.support import HttpClient
from tests.support import add_server
from tests.support import event_body
from tests.support import limit_writer_pages
from tests.support import log_rows_for
from tests.support import mint_tokens
from tests.support import referral_id_of
from tests.support import rows
from tests.support import scalar

pytestmark = pytest.mark.both_engines  # docs/contract.md holds on SQLite and on PostgreSQL

SENDERS = 4
EVENTS_PER_SENDER = 60
KILL_AFTER_ACKS = 40


class Load:
    """SENDERS threads posting their own events in turn; remembers which got which answer."""

    def __init__(self, port: int, secret: str, bodies: list[bytes]):
        self.port, self.secret = port, secret
        self.answers: dict[bytes, tuple[int, object]] = {}
        self.cut_off: list[bytes] = []    # sent, but the connection died before an answer
        self.enough_acks = threading.Event()
        self._lock = threading.Lock()
        chunks = [bodies[i::SENDERS] for i in range(SENDERS)]
        self.threads = [threading.Thread(target=self._send, args=(chunk,), daemon=True) for chunk in chunks]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def join(self, timeout: float = 30) -> None:
        for thread in self.threads:
            thread.join(timeout)
        assert not any(thread.is_alive() for thread in self.threads), "a sender hung"

    def _send(self, bodies: list[bytes]) -> None:
        client = HttpClient(self.port, timeout=10)
        try:
            for body in bodies:
                try:
                    answer = client.post_event(self.secret, body)
                except (OSError, http.client.HTTPException):
                    with self._lock:
                        self.cut_off.append(body)
                    return
                with self._lock:
                    self.answers[body] = answer
                    if sum(status == 200 for status, _ in self.answers.values()) >= KILL_AFTER_ACKS:
                        self.enough_acks.set()
        finally:
            client.close()


def idempotency_key(store: mm.Store, body: bytes) -> tuple[str, str, str]:
    fields = json.loads(body)
    return referral_id_of(store, fields["token"]), fields["event"], fields["server_event_id"]


@pytest.mark.slow
def test_sigkill_mid_load_loses_no_acknowledged_event(live_server, store, db_path, engine):
    secret = add_server(store)
    tokens = mint_tokens(store, [f"code{i}" for i in range(SENDERS * EVENTS_PER_SENDER)])
    bodies = [event_body("registered", token, f"reg-{i}", referee=f"player-{i}") for i, token in enumerate(tokens)]
    server = live_server()

    load = Load(server.port, secret, bodies)
    load.start()
    assert load.enough_acks.wait(30), f"no {KILL_AFTER_ACKS} answers in 30 s:\n{server.output()}"
    server.process.kill()  # SIGKILL on POSIX: no shutdown code runs
    server.process.wait(10)
    load.join()

    assert load.cut_off, "the kill did not interrupt the load: no request was left unanswered"
    acknowledged = [body for body, (status, _) in load.answers.items() if status == 200]
    assert len(acknowledged) == len(load.answers), load.answers  # every answer before the kill was a 200
    restarted = live_server()
    if engine == "sqlite":
        assert scalar(db_path, "PRAGMA integrity_check") == "ok"
    for body in acknowledged:
        assert log_rows_for(db_path, *idempotency_key(store, body)) == 1

    client = HttpClient(restarted.port)
    for body in bodies:
        status, answer = client.post_event(secret, body)
        assert status == 200, answer
        if body in acknowledged:
            assert answer == {"ok": True, "duplicate": True}
        assert log_rows_for(db_path, *idempotency_key(store, body)) == 1
    client.close()
    assert scalar(db_path, "SELECT count(*) FROM delivery_log") == len(bodies)
    assert scalar(db_path, "SELECT count(*) FROM anchors") == len(bodies)
    if engine == "sqlite":
        assert scalar(db_path, "PRAGMA integrity_check") == "ok"


def snapshot(db_path: str) -> dict[str, object]:
    """Everything an ingest may change, as committed (seen through a separate connection)."""
    return {
        "anchors": scalar(db_path, "SELECT count(*) FROM anchors"),
        "log": scalar(db_path, "SELECT count(*) FROM delivery_log"),
        "states": rows(db_path, "SELECT state, count(*) FROM referrals GROUP BY state ORDER BY state"),
        "daily": rows(db_path, "SELECT sum(clicked), sum(registered), sum(qualified) FROM daily_counts"),
        "referrers": rows(db_path, "SELECT sum(registered), sum(qualified) FROM referrer_counts"),
    }


@pytest.mark.sqlite_only  # SQLite's own disk-full path
def test_disk_full_is_a_clean_500_and_the_retry_succeeds(kit, store, db_path, caplog):
    tokens = [kit.token(f"code{i}") for i in range(300)]
    unlimited = limit_writer_pages(store)

    for i, token in enumerate(tokens):
        raw = json.dumps(kit.body("registered", token, f"reg-{i}", referee_identity=f"player-{i}")).encode()
        header = mm.signature_header(kit.secret, raw)
        before = snapshot(db_path)
        response = kit.post(raw, header=header)
        if response.status_code != 200:
            break
    else:
        pytest.fail("the database never filled up")

    assert response.status_code == 500
    assert response.get_json() == {"ok": False, "error": "internal error", "hint": mm.HINTS["internal error"]}
    assert not store.connect().in_transaction
    assert snapshot(db_path) == before
    failures = [r for r in caplog.records if r.name == "mmoref" and r.exc_info]
    assert failures and issubclass(failures[-1].exc_info[0], sqlite3.Error)

    limit_writer_pages(store, unlimited)
    retry = kit.post(raw, header=header)

    assert retry.status_code == 200, retry.get_json()
    assert retry.get_json() == {"ok": True, "referral_id": referral_id_of(store, token), "state": "registered"}
    after = snapshot(db_path)
    assert (after["anchors"], after["log"]) == (before["anchors"] + 1, before["log"] + 1)
    assert dict(after["states"])["registered"] == dict(before["states"]).get("registered", 0) + 1
    assert log_rows_for(db_path, referral_id_of(store, token), "registered", f"reg-{i}") == 1
    assert kit.post(raw, header=header).get_json() == {"ok": True, "duplicate": True}
