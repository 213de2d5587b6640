"""mount(2)/umount2(2) through ctypes, and /proc/self/mountinfo lookups."""

from __future__ import annotations

import ctypes
import errno
import os
from typing import NamedTuple

from ..libc import function

MS_NOSUID = 2
MS_NODEV = 4
MS_BIND = 4096
MNT_DETACH = 2

_mount = function("mount", [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p])
_umount2 = function("umount2", [ctypes.c_char_p, ctypes.c_int])


def _check(rc: int, what: str, path: str) -> None:
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}", path)


def mount(source: str, target: str, fstype: str | None, flags: int = 0, data: str | None = None) -> None:
    _check(_mount(source.encode(), target.encode(), fstype.encode() if fstype else None, flags,
                       data.encode() if data is not None else None), "mount", target)


def umount_lazy(target: str) -> None:
    """umount2(MNT_DETACH): never blocks on a busy or dead FUSE server."""
    _check(_umount2(target.encode(), MNT_DETACH), "umount", target)


def _unescape(field: str) -> str:
    # mountinfo octal-escapes space, tab, newline and backslash.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) + 0 and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


class Mount(NamedTuple):
    """One line of /proc/self/mountinfo: the mount's device number, its point and its type."""

    major: int
    minor: int
    point: str
    fstype: str


def mounts() -> list[Mount]:
    """Every mount of this mount namespace, in mount order (stacked ones each on its own line)."""
    out = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split(" ")
            major, minor = fields[2].split(":")
            out.append(Mount(int(major), int(minor), _unescape(fields[4]), fields[fields.index("-") + 1]))
    return out


def mountpoints() -> list[str]:
    """Every mount point of this mount namespace, in mount order."""
    return [m.point for m in mounts()]


def is_mountpoint(path: str) -> bool:
    return os.path.abspath(path) in mountpoints()


def mount_fstype(path: str) -> str | None:
    """The filesystem type of the topmost mount at ``path`` (None if ``path`` is not a mount point)."""
    want = os.path.abspath(path)
    found = None
    for m in mounts():
        if m.point == want:
            found = m.fstype
    return found


def clear_stale_fuse(path: str, fstypes: tuple[str, ...]) -> bool:
    """Lazy-unmount ``path`` if a *dead* FUSE server of one of ``fstypes`` left it mounted.

    A killed emulator's mounts stay and answer ENOTCONN (the connection is
    aborted with its /dev/fuse fd).  A live server answers statfs(), and a mount of
    any other type is someone else's: both are left alone (False).  Repeats for
    stacked mounts; True if anything was cleared.
    """
    cleared = False
    for _ in range(8):
        if mount_fstype(path) not in fstypes:
            break
        try:
            os.statvfs(path)  # never answered from the attribute cache, unlike stat()
        except OSError as e:
            if e.errno != errno.ENOTCONN:
                break
        else:
            break
        umount_lazy(path)
        cleared = True
    return cleared
