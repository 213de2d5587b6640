"""Reach into the calling process: its thread group, and its fds (pidfd_open + pidfd_getfd).

Only ever used on the process that made the current request, with the fd it
passed (issue 7's rule); nothing here walks other processes.
"""

from __future__ import annotations

import ctypes
import errno
import os

from ..libc import function

_syscall = function("syscall", restype=ctypes.c_long)

SYS_PIDFD_OPEN = 434
SYS_PIDFD_GETFD = 438


def status_values(tid: int, keys: tuple[bytes, ...]) -> dict[bytes, int]:
    """Integer fields (``b"Tgid:"``, ``b"FDSize:"``...) of /proc/<tid>/status; ESRCH if gone."""
    try:
        fd = os.open(f"/proc/{tid}/status", os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ProcessLookupError(errno.ESRCH, "no such process") from None
    try:
        text = os.read(fd, 16384)  # one read: the kernel formats the whole file anyway
    finally:
        os.close(fd)
    out: dict[bytes, int] = {}
    for key in keys:
        i = text.find(b"\n" + key)
        if i < 0:
            raise ProcessLookupError(errno.ESRCH, "no such process")
        i += len(key) + 1
        out[key] = int(text[i:text.find(b"\n", i)])
    return out


def tgid_of(tid: int) -> int:
    """The thread-group id of thread ``tid`` (pidfd_open wants the leader)."""
    return status_values(tid, (b"Tgid:",))[b"Tgid:"]


def pidfd_open(pid: int) -> int:
    fd = _syscall(SYS_PIDFD_OPEN, ctypes.c_int(pid), ctypes.c_uint(0))
    if fd < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return fd


# pidfd_open(tid, PIDFD_THREAD) (Linux 6.9+) names the calling thread itself, which
# saves the /proc/<tid>/status parse that finding its leader costs (~30 µs, most of an
# FD_PRESERVE).  None: not tried yet; False: this kernel refused the flag.
PIDFD_THREAD = os.O_EXCL
_thread_pidfds: bool | None = None


def _pidfd_of_thread(tid: int) -> int:
    """A pidfd through which pidfd_getfd reaches thread ``tid``'s fd table."""
    global _thread_pidfds
    if _thread_pidfds is not False:
        pfd = _syscall(SYS_PIDFD_OPEN, ctypes.c_int(tid), ctypes.c_uint(PIDFD_THREAD))
        if pfd >= 0:
            _thread_pidfds = True
            return pfd
        e = ctypes.get_errno()
        if e != errno.EINVAL or _thread_pidfds:
            raise OSError(e, os.strerror(e))
        _thread_pidfds = False  # an older kernel: flags it does not know are EINVAL
    return pidfd_open(tgid_of(tid))


def getfd(tid: int, fd: int) -> int:
    """A duplicate, in this process, of fd ``fd`` of the thread ``tid``'s process (O_CLOEXEC).

    Raises ``OSError(EBADF)`` when the fd is not open there, like the kernel's fdget.
    """
    if fd < 0:
        raise OSError(errno.EBADF, "Bad file descriptor")
    pfd = _pidfd_of_thread(tid)
    try:
        new = _syscall(SYS_PIDFD_GETFD, ctypes.c_int(pfd), ctypes.c_int(fd), ctypes.c_uint(0))
        if new < 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
        return new
    finally:
        os.close(pfd)
