"""ioctl traces: a JSON Lines recorder installed as the device's interceptor, and strace-style display.

Recording is off the reply path: a call captures a tuple of raw values
(bytes, ints, the op row) and the record is formatted and written by one
``call_soon`` callback after the loop has sent the replies — one ``write(2)``
per loop iteration, on an O_APPEND fd without user-space buffering, so a
record is in the file (page cache) as soon as its reply is out and survives
a crash of the client or of the emulator.  Without tracing and injection the
device's ``interceptor`` is None and nothing here runs.

Only the FD_PRESERVE record does real work at call time: it keeps a dup of
the preserved file (the caller may close its fd right after the call), which
the flush describes — size, digest and, for small files, the contents that
replay needs to stand in a memfd.  A flush that took a while lets requests
queued meanwhile go first (``EmulatedDevice.pump``) before it writes.  A file
over CONTENT_LIMIT is hashed in a thread (~0.6 ms per MiB: a guest's RAM would
stall the device); its record keeps its place and the ones behind it wait.

On CUSE with retry memory a call can take several rounds (``NeedRetry``);
it is recorded once, at the final round.  When the kernel cannot copy a
range we asked for, it fails the call with EFAULT without telling us: that
call is recorded as EFAULT (``"kernel_fault": true``) when the same thread
is next seen, or when tracing stops.
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import errno
import fcntl
import hashlib
import inspect
import json
import os
import platform
import stat
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from .. import __version__, uapi
from ..device import pidfd
from ..device.dispatch import U32, Op, Table, check_zero_tail, field_struct, op_for
from ..device.intercept import Call, Fault, Interceptor, Proceed
from ..device.memfd import TMPFS_MAGIC, fs_type
from ..device.seam import Caller, CallerMemory, NeedRetry
from .show import errname, format_record, matches, open_flags, read_records, show  # noqa: F401 - also found here

FORMAT_VERSION = 1
CONTENT_LIMIT = 64 * 1024  # preserved-file contents up to this size go into the trace (base64)
DIGEST_LIMIT = 256 << 20  # bytes hashed at most (~0.6 ms per MiB, in the digest thread)
TAIL_LIMIT = 1 << 20
PUMP_AFTER_NS = 10_000  # a flush whose formatting took longer lets queued requests go first

_mono = time.monotonic_ns
_encode = json.JSONEncoder(separators=(",", ":")).encode  # one encoder: json.dumps builds one per call
_wall = time.time
_get_loop = asyncio._get_running_loop

Enums = Callable[[str], "Mapping[int, str] | None"]
_NOTHING = b""


def _no_enums(field: str) -> Mapping[int, str] | None:
    return None


def _label(state: Any) -> str:
    """A state value from a model's listeners as the records show it."""
    label = getattr(state, "label", None)
    return label if isinstance(label, str) else str(state)


# -- field decoding (at flush time) ------------------------------------------------------------------
_FIELDS: dict[str, list[tuple[str, int, Any, bool]]] = {}


def fields_of(op: Op, ffi: Any = None) -> list[tuple[str, int, Any, bool]]:
    """(name, offset, struct codec, is_output) of every named field of ``op``'s struct, from the cdefs
    (``ffi``: the profile's declarations, default the generic ones)."""
    f = _FIELDS.get(op.ctype)
    if f is None:
        f = []
        for decl in (ffi, uapi.ffi):
            if decl is None:
                continue
            try:
                fields = decl.typeof(op.ctype).fields
            except Exception:  # noqa: BLE001 - not declared there (cffi's CDefError or ffi.error)
                continue
            f = [(name, fld.offset, field_struct(decl, fld.type), name in op.outputs) for name, fld in fields]
            break
        _FIELDS[op.ctype] = f  # declared nowhere: the record keeps its hex only
    return f


_FIELDS_JSON: dict[tuple[str, bool, bytes], str] = {}


def fields_json(op: Op, data: bytes | bytearray, outputs: bool, enums: Enums = _no_enums, ffi: Any = None) -> str:
    """``decode`` as JSON text, remembered per distinct struct: clients repeat the same calls."""
    key = (op.ctype, outputs, bytes(data))
    text = _FIELDS_JSON.get(key)
    if text is None:
        if len(_FIELDS_JSON) > 4096:
            _FIELDS_JSON.clear()
        text = _FIELDS_JSON[key] = _encode(decode(op, data, outputs, enums, ffi))
    return text


def decode(op: Op, data: bytes | bytearray, outputs: bool, enums: Enums = _no_enums,
           ffi: Any = None) -> dict[str, Any]:
    """The fields of ``data`` (as far as it goes): inputs, or only the outputs; enums (the profile's
    ``TraceRules.enums``) as names, byte arrays as text up to the first NUL."""
    out: dict[str, Any] = {}
    for name, off, codec, is_out in fields_of(op, ffi):
        if (is_out if outputs else (not is_out or name == "size")) and off + codec.size <= len(data):
            v = codec.unpack_from(data, off)[0]
            if isinstance(v, bytes):
                out[name] = v.split(b"\0", 1)[0].decode(errors="replace")
                continue
            names = enums(name)
            out[name] = names.get(v, v) if names is not None else v
    return out


def proc_ids(tid: int) -> tuple[int, str]:
    """The process (tgid) and command name of thread ``tid``; the tid and "?" once it is gone."""
    pid, comm = tid, "?"
    try:
        pid = pidfd.tgid_of(tid)
        with open(f"/proc/{tid}/comm", "rb") as f:
            comm = f.read().strip().decode(errors="replace")
    except OSError:
        pass
    return pid, comm


def grab_file(tid: int, fd: int) -> int | dict[str, Any]:
    """Our duplicate of the caller's fd ``fd`` (described later by ``describe_file``), or why there is none."""
    try:
        return pidfd.getfd(tid, fd)
    except OSError:
        return {"kind": "none"}


def describe_file(ours: int | dict[str, Any], preserved: bool = False,
                  st: os.stat_result | None = None) -> dict[str, Any]:
    """What FD_PRESERVE's fd was: kind, size, digest (and small contents) for replay; closes ``ours``.
    ``preserved``: ``ours`` is a dup of the emulator's own reference, which the core has already
    probed as a shmem file (two syscalls fewer); ``st``: its fstat, when the caller has it."""
    if isinstance(ours, dict):
        return ours
    try:
        if not preserved and fcntl.fcntl(ours, fcntl.F_GETFL) & os.O_PATH:
            return {"kind": "opath"}
        if st is None:
            st = os.fstat(ours)
        shmem = preserved or (stat.S_ISREG(st.st_mode) and st.st_nlink == 0 and fs_type(ours) == TMPFS_MAGIC)
        info: dict[str, Any] = {"kind": "shmem" if shmem else "other", "ino": st.st_ino, "dev": st.st_dev}
        if not shmem:
            info["mode"] = stat.filemode(st.st_mode)
            return info
        size = st.st_size
        info["size"] = size
        h = hashlib.sha256()
        pos, chunks = 0, []
        while pos < min(size, DIGEST_LIMIT):
            chunk = os.pread(ours, min(1 << 20, min(size, DIGEST_LIMIT) - pos), pos)
            if not chunk:
                break
            h.update(chunk)
            if size <= CONTENT_LIMIT:
                chunks.append(chunk)
            pos += len(chunk)
        info["sha256"] = h.hexdigest()
        if pos < size:
            info["digest_len"] = pos
        if size <= CONTENT_LIMIT:
            info["data"] = base64.b64encode(b"".join(chunks)).decode()
        return info
    except OSError as e:
        return {"kind": "error", "errno": e.errno}
    finally:
        os.close(ours)


def file_json(file: tuple[int | dict[str, Any], bool], st: os.stat_result | None = None) -> str:
    """``describe_file(*file, st)`` as JSON text; the base64 contents are spliced in as they are (the
    encoder would scan every character of a string that never needs escaping: 3 µs per KiB)."""
    info = describe_file(*file, st)
    data = info.pop("data", None)
    text = _encode(info)
    return text if data is None else f'{text[:-1]},"data":"{data}"}}'


class _Held:
    """An ioctl record waiting for its file's digest, computed off the loop: its place in the
    file is kept, and the records behind it wait with it."""

    __slots__ = ("head", "future", "tail")

    def __init__(self, head: str, future: Future[str], tail: str):
        self.head, self.future, self.tail = head, future, tail

    def text(self) -> str:
        try:
            file = self.future.result()
        except Exception as e:  # noqa: BLE001 - the record is still written, and those behind it
            file = _encode({"kind": "error", "error": repr(e)})
        return self.head + file + self.tail


class Seen:
    """The ``CallerMemory`` a traced call runs on: passes every access through and keeps
    what the call saw of its struct at ``arg`` (the longest read, the bytes written back)."""

    __slots__ = ("mem", "arg", "data", "out", "direct")

    def __init__(self, mem: CallerMemory, arg: int, direct: bool = False):
        self.mem = mem
        self.direct = direct
        self.arg = arg
        self.data: bytes | None = None
        self.out: bytes | bytearray | None = None

    def _keep(self, addr: int, data: bytes) -> bytes:
        if addr == self.arg and (self.data is None or len(data) > len(self.data)):
            self.data = data
        return data

    def read(self, addr: int, length: int) -> bytes:
        return self._keep(addr, self.mem.read(addr, length))

    def peek(self, addr: int, want: int, need: int) -> bytes:
        return self._keep(addr, self.mem.peek(addr, want, need))

    def declare(self, in_range: tuple[int, int], out_range: tuple[int, int] | None) -> None:
        self.mem.declare(in_range, out_range)

    def write(self, addr: int, data: bytes | bytearray) -> None:
        if addr == self.arg:
            self.out = data  # even if the write fails: replay then knows the struct was read-only
        self.mem.write(addr, data)

    def seen(self, table: Table, cmd: int) -> tuple[Op | None, int | None, bytes | None]:
        """(op row, struct size field, struct as copied in) as far as the call got."""
        op = op_for(table, cmd)
        if op is None or self.data is None or len(self.data) < 4:
            return op, None, None
        size = U32.unpack_from(self.data)[0]
        return op, size, self.data[:min(size, op.size)]


_NOTHING_SEEN = Seen(None, -1)  # type: ignore[arg-type]  # an injected failure: the call never reached the caller's memory

def _injected_view(mem: CallerMemory, arg: int, table: Table, cmd: int) -> Seen:
    """What an injected failure's record shows of its struct: read for the record alone, so that
    ``trace show`` decodes it like any other call.  Under CUSE retry iovecs only what the kernel
    already delivered is read (the injector asks for the struct's round first while a trace is
    recorded), never another round trip."""
    op = op_for(table, cmd)
    if not arg or op is None:
        return _NOTHING_SEEN
    seen = Seen(mem, arg, mem.direct)
    try:
        size = U32.unpack(seen.read(arg, 4))[0]
        if size > 4:
            seen.read(arg, min(size, op.size))
    except NeedRetry:
        return _NOTHING_SEEN if not seen.data else seen
    except OSError:
        pass  # what could be read is kept
    return seen


# -- the recorder --------------------------------------------------------------------------------------
class Tracer(Interceptor):
    """Writes one device's events to ``path`` (created 0600: traces hold file contents).

    A member of the device's interceptor chain, inside fault injection: an injected
    failure reaches it as a call that fails (``Call.fail``) with ``Call.injected`` set.
    What it names and decodes comes from the profile's ``TraceRules``.
    """

    order = 20

    def __init__(self, path: str, device: Any):
        self.path = os.path.abspath(path)
        self.device = device
        self.rules = device.profile.trace
        self._names_json = {cmd: json.dumps(name) for cmd, name in self.rules.names.items()}
        self._enums: Enums = self.rules.enums
        self._ffi = device.profile.ffi
        if self._ffi is None and any(h not in uapi.CDEF_FILES for h in device.profile.cdefs):
            self._ffi = uapi.load_ffi("types.h", *device.profile.cdefs)  # a profile with its own header
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC
                     | os.O_NOFOLLOW, 0o600)
        os.fchmod(fd, 0o600)
        self.fd = fd
        self.seq = 0
        self._queue: list[tuple[Callable[..., str | _Held], tuple]] = []
        self._scheduled = False
        self._lines: deque[str | _Held] = deque()  # formatted, not yet written (behind a digest)
        self._digests: ThreadPoolExecutor | None = None
        self._procs: dict[int, tuple[int, str, str]] = {}  # tid -> (pid, comm, JSON fragment)
        self.pending: dict[int, tuple] = {}
        self._fault: dict[str, Any] | None = None
        self._in_ioctl = False
        self._states: list[tuple[Any, Any]] = []
        self._write([_encode(self.header())])
        atexit.register(self.close)  # records queued when the loop stops still reach the file

    def header(self) -> dict[str, Any]:
        return {"type": "header", "format": FORMAT_VERSION, "abi": self.device.profile.name,
                "arch": platform.machine(), "endian": sys.byteorder, "emulator": f"cusedev {__version__}",
                "time": _wall(), "mono_ns": _mono(), "emulator_pid": os.getpid(),
                "state": self.rules.state_label(self.device.core)}

    # -- output ----------------------------------------------------------------------------------
    def _write(self, lines: Iterable[str]) -> None:
        data = "".join(line + "\n" for line in lines).encode()
        if self.fd >= 0 and data:
            os.write(self.fd, data)

    def _push(self, fmt: Callable[..., str | _Held], *args: Any) -> None:
        self._queue.append((fmt, args))
        if not self._scheduled:
            loop = _get_loop()
            if loop is None:
                self.flush()
                return
            self._scheduled = True
            loop.call_soon(self._flush_soon)

    def flush(self) -> None:
        """Write everything recorded so far, waiting for digests being computed."""
        self._drain(wait=True)

    def _flush_soon(self) -> None:
        """The loop's flush, just after the reply.  When formatting took a while (an FD_PRESERVE
        record describes the file: digest, contents), requests that arrived meanwhile are answered
        before the write: a client on another CPU sends its next ioctl ~10-20 µs after a reply,
        and would otherwise wait for the rest of the flush.  Their records queue behind these."""
        self._drain(pump=True)

    def _drain(self, wait: bool = False, pump: bool = False) -> None:
        """Format the queued records (numbering them) and write those not waiting for a digest."""
        self._scheduled = False
        q, self._queue = self._queue, []
        if q:
            t0 = _mono()
            self._lines.extend(self._numbered(q))
            if pump and _mono() - t0 > PUMP_AFTER_NS:
                self.device.pump()
        self._write_ready(wait)

    def _write_ready(self, wait: bool = False) -> None:
        """Write the formatted records up to the first one still waiting for its digest (``wait``:
        wait for the digests instead)."""
        lines, out = self._lines, []
        while lines:
            x = lines[0]
            if isinstance(x, _Held):
                if not wait and not x.future.done():
                    break
                x = x.text()
            out.append(x)
            lines.popleft()
        self._write(out)

    def _file_json(self, file: tuple[int | dict[str, Any], bool]) -> str | Future[str]:
        """``file_json(file)``, or its future when the file is too big to hash on the loop (over
        CONTENT_LIMIT: hashing runs at ~0.6 ms per MiB, and hashlib and pread let the loop run)."""
        ours = file[0]
        loop = _get_loop()
        if loop is None or isinstance(ours, dict):
            return file_json(file)
        st: os.stat_result | None = None
        try:
            if not file[1]:
                # Not known to be shmem: it may be a FUSE file, one of our own nodes above all, whose
                # fstat after a read() is a GETATTR only this loop answers.  F_GET_SEALS answers on
                # shmem alone and asks no server; anything else is described off the loop.
                fcntl.fcntl(ours, fcntl.F_GET_SEALS)
            st = os.fstat(ours)
        except OSError:
            pass
        else:
            if not stat.S_ISREG(st.st_mode) or st.st_size <= CONTENT_LIMIT:
                return file_json(file, st)
        if self._digests is None:  # one thread: digests finish in record order
            self._digests = ThreadPoolExecutor(1, thread_name_prefix="cusedev-trace-digest")
        fut = self._digests.submit(file_json, file, st)
        fut.add_done_callback(lambda _f: _call_soon_threadsafe(loop, self._write_ready))
        return fut

    def _numbered(self, q: list[tuple[Callable[..., str | _Held], tuple]]) -> Iterator[str | _Held]:
        """Records in queue order, which is event order: sequence numbers are given here, not per call."""
        for fmt, args in q:
            self.seq += 1
            yield fmt(self.seq, *args)

    def close(self) -> None:
        atexit.unregister(self.close)
        for tid in list(self.pending):
            self._finish_pending(self.pending.pop(tid))
        self.flush()
        if self._digests is not None:
            self._digests.shutdown()
            self._digests = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _who(self, tid: int, fresh: bool = False) -> tuple[int, str, str]:
        """(pid, comm, ``"pid":…,"tid":…,"comm":…`` JSON-escaped once) of a caller thread."""
        ids = None if fresh else self._procs.get(tid)
        if ids is None:
            if len(self._procs) > 4096:
                self._procs.clear()
            pid, comm = proc_ids(tid)
            ids = self._procs[tid] = (pid, comm, f'"pid":{pid},"tid":{tid},"comm":{_encode(comm)}')
        return ids

    def _base(self, kind: str, seq: int, wall: float, mono: int, tid: int) -> dict[str, Any]:
        pid, comm, _frag = self._who(tid)
        return {"type": kind, "seq": seq, "time": round(wall, 6), "mono_ns": mono, "pid": pid, "tid": tid,
                "comm": comm}

    def _seen(self, tid: int) -> None:
        if self.pending:
            p = self.pending.pop(tid, None)
            if p is not None:
                self._finish_pending(p)

    # -- events (the Interceptor hooks) ----------------------------------------------------------
    def opened(self, caller: Caller, flags: int, fh: int, err: int) -> None:
        self._seen(caller.tid)
        self._who(caller.tid, fresh=True)
        self._push(self._fmt_simple, "open", _wall(), _mono(), caller.tid,
                   {"flags": flags, "fh": fh, "ret": -1 if err else 0, "errno": err})

    def released(self, fh: int) -> None:
        self._push(self._fmt_simple, "release", _wall(), _mono(), 0, {"fh": fh})

    def rw(self, kind: str, fh: int, caller: Caller, size: int, err: int) -> None:
        self._seen(caller.tid)
        self._push(self._fmt_simple, kind, _wall(), _mono(), caller.tid,
                   {"fh": fh, "count": size, "ret": -1 if err else size, "errno": err})

    def _counter(self) -> Any:
        return self.device.profile.status(self.device.core).get("update_count")

    def kexec(self, run: Callable[[], bool]) -> bool:
        label = self.rules.state_label
        core = self.device.core
        before = label(core)
        self._fault = None
        try:
            live = run()
        except OSError as e:
            self._push(self._fmt_simple, "kexec", _wall(), _mono(), 0,
                       {"ret": -1, "errno": e.errno, "state_before": before,
                        "state_after": label(core),
                        **({"injected": self._fault} if self._fault else {})})
            raise
        self._push(self._fmt_simple, "kexec", _wall(), _mono(), 0,
                   {"ret": 0, "errno": 0, "live": live, "state_before": before,
                    "state_after": label(core), "update_count": self._counter()})
        return live

    def on_state(self, old: Any, new: Any) -> None:
        if old != new:
            if self._in_ioctl:  # after the ioctl's own record, which it belongs to
                self._states.append((old, new))
                return
            self._push(self._fmt_state, _wall(), _mono(), old, new)

    def faulted(self, fault: Fault) -> None:
        """A model fault point failed (injection): marks the running ioctl or kexec, and gets its own record."""
        self._fault = {"rule": fault.rule, "point": fault.point, "errno": fault.errno}
        self._push(self._fmt_simple, "fault", _wall(), _mono(), 0,
                   {"rule": fault.rule, "point": fault.point, "errno": fault.errno, "err": errname(fault.errno)})

    def _table(self, fh: int) -> Table:
        f = self.device.files.get(fh)
        return f.table if f is not None else self.device.kinds["device"]

    def ioctl(self, call: Call, proceed: Proceed) -> int | Awaitable[int]:
        """Run and record one ioctl."""
        tid, fh, cmd, arg, mem = call.caller.tid, call.fh, call.cmd, call.arg, call.mem
        t0 = _mono()
        wall = _wall()
        self._who(tid)  # named now (cached): a process that inherited its fd may be gone when this is written
        if self.pending:
            p = self.pending.pop(tid, None)
            if p is not None:
                if p[1:4] == (fh, cmd, arg):
                    t0, wall = p[4], p[5]  # the same call, next CUSE retry round
                else:
                    self._finish_pending(p)
        table = self._table(fh)
        core = self.device.core
        before = self.rules.state_label(core)
        seen = _injected_view(mem, arg, table, cmd) if call.fail else Seen(mem, arg, mem.direct)
        if not call.fail:
            call.mem = seen
        self._fault = None
        self._in_ioctl = True
        try:
            ret: Any = proceed(call)
            err = 0
            exc = None
        except NeedRetry:
            self.pending[tid] = (tid, fh, cmd, arg, t0, wall, seen, before, table)
            raise
        except OSError as e:
            ret, err, exc = -1, e.errno or errno.EIO, e
        finally:
            self._in_ioctl = False
        if exc is None and type(ret) is not int and inspect.isawaitable(ret):
            return self._later(ret, call, table, seen, before, t0, wall)
        self._record(call, table, seen, before, t0, wall, err)
        if exc is not None:
            raise exc
        return ret

    async def _later(self, aw: Awaitable[int], call: Call, table: Table, seen: Seen, before: str, t0: int,
                     wall: float) -> int:
        """A call whose handler completes later: recorded when it does."""
        try:
            ret = await aw
        except OSError as e:
            self._record(call, table, seen, before, t0, wall, e.errno or errno.EIO)
            raise
        self._record(call, table, seen, before, t0, wall, 0)
        return ret

    def _record(self, call: Call, table: Table, seen: Seen, before: str, t0: int, wall: float, err: int) -> None:
        tid, fh, cmd, arg = call.caller.tid, call.fh, call.cmd, call.arg
        t1 = _mono()
        extra: dict[str, Any] | None = None
        if err == errno.E2BIG or self.rules.passed_fd(cmd, seen.data or _NOTHING) is not None:
            extra = self._extra(table, tid, cmd, arg, seen, err, call.mem)
        inj = self._fault if call.injected is None else call.injected
        self._push(self._fmt_ioctl, wall, t1, tid, fh, cmd, arg, table, seen, err, before,
                   self.rules.state_label(self.device.core), t1 - t0, extra, inj)
        if self._states:  # the state changes it made, each its own record, stamped like the call
            for old, new in self._states:
                self._push(self._fmt_state, wall, t1, old, new)
            self._states.clear()

    def _extra(self, table: Table, tid: int, cmd: int, arg: int, seen: Seen, err: int,
               mem: CallerMemory) -> dict[str, Any] | None:
        """What only call time can capture: the file a call passes in (described at flush), E2BIG's tail."""
        op, size, data = seen.seen(table, cmd)
        if op is None or size is None or data is None:
            return None
        extra: dict[str, Any] = {}
        passed = self.rules.passed_fd(cmd, data) if op.cmd == cmd else None
        if passed is not None:
            # preserved: a dup of the emulator's own reference is the caller's file (1 syscall, not 3)
            fd = None if err else self.rules.preserved_fd(self.device.core, cmd, data)
            extra["file"] = (os.dup(fd), True) if fd is not None else (grab_file(tid, passed), False)
        if err == errno.E2BIG and size > op.size:
            extra["tail"] = self._tail(mem, arg + op.size, size - op.size)
        return extra or None

    @staticmethod
    def _tail(mem: CallerMemory, addr: int, length: int) -> dict[str, Any]:
        """Where the first non-zero byte past sizeof was (E2BIG), so replay can put one there."""
        length = min(length, TAIL_LIMIT)
        try:
            data = mem.read(addr, length)
        except Exception:  # noqa: BLE001 - best effort; a retry backend may not have it
            try:
                check_zero_tail(mem, addr, length)
            except Exception:  # noqa: BLE001
                pass
            return {}
        for i, b in enumerate(data):
            if b:
                return {"offset": i, "byte": b}
        return {}

    def _finish_pending(self, p: tuple) -> None:
        tid, fh, cmd, arg, t0, wall, seen, before, table = p
        now = _mono()
        self._push(self._fmt_ioctl, wall, now, tid, fh, cmd, arg, table, seen,
                   errno.EFAULT, before, before, now - t0, {"kernel_fault": True}, None)

    # -- formatting (flush time): each record straight to its JSON line ---------------------------------
    def _fmt_simple(self, seq: int, kind: str, wall: float, mono: int, tid: int, fields: dict) -> str:
        r = self._base(kind, seq, wall, mono, tid) if tid else {"type": kind, "seq": seq, "time": round(wall, 6),
                                                                 "mono_ns": mono}
        r.update(fields)
        if fields.get("errno"):
            r["err"] = errname(fields["errno"])
        return _encode(r)

    def _fmt_state(self, seq: int, wall: float, mono: int, old: Any, new: Any) -> str:
        return (f'{{"type":"state","seq":{seq},"time":{round(wall, 6)!r},"mono_ns":{mono},'
                f'"from":"{_label(old)}","to":"{_label(new)}"}}')

    def _fmt_ioctl(self, seq: int, wall: float, mono: int, tid: int, fh: int, cmd: int, arg: int,
                   table: Table, seen: Seen, err: int, before: str, after: str, dur: int, extra: dict | None,
                   inj: dict | None) -> str | _Held:
        """The ioctl record, built as text (the hot record: a dict plus json would cost twice as much);
        keys in the order of the README's schema."""
        op, size, data = seen.seen(table, cmd)
        name = self._names_json.get(cmd, '"unknown"')
        line = (f'{{"type":"ioctl","seq":{seq},"time":{round(wall, 6)!r},"mono_ns":{mono},{self._who(tid)[2]},'
                f'"fh":{fh},"cmd":{cmd},"name":{name},"arg":{arg}')
        if size is not None:
            line += f',"size":{size}'
        if data is not None:
            line += f',"in_hex":"{data.hex()}"'
            if op is not None:
                line += ',"in":' + fields_json(op, data, False, self._enums, self._ffi)
        out = seen.out
        if out is not None:
            line += f',"out_hex":"{out.hex()}"'
            if op is not None:
                line += ',"out":' + fields_json(op, out, True, self._enums, self._ffi)
        line += f',"ret":{-1 if err else 0},"errno":{err}'
        if err:
            line += f',"err":"{errname(err)}"'
        line += (f',"state_before":"{before}","state_after":"{after}",'
                 f'"dur_us":{round(dur / 1000, 1)!r}')
        held = None
        if extra:
            for k, v in extra.items():
                if k != "file":
                    line += f',"{k}":{_encode(v)}'
                    continue
                fj = self._file_json(v)
                if isinstance(fj, str):
                    line += ',"file":' + fj
                else:
                    held, line = (line + ',"file":', fj), ""
        if inj:
            line += ',"injected":' + _encode(inj)
        return line + "}" if held is None else _Held(held[0], held[1], line + "}")


# -- installing -----------------------------------------------------------------------------------------
def _call_soon_threadsafe(loop: asyncio.AbstractEventLoop, fn: Callable[[], None]) -> None:
    try:
        loop.call_soon_threadsafe(fn)
    except RuntimeError:  # the loop is closed: close() writes what is left
        pass


def start(device: Any, path: str) -> Tracer:
    """Start recording ``device`` to ``path`` (a running trace is stopped first)."""
    stop(device)
    tracer = Tracer(path, device)
    device.tracer = tracer
    device.core.listeners.append(tracer.on_state)
    device.add_interceptor(tracer)
    return tracer


def stop(device: Any) -> str | None:
    """Stop recording; returns the path of the trace that was running, if any."""
    tracer = device.tracer
    if tracer is None:
        return None
    device.tracer = None
    device.remove_interceptor(tracer)
    try:
        device.core.listeners.remove(tracer.on_state)
    except ValueError:
        pass
    tracer.close()
    return tracer.path


def control(device: Any, msg: dict[str, Any]) -> dict[str, Any]:
    """The ``trace`` control command: {"action": "start", "path": ...} / {"action": "stop"} / status."""
    action = msg.get("action", "status")
    if action == "start":
        path = msg.get("path")
        if not isinstance(path, str) or not os.path.isabs(path):
            return {"ok": False, "error": "trace start needs an absolute path"}
        try:
            start(device, path)
        except OSError as e:
            return {"ok": False, "error": f"{path}: {e.strerror}"}
        return {"ok": True, "path": path}
    if action == "stop":
        return {"ok": True, "path": stop(device)}
    t = device.tracer
    return {"ok": True, "path": t.path if t else None, "records": t.seq if t else 0}
