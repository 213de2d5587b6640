"""Session fds are real fds (issue 14, item 2): dup, fork, SCM_RIGHTS, release on the last close, kexec.

Each scenario is a function of this file run as a program under `cusedev run`
against an emulator serving "7.2" (``python3 test_session_fds.py SCENARIO
DEVICE``); it prints one JSON line of facts that the test then checks, so the
checks stay in pytest and the program stays small.
"""

from __future__ import annotations

import array
import errno
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from cusedev.profiles.session.client import LuoSession, SessionDevice  # noqa: E402

pytestmark = pytest.mark.vm


def _errno(fn: Callable[[], Any]) -> str:
    try:
        fn()
    except OSError as e:
        return errno.errorcode.get(e.errno or 0, str(e.errno))
    return "ok"


def _send_fd(sock: socket.socket, fd: int) -> None:
    sock.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])


def _recv_fd(sock: socket.socket) -> int:
    fds = array.array("i")
    _msg, anc, _flags, _addr = sock.recvmsg(1, socket.CMSG_LEN(fds.itemsize))
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: fds.itemsize])
    return fds[0]


def _settle(dev: SessionDevice) -> None:
    """A round trip after a close: the kernel's RELEASE of the file was queued before it."""
    _errno(lambda: os.read(dev.fd, 1))


# ----------------------------------------------- scenarios (run under `cusedev run`) -----------------
def scenario_delegate(path: str) -> dict[str, Any]:
    """An agent holds /dev/liveupdate and hands a session fd to a client over SCM_RIGHTS."""
    facts: dict[str, Any] = {}
    dev = SessionDevice(path)
    s = dev.create_session("delegated")
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:  # the client: preserves its memfd through the session it was given
        a.close()
        fd = _recv_fd(b)
        sess = LuoSession(fd)
        m = os.memfd_create("client-ram")
        os.write(m, b"client data")
        sess.preserve(m, 42)
        b.sendall(sess.name.encode())
        b.recv(1)  # hold the session until told to go
        os._exit(0)
    b.close()
    _send_fd(a, s.fd)
    s.close()  # the agent's copy goes; the client's keeps the session
    facts["client_name"] = a.recv(64).decode()
    facts["exists_while_client_holds"] = _errno(lambda: dev.create_session("delegated"))
    a.sendall(b"g")
    os.waitpid(pid, 0)
    _settle(dev)
    t = dev.create_session("delegated")  # the client's exit was the last reference: released
    facts["after_client_exit"] = "ok"
    t.close()
    return facts


def scenario_fork_dup_outlive(path: str) -> dict[str, Any]:
    facts: dict[str, Any] = {}
    dev = SessionDevice(path)
    s = dev.create_session("forked")
    d = os.dup(s.fd)
    facts["dup_name"] = LuoSession(d).name
    dev.close()  # sessions outlive the device
    facts["name_after_device_close"] = s.name
    pid = os.fork()
    if pid == 0:
        m = os.memfd_create("child")
        LuoSession(s.fd).preserve(m, 1)
        os._exit(0)
    os.waitpid(pid, 0)
    dev = SessionDevice(path)
    facts["preserved_by_child_then_again"] = _errno(lambda: s.preserve(os.memfd_create("x"), 1))
    s.close()
    facts["exists_while_dup_open"] = _errno(lambda: dev.create_session("forked"))
    os.close(d)
    _settle(dev)
    dev.create_session("forked").close()
    facts["after_last_close"] = "ok"
    return facts


def scenario_hold(path: str) -> dict[str, Any]:
    """Stage 1 of a carry: a session with a memfd, one held by a daemon, one only in flight."""
    dev = SessionDevice(path)
    held = dev.create_session("held")
    m = os.memfd_create("ram")
    os.write(m, b"held bytes")
    held.preserve(m, 1)
    os.lseek(m, 5, os.SEEK_SET)
    flying = dev.create_session("in-flight")
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    _send_fd(a, flying.fd)
    flying.close()  # its only reference is now the unreceived message on b
    dev.create_session("released").close()
    dev.close()  # as the selftests do: only the session fds (and the socket) are held
    if os.fork() == 0:  # the daemon: holds `held`, `m` and the socket with the message
        os.setsid()
        null = os.open("/dev/null", os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        while True:
            time.sleep(60)
    return {"pid": os.getpid()}


def scenario_after(path: str) -> dict[str, Any]:
    dev = SessionDevice(path)
    facts: dict[str, Any] = {"released": _errno(lambda: dev.retrieve_session("released"))}
    h = dev.retrieve_session("held")
    fd = h.retrieve(1)
    facts["held_bytes"] = os.pread(fd, 64, 0).decode()
    facts["held_offset"] = os.lseek(fd, 0, os.SEEK_CUR)
    f = dev.retrieve_session("in-flight")
    facts["in_flight_name"] = f.name
    h.finish()
    return facts


SCENARIOS: dict[str, Callable[[str], dict[str, Any]]] = {
    n.removeprefix("scenario_"): fn for n, fn in globals().items() if n.startswith("scenario_")
}


# ------------------------------------------------------------ tests ---------------------------------
@pytest.fixture(scope="module")
def emu() -> Iterator[Any]:
    from session_emulator import SessionEmulator

    with SessionEmulator("7.2") as e:
        yield e


def _run(emu: Any, scenario: str) -> dict[str, Any]:
    r = emu.run([sys.executable, __file__, scenario, emu.path], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"{scenario}: rc {r.returncode}\n{r.stdout}\n{r.stderr}\n{emu.log()[-3000:]}"
    return dict(json.loads(r.stdout.strip().splitlines()[-1]))


def test_scm_rights_delegation(emu: Any) -> None:
    f = _run(emu, "delegate")
    assert f == {"client_name": "delegated", "exists_while_client_holds": "EEXIST", "after_client_exit": "ok"}


def test_fork_dup_and_device_close(emu: Any) -> None:
    f = _run(emu, "fork_dup_outlive")
    assert f == {
        "dup_name": "forked",
        "name_after_device_close": "forked",
        "preserved_by_child_then_again": "EEXIST",
        "exists_while_dup_open": "EEXIST",
        "after_last_close": "ok",
    }


def test_kexec_carries_held_and_in_flight_sessions_only(emu: Any) -> None:
    _run(emu, "hold")
    emu.kexec()  # the daemon dies after the carry; the message in flight goes with its socket
    f = _run(emu, "after")
    assert f == {"released": "ENOENT", "held_bytes": "held bytes", "held_offset": 5, "in_flight_name": "in-flight"}


def test_outside_cusedev_run(emu: Any) -> None:
    """Every check first, then EOPNOTSUPP and one log line naming `cusedev run`."""
    with SessionDevice(emu.path) as dev:
        assert _errno(lambda: dev.retrieve_session("no-such")) == "ENOENT"
        assert _errno(lambda: dev.create_session("")) == "EINVAL"
        assert _errno(lambda: dev.create_session("fine")) == errno.errorcode[errno.EOPNOTSUPP]
        assert _errno(lambda: dev.create_session("fine")) == errno.errorcode[errno.EOPNOTSUPP]
    assert "cusedev run" in emu.log()


if __name__ == "__main__":
    print(json.dumps(SCENARIOS[sys.argv[1]](sys.argv[2])), flush=True)
    sys.exit(0)
