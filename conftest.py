"""Loads the fixtures of tests/conftest.py for the top-level contract tests too.

Hooks live here, not there: tests/conftest.py is loaded twice (as a plugin and as the tests
folder's conftest), and a hook in it would run twice.
"""
import pytest

pytest_plugins = ["tests.conftest"]
ENGINES = ("sqlite", "postgresql")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests of a `both_engines` module run on each engine (except those marked `sqlite_only`)."""
    definition = metafunc.definition
    if ("engine" in metafunc.fixturenames and definition.get_closest_marker("both_engines")
            and not definition.get_closest_marker("sqlite_only")):
        metafunc.parametrize("engine", ENGINES, indirect=True)
