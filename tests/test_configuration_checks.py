"""Ingest reads the server and its secrets in the transaction that writes the event, so a change
made elsewhere counts from the moment it commits, and none can commit between verification and
the event's COMMIT. Another Store on the same database stands for another process (the CLI, a
gunicorn worker)."""
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
    """(secret, elsewhere): the app has answered one event; `elsewhere` is another Store."""
    secret = add_server(store)
    token = mint_tokens(store, ["alice"])[0]
    assert reply(signed_post(client, secret, event_body("registered", token, "warm-up")))[0] == 200
    elsewhere = mm.open_store(db_path)
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


def test_a_revocation_cannot_commit_between_verification_and_the_events_commit(client, store, kept, db_path,
                                                                                monkeypatch):
    """A rotation started elsewhere while the event is being checked waits for the event's COMMIT:
    the event, verified with the secret that was live, is written, and the revocation comes after."""
    old_secret, elsewhere = kept
    token = mint_tokens(store, ["bob"])[0]
    read_token = mm.read_token
    rotation = threading.Thread(target=lambda: order.append(("revoked", elsewhere.rotate_secret(SERVER_ID, grace=0))))

    def revoke_then_read(key: str, value: str) -> Any:  # step 8: after the signature was verified
        rotation.start()
        rotation.join(0.5)   # it cannot finish while this request's transaction is open
        order.append(("checked", rotation.is_alive()))
        return read_token(key, value)

    order: list[tuple[str, Any]] = []
    monkeypatch.setattr(mm, "read_token", revoke_then_read)
    status, body = _post(client, old_secret, event_body("registered", token, "reg-window", referee="player-2"))
    rotation.join(30)

    assert (status, body.get("state")) == (200, "registered"), body
    assert [step for step, _ in order] == ["checked", "revoked"] and order[0][1], order
    assert rows(db_path, "SELECT count(*) FROM delivery_log WHERE server_event_id = ?", "reg-window") == [(1,)]
    retry = _post(client, old_secret, event_body("registered", mint_tokens(store, ["carol"])[0], "reg-after"))
    assert (retry[0], retry[1].get("reason")) == (401, "mac_mismatch"), retry


def test_refusals_against_a_current_configuration_cost_no_retry(client, store, kept, monkeypatch):
    """A refusal is answered from one run of the checks: only a lost race to another node (WriteConflict) is retried."""
    secret, _ = kept
    runs: list[int] = []
    verify = mm.verify   # called once each time the checks of steps 5-8 run
    monkeypatch.setattr(mm, "verify", lambda *args: runs.append(1) or verify(*args))

    status, body = _post(client, "not-the-secret", event_body("registered", mint_tokens(store, ["bob"])[0], "r-1"))

    assert (status, body.get("reason"), len(runs)) == (401, "mac_mismatch", 1), body
