"""The fixtures of every test, from tests/fixtures.py, and the hooks.

The fixtures are a plugin loaded here once, for the top-level contract tests and tests/ alike.
They are not in tests/conftest.py: pytest would import that file a second time, as the tests
folder's conftest, under another module name, and every session fixture in it would run twice
(two PostgreSQL clusters, one per copy).
"""
import pytest

pytest_plugins = ["tests.fixtures"]
ENGINES = ("sqlite", "postgresql")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests of a `both_engines` module run on each engine (except those marked `sqlite_only`)."""
    definition = metafunc.definition
    if ("engine" in metafunc.fixturenames and definition.get_closest_marker("both_engines")
            and not definition.get_closest_marker("sqlite_only")):
        metafunc.parametrize("engine", ENGINES, indirect=True)
