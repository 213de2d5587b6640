"""FUSE operations shared by the device transports: open/release/read/write/ioctl/poll → DeviceHandler.

Both the FUSE-file and the CUSE device translate the same six requests the
same way; they differ in nodes (FUSE file: a root dir and two files; CUSE:
one node per connection) and in how ioctl memory is reached (``memory_for``).
Every open tells the handler which node it arrived on (``node_of``): the
device node, or the session node that holds the files the profile makes.
"""

from __future__ import annotations

import errno
import inspect
import struct
from typing import Any

from .. import uapi
from ..device.memory import ProcessVmMemory
from ..device.seam import DEVICE_NODE, Caller, CallerMemory, DeviceHandler
from ..fuse.wire import IN_HEADER, OUT_HEADER, Connection, Operations, Request

OPEN_IN = uapi.codec("struct fuse_open_in")
OPEN_OUT = uapi.codec("struct fuse_open_out")
RELEASE_IN = uapi.codec("struct fuse_release_in")
READ_IN = uapi.codec("struct fuse_read_in")
WRITE_IN = uapi.codec("struct fuse_write_in")
WRITE_OUT = uapi.codec("struct fuse_write_out")
IOCTL_IN = uapi.codec("struct fuse_ioctl_in")
IOCTL_OUT = uapi.codec("struct fuse_ioctl_out")

_unpack_ioctl_in = IOCTL_IN.struct.unpack_from
_pack_ioctl_out = IOCTL_OUT.struct.pack
_IOCTL_IN_SIZE = IOCTL_IN.size
_IOCTL_COMPAT = uapi.FUSE_IOCTL_COMPAT
# a whole FUSE_IOCTL reply in one pack: fuse_out_header then fuse_ioctl_out
_pack_framed = struct.Struct(OUT_HEADER.struct.format + IOCTL_OUT.struct.format[1:]).pack
_FRAMED_LEN = OUT_HEADER.size + IOCTL_OUT.size
_IN_HDR_SIZE = IN_HEADER.size
_MAX_CALLERS = 256


def _enotty() -> OSError:
    return OSError(errno.ENOTTY, "Inappropriate ioctl for device")


class DeviceOps(Operations):
    """Requests on the device node, handed to a ``DeviceHandler``."""

    #: FOPEN_* flags of every OPEN reply (``open_flags_for`` may add per node).
    open_flags = 0
    #: the node this connection's opens are of, unless ``node_of`` says otherwise
    node = DEVICE_NODE

    def __init__(self, handler: DeviceHandler):
        self.handler = handler
        # Callers are immutable and a client issues many ioctls from few threads: reuse them, and
        # their direct memory (building a frozen dataclass was the costliest Python step of a GET_STATE).
        self._callers: dict[tuple[int, int, int], tuple[Caller, ProcessVmMemory]] = {}
        # Neither hook overridden (the FUSE file): the connection's fast path ``raw_ioctl`` serves every
        # ioctl; otherwise (CUSE) the connection calls ``ioctl``, which goes through the hooks.
        cls = type(self)
        if cls.memory_for is not DeviceOps.memory_for or cls.ioctl_reply is not DeviceOps.ioctl_reply:
            self.raw_ioctl = None  # type: ignore[assignment]

    def started(self, connection: Connection) -> None:
        pumps = getattr(self.handler, "pumps", None)  # EmulatedDevice: see its ``pump``
        if pumps is not None:
            pumps.append(connection.serve_pending)

    def stopped(self, connection: Connection) -> None:
        pumps = getattr(self.handler, "pumps", None)
        if pumps is not None and connection.serve_pending in pumps:
            pumps.remove(connection.serve_pending)

    # -- hooks -----------------------------------------------------------
    def node_of(self, req: Request) -> str:
        """The node an OPEN is of (``DEVICE_NODE``/``SESSION_NODE``); raise if none (FUSE file: the root)."""
        return self.node

    def open_flags_for(self, node: str) -> int:
        """FOPEN_* flags of an OPEN reply on ``node``."""
        return self.open_flags

    def memory_for(self, req: Request, cmd: int, arg: int, flags: int, in_data: memoryview,
                   in_size: int, out_size: int, fh: int) -> CallerMemory:
        return ProcessVmMemory(req.pid)

    def ioctl_reply(self, result: int, mem: CallerMemory) -> Any:
        return _pack_ioctl_out(result, 0, 0, 0)

    # -- requests --------------------------------------------------------
    def open(self, req: Request, body: memoryview) -> Any:
        node = self.node_of(req)
        flags = OPEN_IN.struct.unpack_from(body, 0)[0]
        caller = Caller(req.pid, req.uid, req.gid)
        # a handler written before nodes existed still serves the device node
        fh = self.handler.open(caller, flags) if node == DEVICE_NODE else self.handler.open(caller, flags, node)
        return OPEN_OUT.struct.pack(fh, self.open_flags_for(node), 0)

    def release(self, req: Request, body: memoryview) -> Any:
        self.handler.release(RELEASE_IN.struct.unpack_from(body, 0)[0])
        return None

    def flush(self, req: Request, body: memoryview) -> Any:
        return None

    def read(self, req: Request, body: memoryview) -> Any:
        fh, _off, size = READ_IN.struct.unpack_from(body, 0)[:3]
        return self.handler.read(fh, Caller(req.pid, req.uid, req.gid), size)

    def write(self, req: Request, body: memoryview) -> Any:
        fh, _off, size = WRITE_IN.struct.unpack_from(body, 0)[:3]
        data = bytes(body[WRITE_IN.size:WRITE_IN.size + size])
        n = self.handler.write(fh, Caller(req.pid, req.uid, req.gid), data)
        return WRITE_OUT.struct.pack(n, 0)

    def poll(self, req: Request, body: memoryview) -> Any:
        """ENOSYS: the kernel then answers DEFAULT_POLLMASK, as for a device without ->poll."""
        raise OSError(errno.ENOSYS, "no poll")

    def _caller(self, tid: int, uid: int, gid: int) -> tuple[Caller, ProcessVmMemory]:
        """The (immutable) caller and its direct memory, reused across a client's many ioctls."""
        key = (tid, uid, gid)
        known = self._callers.get(key)
        if known is None:
            if len(self._callers) >= _MAX_CALLERS:
                self._callers.clear()
            known = self._callers[key] = (Caller(tid, uid, gid), ProcessVmMemory(tid))
        return known

    def raw_ioctl(self, buf: memoryview, unique: int, uid: int, gid: int, tid: int) -> Any:
        """FUSE_IOCTL from the connection's read buffer (its fast path), caller memory direct.

        Returns the framed reply (out header + ``fuse_ioctl_out``) or an awaitable of the payload.
        Only used while neither hook is overridden (the FUSE file); see ``__init__``.
        """
        fh, flags, cmd, arg, _in_size, _out_size = _unpack_ioctl_in(buf, _IN_HDR_SIZE)
        if flags & _IOCTL_COMPAT:
            raise _enotty()  # no compat_ioctl on the real device
        known = self._callers.get((tid, uid, gid))
        caller, pvm = known if known is not None else self._caller(tid, uid, gid)
        res = self.handler.ioctl(fh, caller, cmd, arg, pvm)
        if type(res) is not int:
            if inspect.isawaitable(res):
                return self._ioctl_later(res, pvm)
            res = int(res)
        return _pack_framed(_FRAMED_LEN, 0, unique, res, 0, 0, 0)

    def ioctl(self, req: Request, body: memoryview) -> Any:
        fh, flags, cmd, arg, in_size, out_size = _unpack_ioctl_in(body, 0)
        if flags & _IOCTL_COMPAT:
            raise _enotty()
        caller, _pvm = self._caller(req.pid, req.uid, req.gid)
        mem = self.memory_for(
            req, cmd, arg, flags, body[_IOCTL_IN_SIZE:_IOCTL_IN_SIZE + in_size], in_size, out_size, fh)
        res = self.handler.ioctl(fh, caller, cmd, arg, mem)
        if type(res) is not int and inspect.isawaitable(res):
            return self._ioctl_later(res, mem)
        return self.ioctl_reply(int(res), mem)

    async def _ioctl_later(self, aw: Any, mem: CallerMemory) -> Any:
        return self.ioctl_reply(int(await aw), mem)
