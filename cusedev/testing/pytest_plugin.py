"""pytest plugin (entry point ``pytest11``: installing cusedev is enough): emulator fixtures.

Fixtures:

``liveupdate_emulator``
    A fresh, started ``cusedev.Emulator`` per test, on a unique path (safe
    under pytest-xdist), stopped and cleaned up after the test whatever
    happened.  Transport: the best available (CUSE, else the FUSE file);
    ``CUSEDEV_TEST_TRANSPORT=cuse|fuse|auto`` overrides.  Options per test
    with the marker ``@pytest.mark.liveupdate(in_process=True, inject=[...],
    sysfs=None, trace=False, transport="fuse", abi="7.2")`` (keyword
    arguments of ``Emulator``).  The ABI profile defaults to
    ``--cusedev-abi`` (command line; default "v3").
``liveupdate_device``
    An open client of that emulator's profile: ``cusedev.client.LiveUpdateDevice``
    for v3, ``SessionDevice`` (``create_session(name)`` -> session) for 6.19/7.2.

Tests using them are skipped, with the reason, when not running as root or
when neither /dev/cuse nor /dev/fuse is usable.  When such a test fails, its
report gets a "cusedev trace" section with the tail of the emulator's trace
(and the emulator's log, if it wrote one).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Generator, Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:  # imported by the fixtures: every pytest run in an environment with cusedev loads this plugin
    from .emulator import Emulator

EMULATOR_KEY = pytest.StashKey["Emulator"]()
TRACE_TAIL_LINES = int(os.environ.get("CUSEDEV_TRACE_TAIL", "40"))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--cusedev-abi", default="v3", metavar="PROFILE",
                     help="ABI profile of the liveupdate_emulator fixture when a test's marker names none "
                          "(v3, 6.19, 7.2, mainline; default v3)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "liveupdate(**kwargs): options for the liveupdate_emulator fixture (cusedev.Emulator keyword "
        "arguments: in_process, inject, sysfs, trace, transport, state_dir, abi)",
    )


def _requested_transport() -> str:
    return os.environ.get("CUSEDEV_TEST_TRANSPORT", "auto").strip().lower() or "auto"


@functools.cache  # once per session: probing CUSE may run modprobe
def _skip_reason(transport: str) -> str | None:
    """Why this host cannot run an emulator for ``transport``, or None."""
    if os.geteuid() != 0:
        return "cusedev emulator needs root (it mounts FUSE or creates a CUSE device)"
    if transport == "fuse":
        try:
            os.close(os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC))
        except OSError as e:
            return f"cusedev emulator: /dev/fuse is not usable ({e.strerror})"
        return None
    from .emulator import available_transport

    best, why = available_transport()
    if best is None:
        return f"cusedev emulator: {why}"
    if transport == "cuse" and best != "cuse":
        return "cusedev emulator: CUSEDEV_TEST_TRANSPORT=cuse but /dev/cuse is not usable"
    return None


@pytest.fixture
def liveupdate_emulator(request: pytest.FixtureRequest) -> Iterator[Emulator]:
    """A fresh emulator for this test (see the module docstring for options)."""
    marker = request.node.get_closest_marker("liveupdate")
    kwargs: dict[str, Any] = dict(marker.kwargs) if marker else {}
    kwargs.setdefault("transport", _requested_transport())
    kwargs.setdefault("abi", request.config.getoption("--cusedev-abi", "v3"))
    why = _skip_reason(kwargs["transport"])
    if why:
        pytest.skip(why)
    from .emulator import Emulator

    emu = Emulator(**kwargs)
    request.node.stash[EMULATOR_KEY] = emu
    try:
        emu.start()
        yield emu
    finally:
        emu.stop()


@pytest.fixture
def liveupdate_device(liveupdate_emulator: Emulator) -> Iterator[Any]:
    """An open client of the emulator's profile (closed after the test, unless a kexec revoked it)."""
    dev = liveupdate_emulator.open()
    try:
        yield dev
    finally:
        dev.close()


def failure_section(emu: Emulator, lines: int = TRACE_TAIL_LINES) -> str:
    """The text a failure report shows: the trace tail, then the emulator's own log tail."""
    parts = [f"{emu!r}"]
    try:
        tail = emu.trace_tail(lines)
    except Exception as e:  # noqa: BLE001 - a report must never fail on this
        tail = [f"(trace unavailable: {e})"]
    parts.append(f"last {len(tail)} trace records ({emu.trace_path}):" if tail else "trace: no records")
    parts += tail
    log = emu.log().strip()
    if log:
        parts.append("emulator log (tail):")
        parts += log.splitlines()[-15:]
    return "\n".join(parts)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    outcome = yield
    report = outcome.get_result()
    if not report.failed:
        return
    emu = item.stash.get(EMULATOR_KEY, None)
    if emu is None:
        return
    # teardown removes the trace: only call/setup failures can show it (they come first)
    if call.when in ("setup", "call") and os.path.isdir(emu.tmpdir):
        report.sections.append(("cusedev trace", failure_section(emu)))
