"""Tests of the contract through HTTP and the CLI (see docs/contract.md §1-§3, §5, §6)."""
from __future__ import annotations

import hashlib
import hmac
import http.client
import io
import json
import logging
import os

import pytest
from werkzeug.test import EnvironBuilder
from werkzeug.test import run_wsgi_app

import mmoref_server as mm
from tests.support import INGEST
from tests.support import TEST_OK
from tests.support import Kit
from tests.support import assert_good_hint
from tests.support import error
from tests.support import ok
from tests.support import reply
from tests.support import revoke_every_secret

pytestmark = pytest.mark.both_engines  # docs/contract.md holds on SQLite and on PostgreSQL

VECTOR_BODY = (b'{"event":"registered","token":"tok_abc","server_id":"srv_123","referee_identity":"player-7842",'
             b'"server_event_id":"reg-7842","ts":1733500000}')
ZEROS = "0" * 64  # a well-formed v1 value that matches nothing


def test_spec_test_vector():
    expected = "cad864e0418dc3421633cb0dc39358c84f8397f831787132bbf721f0ff77625b"
    assert mm.sign("test-secret", 1733500000, VECTOR_BODY) == expected
    computed = hmac.new(b"test-secret", b"1733500000." + VECTOR_BODY, hashlib.sha256).hexdigest()
    assert computed == expected


# Helpers ######################################################################


def raw(body):
    return json.dumps(body).encode()


def dry_run(kit, **extra):
    """A signed-ready dry-run body: it stops at step 7, so any token will do."""
    return kit.body("registered", "any-token", "evt-test", test=True, **extra)


def registered_body(kit, **overrides):
    """A `registered` body with any field (even event or token) overridden; `...` drops it."""
    body = {**kit.body("registered", kit.token(), "reg-1"), **overrides}
    return {key: value for key, value in body.items() if value is not ...}


def log_rows(kit):
    return kit.store.delivery_log(kit.server_id)


def rejected(server_id, store):
    return store.rejected_requests(server_id, limit=1000)


def register(kit, token, event_id="reg-1", referee="player-7842"):
    return kit.send("registered", token, event_id, referee_identity=referee)


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One server shared by the many table rows that only dry-run or get refused (app setup is slow)."""
    with pytest.MonkeyPatch.context() as patch:
        for name in [name for name in os.environ if name.startswith("MMOREF_")]:
            patch.delenv(name)
        app = mm.create_app({"MMOREF_DB": str(tmp_path_factory.mktemp("shared") / "referrals.db"), "TESTING": True})
    with app.app_context():
        return Kit(app.test_client(), mm.get_store())


# Signing: pure functions (docs/contract.md §1.1, §1.2) #######################


def test_signature_header_has_the_documented_shape():
    mac = mm.sign("s3cret", 1733500000, b"{}")
    assert mm.signature_header("s3cret", b"{}", t=1733500000) == f"t=1733500000,v1=sha256={mac}"
    assert mm.signature_header("s3cret", b"{}", t=1733500000, kid="k_1") == f"t=1733500000,v1=sha256={mac},kid=k_1"


def test_sign_uses_the_t_text_as_given():
    assert mm.sign("s", "0017", b"x") == hmac.new(b"s", b"0017.x", hashlib.sha256).hexdigest()
    assert mm.sign("s", "0017", b"x") != mm.sign("s", 17, b"x")


MAC = "ab" * 32


@pytest.mark.parametrize("header, t, macs, kid", [
    (f"t=17,v1=sha256={MAC}", "17", (MAC,), None),
    (f"  t = 17 ,  v1 =  sha256={MAC}  , kid = k_1 ", "17", (MAC,), "k_1"),
    (f"kid=k_1,v1=sha256={MAC},t=17", "17", (MAC,), "k_1"),
    (f"t=17,v0=whatever,scheme=a=b,v1=sha256={MAC}", "17", (MAC,), None),
    (f",,t=17,,v1=sha256={MAC},,", "17", (MAC,), None),
    (f"t=17,v1=sha256={MAC},v1=sha256={ZEROS}", "17", (MAC, ZEROS), None),
    (f"t=17,v1=sha256={MAC.upper()}", "17", (MAC,), None),
    (f"t=0017,v1=sha256={MAC}", "0017", (MAC,), None),
    (f"t=17,v1=sha256={MAC},kid=a=b", "17", (MAC,), "a=b"),
], ids=["plain", "whitespace", "any-order", "unknown-keys", "empty-parts", "repeated-v1", "upper-hex",
        "t-as-sent", "first-equals-split"])
def test_parse_signature_header_grammar(header, t, macs, kid):
    assert mm.parse_signature_header(header) == mm.ParsedSignature(t=t, macs=macs, kid=kid)


BAD_HEADERS = {
    "no-t": f"v1=sha256={MAC}",
    "no-v1": "t=17",
    "t-not-integer": f"t=17.5,v1=sha256={MAC}",
    "t-letters": f"t=abc,v1=sha256={MAC}",
    "t-negative": f"t=-17,v1=sha256={MAC}",
    "t-empty": f"t=,v1=sha256={MAC}",
    "t-zero": f"t=0,v1=sha256={MAC}",
    "t-zeros": f"t=000,v1=sha256={MAC}",
    "two-t": f"t=17,t=17,v1=sha256={MAC}",
    "part-without-equals": f"t=17,v1=sha256={MAC},garbage",
    "v1-without-prefix": f"t=17,v1={MAC}",
    "v1-other-prefix": f"t=17,v1=sha1={MAC}",
    "v1-63-hex": f"t=17,v1=sha256={MAC[:63]}",
    "v1-65-hex": f"t=17,v1=sha256={MAC}a",
    "v1-not-hex": f"t=17,v1=sha256=g{MAC[1:]}",
    "one-bad-v1-among-good": f"t=17,v1=sha256={MAC},v1=sha256=xyz",
}


@pytest.mark.parametrize("header", BAD_HEADERS.values(), ids=BAD_HEADERS.keys())
def test_parse_signature_header_rejects_malformed(header):
    with pytest.raises(mm.SignatureError) as caught:
        mm.parse_signature_header(header)
    assert caught.value.reason == "malformed"


@pytest.mark.parametrize("header", [None, "", "   "])
def test_parse_signature_header_missing(header):
    with pytest.raises(mm.SignatureError) as caught:
        mm.parse_signature_header(header)
    assert caught.value.reason == "missing"


def verify_reason(header, body=b"{}", live=(("k_new", "new"), ("k_old", "old")), at=1000, window=300):
    """The SignatureError reason verify() raises, or ("ok", kid)."""
    try:
        return "ok", mm.verify(header, body, list(live), at, window)
    except mm.SignatureError as exc:
        return exc.reason


def test_verify_picks_the_secret_that_signed():
    assert verify_reason(f"t=1000,v1=sha256={mm.sign('old', 1000, b'{}')}") == ("ok", "k_old")
    assert verify_reason(f"t=1000,v1=sha256={mm.sign('new', 1000, b'{}')}") == ("ok", "k_new")


def test_verify_any_v1_may_match_and_hex_case_is_ignored():
    good = mm.sign("new", 1000, b"{}")
    assert verify_reason(f"t=1000,v1=sha256={ZEROS},v1=sha256={good.upper()}") == ("ok", "k_new")
    assert verify_reason(f"t=1000,v1=sha256={ZEROS},v1=sha256={'1' * 64}") == "mac_mismatch"


def test_verify_kid_restricts_the_candidates():
    by_old = mm.sign("old", 1000, b"{}")
    assert verify_reason(f"t=1000,v1=sha256={by_old},kid=k_old") == ("ok", "k_old")
    assert verify_reason(f"t=1000,v1=sha256={by_old},kid=k_new") == "mac_mismatch"
    assert verify_reason(f"t=1000,v1=sha256={by_old},kid=k_gone") == "unknown_kid"


def test_verify_macs_the_t_text_as_sent():
    assert verify_reason(f"t=0001000,v1=sha256={mm.sign('new', '0001000', b'{}')}") == ("ok", "k_new")
    assert verify_reason(f"t=0001000,v1=sha256={mm.sign('new', 1000, b'{}')}") == "mac_mismatch"


@pytest.mark.parametrize("t, expected", [(700, "ok"), (1300, "ok"), (699, "stale_timestamp"),
                                         (1301, "stale_timestamp"), (10**30, "stale_timestamp")])
def test_verify_window_both_directions(t, expected):
    result = verify_reason(f"t={t},v1=sha256={mm.sign('new', t, b'{}')}")
    assert (result[0] if isinstance(result, tuple) else result) == expected


@pytest.mark.parametrize("header, reason", [
    (f"t=1,v1=sha256={ZEROS},kid=k_gone", "stale_timestamp"),   # stale + unknown kid + no match
    (f"t=1000,v1=sha256={ZEROS},kid=k_gone", "unknown_kid"),    # unknown kid + no match
    (f"t=1000,v1=sha256={ZEROS}", "mac_mismatch"),
])
def test_verify_reason_precedence(header, reason):
    assert verify_reason(header) == reason


# Signing over HTTP: header grammar and 401 reasons ############################


def header_variants(kit, body_bytes):
    t = mm.now()
    mac = mm.sign(kit.secret, t, body_bytes)
    return {
        "first-equals-split": f"t={t},v1=sha256={mac}",
        "whitespace": f"  t = {t} ,  v1 =  sha256={mac}  ",
        "any-order": f"kid={kit.kid},v1=sha256={mac},t={t}",
        "unknown-keys": f"t={t},v0=whatever,scheme=a=b,v1=sha256={mac}",
        "empty-parts": f",,t={t},,v1=sha256={mac},,",
        "repeated-v1-first-wrong": f"t={t},v1=sha256={ZEROS},v1=sha256={mac}",
        "repeated-v1-second-wrong": f"t={t},v1=sha256={mac},v1=sha256={ZEROS}",
        "upper-case-hex": f"t={t},v1=sha256={mac.upper()}",
        "kid-selects-secret": f"t={t},v1=sha256={mac},kid={kit.kid}",
        "t-with-leading-zeros": f"t=00{t},v1=sha256={mm.sign(kit.secret, f'00{t}', body_bytes)}",
    }


GOOD_VARIANTS = ["first-equals-split", "whitespace", "any-order", "unknown-keys", "empty-parts",
                 "repeated-v1-first-wrong", "repeated-v1-second-wrong", "upper-case-hex",
                 "kid-selects-secret", "t-with-leading-zeros"]


@pytest.mark.parametrize("variant", GOOD_VARIANTS)
def test_header_grammar_accepted_over_http(shared, clock, variant):
    body = raw(dry_run(shared))
    assert reply(shared.post(body, header=header_variants(shared, body)[variant])) == TEST_OK


def test_mac_is_over_the_t_text_as_sent(shared, clock):
    body = raw(dry_run(shared))
    header = f"t=00{clock.t},v1=sha256={mm.sign(shared.secret, clock.t, body)}"  # signed "<t>", sent "00<t>"
    assert reply(shared.post(body, header=header)) == error(401, "bad_signature", reason="mac_mismatch")


@pytest.mark.parametrize("header", BAD_HEADERS.values(), ids=BAD_HEADERS.keys())
def test_malformed_header_over_http(shared, header):
    assert reply(shared.post(dry_run(shared), header=header)) == error(400, "malformed signature header")


def test_missing_header_over_http(shared):
    assert reply(shared.post(dry_run(shared), header="")) == error(400, "missing signature header")


@pytest.mark.parametrize("make_header, reason", [
    (lambda t: f"t={t - 1000},v1=sha256={ZEROS},kid=k_gone", "stale_timestamp"),
    (lambda t: f"t={t},v1=sha256={ZEROS},kid=k_gone", "unknown_kid"),
    (lambda t: f"t={t},v1=sha256={ZEROS}", "mac_mismatch"),
], ids=["stale-beats-kid-and-mac", "kid-beats-mac", "mac"])
def test_401_reason_precedence_over_http(shared, clock, make_header, reason):
    response = shared.post(dry_run(shared), header=make_header(clock.t))
    assert reply(response) == error(401, "bad_signature", reason=reason)


def test_wrong_secret_is_mac_mismatch_and_the_hint_teaches(shared):
    response = shared.post(dry_run(shared), secret="not-the-secret")
    assert reply(response) == error(401, "bad_signature", reason="mac_mismatch")
    assert "trailing newline" in response.get_json()["hint"]


# Replay window (docs/contract.md §1.1) #######################################


STALE = error(401, "bad_signature", reason="stale_timestamp")


@pytest.mark.parametrize("offset, expected", [(0, TEST_OK), (-300, TEST_OK), (300, TEST_OK), (-301, STALE),
                                              (301, STALE)])
def test_replay_window_default_edges(shared, clock, offset, expected):
    response = shared.post(dry_run(shared), t=clock.t + offset)
    assert reply(response) == expected
    if expected == STALE:
        assert "within 300 s of the server clock" in response.get_json()["hint"]


@pytest.fixture(params=["config", "environment"])
def narrow_kit(request, tmp_path, monkeypatch, clock):
    """A second app whose replay window is 10 s, set by config mapping or by MMOREF_REPLAY_WINDOW."""
    config = {"MMOREF_DB": str(tmp_path / "narrow.db")}
    if request.param == "config":
        config["MMOREF_REPLAY_WINDOW"] = 10
    else:
        monkeypatch.setenv("MMOREF_REPLAY_WINDOW", "10")
    app = mm.create_app(config)
    with app.app_context():
        return Kit(app.test_client(), mm.get_store())


@pytest.mark.parametrize("offset, status", [(-10, 200), (10, 200), (-11, 401), (11, 401), (-300, 401)])
def test_replay_window_is_configurable(narrow_kit, clock, offset, status):
    response = narrow_kit.post(dry_run(narrow_kit), t=clock.t + offset)
    assert reply(response) == (TEST_OK if status == 200 else STALE)
    if status == 401:
        assert "within 10 s of the server clock" in response.get_json()["hint"]  # the configured window


# Order of checks (docs/contract.md §1.4) #####################################


OVERSIZED = {"pad": "x" * (mm.MAX_BODY_BYTES + 10)}


def signed_with(signing):
    """How a case signs its body: properly, not at all, malformed, or with a wrong secret."""
    return {"signed": {}, "unsigned": {"header": ""}, "malformed": {"header": f"t=abc,v1=sha256={ZEROS}"},
            "bad-mac": {"secret": "not-the-secret"}}[signing]


ORDER_CASES = [
    # (id, body(kit) -> dict or bytes, signing, expected)
    ("oversized-and-unsigned", lambda k: k.body("registered", k.token(), "e1", **OVERSIZED), "unsigned",
     error(413, "body too large")),
    ("oversized-invalid-json-malformed", lambda k: b"{" * (mm.MAX_BODY_BYTES + 1), "malformed",
     error(413, "body too large")),
    ("oversized-but-signed", lambda k: k.body("registered", k.token(), "e1", **OVERSIZED), "signed",
     error(413, "body too large")),
    ("unsigned-invalid-json", lambda k: b'{"server_id": "srv_123",', "unsigned",
     error(400, "missing signature header")),
    ("malformed-header-invalid-json", lambda k: b"not json", "malformed",
     error(400, "malformed signature header")),
    ("unsigned-unknown-server", lambda k: k.body("registered", "tok", "e1", server_id="nope"), "unsigned",
     error(400, "missing signature header")),
    ("invalid-json-unknown-server", lambda k: b'{"server_id": "nope", "event": }', "signed",
     error(400, "body is not valid JSON")),
    ("array-unknown-server", lambda k: b'[{"server_id": "nope"}]', "signed",
     error(400, "body must be a JSON object")),
    ("field-shape-before-unknown-server", lambda k: k.body("registered", ..., "e1", server_id="nope"), "bad-mac",
     error(400, "missing field", field="token")),
    ("malformed-test-true-missing-field", lambda k: k.body("registered", "tok", ..., test=True), "signed",
     error(400, "missing field", field="server_event_id")),
    ("malformed-test-true-bad-event", lambda k: k.body("signup", "tok", "e1", test=True), "signed",
     error(400, "invalid field", field="event")),
    ("test-as-string", lambda k: k.body("registered", "tok", "e1", test="true"), "signed",
     error(400, "invalid field", field="test")),
    ("unknown-server-before-bad-signature", lambda k: k.body("registered", "tok", "e1", server_id="nope"),
     "bad-mac", error(404, "unknown server")),
    ("bad-signature-before-test-mode", lambda k: k.body("registered", "tok", "e1", test=True), "bad-mac",
     error(401, "bad_signature", reason="mac_mismatch")),
    ("test-mode-before-token-check", lambda k: k.body("registered", "forged", "e1", test=True), "signed",
     TEST_OK),
    ("unknown-token", lambda k: k.body("registered", "forged", "e1"), "signed", error(404, "unknown token")),
]


@pytest.mark.parametrize("make_body, signing, expected", [case[1:] for case in ORDER_CASES],
                         ids=[case[0] for case in ORDER_CASES])
def test_order_of_checks(shared, make_body, signing, expected):
    assert reply(shared.post(make_body(shared), **signed_with(signing))) == expected


def test_referrals_not_enabled_is_404_before_the_signature(kit):
    kit.store.update_server(kit.server_id, referrals_enabled=0)
    response = kit.post(dry_run(kit), secret="not-the-secret")
    assert reply(response) == error(404, "referrals not enabled")
    assert reply(kit.post(dry_run(kit))) == error(404, "referrals not enabled")


def test_no_signing_secret_is_404(kit):
    revoke_every_secret(kit.store, kit.server_id)
    assert reply(kit.post(dry_run(kit))) == error(404, "no signing secret")


def test_unexpected_failure_is_500_with_no_partial_write(kit, monkeypatch, caplog):
    token, referral_id = kit.store.mint_referral(kit.server_id, "alice")

    def broken_log(*args, **kwargs):
        raise RuntimeError("disk on fire")

    caplog.set_level(logging.INFO, logger="mmoref")
    with monkeypatch.context() as patch:
        patch.setattr(mm, "_log", broken_log)  # fails after the state change, inside the transaction
        assert reply(register(kit, token)) == error(500, "internal error")
    assert kit.store.referral(referral_id)["state"] == "clicked"
    assert log_rows(kit) == []
    assert any(record.exc_info for record in caplog.records), "the traceback is logged"
    assert reply(register(kit, token)) == ok(referral_id=referral_id, state="registered")


# Responses: methods, size, content type (docs/contract.md §1.3, §1.5) ########


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH"])
def test_other_methods_get_405_json(shared, method):
    response = shared.client.open(INGEST, method=method, data=b'{"event": "registered"}')
    assert reply(response) == error(405, "method not allowed")
    assert response.headers["Allow"] == "POST"


def test_head_gets_405(client):
    response = client.head(INGEST)
    assert response.status_code == 405
    assert response.headers["Allow"] == "POST"


def padded(kit, size):
    """A dry-run body of exactly `size` bytes."""
    base = raw(dry_run(kit, pad=""))
    body = raw(dry_run(kit, pad="x" * (size - len(base))))
    assert len(body) == size
    return body


def test_body_at_the_cap_passes_and_one_byte_more_is_413(kit):
    assert reply(kit.post(padded(kit, mm.MAX_BODY_BYTES))) == TEST_OK
    assert reply(kit.post(padded(kit, mm.MAX_BODY_BYTES + 1))) == error(413, "body too large")


@pytest.mark.parametrize("content_type", ["application/x-www-form-urlencoded", "text/plain", None])
def test_content_type_is_not_enforced(kit, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    token, referral_id = kit.store.mint_referral(kit.server_id, "alice")
    response = kit.post(kit.body("registered", token, "reg-1"), **headers)
    assert reply(response) == ok(referral_id=referral_id, state="registered")


def post_without_content_length(kit, body, header):
    """A streamed request whose server terminates the input (as for chunked), no Content-Length."""
    environ = EnvironBuilder(path=INGEST, method="POST", input_stream=io.BytesIO(body),
                             headers={mm.SIGNATURE_HEADER: header}).get_environ()
    environ.pop("CONTENT_LENGTH", None)
    environ["wsgi.input_terminated"] = True
    app = kit.client.application  # called directly: the test client would put Content-Length back
    body, status, headers = run_wsgi_app(app, environ, buffered=True)
    return app.response_class(b"".join(body), status=status, headers=headers)


@pytest.mark.parametrize("size, expected", [
    (200, TEST_OK), (mm.MAX_BODY_BYTES, TEST_OK), (mm.MAX_BODY_BYTES + 1, error(413, "body too large")),
    (4 * mm.MAX_BODY_BYTES, error(413, "body too large")),
])
def test_size_cap_while_reading_when_there_is_no_content_length(kit, size, expected):
    body = padded(kit, size)
    assert reply(post_without_content_length(kit, body, mm.signature_header(kit.secret, body))) == expected


def chunked_post(server, body_chunks, header=None):
    """POST with Transfer-Encoding: chunked and no Content-Length; return (status, parsed body)."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=20)
    try:
        headers = {mm.SIGNATURE_HEADER: header} if header else {}
        connection.request("POST", INGEST, body=iter(body_chunks), headers=headers, encode_chunked=True)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


@pytest.mark.slow
def test_chunked_body_without_content_length(kit, live_server):
    server = live_server()
    small = raw(dry_run(kit))
    status, body = chunked_post(server, [small[:10], small[10:]], header=mm.signature_header(kit.secret, small))
    assert (status, body) == TEST_OK
    big = [b"x" * 8192] * 9  # 72 KiB, over the 64 KiB cap, in chunks
    status, body = chunked_post(server, big, header="t=1,v1=sha256=" + ZEROS)
    assert_good_hint(body)
    del body["hint"]
    assert (status, body) == error(413, "body too large")


# Body fields (docs/contract.md §1.3) #########################################


REQUIRED = ["event", "token", "server_id", "server_event_id", "referee_identity"]


@pytest.mark.parametrize("value", [..., None, "", "   ", "\t\n "], ids=["absent", "null", "empty", "spaces", "ws"])
@pytest.mark.parametrize("field", REQUIRED)
def test_required_field_missing(shared, field, value):
    assert reply(shared.post(registered_body(shared, **{field: value}))) == error(400, "missing field", field=field)


WRONG_TYPES = [
    ("event", 5), ("event", "signup"), ("event", "Registered"), ("token", 123), ("server_id", ["srv_123"]),
    ("server_event_id", {"id": 1}), ("referee_identity", 7842), ("referee_identity", True),
    ("test", "true"), ("test", 1), ("ts", True), ("ts", "1733500000"), ("ts", 2**63), ("ts", -(2**63) - 1),
    ("ts", 1e19), ("ts", [1]),
]


@pytest.mark.parametrize("field, value", WRONG_TYPES, ids=[f"{f}={v!r}"[:30] for f, v in WRONG_TYPES])
def test_wrong_type_is_invalid_field(shared, field, value):
    assert reply(shared.post(registered_body(shared, **{field: value}))) == error(400, "invalid field", field=field)


@pytest.mark.parametrize("ts", [2**63 - 1, -(2**63), 0, 1733500000.5, None])
def test_ts_values_accepted(shared, ts):
    assert reply(shared.post(dry_run(shared, ts=ts))) == TEST_OK


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity"])
def test_non_finite_literals_are_not_json(shared, literal):
    body = raw(dry_run(shared, ts=0)).replace(b'"ts": 0', b'"ts": ' + literal)
    assert literal in body
    assert reply(shared.post(body)) == error(400, "body is not valid JSON")


def test_ts_overflowing_to_infinity_is_invalid(shared):
    body = raw(dry_run(shared, ts=0)).replace(b'"ts": 0', b'"ts": 1e999')
    assert reply(shared.post(body)) == error(400, "invalid field", field="ts")


@pytest.mark.parametrize("field", ["event", "token", "server_id", "server_event_id", "referee_identity"])
def test_257_characters_is_invalid(shared, field):
    body = registered_body(shared, **{field: "a" * 257})
    assert reply(shared.post(body)) == error(400, "invalid field", field=field)


def test_256_characters_pass_and_are_stored(kit):
    token = kit.token()
    long_id, long_referee = "e" * 256, "  " + "p" * 256 + "  "  # trimming comes before the cap
    response = kit.send("registered", token, long_id, referee_identity=long_referee)
    status, body = reply(response)
    assert (status, body["state"]) == (200, "registered")
    assert kit.store.referral(body["referral_id"])["referee_identity"] == "p" * 256
    assert log_rows(kit)[0]["server_event_id"] == long_id


def test_strings_are_trimmed_before_checks_and_stored_trimmed(kit):
    token, referral_id = kit.store.mint_referral(kit.server_id, "alice")
    body = {"event": " registered ", "token": f"  {token}\n", "server_id": "\tsrv_123 ",
            "server_event_id": " reg-1 ", "referee_identity": "  player-7842  "}
    assert reply(kit.post(body)) == ok(referral_id=referral_id, state="registered")
    assert kit.store.referral(referral_id)["referee_identity"] == "player-7842"
    assert log_rows(kit)[0]["server_event_id"] == "reg-1"
    # the trimmed key is the idempotency key
    assert reply(kit.send("registered", token, "reg-1")) == ok(duplicate=True)


def test_unknown_extra_fields_are_accepted(kit):
    token, referral_id = kit.store.mint_referral(kit.server_id, "alice")
    response = kit.send("registered", token, "reg-1", campaign="spring", extra={"nested": [1, 2, None]})
    assert reply(response) == ok(referral_id=referral_id, state="registered")


@pytest.mark.parametrize("referee", [..., None, "", 42, ["x"], {"a": "\ud800"}, "\ud800", "r" * 300],
                         ids=["absent", "null", "empty", "number", "list", "surrogate-inside", "surrogate",
                              "too-long"])
def test_referee_identity_ignored_on_other_events(kit, referee):
    token, referral_id = kit.store.mint_referral(kit.server_id, "alice")
    assert reply(register(kit, token)) == ok(referral_id=referral_id, state="registered")
    response = kit.send("qualified", token, "qua-1", referee_identity=referee)
    assert reply(response) == ok(referral_id=referral_id, state="qualified")


@pytest.mark.parametrize("extra, field", [
    ({"token": "\ud800"}, "token"),
    ({"server_id": "\ud800"}, "server_id"),
    ({"server_event_id": "ok\udfff"}, "server_event_id"),
    ({"referee_identity": "\ud800"}, "referee_identity"),
    ({"note": "\ud800"}, "note"),
    ({"note": {"deep": ["\udc00"]}}, "note"),
    ({"\ud800": 1}, "\ud800"),
], ids=["token", "server_id", "server_event_id", "referee", "extra", "nested", "key"])
def test_lone_surrogates_are_invalid(shared, extra, field):
    body = raw(registered_body(shared, **extra))
    assert b"\\ud" in body  # json.dumps writes the lone surrogate as an escape
    assert reply(shared.post(body)) == error(400, "invalid field", field=field)


@pytest.mark.parametrize("body, field", [
    (b'{"event":"registered","event":"qualified","token":"t","server_id":"srv_123","server_event_id":"e",'
     b'"referee_identity":"p"}', "event"),
    (b'{"event":"registered","token":"t","server_id":"srv_123","server_event_id":"e","referee_identity":"p",'
     b'"meta":{"a":1,"a":2}}', "a"),
    (b'{"event":"registered","token":"t","server_id":"srv_123","server_id":"srv_123","server_event_id":"e",'
     b'"referee_identity":"p"}', "server_id"),
], ids=["top-level", "nested", "same-value-twice"])
def test_duplicate_keys(shared, body, field):
    assert reply(shared.post(body)) == error(400, "duplicate key", field=field)


VALID_PREFIX = b'{"event":"registered","token":"t","server_id":"srv_123","server_event_id":"e","referee_identity":"p",'
NOT_JSON_BODIES = {
    "non-utf8": VALID_PREFIX + b'"note":"caf\xe9"}',
    "utf16": '{"event":"registered"}'.encode("utf-16"),
    "utf8-bom": b"\xef\xbb\xbf" + VALID_PREFIX + b'"note":1}',
    "encoded-surrogate": VALID_PREFIX + b'"note":"\xed\xa0\x80"}',
    "60000-open-brackets": b"[" * 60000,
    "5000-levels-in-valid-object": VALID_PREFIX + b'"deep":' + b"[" * 5000 + b"]" * 5000 + b"}",
    "5000-digit-number": VALID_PREFIX + b'"big":' + b"7" * 5000 + b"}",
    "5000-digit-ts": VALID_PREFIX + b'"ts":' + b"7" * 5000 + b"}",
    "empty": b"",
    "trailing-garbage": VALID_PREFIX + b'"x":1} {}',
    "single-quotes": b"{'event': 'registered'}",
}


@pytest.mark.parametrize("body", NOT_JSON_BODIES.values(), ids=NOT_JSON_BODIES.keys())
def test_bodies_that_are_not_json(shared, body):
    assert reply(shared.post(body)) == error(400, "body is not valid JSON")


@pytest.mark.parametrize("body", [b"[]", b'[{"event":"registered"}]', b'"registered"', b"42", b"null", b"true"])
def test_body_must_be_an_object(shared, body):
    assert reply(shared.post(body)) == error(400, "body must be a JSON object")


# Secret rotation (docs/contract.md §1.2, §4) #################################


def as_test(kit, secret, kid=None):
    return reply(kit.post(dry_run(kit), secret=secret, kid=kid))


MISMATCH = error(401, "bad_signature", reason="mac_mismatch")
UNKNOWN_KID = error(401, "bad_signature", reason="unknown_kid")


def test_rotation_keeps_both_secrets_during_grace(kit, clock):
    old_secret, old_kid = kit.secret, kit.kid
    new_secret, new_kid = kit.store.rotate_secret(kit.server_id, grace=3600)
    assert new_secret != old_secret and new_kid != old_kid
    assert as_test(kit, old_secret) == TEST_OK
    assert as_test(kit, new_secret) == TEST_OK
    assert as_test(kit, old_secret, kid=old_kid) == TEST_OK
    assert as_test(kit, new_secret, kid=new_kid) == TEST_OK
    assert as_test(kit, old_secret, kid=new_kid) == MISMATCH   # kid names the one secret to use
    assert as_test(kit, new_secret, kid=old_kid) == MISMATCH
    clock.t += 3599
    assert as_test(kit, old_secret) == TEST_OK
    clock.t += 2
    assert as_test(kit, old_secret) == MISMATCH
    assert as_test(kit, old_secret, kid=old_kid) == UNKNOWN_KID
    assert as_test(kit, new_secret) == TEST_OK


def test_rotation_with_grace_zero_via_cli_revokes_at_once(kit, runner, clock):
    result = runner("rotate-secret", kit.server_id, "--grace", "0", "--json")
    assert result.exit_code == 0, result.stderr
    new = result.json()
    assert set(new) == {"secret", "kid"}
    assert as_test(kit, kit.secret) == MISMATCH
    assert as_test(kit, new["secret"]) == TEST_OK
    assert as_test(kit, new["secret"], kid=new["kid"]) == TEST_OK


def test_second_rotation_inside_grace_revokes_the_oldest(kit, clock):
    second, _ = kit.store.rotate_secret(kit.server_id, grace=3600)
    clock.t += 10
    third, _ = kit.store.rotate_secret(kit.server_id, grace=3600)
    assert as_test(kit, kit.secret) == MISMATCH
    assert as_test(kit, second) == TEST_OK
    assert as_test(kit, third) == TEST_OK


def test_unknown_kid(shared):
    assert as_test(shared, shared.secret, kid="k_nothere") == UNKNOWN_KID


# Test mode, duplicates, 422 and idempotency (docs/contract.md §1.4, §2) ######


def test_test_mode_writes_nothing(kit, runner):
    token, referral_id = kit.store.mint_referral(kit.server_id, "alice")
    assert reply(kit.send("registered", token, "reg-1", test=True)) == TEST_OK
    assert log_rows(kit) == []
    assert runner("log", kit.server_id, "--json").json() == []
    assert kit.store.referral(referral_id)["state"] == "clicked"
    assert rejected(kit.server_id, kit.store) == []
    # the dry run consumed no idempotency key
    assert reply(kit.send("registered", token, "reg-1")) == ok(referral_id=referral_id, state="registered")
    assert reply(kit.send("registered", token, "reg-1", test=False)) == ok(duplicate=True)


def test_duplicate_writes_nothing(kit, runner):
    token, referral_id = kit.store.mint_referral(kit.server_id, "alice")
    assert reply(register(kit, token)) == ok(referral_id=referral_id, state="registered")
    assert reply(kit.send("qualified", token, "qua-1")) == ok(referral_id=referral_id, state="qualified")
    # the same key again, even with another body, after the referral moved on
    assert reply(register(kit, token)) == ok(duplicate=True)
    assert reply(register(kit, token, referee="someone-else")) == ok(duplicate=True)
    assert reply(kit.send("qualified", token, "qua-1", ts=5)) == ok(duplicate=True)
    rows = runner("log", kit.server_id, "--json").json()
    assert [(row["event"], row["outcome"], row["server_event_id"]) for row in rows] == [
        ("qualified", "advanced", "qua-1"), ("registered", "advanced", "reg-1")]
    assert rejected(kit.server_id, kit.store) == []


def test_key_is_token_event_and_server_event_id(kit):
    token, referral_id = kit.store.mint_referral(kit.server_id, "alice")
    assert reply(register(kit, token, event_id="same")) == ok(referral_id=referral_id, state="registered")
    assert reply(kit.send("qualified", token, "same")) == ok(referral_id=referral_id, state="qualified")
    assert len(log_rows(kit)) == 2


def test_422_consumes_no_key_and_writes_no_log_row(kit, runner):
    token, referral_id = kit.store.mint_referral(kit.server_id, "alice")
    early = kit.send("qualified", token, "qua-1")
    assert reply(early) == error(422, "invalid transition", state="clicked", event="qualified")
    assert log_rows(kit) == []
    assert reply(register(kit, token)) == ok(referral_id=referral_id, state="registered")
    assert reply(kit.send("qualified", token, "qua-1")) == ok(referral_id=referral_id, state="qualified")
    rows = runner("log", kit.server_id, "--json").json()
    assert [(row["event"], row["outcome"], row["state"]) for row in rows] == [
        ("qualified", "advanced", "qualified"), ("registered", "advanced", "qualified")]
    assert rows[0]["received_at"].endswith("Z") and rows[0]["referral_id"] == referral_id


# State machine (docs/contract.md §2) #########################################


def ttl_of(kit):
    return kit.client.application.config["MMOREF_TOKEN_TTL"]


def referral_in(kit, state):
    """(token, referral_id) of a referral brought to `state` for referee player-7842."""
    issued_at = mm.now() - ttl_of(kit) - 1 if state == "expired" else None
    token, referral_id = kit.store.mint_referral(kit.server_id, "alice", issued_at=issued_at)
    steps = {"clicked": [], "registered": ["registered"], "qualified": ["registered", "qualified"],
             "reversed": ["registered", "qualified", "reversed"], "rejected": ["registered"],
             "expired": []}[state]
    for number, event in enumerate(steps):
        assert reply(kit.send(event, token, f"setup-{number}"))[0] == 200
    if state == "rejected":
        assert mm.owner_action(kit.store, referral_id, "reject") == "rejected"
    if state == "expired":  # the first event detects the expiry and stores it
        status, body = reply(kit.send("qualified", token, "setup-expiry"))
        assert (status, body["state"]) == (422, "expired")
    assert kit.store.referral(referral_id)["state"] == state
    return token, referral_id


ADVANCED, NO_OP, INVALID = "advanced", "no_op", "invalid"
TABLE = {  # (state, event): (what happens, the state answered)
    ("clicked", "registered"): (ADVANCED, "registered"),
    ("clicked", "qualified"): (INVALID, "clicked"),
    ("clicked", "reversed"): (INVALID, "clicked"),
    ("registered", "registered"): (NO_OP, "registered"),
    ("registered", "qualified"): (ADVANCED, "qualified"),
    ("registered", "reversed"): (ADVANCED, "reversed"),
    ("qualified", "registered"): (NO_OP, "qualified"),
    ("qualified", "qualified"): (NO_OP, "qualified"),
    ("qualified", "reversed"): (ADVANCED, "reversed"),
    ("reversed", "registered"): (INVALID, "reversed"),
    ("reversed", "qualified"): (INVALID, "reversed"),
    ("reversed", "reversed"): (NO_OP, "reversed"),
    ("expired", "registered"): (INVALID, "expired"),
    ("expired", "qualified"): (INVALID, "expired"),
    ("expired", "reversed"): (INVALID, "expired"),
    ("rejected", "registered"): (INVALID, "rejected"),
    ("rejected", "qualified"): (INVALID, "rejected"),
    ("rejected", "reversed"): (INVALID, "rejected"),
}


@pytest.mark.parametrize("state, event", TABLE.keys(), ids=[f"{s}-{e}" for s, e in TABLE])
def test_transition_table(kit, state, event):
    token, referral_id = referral_in(kit, state)
    rows_before = len(log_rows(kit))
    kind, answered = TABLE[state, event]
    response = kit.send(event, token, "cell-1")
    if kind == INVALID:
        assert reply(response) == error(422, "invalid transition", state=answered, event=event)
        assert kit.store.referral(referral_id)["state"] == state
        assert len(log_rows(kit)) == rows_before
        return
    assert reply(response) == ok(referral_id=referral_id, state=answered)
    assert kit.store.referral(referral_id)["state"] == answered
    newest = log_rows(kit)[0]
    assert len(log_rows(kit)) == rows_before + 1
    assert (newest["event"], newest["outcome"], newest["server_event_id"], newest["referral_id"]) == (
        event, kind, "cell-1", referral_id)


@pytest.mark.parametrize("state", ["registered", "qualified"])
def test_registered_again_for_another_referee_is_422(kit, state):
    token, referral_id = referral_in(kit, state)
    response = register(kit, token, event_id="reg-other", referee="player-9999")
    assert reply(response) == error(422, "invalid transition", state=state, event="registered")
    assert kit.store.referral(referral_id)["referee_identity"] == "player-7842"


def test_first_touch_conflict_changes_nothing(kit):
    first_token, first_id = kit.store.mint_referral(kit.server_id, "alice")
    rival_token, rival_id = kit.store.mint_referral(kit.server_id, "bob")
    assert reply(register(kit, first_token)) == ok(referral_id=first_id, state="registered")
    assert reply(register(kit, rival_token, event_id="reg-rival")) == ok(ignored="first_touch_conflict")
    assert kit.store.referral(first_id)["state"] == "registered"
    assert kit.store.referral(rival_id)["state"] == "clicked"
    assert kit.store.referral(rival_id)["referee_identity"] is None
    newest = log_rows(kit)[0]
    assert (newest["outcome"], newest["referral_id"], newest["server_event_id"]) == (
        "first_touch_conflict", rival_id, "reg-rival")
    assert reply(register(kit, rival_token, event_id="reg-rival")) == ok(duplicate=True)


def test_same_referrer_second_click_answers_with_the_anchor(kit, runner):
    first_token, first_id = kit.store.mint_referral(kit.server_id, "alice")
    second_token, second_id = kit.store.mint_referral(kit.server_id, "alice")
    assert reply(register(kit, first_token)) == ok(referral_id=first_id, state="registered")
    assert reply(kit.send("qualified", first_token, "qua-1")) == ok(referral_id=first_id, state="qualified")
    response = register(kit, second_token, event_id="reg-again")
    assert reply(response) == ok(referral_id=first_id, state="qualified")
    assert kit.store.referral(second_id)["state"] == "clicked"
    newest = runner("log", kit.server_id, "--json").json()[0]
    assert (newest["outcome"], newest["referral_id"], newest["server_event_id"]) == ("no_op", first_id, "reg-again")
    # its idempotency key is the request's own token
    assert reply(register(kit, second_token, event_id="reg-again")) == ok(duplicate=True)
    assert reply(register(kit, first_token, event_id="reg-again")) == ok(referral_id=first_id, state="qualified")


@pytest.mark.parametrize("end", ["reversed-event", "owner-reverse", "owner-reject"])
def test_first_touch_is_forever(kit, end):
    token, anchor_id = kit.store.mint_referral(kit.server_id, "alice")
    assert reply(register(kit, token))[0] == 200
    if end == "reversed-event":
        assert reply(kit.send("reversed", token, "rev-1")) == ok(referral_id=anchor_id, state="reversed")
    else:
        mm.owner_action(kit.store, anchor_id, {"owner-reverse": "reverse", "owner-reject": "reject"}[end])
    final = kit.store.referral(anchor_id)["state"]
    assert final == ("rejected" if end == "owner-reject" else "reversed")
    rival_token, rival_id = kit.store.mint_referral(kit.server_id, "bob")
    assert reply(register(kit, rival_token, event_id="reg-rival")) == ok(ignored="first_touch_conflict")
    assert kit.store.referral(rival_id)["state"] == "clicked"
    again_token, _ = kit.store.mint_referral(kit.server_id, "alice")
    assert reply(register(kit, again_token, event_id="reg-again")) == ok(referral_id=anchor_id, state=final)


def test_expiry_is_detected_and_stored(kit, clock):
    ttl = ttl_of(kit)
    token, referral_id = kit.store.mint_referral(kit.server_id, "alice", issued_at=clock.t - ttl - 1)
    assert reply(register(kit, token)) == error(422, "invalid transition", state="expired", event="registered")
    assert kit.store.referral(referral_id)["state"] == "expired"
    assert log_rows(kit) == []
    assert reply(register(kit, token, event_id="reg-2")) == error(
        422, "invalid transition", state="expired", event="registered")


def test_token_at_exactly_its_lifetime_still_works(kit, clock):
    token, referral_id = kit.store.mint_referral(kit.server_id, "alice", issued_at=clock.t - ttl_of(kit))
    assert reply(register(kit, token)) == ok(referral_id=referral_id, state="registered")


def test_expiry_uses_the_current_ttl_setting(tmp_path, clock):
    app = mm.create_app({"MMOREF_DB": str(tmp_path / "short.db"), "MMOREF_TOKEN_TTL": 100})
    with app.app_context():
        kit = Kit(app.test_client(), mm.get_store())
    old_token, _ = kit.store.mint_referral(kit.server_id, "alice", issued_at=clock.t - 101)
    fresh_token, fresh_id = kit.store.mint_referral(kit.server_id, "alice", issued_at=clock.t - 99)
    assert reply(register(kit, old_token))[1]["state"] == "expired"
    assert reply(register(kit, fresh_token, referee="p2")) == ok(referral_id=fresh_id, state="registered")


def test_expiry_applies_only_to_clicked_referrals(kit, clock):
    token, referral_id = kit.store.mint_referral(kit.server_id, "alice")
    assert reply(register(kit, token))[0] == 200
    clock.t += ttl_of(kit) + 10
    assert reply(kit.send("qualified", token, "qua-1")) == ok(referral_id=referral_id, state="qualified")


def test_token_of_another_server_is_unknown(kit):
    kit.store.add_server("srv_other", "mygame")
    foreign = kit.token(server_id="srv_other")
    assert reply(register(kit, foreign)) == error(404, "unknown token")


@pytest.mark.parametrize("mangle", [
    lambda t: "forged-token",
    lambda t: t[:-1] + ("A" if t[-1] != "A" else "B"),
    lambda t: t[:-5],
    lambda t: t + "x",
    lambda t: "x" + t,
    lambda t: t.replace(".", "", 1),
], ids=["made-up", "last-char", "truncated", "appended", "prepended", "dot-removed"])
def test_forged_or_garbled_token_is_unknown(kit, mangle):
    token = kit.token()
    mangled = mangle(token)
    assert mangled != token
    assert reply(register(kit, mangled)) == error(404, "unknown token")
    assert log_rows(kit) == []


# Rejected requests (docs/contract.md §4) #####################################


def test_rejections_are_recorded_with_reason_and_hint(kit):
    token = kit.token()
    kit.post(kit.body("registered", token, "e-400"), header="")
    kit.post(kit.body("registered", token, "e-401"), secret="not-the-secret")
    kit.send("registered", "forged", "e-404")
    kit.send("qualified", token, "e-422")
    rows = rejected(kit.server_id, kit.store)
    assert [(row["status"], row["error"], row["reason"]) for row in rows] == [
        (422, "invalid transition", None), (404, "unknown token", None),
        (401, "bad_signature", "mac_mismatch"), (400, "missing signature header", None)]
    assert all(row["hint"] and row["snippet"] for row in rows)
    assert all(event_id in row["snippet"] for row, event_id in zip(rows, ["e-422", "e-404", "e-401", "e-400"]))
    assert rejected(None, kit.store) == []


@pytest.mark.parametrize("body, expected", [
    (b'{"event":"registered","token":"t","server_id":"nope","server_event_id":"e","referee_identity":"p"}',
     error(404, "unknown server")),
    (b'{"event":"registered","server_id":"nope"}', error(400, "missing field", field="token")),
    (b'{"server_id":"srv_123",', error(400, "body is not valid JSON")),
    (b"[]", error(400, "body must be a JSON object")),
    (b'{"event":"registered","token":"t","server_id":123}', error(400, "invalid field", field="server_id")),
], ids=["unknown-server", "missing-field", "invalid-json", "array", "server-id-number"])
def test_bodies_naming_no_known_server_go_installation_wide(kit, body, expected):
    assert reply(kit.post(body)) == expected
    status, answer = expected
    assert [(row["status"], row["error"]) for row in rejected(None, kit.store)] == [(status, answer["error"])]
    assert rejected(kit.server_id, kit.store) == []


def test_snippet_masks_the_token(kit):
    token = kit.token()
    kit.send("qualified", token, "qua-1")
    snippet = rejected(kit.server_id, kit.store)[0]["snippet"]
    assert token not in snippet
    assert token[:4] + "…" in snippet
    assert token[4:24] not in snippet


@pytest.mark.parametrize("shape, status", [("valid-json", 401), ("invalid-json", 400), ("unknown-server", 404),
                                           ("straddling-the-cut", 401)])
def test_snippet_never_contains_a_secret(kit, shape, status):
    other_secret, _ = kit.store.add_server("srv_other", "mygame")  # any secret of the installation
    body = kit.body("registered", kit.token(), "e1", note=f"my secret is {kit.secret}", also=other_secret)
    if shape == "unknown-server":
        body["server_id"] = "nope"
    elif shape == "straddling-the-cut":  # the snippet keeps 300 characters; this secret starts at 280
        body = {"pad": "p" * 259, "note": kit.secret, **kit.body("registered", kit.token(), "e1")}
        assert raw(body).index(kit.secret.encode()) == 280
    sent = raw(body)[:-1] + b",}" if shape == "invalid-json" else raw(body)
    assert reply(kit.post(sent, secret="not-the-secret"))[0] == status
    rows = rejected(kit.server_id, kit.store) + rejected(None, kit.store)
    assert len(rows) == 1
    assert "[secret]" in rows[0]["snippet"]
    for secret in (kit.secret, other_secret):
        assert secret[:12] not in rows[0]["snippet"] and secret[-12:] not in rows[0]["snippet"]
        assert secret not in json.dumps(dict(rows[0]))


def test_diagnosis_trailing_newline(kit, clock):
    body = raw(dry_run(kit))
    header = mm.signature_header(kit.secret, body)
    response = kit.post(body + b"\n", header=header)
    assert reply(response) == MISMATCH
    assert "trailing newline" in rejected(kit.server_id, kit.store)[0]["diagnosis"]
    assert "without its trailing newline" in response.get_json()["hint"]


def test_diagnosis_header_t_differs_from_body_ts(kit, clock):
    body = raw(dry_run(kit, ts=clock.t - 7))
    header = f"t={clock.t},v1=sha256={mm.sign(kit.secret, clock.t - 7, body)}"
    assert reply(kit.post(body, header=header)) == MISMATCH
    assert "different t" in rejected(kit.server_id, kit.store)[0]["diagnosis"]


def test_diagnosis_names_a_header_t_that_differs_from_the_body_ts(kit, clock):
    """Even when nothing else explains the mismatch (here: a wrong secret), docs/contract.md §4 asks to say so."""
    body = raw(dry_run(kit, ts=clock.t - 60))
    response = kit.post(body, secret="not-the-secret", t=clock.t)
    assert reply(response) == MISMATCH
    expected = f"the header's t ({clock.t}) differs from the body's ts ({clock.t - 60})"
    assert expected in rejected(kit.server_id, kit.store)[0]["diagnosis"]
    assert expected in response.get_json()["hint"]


def test_diagnosis_revoked_secret(kit, clock):
    kit.store.rotate_secret(kit.server_id, grace=0)
    assert as_test(kit, kit.secret) == MISMATCH
    assert "revoked" in rejected(kit.server_id, kit.store)[0]["diagnosis"]


def test_plain_wrong_secret_has_no_diagnosis(kit):
    assert as_test(kit, "not-the-secret") == MISMATCH
    assert rejected(kit.server_id, kit.store)[0]["diagnosis"] is None


def test_rejected_list_stays_at_its_cap(kit, monkeypatch):
    """Refusals that differ (here in the t/ts diagnosis): the most recently seen 200 are kept."""
    monkeypatch.setattr(mm, "REJECTIONS_PER_CLIENT_MINUTE", 10_000)  # one test client sends them all
    cap, sent = mm.REJECTED_KEPT_PER_SERVER, mm.REJECTED_KEPT_PER_SERVER + 30
    assert cap == 200
    t = mm.now()
    for number in range(sent):
        body = kit.body("registered", "t", f"bad-{number}", ts=t - 1 - number)
        assert kit.post(body, secret="not-the-secret", t=t).status_code == 401
    rows = rejected(kit.server_id, kit.store)
    assert len(rows) == cap
    assert f'"bad-{sent - 1}"' in rows[0]["snippet"]
    assert f'"bad-{sent - cap}"' in rows[-1]["snippet"]


@pytest.mark.parametrize("server_id", ["srv_123", None])
def test_identical_refusals_share_one_row(kit, server_id):
    sent = mm.REJECTIONS_PER_CLIENT_MINUTE
    for number in range(sent):
        body = kit.body("registered", "t", f"bad-{number}", server_id=server_id or "nope")
        assert kit.post(body, header="").status_code == 400
    rows = rejected(server_id, kit.store)
    assert [row["repeats"] for row in rows] == [sent]
    assert f'"bad-{sent - 1}"' in rows[0]["snippet"]


def test_accepted_duplicate_and_test_events_are_not_rejections(kit):
    token = kit.token()
    assert reply(register(kit, token))[1]["state"] == "registered"
    assert reply(register(kit, token)) == ok(duplicate=True)
    assert reply(kit.send("qualified", token, "qua-1", test=True)) == TEST_OK
    assert reply(kit.client.get(INGEST))[0] == 405  # only 400/401/404/422 are listed
    assert reply(kit.post(kit.body("qualified", token, "qua-2", pad="x" * mm.MAX_BODY_BYTES)))[0] == 413
    assert rejected(kit.server_id, kit.store) == [] and rejected(None, kit.store) == []


# Logging ######################################################################


def test_one_log_line_per_request_and_no_secret_or_token(kit, client, caplog):
    caplog.set_level(logging.INFO, logger="mmoref")
    token = kit.token()
    requests = [
        (lambda: register(kit, token), 200),
        (lambda: register(kit, token), 200),                                   # duplicate
        (lambda: kit.send("qualified", token, "q", test=True), 200),           # test
        (lambda: kit.post(kit.body("qualified", token, "q"), header=""), 400),
        (lambda: kit.post(kit.body("qualified", token, "q"), secret="wrong"), 401),
        (lambda: kit.send("qualified", "forged", "q"), 404),
        (lambda: client.get(INGEST), 405),
        (lambda: kit.post({"pad": "x" * mm.MAX_BODY_BYTES}), 413),
        (lambda: kit.send("reversed", kit.token(), "r", note=kit.secret), 422),
    ]
    for send, status in requests:
        caplog.clear()
        assert send().status_code == status
        records = [record for record in caplog.records if record.name.startswith("mmoref")]
        assert len(records) == 1, [record.getMessage() for record in records]
        assert f"status={status}" in records[0].getMessage()
        if status not in (405, 413):  # answered before the body is read: no server to name
            assert f"server={kit.server_id}" in records[0].getMessage()
        everything = caplog.text + " ".join(record.getMessage() for record in caplog.records)
        assert kit.secret not in everything
        assert token not in everything and token[4:20] not in everything
