"""docs/contract.md §4: the delivery log (paging, filters, search, masking, escaping), an event's detail page,
the owner's reverse/reject actions, the CSV export and the rejected-requests lists."""
from __future__ import annotations

import csv
import io
import json
from typing import Any
from urllib.parse import urlencode

import pytest

import mmoref_server as mm
from tests.support import ISO_UTC
from tests.support import KIT_GAME
from tests.support import KIT_SERVER_ID
from tests.support import KIT_TAB
from tests.support import Doc
from tests.support import Owner
from tests.support import detail_table
from tests.support import event_ids
from tests.support import location
from tests.support import log_rows
from tests.support import rejected_rows
from tests.support import send_ok
from tests.support import signed_post
from tests.support import snapshot

pytestmark = pytest.mark.both_engines  # the same on SQLite and on PostgreSQL

XSS = "<img src=x onerror=alert(1)>"
CSV_HEADER = ["id", "received_at", "event", "outcome", "state", "referral_id", "referrer_code",
              "referee_identity", "server_event_id"]


# Delivery log ##################################################################

def test_delivery_log_shows_current_state_newest_first(owner: Owner, kit: Any) -> None:
    alice, bob = kit.token("alice"), kit.token("bob")
    send_ok(kit, "registered", alice, "a-reg")
    assert send_ok(kit, "registered", bob, "b-reg") == {"ok": True, "ignored": "first_touch_conflict"}
    send_ok(kit, "registered", alice, "a-reg-again")
    assert send_ok(kit, "registered", alice, "a-reg") == {"ok": True, "duplicate": True}  # adds no row
    send_ok(kit, "qualified", alice, "a-q")

    rows = log_rows(owner.page(KIT_TAB))
    assert [(r["server_event_id"], r["event"], r["state"], r["outcome"], r["referrer"]) for r in rows] == [
        ("a-q", "qualified", "qualified", "advanced", "alice"),
        ("a-reg-again", "registered", "qualified", "no_op", "alice"),
        ("b-reg", "registered", "clicked", "first_touch_conflict", "bob"),
        ("a-reg", "registered", "qualified", "advanced", "alice"),  # registered then, qualified now
    ]
    assert [r["id"] for r in rows] == sorted((r["id"] for r in rows), reverse=True)
    assert all(ISO_UTC.fullmatch(r["received"]) for r in rows)


def pages_of(owner: Owner, first: str, link: str, limit: int = 5) -> list[Doc]:
    """The page at `first`, then the pages its `#older`/`#newer` links lead to (bounded)."""
    pages = [owner.page(first)]
    for _ in range(limit):
        if not pages[-1].has_id(link):
            break
        pages.append(owner.page(pages[-1].by_id(link).attrs["href"]))
    assert not pages[-1].has_id(link), "more pages than expected"
    return pages


def test_delivery_log_is_keyset_paged_by_50(owner: Owner, kit: Any) -> None:
    token = kit.token()
    for n in range(120):  # one advanced row, then 119 no-ops: one row per event
        kit_answer = kit.send("registered", token, f"ev-{n:03}")
        assert kit_answer.status_code == 200
    expected = [f"ev-{n:03}" for n in reversed(range(120))]

    older = pages_of(owner, KIT_TAB, "older")
    assert [len(log_rows(page)) for page in older] == [50, 50, 20]
    assert [event_id for page in older for event_id in event_ids(page)] == expected  # no overlap, no gap
    assert not older[0].has_id("newer")

    newer = pages_of(owner, older[-1].by_id("newer").attrs["href"], "newer")
    assert [event_ids(page) for page in newer] == [event_ids(older[1]), event_ids(older[0])]

    filtered = pages_of(owner, f"{KIT_TAB}?outcome=no_op", "older")  # the links keep the filter
    assert all("outcome=no_op" in page.by_id("newer").attrs["href"] for page in filtered[1:])
    assert [event_id for page in filtered for event_id in event_ids(page)] == expected[:-1]


@pytest.fixture
def log_scenario(kit: Any) -> dict[str, str]:
    """alice registered and qualified; bob registered twice; carol hit first touch."""
    tokens = {code: kit.token(code) for code in ("alice", "bob", "carol")}
    send_ok(kit, "registered", tokens["alice"], "a-reg", referee_identity="p-alice")
    send_ok(kit, "registered", tokens["bob"], "b-reg", referee_identity="p-bob")
    send_ok(kit, "qualified", tokens["alice"], "a-q")
    send_ok(kit, "registered", tokens["bob"], "b-reg2", referee_identity="p-bob")
    send_ok(kit, "registered", tokens["carol"], "c-reg", referee_identity="p-alice")
    return tokens


LOG_QUERIES = [
    ({}, ["c-reg", "b-reg2", "a-q", "b-reg", "a-reg"]),
    ({"event": "qualified"}, ["a-q"]),
    ({"outcome": "no_op"}, ["b-reg2"]),
    ({"outcome": "first_touch_conflict"}, ["c-reg"]),
    ({"q": "a-q"}, ["a-q"]),
    ({"q": "bob"}, ["b-reg2", "b-reg"]),
    ({"q": "alice", "event": "registered"}, ["a-reg"]),
    ({"q": "nobody"}, []),
    ({"event": "bogus", "outcome": "bogus"}, ["c-reg", "b-reg2", "a-q", "b-reg", "a-reg"]),
]


@pytest.mark.parametrize(("query", "expected"), LOG_QUERIES, ids=[urlencode(q) or "all" for q, _ in LOG_QUERIES])
def test_delivery_log_filters_and_search(owner: Owner, log_scenario: dict, query: dict, expected: list) -> None:
    page = owner.page(f"{KIT_TAB}?{urlencode(query)}")
    assert event_ids(page) == expected
    if not expected:
        assert page.by_id("delivery-log").one("tbody").text == "No events match these filters."
    assert page.by_id("f-q").attrs["value"] == query.get("q", "")


def test_search_merges_event_ids_and_referrer_codes_across_pages(owner: Owner, kit: Any) -> None:
    """"zed" is a referrer code and also another referral's server_event_id: both kinds of row
    match, merged newest first, and the older/newer links page through the merge."""
    zed, other = kit.token("zed"), kit.token("other")
    send_ok(kit, "registered", other, "o-reg", referee_identity="p-other")
    expected = []
    for n in range(110):  # zed's rows match by code; two of other's rows match by server_event_id
        send_ok(kit, "registered", zed, f"zed-{n:02}", referee_identity="p-zed")
        expected.append(f"zed-{n:02}")
        if n == 60:
            send_ok(kit, "qualified", other, "zed")
            expected.append("zed")
        send_ok(kit, "registered", other, f"o-{n:02}", referee_identity="p-other")  # matches neither
    send_ok(kit, "reversed", other, "zed")
    expected.append("zed")
    expected.reverse()

    older = pages_of(owner, f"{KIT_TAB}?q=zed", "older")
    assert [len(log_rows(page)) for page in older] == [50, 50, 12]
    assert [event_id for page in older for event_id in event_ids(page)] == expected
    newer = pages_of(owner, older[-1].by_id("newer").attrs["href"], "newer")
    assert [event_ids(page) for page in newer] == [event_ids(older[1]), event_ids(older[0])]


@pytest.mark.parametrize("token_key", ['"token"', '"\\u0074oken"'], ids=["plain-key", "escaped-key"])
def test_delivery_log_masks_referee_and_token(owner: Owner, kit: Any, token_key: str) -> None:
    identity = "player-with-a-rather-long-name"
    token = kit.token()
    raw = json.dumps(kit.body("registered", token, "e-1", referee_identity=identity)).replace('"token"', token_key)
    accepted = kit.post(raw.encode())
    assert accepted.status_code == 200 and accepted.get_json()["state"] == "registered"

    tab = owner.page(KIT_TAB)
    [row] = log_rows(tab)
    assert (row["referee"], row["token"]) == ("pl…me", token[:4] + "…")
    assert identity not in tab.raw and token not in tab.raw
    detail = owner.page(row["detail"])
    assert json.loads(detail.one("pre").raw_text)["token"] == token[:4] + "…"
    assert token not in detail.raw


def test_player_supplied_text_is_escaped_on_every_page(owner: Owner, kit: Any) -> None:
    token = kit.token()
    send_ok(kit, "registered", token, "<script>alert(2)</script>", referee_identity=XSS)
    ghost = {"event": "registered", "token": "t", "server_id": XSS, "server_event_id": "e", "referee_identity": XSS}
    assert kit.post(ghost).status_code == 404  # lands in the installation-wide list on /dashboard

    tab = owner.page(KIT_TAB)
    [row] = log_rows(tab)
    pages = {"tab": tab, "detail": owner.page(row["detail"]), "index": owner.page("/dashboard/"),
             "search": owner.page(f"{KIT_TAB}?{urlencode({'q': XSS})}")}
    for name, page in pages.items():
        assert "<img" not in page.raw and "<script>alert" not in page.raw, name
    assert row["server_event_id"] == "<script>alert(2)</script>"  # shown, as text
    assert detail_table(pages["detail"])["Referee"] == XSS
    assert "&lt;img src=x onerror=alert(1)&gt;" in pages["detail"].raw
    assert XSS in rejected_rows(pages["index"])[0]["snippet"]


def test_log_detail_shows_payload_history_and_actions(owner: Owner, kit: Any) -> None:
    token = kit.token("alice")
    referral_id = send_ok(kit, "registered", token, "e-reg")["referral_id"]
    send_ok(kit, "qualified", token, "e-q")
    registered_row = log_rows(owner.page(KIT_TAB))[1]

    page = owner.page(registered_row["detail"])
    assert page.one("h1").text == f"Event {registered_row['id']}: registered"
    details = detail_table(page)
    assert details["Outcome"] == "advanced" and details["server_event_id"] == "e-reg"
    assert ISO_UTC.fullmatch(details["Received"])
    assert details["Referral"] == f"{referral_id} (referrer alice)"
    assert page.by_id("referral-state").text == "qualified"
    payload = json.loads(page.one("pre").raw_text)
    assert payload["token"] == token[:4] + "…" and payload["server_event_id"] == "e-reg"
    assert token not in page.raw
    history = page.by_id("history").one("tbody").all("tr")   # (the header row is in <thead>)
    assert [(tr.attrs["data-event"], tr.attrs["data-outcome"]) for tr in history] == [
        ("registered", "advanced"), ("qualified", "advanced")]
    assert page.by_id("action-reverse").text == "Reverse referral"
    assert page.by_id("action-reject").text == "Reject referral"


def test_log_detail_of_another_servers_row_is_404(owner: Owner, kit: Any, store: Any, client: Any) -> None:
    other_secret, _ = store.add_server("srv_other", KIT_GAME)
    token, _ = store.mint_referral("srv_other", "alice")
    body = mm.build_body("registered", token, "srv_other", "e-1", referee_identity="p")
    assert signed_post(client, other_secret, body).status_code == 200
    [row] = log_rows(owner.page(f"/dashboard/{KIT_GAME}/srv_other/referrals"))
    assert owner.client.get(f"{KIT_TAB}/log/{row['id']}").status_code == 404


@pytest.mark.parametrize(("action", "state"), [("reverse", "reversed"), ("reject", "rejected")])
def test_owner_action_from_the_detail_page(owner: Owner, kit: Any, action: str, state: str) -> None:
    token = kit.token()
    referral_id = send_ok(kit, "registered", token, "e-reg")["referral_id"]
    detail_url = log_rows(owner.page(KIT_TAB))[0]["detail"]
    form = owner.page(detail_url).by_id(f"action-{action}").ancestor("form")
    back = form.one("input", name="back").attrs["value"]
    assert back == detail_url

    assert form.attrs["method"] == "get"  # final: the button only opens a page that asks first
    confirm = owner.client.get(form.attrs["action"], query_string={"back": back})
    assert confirm.status_code == 200 and kit.store.referral(referral_id)["state"] == "registered"
    page = owner.follow(owner.post(form.attrs["action"], back=back, confirmed="yes"))
    assert page.flashes == [f"Referral {referral_id} is now {state}."]
    assert page.by_id("referral-state").text == state
    assert not page.all("button", id=f"action-{action}")

    newest = log_rows(owner.page(KIT_TAB))[0]
    assert (newest["event"], newest["state"], newest["outcome"]) == (state, state, "owner_action")
    late = kit.send("qualified", token, "e-late")
    assert late.status_code == 422 and late.get_json()["state"] == state


@pytest.mark.parametrize(("steps", "action", "state"), [
    ([], "reverse", "clicked"),
    (["registered", "reversed"], "reject", "reversed"),
    (["registered", "reversed"], "reverse", "reversed"),
])
def test_owner_action_refused_when_not_allowed(owner: Owner, kit: Any, store: Any, steps: list, action: str,
                                               state: str) -> None:
    token, referral_id = store.mint_referral(KIT_SERVER_ID, "alice")
    for event in steps:
        send_ok(kit, event, token, f"e-{event}")
    rows_before = log_rows(owner.page(KIT_TAB))

    tab = owner.follow(owner.post(f"{KIT_TAB}/referral/{referral_id}/{action}", confirmed="yes"))
    assert tab.flashes == [f"cannot {action} referral {referral_id} in state '{state}'"
                           f" (only from {', '.join(mm.OWNER_ACTIONS[action][0])})"]
    assert log_rows(tab) == rows_before
    assert store.referral(referral_id)["state"] == state


def test_owner_action_checks_its_target(owner: Owner, kit: Any, registered: dict, store: Any, db_path: str) -> None:
    store.add_server("srv_other", KIT_GAME)
    before = snapshot(db_path)
    referral_id = registered["referral_id"]
    assert owner.post(f"{KIT_TAB}/referral/{referral_id}/delete").status_code == 404
    assert owner.post(f"{KIT_TAB}/referral/ref_nosuch/reverse").status_code == 404
    assert owner.post(f"/dashboard/{KIT_GAME}/srv_other/referrals/referral/{referral_id}/reverse").status_code == 404
    assert snapshot(db_path) == before
    # `back` may only lead back into this server's tab
    assert location(owner.post(f"{KIT_TAB}/referral/{referral_id}/reverse", back="https://evil.example/",
                               confirmed="yes")) == KIT_TAB


# CSV export ####################################################################

def read_csv(response: Any) -> list[list[str]]:
    assert response.status_code == 200
    assert response.mimetype == "text/csv"
    assert response.headers["Content-Disposition"] == f'attachment; filename="delivery-log-{KIT_SERVER_ID}.csv"'
    return list(csv.reader(io.StringIO(response.get_data(as_text=True))))


def test_csv_export_follows_the_filters(owner: Owner, log_scenario: dict) -> None:
    link = [a for a in owner.page(f"{KIT_TAB}?event=registered").all("a") if a.text == "Export CSV"][0]
    assert link.attrs["href"] == f"{KIT_TAB}/log.csv?event=registered"
    header, *rows = read_csv(owner.client.get(link.attrs["href"]))
    assert header == CSV_HEADER
    assert [row[8] for row in rows] == ["c-reg", "b-reg2", "b-reg", "a-reg"]
    assert [int(row[0]) for row in rows] == sorted((int(row[0]) for row in rows), reverse=True)
    assert {row[2] for row in rows} == {"registered"}
    assert rows[-1][3:5] == ["advanced", "qualified"]  # the referral's current state
    assert all(ISO_UTC.fullmatch(row[1]) for row in rows)

    header, *everything = read_csv(owner.client.get(f"{KIT_TAB}/log.csv"))
    assert len(everything) == 5


@pytest.mark.parametrize("identity", ['=HYPERLINK("https://evil.example","x")', "+1+1", "-2+3", "@SUM(A1)",
                                      # fullwidth forms, which spreadsheets with East Asian input read as = + - @
                                      '＝HYPERLINK("https://evil.example","x")', "＋1+1", "－2+3", "＠SUM(A1)"])
def test_csv_neutralises_formulas(owner: Owner, kit: Any, identity: str) -> None:
    send_ok(kit, "registered", kit.token(), "e-1", referee_identity=identity)
    _, row = read_csv(owner.client.get(f"{KIT_TAB}/log.csv"))
    assert row[CSV_HEADER.index("referee_identity")] == "'" + identity


# Rejected requests #############################################################

def test_rejected_requests_with_reasons_and_diagnoses(owner: Owner, kit: Any) -> None:
    token, clicked = kit.token(), kit.token("bob")
    body = kit.body("registered", token, "e-1")
    raw = json.dumps(body).encode()
    assert kit.post(body, header="").status_code == 400
    assert kit.post(raw + b"\n", header=mm.signature_header(kit.secret, raw)).status_code == 401
    ts = mm.now() - 10
    raw_ts = json.dumps({**body, "ts": ts}).encode()
    assert kit.post(raw_ts, header=f"t={mm.now()},v1=sha256={mm.sign(kit.secret, ts, raw_ts)}").status_code == 401
    new_secret = owner.post_page(f"{KIT_TAB}/secret", grace="0").by_id("secret-value").text
    assert kit.post(body).status_code == 401  # still signed with the revoked secret
    assert kit.post(kit.body("qualified", clicked, "q-1"), secret=new_secret).status_code == 422

    tab = owner.page(KIT_TAB)
    rows = rejected_rows(tab)
    assert [(r["status"], r["error"], r["reason"]) for r in rows] == [
        (422, "invalid transition", ""),
        (401, "bad_signature", "mac_mismatch"),
        (401, "bad_signature", "mac_mismatch"),
        (401, "bad_signature", "mac_mismatch"),
        (400, "missing signature header", ""),
    ]
    assert [r["diagnosis"] for r in rows] == [
        None,
        "this MAC was made with a previous, revoked secret: use the current secret",
        "the MAC matches a different t (the body's ts): sign with the t you put in the header",
        "the MAC matches this body without its trailing newline: sign the exact bytes you send",
        None,
    ]
    assert "trailing newline" in rows[3]["diagnosis"] and "different t" in rows[2]["diagnosis"]
    assert "revoked secret" in rows[1]["diagnosis"]
    assert rows[0]["hint"] == mm.HINTS["invalid transition"].format(state="clicked", event="qualified")
    assert rows[1]["hint"].startswith(mm.HINTS["mac_mismatch"])
    assert rows[4]["hint"].startswith("send the X-MMOLove-Signature header")
    assert token not in tab.raw and clicked not in tab.raw  # snippets mask tokens
    assert kit.secret not in tab.raw and new_secret not in tab.raw


def test_a_request_naming_no_known_server_shows_on_the_index_only(owner: Owner, kit: Any) -> None:
    ghost = {"event": "registered", "token": "t", "server_id": "ghost", "server_event_id": "e",
             "referee_identity": "p"}
    answer = kit.post(ghost)
    assert answer.status_code == 404 and answer.get_json()["error"] == "unknown server"

    [row] = rejected_rows(owner.page("/dashboard/"))
    assert (row["status"], row["error"], row["hint"]) == (404, "unknown server", mm.HINTS["unknown server"])
    assert '"server_id": "ghost"' in row["snippet"]
    assert rejected_rows(owner.page(KIT_TAB)) == []
    assert "None." in owner.page(KIT_TAB).by_id("rejected").text


def test_secrets_appear_only_in_their_one_time_showing(owner: Owner, kit: Any, client: Any) -> None:
    old = kit.secret
    token = kit.token()
    send_ok(kit, "registered", token, "e-1", note=old)  # a secret pasted into a signed body
    pasted = {"note": old, **kit.body("registered", token, "e-2")}  # first: inside the shown snippet
    assert kit.post(pasted, header="").status_code == 400  # ... and into refused ones, named or not
    assert kit.post({**pasted, "server_id": "ghost"}, header="").status_code == 400
    assert owner.post_page(f"{KIT_TAB}/test-event").by_id("test-result").attrs["data-status"] == "200"
    rotated = owner.post_page(f"{KIT_TAB}/secret", grace="86400")
    new = rotated.by_id("secret-value").text
    assert old not in rotated.raw

    detail = log_rows(owner.page(KIT_TAB))[0]["detail"]
    pages = [owner.page(path) for path in ("/dashboard/", KIT_TAB, f"{KIT_TAB}?q=e-1", detail)]
    csv_text = owner.client.get(f"{KIT_TAB}/log.csv").get_data(as_text=True)
    for text in [page.raw for page in pages] + [csv_text]:
        assert old not in text and new not in text
    assert "[secret]" in rejected_rows(pages[0])[0]["snippet"]
    assert "[secret]" in rejected_rows(pages[1])[0]["snippet"]
