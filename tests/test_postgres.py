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

import mmoref_postgres as pg
import mmoref_server as mm
from tests.support import PYTHON
from tests.support import REFEREE
from tests.support import ROOT
from tests.support import SERVER_SCRIPT
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
from tests.support import run_ok
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
    store = mm.open_store(pg_url)
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
    mm.open_store(pg_url).close()
    rows(pg_url, "UPDATE schema_version SET version = ?", mm.SCHEMA_VERSION + 1)
    with pytest.raises(mm.StoreError, match=rf"newer mmoref \(schema v{mm.SCHEMA_VERSION + 1}.*upgrade"):
        mm.open_store(pg_url)
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
    migrated_tables = {statement.split()[2] for migration in mm.MIGRATIONS for statement in migration
                       if statement.startswith("CREATE TABLE")}
    new_tables = {statement.split()[2] for statement in mm.SCHEMA if statement.startswith("CREATE TABLE")}
    assert migrated_tables == set(pg.COPIED_TABLES) == new_tables


# What mmoref 1.1.0 created on PostgreSQL (schema v6), as it wrote it: a database made then keeps
# working, and a new one gets the same tables from the schema both engines share.
RELEASED_SCHEMA = [
    "CREATE TABLE schema_version (version INTEGER NOT NULL)",
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE servers (
        server_id TEXT PRIMARY KEY, game TEXT NOT NULL, name TEXT NOT NULL DEFAULT '',
        registration_url TEXT, identity_field TEXT NOT NULL DEFAULT 'username',
        referrals_enabled INTEGER NOT NULL DEFAULT 1, created_at BIGINT NOT NULL)""",
    # rowid: the creation order, which SQLite keeps implicitly (secrets made in one second)
    """CREATE TABLE secrets (
        kid TEXT PRIMARY KEY, server_id TEXT NOT NULL, secret TEXT NOT NULL,
        created_at BIGINT NOT NULL, expires_at BIGINT, rowid BIGSERIAL NOT NULL,
        rotation_nonce TEXT, revealed_at BIGINT)""",
    "CREATE INDEX secrets_by_server ON secrets (server_id, created_at)",
    "CREATE UNIQUE INDEX secrets_by_rotation_nonce ON secrets (server_id, rotation_nonce)",
    """CREATE TABLE referrals (
        referral_id TEXT PRIMARY KEY, server_id TEXT NOT NULL, referrer_code TEXT NOT NULL,
        state TEXT NOT NULL, referee_identity TEXT, issued_at BIGINT NOT NULL,
        updated_at BIGINT NOT NULL, ip_hash TEXT, user_agent TEXT, anchor_referral_id TEXT,
        test INTEGER NOT NULL DEFAULT 0)""",
    "CREATE INDEX referrals_by_server ON referrals (server_id, issued_at)",
    """CREATE TABLE anchors (
        server_id TEXT NOT NULL, referee_identity TEXT NOT NULL, referral_id TEXT NOT NULL,
        created_at BIGINT NOT NULL, PRIMARY KEY (server_id, referee_identity))""",
    """CREATE TABLE delivery_log (
        id BIGSERIAL PRIMARY KEY, server_id TEXT NOT NULL, referral_id TEXT NOT NULL,
        token_referral_id TEXT, event TEXT NOT NULL, server_event_id TEXT,
        outcome TEXT NOT NULL, received_at BIGINT NOT NULL, payload TEXT, referrer_code TEXT, ts NUMERIC,
        UNIQUE (token_referral_id, event, server_event_id))""",
    "CREATE INDEX delivery_log_by_server ON delivery_log (server_id, id)",
    "CREATE INDEX delivery_log_by_event ON delivery_log (server_id, event, id)",
    "CREATE INDEX delivery_log_by_outcome ON delivery_log (server_id, outcome, id)",
    "CREATE INDEX delivery_log_by_event_id ON delivery_log (server_id, server_event_id, id)",
    "CREATE INDEX delivery_log_by_code ON delivery_log (server_id, referrer_code, id)",
    "CREATE INDEX delivery_log_by_referral ON delivery_log (referral_id)",
    """CREATE TABLE rejected_requests (
        id BIGSERIAL PRIMARY KEY, server_id TEXT, status INTEGER NOT NULL, error TEXT NOT NULL,
        reason TEXT, hint TEXT, diagnosis TEXT, snippet TEXT, received_at BIGINT NOT NULL,
        repeats INTEGER NOT NULL DEFAULT 1, last_seen_at BIGINT)""",
    "CREATE INDEX rejected_by_server ON rejected_requests (server_id, id)",
    "CREATE INDEX rejected_by_last_seen ON rejected_requests (server_id, last_seen_at, id)",
    """CREATE TABLE daily_counts (
        server_id TEXT NOT NULL, day TEXT NOT NULL, clicked INTEGER NOT NULL DEFAULT 0,
        registered INTEGER NOT NULL DEFAULT 0, qualified INTEGER NOT NULL DEFAULT 0,
        reversed INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (server_id, day))""",
    """CREATE TABLE referrer_counts (
        server_id TEXT NOT NULL, referrer_code TEXT NOT NULL, clicked INTEGER NOT NULL DEFAULT 0,
        registered INTEGER NOT NULL DEFAULT 0, qualified INTEGER NOT NULL DEFAULT 0,
        reversed INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (server_id, referrer_code))""",
    "CREATE INDEX referrer_counts_by_qualified ON referrer_counts (server_id, qualified DESC, referrer_code)",
    """CREATE TABLE dashboard_sessions (
        session_id TEXT PRIMARY KEY, password_tag TEXT NOT NULL, created_at BIGINT NOT NULL)""",
    "CREATE TABLE login_failures (client TEXT PRIMARY KEY, failures INTEGER NOT NULL, last_at BIGINT NOT NULL)",
    "CREATE INDEX login_failures_by_weight ON login_failures (failures, last_at)",
    """CREATE TABLE client_hits (
        scope TEXT NOT NULL, client TEXT NOT NULL, window_start BIGINT NOT NULL,
        hits INTEGER NOT NULL, PRIMARY KEY (scope, client))""",
    "CREATE INDEX client_hits_by_window ON client_hits (scope, window_start)",
    """CREATE TABLE event_counts (
        server_id TEXT NOT NULL, event TEXT NOT NULL, outcome TEXT NOT NULL, count BIGINT NOT NULL,
        PRIMARY KEY (server_id, event, outcome))""",
    """CREATE TABLE rejection_counts (
        status INTEGER NOT NULL, error TEXT NOT NULL, reason TEXT NOT NULL, count BIGINT NOT NULL,
        PRIMARY KEY (status, error, reason))""",
    "CREATE TABLE ingest_latency (le TEXT PRIMARY KEY, count BIGINT NOT NULL, seconds DOUBLE PRECISION NOT NULL)",
]


def make_released_database(url: str) -> None:
    import psycopg
    with psycopg.connect(url, autocommit=True) as db:
        for statement in RELEASED_SCHEMA:
            db.execute(statement)
        db.execute("INSERT INTO schema_version VALUES (6)")


def tables_of(url: str) -> dict[str, list[tuple]]:
    """Every column (table, name, type, nullable, default) and index (name, definition) of the database."""
    return {"columns": sorted(rows(url, "SELECT table_name, column_name, data_type, is_nullable, column_default"
                                        " FROM information_schema.columns WHERE table_schema = 'public'")),
            "indexes": sorted(rows(url, "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'"))}


def test_a_new_database_gets_the_tables_mmoref_1_1_0_made(pg_url, postgres_cluster):
    mm.open_store(pg_url).close()
    released = postgres_cluster.new_database()
    try:
        make_released_database(released)
        assert tables_of(pg_url) == tables_of(released)
    finally:
        postgres_cluster.give_back(released)


def test_a_database_mmoref_1_1_0_made_keeps_working(pg_url):
    make_released_database(pg_url)
    store = mm.open_store(pg_url)
    secret, token = add_server(store), mint_tokens(store, ["alice"])[0]
    body = event_body("registered", token, "reg-1")
    status, answer = mm.handle_ingest(store, body, mm.signature_header(secret, body), window=300, ttl=3600)
    store.close()
    assert (status, answer["state"]) == (200, "registered")
    assert scalar(pg_url, "SELECT version FROM schema_version") == mm.SCHEMA_VERSION


def test_a_later_migration_runs_on_postgresql_in_its_words(pg_url, monkeypatch):
    mm.open_store(pg_url).close()
    monkeypatch.setattr(mm, "MIGRATIONS", [*mm.MIGRATIONS, ["ALTER TABLE servers ADD COLUMN paused_at INTEGER"]])
    monkeypatch.setattr(mm, "SCHEMA_VERSION", mm.SCHEMA_VERSION + 1)
    mm.open_store(pg_url).close()
    assert scalar(pg_url, "SELECT version FROM schema_version") == mm.SCHEMA_VERSION
    assert rows(pg_url, "SELECT data_type FROM information_schema.columns"
                        " WHERE table_name = 'servers' AND column_name = 'paused_at'") == [("bigint",)]


# The companion file under `python mmoref_server.py` #############################

def test_run_as_a_script_the_companion_registers_into_the_one_running_copy(live_server, pg_url):
    """As a script, mmoref_server.py is the module __main__: the companion's `import mmoref_server` must
    find it rather than load a second copy, whose engine registry the server would never read."""
    script = [PYTHON, "-X", "importtime", str(SERVER_SCRIPT), "serve", "--port", "{port}"]
    server = live_server(db_path=pg_url, command=script)   # healthy: its store is the companion's
    imported = [line.rsplit("|", 1)[1].strip() for line in server.output().splitlines()
                if line.startswith("import time:")]
    assert "psycopg" in imported           # the companion was loaded, and with it its driver,
    assert "mmoref_server" not in imported  # without importing mmoref_server.py a second time


def test_copy_db_is_found_as_a_command_of_the_script(tmp_path, pg_url):
    source = tmp_path / "source.db"
    run_ok([PYTHON, SERVER_SCRIPT, "demo", source])
    copied = run_ok([PYTHON, SERVER_SCRIPT, "copy-db", source, pg_url])
    assert copied.stdout.startswith(f"copied {source} to postgresql://"), copied.stdout
    assert scalar(pg_url, "SELECT server_id FROM servers") == mm.DEMO_SERVER_ID


def test_without_psycopg_a_postgresql_database_is_one_error_line():
    url = "postgresql://mmoref@127.0.0.1:1/referrals"
    without_psycopg = ("import runpy, sys; sys.modules['psycopg'] = None;"   # `import psycopg` then fails
                       " sys.argv.pop(0); runpy.run_path(sys.argv[0], run_name='__main__')")
    result = subprocess.run([PYTHON, "-c", without_psycopg, str(SERVER_SCRIPT), "log", "srv_1", "--db", url],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert_one_error_line(result.returncode, result.stderr, "needs psycopg", "pip install -r requirements-postgres.txt")


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
    store = mm.open_store(original)
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
        moved = mm.open_store(location)
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
    mm.open_store(pg_url).close()
    result = runner("backup", str(tmp_path / "copy.db"), "--db", pg_url, db=False)
    assert_one_error_line(result.exit_code, result.stderr, "pg_dump")
    assert not (tmp_path / "copy.db").exists()
    sqlite_backup = str(tmp_path / "backup.db")
    assert runner("demo", sqlite_backup, db=False).exit_code == 0
    result = runner("restore", sqlite_backup, "--db", pg_url, db=False)
    assert_one_error_line(result.exit_code, result.stderr, "pg_restore", "copy-db")


def test_a_write_that_lost_a_race_runs_again_in_a_new_transaction(pg_url):
    """The store retries a WriteConflict itself, for every write through group_commit (an event, a click,
    a refusal), up to WRITE_ATTEMPTS times in all."""
    store = mm.open_store(pg_url)
    tries: list[int] = []

    def loses_the_first_race(transaction: mm.Transaction) -> str:
        tries.append(1)
        if len(tries) == 1:
            raise mm.WriteConflict("a concurrent write won")
        return "written"

    def always_loses(transaction: mm.Transaction) -> None:
        tries.append(1)
        raise mm.WriteConflict("a concurrent write won")

    try:
        assert (store.group_commit(loses_the_first_race), len(tries)) == ("written", 2)
        tries.clear()
        with pytest.raises(mm.WriteConflict):
            store.group_commit(always_loses)
        assert len(tries) == mm.WRITE_ATTEMPTS
    finally:
        store.close()
