"""Body limits that must not depend on the interpreter: JSON nesting depth and huge `ts` values.

docs/contract.md §1.3: arrays and objects nest at most `MAX_JSON_DEPTH` levels (the body's own
object is level 1) on every Python, and a `ts` of any size is a 400 `invalid field`, never a 500.
"""
from __future__ import annotations

import json
import logging

import pytest

import mmoref_server as mm

LIMIT = mm.MAX_JSON_DEPTH


def nested(levels: int, kit, token: str, event_id: str) -> bytes:
    """A valid registered event whose extra field `deep` makes the body `levels` levels deep."""
    body = json.dumps(kit.body("registered", token, event_id)).encode()
    arrays = levels - 1  # the body's own object is level 1
    return body[:-1] + b', "deep": ' + b"[" * arrays + b"]" * arrays + b"}"


def test_the_limit_is_the_documented_one():
    assert LIMIT == 32


def test_a_body_exactly_at_the_nesting_limit_is_accepted(kit):
    response = kit.post(nested(LIMIT, kit, kit.token(), "reg-1"))
    assert (response.status_code, response.get_json()["state"]) == (200, "registered")


@pytest.mark.parametrize("levels", [LIMIT + 1, 5000], ids=["one-over", "5000"])
def test_a_body_over_the_nesting_limit_is_not_valid_json_on_every_python(kit, levels):
    response = kit.post(nested(levels, kit, kit.token(), "reg-1"))
    assert response.status_code == 400
    assert response.get_json() == {
        "ok": False, "error": "body is not valid JSON",
        "hint": f"{mm.HINTS['body is not valid JSON']}; arrays and objects may nest at most {LIMIT} levels deep"}


@pytest.mark.parametrize("text", ["[", "{", "[[[[", '"\\"'], ids=["brackets", "braces", "mixed", "escaped-quote"])
def test_brackets_inside_strings_do_not_count(kit, text):
    body = json.loads(nested(LIMIT, kit, kit.token(), "reg-1"))
    body["note"] = text * 100
    response = kit.post(body)
    assert (response.status_code, response.get_json()["state"]) == (200, "registered")


@pytest.mark.parametrize("body", [
    b"[" * 40 + b'"' + b'\\"' * 1000,       # an unterminated string full of escaped quotes
    b"[" * 40 + b'"\\' * 20000 + b"\\",     # ... ending in a lone backslash
], ids=["unterminated", "trailing-backslash"])
def test_malformed_deep_bodies_are_not_valid_json(kit, body):
    response = kit.post(body)
    assert (response.status_code, response.get_json()["error"]) == (400, "body is not valid JSON")


@pytest.mark.parametrize("ts", ["1" + "0" * 309, "-1" + "0" * 309, "9" * 4000, "1e309", "-1e400"],
                         ids=["10**309", "-10**309", "4000-nines", "1e309-float", "-1e400-float"])
@pytest.mark.parametrize("secret", [None, "not-the-secret"], ids=["signed", "wrong-mac"])
def test_a_huge_ts_is_an_invalid_field_without_a_traceback(kit, caplog, ts, secret):
    """Field shape (step 4) comes before the MAC (step 6): a wrong MAC gets the same 400."""
    raw = json.dumps(kit.body("registered", kit.token(), "reg-1")).encode()[:-1] + b', "ts": ' + ts.encode() + b"}"
    with caplog.at_level(logging.DEBUG):
        response = kit.post(raw, secret=secret)
    assert response.status_code == 400
    assert response.get_json() == {"ok": False, "error": "invalid field", "field": "ts",
                                   "hint": "ts must be a finite number of Unix seconds (64-bit)"}
    assert not [record for record in caplog.records if record.exc_info], "a traceback was logged"
