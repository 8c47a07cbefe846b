"""docs/contract.md §4: the servers list and a server's Referrals tab: add a server, enable, rotate the secret,
settings, the share link and test token, the "Send test event" button."""
from __future__ import annotations

import json
from typing import Any

import pytest

import mmoref_server as mm
from tests.support import KIT_GAME
from tests.support import KIT_REGISTRATION_URL
from tests.support import KIT_SERVER_ID
from tests.support import KIT_TAB
from tests.support import Owner
from tests.support import location
from tests.support import log_rows
from tests.support import rejected_rows
from tests.support import revoke_every_secret
from tests.support import selected
from tests.support import send_ok
from tests.support import snapshot

pytestmark = pytest.mark.both_engines  # the same on SQLite and on PostgreSQL

# Servers ########################################################################

def test_add_server_shows_its_secret_once(owner: Owner, client: Any) -> None:
    page = owner.post_page("/dashboard/servers", server_id="srv_new", game="g2", name="New World",
                           registration_url="https://new.example/join", identity_field="email")
    secret = page.by_id("secret-value").text
    kid = page.by_id("new-secret").one("p", class_="muted").text.removeprefix("kid ")
    assert secret.startswith("mmsk_") and kid.startswith("k_")
    assert page.one("tr", data_server="srv_new").all("a")[0].attrs["href"] == "/dashboard/g2/srv_new/referrals"

    body = mm.build_body("registered", "any-token", "srv_new", "t-1", referee_identity="p", test=True)
    check = client.post("/api/referral/events", data=body,
                        headers={mm.SIGNATURE_HEADER: mm.signature_header(secret, body, kid=kid)})
    assert check.status_code == 200 and check.get_json() == {"ok": True, "test": True}

    index, tab = owner.page("/dashboard/"), owner.page("/dashboard/g2/srv_new/referrals")
    assert secret not in index.raw and secret not in tab.raw
    assert not index.has_id("secret-value") and not tab.has_id("secret-value")
    assert [td.text for td in tab.by_id("secrets").one("tbody").all("tr")[0].all("td")][:2] == [kid, "…" + secret[-4:]]
    assert selected(tab.by_id("identity_field")) == ["email"]


@pytest.mark.parametrize(("form", "message"), [
    ({"server_id": "bad id!"}, "must be 1-64 characters of A-Z"),
    ({"game": "g/2"}, "must be 1-64 characters of A-Z"),
    ({"registration_url": "http://example.com/join"}, "must start with https://"),
    ({"server_id": KIT_SERVER_ID}, f"server '{KIT_SERVER_ID}' already exists"),
    ({"identity_field": "phone"}, "identity field must be one of"),
], ids=["bad-id", "bad-game", "http-url", "duplicate", "identity"])
def test_add_server_refuses_bad_input(owner: Owner, kit: Any, db_path: str, form: dict[str, str],
                                      message: str) -> None:
    before = snapshot(db_path)
    fields = {"server_id": "srv_new", "game": "g2", "registration_url": "https://new.example/join", **form}
    page = owner.post_page("/dashboard/servers", 400, **fields)
    assert message in page.one("p", role="alert").text
    assert not page.has_id("new-secret")
    assert page.by_id("server_id").attrs["value"] == fields["server_id"]  # the form keeps what was typed
    assert snapshot(db_path) == before
    assert [tr.attrs["data-server"] for tr in owner.page("/dashboard/").all("tr") if "data-server" in tr.attrs] \
        == [KIT_SERVER_ID]


@pytest.mark.parametrize("path", [
    f"/dashboard/othergame/{KIT_SERVER_ID}/referrals", f"/dashboard/{KIT_GAME}/nosuch/referrals",
    f"/dashboard/othergame/{KIT_SERVER_ID}/referrals/log/1", f"/dashboard/othergame/{KIT_SERVER_ID}/referrals/log.csv",
    f"{KIT_TAB}/log/999"])
def test_unknown_game_server_or_row_is_404(owner: Owner, registered: dict, path: str) -> None:
    response = owner.client.get(path)
    assert response.status_code == 404
    assert "Not Found" in response.get_data(as_text=True)


def test_a_form_for_a_server_of_another_game_is_404(owner: Owner, kit: Any, db_path: str) -> None:
    before = snapshot(db_path)
    assert owner.post(f"/dashboard/othergame/{KIT_SERVER_ID}/referrals/enabled", enabled="0").status_code == 404
    assert snapshot(db_path) == before


NAME_RULE = "1-64 characters: letters A-Z a-z, digits 0-9 and _ . - (not only dots)"


def test_every_input_with_a_pattern_says_what_it_allows(owner: Owner, kit: Any) -> None:
    for path, expected in (("/dashboard/", 2), (KIT_TAB, 0)):   # server id and game; the tab has none
        patterned = [node for node in owner.page(path).all("input") if "pattern" in node.attrs]
        assert len(patterned) == expected, [n.attrs for n in patterned]
        assert all(node.attrs.get("title") == NAME_RULE for node in patterned), [n.attrs for n in patterned]


def test_a_server_added_without_a_registration_url_says_its_share_link_is_404(owner: Owner, client: Any) -> None:
    page = owner.post_page("/dashboard/servers", server_id="srv_new", game="g2")
    assert page.by_id("no-registration-url").text == (
        "No registration URL yet: its share link answers 404 until you set one under Registration on its"
        " Referrals tab.")
    assert client.get("/r/srv_new?ref=alice").status_code == 404
    tab = owner.page("/dashboard/g2/srv_new/referrals")
    assert "answers 404 until you set one here" in tab.by_id("no-registration-url").text
    assert tab.by_id("no-registration-url").ancestor("section").attrs["id"] == "settings"

    saved = owner.post("/dashboard/g2/srv_new/referrals/settings", registration_url="https://new.example/join",
                       identity_field="username")
    assert location(saved) == "/dashboard/g2/srv_new/referrals"
    assert not owner.page("/dashboard/g2/srv_new/referrals").has_id("no-registration-url")
    assert client.get("/r/srv_new?ref=alice").status_code == 302
    added = owner.post_page("/dashboard/servers", server_id="srv_other", game="g2",
                            registration_url="https://new.example/join")
    assert added.has_id("new-secret") and not added.has_id("no-registration-url")


# Referrals tab: enable, secrets, settings, test token ###########################

def test_disabling_referrals_makes_ingest_answer_404(owner: Owner, kit: Any) -> None:
    token = kit.token()
    tab = owner.follow(owner.post(f"{KIT_TAB}/enabled", enabled="0"))
    assert tab.flashes == ["Referrals disabled: events now get 404 referrals not enabled."]
    assert tab.by_id("status").one("button").text == "Enable referrals"
    assert owner.page("/dashboard/").one("tr", data_server=KIT_SERVER_ID).all("td")[2].text == "off"
    refused = kit.send("registered", token, "e-1")
    assert refused.status_code == 404 and refused.get_json()["error"] == "referrals not enabled"

    tab = owner.follow(owner.post(f"{KIT_TAB}/enabled", enabled="1"))
    assert tab.flashes == ["Referrals enabled."]
    assert not tab.has_id("new-secret")  # the live secret is kept, not replaced
    assert tab.by_id("status").one("button").text == "Disable referrals"
    assert send_ok(kit, "registered", token, "e-1")["state"] == "registered"


def test_enabling_a_server_without_a_live_secret_mints_one_shown_once(owner: Owner, kit: Any, store: Any) -> None:
    revoke_every_secret(store, KIT_SERVER_ID)
    assert location(owner.post(f"{KIT_TAB}/enabled", enabled="0")) == KIT_TAB
    assert owner.page(KIT_TAB).by_id("secrets").all("button")[0].text == "Generate secret"

    page = owner.post_page(f"{KIT_TAB}/enabled", enabled="1")
    secret = page.by_id("secret-value").text
    kid = page.by_id("new-secret").one("p", class_="muted").text.removeprefix("kid ")
    assert secret.startswith("mmsk_") and secret != kit.secret
    token = kit.token()
    accepted = kit.post(kit.body("registered", token, "e-1"), secret=secret)
    assert accepted.status_code == 200 and accepted.get_json()["state"] == "registered"

    later = owner.page(KIT_TAB)
    assert secret not in later.raw and kid in later.by_id("secrets").text
    assert "…" + secret[-4:] in later.by_id("secrets").text


GRACES = [("0", False, "revoke now"), ("3600", True, "1 hour"), ("86400", True, "24 hours"),
          ("604800", True, "7 days")]


@pytest.mark.parametrize(("grace", "old_still_valid", "label"), GRACES, ids=[g[0] for g in GRACES])
def test_rotating_the_secret(clock: Any, owner: Owner, kit: Any, grace: str, old_still_valid: bool,
                             label: str) -> None:
    old = kit.secret
    page = owner.post_page(f"{KIT_TAB}/secret", grace=grace)
    new = page.by_id("secret-value").text
    new_kid = page.by_id("new-secret").one("p", class_="muted").text.removeprefix("kid ")
    assert new.startswith("mmsk_") and new != old
    assert page.by_id("previous-secret").text == (
        f"The previous secret stays valid for {label} (until {mm.iso_utc(clock.t + int(grace))})."
        if old_still_valid else "The previous secret is revoked.")

    token = kit.token()
    with_old = kit.post(kit.body("registered", token, "e-old"), secret=old)
    if old_still_valid:
        assert with_old.status_code == 200 and with_old.get_json()["state"] == "registered"
    else:
        assert with_old.status_code == 401 and with_old.get_json()["reason"] == "mac_mismatch"
    with_new = kit.post(kit.body("registered", token, "e-new"), secret=new)
    assert with_new.status_code == 200 and with_new.get_json()["state"] == "registered"

    later = owner.page(KIT_TAB)
    assert old not in later.raw and new not in later.raw
    rows = [[td.text for td in tr.all("td")] for tr in later.by_id("secrets").one("tbody").all("tr")]
    assert rows[0] == [new_kid, "…" + new[-4:], "current"]
    assert rows[1][:2] == [kit.kid, "…" + old[-4:]]
    assert rows[1][2].startswith("valid until") if old_still_valid else rows[1][2] == "revoked"


def test_an_unknown_grace_choice_is_refused(owner: Owner, kit: Any, db_path: str) -> None:
    before = snapshot(db_path)
    assert owner.post(f"{KIT_TAB}/secret", grace="5").status_code == 400
    assert snapshot(db_path) == before


@pytest.mark.parametrize("url", ["https://game.example/join", "http://localhost:8000/join",
                                 "http://127.0.0.1/join", "http://[::1]:5000/join"])
def test_registration_url_accepted(owner: Owner, kit: Any, client: Any, url: str) -> None:
    tab = owner.follow(owner.post(f"{KIT_TAB}/settings", registration_url=url, identity_field="username"))
    assert tab.flashes == ["Settings saved."]
    assert tab.by_id("registration_url").attrs["value"] == url
    assert location(client.get(f"/r/{KIT_SERVER_ID}?ref=bob")).startswith(url + "?mmref=")


@pytest.mark.parametrize("url", ["http://example.com/join", "http://localhost.example.com/join",
                                 "ftp://game.example/join", "javascript:alert(1)", "https://"])
def test_registration_url_refused(owner: Owner, kit: Any, url: str) -> None:
    tab = owner.follow(owner.post(f"{KIT_TAB}/settings", registration_url=url, identity_field="email"))
    assert len(tab.flashes) == 1 and "must start with https://" in tab.flashes[0]
    assert tab.by_id("registration_url").attrs["value"] == KIT_REGISTRATION_URL
    assert selected(tab.by_id("identity_field")) == ["username"]  # nothing saved


def test_identity_field_is_saved(owner: Owner, kit: Any) -> None:
    tab = owner.follow(owner.post(f"{KIT_TAB}/settings", registration_url=KIT_REGISTRATION_URL,
                                  identity_field="character"))
    assert tab.flashes == ["Settings saved."]
    assert selected(tab.by_id("identity_field")) == ["character"]

    tab = owner.follow(owner.post(f"{KIT_TAB}/settings", registration_url=KIT_REGISTRATION_URL, identity_field="phone"))
    assert tab.flashes == ["identity field must be one of username, account, character, email"]
    assert selected(tab.by_id("identity_field")) == ["character"]


def test_share_link_template_and_test_token(owner: Owner, kit: Any, client: Any) -> None:
    tab = owner.page(KIT_TAB)
    template = tab.by_id("share-link").attrs["value"]
    assert template == f"http://localhost/r/{KIT_SERVER_ID}?ref=PLAYERCODE"
    assert location(client.get(template.replace("PLAYERCODE", "carol"))).startswith(KIT_REGISTRATION_URL + "&mmref=")

    page = owner.post_page(f"{KIT_TAB}/token", ref="bob")
    token = page.by_id("token-value").text
    referral_id = page.by_id("new-token").one("h2").text.removeprefix("Test token for referral ")
    answer = send_ok(kit, "registered", token, "e-1")
    assert answer == {"ok": True, "referral_id": referral_id, "state": "registered"}
    assert token not in owner.page(KIT_TAB).raw  # shown once

    bad = owner.follow(owner.post(f"{KIT_TAB}/token", ref="not a code"))
    assert "must be 1-64 characters" in bad.flashes[0] and not bad.has_id("token-value")


# Send test event ###############################################################

def test_send_test_event_shows_the_answer_and_logs_nothing(owner: Owner, kit: Any) -> None:
    button = owner.page(KIT_TAB).by_id("send-test-event")
    assert button.raw_text == "Send test event" and "disabled" not in button.attrs

    page = owner.post_page(f"{KIT_TAB}/test-event")
    result = page.by_id("test-result")
    assert result.attrs["data-status"] == "200"
    assert result.one("p").text == "HTTP 200"
    shown = result.one("pre").raw_text
    assert '"ok": true' in shown and '"test": true' in shown
    assert json.loads(shown) == {"ok": True, "test": True}

    tab = owner.page(KIT_TAB)
    assert log_rows(tab) == [] and rejected_rows(tab) == []
    assert not tab.has_id("test-result")
    assert tab.by_id("funnel-clicked").text == "0"  # no referral was made either


def test_send_test_event_with_referrals_disabled_shows_the_404(owner: Owner, kit: Any) -> None:
    assert location(owner.post(f"{KIT_TAB}/enabled", enabled="0")) == KIT_TAB
    result = owner.post_page(f"{KIT_TAB}/test-event").by_id("test-result")
    assert result.attrs["data-status"] == "404" and result.one("p").text == "HTTP 404"
    assert json.loads(result.one("pre").raw_text) == {"ok": False, "error": "referrals not enabled",
                                                      "hint": mm.HINTS["referrals not enabled"]}


def test_send_test_event_goes_through_the_real_pipeline(owner: Owner, kit: Any, app: Any) -> None:
    app.config["MMOREF_REPLAY_WINDOW"] = -1  # no timestamp can pass: the pipeline's own check refuses
    result = owner.post_page(f"{KIT_TAB}/test-event").by_id("test-result")
    assert result.attrs["data-status"] == "401"
    answer = json.loads(result.one("pre").raw_text)
    assert (answer["error"], answer["reason"]) == ("bad_signature", "stale_timestamp")
    # handle_ingest remembered the refusal, as for any request to the HTTP route
    rejected = rejected_rows(owner.page(KIT_TAB))
    assert [(r["status"], r["error"], r["reason"]) for r in rejected] == [(401, "bad_signature", "stale_timestamp")]
    assert log_rows(owner.page(KIT_TAB)) == []


def test_send_test_event_without_a_live_secret_is_disabled(owner: Owner, kit: Any, store: Any) -> None:
    revoke_every_secret(store, KIT_SERVER_ID)
    section = owner.page(KIT_TAB).by_id("test-event")
    assert "disabled" in section.one("button").attrs
    assert "Generate a secret first: the test event is signed with it." in section.text

    tab = owner.follow(owner.post(f"{KIT_TAB}/test-event"))
    assert tab.flashes == ["Generate a secret first: the test event is signed with it."]
    assert not tab.has_id("test-result")
