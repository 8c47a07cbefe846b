"""The Referrals tab's forms after issue 7 and 8: post/redirect/get with results shown once, a
rotation made once per form, a confirm step before final owner actions, the "Connect your game
server" box, test tokens left out of analytics, the chart's empty state and dates, and the rows
that showed something twice."""
from __future__ import annotations

import datetime
import subprocess
from typing import Any

import pytest

import mmoref_server as mm
from tests.support import INGEST
from tests.support import KIT_SERVER_ID
from tests.support import KIT_TAB
from tests.support import Owner
from tests.support import location
from tests.support import log_rows
from tests.support import rejected_rows
from tests.support import revoke_every_secret
from tests.support import scalar
from tests.support import send_ok


def shown_secret(page: Any) -> str | None:
    return page.by_id("secret-value").text if page.has_id("secret-value") else None


def secret_count(db_path: str) -> int:
    return scalar(db_path, "SELECT count(*) FROM secrets WHERE server_id = ?", KIT_SERVER_ID)


# Post/redirect/get ##############################################################

def test_rotating_redirects_and_a_reload_neither_rotates_nor_shows_the_secret_again(owner: Owner, kit: Any,
                                                                                     db_path: str) -> None:
    form = owner.page(KIT_TAB).by_id("secrets").one("form")
    nonce = form.one("input", name="rotation").attrs["value"]
    response = owner.post(f"{KIT_TAB}/secret", grace="86400", rotation=nonce)
    assert location(response) == KIT_TAB  # the page a reload repeats is the tab, not the POST
    first = owner.page(KIT_TAB)
    secret = shown_secret(first)
    assert secret is not None and secret.startswith("mmsk_")
    assert secret_count(db_path) == 2

    reloaded = owner.page(KIT_TAB)
    assert shown_secret(reloaded) is None and secret not in reloaded.raw
    assert secret_count(db_path) == 2


def test_the_same_rotate_form_sent_twice_rotates_once(owner: Owner, kit: Any, db_path: str) -> None:
    nonce = owner.page(KIT_TAB).by_id("secrets").one("form").one("input", name="rotation").attrs["value"]
    first = owner.post(f"{KIT_TAB}/secret", grace="86400", rotation=nonce)
    second = owner.post(f"{KIT_TAB}/secret", grace="0", rotation=nonce)  # a double click, or a re-sent POST
    assert location(first) == location(second) == KIT_TAB
    assert secret_count(db_path) == 2  # one rotation, not two

    page = owner.page(KIT_TAB)
    new_kid = scalar(db_path, "SELECT kid FROM secrets WHERE expires_at IS NULL")
    assert page.flashes == [f"This form was already sent: it made secret {new_kid}. Nothing was rotated again."]
    secret = shown_secret(page)  # the second answer replaced the first's session: the secret still shows, once
    assert secret is not None
    assert page.by_id("previous-secret").text.startswith("The previous secret stays valid for 24 hours (until ")
    assert shown_secret(owner.page(KIT_TAB)) is None

    # the previous secret kept its grace: the second submission did not revoke it
    still_valid = kit.post(kit.body("registered", kit.token(), "e-old"), secret=kit.secret)
    assert still_valid.status_code == 200 and still_valid.get_json()["state"] == "registered"

    again = owner.follow(owner.post(f"{KIT_TAB}/secret", grace="86400", rotation=nonce))
    assert shown_secret(again) is None and secret not in again.raw  # never the secret again
    assert "already sent" in again.flashes[0]


def test_a_second_rotation_seconds_after_the_first_keeps_the_game_servers_secret(clock: Any, owner: Owner, kit: Any,
                                                                                   db_path: str) -> None:
    """A double click landing on the first rotation's result page sends its new form at once."""
    shown = []
    for _ in range(2):
        nonce = owner.page(KIT_TAB).by_id("secrets").one("form").one("input", name="rotation").attrs["value"]
        assert location(owner.post(f"{KIT_TAB}/secret", grace="86400", rotation=nonce)) == KIT_TAB
        shown.append(shown_secret(owner.page(KIT_TAB)))
    assert secret_count(db_path) == 3
    token = kit.token()
    in_use = kit.post(kit.body("registered", token, "e-1"), secret=kit.secret)  # the secret the game server has
    assert in_use.status_code == 200 and in_use.get_json()["state"] == "registered"

    clock.t += mm.ROTATION_SETTLE  # later on, a rotation revokes what is in its grace period, as before
    nonce = owner.page(KIT_TAB).by_id("secrets").one("form").one("input", name="rotation").attrs["value"]
    owner.post(f"{KIT_TAB}/secret", grace="86400", rotation=nonce)
    for old in (kit.secret, shown[0]):
        refused = kit.post(kit.body("qualified", token, "e-2"), secret=old)
        assert refused.status_code == 401 and refused.get_json()["reason"] == "mac_mismatch"
    assert kit.post(kit.body("qualified", token, "e-2"), secret=shown[1]).get_json()["state"] == "qualified"


def test_a_second_rotation_in_the_grace_period_names_what_it_revokes(owner: Owner, kit: Any) -> None:
    assert not owner.page(KIT_TAB).has_id("rotation-revokes")
    owner.post_page(f"{KIT_TAB}/secret", grace="3600")
    warning = owner.page(KIT_TAB).by_id("rotation-revokes").text
    assert f"revokes secret {kit.kid} (ends in …{kit.secret[-4:]}, valid until " in warning
    assert "at once" in warning


def test_mint_enable_and_test_event_redirect(owner: Owner, kit: Any, store: Any) -> None:
    minted = owner.post(f"{KIT_TAB}/token", ref="bob")
    assert location(minted) == KIT_TAB
    token = owner.page(KIT_TAB).by_id("token-value").text
    assert token and token not in owner.page(KIT_TAB).raw

    tested = owner.post(f"{KIT_TAB}/test-event")
    assert location(tested) == f"{KIT_TAB}#test-result"  # lands on the answer, below the fold
    assert owner.page(KIT_TAB).by_id("test-result").attrs["data-status"] == "200"

    revoke_every_secret(store, KIT_SERVER_ID)
    owner.post(f"{KIT_TAB}/enabled", enabled="0")
    enabled = owner.post(f"{KIT_TAB}/enabled", enabled="1")
    assert location(enabled) == KIT_TAB
    assert shown_secret(owner.page(KIT_TAB)).startswith("mmsk_")


def test_adding_a_server_redirects_to_the_list_showing_its_secret_once(owner: Owner) -> None:
    added = owner.post("/dashboard/servers", server_id="srv_new", game="g2")
    assert location(added) == "/dashboard/"
    page = owner.page("/dashboard/")
    secret = shown_secret(page)
    assert secret is not None and "Server srv_new created" in page.by_id("new-secret").text
    assert secret not in owner.page("/dashboard/").raw


def test_the_filter_form_submits_to_the_tab(owner: Owner, kit: Any) -> None:
    page = owner.post_page(f"{KIT_TAB}/test-event")
    form = page.by_id("log").one("form")
    assert (form.attrs["method"], form.attrs["action"]) == ("get", KIT_TAB)
    filtered = owner.client.get(form.attrs["action"], query_string={"event": "registered"})
    assert filtered.status_code == 200 and b"No events match these filters" in filtered.data


# Confirm step ###################################################################

@pytest.mark.parametrize(("action", "final_state"), [("reverse", "reversed"), ("reject", "rejected")])
def test_final_action_asks_first_and_acts_only_when_confirmed(owner: Owner, kit: Any, store: Any,
                                                              action: str, final_state: str) -> None:
    token = kit.token()
    referral_id = send_ok(kit, "registered", token, "e-reg")["referral_id"]
    url = f"{KIT_TAB}/referral/{referral_id}/{action}"

    unconfirmed = owner.post(url)  # the one click of before
    assert unconfirmed.status_code == 200 and store.referral(referral_id)["state"] == "registered"
    question = owner.page(url)
    assert question.one("h1").text == f"{action.capitalize()} referral {referral_id}?"
    assert f"becomes {final_state}" in question.by_id("confirm").text
    assert "cannot be undone" in question.by_id("confirm").text
    form = question.by_id("confirm").one("form")
    assert form.attrs["method"] == "post" and form.one("input", name="confirmed").attrs["value"] == "yes"
    assert store.referral(referral_id)["state"] == "registered"

    done = owner.follow(owner.post(url, confirmed="yes"))
    assert done.flashes == [f"Referral {referral_id} is now {final_state}."]
    assert store.referral(referral_id)["state"] == final_state


# Connect box ####################################################################

def test_connect_box_shows_what_a_kit_needs_and_never_the_secret(owner: Owner, kit: Any) -> None:
    page = owner.page(KIT_TAB)
    box = page.by_id("connect")
    assert "Connect your game server" in box.one("h2").text
    assert page.by_id("connect-url").text == "http://localhost" + INGEST
    assert page.by_id("connect-server-id").text == KIT_SERVER_ID
    assert page.by_id("connect-kid").text == kit.kid
    assert kit.secret not in page.raw
    assert "python mmoref_server.py send registered" in page.by_id("connect-python").raw_text
    assert f"--kid {kit.kid}" in page.by_id("connect-python").raw_text


def test_connect_box_names_the_command_the_owner_started(owner: Owner, kit: Any, monkeypatch: Any) -> None:
    monkeypatch.setattr(mm, "COMMAND", "python -m mmoref_server")   # as main() sets it under `python -m`
    snippet = owner.page(KIT_TAB).by_id("connect-python").raw_text
    assert snippet.startswith("python -m mmoref_server send registered --endpoint "), snippet


def test_connect_box_url_keeps_the_prefix_the_request_came_through(owner: Owner, kit: Any) -> None:
    prefixed = owner.client.get(KIT_TAB, base_url="http://localhost/referrals")
    assert prefixed.status_code == 200
    assert '<code id="connect-url">http://localhost/referrals/api/referral/events</code>' in prefixed.text


def test_connect_box_shell_snippet_signs_correctly(owner: Owner, kit: Any) -> None:
    shell = owner.page(KIT_TAB).by_id("connect-shell").raw_text
    lines = shell.splitlines()
    assert lines[0] == "SECRET='paste the signing secret here'" and lines[4].startswith("curl ")
    script = "\n".join([f"SECRET='{kit.secret}'", *lines[1:4], 'printf "%s %s\\n%s" "$T" "$MAC" "$BODY"'])
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=10)
    assert done.returncode == 0, done.stderr
    first, body = done.stdout.split("\n", 1)
    t, mac = first.split(" ")
    assert mac == mm.sign(kit.secret, t, body.encode())
    assert f't=$T,v1=sha256=$MAC,kid={kit.kid}' in lines[5]
    assert lines[5].endswith('--data-binary "$BODY"')   # curl's -d/--data would strip a newline and break the MAC


# Analytics ######################################################################

def test_dashboard_test_tokens_count_nowhere_but_still_work(owner: Owner, kit: Any) -> None:
    owner.post(f"{KIT_TAB}/token", ref="tester")
    token = owner.page(KIT_TAB).by_id("token-value").text
    send_ok(kit, "registered", token, "e-reg")
    send_ok(kit, "qualified", token, "e-qua")

    page = owner.page(KIT_TAB)
    assert [r["event"] for r in log_rows(page)] == ["qualified", "registered"]  # usable, and logged
    assert [page.by_id(f"funnel-{k}").text for k in ("clicked", "registered", "qualified")] == ["0", "0", "0"]
    assert "tester" not in page.by_id("leaderboard").text
    assert "No clicks, registrations or qualifications" in page.by_id("chart-note").text

    real = kit.token("alice")  # a real click (share link or CLI) still counts
    send_ok(kit, "registered", real, "e-real", referee_identity="another-player")
    page = owner.page(KIT_TAB)
    assert [page.by_id(f"funnel-{k}").text for k in ("clicked", "registered")] == ["1", "1"]


def test_empty_chart_says_so_and_dates_its_axis(owner: Owner, kit: Any, clock: Any) -> None:
    page = owner.page(KIT_TAB)
    note = page.by_id("chart-note").text
    assert "peak" not in note and "No clicks" in note
    today = datetime.datetime.fromtimestamp(clock(), datetime.timezone.utc).date()
    axis = [span.text for span in page.by_id("chart-axis").all("span")]
    assert axis == [(today - datetime.timedelta(days=29)).isoformat(),
                    (today - datetime.timedelta(days=14)).isoformat(), today.isoformat()]

    kit.token("alice")
    assert page_note(owner) == "Bars per day: clicks (light), registered (blue), qualified (green); peak 1."


def page_note(owner: Owner) -> str:
    return " ".join(owner.page(KIT_TAB).by_id("chart-note").text.split())


# Shown twice ####################################################################

def test_a_server_without_a_name_is_named_once(owner: Owner, store: Any) -> None:
    store.add_server("srv_bare", "g")
    row = owner.page("/dashboard/").one("tr", data_server="srv_bare")
    assert row.all("td")[0].text.split() == ["srv_bare"]


def test_mac_mismatch_diagnosis_is_shown_once(owner: Owner, kit: Any, client: Any) -> None:
    body = mm.build_body("registered", kit.token(), KIT_SERVER_ID, "e-nl", referee_identity="p")
    sent = client.post(INGEST, data=body + b"\n", headers={mm.SIGNATURE_HEADER: mm.signature_header(kit.secret, body)})
    assert sent.status_code == 401
    diagnosis = "the MAC matches this body without its trailing newline: sign the exact bytes you send"
    assert diagnosis in sent.get_json()["hint"]  # the API's hint keeps it
    page = owner.page(KIT_TAB)
    [row] = rejected_rows(page)
    assert row["diagnosis"] == diagnosis
    assert row["hint"].count(diagnosis) == 1 and page.by_id("rejected").text.count(diagnosis) == 1
