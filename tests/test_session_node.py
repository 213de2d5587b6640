"""Session files live on a node of their own (issue 14): the emulator's session node.

The kernel makes a session fd on its shared anonymous inode, which has no
open: a re-open through ``/proc/self/fd/N`` is ENXIO, and the inode is mode
0600 root, so a non-root opener is refused first (EACCES).  The emulator's
session node (the second file of the FUSE mount; on CUSE a second device,
``<devname>-session``) answers the same, exists only while the emulator runs,
and a `cusedev run` process holding nothing but session fds is one of the run's
processes that a kexec ends.  (The /proc re-open and pread rows themselves are
in ``test_session_errno.py``.)
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

HOLDER = r"""
import os, sys, time
from cusedev.profiles.session.client import SessionDevice
dev = SessionDevice(sys.argv[1])
s = dev.create_session("held-by-daemon")
dev.close()                      # as the selftests' daemon: only the session fd is held
r, w = os.pipe()
if os.fork() == 0:
    os.setsid()
    os.write(w, str(os.getpid()).encode())
    null = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    while True:
        time.sleep(60)
print(os.read(r, 32).decode(), flush=True)
"""


@pytest.fixture()
def emu() -> Iterator[Any]:
    from session_emulator import SessionEmulator

    with SessionEmulator("7.2") as e:
        yield e


def _open_errno(path: str, uid: int = 0) -> int:
    """errno of open(path, O_RDWR) by a forked child running as ``uid`` (0: success)."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            if uid:
                os.setgid(uid)
                os.setuid(uid)
            os.close(os.open(path, os.O_RDWR | os.O_CLOEXEC))
        except OSError as e:
            code = e.errno or 255
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.mark.vm
def test_session_node_refuses_every_open_but_the_emulators_and_goes_at_stop(emu: Any) -> None:
    node = emu.status()["session_node"]
    assert node and node != emu.path
    st = os.stat(node)
    assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o600, 0, 0)  # the kernel's anon inode: 0600 root
    if emu.transport == "cuse":
        from cusedev.transport.cuse import devname_for, session_devname, session_rdev_of

        assert stat.S_ISCHR(st.st_mode) and node == "/dev/" + session_devname(devname_for(emu.path)[0]), node
        assert os.path.exists("/sys/class/cuse/" + os.path.basename(node))
        # how `trace record` finds it from the device alone (the device may be bind-mounted elsewhere)
        assert session_rdev_of(os.stat(emu.path).st_rdev) == st.st_rdev
    else:
        assert stat.S_ISREG(st.st_mode) and node.startswith("/run/cusedev/"), node
    assert _open_errno(node) == errno.ENXIO  # the device is free: still no open of the session node
    dev = os.open(emu.path, os.O_RDWR | os.O_CLOEXEC)
    try:
        assert _open_errno(node) == errno.ENXIO
        assert _open_errno(node, uid=65534) == errno.EACCES  # refused before the driver, as on the kernel
        assert _open_errno(emu.path) == errno.EBUSY  # the device node keeps its exclusive open
    finally:
        os.close(dev)
    assert _open_errno(emu.path) == 0  # nothing was held by the refused opens
    emu.stop()
    assert not os.path.lexists(node), f"{node} left behind after stop"
    if emu.transport == "cuse":
        assert not os.path.exists("/sys/class/cuse/" + os.path.basename(node))


@pytest.mark.vm
def test_kexec_ends_a_run_daemon_holding_only_session_fds(emu: Any) -> None:
    r = emu.run([sys.executable, "-c", HOLDER, emu.path], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    daemon = int(r.stdout.strip().splitlines()[-1])
    try:
        assert os.path.exists(f"/proc/{daemon}")
        emu.kexec()
        from _hostile import alive

        deadline = time.monotonic() + 30
        while alive(daemon) and time.monotonic() < deadline:  # one read: it may be reaped at any moment
            time.sleep(0.05)
        assert not alive(daemon), "the daemon survived the kexec"
    finally:
        try:
            os.kill(daemon, signal.SIGKILL)
        except ProcessLookupError:
            pass
    st = emu.status()
    assert [s["name"] for s in st["incoming"]] == ["held-by-daemon"], st  # carried, then its holder ended


def test_a_profile_without_session_files_has_no_session_node() -> None:
    from cusedev.testing.emulator import Emulator

    with Emulator(None, os.environ.get("CUSEDEV_TEST_TRANSPORT", "fuse") or "fuse", sysfs=None, trace=False) as e:
        st = e.status()
        assert st["abi"] == "v3" and st["session_node"] is None, st
