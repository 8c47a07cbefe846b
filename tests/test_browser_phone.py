"""The dashboard's lists on a 390 px phone and a 1280 px laptop (issue 20, item 4), asserted by
element geometry: each key cell lies inside the window and inside every box that could clip it,
so it is seen without scrolling sideways; the connect box's snippets are not cut off.

Screenshots go to pytest's tmp_path; they are for a person to look at, the assertions do not read them.
"""
from __future__ import annotations

import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

import mmoref_server as mm
from tests import test_browser as ui
from tests.support import INGEST
from tests.support import PYTHON
from tests.support import ROOT
from tests.support import SERVER_SCRIPT
from tests.test_browser import ENV
from tests.test_browser import login
from tests.test_browser import screenshot
from tests.test_browser_dashboard import sideways_overflow

pytestmark = pytest.mark.browser
browser, page = ui.browser, ui.page  # test_browser.py's fixtures: Chromium, and a fresh page per test

WIDTHS = {"phone": 390, "laptop": 1280}
TAB = f"/dashboard/{mm.DEMO_GAME}/{mm.DEMO_SERVER_ID}/referrals"
# page -> {table: the columns an owner reads a row by}; a column is named by the start of its header
KEY_COLUMNS = {
    "/dashboard/": {"#servers": ["Server", "Funnel"], "table.rejected": ["Status", "Error", "Hint"]},
    TAB: {"#secrets table": ["kid", "Status"], "#leaderboard": ["Referrer", "Qualified"],
          "#delivery-log": ["Event", "State now", "Outcome"], "#rejected table": ["Status", "Error", "Hint"]},
}

# For each key cell with text: where it is, and whether the window and every ancestor that clips
# (overflow other than visible: a scroll box) show all of it.
CELLS_SEEN = """([selector, columns]) => {
  const table = document.querySelector(selector);
  if (!table) return {seen: [], hidden: [`no table ${selector}`]};
  const headers = [...table.querySelectorAll("thead th")].map(th => th.textContent.trim());
  const width = document.documentElement.clientWidth, seen = [], hidden = [];
  for (const column of columns) {
    const index = headers.findIndex(header => header.startsWith(column));
    if (index < 0) { hidden.push(`${selector}: no column ${column}`); continue; }
    for (const cell of table.querySelectorAll(`tbody > tr > td:nth-child(${index + 1})`)) {
      const text = cell.textContent.trim();
      if (!text) continue;
      const box = cell.getBoundingClientRect();
      let inside = box.width > 0 && box.height > 0 && box.left >= -0.5 && box.right <= width + 0.5;
      for (let parent = cell.parentElement; parent && inside; parent = parent.parentElement) {
        if (getComputedStyle(parent).overflowX !== "visible") {
          const clip = parent.getBoundingClientRect();
          inside = box.left >= clip.left - 0.5 && box.right <= clip.right + 0.5;
        }
      }
      (inside ? seen : hidden).push(
        `${selector} ${column} "${text.slice(0, 24)}" at x ${Math.round(box.left)}-${Math.round(box.right)}`);
    }
  }
  return {seen, hidden};
}"""
# boxes whose content is wider than they are: a scroll box, or a <pre> cutting its lines off
CUT_OFF = """selector => [...document.querySelectorAll(selector)].filter(box => box.scrollWidth > box.clientWidth + 1)
  .map(box => `${box.id || box.className || box.tagName} shows ${box.clientWidth} of ${box.scrollWidth} px`)"""


@pytest.fixture
def demo_server(live_server: Any, tmp_path: Path) -> Any:
    """A live server on the demo database, plus a refusal naming no known server (the servers page's list)."""
    demo_db = tmp_path / "demo.db"
    done = subprocess.run([PYTHON, str(SERVER_SCRIPT), "demo", str(demo_db)], cwd=ROOT,
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    server = live_server(env={**ENV, "MMOREF_DB": str(demo_db)})
    body = mm.build_body("registered", "some-token", "srv_nowhere", "reg-1", referee_identity="player-1")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(urllib.request.Request(server.url + INGEST, data=body, method="POST", headers={
            mm.SIGNATURE_HEADER: mm.signature_header("not-a-secret", body)}), timeout=10)
    assert refused.value.code == 404
    return server


@pytest.mark.parametrize("width", WIDTHS.values(), ids=WIDTHS.keys())
def test_key_columns_and_snippets_are_seen_without_scrolling_sideways(page: Any, demo_server: Any, width: int,
                                                                      tmp_path: Path) -> None:
    page.set_viewport_size({"width": width, "height": 844})
    login(page, demo_server.url)
    for path, tables in KEY_COLUMNS.items():
        page.goto(demo_server.url + path)
        screenshot(page, tmp_path / f"{path.strip('/').replace('/', '-')}-{width}.png", full_page=True)
        for selector, columns in tables.items():
            cells = page.evaluate(CELLS_SEEN, [selector, columns])
            assert cells["hidden"] == [], f"at {width} px on {path}: {cells['hidden']}"
            assert len(cells["seen"]) >= len(columns), f"at {width} px on {path}: only {cells['seen']}"
        assert page.evaluate(CUT_OFF, "pre") == [], f"at {width} px on {path}"
        assert sideways_overflow(page) <= 0, f"{path} scrolls sideways at {width} px"
    if width == WIDTHS["phone"]:  # on a phone no list scrolls sideways at all: every cell is seen
        assert page.evaluate(CUT_OFF, ".scroll") == []
