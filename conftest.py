"""Loads the fixtures of tests/conftest.py for the top-level contract tests too."""
pytest_plugins = ["tests.conftest"]
