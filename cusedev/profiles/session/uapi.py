"""The session UAPI (``cdefs/luo_session.h``) as cffi sees it: numbers, layouts, struct formats.

The header gets an FFI of its own because it is an alternative to ``luo_v3.h``
(both define ``LIVEUPDATE_IOCTL_TYPE``), never a companion.  Every size and
offset below comes from cffi's layout of that one text, which the layout test
also compiles with gcc; the ``struct`` formats are derived from it and checked
at import, so the hot path never touches cffi.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass

from ... import uapi as generic

ffi = generic.load_ffi("types.h", "luo_session.h")  # cached per user, like the v3 parse
_lib = ffi.dlopen(None)

#: every enum member and #define of luo_session.h, name -> value
CONSTANTS: Mapping[str, int] = {n: getattr(_lib, n) for n in dir(_lib)}

IOCTL_TYPE: int = CONSTANTS["LIVEUPDATE_IOCTL_TYPE"]
NAME_LENGTH: int = CONSTANTS["LIVEUPDATE_SESSION_NAME_LENGTH"]
SESSION_BASE: int = CONSTANTS["LIVEUPDATE_CMD_SESSION_BASE"]


@dataclass(frozen=True, slots=True)
class Command:
    """One command of the session ABI: its number, names, struct and the kernel's ``IOCTL_OP`` minimum."""

    key: str  # short name used by handlers, traces and inject rules: "create_session", ...
    name: str  # the C macro: "LIVEUPDATE_IOCTL_CREATE_SESSION"
    nr: int
    cmd: int
    ctype: str
    size: int
    min_size: int
    fields: tuple[str, ...]
    struct: struct.Struct  # native layout; a name[] member is one ``64s`` bytes field


def _command(key: str, macro: str, cmd_name: str, tag: str, last: str) -> Command:
    ctype = f"struct {tag}"
    tp = ffi.typeof(ctype)
    fmt, pos, names = ["="], 0, []
    for fname, field in tp.fields:
        if field.offset > pos:
            fmt.append(f"{field.offset - pos}x")
        ftp = field.type
        if ftp.kind == "array":
            fmt.append(f"{ftp.length}s")
        else:
            signed = int(ffi.cast(ftp, -1)) < 0
            fmt.append({4: "iI", 8: "qQ"}[ffi.sizeof(ftp)][0 if signed else 1])
        pos = field.offset + ffi.sizeof(ftp)
        names.append(fname)
    total = ffi.sizeof(tp)
    if total > pos:
        fmt.append(f"{total - pos}x")
    st = struct.Struct("".join(fmt))
    assert st.size == total, (ctype, st.size, total)
    end = dict(tp.fields)[last]
    nr = CONSTANTS[cmd_name]
    return Command(
        key=key,
        name=macro,
        nr=nr,
        cmd=generic.IO(IOCTL_TYPE, nr),
        ctype=ctype,
        size=total,
        min_size=end.offset + ffi.sizeof(end.type),
        fields=tuple(names),
        struct=st,
    )


CREATE_SESSION = _command(
    "create_session", "LIVEUPDATE_IOCTL_CREATE_SESSION", "LIVEUPDATE_CMD_CREATE_SESSION",
    "liveupdate_ioctl_create_session", "name",
)  # fmt: skip
RETRIEVE_SESSION = _command(
    "retrieve_session", "LIVEUPDATE_IOCTL_RETRIEVE_SESSION", "LIVEUPDATE_CMD_RETRIEVE_SESSION",
    "liveupdate_ioctl_retrieve_session", "name",
)  # fmt: skip
PRESERVE_FD = _command(
    "preserve_fd", "LIVEUPDATE_SESSION_PRESERVE_FD", "LIVEUPDATE_CMD_SESSION_PRESERVE_FD",
    "liveupdate_session_preserve_fd", "token",
)  # fmt: skip
RETRIEVE_FD = _command(
    "retrieve_fd", "LIVEUPDATE_SESSION_RETRIEVE_FD", "LIVEUPDATE_CMD_SESSION_RETRIEVE_FD",
    "liveupdate_session_retrieve_fd", "token",
)  # fmt: skip
FINISH = _command(
    "finish", "LIVEUPDATE_SESSION_FINISH", "LIVEUPDATE_CMD_SESSION_FINISH", "liveupdate_session_finish", "reserved"
)
GET_NAME = _command(
    "get_name", "LIVEUPDATE_SESSION_GET_NAME", "LIVEUPDATE_CMD_SESSION_GET_NAME",
    "liveupdate_session_get_name", "name",
)  # fmt: skip

#: device commands in nr order, session-fd commands in nr order (GET_NAME last: 7.2 only)
DEVICE_COMMANDS: tuple[Command, ...] = (CREATE_SESSION, RETRIEVE_SESSION)
SESSION_COMMANDS: tuple[Command, ...] = (PRESERVE_FD, RETRIEVE_FD, FINISH, GET_NAME)
#: ioctl number -> command, both spaces
BY_CMD: Mapping[int, Command] = {c.cmd: c for c in (*DEVICE_COMMANDS, *SESSION_COMMANDS)}

assert [c.nr for c in DEVICE_COMMANDS] == list(range(len(DEVICE_COMMANDS)))
assert [c.nr - SESSION_BASE for c in SESSION_COMMANDS] == list(range(len(SESSION_COMMANDS)))
