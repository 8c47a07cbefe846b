"""docs/test-vectors.json is what the signer and a live server give (issue 21): the one file every kit's
signer is checked against (tests/test_kits.py too), so it cannot drift from the code.

The file holds inputs (`secret`, `t`, `body`; for a mistake also `signed` and `signed_with`) and what
follows from them (`signed`, `v1`, `header`, `answer`). `MMOREF_UPDATE_DOCS=1` rewrites the second kind
from the first, after a deliberate change (a better hint, a new vector): then read the diff.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
from typing import Any

import pytest

import mmoref_server as mm
from tests.support import INGEST
from tests.support import PYTHON
from tests.support import ROOT
from tests.support import SIGNING_VECTORS
from tests.support import HttpClient
from tests.support import signing_vectors

# Read at import: fixtures.py hides every MMOREF_* variable from the tests themselves.
UPDATE_DOCS = os.environ.get("MMOREF_UPDATE_DOCS") == "1"
KID = "k_vector"   # any kid: verify() is given the one secret under this name


def signer_fields(entry: dict[str, Any]) -> dict[str, str]:
    """What mmoref's signer gives for an entry: for a valid vector, the string signed, v1 and the header;
    for a mistake, the header its sender sent (the MAC of what it signed, with the header's t)."""
    if "mistake" in entry:
        signed_t, _, signed_body = entry["signed"].partition(".")
        v1 = mm.sign(entry.get("signed_with", entry["secret"]), signed_t, signed_body.encode())
        return {"header": f"t={entry['t']},v1=sha256={v1}"}
    body = entry["body"].encode()
    return {"signed": f"{entry['t']}.{entry['body']}", "v1": mm.sign(entry["secret"], entry["t"], body),
            "header": mm.signature_header(entry["secret"], body, t=entry["t"])}


def hmac_hex(secret: str, signed: str) -> str:
    """The MAC as a reader of the file computes it, without mmoref: HMAC-SHA256 of the signed string."""
    return hmac.new(secret.encode(), signed.encode(), hashlib.sha256).hexdigest()


def entries(vectors: dict[str, Any]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = vectors["valid"] + vectors["invalid"]
    return found


def test_the_signer_gives_every_vectors_signed_string_mac_and_header() -> None:
    vectors = signing_vectors()
    for entry in entries(vectors):
        computed = signer_fields(entry)
        assert {name: entry.get(name) for name in computed} == computed, entry["name"]
    for entry in vectors["valid"]:
        assert entry["v1"] == hmac_hex(entry["secret"], entry["signed"]), entry["name"]
    # the first vector is the contract's own reference vector
    reference = vectors["valid"][0]
    assert reference["v1"] in (ROOT / "docs" / "contract.md").read_text()


def test_verify_accepts_each_valid_vector_and_refuses_each_mistake_for_its_recorded_reason() -> None:
    vectors = signing_vectors()
    at, window = vectors["server_clock"], vectors["replay_window"]
    for entry in vectors["valid"]:
        assert mm.verify(entry["header"], entry["body"].encode(), [(KID, entry["secret"])], at, window) == KID
    for entry in vectors["invalid"]:
        with pytest.raises(mm.SignatureError) as refused:
            mm.verify(entry["header"], entry["body"].encode(), [(KID, entry["secret"])], at, window)
        assert refused.value.reason == entry["answer"]["body"]["reason"], entry["name"]


def serve_at(clock: int) -> list[str]:
    """`serve` on the "{port}" that live_server fills in, in a process whose clock (mm.now) reads `clock`:
    the answers that depend on it (the replay window) are the same on every run."""
    pinned = f"import mmoref_server as mm; mm.now = lambda: {int(clock)}; mm.main()"
    return [PYTHON, "-c", pinned, "serve", "--port", "{port}"]


@pytest.mark.slow
def test_a_live_server_answers_each_vector_as_recorded(db_path: str, live_server: Any) -> None:
    vectors = signing_vectors()
    secrets_by_server = {json.loads(entry["body"])["server_id"]: entry["secret"] for entry in entries(vectors)}
    for entry in entries(vectors):   # one secret per server id
        assert secrets_by_server[json.loads(entry["body"])["server_id"]] == entry["secret"], entry["name"]
    store = mm.open_store(db_path)
    for server_id, secret in secrets_by_server.items():
        store.add_server(server_id, "mygame")
        store.set_secret(server_id, secret)
    store.close()
    server = live_server(command=serve_at(vectors["server_clock"]),
                         env={"MMOREF_REPLAY_WINDOW": str(vectors["replay_window"])})
    client = HttpClient(server.port)
    try:
        rebuilt = []
        for entry in entries(vectors):
            computed = signer_fields(entry)
            status, body = client.request("POST", INGEST, entry["body"].encode(),
                                          {mm.SIGNATURE_HEADER: computed["header"]})
            rebuilt.append({**entry, **computed, "answer": {"status": status, "body": body}})
    finally:
        client.close()

    valid, invalid = rebuilt[:len(vectors["valid"])], rebuilt[len(vectors["valid"]):]
    for entry in valid:   # accepted: a dry run's 200, or the made-up token's 404 after the signature passed
        answer = entry["answer"]
        if json.loads(entry["body"]).get("test") is True:
            assert answer == {"status": 200, "body": {"ok": True, "test": True}}, entry["name"]
        else:
            assert (answer["status"], answer["body"]["error"]) == (404, "unknown token"), entry["name"]
    assert all(entry["answer"]["status"] == 401 and entry["answer"]["body"]["error"] == "bad_signature"
               for entry in invalid), invalid
    if UPDATE_DOCS:
        updated = {**vectors, "valid": valid, "invalid": invalid}
        SIGNING_VECTORS.write_text(json.dumps(updated, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    assert rebuilt == entries(signing_vectors())
