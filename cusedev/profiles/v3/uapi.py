"""The v3 view of the UAPI: the generic declarations plus the v3 command table and name tables.

``cdefs/luo_v3.h`` is parsed with the generic headers (one cached cffi parse),
so ``uapi.LIVEUPDATE_*`` constants exist there as plain ints; everything
that *names* a v3 command, struct, state or event is here.  ``from
cusedev.profiles.v3 import uapi`` gives both: this module re-exports the
generic one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from ...uapi import *  # noqa: F403 - the v3 view includes every generic name
from ...uapi import CONSTANTS, IO, ffi

if TYPE_CHECKING:
    # the cdefs' constants and the LIVEUPDATE_IOCTL_* numbers are created at import time
    def __getattr__(name: str) -> int: ...

LIVEUPDATE_IOCTL_TYPE: int = CONSTANTS["LIVEUPDATE_IOCTL_TYPE"]

#: command suffix -> (argument struct, last field the kernel requires: IOCTL_OP's "last")
_LUO_COMMANDS: tuple[tuple[str, str], ...] = (
    ("FD_PRESERVE", "token"),
    ("FD_UNPRESERVE", "token"),
    ("FD_RESTORE", "token"),
    ("GET_STATE", "state"),
    ("SET_EVENT", "event"),
    ("GET_FD_STATE", "token"),
    ("SET_FD_EVENT", "token"),
)


class LiveupdateIoctl:
    """One LUO ioctl: number, names, argument struct, sizeof and min_size."""

    __slots__ = ("cmd", "nr", "name", "cmd_name", "ctype", "size", "min_size")

    def __init__(self, suffix: str, last: str) -> None:
        self.cmd_name = f"LIVEUPDATE_CMD_{suffix}"
        self.name = f"LIVEUPDATE_IOCTL_{suffix}"
        self.nr: int = CONSTANTS[self.cmd_name]
        self.cmd: int = IO(LIVEUPDATE_IOCTL_TYPE, self.nr)
        self.ctype = f"struct liveupdate_ioctl_{suffix.lower()}"
        self.size: int = ffi.sizeof(self.ctype)
        # offsetofend(struct, last): the kernel's minimum accepted "size".
        fields = dict(ffi.typeof(self.ctype).fields)
        self.min_size: int = fields[last].offset + ffi.sizeof(fields[last].type)

    def __repr__(self) -> str:
        return f"<{self.name} {self.cmd:#x} {self.ctype} size={self.size} min_size={self.min_size}>"


#: ioctl number -> LiveupdateIoctl, in command order.
LUO_IOCTLS: Mapping[int, LiveupdateIoctl] = {
    io.cmd: io for io in (LiveupdateIoctl(s, last) for s, last in _LUO_COMMANDS)
}
for _io in LUO_IOCTLS.values():
    globals()[_io.name] = _io.cmd

#: ioctl number -> "LIVEUPDATE_IOCTL_..."
IOCTL_NAMES: Mapping[int, str] = {cmd: io.name for cmd, io in LUO_IOCTLS.items()}
#: ioctl number -> "struct liveupdate_ioctl_..."
IOCTL_STRUCTS: Mapping[int, str] = {cmd: io.ctype for cmd, io in LUO_IOCTLS.items()}
#: command number (_IOC_NR) -> "LIVEUPDATE_CMD_..." (LIVEUPDATE_CMD_BASE is an alias, not listed)
CMD_NAMES: Mapping[int, str] = {io.nr: io.cmd_name for io in LUO_IOCTLS.values()}
#: enum liveupdate_event value -> "LIVEUPDATE_PREPARE", ...
EVENT_NAMES: Mapping[int, str] = dict(sorted(ffi.typeof("enum liveupdate_event").elements.items()))
#: enum liveupdate_state value -> C name ("LIVEUPDATE_STATE_NORMAL", ...)
STATE_CNAMES: Mapping[int, str] = dict(sorted(ffi.typeof("enum liveupdate_state").elements.items()))
#: enum liveupdate_state value -> the kernel's state string (sysfs, logs)
STATE_NAMES: Mapping[int, str] = {
    v: n.removeprefix("LIVEUPDATE_STATE_").lower() for v, n in STATE_CNAMES.items()
}


def _check_layout() -> None:
    """Refuse to run where the cffi prelude's plain u64 typedef is not 8-aligned (e.g. i386)."""
    want = {"fd_unpreserve": (16, "token", 8), "get_fd_state": (24, "state", 16)}
    for short, (size, field, off) in want.items():
        ct = f"struct liveupdate_ioctl_{short}"
        if ffi.sizeof(ct) != size or ffi.offsetof(ct, field) != off:
            raise ImportError(f"cusedev.profiles.v3: {ct} layout differs from the LUO ABI on this platform")


_check_layout()
