"""PostgreSQL as the shared store of several mmoref nodes: races across three server processes,
a node SIGKILLed and PostgreSQL restarted mid-load, migrations when nodes start together, and
copy-db between the engines. (The contract, storage, CLI and crash tests run on both engines too.)"""
from __future__ import annotations

import collections
import http.client
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import mmoref_server as mm
from tests.support import REFEREE
from tests.support import HttpClient
from tests.support import LiveServer
from tests.support import add_server
from tests.support import assert_one_error_line
from tests.support import event_body
from tests.support import gunicorn_command
from tests.support import log_rows_for
from tests.support import mint_tokens
from tests.support import poster
from tests.support import race
from tests.support import referral_id_of
from tests.support import rows
from tests.support import scalar
from tests.support import snapshot

pytestmark = pytest.mark.slow
NODES = 3
DUPLICATE = {"ok": True, "duplicate": True}


@pytest.fixture
def pg_url(postgres_cluster) -> Iterator[str]:
    url = postgres_cluster.new_database()
    yield url
    postgres_cluster.give_back(url)


@pytest.fixture
def pg_store(pg_url: str) -> mm.Store:
    store = mm.Store(pg_url)
    yield store
    store.close()


def start_nodes(live_server, url: str, count: int = NODES) -> list[LiveServer]:
    """`count` mmoref processes on one database, started together (each migrates, or waits for the one that does)."""
    nodes: list[Any] = [None] * count
    errors: list[BaseException] = []

    def start(index: int) -> None:
        try:
            nodes[index] = live_server(db_path=url)
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    return nodes


def ports(nodes: list[LiveServer]) -> list[int]:
    return [node.port for node in nodes]


# Migrations and schema ########################################################

def test_nodes_starting_together_migrate_once(live_server, pg_url):
    nodes = start_nodes(live_server, pg_url)
    assert rows(pg_url, "SELECT version FROM schema_version") == [(mm.SCHEMA_VERSION,)]
    for node in nodes:
        status, body = HttpClient(node.port).request("GET", "/healthz")
        assert (status, body) == (200, {"ok": True})
        assert "Traceback" not in node.output()


def test_a_newer_schema_is_refused(pg_url, runner):
    mm.Store(pg_url).close()
    rows(pg_url, "UPDATE schema_version SET version = ?", mm.SCHEMA_VERSION + 1)
    with pytest.raises(mm.StoreError, match=rf"newer mmoref \(schema v{mm.SCHEMA_VERSION + 1}.*upgrade"):
        mm.Store(pg_url)
    result = runner("log", "srv_1", "--db", pg_url, db=False)
    assert_one_error_line(result.exit_code, result.stderr, "newer mmoref", "upgrade")
    assert scalar(pg_url, "SELECT version FROM schema_version") == mm.SCHEMA_VERSION + 1


def test_an_unreachable_postgresql_is_one_error_line(runner, postgres_cluster):
    url = postgres_cluster.url("postgres").replace(f":{postgres_cluster.port}/", ":1/")
    result = runner("log", "srv_1", "--db", url, db=False)
    assert_one_error_line(result.exit_code, result.stderr, "PostgreSQL at", "cannot be reached")


def test_the_banner_never_shows_the_password():
    url = "postgresql://mmoref:s3cret-pw@db.internal:5432/referrals"
    assert mm.database_label(url) == "postgresql://mmoref:…@db.internal:5432/referrals"


def test_copy_db_moves_every_table():
    """A table added to the schema must be added to COPIED_TABLES (copy-db would leave it behind)."""
    sqlite_tables = {statement.split()[2] for migration in mm.MIGRATIONS for statement in migration
                     if statement.startswith("CREATE TABLE")}
    postgres_tables = {statement.split()[2] for statement in mm.POSTGRES_SCHEMA if statement.startswith("CREATE TABLE")}
    postgres_tables |= {statement.split()[2] for migration in mm.POSTGRES_MIGRATIONS.values()
                        for statement in migration if statement.startswith("CREATE TABLE")}
    assert sqlite_tables == set(mm.COPIED_TABLES) == postgres_tables - {"schema_version"}


# Races across three nodes, each invariant counted in the database afterwards ##########

def test_identical_deliveries_to_three_nodes_are_logged_once(live_server, pg_store, pg_url):
    secret = add_server(pg_store)
    nodes = start_nodes(live_server, pg_url)
    token = mint_tokens(pg_store, ["alice"])[0]
    body = event_body("registered", token, "reg-1")

    answers = race(ports(nodes), [poster(secret, body)] * 60)

    assert collections.Counter(status for status, _ in answers) == {200: 60}
    bodies = [answer for _, answer in answers]
    assert bodies.count(DUPLICATE) == 59
    assert [b["state"] for b in bodies if b != DUPLICATE] == ["registered"]
    assert log_rows_for(pg_url, referral_id_of(pg_store, token), "registered", "reg-1") == 1
    assert scalar(pg_url, "SELECT sum(registered) FROM daily_counts") == 1


def test_referrers_racing_for_one_referee_on_three_nodes_make_one_anchor(live_server, pg_store, pg_url):
    secret = add_server(pg_store)
    nodes = start_nodes(live_server, pg_url)
    tokens = mint_tokens(pg_store, [f"ref{i}" for i in range(30)])
    bodies = [event_body("registered", token, f"reg-{i}") for i, token in enumerate(tokens)]

    answers = race(ports(nodes), [poster(secret, body) for body in bodies])

    assert collections.Counter(status for status, _ in answers) == {200: 30}
    outcomes = collections.Counter(answer.get("state") or answer.get("ignored") for _, answer in answers)
    assert outcomes == {"registered": 1, "first_touch_conflict": 29}
    assert rows(pg_url, "SELECT count(*) FROM anchors WHERE referee_identity = ?", REFEREE) == [(1,)]
    assert rows(pg_url, "SELECT outcome, count(*) FROM delivery_log GROUP BY outcome ORDER BY outcome") == [
        ("advanced", 1), ("first_touch_conflict", 29)]
    assert scalar(pg_url, "SELECT count(*) FROM referrals WHERE state = 'registered'") == 1


def test_one_token_racing_for_many_referees_anchors_one(live_server, pg_store, pg_url):
    secret = add_server(pg_store)
    nodes = start_nodes(live_server, pg_url)
    token = mint_tokens(pg_store, ["alice"])[0]
    bodies = [event_body("registered", token, f"reg-{i}", referee=f"player-{i}") for i in range(30)]

    answers = race(ports(nodes), [poster(secret, body) for body in bodies])

    statuses = collections.Counter(status for status, _ in answers)
    assert statuses == {200: 1, 422: 29}, answers
    assert {answer["error"] for status, answer in answers if status == 422} == {"invalid transition"}
    assert scalar(pg_url, "SELECT count(*) FROM anchors") == 1
    assert scalar(pg_url, "SELECT count(*) FROM delivery_log") == 1


def test_qualified_and_reversed_racing_on_three_nodes_end_consistent(live_server, pg_store, pg_url):
    secret = add_server(pg_store)
    nodes = start_nodes(live_server, pg_url)
    tokens = mint_tokens(pg_store, [f"ref{i}" for i in range(12)])
    client = HttpClient(nodes[0].port)
    for i, token in enumerate(tokens):
        status, answer = client.post_event(secret, event_body("registered", token, f"reg-{i}", referee=f"p{i}"))
        assert (status, answer.get("state")) == (200, "registered")
    client.close()
    bodies = [event_body(event, token, f"{event}-{i}") for i, token in enumerate(tokens)
              for event in ("qualified", "reversed")]

    answers = race(ports(nodes), [poster(secret, body) for body in bodies])

    # reversed first leaves qualified invalid (422); qualified first lets reversed follow: both end reversed
    assert {status for status, _ in answers} <= {200, 422}
    assert rows(pg_url, "SELECT DISTINCT state FROM referrals") == [("reversed",)]
    logged = dict(rows(pg_url, "SELECT event, count(*) FROM delivery_log GROUP BY event"))
    qualified_first = sum(1 for (status, _), body in zip(answers, bodies) if status == 200 and b"qualified" in body)
    assert logged == {"registered": 12, "reversed": 12, **({"qualified": qualified_first} if qualified_first else {})}
    assert rows(pg_url, "SELECT sum(registered), sum(qualified), sum(reversed) FROM daily_counts") == [
        (12, qualified_first, 12)]


# A node killed, PostgreSQL restarted ##############################################

class Senders:
    """Threads that each post their own events through their own node, retrying a 503 with the same
    server_event_id as the kit does, until every event is acknowledged or the deadline passes."""

    def __init__(self, node_ports: list[int], secret: str, bodies: list[bytes], deadline: float = 90):
        self.secret, self.deadline = secret, time.monotonic() + deadline
        self.acknowledged: list[bytes] = []
        self.refusals: list[tuple[int, Any]] = []   # every non-200 answer
        self.cut_off: list[bytes] = []
        self.progress = threading.Semaphore(0)
        self.refused = threading.Event()
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._send, args=(node_ports[i % len(node_ports)], bodies[i::6]),
                                         daemon=True) for i in range(6)]
        for thread in self.threads:
            thread.start()

    def _send(self, port: int, bodies: list[bytes]) -> None:
        client = HttpClient(port, timeout=15)
        try:
            for body in bodies:
                while time.monotonic() < self.deadline:
                    try:
                        status, answer = client.post_event(self.secret, body)
                    except (OSError, http.client.HTTPException):
                        with self._lock:
                            self.cut_off.append(body)
                        return
                    if status == 200:
                        with self._lock:
                            self.acknowledged.append(body)
                        self.progress.release()
                        break
                    with self._lock:
                        self.refusals.append((status, answer))
                    self.refused.set()
                    time.sleep(0.2)
        finally:
            client.close()

    def wait_for(self, count: int, seconds: float = 30) -> None:
        for _ in range(count):
            assert self.progress.acquire(timeout=seconds), "the load stalled"

    def join(self) -> None:
        for thread in self.threads:
            thread.join(max(1, self.deadline - time.monotonic() + 5))
        assert not any(thread.is_alive() for thread in self.threads), "a sender hung"


def registrations(store: mm.Store, count: int) -> list[bytes]:
    tokens = mint_tokens(store, [f"code{i}" for i in range(count)])
    return [event_body("registered", token, f"reg-{i}", referee=f"player-{i}") for i, token in enumerate(tokens)]


def assert_logged_once(store: mm.Store, url: str, bodies: list[bytes]) -> None:
    for body in bodies:
        fields = json.loads(body)
        assert log_rows_for(url, referral_id_of(store, fields["token"]), fields["event"],
                            fields["server_event_id"]) == 1, body


def test_sigkill_of_one_node_mid_load_loses_no_acknowledged_event(live_server, pg_store, pg_url):
    secret = add_server(pg_store)
    nodes = start_nodes(live_server, pg_url)
    bodies = registrations(pg_store, 180)

    senders = Senders(ports(nodes), secret, bodies)
    senders.wait_for(40)
    nodes[0].process.kill()  # SIGKILL: no shutdown code runs
    nodes[0].process.wait(10)
    senders.join()

    assert senders.cut_off, "the kill interrupted no request"
    assert not senders.refusals, senders.refusals[:3]
    assert_logged_once(pg_store, pg_url, senders.acknowledged)
    client = HttpClient(nodes[1].port)
    for body in bodies:  # the kit re-sends whatever got no answer; acknowledged ones are duplicates
        status, answer = client.post_event(secret, body)
        assert status == 200, answer
        if body in senders.acknowledged:
            assert answer == DUPLICATE
    client.close()
    assert_logged_once(pg_store, pg_url, bodies)
    assert scalar(pg_url, "SELECT count(*) FROM delivery_log") == len(bodies)
    assert scalar(pg_url, "SELECT count(*) FROM anchors") == len(bodies)


def test_postgresql_restart_mid_load_is_clear_503s_and_the_nodes_recover(live_server, pg_store, pg_url,
                                                                         postgres_cluster):
    secret = add_server(pg_store)
    nodes = start_nodes(live_server, pg_url, count=2)
    bodies = registrations(pg_store, 150)

    senders = Senders(ports(nodes), secret, bodies)
    senders.wait_for(30)
    postgres_cluster.shut_down()  # every connection is cut
    try:  # down until a request has met it: a quick restart can be hidden by the pool's reconnects
        assert senders.refused.wait(30), "no request met PostgreSQL down"
    finally:
        postgres_cluster.start()
    senders.join()

    assert not senders.cut_off
    expected = {"ok": False, "error": "database unavailable", "hint": mm.HINTS["database unreachable"]}
    assert all(refusal == (503, expected) for refusal in senders.refusals), senders.refusals[:3]
    assert sorted(senders.acknowledged) == sorted(bodies)  # every event got its 200, by retrying
    assert_logged_once(pg_store, pg_url, bodies)
    for node in nodes:  # recovered without a restart
        assert node.process.poll() is None
        assert HttpClient(node.port).request("GET", "/healthz") == (200, {"ok": True})


@pytest.mark.skipif(sys.platform == "win32", reason="gunicorn runs on POSIX only")
def test_a_gunicorn_worker_on_postgresql_stops_at_once_on_sigterm(live_server, pg_url):
    """The pool closes with the process: left to interpreter shutdown, it waited 5 s for each of
    its threads (Python 3.13), and a worker took 20 s to stop."""
    pytest.importorskip("gunicorn", reason="gunicorn is not installed (pip install gunicorn)")
    server = live_server(db_path=pg_url, command=gunicorn_command())
    server.process.terminate()  # healthy: the worker has its store and pool
    try:
        status = server.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pytest.fail(f"gunicorn still running 10 s after SIGTERM:\n{server.output()}")
    assert status == 0, server.output()
    assert "couldn't stop thread" not in server.output()


def test_healthz_is_503_while_postgresql_is_unreachable(postgres_cluster, pg_url, monkeypatch):
    app = mm.create_app({"MMOREF_DB": pg_url, "TESTING": True})
    client = app.test_client()
    assert client.get("/healthz").json == {"ok": True}
    store = app.extensions["mmoref"]
    monkeypatch.setattr(store, "_pool", type(store._pool)(pg_url.replace(f":{postgres_cluster.port}/", ":1/"),
                                                          min_size=1, timeout=1, open=True))
    response = client.get("/healthz")
    assert response.status_code == 503
    assert (response.json["error"], response.json["reason"]) == ("database unavailable", "unreachable")
    assert "cannot be reached" in response.json["hint"]
    store._pool.close()


# copy-db ######################################################################

def test_copy_db_round_trip_sqlite_postgresql_sqlite(tmp_path, runner, pg_url):
    original, back = str(tmp_path / "original.db"), str(tmp_path / "back.db")
    assert runner("demo", original, db=False).exit_code == 0   # every state, through the real pipeline
    store = mm.Store(original)
    store.set_admin_password("a long enough password")
    session_key = store.installation_key("session_key")
    fresh = mint_tokens(store, ["zed", "yan"], server_id=mm.DEMO_SERVER_ID)   # minted before both moves
    store.close()

    there = runner("copy-db", original, pg_url, db=False)
    assert there.exit_code == 0, there.stderr
    assert "copied" in there.stdout and "servers" in there.stdout
    back_again = runner("copy-db", pg_url, back, db=False)
    assert back_again.exit_code == 0, back_again.stderr

    copied, kept = snapshot(back), snapshot(original)
    assert copied == kept
    assert rows(back, "SELECT kid, created_at, expires_at FROM secrets ORDER BY created_at, rowid") == rows(
        original, "SELECT kid, created_at, expires_at FROM secrets ORDER BY created_at, rowid")
    for location in (pg_url, back):
        moved = mm.Store(location)
        assert moved.installation_key("session_key") == session_key
        assert mm.check_password_hash(moved.admin_password_hash(), "a long enough password")
        moved.close()
    # tokens minted before the moves still verify and work, on PostgreSQL and on the copy back
    for location, token, event_id in ((pg_url, fresh[0], "reg-z"), (back, fresh[1], "reg-y")):
        app = mm.create_app({"MMOREF_DB": location, "TESTING": True})
        body = mm.build_body("registered", token, mm.DEMO_SERVER_ID, event_id, referee_identity=f"new-{event_id}")
        response = app.test_client().post(mm.INGEST_PATH, data=body,
                                          headers={mm.SIGNATURE_HEADER: mm.signature_header(mm.DEMO_SECRET, body)})
        assert (response.status_code, response.json["state"]) == (200, "registered"), response.json


def test_copy_db_refuses_a_database_that_holds_data(tmp_path, runner, pg_url):
    source = str(tmp_path / "source.db")
    assert runner("demo", source, db=False).exit_code == 0
    assert runner("copy-db", source, pg_url, db=False).exit_code == 0
    before = snapshot(pg_url)
    result = runner("copy-db", source, pg_url, db=False)
    assert_one_error_line(result.exit_code, result.stderr, "already holds data")
    assert snapshot(pg_url) == before


def test_backup_and_restore_name_postgresqls_own_tools(runner, pg_url, tmp_path):
    mm.Store(pg_url).close()
    result = runner("backup", str(tmp_path / "copy.db"), "--db", pg_url, db=False)
    assert_one_error_line(result.exit_code, result.stderr, "pg_dump")
    assert not (tmp_path / "copy.db").exists()
    sqlite_backup = str(tmp_path / "backup.db")
    assert runner("demo", sqlite_backup, db=False).exit_code == 0
    result = runner("restore", sqlite_backup, "--db", pg_url, db=False)
    assert_one_error_line(result.exit_code, result.stderr, "pg_restore", "copy-db")
