"""The examples (issue 6) run as tests: C and Python clients, the VMM pytest example, the pytest plugin's
failure report, the systemd unit and ``serve``'s readiness notification.

Python start-up is expensive in the CI VM, so one in-process emulator serves the client examples and
only what needs its own process (`cusedev run`, a pytest session, `cusedev serve`) spawns one.

The VM phase (``vm``) runs the examples as a user runs them on CUSE: the C and Python client tours, the
prepare/kexec/restore cycles (restored under `cusedev run` in the guest) and the VMM project's tests on
the plugin's fixtures.  The plugin's own session and failure report, the systemd unit and ``serve``'s
readiness protocol do not depend on the transport and run on the host only.
"""

from __future__ import annotations

import configparser
import importlib.util
import io
import os
import re
import select
import shlex
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from _server import READY_TIMEOUT, REPO, force_cleanup

from cusedev import Emulator
from cusedev.cli import build_parser
from cusedev.control import server

EXAMPLES = REPO / "examples"
TIMEOUT = 300
sys.path.insert(0, str(EXAMPLES))
import test_vmm_example  # noqa: E402  (collected here: the VMM example runs with the suite)

test_guest_ram_survives_live_update = pytest.mark.vm(test_vmm_example.test_guest_ram_survives_live_update)
test_vmm_survives_a_failed_freeze = pytest.mark.vm(test_vmm_example.test_vmm_survives_a_failed_freeze)


def _emulator_mounts() -> set[str]:
    with open("/proc/mounts") as f:
        return {line for line in f if "cusedev-emu-" in line}


def _our_mounts(emu: Emulator) -> list[str]:
    with open("/proc/mounts") as f:
        return [line for line in f if emu.tmpdir in line or os.path.basename(emu.tmpdir) in line]


@pytest.fixture(scope="module")
def emu(transport_name: str) -> Iterator[Emulator]:
    """One in-process emulator for the client examples (each leaves the machine as it found it)."""
    with Emulator(transport=transport_name, in_process=True, sysfs=None) as e:
        yield e
    assert not _our_mounts(e)


@pytest.fixture(scope="module")
def luo_client_c(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Built with the command documented at the top of the file (plus -Werror)."""
    src = (EXAMPLES / "luo_client.c").read_text()
    m = re.search(r"Build:\s+(gcc .*)", src)
    assert m, "the build command is documented"
    argv = shlex.split(m.group(1))
    exe = str(tmp_path_factory.mktemp("luo") / "luo_client")
    argv[argv.index("-o") + 1] = exe
    subprocess.run([*argv, "-Werror"], cwd=REPO, check=True, timeout=TIMEOUT)
    return exe


@pytest.fixture(scope="module")
def luo_client_py():
    spec = importlib.util.spec_from_file_location("luo_client_example", EXAMPLES / "luo_client.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


TOUR_LINES = [
    "GET_STATE() = 0 -> normal",
    "FD_PRESERVE(fd=9999, token=0x2002) = -1 EBADF (Bad file descriptor)",
    "GET_FD_STATE(token=0x1001, incoming=1) = -1 ENOENT (No such file or directory)",
    "SET_FD_EVENT(token=0x1001, FINISH) = -1 EBUSY (Device or resource busy)",
    "FD_UNPRESERVE(token=0x1001) = 0",
    "FD_RESTORE(token=0x1001) = -1 EBUSY (Device or resource busy)",
    "SET_EVENT(FREEZE) = -1 EINVAL (Invalid argument)",
    "SET_EVENT(PREPARE) = 0",
    "GET_STATE() = 0 -> prepared",
    "SET_EVENT(CANCEL) = 0",
    "GET_STATE(size=4) = -1 EINVAL (Invalid argument)",
    "ioctl(nr=7) = -1 EINVAL (Invalid argument)",
    "tour: ok",
]
RESTORE_LINES = [
    "GET_STATE() = 0 -> updated",
    "FD_RESTORE(token=0x77) = -1 EINVAL (Invalid argument)",
    "restored fd",
    "0 of 65536 bytes differ, O_CLOEXEC",
    "SET_FD_EVENT(token=0x77, FINISH) = 0",
    "SET_EVENT(FINISH) = 0",
    "restore: ok",
]


def _tour_ops(out: str) -> list[str]:
    """The call/result part of each line (fd numbers differ between C and Python)."""
    return [re.sub(r"fd=\d+", "fd=N", line) for line in out.splitlines()[1:]]


@pytest.mark.vm
def test_c_client_tour(emu: Emulator, luo_client_c: str) -> None:
    p = subprocess.run([luo_client_c, "tour", emu.path], capture_output=True, text=True, timeout=TIMEOUT)
    assert p.returncode == 0, p.stdout + p.stderr
    for line in TOUR_LINES:
        assert line in p.stdout
    assert emu.status()["state"] == "normal" and emu.status()["outgoing"] == []


@pytest.mark.vm
def test_python_client_tour_matches_c(emu: Emulator, luo_client_c: str, luo_client_py) -> None:
    out = io.StringIO()
    assert luo_client_py.main(["tour", emu.path], out=out) == 0, out.getvalue()
    c = subprocess.run([luo_client_c, "tour", emu.path], capture_output=True, text=True, timeout=TIMEOUT)
    assert _tour_ops(out.getvalue()) == _tour_ops(c.stdout)


@pytest.mark.vm
def test_c_client_prepare_kexec_restore(emu: Emulator, luo_client_c: str) -> None:
    held = subprocess.Popen([luo_client_c, "prepare", emu.path, "0x77"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert held.stdout is not None
        for line in held.stdout:
            if line.startswith("prepared:"):
                break
        assert emu.kexec()["live"]
        out, _ = held.communicate("\n", timeout=TIMEOUT)
        assert "GET_STATE() = -1 ENODEV" in out and "prepare: ok" in out
    finally:
        held.kill()
        held.wait()
    r = emu.run([luo_client_c, "restore", emu.path, "0x77"], capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0, r.stdout + r.stderr
    for line in RESTORE_LINES:
        assert line in r.stdout
    assert emu.status()["state"] == "normal"


@pytest.mark.vm
def test_python_client_prepare_kexec_restore(emu: Emulator, luo_client_py) -> None:
    class KexecOnEnter(io.StringIO):
        def readline(self, size: int | None = -1) -> str:  # type: ignore[override]
            emu.kexec()
            return "\n"

    out = io.StringIO()
    assert luo_client_py.main(["prepare", emu.path, "0x77"], out=out, stdin=KexecOnEnter()) == 0, out.getvalue()
    assert "GET_STATE() = -1 ENODEV" in out.getvalue()
    r = emu.run([sys.executable, str(EXAMPLES / "luo_client.py"), "restore", emu.path, "0x77"],
                capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0, r.stdout + r.stderr
    for line in RESTORE_LINES:
        assert line in r.stdout
    assert emu.status()["state"] == "normal"


# -- the pytest plugin -------------------------------------------------------------------------------
FAILING_TEST = '''
import pytest

@pytest.mark.liveupdate(in_process=True)
def test_fails(liveupdate_device):
    liveupdate_device.prepare()
    assert liveupdate_device.state.label == "normal", "on purpose"

def test_passes(liveupdate_emulator, liveupdate_device):
    assert liveupdate_emulator.transport in ("cuse", "fuse")
    assert liveupdate_device.state.label == "normal"
'''


def test_plugin_session_and_failure_report(tmp_path: Path, transport_name: str) -> None:
    """A session that loads only our plugin (-p, as the entry point would): fixtures, marker, the failure
    report, and the complete example of the docs (so it keeps working)."""
    (tmp_path / "test_user.py").write_text(textwrap.dedent(FAILING_TEST))
    docs = "".join(p.read_text() for p in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))])
    m = re.search(r"```python\n(# test_live_update.py.*?)```", docs, re.S)
    assert m, "README.md or docs/*.md has the complete example"
    (tmp_path / "test_live_update.py").write_text(m.group(1))
    before = _emulator_mounts()
    env = {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1", "CUSEDEV_TEST_TRANSPORT": transport_name,
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run([sys.executable, "-m", "pytest", "-p", "cusedev.pytest_plugin", "-p", "no:cacheprovider",
                        "-q", "test_user.py", "test_live_update.py"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "1 failed, 4 passed" in p.stdout
    report = p.stdout.split("cusedev trace", 1)
    assert len(report) == 2, p.stdout
    assert "ioctl(" in report[1] and "LIVEUPDATE_IOCTL_SET_EVENT" in report[1]
    assert "--- state normal → prepared ---" in report[1]
    assert _emulator_mounts() <= before  # the session's emulators left nothing mounted


def test_plugin_is_registered_by_entry_point() -> None:
    text = (REPO / "pyproject.toml").read_text()
    assert re.search(r'\[project\.entry-points\.pytest11\]\s*\ncusedev\s*=\s*"cusedev\.pytest_plugin"', text)
    import cusedev.pytest_plugin as plugin

    assert callable(plugin.liveupdate_emulator) and callable(plugin.liveupdate_device)


# -- systemd -------------------------------------------------------------------------------------
def test_systemd_unit_parses() -> None:
    unit = configparser.ConfigParser(strict=True, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string((EXAMPLES / "cusedev.service").read_text())
    svc = unit["Service"]
    assert svc["Type"] == "notify"
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    argv = shlex.split(svc["ExecStart"])
    assert argv[0].endswith("/cusedev") and argv[1] == "serve"
    args = build_parser().parse_args(argv[1:])  # every option is one `serve` knows
    assert args.device == "/dev/liveupdate" and args.transport == "auto"


def _notify_socket(abstract: bool, tmp_path: Path) -> tuple[socket.socket, str]:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    if abstract:
        name = f"cusedev-test-{os.getpid()}-{time.monotonic_ns()}"
        s.bind("\0" + name)
        return s, "@" + name
    path = str(tmp_path / "notify")
    s.bind(path)
    return s, path


def test_sd_notify_path_and_abstract(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for abstract in (False, True):
        s, addr = _notify_socket(abstract, tmp_path)
        with s:
            monkeypatch.setenv("NOTIFY_SOCKET", addr)
            assert server.sd_notify("READY=1")
            assert s.recv(100) == b"READY=1"
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not server.sd_notify("READY=1")
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert not server.sd_notify("READY=1")  # never fatal


def test_serve_sends_ready_and_stopping(tmp_path: Path, transport_name: str) -> None:
    s, addr = _notify_socket(True, tmp_path)
    dev = str(tmp_path / "liveupdate")
    env = {**os.environ, "NOTIFY_SOCKET": addr,
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with s, open(tmp_path / "serve.log", "wb") as log:
        p = subprocess.Popen([sys.executable, "-m", "cusedev", "serve", "--device", dev, "--transport",
                              transport_name, "--no-sysfs"], env=env, stdout=log, stderr=log)
        try:
            r, _, _ = select.select([s], [], [], READY_TIMEOUT)
            assert r, "no READY=1: " + (tmp_path / "serve.log").read_text()
            msg = s.recv(4096).decode().splitlines()
            assert msg[0] == "READY=1" and f"MAINPID={p.pid}" in msg
            assert os.path.exists(dev)  # ready means usable
            p.send_signal(signal.SIGTERM)
            r, _, _ = select.select([s], [], [], TIMEOUT)
            assert r and s.recv(4096) == b"STOPPING=1"
            assert p.wait(TIMEOUT) == 0
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
            force_cleanup(dev)
