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


def scenario_slow_create(path: str) -> dict[str, Any]:
    """Creates "crash-create" (the test injected a delay and kills this process meanwhile)."""
    dev = SessionDevice(path)
    print(json.dumps({"pid": os.getpid()}), flush=True)
    dev.create_session("crash-create")
    return {"created": True}


def scenario_carry_for_retrieve(path: str) -> dict[str, Any]:
    dev = SessionDevice(path)
    s = dev.create_session("crash-retrieve")
    m = os.memfd_create("x")
    os.write(m, b"data")
    s.preserve(m, 1)
    dev.close()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the daemon; it tells its pid, so the test can kill it before the kexec
        os.setsid()
        os.write(w, str(os.getpid()).encode())
        null = os.open("/dev/null", os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        while True:
            time.sleep(60)
    return {"daemon": int(os.read(r, 32))}


def scenario_slow_retrieve_fd(path: str) -> dict[str, Any]:
    dev = SessionDevice(path)
    s = dev.retrieve_session("crash-retrieve")
    print(json.dumps({"pid": os.getpid()}), flush=True)
    s.retrieve(1)
    return {"retrieved": True}


def scenario_probe(path: str) -> dict[str, Any]:
    dev = SessionDevice(path)
    return {
        "create": _errno(lambda: dev.create_session("crash-create").close()),
        "retrieve": _errno(lambda: dev.retrieve_session("crash-retrieve")),
    }


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


def _killed_inside(emu: Any, scenario: str, rule: str) -> None:
    """Start ``scenario``, wait until it is inside the delayed call, SIGKILL it (the run's whole tree)."""
    import signal
    import subprocess

    emu.inject(rule)
    try:
        p = emu.popen([sys.executable, __file__, scenario, emu.path], stdout=subprocess.PIPE, text=True)
        assert p.stdout is not None
        pid = json.loads(p.stdout.readline())["pid"]
        time.sleep(0.5)  # well inside the 3 s delay
        os.kill(pid, signal.SIGKILL)
        p.wait(timeout=60)
    finally:
        emu.clear_injections()


def _emulator_fds(emu: Any) -> int:
    return len(os.listdir(f"/proc/{emu.pid}/fd"))


def test_client_killed_inside_create_session(emu: Any) -> None:
    before = _emulator_fds(emu)
    _killed_inside(emu, "slow_create", "create_session:delay=3s")
    time.sleep(3)  # the delayed call ends (cancelled): no session, no fd of ours left behind
    assert _run(emu, "probe") == {"create": "ok", "retrieve": "ENOENT"}
    assert _emulator_fds(emu) <= before


def test_client_killed_inside_retrieve_fd(emu: Any) -> None:
    _run(emu, "carry_for_retrieve")
    emu.kexec()  # kills the daemon after the carry
    _killed_inside(emu, "slow_retrieve_fd", "retrieve_fd:delay=3s")
    time.sleep(3)
    # the dead client's session fd was the last reference: implicit FINISH, the session is gone
    assert _run(emu, "probe") == {"create": "ok", "retrieve": "ENOENT"}


def test_daemon_killed_before_kexec_carries_nothing(emu: Any) -> None:
    import signal

    daemon = _run(emu, "carry_for_retrieve")["daemon"]
    os.kill(daemon, signal.SIGKILL)
    from _hostile import alive

    for _ in range(500):  # gone (its session released) before the kexec
        if not alive(daemon):  # (gone or a zombie; checked in one read: it may be reaped at any moment)
            break
        time.sleep(0.01)
    _run(emu, "probe")  # a round trip: the release queued by its death is served first
    emu.kexec()
    assert _run(emu, "probe")["retrieve"] == "ENOENT"


def test_vmm_session_example(emu: Any, tmp_path: Path) -> None:
    """examples/vmm_session.c: guest RAM in a session across `cusedev kexec`, and across its own reboot()."""
    import subprocess

    exe = tmp_path / "vmm_session"
    root = HERE.parent
    subprocess.run(["gcc", "-O2", "-Wall", "-Werror", "-I", str(root / "cdefs"), "-o", str(exe),
                    str(root / "examples" / "vmm_session.c")], check=True)  # fmt: skip
    one = emu.run([str(exe), "stage1", "-d", emu.path, "-s", "8"], capture_output=True, text=True, timeout=60)
    assert one.returncode == 0, one.stderr
    emu.kexec()
    two = emu.run([str(exe), "stage2", "-d", emu.path, "-s", "8"], capture_output=True, text=True, timeout=60)
    assert two.returncode == 0 and "8 MiB of guest RAM verified" in two.stdout, two.stdout + two.stderr
    one = emu.run([str(exe), "stage1", "-d", emu.path, "-n", "vmm-k", "-k"], capture_output=True, text=True,
                  timeout=60)  # fmt: skip
    two = emu.run([str(exe), "stage2", "-d", emu.path, "-n", "vmm-k"], capture_output=True, text=True, timeout=60)
    assert two.returncode == 0 and "verified" in two.stdout, one.stderr + two.stdout + two.stderr


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
