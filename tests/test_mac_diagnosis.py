"""A MAC that fails because the body changed on its way (curl -d stripped the newlines, the JSON was
re-serialised after signing, a byte-order mark) or the signed text was put together wrongly (no `t.`,
another separator, a plain SHA-256). The answer says which, and the Rejected list shows it once."""
from __future__ import annotations

import hashlib
import hmac
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


# Signing mistakes of their own (issue 20.6) ####################################

BOM = b"\xef\xbb\xbf"   # what Windows PowerShell 5.1 puts before the text of a UTF-8 file
NO_T = 'the MAC matches the body alone: sign "<t>.<body>", the header\'s t, a dot, then the body'
PLAIN_SHA256 = ("v1 is a plain SHA-256 of the signed text, not an HMAC: compute HMAC-SHA256 with the secret as"
                " the key: hash_hmac in PHP, not hash")
BOM_SIGNED = ("the MAC matches this body with a UTF-8 byte-order mark, EF BB BF, in front (Windows PowerShell 5.1"
              " writes one at the start of a file): sign the bytes you send, without it")
BOM_SENT = ("the body starts with a UTF-8 byte-order mark, EF BB BF, which Windows PowerShell 5.1 writes:"
            " send and sign the JSON without it")
CURL_D_FILE = ("the MAC matches this body with its line breaks put back: curl -d @file strips newlines;"
               " send the file with --data-binary @file")


def joined(separator: str) -> str:
    return f'the MAC matches "<t>{separator}<body>": join t and the body with a dot, "<t>.<body>"'


def header_with(t: int, mac: str) -> str:
    """A signature header carrying `mac` as it is, however it was made."""
    return f"t={t},v1=sha256={mac}"


def hmac_of(secret: str, message: bytes) -> str:
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def assert_diagnosed(response, diagnosis: str, status: int = 401) -> None:
    if status == 401:
        expected = {"ok": False, "error": "bad_signature", "reason": "mac_mismatch",
                    "hint": f"{mm.HINTS['mac_mismatch']} ({diagnosis})"}
    else:
        expected = {"ok": False, "error": "body is not valid JSON",
                    "hint": f"{mm.HINTS['body is not valid JSON']} ({diagnosis})"}
    assert (response.status_code, response.get_json()) == (status, expected)


@pytest.mark.parametrize(("signed_text", "diagnosis"), [
    (lambda t, body: body, NO_T),
    (lambda t, body: f"{t}:".encode() + body, joined(":")),
    (lambda t, body: str(t).encode() + body, joined("")),
    (lambda t, body: f"{t}\n".encode() + body, joined("\\n")),
], ids=["without-t", "colon", "nothing-between", "newline"])
def test_the_signed_text_put_together_wrongly(kit, clock, signed_text, diagnosis):
    raw = json.dumps(kit.body("registered", kit.token(), "reg-1")).encode()
    mac = hmac_of(kit.secret, signed_text(clock.t, raw))
    assert_diagnosed(kit.post(raw, header=header_with(clock.t, mac)), diagnosis)


@pytest.mark.parametrize("digest", [
    lambda secret, t, body: hashlib.sha256(f"{t}.".encode() + body).hexdigest(),
    lambda secret, t, body: hashlib.sha256(body).hexdigest(),
    lambda secret, t, body: hashlib.sha256(f"{secret}{t}.".encode() + body).hexdigest(),
], ids=["t-dot-body", "body", "secret-in-front"])
def test_a_plain_sha256_instead_of_an_hmac(kit, clock, digest):
    raw = json.dumps(kit.body("registered", kit.token(), "reg-1")).encode()
    assert_diagnosed(kit.post(raw, header=header_with(clock.t, digest(kit.secret, clock.t, raw))), PLAIN_SHA256)


def test_signed_with_a_byte_order_mark_sent_without(kit):
    raw = json.dumps(kit.body("registered", kit.token(), "reg-1")).encode()
    assert_diagnosed(kit.post(raw, header=mm.signature_header(kit.secret, BOM + raw)), BOM_SIGNED)


def test_a_body_that_starts_with_a_byte_order_mark(kit, owner):
    raw = BOM + json.dumps(kit.body("registered", kit.token(), "reg-1")).encode()
    assert_diagnosed(kit.post(raw), BOM_SENT, status=400)   # signed as sent: the JSON is what fails
    [row] = rejected_rows(owner.page("/dashboard/"))
    assert (row["status"], row["diagnosis"]) == (400, BOM_SENT)


@pytest.mark.parametrize(("indent", "colon", "line_end"), [(2, ": ", "\n"), (4, ":  ", "\r\n")],
                         ids=["jq-LF", "PowerShell-CRLF"])
def test_curl_d_at_file_stripped_the_files_line_breaks(kit, indent, colon, line_end):
    pretty = json.dumps(kit.body("registered", kit.token(), "reg-1"), indent=indent, separators=(",", colon))
    signed = (pretty.replace("\n", line_end) + line_end).encode()   # the file, as openssl signed it
    sent = signed.replace(b"\r", b"").replace(b"\n", b"")          # what `curl -d @event.json` posts

    assert_diagnosed(kit.post(sent, header=mm.signature_header(kit.secret, signed)), CURL_D_FILE)
