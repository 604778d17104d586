"""Helpers shared by the tests, one module per concern (see tests/conftest.py for the fixtures)."""
