"""Shared pytest configuration and fixtures of the cusedev test suite.

The suite runs in two phases (see scripts/test-all and docs/testing.md, "Which tests run where, and
why"): the HOST phase runs every test over the FUSE-file transport; the VM phase runs only the tests
marked ``vm`` (``pytest -m vm``), inside a TCG guest over real CUSE, because there each Python start
costs seconds.  ``CUSEDEV_TEST_TRANSPORT`` says which transport this run is for.

Emulator fixtures (one family, ``cusedev serve`` subprocesses as ``_server.ServerProc``):

``emulator``
    A fresh emulator for this test at ``<public_dir>/liveupdate``.
``shared_emulator``
    One emulator per module (a start is one interpreter start), reset after each test to a freshly
    booted machine.  Use it unless the test stops, kills or restarts the emulator, or needs it in a
    place of its own.

Both take their ``serve`` arguments from an indirect parameter
(``@pytest.mark.parametrize("emulator", [("--mode", "0660")], indirect=True)``) or else from the
closest ``@pytest.mark.serve(*args)`` marker (a module's ``pytestmark`` for ``shared_emulator``);
``{dir}`` in an argument is the emulator's own directory.

Seeds: the randomised tests (fuzz, crash) take their seed from the ``seeds`` fixture; the header and
the summary of every run print them.  To reproduce a run, set ``CUSEDEV_FUZZ_SEED`` /
``CUSEDEV_CRASH_SEED``, or pass ``--cusedev-seed fuzz=N`` (pytest arguments reach the VM's pytest too).
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from _server import ServerProc, assert_clean_stop, force_cleanup, mounts_below, reset

TRANSPORTS = ("fuse", "cuse")
#: name of a seeded test family -> the environment variable that fixes its seed
SEED_VARS = {"fuzz": "CUSEDEV_FUZZ_SEED", "crash": "CUSEDEV_CRASH_SEED"}
SEEDS_KEY = pytest.StashKey[dict[str, int]]()


def _transport_from_env() -> str:
    return os.environ.get("CUSEDEV_TEST_TRANSPORT", "fuse").strip().lower() or "fuse"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--cusedev-seed", action="append", default=[], metavar="FAMILY=N",
                     help=f"seed of a randomised test family ({', '.join(SEED_VARS)}); overrides its variable")


def _given_seeds(config: pytest.Config) -> dict[str, int]:
    """Seeds fixed by the command line, else by the environment."""
    given = {f: os.environ[v].strip() for f, v in SEED_VARS.items() if os.environ.get(v, "").strip()}
    for item in config.getoption("--cusedev-seed"):
        family, _, value = item.partition("=")
        if family not in SEED_VARS or not value:
            raise pytest.UsageError(f"--cusedev-seed {item!r}: expected FAMILY=N with FAMILY one of "
                                    f"{', '.join(SEED_VARS)}")
        given[family] = value
    try:
        return {f: int(v, 0) for f, v in given.items()}
    except ValueError as e:
        raise pytest.UsageError(f"a seed must be an integer: {e}") from None


def pytest_configure(config: pytest.Config) -> None:
    # A typo in the variable must stop the run, not quietly test the wrong thing.
    name = _transport_from_env()
    if name not in TRANSPORTS:
        raise pytest.UsageError(f"CUSEDEV_TEST_TRANSPORT={name!r}: expected one of {', '.join(TRANSPORTS)}")
    # Chosen once per run, so that the header can print them before any test uses them.
    given = _given_seeds(config)
    config.stash[SEEDS_KEY] = {f: given[f] if f in given else random.randrange(1 << 32) for f in SEED_VARS}
    # The fixtures of cusedev's pytest plugin (liveupdate_emulator, liveupdate_device) for a source
    # checkout too; an installed cusedev has already loaded it through its pytest11 entry point.
    import cusedev.pytest_plugin as plugin

    if not config.pluginmanager.is_registered(plugin):
        config.pluginmanager.register(plugin, "cusedev")


def _seed_line(config: pytest.Config) -> str:
    seeds = config.stash[SEEDS_KEY]
    return "cusedev seeds: " + " ".join(f"{SEED_VARS[f]}={s}" for f, s in seeds.items())


def pytest_report_header(config: pytest.Config) -> list[str]:
    return [f"cusedev transport: {_transport_from_env()}", _seed_line(config)]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    # Again at the end, where a failure's reader looks (the header may have scrolled away).
    seeds = config.stash[SEEDS_KEY]
    flags = " ".join(f"--cusedev-seed {f}={s}" for f, s in seeds.items())
    terminalreporter.write_line(f"{_seed_line(config)}  (to reproduce: set them, or pass {flags})")


@pytest.fixture(scope="session")
def transport_name() -> str:
    """The transport under test: ``"fuse"`` (host) or ``"cuse"`` (VM)."""
    return _transport_from_env()


@pytest.fixture(scope="session")
def seeds(pytestconfig: pytest.Config) -> dict[str, int]:
    """This run's seeds by family (``"fuzz"``, ``"crash"``), printed in the header and the summary."""
    return pytestconfig.stash[SEEDS_KEY]


def _public_dir() -> Path:
    # pytest's tmp_path is 0700: a non-root client could not reach a device below it
    d = Path(tempfile.mkdtemp(prefix="cusedev-test-", dir="/tmp"))
    d.chmod(0o755)
    return d


def _remove_public_dir(d: Path) -> None:
    for p in d.iterdir():
        force_cleanup(str(p))
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A fresh directory every user can traverse, with whatever a server left below it removed after."""
    d = _public_dir()
    try:
        yield d
    finally:
        _remove_public_dir(d)


def _serve_args(request: pytest.FixtureRequest, where: Path) -> list[str]:
    """The ``serve`` arguments of an emulator fixture: indirect parameter, else the closest marker."""
    if hasattr(request, "param"):
        args = tuple(request.param)
    else:
        marker = request.node.get_closest_marker("serve")
        args = marker.args if marker else ()
    return [str(a).replace("{dir}", str(where)) for a in args]


@pytest.fixture
def emulator(request: pytest.FixtureRequest, public_dir: Path, transport_name: str) -> Iterator[ServerProc]:
    """A fresh ``cusedev serve`` for this test at ``<public_dir>/liveupdate``."""
    with ServerProc(str(public_dir / "liveupdate"), transport_name, *_serve_args(request, public_dir)) as srv:
        srv.start()
        yield srv


@pytest.fixture(scope="module")
def _module_emulator(request: pytest.FixtureRequest, transport_name: str) -> Iterator[ServerProc]:
    d = _public_dir()
    try:
        with ServerProc(str(d / "liveupdate"), transport_name, *_serve_args(request, d)) as srv:
            srv.start()
            yield srv
            assert_clean_stop(srv)
        assert mounts_below(str(d)) == [], "the emulator left mounts behind"
    finally:
        _remove_public_dir(d)


@pytest.fixture
def shared_emulator(_module_emulator: ServerProc) -> Iterator[ServerProc]:
    """The module's emulator, reset to a freshly booted machine after the test."""
    yield _module_emulator
    reset(_module_emulator)
