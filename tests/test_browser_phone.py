"""The dashboard's lists on a 390 px phone and a 1280 px laptop (issue 20, item 4), asserted by
element geometry: each key cell lies inside the window and inside every box that could clip it,
so it is seen without scrolling sideways, and is labelled (by its column's header, or on a phone
by its card's label); the connect box's snippets are there and not cut off. A list that scrolls
sideways shows a shadow on the side there is more, asserted by the pixels at the box's edges.

Screenshots go to pytest's tmp_path; they are for a person to look at, the assertions do not read them.
"""
from __future__ import annotations

import base64
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
    f"{TAB}/log/1": {"#history": ["Event", "Outcome"]},
}
SNIPPETS = {TAB: ["#connect-shell", "#connect-python"]}   # page -> the <pre> boxes a kit's author copies

# For each key cell with text: where it is, and whether the window and every ancestor that clips
# (overflow other than visible: a scroll box) show all of it; with the header row hidden (a phone's
# cards), whether the cell shows a label of its own (td[data-label]::before). Seen cells per column.
CELLS_SEEN = """([selector, columns]) => {
  const table = document.querySelector(selector);
  if (!table) return {seen: {}, hidden: [`no table ${selector}`]};
  const headers = [...table.querySelectorAll("thead th")].map(th => th.textContent.trim());
  const headerShown = table.tHead !== null && table.tHead.getClientRects().length > 0;
  const width = document.documentElement.clientWidth, seen = {}, hidden = [];
  for (const column of columns) {
    seen[column] = [];
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
      const label = getComputedStyle(cell, "::before").content;
      const labelled = headerShown || !["none", "normal", '""'].includes(label);
      const where = `${selector} ${column} "${text.slice(0, 24)}"`
        + ` at x ${Math.round(box.left)}-${Math.round(box.right)}`;
      (inside && labelled ? seen[column] : hidden).push(labelled ? where : `${where} has no label`);
    }
  }
  return {seen, hidden};
}"""
# boxes whose content is wider than they are: a scroll box, or a <pre> cutting its lines off
CUT_OFF = """selector => [...document.querySelectorAll(selector)].filter(box => box.scrollWidth > box.clientWidth + 1)
  .map(box => `${box.id || box.className || box.tagName} shows ${box.clientWidth} of ${box.scrollWidth} px`)"""
# The lightest pixel (its darkest channel) in the middle fifth of the rows, one pixel in from each
# side of a PNG: 255 is plain white, a shadow darkens every pixel there. Decoded by the browser.
EDGE_LIGHTNESS = """async png => {
  const image = new Image();
  image.src = "data:image/png;base64," + png;
  await image.decode();
  const canvas = document.createElement("canvas");
  [canvas.width, canvas.height] = [image.width, image.height];
  const context = canvas.getContext("2d");
  context.drawImage(image, 0, 0);
  const top = Math.floor(image.height * 0.4), rows = Math.max(1, Math.floor(image.height * 0.2));
  const lightest = x => {
    const data = context.getImageData(x, top, 1, rows).data;
    let found = 0;
    for (let i = 0; i < data.length; i += 4) found = Math.max(found, Math.min(data[i], data[i + 1], data[i + 2]));
    return found;
  };
  return {left: lightest(1), right: lightest(image.width - 2)};
}"""
SHADED, PLAIN = 240, 250   # an edge with the shadow is darker than SHADED; one without it, lighter than PLAIN


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
            unseen = [column for column in columns if not cells["seen"][column]]
            assert unseen == [], f"at {width} px on {path}: no cell of {selector} {unseen} seen"
        for snippet in SNIPPETS.get(path, []):
            assert page.locator(snippet).is_visible(), f"at {width} px on {path}: no {snippet}"
        assert page.evaluate(CUT_OFF, "pre") == [], f"at {width} px on {path}"
        assert sideways_overflow(page) <= 0, f"{path} scrolls sideways at {width} px"
    if width == WIDTHS["phone"]:  # on a phone no list scrolls sideways at all: every cell is seen
        assert page.evaluate(CUT_OFF, ".scroll") == []


def test_a_list_that_scrolls_sideways_shows_a_shadow_on_the_side_there_is_more(page: Any, demo_server: Any,
                                                                               tmp_path: Path) -> None:
    """At 1280 px none of the demo's lists is wider than its box; at 900 px (a small laptop's window,
    still above the phone's cards) the delivery log is, and the leaderboard is not."""
    page.set_viewport_size({"width": 900, "height": 844})
    login(page, demo_server.url)
    page.goto(demo_server.url + TAB)
    decoder = page.context.new_page()   # about:blank: no CSP keeps it from showing a data: image

    def edges(table: str) -> dict[str, int]:
        box = page.locator(".scroll", has=page.locator(table))
        return decoder.evaluate(EDGE_LIGHTNESS, base64.b64encode(box.screenshot()).decode())

    def overflow(table: str) -> int:
        return page.locator(".scroll", has=page.locator(table)).evaluate("box => box.scrollWidth - box.clientWidth")

    assert overflow("#delivery-log") > 0 and overflow("#leaderboard") <= 0   # (set up as meant)
    scrolls, fits = edges("#delivery-log"), edges("#leaderboard")
    assert scrolls["right"] < SHADED and scrolls["left"] > PLAIN, scrolls   # more to the right only
    assert fits["right"] > PLAIN and fits["left"] > PLAIN, fits             # nothing more: no shadow

    page.locator(".scroll", has=page.locator("#delivery-log")).evaluate("box => box.scrollLeft = box.scrollWidth")
    screenshot(page, tmp_path / "delivery-log-scrolled-900.png")
    scrolled = edges("#delivery-log")
    assert scrolled["left"] < SHADED and scrolled["right"] > PLAIN, scrolled   # more to the left only
