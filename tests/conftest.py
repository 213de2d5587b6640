"""Shared pytest configuration for the cusedev test suite.

The suite runs twice (see scripts/test-all): on the host over the FUSE-file
transport, and inside a VM over real CUSE.  ``CUSEDEV_TEST_TRANSPORT`` says
which one this run is for.
"""

from __future__ import annotations

import os

import pytest

TRANSPORTS = ("fuse", "cuse")


def _transport_from_env() -> str:
    return os.environ.get("CUSEDEV_TEST_TRANSPORT", "fuse").strip().lower() or "fuse"


def pytest_configure(config: pytest.Config) -> None:
    # A typo in the variable must stop the run, not quietly test the wrong thing.
    name = _transport_from_env()
    if name not in TRANSPORTS:
        raise pytest.UsageError(f"CUSEDEV_TEST_TRANSPORT={name!r}: expected one of {', '.join(TRANSPORTS)}")
    # The fixtures of cusedev's pytest plugin (liveupdate_emulator, liveupdate_device) for a source
    # checkout too; an installed cusedev has already loaded it through its pytest11 entry point.
    import cusedev.pytest_plugin as plugin

    if not config.pluginmanager.is_registered(plugin):
        config.pluginmanager.register(plugin, "cusedev")


def pytest_report_header(config: pytest.Config) -> str:
    return f"cusedev transport: {_transport_from_env()}"


@pytest.fixture(scope="session")
def transport_name() -> str:
    """The transport under test: ``"fuse"`` (host) or ``"cuse"`` (VM)."""
    return _transport_from_env()
