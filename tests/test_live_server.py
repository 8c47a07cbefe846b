"""Real server processes on 127.0.0.1: the no-argument start, and races under real concurrency."""
from __future__ import annotations

import collections
import json
import os
import subprocess
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import pytest

import mmoref_server as mm
from tests.support import INGEST, PYTHON, SERVER_SCRIPT, free_port, rows

pytestmark = pytest.mark.slow

SERVER = "srv_race"
LOOPBACK_HEX = "0100007F"   # 127.0.0.1 as /proc/net/tcp writes it


def wait_until_healthy(url: str, process: subprocess.Popen, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert process.poll() is None, "the server exited early"
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=1) as response:
                assert json.loads(response.read()) == {"ok": True}
                return
        except OSError:
            time.sleep(0.1)
    pytest.fail(f"no healthy server at {url} within {seconds} s")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def listening_addresses(port: int) -> set[str]:
    """The local addresses with a LISTEN socket on `port` (IPv4 and IPv6 tables)."""
    found = set()
    for table in (Path("/proc/net/tcp"), Path("/proc/net/tcp6")):
        if not table.exists():
            continue
        for line in table.read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, _, port_hex = local.rpartition(":")
            if state == "0A" and int(port_hex, 16) == port:
                found.add(address)
    return found


def test_no_arguments_serves_on_loopback_with_referrals_db_in_cwd(tmp_path):
    port = free_port()
    log_path = tmp_path / "output.log"
    env = {**os.environ, "MMOREF_PORT": str(port)}   # the autouse fixture removed every other MMOREF_*
    with open(log_path, "w") as log_file:
        process = subprocess.Popen([PYTHON, str(SERVER_SCRIPT)], cwd=tmp_path, env=env,
                                   stdout=log_file, stderr=subprocess.STDOUT)
    try:
        wait_until_healthy(f"http://127.0.0.1:{port}", process)
        assert (tmp_path / "referrals.db").is_file()
        if Path("/proc/net/tcp").exists():
            assert listening_addresses(port) == {LOOPBACK_HEX}
    finally:
        stop(process)
    output = log_path.read_text()
    assert f"POST http://127.0.0.1:{port}{INGEST}" in output
    assert str(tmp_path / "referrals.db") in output
    assert f"curl -i http://127.0.0.1:{port}{INGEST}" in output


def race(count: int, workers: int, deliver: Callable[[int], dict[str, Any]]) -> list[dict[str, Any]]:
    """Run deliver(0..count-1) on `workers` threads released together in rounds by a barrier."""
    assert count % workers == 0, "every round must fill the barrier"
    barrier = threading.Barrier(workers)

    def task(number: int) -> dict[str, Any]:
        barrier.wait(timeout=30)
        return deliver(number)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(task, range(count), timeout=120))


@pytest.fixture
def prepared(db_path) -> Callable[[int], tuple[str, list[tuple[str, str]]]]:
    """prepared(n) -> (secret, [(token, referral_id)] for n different referrers), written before the server runs."""
    def prepare(referrers: int) -> tuple[str, list[tuple[str, str]]]:
        store = mm.Store(db_path)
        secret, _ = store.add_server(SERVER, "g", "", "https://game.example/join")
        minted = [store.mint_referral(SERVER, f"referrer{number}") for number in range(referrers)]
        store.close()
        return secret, minted
    return prepare


def post(url: str, secret: str, body: bytes) -> dict[str, Any]:
    result = mm.send_event(url + INGEST, secret, body, timeout=60)
    assert result["error"] is None, result["error"]
    return {"status": result["status"], **result["body"]}


def test_fifty_identical_deliveries_make_one_log_row(db_path, live_server, prepared):
    secret, [(token, referral_id)] = prepared(1)
    live = live_server(env={"MMOREF_THREADS": "16"})
    body = mm.build_body("registered", token, SERVER, "reg-1", referee_identity="player-1")

    answers = race(50, 25, lambda _: post(live.url, secret, body))

    tally = collections.Counter(json.dumps(answer, sort_keys=True) for answer in answers)
    advanced = {"status": 200, "ok": True, "referral_id": referral_id, "state": "registered"}
    assert tally == {json.dumps(advanced, sort_keys=True): 1,
                     json.dumps({"status": 200, "ok": True, "duplicate": True}, sort_keys=True): 49}
    assert rows(db_path, "SELECT referral_id, event, server_event_id, outcome FROM delivery_log") == [
        (referral_id, "registered", "reg-1", "advanced")]
    assert rows(db_path, "SELECT state FROM referrals") == [("registered",)]


def test_twelve_referrers_racing_for_one_referee_make_one_anchor(db_path, live_server, prepared):
    secret, minted = prepared(12)
    live = live_server(env={"MMOREF_THREADS": "16"})

    def register(number: int) -> dict[str, Any]:
        token, _ = minted[number]
        return post(live.url, secret, mm.build_body("registered", token, SERVER, f"reg-{number}",
                                                    referee_identity="player-1"))

    answers = race(12, 12, register)

    winners = [answer for answer in answers if "state" in answer]
    assert len(winners) == 1 and winners[0]["state"] == "registered"
    assert sorted(answers, key=lambda a: "state" in a)[:11] == [
        {"status": 200, "ok": True, "ignored": "first_touch_conflict"}] * 11
    assert rows(db_path, "SELECT referee_identity, referral_id FROM anchors") == [
        ("player-1", winners[0]["referral_id"])]
    assert dict(rows(db_path, "SELECT outcome, count(*) FROM delivery_log GROUP BY 1")) == {
        "advanced": 1, "first_touch_conflict": 11}
    assert dict(rows(db_path, "SELECT state, count(*) FROM referrals GROUP BY 1")) == {
        "registered": 1, "clicked": 11}
