"""The fixtures of every test: a plugin the top-level conftest.py loads once for the whole suite.

Helpers the fixtures build on live in support.py.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import mmoref_server as mm
from tests.support import PASSWORD
from tests.support import POSTGRES_MISSING
from tests.support import Clock
from tests.support import Kit
from tests.support import LiveServer
from tests.support import Owner
from tests.support import PostgresCluster
from tests.support import Runner
from tests.support import location
from tests.support import login
from tests.support import postgres_bin


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never see the machine's MMOREF_* settings."""
    for name in list(os.environ):
        if name.startswith("MMOREF_"):
            monkeypatch.delenv(name)


@pytest.fixture
def engine(request: pytest.FixtureRequest) -> str:
    """The store's engine: SQLite unless the test runs on both."""
    return getattr(request, "param", "sqlite")


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    """One throwaway cluster for the session. Without PostgreSQL: skip, but fail under CI."""
    bin_dir = postgres_bin()
    if bin_dir is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI must run the PostgreSQL tests: {POSTGRES_MISSING}")
        pytest.skip(POSTGRES_MISSING)
    cluster = PostgresCluster(bin_dir)
    yield cluster
    cluster.stop()


@pytest.fixture
def db_path(engine: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    """MMOREF_DB: a SQLite file in the test's folder, or an empty database on the PostgreSQL cluster
    (given back after the test, for another test to empty and reuse)."""
    if engine == "postgresql":
        cluster = request.getfixturevalue("postgres_cluster")
        url = cluster.new_database()
        yield url
        cluster.give_back(url)
    else:
        yield str(tmp_path / "referrals.db")


def close_store(app: Any) -> None:
    """Close the app's store if the test opened it. On PostgreSQL that closes its connection pool:
    left open, ~140 pools held 570 threads in the pytest process and a PostgreSQL process or more each."""
    store = app.extensions.get("mmoref")
    if store is not None:
        store.close()


@pytest.fixture
def app(db_path: str) -> Iterator[Any]:
    """The app under test; its dashboard password is support.PASSWORD (MMOREF_ADMIN_PASSWORD)."""
    app = mm.create_app({"MMOREF_DB": db_path, "TESTING": True, "MMOREF_ADMIN_PASSWORD": PASSWORD})
    yield app
    close_store(app)


@pytest.fixture
def bare_app(db_path: str) -> Iterator[Any]:
    """An installation with no password configured (the stored-hash and first-run paths)."""
    app = mm.create_app({"MMOREF_DB": db_path, "TESTING": True})
    yield app
    close_store(app)


@pytest.fixture
def client(app: Any) -> Any:
    return app.test_client()


@pytest.fixture
def store(app: Any) -> mm.Store:
    with app.app_context():
        return mm.get_store()


@pytest.fixture
def runner(db_path: str) -> Runner:
    return Runner(db_path)


@pytest.fixture
def kit(client: Any, store: mm.Store) -> Kit:
    return Kit(client, store)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """Freeze the server clock (mm.now) at the current time; tests move it by hand."""
    frozen = Clock(int(time.time()))
    monkeypatch.setattr(mm, "now", frozen)
    return frozen


@pytest.fixture
def owner(client: Any) -> Owner:
    """The test client, logged in to the dashboard."""
    assert location(login(client)) == "/dashboard/"
    return Owner(client)


@pytest.fixture
def registered(kit: Kit) -> dict[str, Any]:
    """A referral of alice's, registered by player-7842 (delivery-log row 1)."""
    token = kit.token("alice")
    response = kit.send("registered", token, "reg-1")
    assert response.status_code == 200 and response.get_json()["state"] == "registered"
    return {"token": token, "referral_id": response.get_json()["referral_id"]}


@pytest.fixture
def live_server(db_path: str, tmp_path: Path) -> Iterator[Callable[..., LiveServer]]:
    """Start with `live_server()` (optionally env=, command=, cwd=, db_path=); stopped after the test."""
    started: list[LiveServer] = []

    def start(*, db_path: str | None = db_path, **kwargs: Any) -> LiveServer:
        server = LiveServer(db_path, tmp_path, **kwargs)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
