"""The store: the SQLite file (permissions, durability settings, schema version, migrations), /healthz.

PostgreSQL's own schema checks are in test_postgres.py."""
from __future__ import annotations

import os
import shutil
import sqlite3
import stat
import threading
from pathlib import Path

import pytest

import mmoref_server as mm
from tests.support import Runner
from tests.support import assert_one_error_line
from tests.support import database
from tests.support import permissive_umask
from tests.support import rows
from tests.support import scalar

pytestmark = pytest.mark.both_engines  # docs/contract.md holds on SQLite and on PostgreSQL

V1_TABLES = ("meta", "servers", "secrets", "referrals", "anchors", "delivery_log", "rejected_requests")
COUNTER_TABLES = ("daily_counts", "referrer_counts")


def mode(path: str | Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def dump(path: str | Path, tables: tuple[str, ...], columns_of: str | Path | None = None) -> dict[str, list[tuple]]:
    """Every row of `tables`, limited to the columns the tables have in `columns_of`."""
    def columns(table: str) -> str:
        return ", ".join(row[1] for row in rows(columns_of or path, f"PRAGMA table_info({table})"))

    return {table: sorted(rows(path, f"SELECT {columns(table)} FROM {table}"), key=repr) for table in tables}


@pytest.mark.sqlite_only
@pytest.mark.parametrize("creator", ["create_app", "cli", "demo"])
def test_database_file_is_created_owner_only(db_path, runner, creator):
    with permissive_umask():
        if creator == "create_app":
            mm.create_app({"MMOREF_DB": db_path})
        elif creator == "cli":
            assert runner("add-server", "srv_1", "--game", "g").exit_code == 0
        else:
            assert runner("demo", db_path, db=False).exit_code == 0
    assert mode(db_path) == 0o600


@pytest.mark.sqlite_only
@pytest.mark.parametrize(("env", "synchronous"), [({}, 2), ({"MMOREF_SYNCHRONOUS": "NORMAL"}, 1),
                                                  ({"MMOREF_SYNCHRONOUS": "full"}, 2)])
def test_wal_and_synchronous_mode(db_path, monkeypatch, env, synchronous):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    app = mm.create_app({"MMOREF_DB": db_path})
    with app.app_context():
        connection = mm.get_store().connect()
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert connection.execute("PRAGMA synchronous").fetchone()[0] == synchronous  # 2 FULL, 1 NORMAL
    with database(db_path) as independent:  # WAL is a property of the file
        assert independent.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_bad_synchronous_setting_is_one_error_line(runner, monkeypatch):
    monkeypatch.setenv("MMOREF_SYNCHRONOUS", "OFF")
    result = runner("add-server", "srv_1", "--game", "g")
    assert_one_error_line(result.exit_code, result.stderr, "MMOREF_SYNCHRONOUS")


@pytest.mark.sqlite_only
def test_user_version_is_the_schema_version(app, db_path):
    assert mm.SCHEMA_VERSION == len(mm.MIGRATIONS) >= 2
    assert scalar(db_path, "PRAGMA user_version") == mm.SCHEMA_VERSION


def tables_of(path: str) -> dict[str, tuple]:
    """Per table: its columns (name, type, not null, default, key), its indexes and whether it has a rowid."""
    found = {}
    with database(path) as db:
        for table, sql in db.execute("SELECT name, sql FROM sqlite_master WHERE type = 'table'").fetchall():
            columns = [column[1:] for column in db.execute(f"PRAGMA table_info({table})")]
            indexes = sorted((name, unique, origin, index_keys(db, name))
                             for _, name, unique, origin, _ in db.execute(f"PRAGMA index_list({table})").fetchall())
            found[table] = (columns, indexes, "WITHOUT ROWID" not in sql)
    return found


def index_keys(db: sqlite3.Connection, index: str) -> list[tuple]:
    """The key columns of an index: name, descending, collation."""
    return [column[2:5] for column in db.execute(f"PRAGMA index_xinfo('{index}')") if column[5]]


@pytest.mark.sqlite_only
def test_a_new_database_gets_the_tables_the_migrations_make(tmp_path):
    """SCHEMA (what a new database is made with) and MIGRATIONS (what brings an older one there) agree."""
    migrated, new = str(tmp_path / "v1.db"), str(tmp_path / "new.db")
    with database(migrated) as db:
        for statement in mm.MIGRATIONS[0]:
            db.execute(statement)
        db.execute("PRAGMA user_version = 1")
    mm.open_store(migrated).close()
    mm.open_store(new).close()
    assert tables_of(new) == tables_of(migrated)


def build_v1_copy(source: str, target: str) -> None:
    """`target`: only MIGRATIONS[0] applied, user_version 1, holding `source`'s v1 rows.

    The v1 tables are written by the same code paths later, so copying their v1 columns from
    a database the real pipeline filled gives the rows a v1 installation would have had.
    """
    with database(target) as db:
        for statement in mm.MIGRATIONS[0]:
            db.execute(statement)
        db.execute("PRAGMA user_version = 1")
        db.execute("ATTACH DATABASE ? AS source", (source,))
        for table in V1_TABLES:
            columns = ", ".join(row[1] for row in db.execute(f"PRAGMA main.table_info({table})"))
            db.execute(f"INSERT INTO main.{table} ({columns}) SELECT {columns} FROM source.{table}")
        db.execute("DETACH DATABASE source")


def test_v1_database_is_migrated_with_data_intact_and_counters_backfilled(tmp_path, runner):
    source, target = str(tmp_path / "lived.db"), str(tmp_path / "v1.db")
    assert runner("demo", source, db=False).exit_code == 0   # every state, through the real pipeline
    build_v1_copy(source, target)
    v1_copy = str(tmp_path / "v1-untouched.db")
    shutil.copy(target, v1_copy)
    v1_rows = dump(target, V1_TABLES)
    assert all(v1_rows[table] for table in ("servers", "referrals", "anchors", "delivery_log"))

    mm.open_store(target).close()

    assert scalar(target, "PRAGMA user_version") == mm.SCHEMA_VERSION
    assert dump(target, V1_TABLES, columns_of=v1_copy) == v1_rows
    # the backfill reproduces what the live code counted while the history happened
    assert dump(target, COUNTER_TABLES) == dump(source, COUNTER_TABLES)


def test_migrated_database_keeps_working(tmp_path, runner):
    source, target = str(tmp_path / "lived.db"), str(tmp_path / "v1.db")
    assert runner("demo", source, db=False).exit_code == 0
    build_v1_copy(source, target)

    minted = runner("mint-token", mm.DEMO_SERVER_ID, "--ref", "zed", "--json", "--db", target, db=False)
    assert minted.exit_code == 0, minted.stderr
    log = runner("log", mm.DEMO_SERVER_ID, "--json", "--db", target, db=False)
    assert len(log.json()) == len(rows(source, "SELECT id FROM delivery_log"))
    assert rows(target, "SELECT clicked FROM referrer_counts WHERE referrer_code = 'zed'") == [(1,)]


@pytest.fixture
def newer_database(db_path) -> str:
    mm.open_store(db_path).close()
    with database(db_path) as db:
        db.execute(f"PRAGMA user_version = {mm.SCHEMA_VERSION + 1}")
    return db_path


@pytest.mark.sqlite_only
@pytest.mark.parametrize("opener", [mm.open_store, lambda path: mm.create_app({"MMOREF_DB": path})],
                         ids=["Store", "create_app"])
def test_newer_database_is_refused(newer_database, opener):
    with pytest.raises(mm.StoreError, match=rf"newer mmoref \(schema v{mm.SCHEMA_VERSION + 1}.*upgrade"):
        opener(newer_database)
    assert scalar(newer_database, "PRAGMA user_version") == mm.SCHEMA_VERSION + 1  # left untouched


@pytest.mark.sqlite_only
def test_newer_database_is_refused_by_the_cli(newer_database, runner):
    result = runner("log", "srv_1")
    assert_one_error_line(result.exit_code, result.stderr, "newer mmoref", "upgrade")


@pytest.mark.sqlite_only
def test_garbage_file_is_refused_by_the_cli(db_path, runner):
    Path(db_path).write_bytes(b"this is not a database" * 100)
    result = runner("log", "srv_1")
    assert_one_error_line(result.exit_code, result.stderr, "not a usable SQLite database")


def test_what_the_driver_raises_leaves_the_store_as_a_store_error(store, engine):
    """The pipeline sees StoreError only: for a statement the database refuses, and for a write that breaks
    a UNIQUE constraint (on PostgreSQL a WriteConflict: a race lost to another node, tried again)."""
    def read_nowhere(transaction: mm.Transaction) -> None:
        transaction.db.execute("SELECT * FROM no_such_table")

    def write_a_key_twice(transaction: mm.Transaction) -> None:
        transaction.db.execute("INSERT INTO meta (key, value) VALUES ('token_key', 'another')")

    with pytest.raises(mm.StoreError):
        store.group_commit(read_nowhere)
    with pytest.raises(mm.WriteConflict if engine == "postgresql" else mm.StoreError):
        store.group_commit(write_a_key_twice)


def test_healthz_ok(client):
    response = client.get("/healthz")
    assert (response.status_code, response.json) == (200, {"ok": True})


def _replace_with_garbage(store: mm.Store, monkeypatch) -> None:
    store.close()  # the next request opens a fresh connection, as a new worker thread would
    for suffix in ("-wal", "-shm"):
        Path(store.path + suffix).unlink(missing_ok=True)
    Path(store.path).write_bytes(b"garbage!" * 1024)


def _make_the_store_fail(store: mm.Store, monkeypatch) -> None:
    def broken() -> sqlite3.Connection:
        raise sqlite3.OperationalError("disk I/O error")
    monkeypatch.setattr(store, "connect", broken)


@pytest.mark.sqlite_only
@pytest.mark.parametrize("breakage", [_replace_with_garbage, _make_the_store_fail], ids=["garbage", "failing"])
def test_healthz_503_when_the_database_is_unusable(client, store, monkeypatch, breakage):
    breakage(store, monkeypatch)
    response = client.get("/healthz")
    assert response.status_code == 503
    assert response.mimetype == "application/json"
    assert (response.json["ok"], response.json["error"]) == (False, "database unavailable")


def test_memory_is_refused_in_one_line():
    """Each connection would open a database of its own, and every referral would be lost at exit."""
    with pytest.raises(mm.StoreError, match=r"^:memory: cannot hold mmoref's database: name a file"):
        mm.open_store(":memory:")
    result = Runner(":memory:")("add-server", "srv_1", "--game", "g")
    assert_one_error_line(result.exit_code, result.stderr, ":memory: cannot hold mmoref's database")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the writer's end, as meant
def test_a_writer_thread_that_dies_leaves_later_writes_working(tmp_path):
    """A BaseException (SystemExit) in a piece of work ends the writer thread: its caller gets it, and the
    next write starts a new writer instead of waiting for the dead one."""
    store = mm.open_store(str(tmp_path / "referrals.db"))

    writers: list[threading.Thread] = []

    def stops(transaction: mm.Transaction) -> None:
        writers.append(threading.current_thread())
        raise SystemExit("stop")

    answers: list[object] = []
    later = threading.Thread(target=lambda: answers.append(store.group_commit(
        lambda transaction: transaction.server_exists("srv_1"))), daemon=True)
    try:
        with pytest.raises(SystemExit):
            store.group_commit(stops)
        writers[0].join(10)   # its end is reported within this test
        later.start()
        later.join(10)
        assert answers == [False]
    finally:
        store.close()
