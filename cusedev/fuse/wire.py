"""The FUSE wire protocol, spoken directly on a /dev/fuse or /dev/cuse fd (no libfuse).

One ``Connection`` per kernel connection: it reads one request per read() into a
reusable buffer, decodes ``fuse_in_header``, dispatches by opcode to a method
of an ``Operations`` object and writes the reply with one writev().  Every
FUSE-speaking front end (FUSE-file device, CUSE device, sysfs-like tree)
differs only in its ``Operations``.

Integration is pyfuse3's: ``loop.add_reader`` on the (non-blocking) fd and,
on readiness, drain requests until EAGAIN, so many sessions, sockets and
timers share one asyncio loop and nothing ever blocks it.  This is the hot
path: no logging, no cffi, one small object per request.

Operation methods take ``(req, body)`` — ``req`` a ``Request``, ``body`` a
memoryview of the request after the header, **valid only until the method
returns** (the buffer is reused; copy what a deferred reply needs).  They
return the reply payload (bytes-like, a list/tuple of bytes-like, or None for
an empty reply), ``NO_REPLY``, or an awaitable of one of those (replied when
it completes, without holding up other requests).  Raising ``OSError`` replies
``-errno``; any other exception is logged and replied EIO.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import select
import struct
import time
from collections.abc import Callable
from typing import Any

from .. import uapi

log = logging.getLogger(__name__)

IN_HEADER = uapi.codec("struct fuse_in_header")
OUT_HEADER = uapi.codec("struct fuse_out_header")
INIT_IN = uapi.codec("struct fuse_init_in")
INIT_OUT = uapi.codec("struct fuse_init_out")
NOTIFY_POLL = uapi.codec("struct fuse_notify_poll_wakeup_out")

_IN_HDR_SIZE = IN_HEADER.size
_OUT_HDR_SIZE = OUT_HEADER.size
_unpack_in = IN_HEADER.struct.unpack_from
_pack_out = OUT_HEADER.struct.pack

#: A method result meaning "the kernel expects no reply" (FORGET, INTERRUPT...).
NO_REPLY: Any = object()

#: Protocol this engine speaks (the kernel adapts down to it).
KERNEL_VERSION = uapi.FUSE_KERNEL_VERSION
KERNEL_MINOR_VERSION = uapi.FUSE_KERNEL_MINOR_VERSION

# Kernel-reserved "no reply" opcodes.
_NO_REPLY_OPS = frozenset({uapi.FUSE_FORGET, uapi.FUSE_BATCH_FORGET, uapi.FUSE_INTERRUPT})

_INTERRUPT = uapi.FUSE_INTERRUPT
_IOCTL = uapi.FUSE_IOCTL
_U64 = struct.Struct("=Q")
_SIGKILL_BIT = 1 << (9 - 1)


def _fatal_signal_pending(tid: int) -> bool:
    """Whether thread ``tid`` is being killed (SIGKILL pending) or already gone."""
    try:
        with open(f"/proc/{tid}/status", "rb") as f:
            for line in f:
                if line.startswith((b"SigPnd:", b"ShdPnd:")) and int(line.split()[1], 16) & _SIGKILL_BIT:
                    return True
    except (OSError, ValueError):
        return True
    return False


def _method_name(opcode_name: str) -> str:
    """``FUSE_GETATTR`` -> ``getattr``, ``CUSE_INIT`` -> ``cuse_init``."""
    return opcode_name[5:].lower() if opcode_name.startswith("FUSE_") else opcode_name.lower()


#: opcode -> Operations method name, from the kernel's ``enum fuse_opcode``.
OPCODE_METHODS: dict[int, str] = {
    value: _method_name(name)
    for value, name in uapi.ffi.typeof("enum fuse_opcode").elements.items()
    if "RESERVED" not in name
}


SETATTR_IN = uapi.codec("struct fuse_setattr_in")


def apply_setattr(node: Any, body: memoryview) -> dict[str, Any]:
    """Apply a FUSE_SETATTR's mode/owner/times to ``node`` (attributes mode, uid, gid, atime,
    mtime, ctime); returns the decoded request so the caller can refuse what it must (size).

    The kernel has already checked ownership (default_permissions); the file type bits stay.
    """
    f = SETATTR_IN.decode(body)
    valid = f["valid"]
    now = int(time.time())
    if valid & uapi.FATTR_MODE:
        node.mode = (node.mode & ~0o7777) | (f["mode"] & 0o7777)
    if valid & uapi.FATTR_UID:
        node.uid = f["uid"]
    if valid & uapi.FATTR_GID:
        node.gid = f["gid"]
    if valid & uapi.FATTR_ATIME:
        node.atime = now if valid & uapi.FATTR_ATIME_NOW else f["atime"]
    if valid & uapi.FATTR_MTIME:
        node.mtime = now if valid & uapi.FATTR_MTIME_NOW else f["mtime"]
    node.ctime = now
    return f


_DIRENT = uapi.codec("struct fuse_dirent")


def pack_dirents(entries: Any, offset: int, size: int) -> bytes:
    """A FUSE_READDIR reply: ``(ino, name, mode)`` entries from ``offset`` on, at most ``size`` bytes."""
    out = bytearray()
    for i, (ino, name, mode) in enumerate(entries, 1):
        if i <= offset:
            continue
        rec = _DIRENT.struct.pack(ino, i, len(name), (mode & 0o170000) >> 12) + name
        rec += b"\0" * (-len(rec) % 8)
        if len(out) + len(rec) > size:
            break
        out += rec
    return bytes(out)


class Request:
    """The parts of ``fuse_in_header`` an operation needs."""

    __slots__ = ("unique", "opcode", "nodeid", "uid", "gid", "pid")

    def __init__(self, unique: int, opcode: int, nodeid: int, uid: int, gid: int, pid: int):
        self.unique = unique
        self.opcode = opcode
        self.nodeid = nodeid
        self.uid = uid
        self.gid = gid
        self.pid = pid  # the calling *thread* id

    def __repr__(self) -> str:
        return (f"Request(unique={self.unique}, opcode={self.opcode}, nodeid={self.nodeid}, "
                f"uid={self.uid}, gid={self.gid}, pid={self.pid})")


class Operations:
    """Default answers; a front end overrides the opcodes it serves.

    Any opcode without a method here or in the subclass is answered ENOSYS
    (the kernel then remembers "not implemented" for POLL, FLUSH, ...).
    """

    #: FUSE_INIT flags this filesystem wants (intersected with the kernel's offer).
    init_flags: int = 0
    #: Largest WRITE payload accepted; also sizes the read buffer.
    max_write: int = 128 * 1024
    #: FUSE_MAX_PAGES value requested in FUSE_INIT (request size cap, pages).
    max_pages: int = 256

    def init(self, req: Request, body: memoryview) -> Any:
        """FUSE_INIT: negotiate down to what both sides speak."""
        major, minor, max_readahead, flags = INIT_IN.struct.unpack_from(body, 0)[:4]
        if major != KERNEL_VERSION:
            # Newer major: answer with ours only, the kernel re-sends INIT (never happens in 7.x).
            return INIT_OUT.encode(major=KERNEL_VERSION, minor=KERNEL_MINOR_VERSION)
        want = self.init_flags | uapi.FUSE_MAX_PAGES
        return INIT_OUT.encode(
            major=KERNEL_VERSION,
            minor=min(minor, KERNEL_MINOR_VERSION),
            max_readahead=max_readahead,
            flags=flags & want,
            # RELEASE of a FUSE file is a background request; past max_background the kernel holds it
            # back and a later OPEN overtakes it (a false EBUSY after a process closing thousands of
            # session fds died).  With room for every one, they reach us in the order they were made.
            max_background=0xFFFF,
            congestion_threshold=0xC000,
            max_write=self.max_write,
            time_gran=1,
            max_pages=self.max_pages,
        )

    def destroy(self, req: Request, body: memoryview) -> Any:
        return None

    def interrupt(self, req: Request, body: memoryview) -> Any:
        """Ignored: every request here is answered promptly anyway."""
        return NO_REPLY

    def forget(self, req: Request, body: memoryview) -> Any:
        return NO_REPLY

    def batch_forget(self, req: Request, body: memoryview) -> Any:
        return NO_REPLY

    def started(self, connection: Connection) -> None:
        """``connection`` serves these operations from now on (``connection.serve_queued`` may be kept)."""

    def stopped(self, connection: Connection) -> None:
        """``connection`` no longer serves them."""


class Connection:
    """One kernel connection: the fd, the read buffer, the dispatch table, the replies."""

    def __init__(self, fd: int, ops: Operations, *, name: str = "fuse", bufsize: int | None = None):
        self.fd = fd
        self.ops = ops
        self.name = name
        if bufsize is None:
            bufsize = max(ops.max_write, ops.max_pages * 4096, 1 << 20) + 4096
        self._buf = bytearray(max(bufsize, uapi.FUSE_MIN_READ_BUFFER))
        self._mv = memoryview(self._buf)
        self._iov = [self._buf]
        #: for ``serve_pending``: whether anything is queued, without a read that fails
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)
        self._table: dict[int, Callable[[Request, memoryview], Any]] = {}
        for opcode, mname in OPCODE_METHODS.items():
            meth = getattr(ops, mname, None)
            if meth is not None:
                self._table[opcode] = meth
        #: ``ops.raw_ioctl(buf, unique, uid, gid, pid)``, when the front end has one: FUSE_IOCTL
        #: straight from the read buffer, returning the whole framed reply (or an awaitable of
        #: the payload, like any operation)
        self._raw_ioctl: Callable[..., Any] | None = getattr(ops, "raw_ioctl", None)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._serving = False
        self._pending: set[asyncio.Future[Any]] = set()
        self._deferred: dict[int, tuple[asyncio.Future[Any], int]] = {}  # unique -> (future, caller tid)
        self.closed: asyncio.Future[None] | None = None

    # -- lifecycle -------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Start serving on ``loop`` (default: the running loop)."""
        self._loop = loop or asyncio.get_running_loop()
        self.closed = self._loop.create_future()
        os.set_blocking(self.fd, False)
        self._loop.add_reader(self.fd, self.serve_queued)
        self._serving = True
        self.ops.started(self)

    def stop(self) -> None:
        """Stop reading (the fd stays open: the owner closes it)."""
        if self._loop is not None and self._serving:
            self._serving = False
            self._loop.remove_reader(self.fd)
            self.ops.stopped(self)
        for fut in list(self._pending):
            fut.cancel()
        if self.closed is not None and not self.closed.done():
            self.closed.set_result(None)

    def _end(self) -> None:
        log.debug("%s: connection ended (ENODEV)", self.name)
        self.stop()

    # -- hot path --------------------------------------------------------
    def serve_pending(self) -> None:
        """``serve_queued`` if the kernel has queued anything: what work running between requests
        calls (``EmulatedDevice.pump``), where mostly nothing is queued and a poll costs a third
        of a read that fails."""
        if self._poll.poll(0):
            self.serve_queued()

    def serve_queued(self) -> None:
        """Serve every request the kernel has queued, without blocking: the fd's reader, and
        what work running between requests calls so that a request that arrived meanwhile
        is answered first (on the loop's thread only)."""
        fd = self.fd
        iov = self._iov
        mv = self._mv
        table = self._table
        readv = os.readv
        writev = os.writev
        write = os.write
        raw_ioctl = self._raw_ioctl
        while True:
            try:
                n = readv(fd, iov)
            except BlockingIOError:
                return
            except InterruptedError:
                continue
            except OSError as e:
                if e.errno == errno.ENOENT:  # request aborted between poll and read
                    continue
                if e.errno != errno.ENODEV:  # ENODEV: unmounted / aborted / CUSE init refused
                    log.error("%s: read failed: %s; ending the connection", self.name, e)
                self._end()
                return
            if n < _IN_HDR_SIZE:
                continue
            _len, opcode, unique, nodeid, uid, gid, pid, _ext, _pad = _unpack_in(mv, 0)
            if opcode == _INTERRUPT:
                if self._deferred and n >= _IN_HDR_SIZE + 8:
                    self._interrupt(_U64.unpack_from(mv, _IN_HDR_SIZE)[0])
                continue
            if opcode == _IOCTL and raw_ioctl is not None:
                # a device's hot request: no Request object, no slicing, the reply comes back framed
                try:
                    res = raw_ioctl(mv, unique, uid, gid, pid)
                except Exception as e:
                    self._failed(unique, opcode, e)
                    continue
                if type(res) is bytes:
                    try:
                        write(fd, res)
                    except OSError as e:
                        self._write_failed(e)
                else:
                    self._defer(unique, opcode, res, pid)
                continue
            req = Request(unique, opcode, nodeid, uid, gid, pid)
            meth = table.get(opcode)
            if meth is None:
                # reply directly: re-raising one shared exception object would chain a new
                # traceback onto it every time (a leak of ~1 KiB per unimplemented request)
                if opcode not in _NO_REPLY_OPS:
                    self.reply_error(unique, errno.ENOSYS)
                continue
            try:
                res = meth(req, mv[_IN_HDR_SIZE:n])
            except Exception as e:
                self._failed(unique, opcode, e)
                continue
            if type(res) is bytes:  # the common reply, written inline (one writev, no extra calls)
                try:
                    writev(fd, [_pack_out(_OUT_HDR_SIZE + len(res), 0, unique), res])
                except OSError as e:
                    self._write_failed(e)
                continue
            if res is NO_REPLY:
                continue
            if res is None or isinstance(res, (bytes, bytearray, memoryview, list, tuple)):
                self.reply(unique, res)
            else:
                self._defer(unique, opcode, res, pid)

    def _failed(self, unique: int, opcode: int, exc: Exception) -> None:
        """An operation raised: OSError replies its errno, anything else is logged and replied EIO."""
        if isinstance(exc, OSError):
            err = exc.errno or errno.EIO
        else:
            log.error("%s: opcode %d failed", self.name, opcode, exc_info=exc)
            err = errno.EIO
        if opcode not in _NO_REPLY_OPS:
            self.reply_error(unique, err)

    def _interrupt(self, unique: int) -> None:
        """FUSE_INTERRUPT of a deferred request: drop it if its caller is dying.

        A caller killed inside a request the server has read waits, unkillable,
        for the reply: without this a slow (e.g. fault-injected) ioctl would keep
        a SIGKILLed process — and its device release — alive until it ends.
        Only fatal signals cancel: the real device's waits are killable, not
        interruptible, so any other signal must not turn into EINTR.
        """
        entry = self._deferred.get(unique)
        if entry is not None and _fatal_signal_pending(entry[1]):
            entry[0].cancel()  # ``done`` replies EINTR, which nobody will read

    def _defer(self, unique: int, opcode: int, aw: Any, tid: int = 0) -> None:
        fut = asyncio.ensure_future(aw, loop=self._loop)
        self._pending.add(fut)
        self._deferred[unique] = (fut, tid)

        def done(f: asyncio.Future[Any]) -> None:
            self._pending.discard(f)
            self._deferred.pop(unique, None)
            if f.cancelled():
                self.reply_error(unique, errno.EINTR)
                return
            exc = f.exception()
            if exc is None:
                res = f.result()
                if res is not NO_REPLY:
                    self.reply(unique, res)
            elif isinstance(exc, OSError):
                self.reply_error(unique, exc.errno or errno.EIO)
            else:
                log.error("%s: deferred opcode %d failed", self.name, opcode, exc_info=exc)
                self.reply_error(unique, errno.EIO)

        fut.add_done_callback(done)

    # -- replies ---------------------------------------------------------
    def reply(self, unique: int, payload: Any = None) -> None:
        """Success reply; ``payload`` bytes-like, a list/tuple of them, or None."""
        if payload is None:
            self._write([_pack_out(_OUT_HDR_SIZE, 0, unique)])
        elif isinstance(payload, (list, tuple)):
            size = _OUT_HDR_SIZE
            for p in payload:
                size += len(p)
            self._write([_pack_out(size, 0, unique), *payload])
        else:
            self._write([_pack_out(_OUT_HDR_SIZE + len(payload), 0, unique), payload])

    def reply_error(self, unique: int, err: int) -> None:
        self._write([_pack_out(_OUT_HDR_SIZE, -err, unique)])

    def notify_poll(self, kh: int) -> None:
        """FUSE_NOTIFY_POLL: wake pollers that registered ``kh`` (fuse_poll_in.kh)."""
        self._write([_pack_out(_OUT_HDR_SIZE + NOTIFY_POLL.size, uapi.FUSE_NOTIFY_POLL, 0),
                     NOTIFY_POLL.pack(kh)])

    def _write(self, bufs: list[Any]) -> None:
        try:
            os.writev(self.fd, bufs)
        except OSError as e:
            self._write_failed(e)

    def _write_failed(self, e: OSError) -> None:
        # ENOENT: the caller was interrupted/died and the request is gone.
        # ENODEV: connection aborted; the reader will see it too.
        if e.errno not in (errno.ENOENT, errno.ENODEV):
            log.warning("%s: reply write failed: %s", self.name, e)
