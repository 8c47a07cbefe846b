"""A MAC that fails because the body changed on its way: curl -d stripped the trailing newline, or the
JSON was re-serialised after signing. The 401 says which, and the Rejected list shows it once."""
from __future__ import annotations

import json

import pytest

import mmoref_server as mm
from tests.support import KIT_TAB
from tests.support import Owner
from tests.support import rejected_rows

CURL_D = ("the MAC matches this body plus a trailing newline: your HTTP client changed the body"
          " (curl -d strips newlines); send it with --data-binary")
RESERIALISED = ("the MAC matches the same JSON written differently (spacing or key order): sign the exact"
                " bytes you send, not a re-serialised copy, and send them unchanged")


@pytest.mark.parametrize("ending", [b"\n", b"\r\n"], ids=["LF", "CRLF"])
def test_trailing_newline_stripped_in_transit(kit, ending):
    signed = json.dumps(kit.body("registered", kit.token(), "reg-1")).encode() + ending
    sent = signed.rstrip(b"\r\n")   # what `curl -d @event.json` posts

    response = kit.post(sent, header=mm.signature_header(kit.secret, signed))

    assert response.status_code == 401
    assert response.get_json() == {"ok": False, "error": "bad_signature", "reason": "mac_mismatch",
                                   "hint": f"{mm.HINTS['mac_mismatch']} ({CURL_D})"}


@pytest.mark.parametrize("respell", [
    lambda body: json.dumps(body, separators=(",", ":")),
    lambda body: json.dumps(body, sort_keys=True),
    lambda body: json.dumps(body, sort_keys=True, separators=(",", ":")) + "\n",
], ids=["compact", "sorted", "sorted-compact-newline"])
def test_json_reserialised_after_signing(kit, respell):
    body = kit.body("registered", kit.token(), "reg-1", ts=1733500000)
    signed = respell(body).encode()
    sent = json.dumps(body, indent=2).encode()   # the same JSON, other bytes

    response = kit.post(sent, header=mm.signature_header(kit.secret, signed))

    assert response.status_code == 401
    assert response.get_json()["hint"] == f"{mm.HINTS['mac_mismatch']} ({RESERIALISED})"


def test_unrelated_mac_gets_no_diagnosis(kit):
    raw = json.dumps(kit.body("registered", kit.token(), "reg-1")).encode()
    response = kit.post(raw, header=mm.signature_header("some other secret", raw))
    assert response.get_json()["hint"] == mm.HINTS["mac_mismatch"]


def test_rejected_list_shows_the_diagnosis_once(owner: Owner, kit):
    signed = json.dumps(kit.body("registered", kit.token(), "reg-1")).encode() + b"\n"
    assert kit.post(signed.rstrip(b"\n"), header=mm.signature_header(kit.secret, signed)).status_code == 401

    page = owner.page(KIT_TAB)

    [row] = rejected_rows(page)
    assert row["diagnosis"] == CURL_D
    assert row["hint"].count(CURL_D) == 1
    assert page.by_id("rejected").text.count("--data-binary") == 1   # the connect box's curl line aside
