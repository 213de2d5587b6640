"""`cusedev trace record`: the LUO calls of a command, recorded with ptrace against whatever device it uses.

The emulator's own tracer sees only the emulator.  This recorder sits on the
client's side of the kernel instead, so a run against a real kernel's
``/dev/liveupdate`` gives a trace in the same format (and against an
emulator too, which makes the two directly comparable with `trace diff`).

How: the command is started stopped, seized (PTRACE_SEIZE with TRACESYSGOOD
and the fork/vfork/clone/exec/exit options, so every child is traced too)
and run from syscall stop to syscall stop.  At each stop
PTRACE_GET_SYSCALL_INFO gives the number, arguments and result; only
``ioctl`` on a LUO file, ``open``/``openat`` of the device and
``reboot(KEXEC)`` are looked at (the struct is read with process_vm_readv at
entry and exit), every other syscall just continues.  The recorder writes
nothing into the traced processes and holds none of their files across a
stop, so the command behaves as without it.

Which fd is what is decided from outside, through /proc: the device is any
path that is the device node (the kernel's misc char device, an emulator's
CUSE node or FUSE file), a session fd of the kernel reads
``anon_inode:[luo_session] NAME``; an emulator's session fd is an open of its
session node (the CUSE device named after the device's, or the other file of
its FUSE mount), matched by kcmp with the fd CREATE or RETRIEVE_SESSION
returned for its name.  Each open file gets an ``fh``
number, as in the emulator's own traces.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import platform
import re
import shutil
import signal
import stat
import struct
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import __version__, profiles
from ..device import pidfd
from ..device.dispatch import U32, op_for
from ..libc import function
from .record import FORMAT_VERSION, describe_file, errname, fields_of, proc_ids

log = logging.getLogger(__name__)

_ptrace = function("ptrace", (ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p), ctypes.c_long)
_syscall = function("syscall", restype=ctypes.c_long)
_probe_ioctl = function("ioctl", (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p))


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


_readv = function("process_vm_readv", (ctypes.c_int, ctypes.POINTER(_IoVec), ctypes.c_ulong,
                                       ctypes.POINTER(_IoVec), ctypes.c_ulong, ctypes.c_ulong), ctypes.c_ssize_t)

# ptrace requests and options (linux/ptrace.h)
PTRACE_SYSCALL, PTRACE_DETACH = 24, 17
PTRACE_GETEVENTMSG, PTRACE_SEIZE, PTRACE_INTERRUPT, PTRACE_LISTEN = 0x4201, 0x4206, 0x4207, 0x4208
PTRACE_GET_SYSCALL_INFO = 0x420E
OPTIONS = 0x01 | 0x02 | 0x04 | 0x08 | 0x10 | 0x40  # TRACESYSGOOD FORK VFORK CLONE EXEC EXIT
EVENT_EXEC, EVENT_STOP = 4, 128
_WALL = 0x40000000  # waitpid: threads too
#: taken synchronously by the recorder's wait (blocked from before CMD's fork)
_WAKE = {signal.SIGCHLD, signal.SIGINT, signal.SIGTERM}
SYSCALL_INFO_ENTRY, SYSCALL_INFO_EXIT = 1, 2
#: struct ptrace_syscall_info: op, arch, ip, sp, then entry {nr, args[6]} or exit {rval, is_error}
_INFO = struct.Struct("=B3xIQQ")
_ENTRY = struct.Struct("=Q6Q")
_EXIT = struct.Struct("=qB")
_INFO_SIZE = 88
KCMP_FILE = 0
LINUX_REBOOT_CMD_KEXEC = 0x45584543
AT_FDCWD = -100
_STOP_SIGNALS = {signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU}

#: per audit arch: syscall numbers of ioctl, openat, open (None: the arch has none), reboot, kcmp
_ARCHES: dict[int, dict[str, int | None]] = {
    0xC000003E: {"ioctl": 16, "openat": 257, "open": 2, "reboot": 169, "kcmp": 312,  # x86_64
                 "close": 3, "dup2": 33, "dup3": 292, "close_range": 436},
    0xC00000B7: {"ioctl": 29, "openat": 56, "open": None, "reboot": 142, "kcmp": 272,  # aarch64
                 "close": 57, "dup2": None, "dup3": 24, "close_range": 436},
}
_HOST = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}.get(platform.machine())
_SESSION_LINK = "anon_inode:[luo_session] "
_PROC_FD = re.compile(r"^/proc/(self|thread-self|\d+)/fd/(\d+)$")


class RecordError(Exception):
    """The recording cannot start (unwritable trace file, no ptrace); one line for the user."""


def _check(ret: int) -> int:
    if ret < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return ret


def ptrace(req: int, pid: int, addr: int = 0, data: int = 0) -> int:
    return _check(_ptrace(req, pid, addr, data))


def read_mem(pid: int, addr: int, length: int) -> bytes:
    """``length`` bytes at ``addr`` in ``pid`` as far as they are readable (a short prefix at a hole)."""
    if addr == 0 or length <= 0:
        return b""
    out = b""
    while len(out) < length:
        a = addr + len(out)
        n = min(length - len(out), 4096 - (a % 4096))  # page by page: a hole ends the prefix
        buf = ctypes.create_string_buffer(n)
        local, remote = _IoVec(ctypes.addressof(buf), n), _IoVec(a, n)
        got = _readv(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
        if got <= 0:
            break
        out += buf.raw[:got]
        if got < n:
            break
    return out


def read_path(pid: int, addr: int) -> str | None:
    data = b""
    while len(data) < 4096:
        chunk = read_mem(pid, addr + len(data), 256)
        if not chunk:
            return None
        data += chunk
        if b"\0" in chunk:
            break
    return data.split(b"\0", 1)[0].decode(errors="surrogateescape")


@dataclass
class OpenFile:
    """One open file description of a LUO file seen in the traced processes."""

    fh: int
    on: str  # "device" or "session"
    session: str | None = None
    reps: list[tuple[int, int]] = field(default_factory=list)  # (pid, fd) known to refer to it


@dataclass
class Pending:
    """A syscall between its entry and exit stop."""

    nr: int
    args: tuple[int, ...]
    what: str
    info: dict[str, Any] = field(default_factory=dict)


class Recorder:
    """Traces one command and its children, writing a trace of their LUO calls to ``path``."""

    def __init__(self, path: str, devices: Sequence[str], abi: str | None = None):
        self.devices = [os.path.abspath(d) for d in devices]
        self.nodes: list[os.stat_result] = []
        for d in self.devices:
            try:
                self.nodes.append(os.stat(d))
            except OSError:
                pass
        #: the rdevs of an emulator's CUSE session nodes (a FUSE file's is the other file of its mount)
        self.session_rdevs: set[int] = set()
        for st in self.nodes:
            if stat.S_ISCHR(st.st_mode) and os.major(st.st_rdev) != 10:
                from ..transport.cuse import session_rdev_of

                rdev = session_rdev_of(st.st_rdev)
                if rdev is not None:
                    self.session_rdevs.add(rdev)
        self.device_kind = "emulator"
        for st in self.nodes:
            if stat.S_ISCHR(st.st_mode) and os.major(st.st_rdev) == 10:  # a misc device: the kernel's
                self.device_kind = "kernel"
        self.abi = abi or self._ask_abi() or "7.2"
        try:
            self.profile = profiles.get(self.abi)
        except ValueError as e:
            raise RecordError(str(e)) from None
        self.ffi = None
        from .. import uapi

        if any(h not in uapi.CDEF_FILES for h in self.profile.cdefs):
            self.ffi = uapi.load_ffi("types.h", *self.profile.cdefs)
        try:
            self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise RecordError(f"cannot write the trace {path}: {e.strerror}") from None
        os.fchmod(self.fd, 0o600)
        self.path = path
        self.seq = 0
        self.files: list[OpenFile] = []
        self.next_fh = 1
        self.pending: dict[int, Pending] = {}
        self.tracees: set[int] = set()
        self.stopped: dict[int, int] = {}  # tid -> signal to deliver on detach
        self.main_pid = 0
        self.main_status: int | None = None
        self.interrupted = False
        self.calls = 0
        # set when kcmp(2) is missing (CONFIG_KCMP off): files of the node are then probed (the
        # environment variable forces that path, for its tests)
        self.no_kcmp = os.environ.get("CUSEDEV_RECORD_NO_KCMP") == "1"

    def _ask_abi(self) -> str | None:
        """The profile of an emulator serving the device (its control socket), if one answers."""
        if self.device_kind == "kernel":
            return None
        from ..control.channel import ControlError, request

        for d in self.devices:
            try:
                abi = request(d, "status").get("abi")
            except (ControlError, OSError, ValueError):
                continue
            if isinstance(abi, str):
                return abi
        return None

    # -- output ----------------------------------------------------------------------------------------
    def _write(self, rec: dict[str, Any]) -> None:
        os.write(self.fd, (json.dumps(rec, separators=(",", ":")) + "\n").encode())

    def header(self, argv: Sequence[str]) -> None:
        self._write({"type": "header", "format": FORMAT_VERSION, "abi": self.profile.name,
                     "arch": platform.machine(), "endian": sys.byteorder, "recorder": f"cusedev {__version__} ptrace",
                     "device": self.devices[0] if self.devices else None, "device_kind": self.device_kind,
                     "command": list(argv), "time": time.time(), "mono_ns": time.monotonic_ns(),
                     "recorder_pid": os.getpid()})

    def _record(self, kind: str, tid: int, fields: dict[str, Any]) -> None:
        self.seq += 1
        pid, comm = proc_ids(tid)
        rec = {"type": kind, "seq": self.seq, "time": round(time.time(), 6), "mono_ns": time.monotonic_ns(),
               "pid": pid, "tid": tid, "comm": comm, **fields}
        if rec.get("errno"):
            rec["err"] = errname(rec["errno"])
        self._write(rec)

    # -- what an fd is ---------------------------------------------------------------------------------
    def _is_node(self, st: os.stat_result) -> bool:
        return self._node_kind(st) is not None

    def _node_kind(self, st: os.stat_result) -> str | None:
        """"device" for the device node, "session" for an emulator's session node, else None."""
        if stat.S_ISCHR(st.st_mode) and st.st_rdev in self.session_rdevs:
            return "session"
        for n in self.nodes:
            if stat.S_ISCHR(n.st_mode):
                if stat.S_ISCHR(st.st_mode) and st.st_rdev == n.st_rdev:
                    return "device"
            elif (st.st_dev, st.st_ino) == (n.st_dev, n.st_ino):
                return "device"
            elif st.st_dev == n.st_dev and stat.S_ISREG(st.st_mode):  # the FUSE mount holds only our files
                return "session"
        return None

    def _kcmp(self, pid1: int, pid2: int, fd1: int, fd2: int) -> int:
        nr = (_ARCHES[_HOST]["kcmp"] if _HOST else None) or 312
        return int(_syscall(ctypes.c_long(nr), ctypes.c_long(pid1), ctypes.c_long(pid2), ctypes.c_long(KCMP_FILE),
                            ctypes.c_long(fd1), ctypes.c_long(fd2)))

    def _known(self, pid: int, fd: int) -> OpenFile | None:
        """The open file (pid, fd) is, among those seen, by kcmp against their known fds."""
        for f in reversed(self.files):
            for rep in list(f.reps):
                if rep != (pid, fd) and self.no_kcmp:
                    continue
                same = 0 if rep == (pid, fd) else self._kcmp(pid, rep[0], fd, rep[1])
                if same == 0:
                    if (pid, fd) not in f.reps:
                        f.reps.append((pid, fd))
                        del f.reps[:-8]
                    return f
                if same < 0:
                    if ctypes.get_errno() == errno.ENOSYS:  # a kernel without kcmp: exact (pid, fd) only
                        self.no_kcmp = True
                        continue
                    f.reps.remove(rep)  # its process is gone, or it closed that fd: no longer a witness
        self.files = [f for f in self.files if f.reps]
        return None

    def forget(self, pid: int, fd: int) -> None:
        """``fd`` of ``pid`` was just given to a new file: it witnesses nothing it named before."""
        for f in self.files:
            if (pid, fd) in f.reps:
                f.reps.remove((pid, fd))
        self.files = [f for f in self.files if f.reps]

    def forget_range(self, pid: int, first: int, last: int) -> None:
        """close_range, or an exec (whose close-on-exec fds go): every witness of ``pid`` in that range."""
        for f in self.files:
            f.reps = [r for r in f.reps if r[0] != pid or not first <= r[1] <= last]
        self.files = [f for f in self.files if f.reps]

    def _new(self, pid: int, fd: int, on: str, session: str | None = None) -> OpenFile:
        f = OpenFile(self.next_fh, on, session, [(pid, fd)])
        self.next_fh += 1
        self.files.append(f)
        return f

    def classify(self, tid: int, fd: int) -> OpenFile | None:
        """The LUO file behind ``fd`` of thread ``tid``, or None when it is no LUO file."""
        base = f"/proc/{tid}/fd/{fd}"
        try:
            link = os.readlink(base)
        except OSError:
            return None
        pid = self._tgid(tid)
        if link.startswith(_SESSION_LINK):  # the kernel names it: trust that over what the number was before
            name = link[len(_SESSION_LINK):]
            f = self._known(pid, fd)
            if f is None or f.on != "session" or f.session != name:
                self.forget(pid, fd)
                f = self._new(pid, fd, "session", name)
            return f
        try:
            st = os.stat(base)
        except OSError:
            return None
        kind = self._node_kind(st)
        if kind is None:
            return None
        f = self._known(pid, fd)
        if self.no_kcmp and self.device_kind != "kernel":
            on, pname = self._probe(tid, fd)
            if f is None or f.on != on:
                self.forget(pid, fd)
                f = self._new(pid, fd, on, pname)
        return f if f is not None else self._new(pid, fd, kind)

    def _probe(self, tid: int, fd: int) -> tuple[str, str | None]:
        """Without kcmp: ask the emulator through our own duplicate of the fd whether it is a session file
        (GET_NAME answers only there; else a NULL argument: EFAULT past the session table's nr check, EINVAL
        on the device's).  No side effect; the duplicate is closed before the tracee runs on."""
        kind = self.profile.kinds.get("session")
        if kind is None or not kind.ops:
            return "device", None
        try:
            ours = pidfd.getfd(tid, fd)
        except OSError:
            return "device", None
        try:
            get_name = next((op for op in kind.ops if op.name.endswith("GET_NAME")), None)
            if get_name is not None:
                buf = ctypes.create_string_buffer(get_name.size.to_bytes(4, sys.byteorder), get_name.size)
                if _probe_ioctl(ours, get_name.cmd, ctypes.addressof(buf)) == 0:
                    return "session", buf.raw[8:72].split(b"\0", 1)[0].decode(errors="replace")
                return "device", None
            _probe_ioctl(ours, kind.ops[0].cmd, None)
            return ("session", None) if ctypes.get_errno() == errno.EFAULT else ("device", None)
        finally:
            os.close(ours)

    def _tgid(self, tid: int) -> int:
        try:
            return pidfd.tgid_of(tid)
        except OSError:
            return tid

    def describe(self, tid: int, fd: int) -> dict[str, Any]:
        """A passed or returned fd as the emulator's traces describe files (kind, size, digest)."""
        try:
            link = os.readlink(f"/proc/{tid}/fd/{fd}")
        except OSError:
            return {"kind": "none"}
        if link.startswith(_SESSION_LINK):
            return {"kind": "session", "name": link[len(_SESSION_LINK):]}
        if fd_flags(tid, fd) & os.O_PATH:  # no open file to hand over, whatever it names (an emulator says so)
            try:
                st = os.stat(f"/proc/{tid}/fd/{fd}")
                return {"kind": "opath", "ino": st.st_ino, "dev": st.st_dev}
            except OSError:
                return {"kind": "opath"}
        f = self.classify(tid, fd)
        if f is not None:
            return {"kind": f.on, **({"name": f.session} if f.session is not None else {})}
        try:
            ours = pidfd.getfd(tid, fd)
        except OSError:
            return {"kind": "opath"} if os.path.exists(f"/proc/{tid}/fd/{fd}") else {"kind": "none"}
        # closes ours before the tracee runs on; small contents, dev and ino kept for replay (the same file
        # handed in twice is one stand-in)
        return describe_file(ours)

    # -- syscalls --------------------------------------------------------------------------------------
    def on_entry(self, tid: int, arch: int, nr: int, args: tuple[int, ...]) -> None:
        nrs = _ARCHES.get(arch)
        if nrs is None:
            return
        if nr in (nrs["close"], nrs["dup2"], nrs["dup3"], nrs["close_range"]):
            # an fd number freed (or about to name another file): it no longer witnesses what it was
            pid = self._tgid(tid)
            if nr == nrs["close_range"]:
                self.forget_range(pid, args[0] & 0xFFFFFFFF, args[1] & 0xFFFFFFFF)
            else:
                self.forget(pid, ctypes.c_int((args[0] if nr == nrs["close"] else args[1]) & 0xFFFFFFFF).value)
            return
        if nr == nrs["ioctl"]:
            fd = ctypes.c_int(args[0] & 0xFFFFFFFF).value
            f = self.classify(tid, fd)
            if f is None:
                # an fd that is no LUO file, or no fd at all: EBADF on an O_PATH fd of the node still counts
                if not self._opath_node(tid, fd):
                    return
                self.pending[tid] = Pending(nr, args, "ioctl", {"file": None, "fd": fd, "vfs": True})
                return
            cmd = args[1] & 0xFFFFFFFF
            info: dict[str, Any] = {"file": f, "fd": fd, "cmd": cmd, "arg": args[2]}
            table = self.profile.kinds.get(f.on) or self.profile.kinds["device"]
            op = op_for(table, cmd)
            data = read_mem(tid, args[2], op.size if op is not None else 4) if op is not None else b""
            if op is not None and len(data) >= 4:
                size = U32.unpack_from(data)[0]
                info["size"] = size
                info["in"] = data[:min(size, op.size)]
                info["op"] = op
                passed = self.profile.trace.passed_fd(cmd, info["in"])
                if passed is not None and op.cmd == cmd:
                    info["passed"] = self.describe(tid, passed)
            self.pending[tid] = Pending(nr, args, "ioctl", info)
        elif nr == nrs["openat"] or (nrs["open"] is not None and nr == nrs["open"]):
            at = nr == nrs["openat"]
            dirfd = ctypes.c_int(args[0] & 0xFFFFFFFF).value if at else AT_FDCWD
            path = read_path(tid, args[1] if at else args[0])
            flags = args[2] if at else args[1]
            if path is not None:  # what it names is looked at on the way out, and only then
                self.pending[tid] = Pending(nr, args, "open", {"flags": flags, "dirfd": dirfd, "path": path})
        elif nr == nrs["reboot"] and (args[2] & 0xFFFFFFFF) == LINUX_REBOOT_CMD_KEXEC:
            self.pending[tid] = Pending(nr, args, "kexec")

    def _opath_node(self, tid: int, fd: int) -> bool:
        try:
            return self._is_node(os.stat(f"/proc/{tid}/fd/{fd}"))
        except OSError:
            return False

    def _resolve_open(self, tid: int, dirfd: int, path: str) -> tuple[str, str | None] | None:
        """("device"|"session", name) when ``path`` opened by ``tid`` names a LUO file, else None."""
        pid = self._tgid(tid)
        m = _PROC_FD.match(path)
        if m is not None:  # a re-open through /proc: what is that fd?
            who = {"self": pid, "thread-self": tid}.get(m.group(1)) or int(m.group(1))
            f = self.classify(who, int(m.group(2)))
            return (f.on, f.session) if f is not None else None
        if not path.startswith("/"):
            base = f"/proc/{tid}/cwd" if dirfd == AT_FDCWD else f"/proc/{tid}/fd/{dirfd}"
            path = f"{base}/{path}"
        else:
            path = f"/proc/{tid}/root{path}"
        try:
            st = os.stat(path)
        except OSError:
            return None
        kind = self._node_kind(st)
        return (kind, None) if kind is not None else None

    def on_exit(self, tid: int, rval: int, is_error: bool) -> None:
        p = self.pending.pop(tid, None)
        if p is None:
            return
        err = -rval if is_error else 0
        if p.what == "kexec":
            self._record("kexec", tid, {"ret": -1 if err else 0, "errno": err})
        elif p.what == "open":
            target = self._resolve_open(tid, p.info["dirfd"], p.info["path"]) if err else None
            if not err:  # a new fd: is it a LUO file?  (the cheap case: most opens are of other files)
                self.forget(self._tgid(tid), rval)
                f = self.classify(tid, rval)
                target = (f.on, f.session) if f is not None else None
            if target is None:
                return
            rec: dict[str, Any] = {"flags": p.info["flags"], "on": target[0]}
            if target[1]:
                rec["session"] = target[1]
            if not err and f is not None:
                rec["fh"] = f.fh
            self._record("open", tid, {**rec, "ret": -1 if err else 0, "errno": err})
        else:
            self._ioctl_exit(tid, p, err)

    def _fuse_file(self) -> bool:
        return any(stat.S_ISREG(n.st_mode) for n in self.nodes)

    def _ioctl_exit(self, tid: int, p: Pending, err: int) -> None:
        info = p.info
        f: OpenFile | None = info.get("file")
        if f is None:  # EBADF before any driver: an O_PATH fd of the node
            self._record("ioctl", tid, {"fd": info["fd"], "cmd": p.args[1] & 0xFFFFFFFF,
                                        "name": self.profile.trace.names.get(p.args[1] & 0xFFFFFFFF, "unknown"),
                                        "arg": p.args[2], "ret": -1 if err else 0, "errno": err, "vfs": True})
            return
        cmd = info["cmd"]
        rec: dict[str, Any] = {"fh": f.fh, "fd": info["fd"], "on": f.on}
        if f.session is not None:
            rec["session"] = f.session
        rec.update({"cmd": cmd, "name": self.profile.trace.names.get(cmd, "unknown"), "arg": info["arg"]})
        op = info.get("op")
        if "size" in info:
            rec["size"] = info["size"]
            rec["in_hex"] = info["in"].hex()
            rec["in"] = _decode(op, info["in"], False, self.ffi, self.profile.trace.enums)
        if not err and op is not None and op.outputs and op.cmd == cmd:
            out = read_mem(tid, info["arg"], min(info["size"], op.size))
            rec["out_hex"] = out.hex()
            rec["out"] = _decode(op, out, True, self.ffi, self.profile.trace.enums)
            newfd = rec["out"].get("fd")
            if isinstance(newfd, int) and newfd >= 0 and cmd in self.profile.fd_commands:
                rec["ret_fd"] = self._returned(tid, newfd, cmd, info)
        rec.update({"ret": -1 if err else 0, "errno": err})
        if err:
            rec["err"] = errname(err)
        if "passed" in info:
            rec["file"] = info["passed"]
        if cmd in _VFS_IOCTLS or (err == errno.EFAULT and cmd >> 30 & _IOC_WRITE and self._fuse_file()):
            # the VFS answered; or a FUSE file's kernel side, which copies a write-direction argument in
            # before its server sees the call (a CUSE server or a misc driver sees every call)
            rec["vfs"] = True
        self.calls += 1
        self._record("ioctl", tid, rec)

    def _returned(self, tid: int, fd: int, cmd: int, info: dict[str, Any]) -> dict[str, Any]:
        """What an fd-returning call gave: a session (registered under its name) or a file."""
        pid = self._tgid(tid)
        self.forget(pid, fd)
        try:
            link = os.readlink(f"/proc/{tid}/fd/{fd}")
            st = os.stat(f"/proc/{tid}/fd/{fd}")
        except OSError:
            return {"kind": "none"}
        if link.startswith(_SESSION_LINK) or self._is_node(st):
            name = link[len(_SESSION_LINK):] if link.startswith(_SESSION_LINK) else \
                info["in"][8:72].split(b"\0", 1)[0].decode(errors="replace")
            known = self._new(pid, fd, "session", name)
            return {"kind": "session", "name": name, "fh": known.fh}
        return self.describe(tid, fd)

    # -- the ptrace loop -------------------------------------------------------------------------------
    def _resume(self, tid: int, sig: int = 0) -> None:
        self.stopped.pop(tid, None)
        try:
            ptrace(PTRACE_SYSCALL, tid, 0, sig)
        except ProcessLookupError:
            pass  # killed while stopped: its exit is reported by waitpid

    def _syscall_stop(self, tid: int) -> None:
        buf = ctypes.create_string_buffer(_INFO_SIZE)
        try:
            got = ptrace(PTRACE_GET_SYSCALL_INFO, tid, _INFO_SIZE, ctypes.addressof(buf))
        except OSError:
            return
        raw = buf.raw[:got]
        op, arch, _ip, _sp = _INFO.unpack_from(raw)
        if op == SYSCALL_INFO_ENTRY:
            nr, *args = _ENTRY.unpack_from(raw, _INFO.size)
            self.pending.pop(tid, None)
            self.on_entry(tid, arch, nr, tuple(args))
        elif op == SYSCALL_INFO_EXIT:
            rval, is_error = _EXIT.unpack_from(raw, _INFO.size)
            self.on_exit(tid, rval, bool(is_error))

    def _gone(self, tid: int) -> None:
        self.tracees.discard(tid)
        self.stopped.pop(tid, None)
        p = self.pending.pop(tid, None)
        if p is not None and p.what == "kexec":  # killed inside reboot(KEXEC): the machine went on without it
            self._record("kexec", tid, {"ret": 0, "errno": 0, "killed": True})

    def run(self, argv: Sequence[str]) -> int:
        """Start ``argv`` under the recorder; its exit status (128+N for a signal, 127 not found)."""
        # SIGINT/SIGTERM/SIGCHLD stay blocked from before the fork to the end, and are taken by ``_wait``
        # (sigtimedwait) between tracee reports: a Ctrl-C at any moment, even the one CMD starts in, ends
        # the recording the same way, and never loses a report waitpid returned (a handler raising after
        # it returned dropped CMD's own SIGINT stop, and CMD went on untraced instead of dying of it)
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, _WAKE)
        chld = signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # an inherited SIG_IGN would raise none
        try:
            r, w = os.pipe()
            child = os.fork()
            if child == 0:  # pragma: no cover - the child only waits, then execs
                try:
                    # Python ignores SIGPIPE and SIGXFSZ; exec would keep SIG_IGN (as subprocess restores)
                    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGPIPE, signal.SIGXFSZ):
                        signal.signal(sig, signal.SIG_DFL)
                    signal.signal(signal.SIGCHLD, chld)  # CMD gets the disposition we were given
                    os.close(w)
                    os.read(r, 1)
                    os.close(r)
                    signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # traced now: a pending Ctrl-C stops it
                    os.execvp(argv[0], list(argv))
                except OSError as e:
                    os.write(2, f"cusedev trace record: {argv[0]}: {e.strerror}\n".encode())
                os._exit(127)
            os.close(r)
            self.main_pid = child
            try:
                ptrace(PTRACE_SEIZE, child, 0, OPTIONS)
            except OSError as e:
                os.kill(child, signal.SIGKILL)
                os.waitpid(child, 0)
                os.close(w)
                raise RecordError(f"ptrace: {e.strerror}") from None
            self.tracees.add(child)
            self.header(argv)
            os.write(w, b"x")
            os.close(w)
            self._loop()
        except _Interrupted:
            self._detach_all()
        finally:
            while signal.sigtimedwait(_WAKE, 0) is not None:  # a second Ctrl-C is the same Ctrl-C
                pass
            signal.signal(signal.SIGCHLD, chld)
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            os.close(self.fd)
        st = self.main_status
        if st is None:
            return 130 if self.interrupted else 0
        return os.WEXITSTATUS(st) if os.WIFEXITED(st) else 128 + os.WTERMSIG(st)

    def _wait(self) -> tuple[int, int]:
        """The next tracee report, or ``_Interrupted`` once SIGINT or SIGTERM came."""
        while True:
            if self.interrupted:
                raise _Interrupted()
            tid, status = os.waitpid(-1, _WALL | os.WNOHANG)
            if tid:
                return tid, status
            # a tracee's stop or exit raises SIGCHLD; the timeout only bounds a wake-up lost elsewhere
            info = signal.sigtimedwait(_WAKE, 1.0)
            if info is not None and info.si_signo != signal.SIGCHLD:
                self.interrupted = True

    def _loop(self) -> None:
        while self.tracees:
            try:
                tid, status = self._wait()
            except ChildProcessError:
                break
            if os.WIFEXITED(status) or os.WIFSIGNALED(status):
                if tid == self.main_pid:
                    self.main_status = status
                self._gone(tid)
                continue
            if not os.WIFSTOPPED(status):
                continue
            self.tracees.add(tid)  # an auto-attached child may report before its parent's event
            sig = os.WSTOPSIG(status)
            event = status >> 16
            self.stopped[tid] = 0
            if sig == (signal.SIGTRAP | 0x80):
                self._syscall_stop(tid)
                self._resume(tid)
            elif event == EVENT_EXEC:
                try:
                    former = ptrace_geteventmsg(tid)
                except OSError:
                    former = tid
                if former != tid:  # a non-leader thread exec'ed: it now has the leader's id
                    self.pending.pop(former, None)
                    self.tracees.discard(former)
                self.pending.pop(tid, None)
                self.forget_range(self._tgid(tid), 0, 0xFFFFFFFF)  # close-on-exec fds are gone; the rest re-found
                self._resume(tid)
            elif event == EVENT_STOP:
                if sig in _STOP_SIGNALS:  # a group-stop: stay stopped like an untraced process would
                    try:
                        ptrace(PTRACE_LISTEN, tid)
                    except OSError:
                        pass
                else:
                    self._resume(tid)
            elif event:
                self._resume(tid)  # fork/vfork/clone/exit events: the children report themselves
            else:
                self.stopped[tid] = sig
                self._resume(tid, sig)  # a signal for the tracee: deliver it as if untraced

    def _detach_all(self) -> None:
        """Ctrl-C: let every tracee go on untraced (with its pending signal), as strace does."""
        for tid in list(self.tracees):
            if tid in self.stopped:
                continue
            try:
                ptrace(PTRACE_INTERRUPT, tid)
            except OSError:
                self.tracees.discard(tid)
        waiting = {t for t in self.tracees if t not in self.stopped}
        deadline = time.monotonic() + 2.0
        while waiting and time.monotonic() < deadline:
            try:
                tid, status = os.waitpid(-1, _WALL | os.WNOHANG)
            except ChildProcessError:
                break
            if tid == 0:
                time.sleep(0.005)
                continue
            if os.WIFEXITED(status) or os.WIFSIGNALED(status):
                if tid == self.main_pid:
                    self.main_status = status
                self.tracees.discard(tid)
                waiting.discard(tid)
                continue
            sig = os.WSTOPSIG(status)
            self.stopped[tid] = 0 if (sig == (signal.SIGTRAP | 0x80) or status >> 16) else sig
            waiting.discard(tid)
        for tid in list(self.tracees):
            try:
                ptrace(PTRACE_DETACH, tid, 0, self.stopped.get(tid, 0))
            except OSError:
                pass
        self.tracees.clear()


class _Interrupted(Exception):
    pass


def fd_flags(tid: int, fd: int) -> int:
    """The open flags of a tracee's fd (its fdinfo), 0 when unknown."""
    try:
        with open(f"/proc/{tid}/fdinfo/{fd}") as f:
            for line in f:
                if line.startswith("flags:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0


def ptrace_geteventmsg(tid: int) -> int:
    msg = ctypes.c_ulong(0)
    ptrace(PTRACE_GETEVENTMSG, tid, 0, ctypes.addressof(msg))
    return int(msg.value)


_VFS_IOCTLS = frozenset({0x5450, 0x5451, 0x5421, 0x5452, 0x5460})
_IOC_WRITE = 1  # the direction bits (cmd >> 30): userspace writes, the driver reads


def _decode(op: Any, data: bytes, outputs: bool, ffi: Any, enums: Any) -> dict[str, Any]:
    from .record import decode

    fields_of(op, ffi)
    return decode(op, data, outputs, enums, ffi=ffi)


def not_runnable(cmd: str) -> str | None:
    """Why CMD cannot be started (as a shell would say), or None."""
    if "/" not in cmd:
        return None if shutil.which(cmd) else "command not found"
    if not os.path.exists(cmd):
        return os.strerror(errno.ENOENT)
    return None


def record(path: str, argv: Sequence[str], devices: Sequence[str] = ("/dev/liveupdate",),
           abi: str | None = None) -> int:
    """Run ``argv`` recording its LUO calls to ``path``; the command's exit status."""
    if _HOST is None:
        raise RecordError(f"trace record: no syscall table for {platform.machine()}")
    rec = Recorder(path, devices, abi)
    return rec.run(argv)
