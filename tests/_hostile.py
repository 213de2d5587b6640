"""Helpers shared by the hostile-client tests (fuzz, crash, load, permissions).

Raw ioctls through ctypes (no cusedev client code in the loop, so the tests
see exactly what the kernel hands back), forked clients (a fork costs a
millisecond where a new Python costs seconds in the TCG VM), and probes of
the emulator process: alive, fd count, RSS.
"""

from __future__ import annotations

import ctypes
import os
import signal
import struct
import time
from collections.abc import Callable

from _server import IN_VM, assert_clean_log  # noqa: F401  (re-exported for the hostile tests)

from cusedev import control

libc = ctypes.CDLL(None, use_errno=True)
libc.ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)
libc.ioctl.restype = ctypes.c_int

PRESERVE, UNPRESERVE, RESTORE, GET_STATE, SET_EVENT, GET_FD_STATE, SET_FD_EVENT = (0xBA00 + i for i in range(7))
NORMAL, PREPARED, FROZEN, UPDATED = 1, 2, 3, 4
EV_PREPARE, EV_FREEZE, EV_FINISH, EV_CANCEL = 0, 1, 2, 3


def knob(name: str, host: float, vm: float) -> float:
    """An env-tunable count or duration with a default for the host and one for the TCG VM."""
    v = os.environ.get(name)
    return float(v) if v else (vm if IN_VM else host)


def ioctl(fd: int, cmd: int, buf: ctypes.Array | None) -> tuple[int, int]:
    """(rc, errno) of ioctl(fd, cmd, buf)."""
    r = libc.ioctl(fd, cmd, buf)
    return r, (ctypes.get_errno() if r < 0 else 0)


def get_state(fd: int) -> int:
    b = ctypes.create_string_buffer(struct.pack("=II", 8, 0), 8)
    r, e = ioctl(fd, GET_STATE, b)
    if r < 0:
        raise OSError(e, os.strerror(e))
    return struct.unpack_from("=I", b.raw, 4)[0]


def set_event(fd: int, ev: int) -> int:
    """SET_EVENT; returns the errno (0 on success)."""
    b = ctypes.create_string_buffer(struct.pack("=II", 8, ev), 8)
    return ioctl(fd, SET_EVENT, b)[1]


def preserve(fd: int, memfd: int, token: int) -> int:
    b = ctypes.create_string_buffer(struct.pack("=IiQ", 16, memfd, token), 16)
    return ioctl(fd, PRESERVE, b)[1]


def memfd(data: bytes = b"x" * 4096) -> int:
    fd = os.memfd_create("hostile", os.MFD_CLOEXEC)
    if data:
        os.write(fd, data)
    return fd


def status(dev: str) -> dict:
    return control.request(dev, "status")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def fd_links(pid: int | str = "self") -> dict[str, str]:
    """A process's fds and what each is (readlink), for leak checks and their failure messages."""
    out = {}
    for n in os.listdir(f"/proc/{pid}/fd"):
        try:
            out[n] = os.readlink(f"/proc/{pid}/fd/{n}")
        except OSError:  # closed meanwhile (the listing's own fd)
            pass
    return out


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def alive(pid: int) -> bool:
    """Running: not gone, not a zombie. One read, since the process may be reaped at any moment
    (opening /proc/<pid>/stat of a process being reaped fails with ENOENT or ESRCH)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][0] not in "ZX"
    except (FileNotFoundError, ProcessLookupError):
        return False


def fork(fn: Callable[[], object]) -> int:
    """Run ``fn`` in a forked child that never returns into pytest; its pid."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            fn()
        except BaseException:
            code = 1
        os._exit(code)
    return pid


def reap(pid: int, timeout: float = 30.0) -> int:
    """Wait for a child; returns its raw wait status (SIGKILL it at the deadline)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        p, st = os.waitpid(pid, os.WNOHANG)
        if p:
            return st
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    return os.waitpid(pid, 0)[1]


def open_retry(path: str, timeout: float = 10.0) -> int:
    """Open the device, retrying EBUSY while a dead opener's release is still on its way."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            if e.errno != 16 or time.monotonic() > deadline:
                raise
            time.sleep(0.01)
