"""A memfd preserved in a session, and the file RETRIEVE_FD makes of it (spec luo-session.md section 10).

Built on the device's memfd handler (``ShmemFile``: what is preservable,
ENOENT for the rest, how the pages are held: our duplicate of the caller's
fd, so nothing is copied).  What the session ABI adds: the object key of the
7.2 EBUSY rule (the inode), the offset read at kexec, and the seal rules of
the retrieved file: 7.2 keeps the seals saved at PRESERVE (a saved
F_SEAL_EXEC adds the write seals, because the new file's mode has exec
bits); 6.19 keeps none, so the file comes back with only F_SEAL_SEAL.
"""

from __future__ import annotations

import fcntl
import logging
import os
from collections.abc import Hashable

from ...device.memfd import ShmemFile

log = logging.getLogger(__name__)

F_SEAL_SEAL = 0x1
F_SEAL_SHRINK = 0x2
F_SEAL_GROW = 0x4
F_SEAL_WRITE = 0x8
F_SEAL_FUTURE_WRITE = 0x10
F_SEAL_EXEC = 0x20
_EXEC_IMPLIES = F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE | F_SEAL_FUTURE_WRITE


def seals_of(fd: int) -> int:
    try:
        return fcntl.fcntl(fd, fcntl.F_GET_SEALS)  # type: ignore[attr-defined]
    except OSError:
        return 0


class RetrievedMemfd:
    """The open file RETRIEVE_FD made; a repeat retrieval installs another fd to this same description."""

    __slots__ = ("fd",)

    def __init__(self, fd: int):
        self.fd = fd

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class PreservedMemfd:
    """``PreservedObject`` for a memfd: our hold on its pages, its inode key, its offset and seals."""

    __slots__ = ("file", "key", "seals", "pos")

    def __init__(self, fd: int):
        self.file = ShmemFile.probe(fd)  # ENOENT (fd closed) unless the kernel's memfd handler takes it
        st = os.fstat(fd)
        self.key: Hashable = (st.st_dev, st.st_ino)
        self.seals = seals_of(fd)  # 7.2 reads the seals at PRESERVE
        self.pos = 0

    @classmethod
    def saved(cls, fd: int, pos: int, seals: int) -> PreservedMemfd:
        """One loaded back from ``--state-dir`` (a memfd we made of the saved bytes)."""
        obj = cls(fd)
        obj.pos, obj.seals = pos, seals
        return obj

    @property
    def fd(self) -> int:
        return self.file.fd

    def freeze(self) -> None:
        """At kexec: the offset of the preserved open file description, as it is now."""
        self.pos = os.lseek(self.file.fd, 0, os.SEEK_CUR)

    def release(self) -> None:
        self.file.release()

    def rebuild(self, keep_seals: bool) -> RetrievedMemfd:
        """A new open file of the carried pages, read-write, at the frozen offset, with the profile's seals."""
        fd = os.open(f"/proc/self/fd/{self.file.fd}", os.O_RDWR | os.O_CLOEXEC)
        try:
            want = self.seals if keep_seals else F_SEAL_SEAL
            if keep_seals and want & F_SEAL_EXEC:
                want |= _EXEC_IMPLIES
            have = seals_of(fd)
            if have & ~want:  # seals the inode cannot shed (6.19 drops all, 7.2 those added later): a copy
                fd = self._copy(fd)
                have = seals_of(fd)
            if want & ~have:
                try:
                    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, want & ~have)  # type: ignore[attr-defined]
                except OSError as e:  # e.g. F_SEAL_WRITE on a file someone still maps writable
                    log.debug("retrieved memfd: seals %#x not added: %s", want & ~have, e)
            if self.pos:  # a new open file starts at 0
                os.lseek(fd, self.pos, os.SEEK_SET)
        except BaseException:
            os.close(fd)
            raise
        return RetrievedMemfd(fd)

    @staticmethod
    def _copy(src: int) -> int:
        """A new memfd with the same size and bytes, open to sealing (the caller adds the profile's seals)."""
        dst = os.memfd_create("", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            size = os.fstat(src).st_size
            os.ftruncate(dst, size)
            off = 0
            while off < size:
                n = os.copy_file_range(src, dst, size - off, off, off)
                if n <= 0:
                    break
                off += n
        except BaseException:
            os.close(dst)
            raise
        finally:
            os.close(src)
        return dst
