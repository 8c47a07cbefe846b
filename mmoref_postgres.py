"""mmoref's PostgreSQL engine, for several mmoref nodes sharing one PostgreSQL database.

A companion of mmoref_server.py: keep it beside that file (from the same release) and
`pip install -r requirements-postgres.txt`. mmoref_server.py imports it only when a database
location is a postgresql:// URL (MMOREF_DB, --db) or when copy-db runs; it then registers its
store in mmoref_server.ENGINES and the copy-db command on mmoref_server.cli.
Sections: schema, the engine (statements in psycopg's style, transactions, the store), copy-db.
"""
from __future__ import annotations

import contextlib
import functools
import re
import weakref
from collections.abc import Iterator
from collections.abc import Sequence
from typing import Any

import click

import mmoref_server as mm

try:
    import psycopg
    import psycopg_pool
    from psycopg.abc import Buffer
    from psycopg.adapt import Loader
    from psycopg.rows import dict_row
except ModuleNotFoundError:
    raise mm.StoreError("a postgresql:// MMOREF_DB needs psycopg: pip install -r requirements-postgres.txt") from None


# Schema ######################################################################
# mmoref_server.SCHEMA (and each migration after v6) is written once, in SQLite's words; these are
# PostgreSQL's for the few that differ. SQLite keeps any INTEGER in up to 64 bits and PostgreSQL's
# INTEGER has 32: Unix times (*_at, window_start) and the metrics counters (count) are BIGINT here,
# the small numbers stay INTEGER.

POSTGRES_WORDS = [
    (re.compile(r"\bINTEGER PRIMARY KEY\b"), "BIGSERIAL PRIMARY KEY"),  # SQLite's rowid alias: ids in insert order
    (re.compile(r"\b(\w+_at|window_start|count) INTEGER\b"), r"\1 BIGINT"),
    (re.compile(r"\bREAL\b"), "DOUBLE PRECISION"),
    (re.compile(r"\s*WITHOUT ROWID$"), ""),  # SQLite's choice of table layout; PostgreSQL has one
]
ROWID_TABLES = ("secrets",)  # read in SQLite's implicit rowid order (secrets made in one second): a column here


def postgres_schema(statement: str) -> str:
    """A statement of mmoref_server.SCHEMA or MIGRATIONS in PostgreSQL's words."""
    for pattern, words in POSTGRES_WORDS:
        statement = pattern.sub(words, statement)
    created = re.match(r"CREATE TABLE (\w+) \(", statement)
    if created and created.group(1) in ROWID_TABLES:
        statement = statement[:-1] + ", rowid BIGSERIAL NOT NULL)"
    return statement


# The engine ##################################################################

@functools.lru_cache(maxsize=1024)  # each statement is converted once
def _postgres_sql(sql: str) -> str:
    """A shared statement in psycopg's placeholder style: ? becomes %s (a literal % is doubled)."""
    return sql.replace("%", "%%").replace("?", "%s")


class _PostgresConnection:
    """A psycopg connection that takes the statements as written for both engines."""

    __slots__ = ("connection",)

    def __init__(self, connection: Any):
        self.connection = connection

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        return self.connection.execute(_postgres_sql(sql), params)


class _PostgresTransaction(mm.Transaction):
    """Where SQLite's BEGIN IMMEDIATE serialises every writer, PostgreSQL locks the rows read to decide."""

    __slots__ = ()
    ROW_LOCK = " FOR UPDATE"
    SHARE_LOCK = " FOR SHARE"

    def referral_for_event(self, referral_id: str, event: str, server_event_id: str) -> mm.Row | None:
        # Lock first: the read that follows then sees whatever the lock's previous holder committed.
        self.referral(referral_id)
        return super().referral_for_event(referral_id, event, server_event_id)


class _NumberLoader(Loader):
    """A NUMERIC value (sum() of integers, the sender's ts) as the int or float SQLite would give."""

    def load(self, data: Buffer) -> int | float:
        value = bytes(data).decode()
        return int(value) if value.lstrip("-").isdigit() else float(value)


def _configure(connection: psycopg.Connection[Any]) -> None:
    connection.adapters.register_loader("numeric", _NumberLoader)


class PostgresStore(mm.Store):
    """Many mmoref nodes on one PostgreSQL database: psycopg 3 and a connection pool.

    Each write is its own READ COMMITTED transaction (PostgreSQL's own group commit batches
    the fsyncs). The state machine's read-then-write holds because it locks the referral's
    row first (SELECT ... FOR UPDATE); the UNIQUE constraints are the last line, and a
    write that loses a race to one, to a deadlock or to a serialization failure is tried
    again. Installation-wide values live in the database, so a node needs only the URL.
    """

    NULL_SAFE_EQUAL = "IS NOT DISTINCT FROM"
    CONTAINS = "strpos({column}, ?) > 0"
    TRANSACTION = _PostgresTransaction
    MIGRATION_LOCK = 0x6D6D6F72  # pg_advisory_xact_lock key: one node migrates, the others wait
    POOL_SIZE = 16

    def __init__(self, url: str, busy_timeout: float = mm.CLI_BUSY_TIMEOUT):
        """Connect, migrate, open the pool; `busy_timeout`: how long a request waits for a connection."""
        super().__init__(url)
        self._migrate()
        self._pool = psycopg_pool.ConnectionPool(
            url, min_size=1, max_size=self.POOL_SIZE, timeout=busy_timeout, open=True,
            kwargs={"autocommit": True, "row_factory": dict_row},
            configure=_configure, check=psycopg_pool.ConnectionPool.check_connection)
        # Closed by close(), or at exit at the latest: left to its __del__ at interpreter
        # shutdown, the pool waits 5 s for each of its threads, which no longer run there
        # (Python 3.13: a gunicorn worker took 20 s to stop).
        self._close_pool = weakref.finalize(self, self._pool.close)
        self._load_installation_keys()

    def close(self) -> None:
        self._close_pool()  # once: later calls, and the finalizer at exit, do nothing

    @contextlib.contextmanager
    def _connection(self) -> Iterator[_PostgresConnection]:
        """A pooled connection. The store's boundary: what psycopg raises leaves as a StoreError."""
        try:
            with self._pool.connection() as connection:
                yield _PostgresConnection(connection)
        except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
            raise self._store_error(exc) from exc

    def _store_error(self, exc: Exception) -> mm.StoreError:
        """What psycopg raised, as a StoreError: a write that lost a race (a WriteConflict, tried again),
        PostgreSQL out of reach ("unreachable": a 503, the node recovers by itself), or a statement refused."""
        detail = " ".join(str(exc).split()) or type(exc).__name__
        where = f"PostgreSQL at {mm.database_label(self.location)}"
        if isinstance(exc, (psycopg.errors.UniqueViolation, psycopg.errors.TransactionRollback)):
            return mm.WriteConflict(f"{where}: a concurrent write won ({detail})")
        if isinstance(exc, (psycopg.OperationalError, psycopg_pool.PoolTimeout)):
            return mm.StoreError(f"{where} cannot be reached ({detail}): check that it is running and that"
                                 " MMOREF_DB is right", "unreachable")
        return mm.StoreError(f"{where} refused a statement ({detail})")

    _reading = _connection

    @contextlib.contextmanager
    def _writing(self) -> Iterator[_PostgresConnection]:
        with self._connection() as db, db.connection.transaction():
            yield db

    @contextlib.contextmanager
    def _snapshot(self) -> Iterator[_PostgresConnection]:
        with self._connection() as db, db.connection.transaction():
            db.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            yield db

    def database_bytes(self) -> int:
        return self._all("SELECT pg_database_size(current_database()) AS size")[0]["size"]

    def erase_freed_bytes(self) -> None:
        """VACUUM FULL rewrites the tables forget changed, leaving no old row version behind."""
        with self._connection() as db:
            db.execute("VACUUM FULL referrals, anchors, delivery_log, rejected_requests")

    def backup_to(self, path: str) -> None:
        raise mm.StoreError("back a PostgreSQL database up with pg_dump (and put it back with pg_restore)")

    def _migrate(self) -> None:
        """Create the tables in a new database, or run the migrations an older one lacks: once, however many
        nodes start together."""
        try:
            with psycopg.connect(self.location, autocommit=True, connect_timeout=10) as connection, \
                    connection.transaction():
                connection.execute("SELECT pg_advisory_xact_lock(%s)", (self.MIGRATION_LOCK,))
                version = 0
                if connection.execute("SELECT to_regclass('schema_version')").fetchall() != [(None,)]:
                    [(version,)] = connection.execute("SELECT version FROM schema_version").fetchall()
                statements = mm.schema_statements(version, mm.database_label(self.location))
                if version == 0:
                    connection.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
                    connection.execute("INSERT INTO schema_version VALUES (0)")
                for statement in statements:
                    connection.execute(postgres_schema(statement))
                connection.execute("UPDATE schema_version SET version = %s", (mm.SCHEMA_VERSION,))
        except psycopg.Error as exc:
            raise self._store_error(exc) from exc


# copy-db #####################################################################

# What copy-db moves (every table), parents first, each in an order that keeps ids and ties
COPIED_TABLES = {"meta": "key", "servers": "server_id", "secrets": "created_at, rowid", "referrals": "referral_id",
                 "anchors": "server_id, referee_identity", "delivery_log": "id", "rejected_requests": "id",
                 "daily_counts": "server_id, day", "referrer_counts": "server_id, referrer_code",
                 "dashboard_sessions": "session_id", "login_failures": "client", "client_hits": "scope, client",
                 "event_counts": "server_id, event, outcome", "rejection_counts": "status, error, reason",
                 "ingest_latency": "le"}
SERIAL_COLUMNS = {"secrets": "rowid", "delivery_log": "id", "rejected_requests": "id"}  # ids from a sequence


@mm.cli.command("copy-db")
@click.argument("source", metavar="SOURCE")
@click.argument("destination", metavar="DEST")
def copy_db_command(source: str, destination: str) -> None:
    """Copy a whole installation into an empty database: SQLite file or postgresql:// URL, either way.

    Servers, secrets, the token key (tokens minted before still verify), the dashboard
    password and session key, referrals, anchors, the delivery log and the counters. Stop
    the servers using SOURCE first, so that nothing is written during the copy.
    """
    if source == destination:
        raise mm.ConfigError("SOURCE and DEST are the same database")
    counts = copy_installation(mm._command_store(source), mm._command_store(destination, create=True))
    click.echo(f"copied {mm.database_label(source)} to {mm.database_label(destination)}: "
               + ", ".join(f"{count} {table}" for table, count in counts.items()))


def copy_installation(source: mm.Store, destination: mm.Store) -> dict[str, int]:
    """Copy every row of `source` into the empty `destination`, in one transaction; rows per table.

    Rows keep their ids, keys and values: the token key (tokens minted before still
    verify), the password hash and session key, secrets with their kids and expiries.
    """
    counts = {}
    with destination._writing() as db:
        _refuse_unless_empty(db, destination)
        db.execute("DELETE FROM meta")  # the keys made when DEST opened give way to SOURCE's
        for table, order in COPIED_TABLES.items():
            rows = source._all(f"SELECT * FROM {table} ORDER BY {order}")
            for row in rows:
                columns = list(row.keys())  # (iterating a sqlite3.Row gives its values)
                db.execute(f"INSERT INTO {table} ({', '.join(columns)})"
                           f" VALUES ({', '.join('?' * len(columns))})", tuple(row[column] for column in columns))
            if isinstance(destination, PostgresStore):
                _follow_copied_ids(db, table)
            counts[table] = len(rows)
    return counts


def _refuse_unless_empty(db: Any, destination: mm.Store) -> None:
    """A ConfigError unless `destination` holds nothing but the keys it made when it opened."""
    keys = ", ".join("?" * len(mm.INSTALLATION_KEYS))
    if db.execute(f"SELECT 1 AS found FROM meta WHERE key NOT IN ({keys}) LIMIT 1", mm.INSTALLATION_KEYS).fetchone() \
            or any(db.execute(f"SELECT 1 AS found FROM {table} LIMIT 1").fetchone()
                   for table in COPIED_TABLES if table != "meta"):
        raise mm.ConfigError(f"{mm.database_label(destination.location)} already holds data:"
                             " copy into a new, empty database")


def _follow_copied_ids(db: _PostgresConnection, table: str) -> None:
    """On PostgreSQL, rows copied in kept their ids: move the table's id sequence past them."""
    column = SERIAL_COLUMNS.get(table)
    if column:
        db.execute(f"SELECT setval(pg_get_serial_sequence('{table}', '{column}'),"
                   f" coalesce(max({column}), 0) + 1, false) FROM {table}")


mm.ENGINES["postgresql"] = mm.ENGINES["postgres"] = PostgresStore   # what open_store() opens for these URLs
