"""Ingest checks servers and secrets against the copy it keeps, without a database read, and
confirms that copy where the answer is decided: an event's COMMIT checks the configuration
generation it was verified against, and every other answer is confirmed by one read first.
Another Store on the same database stands for another process (the CLI, a gunicorn worker)."""
from __future__ import annotations

import threading
from typing import Any

import pytest

import mmoref_server as mm
from tests.support import SERVER_ID
from tests.support import add_server
from tests.support import event_body
from tests.support import mint_tokens
from tests.support import reply
from tests.support import rows
from tests.support import signed_post

pytestmark = pytest.mark.both_engines


@pytest.fixture
def kept(client, store, db_path):
    """(secret, elsewhere): the app keeps the configuration (one event answered); `elsewhere` is another Store."""
    secret = add_server(store)
    token = mint_tokens(store, ["alice"])[0]
    assert reply(signed_post(client, secret, event_body("registered", token, "warm-up")))[0] == 200
    elsewhere = mm.Store(db_path)
    yield secret, elsewhere
    elsewhere.close()


def _post(client, secret: str, body: bytes) -> tuple[int, dict[str, Any]]:
    return reply(signed_post(client, secret, body))


def test_an_event_signed_with_a_secret_made_elsewhere_is_accepted(client, store, kept):
    _, elsewhere = kept
    new_secret, _ = elsewhere.rotate_secret(SERVER_ID, grace=0)
    token = mint_tokens(store, ["bob"])[0]

    status, body = _post(client, new_secret, event_body("registered", token, "reg-new", referee="player-2"))

    assert (status, body.get("state")) == (200, "registered"), body


def test_an_event_signed_with_a_secret_revoked_elsewhere_is_refused(client, store, kept):
    old_secret, elsewhere = kept
    elsewhere.rotate_secret(SERVER_ID, grace=0)
    token = mint_tokens(store, ["bob"])[0]

    status, body = _post(client, old_secret, event_body("registered", token, "reg-old", referee="player-2"))

    assert (status, body["error"], body.get("reason")) == (401, "bad_signature", "mac_mismatch"), body


def test_a_dry_run_signed_with_a_secret_revoked_elsewhere_is_refused(client, kept):
    old_secret, elsewhere = kept
    elsewhere.rotate_secret(SERVER_ID, grace=0)
    body = mm.build_body("registered", "any-token", SERVER_ID, "dry-1", referee_identity="p-1", test=True)

    status, answer = _post(client, old_secret, body)

    assert (status, answer["error"], answer.get("reason")) == (401, "bad_signature", "mac_mismatch"), answer


def test_a_dry_run_for_a_server_disabled_elsewhere_is_refused(client, kept):
    secret, elsewhere = kept
    elsewhere.update_server(SERVER_ID, referrals_enabled=0)
    body = mm.build_body("registered", "any-token", SERVER_ID, "dry-1", referee_identity="p-1", test=True)

    status, answer = _post(client, secret, body)

    assert (status, answer["error"]) == (404, "referrals not enabled"), answer


def test_a_revocation_committed_between_verification_and_commit_refuses_the_event(client, store, kept, db_path,
                                                                                   monkeypatch):
    """The window the per-request read left open: verified against the old secret, written after
    the revocation committed. The COMMIT's own generation check refuses it, and nothing is logged."""
    old_secret, elsewhere = kept
    token = mint_tokens(store, ["bob"])[0]
    read_token = mm.read_token

    def revoke_then_read(key: str, value: str) -> Any:  # step 8: after the signature was verified
        if not revoked:
            revoked.append(elsewhere.rotate_secret(SERVER_ID, grace=0))
        return read_token(key, value)

    revoked: list[Any] = []
    monkeypatch.setattr(mm, "read_token", revoke_then_read)
    status, body = _post(client, old_secret, event_body("registered", token, "reg-window", referee="player-2"))

    assert revoked, "the revocation ran inside the request"
    assert (status, body["error"], body.get("reason")) == (401, "bad_signature", "mac_mismatch"), body
    assert rows(db_path, "SELECT count(*) FROM delivery_log WHERE server_event_id = ?", "reg-window") == [(0,)]


def test_a_configuration_changing_on_every_attempt_answers_503_and_the_retry_is_accepted(client, store, kept,
                                                                                         db_path, monkeypatch):
    """Each attempt is verified, then outdated by another server added elsewhere:
    after CONFIGURATION_ATTEMPTS the answer is docs/contract.md §1.6's 503, nothing is written, and
    the same event sent again once the changes stop is accepted."""
    secret, elsewhere = kept
    token = mint_tokens(store, ["bob"])[0]
    body = event_body("registered", token, "reg-churn", referee="player-2")
    read_token = mm.read_token

    def add_server_then_read(key: str, value: str) -> Any:  # step 8: after the signature was verified
        changes.append(elsewhere.add_server(f"other-{len(changes)}", "other-game", "Other", "http://localhost/r"))
        return read_token(key, value)

    changes: list[Any] = []
    monkeypatch.setattr(mm, "read_token", add_server_then_read)
    response = signed_post(client, secret, body)
    status, answer = reply(response)

    assert (status, answer, response.headers.get("Retry-After")) == (
        503, {"ok": False, "error": "database busy"}, "5")
    assert "settings or secrets changed" in response.get_json()["hint"]
    assert len(changes) == mm.CONFIGURATION_ATTEMPTS
    assert rows(db_path, "SELECT count(*) FROM delivery_log WHERE server_event_id = ?", "reg-churn") == [(0,)]

    monkeypatch.setattr(mm, "read_token", read_token)
    status, answer = _post(client, secret, body)
    assert (status, answer["state"]) == (200, "registered"), answer
    assert rows(db_path, "SELECT count(*) FROM delivery_log WHERE server_event_id = ?", "reg-churn") == [(1,)]


def test_refusals_against_a_current_configuration_cost_no_retry(client, store, kept, monkeypatch):
    """A refusal is confirmed by one read; it is not run again while nothing changed."""
    secret, _ = kept
    runs: list[int] = []
    verified_delivery = mm._verified_delivery
    monkeypatch.setattr(mm, "_verified_delivery", lambda *args: runs.append(1) or verified_delivery(*args))

    status, body = _post(client, "not-the-secret", event_body("registered", mint_tokens(store, ["bob"])[0], "r-1"))

    assert (status, body.get("reason"), len(runs)) == (401, "mac_mismatch", 1), body


@pytest.mark.sqlite_only
def test_a_failing_piece_of_a_batch_fails_alone_with_its_counters(store, db_path):
    """Pieces queued behind a busy writer commit together; the one that raises is undone alone,
    its counter bumps too, and its caller gets its exception."""
    add_server(store)
    release, started, results = threading.Event(), threading.Event(), {}

    def hold_writer(transaction: mm.Transaction) -> None:
        started.set()
        assert release.wait(30)

    def counted(name: str, fail: bool):
        def work(transaction: mm.Transaction) -> str:
            transaction.count_event(SERVER_ID, "registered", name)
            transaction.db.execute("INSERT INTO meta (key, value) VALUES (?, 'x')", (name,))
            if fail:
                raise ValueError(name)
            return name
        return work

    def call(name: str, fail: bool = False) -> None:
        try:
            results[name] = store.group_commit(counted(name, fail))
        except ValueError as exc:
            results[name] = exc

    holder = threading.Thread(target=store.group_commit, args=(hold_writer,))
    holder.start()
    assert started.wait(30)
    callers = [threading.Thread(target=call, args=(name, name == "bad")) for name in ("good-1", "bad", "good-2")]
    for thread in callers:
        thread.start()
    _wait_until_queued(store, 3)
    release.set()
    for thread in [holder, *callers]:
        thread.join(30)

    assert results["good-1"] == "good-1" and results["good-2"] == "good-2"
    assert isinstance(results["bad"], ValueError)
    assert rows(db_path, "SELECT key FROM meta WHERE value = 'x' ORDER BY key") == [("good-1",), ("good-2",)]
    assert rows(db_path, "SELECT outcome, count FROM event_counts ORDER BY outcome") == [("good-1", 1), ("good-2", 1)]


def _wait_until_queued(store: mm.Store, count: int) -> None:
    for _ in range(3000):
        with store._queued:
            if len(store._queue) >= count:
                return
        threading.Event().wait(0.01)
    raise AssertionError(f"{count} pieces were not queued within 30 s")

