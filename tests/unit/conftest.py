"""Fixtures for the unit tests."""

from tests.unit.lake_helpers import lake  # noqa: F401  (a fixture, used by name)
