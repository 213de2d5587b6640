"""Moving fds between a caller and the emulator: pidfd_getfd in, seccomp ADDFD out, per trapped call.

In: ``take_fd`` duplicates a caller's fd into the emulator (the kernel's ``fdget``).
Out: FUSE cannot install an fd in a caller; a seccomp listener can.  Under
`cusedev run` the profile's fd-returning commands are trapped; the runtime
re-issues each from a worker thread on a copy of the caller's fd, with the
call's ``cookie`` as the argument, so that the request reaches the caller's
own open file through the kernel.  The device finds the ``TrappedCall`` by
its cookie and runs it with the real caller, its memory and an
``FdInstaller`` bound to the notification.  Each trapped call has its own
context, created and dropped on the loop thread.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import fcntl
import itertools
import os
import resource
import secrets
import struct
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..libc import fail, function
from . import pidfd
from .memfd import check_usable
from .seam import Caller, CallerMemory, FdInstaller

_ioctl = function("ioctl", (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong))

#: trapped-call cookies: a range no user pointer reaches on x86_64 (canonical user addresses < 2**47)
_COOKIE_BASE = 0xC05E_DE00_0000_0000
_cookies = itertools.count(1)


def take_fd(caller: Caller, fd: int) -> int:
    """Our duplicate (O_CLOEXEC) of the caller's ``fd``; EBADF when not open there or an O_PATH fd."""
    try:
        ours = pidfd.getfd(caller.tid, fd)
    except OSError as e:
        raise fail(errno.EBADF) from e
    check_usable(ours)
    return ours


class Notification(Protocol):
    """The part of ``cusedev.run.seccomp.Notification`` an installer needs."""

    def addfd(self, srcfd: int, newfd_flags: int = ...) -> int: ...


class SeccompInstaller:
    """Installs into a process stopped in a seccomp notification (SECCOMP_IOCTL_NOTIF_ADDFD)."""

    def __init__(self, notification: Notification):
        self.n = notification

    def reserve(self, caller: Caller) -> None:
        """The kernel takes an fd number before any check: EMFILE when the table is full.

        Exact, and cheap in the common case: the limit is per process (``prlimit`` takes a
        thread id), and when the highest number it allows is free in the calling thread's fd
        table (``/proc/<tid>/fdinfo/<limit-1>`` absent: one failed lookup), the kernel finds a
        free number below the limit.  Only a table using that very number costs the reads below."""
        tid = caller.tid
        try:
            soft, _hard = resource.prlimit(tid, resource.RLIMIT_NOFILE)
            if soft == resource.RLIM_INFINITY or not os.access(f"/proc/{tid}/fdinfo/{soft - 1}", os.F_OK):
                return
            # Every fd number from the table's size up is free: if that size is below the limit a
            # number is left, and the O(open fds) listing below (quadratic over a restore-all of
            # thousands of fds) is not needed.
            if pidfd.status_values(tid, (b"FDSize:",))[b"FDSize:"] < soft:
                return
            used = len(os.listdir(f"/proc/{tid}/fd"))
        except OSError:
            return
        if used >= soft:
            raise fail(errno.EMFILE)

    def install(self, caller: Caller, fd: int) -> int:
        return int(self.n.addfd(fd, os.O_CLOEXEC))


@dataclass(eq=False)
class TrappedCall:
    """One fd-returning ioctl of a `cusedev run` process, on its way through the emulator."""

    caller: Caller
    memory: CallerMemory
    installer: FdInstaller
    #: the caller's own ioctl argument (the re-issued call carries ``cookie`` instead)
    arg: int
    cookie: int = field(default_factory=lambda: _COOKIE_BASE | next(_cookies))
    #: the device's work for it when a handler completes later (cancelled if the caller dies)
    task: asyncio.Future[Any] | None = None
    cancelled: bool = False
    #: our open file the call reached (0: not yet): the re-issue path tags the caller's file with it
    fh: int = 0

    def cancel(self) -> None:
        """The trapped task died: stop the work done for it (its reply is then EINTR, read by nobody)."""
        self.cancelled = True
        if self.task is not None:
            self.task.cancel()


def reissue(fd: int, cmd: int, cookie: int) -> int:
    """In a worker thread: ioctl(fd, cmd, cookie) on our copy of the caller's fd; 0 or the errno."""
    if _ioctl(fd, cmd & 0xFFFFFFFF, cookie) < 0:
        return ctypes.get_errno()
    return 0


def reissue_and_close(fd: int, cmd: int, cookie: int, ours: Callable[[int], bool],
                      after: Callable[[int], object] | None = None) -> int | None:
    """In one worker thread: check, re-issue and close our copy ``fd`` of the caller's fd.

    One hop instead of three: each hand-off to a worker costs about as much as
    a plain ioctl round trip.  None when ``fd`` is not an open file of our node
    (the caller's ioctl then goes on to the kernel).  The close is here, not on
    the loop, because it may be the last reference of a CUSE file, whose
    RELEASE only the loop answers; it comes before the reply so that a caller
    closing its fd right after sees the release at once, as with the kernel.
    ``after(fd)`` runs between the re-issue and the close (the device tags the file).
    """
    try:
        if not ours(fd):
            return None
        err = reissue(fd, cmd, cookie)
        if after is not None:
            after(fd)
        return err
    finally:
        os.close(fd)


# -- tags: which open file of ours an fd is, without a request to the server --------------------------
#: struct flock (x86_64): l_type, l_whence, l_start, l_len, l_pid
_FLOCK = struct.Struct("hhqqi4x")
_FH_BITS = 32


class FileTags:
    """Tag our open file descriptions with an OFD lock and recognise them from fdinfo.

    An OFD lock belongs to the open file description, so every copy of an fd
    (dup, fork, SCM_RIGHTS, pidfd_getfd) carries it, and ``/proc/<tid>/fdinfo/<fd>``
    lists it (fs/locks.c ``show_fd_locks``: "lock:\t1: OFDLCK ADVISORY  READ -1
    MAJ:MIN:INO START END").  Neither setting nor reading it sends a request to
    our server (CUSE has no ->lock; our FUSE INIT leaves out FUSE_POSIX_LOCKS,
    so the kernel keeps locks itself), so both are safe on the loop's thread.
    One byte at ``instance << 32 | fh``: ``instance`` is random per emulator, so
    a file of another emulator (or of this node before a restart) never passes
    for ours, and the lock's inode must be one of the nodes we tagged.
    """

    #: open fdinfo files kept for the next call (a client calls on the same few fds again and again)
    FDINFO_CACHE = 16
    #: fdinfo texts already parsed to one of our fhs, at most (``lookup_fd``)
    KNOWN_TEXTS = 1024

    def __init__(self) -> None:
        self.instance = secrets.randbelow((1 << 30) - 1) + 1
        #: b"MAJ:MIN:INO" of the nodes whose files we tagged (the fdinfo spelling of an inode)
        self.nodes: set[bytes] = set()
        #: (tid, fd) -> our open /proc/<tid>/fdinfo/<fd>, most recent last (``lookup_fd``, loop thread only)
        self._fdinfo: OrderedDict[tuple[int, int], int] = OrderedDict()
        #: an fdinfo text -> the fh its tag names.  A text with our tag always means that fh: the lock
        #: lives and dies with its open file, and an fh is never reused, so the next identical read
        #: needs no parse.  Only hits are kept (a tag whose node is not registered yet may count later).
        self._known: dict[bytes, int] = {}

    def tag(self, fd: int, fh: int, fresh: bool = False) -> bool:
        """Lock one byte naming ``fh`` on ``fd``'s open file; False if it cannot carry a tag.

        A file that already has locks of its own (the client's) is left alone: a lock
        of the same owner over our byte would merge with or split around it.  ``fresh``:
        a new open of a node already tagged before, so neither check reads fdinfo."""
        if not 0 < fh < 1 << _FH_BITS or not fresh and self._locks(f"/proc/self/fdinfo/{fd}"):
            return False
        start = self.instance << _FH_BITS | fh
        for kind in (fcntl.F_RDLCK, fcntl.F_WRLCK):  # RDLCK conflicts with fewer client locks
            try:
                fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(kind, os.SEEK_SET, start, 1, 0))
                break
            except OSError as e:
                if e.errno != errno.EBADF:  # EBADF: not open for reading; EAGAIN: a client's lock
                    return False
        else:
            return False
        if fresh:
            return True
        for node, first, last in self._locks(f"/proc/self/fdinfo/{fd}"):
            if first == last == start:
                self.nodes.add(node)
                return True
        return False

    def lookup(self, path: str) -> int | None:
        """The fh of ours that the fd at ``path`` (``/proc/<tid>/fdinfo/<fd>``) is tagged with, or None."""
        for node, first, last in self._locks(path):
            if first == last and first >> _FH_BITS == self.instance and node in self.nodes:
                return first & ((1 << _FH_BITS) - 1)
        return None

    def lookup_fd(self, tid: int, fd: int) -> int | None:
        """``lookup`` of thread ``tid``'s fd ``fd``, with one ``pread`` of an fdinfo file kept open.

        A kept fdinfo file shows, at each read, whatever file that fd number holds then (the
        kernel looks it up anew), and it belongs to the task it was opened for, not to its number:
        once that task is gone every read fails, so a thread that reuses the number is never read
        through it; the file is then reopened by path.  On the loop's thread only."""
        key = (tid, fd)
        cache = self._fdinfo
        kept = cache.get(key)
        text = None
        if kept is not None:
            try:
                text = os.pread(kept, 4096, 0)
                cache.move_to_end(key)
            except OSError:
                del cache[key]
                os.close(kept)
        if text is None:
            try:
                kept = os.open(f"/proc/{tid}/fdinfo/{fd}", os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                return None
            try:
                text = os.read(kept, 4096)
            except OSError:
                os.close(kept)
                return None
            cache[key] = kept
            if len(cache) > self.FDINFO_CACHE:
                os.close(cache.popitem(last=False)[1])
        fh = self._known.get(text)
        if fh is not None:
            return fh
        for node, first, last in self._parse(text):
            if first == last and first >> _FH_BITS == self.instance and node in self.nodes:
                fh = first & ((1 << _FH_BITS) - 1)
                if len(self._known) >= self.KNOWN_TEXTS:
                    self._known.clear()
                self._known[text] = fh
                return fh
        return None

    def close(self) -> None:
        """Close the kept fdinfo files (shutdown)."""
        cache, self._fdinfo = self._fdinfo, OrderedDict()
        for kept in cache.values():
            os.close(kept)

    @classmethod
    def _locks(cls, path: str) -> list[tuple[bytes, int, int]]:
        """(inode, start, end) of the locks an fdinfo file lists (end -1: to EOF); none if unreadable."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return []
        try:
            text = os.read(fd, 4096)
        except OSError:
            return []
        finally:
            os.close(fd)
        return cls._parse(text)

    @staticmethod
    def _parse(text: bytes) -> list[tuple[bytes, int, int]]:
        out: list[tuple[bytes, int, int]] = []
        first = text.find(b"lock:")  # the lock lines come last (after pos, flags, mnt_id, ino)
        if first < 0:
            return out
        for line in text[first:].split(b"\n"):
            if line.startswith(b"lock:"):
                parts = line.split()
                try:
                    out.append((parts[-3], int(parts[-2]), -1 if parts[-1] == b"EOF" else int(parts[-1])))
                except (IndexError, ValueError):
                    out.append((b"", 0, -1))  # a lock all the same
        return out
