"""Which files can be preserved, and how a preserved memfd is held: the kernel's memfd_luo handler.

The emulator holds a reference to the caller's file (an fd pulled with
pidfd_getfd), so preserved bytes are never copied: after the emulated kexec
the same shmem pages are reopened as a new open file description.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import stat

from ..libc import fail, libc

TMPFS_MAGIC = 0x01021994




class _Statfs(ctypes.Structure):
    _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 112)]


def fs_type(fd: int) -> int:
    buf = _Statfs()
    if libc.fstatfs(fd, ctypes.byref(buf)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return buf.f_type


def check_usable(fd: int) -> None:
    """An O_PATH fd is not a file to the kernel's fdget: EBADF (and our copy is closed)."""
    if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_PATH:
        os.close(fd)
        raise fail(errno.EBADF)


class ShmemFile:
    """A preserved shmem file (memfd or unlinked tmpfs file), owned through ``fd``."""

    __slots__ = ("fd", "pos", "frozen_size")

    def __init__(self, fd: int):
        self.fd = fd
        self.pos = 0
        self.frozen_size = 0

    @classmethod
    def probe(cls, fd: int) -> ShmemFile:
        """Take ownership of ``fd`` if the kernel would preserve it, else ENOENT (fd closed)."""
        try:
            # F_GET_SEALS answers only on shmem (and hugetlbfs) files, and never asks a file's server:
            # a stat of a FUSE file, one of our own nodes above all, from the loop that serves it
            # would wait for itself (its attributes are re-read after a read() on it)
            fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            st = os.fstat(fd)
            ok = stat.S_ISREG(st.st_mode) and st.st_nlink == 0 and fs_type(fd) == TMPFS_MAGIC
        except OSError:
            ok = False
        if not ok:
            os.close(fd)
            raise fail(errno.ENOENT)
        return cls(fd)

    @property
    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def prepare(self) -> None:
        # the kernel pins pages [0, size-1]: an empty memfd cannot be prepared
        if self.size == 0:
            raise fail(errno.EINVAL)

    def freeze(self) -> None:
        self.frozen_size = self.size
        if self.frozen_size == 0:
            raise fail(errno.EINVAL)
        self.pos = os.lseek(self.fd, 0, os.SEEK_CUR)

    def cancel(self) -> None:
        return None

    def finish(self) -> None:
        return None

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def reopen(self) -> int:
        """A new open file description of the same pages, at the frozen position (O_CLOEXEC)."""
        fd = os.open(f"/proc/self/fd/{self.fd}", os.O_RDWR | os.O_CLOEXEC)
        os.lseek(fd, self.pos, os.SEEK_SET)
        return fd
