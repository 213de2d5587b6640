"""Aborting our own FUSE/CUSE connections: the only way out for an emulator wedged on its own node.

An emulator's thread that waits for a reply from its own connection (a stat,
open or ioctl of its own FUSE file that the emulator had already read, or the
loop blocked in a request only that loop would read) cannot be ended by any
signal: once the server has read a request, the kernel waits for its answer
uninterruptibly, SIGKILL included, and the answer could only come from the
process being killed.  Its /dev/fuse fd is never closed (the wedged thread
keeps the fd table), so the connection never ends, and the process stays in D
state with its mounts for ever.  Writing to the connection's ``abort`` file
fails every pending and future request (ENOTCONN/ECONNABORTED), which frees
the waiting thread; a SIGKILLed process then exits.

A FUSE mount's connection is ``/sys/fs/fuse/connections/<N>`` (fusectl), N
the minor of the mount's device number, read from /proc/self/mountinfo:
nothing here touches a FUSE node, which could itself block.  A CUSE device's
is ``/sys/class/cuse/<name>``.  Connection numbers are reused as soon as a
connection ends, so ``connections()`` runs while the emulator is known to be
alive and records the identity (inode and ctime) of each connection's
directory; ``abort()`` writes only where that identity still matches: never
into a connection that is not ours.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass

from . import mount as sysmount

log = logging.getLogger(__name__)

FUSECTL = "/sys/fs/fuse/connections"
CUSE_CLASS = "/sys/class/cuse"
#: the types of our FUSE mounts: the device file's (transport/fusefile.py) and the sysfs tree's (control/sysfs.py)
FSTYPES = ("fuse.cusedev", "fuse.cusedev-sysfs")


@dataclass(frozen=True)
class Conn:
    """One connection of ours: its control directory and what proves it is still the same one."""

    dir: str
    ident: tuple[int, int]

    @classmethod
    def of(cls, d: str) -> Conn | None:
        try:
            st = os.stat(d)
        except OSError:
            return None
        return cls(d, (st.st_ino, st.st_ctime_ns))

    def abort(self) -> bool:
        """Abort the connection if its directory is still the one recorded; whether it was."""
        again = Conn.of(self.dir)
        if again is None or again.ident != self.ident:
            return False  # ended meanwhile, and its number may already be someone else's
        try:
            with open(os.path.join(self.dir, "abort"), "w") as f:
                f.write("1")
        except OSError as e:
            log.warning("abort %s: %s", self.dir, e.strerror)
            return False
        return True


def ensure_fusectl() -> bool:
    """Mount fusectl at /sys/fs/fuse/connections if it is not (systemd usually does); whether it is there."""
    if not os.path.isdir(FUSECTL):
        return False
    if sysmount.mount_fstype(FUSECTL) == "fusectl":
        return True
    try:
        sysmount.mount("fusectl", FUSECTL, "fusectl")
    except OSError as e:
        log.warning("mount fusectl at %s: %s", FUSECTL, e.strerror)
        return False
    return True


def fuse_minors(points: Iterable[str], fstypes: tuple[str, ...] = FSTYPES) -> list[int]:
    """The connection numbers of the FUSE mounts of ``fstypes`` at ``points`` (bind mounts included)."""
    wanted = {os.path.abspath(p) for p in points}
    found: list[int] = []
    for m in sysmount.mounts():
        if m.fstype in fstypes and m.major == 0 and m.point in wanted and m.minor not in found:
            found.append(m.minor)
    return found


def connections(points: Iterable[str], cuse_names: Iterable[str] = (),
                fstypes: tuple[str, ...] = FSTYPES) -> list[Conn]:
    """Our connections now: the FUSE mounts of ``fstypes`` at ``points`` and the CUSE devices ``cuse_names``."""
    dirs = [os.path.join(CUSE_CLASS, name.replace("/", "!")) for name in cuse_names]
    minors = fuse_minors(points, fstypes)
    if minors and ensure_fusectl():
        dirs += [os.path.join(FUSECTL, str(n)) for n in minors]
    return [c for d in dirs if (c := Conn.of(d)) is not None]


def abort(conns: Iterable[Conn]) -> list[str]:
    """Abort each of ``conns`` still alive as recorded; the directories aborted."""
    done = []
    for c in conns:
        with contextlib.suppress(OSError):
            if c.abort():
                done.append(c.dir)
    return done
