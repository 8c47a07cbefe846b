"""docs/contract.md §4: the Referrals tab's funnel, leaderboard and daily chart, and the servers list's counts."""
from __future__ import annotations

import datetime
from typing import Any
from urllib.parse import parse_qs
from urllib.parse import urlsplit

from tests.support import KIT_GAME
from tests.support import KIT_SERVER_ID
from tests.support import KIT_TAB
from tests.support import Clock
from tests.support import Owner
from tests.support import location
from tests.support import send_ok

# Analytics and the servers list ################################################

def click(client: Any, code: str) -> str:
    """Follow the share link as a player; return the minted token."""
    return parse_qs(urlsplit(location(client.get(f"/r/{KIT_SERVER_ID}?ref={code}"))).query)["mmref"][0]


def test_funnel_leaderboard_and_chart(owner: Owner, kit: Any, client: Any, store: Any, clock: Clock) -> None:
    plan = {"alice": ["qualified", "reversed", "qualified", "registered"], "bob": ["qualified", "clicked"],
            "carol": ["registered"]}
    steps = {"clicked": [], "registered": ["registered"], "qualified": ["registered", "qualified"],
             "reversed": ["registered", "qualified", "reversed"]}
    for code, finals in plan.items():
        for n, final in enumerate(finals):
            token = click(client, code)
            for event in steps[final]:
                send_ok(kit, event, token, f"{code}-{n}-{event}", referee_identity=f"{code}-{n}")
    store.add_server("srv_quiet", KIT_GAME, "Quiet")

    tab = owner.page(KIT_TAB)
    funnel = {kind: tab.by_id(f"funnel-{kind}").text for kind in ("clicked", "registered", "qualified", "reversed")}
    assert funnel == {"clicked": "7", "registered": "6", "qualified": "4", "reversed": "1"}
    analytics = tab.by_id("analytics").text
    assert "85.7% of clicks" in analytics and "66.7% of registered" in analytics

    leaders = [[td.text for td in tr.all("td")] for tr in tab.by_id("leaderboard").one("tbody").all("tr")]
    assert leaders == [["alice", "4", "4", "3"], ["bob", "2", "1", "1"]]

    chart = tab.by_id("daily-chart")
    assert chart.tag == "svg"
    bars = chart.all("rect")
    assert len(bars) == 90
    today = datetime.datetime.fromtimestamp(clock.t, datetime.timezone.utc).date().isoformat()
    assert [bar.one("title").text for bar in bars[-3:]] == [f"{today}: 7 clicked", f"{today}: 6 registered",
                                                           f"{today}: 4 qualified"]
    assert bars[-3].attrs["height"] == "100.0"
    assert {bar.attrs["height"] for bar in bars[:-3]} == {"0.0"}

    index = owner.page("/dashboard/")
    assert index.one("tr", data_server=KIT_SERVER_ID).all("td")[3].text == "7 → 6 → 4 (1)"
    assert index.one("tr", data_server="srv_quiet").all("td")[3].text == "0 → 0 → 0 (0)"
    assert "Quiet" in index.one("tr", data_server="srv_quiet").text


def test_empty_analytics(owner: Owner, kit: Any) -> None:
    tab = owner.page(KIT_TAB)
    assert [tab.by_id(f"funnel-{kind}").text for kind in ("clicked", "registered", "qualified", "reversed")] \
        == ["0"] * 4
    assert tab.by_id("leaderboard").one("tbody").text == "No qualified referrals yet."
    assert len(tab.by_id("daily-chart").all("rect")) == 90


def test_leaderboard_is_ordered_by_qualified_and_keeps_20(owner: Owner, kit: Any) -> None:
    codes = ["top", "top"] + [f"r{n:02}" for n in range(22)]
    for n, code in enumerate(codes):
        token = kit.token(code)
        send_ok(kit, "registered", token, f"reg-{n}", referee_identity=f"player-{n}")
        send_ok(kit, "qualified", token, f"q-{n}")
    rows = owner.page(KIT_TAB).by_id("leaderboard").one("tbody").all("tr")
    leaders = [(tr.all("td")[0].text, tr.all("td")[3].text) for tr in rows]
    assert len(leaders) == 20
    assert leaders == [("top", "2")] + [(f"r{n:02}", "1") for n in range(19)]
