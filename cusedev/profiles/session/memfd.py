"""A memfd preserved in a session, and the file RETRIEVE_FD makes of it (spec luo-session.md section 10).

Built on the device's memfd handler (``ShmemFile``: what is preservable,
ENOENT for the rest, how the pages are held: our duplicate of the caller's
fd, so nothing is copied).  What the session ABI adds: the object key of the
7.2 EBUSY rule (the inode), the offset read at kexec, and the seal rules of
the retrieved file: 7.2 keeps the seals saved at PRESERVE (a saved
F_SEAL_EXEC adds the write seals, because the new file's mode has exec
bits); 6.19 keeps none, so the file comes back with only F_SEAL_SEAL.

After a live update, ``prepare_ahead`` builds each carried memfd's retrieved
file in a thread beside the loop (a reopen of the same inode, the seals and
the frozen offset set: nothing of the bytes is touched), so that the first
RETRIEVE_FD only hands it out.  Nothing can see the difference: until it is
retrieved the carried inode is reachable only through the emulator, and its
offset and seals were frozen at the kexec.  A file that needs a copy (seals
the inode cannot shed) is left to RETRIEVE_FD, so the kexec and what follows
stay O(1) in bytes.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
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

    __slots__ = ("file", "key", "seals", "pos", "ready", "_lock", "_done")

    def __init__(self, fd: int):
        self.file = ShmemFile.probe(fd)  # ENOENT (fd closed) unless the kernel's memfd handler takes it
        st = os.fstat(fd)
        self.key: Hashable = (st.st_dev, st.st_ino)
        self.seals = seals_of(fd)  # 7.2 reads the seals at PRESERVE
        self.pos = 0
        #: the retrieved file built ahead (``prepare``), until RETRIEVE_FD takes it
        self.ready: RetrievedMemfd | None = None
        #: ``prepare`` (in its thread) against ``rebuild`` and ``release`` (on the loop): a build in
        #: progress is never raced by the close of the fd it reopens
        self._lock = threading.Lock()
        #: retrieved or released: nothing more to prepare
        self._done = False

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
        with self._lock:
            self._done = True
            ready, self.ready = self.ready, None
        if ready is not None:
            ready.release()
        self.file.release()

    def prepare(self, keep_seals: bool) -> None:
        """Build the retrieved file ahead (in ``prepare_ahead``'s thread); nothing if it needs a copy."""
        with self._lock:
            if self._done or self.ready is not None:
                return
            try:
                self.ready = self._build(keep_seals, copy=False)
            except OSError as e:  # left to RETRIEVE_FD, which reports it
                log.debug("retrieved memfd not built ahead: %s", e)

    def rebuild(self, keep_seals: bool) -> RetrievedMemfd:
        """A new open file of the carried pages, read-write, at the frozen offset, with the profile's seals."""
        with self._lock:
            self._done = True
            ready, self.ready = self.ready, None
        if ready is not None:
            return ready
        got = self._build(keep_seals, copy=True)
        assert got is not None
        return got

    def _build(self, keep_seals: bool, copy: bool) -> RetrievedMemfd | None:
        """``rebuild``'s work; None instead of a copy when ``copy`` is False."""
        fd = os.open(f"/proc/self/fd/{self.file.fd}", os.O_RDWR | os.O_CLOEXEC)
        try:
            want = self.seals if keep_seals else F_SEAL_SEAL
            if keep_seals and want & F_SEAL_EXEC:
                want |= _EXEC_IMPLIES
            have = seals_of(fd)
            if have & ~want:  # seals the inode cannot shed (6.19 drops all, 7.2 those added later): a copy
                if not copy:
                    os.close(fd)
                    return None
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


def prepare_ahead(objs: list[object], keep_seals: bool) -> None:
    """After a live update: build the retrieved file of each carried memfd in one thread beside the loop."""
    todo = [o for o in objs if isinstance(o, PreservedMemfd)]
    if todo:
        threading.Thread(target=_prepare_all, args=(todo, keep_seals), name="cusedev-retrieve-ahead",
                         daemon=True).start()


def _prepare_all(objs: list[PreservedMemfd], keep_seals: bool) -> None:
    for o in objs:
        o.prepare(keep_seals)
