"""Fixtures shared by the protocol tests."""

from tests.protocol.probe import probe_kind  # noqa: F401 - fixture
