"""Compare two traces call by call: did the two devices give the same answers to the same program?

A trace may come from the emulator's own tracer (``serve --trace``) or from the
ptrace recorder (``trace record``), against an emulator or a real kernel; both
are reduced to the same *calls*: every open of the device by a client, every
ioctl on a LUO file, every reboot(KEXEC).  A call is compared by what a client
can observe — command, the file it was made on (device, or a session by name),
the struct it passed, result and errno, the bytes written back, the kind of fd
it got or handed in — never by what legitimately differs between two runs:
pids, times, addresses (only NULL or not), fd numbers, inode numbers, the
emulator's model state (the kernel has none to show).

What the kernel and the emulator are known to do differently, on purpose or
because a userspace emulator cannot do otherwise, is listed in ``DEVIATIONS``;
such a difference is counted and named, but is not a divergence.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from .. import profiles
from .record import FORMAT_VERSION, errname, format_record, read_records

#: ioctls the VFS answers itself (fs/ioctl.c): they never reach a driver, so an emulator's own trace lacks them
VFS_IOCTLS = frozenset({0x5450, 0x5451, 0x5421, 0x5452, 0x5460})  # FIONCLEX FIOCLEX FIONBIO FIOASYNC FIOQSIZE
O_PATH = getattr(os, "O_PATH", 0o10000000)
_OPEN_MODE_BITS = os.O_ACCMODE | os.O_NONBLOCK | os.O_APPEND  # what a driver sees of open flags that matter


class DiffError(Exception):
    """A file that cannot be compared (not a trace, unreadable); the message is one line."""


@dataclass
class CallView:
    """One client-visible call of a trace, reduced to what is compared."""

    seq: int
    kind: str  # "open", "ioctl", "kexec"
    key: dict[str, Any]
    record: dict[str, Any]
    #: seen only by a recorder outside the driver (the VFS answered it): absent from an emulator's own trace
    vfs_only: bool = False


@dataclass
class Side:
    path: str
    header: dict[str, Any]
    calls: list[CallView]

    @property
    def own_trace(self) -> bool:
        """Written by the emulator itself (not by the ptrace recorder): sees only what reaches the driver."""
        return "recorder" not in self.header

    @property
    def device_kind(self) -> str:
        return str(self.header.get("device_kind", "emulator"))


@dataclass(frozen=True)
class Deviation:
    """A documented difference: ``applies(a, b)`` for the two differing calls (either order)."""

    name: str
    why: str
    applies: Callable[[CallView, CallView], bool]


def _errno_of(c: CallView) -> int:
    return int(c.key.get("errno", 0))


def _outside_run(a: CallView, b: CallView) -> bool:
    """The emulator installs fds only under `cusedev run`; outside it the fd-returning calls give EOPNOTSUPP."""
    return {_errno_of(a), _errno_of(b)} == {0, errno.EOPNOTSUPP} and a.kind == b.kind == "ioctl" and \
        a.key.get("cmd") == b.key.get("cmd") and a.key.get("cmd") in _FD_COMMANDS


_FD_COMMANDS = frozenset({0xBA00, 0xBA01, 0xBA41})

#: the documented deviations (docs/session-abi.md, fidelity table; docs/traces.md)
DEVIATIONS: tuple[Deviation, ...] = (
    Deviation("fd-install-needs-run", "an emulator outside `cusedev run` cannot install fds (EOPNOTSUPP)",
              _outside_run),
)


# -- reducing a trace to calls --------------------------------------------------------------------------
def _mask_fd(hexdata: str, offsets: Sequence[tuple[int, int]]) -> str:
    """The struct's fd fields (numbers differ between runs) as ``..`` pairs."""
    if not offsets:
        return hexdata
    chars = list(hexdata)
    for off, size in offsets:
        for i in range(2 * off, min(2 * (off + size), len(chars))):
            chars[i] = "."
    return "".join(chars)


class _Structs:
    """The fd fields of each command's struct, from the profile's tables (offset, size)."""

    def __init__(self, abi: str):
        self.fd_fields: dict[int, list[tuple[int, int]]] = {}
        try:
            profile = profiles.get(abi)
        except ValueError:
            return
        for kind in profile.kinds.values():
            for op in kind.ops:
                names = list(op.names)
                offs = []
                if "fd" in names:
                    from .record import fields_of

                    ffi = None
                    if any(h not in _generic_cdefs() for h in profile.cdefs):
                        from .. import uapi

                        ffi = uapi.load_ffi("types.h", *profile.cdefs)
                    for name, off, codec, _out in fields_of(op, ffi):
                        if name == "fd":
                            offs.append((off, codec.size))
                self.fd_fields[op.cmd] = offs


def _generic_cdefs() -> tuple[str, ...]:
    from .. import uapi

    return uapi.CDEF_FILES


def _file_key(f: Any) -> Any:
    """What is compared of a described file: its kind, and for shmem its size and contents' digest."""
    if not isinstance(f, dict):
        return None
    out = {k: f[k] for k in ("kind", "size", "sha256", "name") if k in f}
    if f.get("kind") == "other" and "mode" in f:
        out["mode"] = str(f["mode"])[:1]  # the file type letter only: permissions differ between machines
    return out


def session_names(records: list[dict[str, Any]], header: dict[str, Any]) -> dict[int, tuple[str, str | None]]:
    """fh -> (kind of open file, session name) for an emulator's own trace: its own opens of its node are the
    session files, made by the next successful CREATE/RETRIEVE_SESSION (in record order)."""
    own = header.get("emulator_pid")
    files: dict[int, tuple[str, str | None]] = {}
    pending: list[int] = []
    for r in records:
        t = r.get("type")
        if t == "open" and r.get("ret", 0) == 0 and "fh" in r:
            if own is not None and r.get("pid") == own:
                pending.append(int(r["fh"]))
                files[int(r["fh"])] = ("session", None)
            else:
                files[int(r["fh"])] = ("device", None)
        elif t == "ioctl" and r.get("cmd") in (0xBA00, 0xBA01) and not r.get("errno") and pending:
            fh = pending.pop(0)
            files[fh] = ("session", str((r.get("in") or {}).get("name", "")))
    return files


def reduce(records: Iterable[dict[str, Any]]) -> tuple[dict[str, Any], list[CallView]]:
    """(header, calls) of a trace's records (header first)."""
    recs = list(records)
    if not recs or recs[0].get("type") != "header":
        raise DiffError("not a cusedev trace (no header record)")
    header = recs[0]
    if header.get("format") != FORMAT_VERSION:
        raise DiffError(f"trace format {header.get('format')}, this cusedev reads {FORMAT_VERSION}")
    structs = _Structs(str(header.get("abi")))
    own = "recorder" not in header
    files = session_names(recs, header) if own else {}
    emulator_pid = header.get("emulator_pid") if own else None
    calls: list[CallView] = []
    for r in recs[1:]:
        t = r.get("type")
        seq = int(r.get("seq", 0))
        if t == "open":
            if emulator_pid is not None and r.get("pid") == emulator_pid:
                continue  # the emulator opening its own node for a session file: not a client's call
            flags = int(r.get("flags", 0))
            if flags & O_PATH:
                continue  # never reaches a driver
            err = int(r.get("errno", 0))
            # an emulator's own trace does not say which node an open was of; only its session node
            # answers ENXIO (a /proc re-open of a session fd, as on the kernel's anon inode)
            on = r.get("on", "session" if err == errno.ENXIO else "device")
            calls.append(CallView(seq, "open", {"flags": flags & _OPEN_MODE_BITS, "errno": err, "on": on}, r))
        elif t == "ioctl":
            cmd = int(r.get("cmd", 0))
            if "on" in r:
                on, name = r["on"], r.get("session")
            else:
                on, name = files.get(int(r.get("fh", 0)), ("device", None))
            fdf = structs.fd_fields.get(cmd, [])
            key: dict[str, Any] = {
                "cmd": cmd, "on": on, "session": name, "null": r.get("arg") == 0,
                "errno": int(r.get("errno", 0)), "ret": int(r.get("ret", 0)),
            }
            if "in_hex" in r:
                key["in_hex"] = _mask_fd(str(r["in_hex"]), fdf)
            if "out_hex" in r:
                key["out_hex"] = _mask_fd(str(r["out_hex"]), fdf)
            if "file" in r:
                key["file"] = _file_key(r["file"])
            if "ret_fd" in r:
                key["ret_fd"] = _file_key(r["ret_fd"])
            vfs = bool(r.get("vfs")) or cmd in VFS_IOCTLS
            calls.append(CallView(seq, "ioctl", key, r, vfs_only=vfs))
        elif t == "kexec":
            calls.append(CallView(seq, "kexec", {"errno": int(r.get("errno", 0))}, r))
    return header, calls


def load(path: str) -> Side:
    try:
        header, calls = reduce(read_records(path))
    except OSError as e:
        raise DiffError(f"{path}: {e.strerror}") from None
    except DiffError as e:
        raise DiffError(f"{path}: {e}") from None
    return Side(path, header, calls)


# -- comparing ---------------------------------------------------------------------------------------------
def _fields_differ(a: CallView, b: CallView) -> list[str]:
    """The names of the compared fields in which two aligned calls differ ("" when equal)."""
    if a.kind != b.kind:
        return ["kind"]
    out = []
    for k in sorted(set(a.key) | set(b.key)):
        va, vb = a.key.get(k), b.key.get(k)
        if k == "in_hex":
            if va is None or vb is None:
                continue  # how much of the struct was read depends on where a call stopped: compared below
            n = min(len(va), len(vb))
            if va[:n] != vb[:n]:
                out.append(k)
            continue
        if k in ("out_hex", "file", "ret_fd", "session") and (va is None or vb is None):
            continue  # one side could not see it (an emulator's trace does not describe returned fds)
        if k == "file" and isinstance(va, dict) and isinstance(vb, dict) and \
                {str(va.get("kind")), str(vb.get("kind"))} in ({"device", "other"}, {"session", "other"}):
            continue  # a LUO file handed in: the recorder names it, an emulator's own trace sees only its node
        if va != vb:
            out.append(k)
    return out


@dataclass
class Result:
    compared: int = 0
    divergences: list[tuple[CallView | None, CallView | None, list[str]]] = field(default_factory=list)
    deviations: dict[str, int] = field(default_factory=dict)
    skipped: int = 0

    @property
    def equal(self) -> bool:
        return not self.divergences


def _without_recorder(side: Side, other: Side) -> list[CallView]:
    """An emulator's own trace of a run that `trace record` recorded without kcmp holds the recorder's probes
    (its own GET_NAME on a duplicate of a client's fd): not the client's calls."""
    probe = other.header.get("recorder_pid")
    if not side.own_trace or probe is None:
        return side.calls
    return [c for c in side.calls if c.record.get("pid") != probe]


def compare(a: Side, b: Side) -> Result:
    """Align the two call lists one by one and compare each pair."""
    ca, cb = _without_recorder(a, b), _without_recorder(b, a)
    if a.own_trace or b.own_trace:  # one side sees only what reaches the driver: drop what the VFS answered
        n = len(ca) + len(cb)
        ca = [c for c in ca if not c.vfs_only]
        cb = [c for c in cb if not c.vfs_only]
        skipped = n - len(ca) - len(cb)
    else:
        skipped = 0
    res = Result(skipped=skipped)
    for i in range(max(len(ca), len(cb))):
        x = ca[i] if i < len(ca) else None
        y = cb[i] if i < len(cb) else None
        if x is None or y is None:
            res.divergences.append((x, y, ["missing"]))
            continue
        res.compared += 1
        diff = _fields_differ(x, y)
        if not diff:
            continue
        dev = next((d for d in DEVIATIONS if d.applies(x, y)), None)
        if dev is not None and set(diff) <= {"errno", "ret", "out_hex", "ret_fd"}:
            res.deviations[dev.name] = res.deviations.get(dev.name, 0) + 1
            continue
        res.divergences.append((x, y, diff))
    return res


def _describe(c: CallView, key: str) -> str:
    v = c.key.get(key)
    if key == "errno":
        return errname(int(v or 0)) if v else "0"
    return str(v)


def report(a: Side, b: Side, res: Result, *, limit: int = 5, out: TextIO | None = None) -> None:
    """The first ``limit`` divergences in the strace view, with both sides' record numbers, and a summary."""
    out = out or sys.stdout
    for x, y, fields in res.divergences[:limit]:
        where = f"A#{x.seq if x else '-'} B#{y.seq if y else '-'}"
        if fields == ["missing"]:
            only, c = ("A", x) if x is not None else ("B", y)
            assert c is not None
            out.write(f"{where}: only in {only}:\n  {only} {format_record(c.record) or c.record}\n")
            continue
        assert x is not None and y is not None
        what = ", ".join(f"{k} ({_describe(x, k)} vs {_describe(y, k)})" if k in ("errno", "on", "session", "ret")
                         else k for k in fields)
        out.write(f"{where}: differ in {what}\n  A {format_record(x.record)}\n  B {format_record(y.record)}\n")
    if len(res.divergences) > limit:
        out.write(f"... and {len(res.divergences) - limit} more\n")
    devs = ", ".join(f"{n} {k}" for k, n in sorted(res.deviations.items()))
    out.write(f"{res.compared} calls compared ({len(a.calls)} in A, {len(b.calls)} in B"
              + (f", {res.skipped} answered by the VFS left out" if res.skipped else "") + "): "
              + (f"{len(res.divergences)} divergences" if res.divergences else "equal")
              + (f"; documented deviations: {devs}" if devs else "") + "\n")


def diff(path_a: str, path_b: str, *, limit: int = 5, out: TextIO | None = None) -> int:
    """`cusedev trace diff`: 0 when the traces agree, 1 when they diverge."""
    a, b = load(path_a), load(path_b)
    if a.header.get("endian") != b.header.get("endian"):
        raise DiffError(f"{path_a} and {path_b} were recorded on machines of different byte order")
    res = compare(a, b)
    report(a, b, res, limit=limit, out=out)
    return 0 if res.equal else 1
