"""The CUSE transport: a real character device served over /dev/cuse.

Facts from fs/fuse/cuse.c this relies on:

- Opening /dev/cuse queues CUSE_INIT (opcode 4096); the reply is
  ``cuse_init_out`` + ``"DEVNAME=<name>\\0"``.  The kernel builds the device
  *while our reply write() runs* (``cuse_process_init_reply``): a duplicate
  name aborts the connection (our next read gets ENODEV).
- ``dev_major = 0`` makes the kernel pick a dynamic major
  (``alloc_chrdev_region``); the chosen numbers are only visible in
  /sys/class/cuse/<name>/dev.  The node appears in devtmpfs by itself; if
  /dev is not devtmpfs (and no udev), we mknod it from those numbers.
- A name with ``/`` becomes a subdirectory of /dev (devtmpfs turns the
  kobject's ``!`` back into ``/``).
- CUSE keeps FUSE_DEFAULT_MAX_PAGES_PER_REQ (32 pages) — max_pages cannot be
  negotiated — so an ioctl moves at most 128 KiB per direction; bigger
  ranges are served by process_vm (see ``memory.RetryMemory``).
- Unrestricted ioctls arrive with no data; ``RetryMemory`` answers
  FUSE_IOCTL_RETRY with iovecs and the handler is re-run on each round.
  The kernel does not echo the iovecs, so we remember them per calling thread.
- READ always carries offset 0 (the handler keeps any position itself).
- Closing the /dev/cuse fd removes the device.

Paths outside /dev: the kernel device gets a derived unique name
(``cusedev-<escaped path>``) under /dev, and at the requested path we mknod a
second node with the same numbers — a real char device, as clients expect —
or, on a ``nodev`` filesystem, a symlink to the /dev node.

The session node: when the handler makes files of its own (session fds), a
second CUSE device on a second /dev/cuse connection, served by the same loop,
named ``<devname>-session`` (/dev/liveupdate-session), root-only (0600, like
the kernel's anon inode).  Only the emulator opens it; any other open (a
client's re-open of a session fd through /proc) gets the handler's ENXIO.
CUSE ignores FOPEN_NONSEEKABLE (``cuse_open`` never calls
``fuse_finish_open``) and its llseek is ``noop_llseek``, so on this node
pread/pwrite answer as read/write (EINVAL) and lseek returns 0, where the
kernel's anon inode gives ESPIPE.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import stat
import subprocess
from typing import Any

from .. import uapi
from ..device.memory import CUSE_MAX_IOCTL_BYTES, ProcessVmMemory, RetryMemory
from ..device.seam import DEVICE_NODE, SESSION_NODE, CallerMemory, DeviceHandler, NeedRetry
from ..fuse.wire import NO_REPLY, Connection, Request
from . import TransportError
from .devops import IOCTL_IN, DeviceOps

log = logging.getLogger(__name__)

CUSE_INIT_IN = uapi.codec("struct cuse_init_in")
CUSE_INIT_OUT = uapi.codec("struct cuse_init_out")
IOCTL_OUT = uapi.codec("struct fuse_ioctl_out")
IOVEC = uapi.codec("struct fuse_ioctl_iovec")
_pack_ioctl_out = IOCTL_OUT.struct.pack
_pack_iovec = IOVEC.struct.pack

CUSE_DEV = "/dev/cuse"
MAX_IO = 128 * 1024
# Past this many threads with retry state, that of threads which died mid-retry is dropped.
_MAX_RETRY_STATE = 4096


def cuse_available(try_modprobe: bool = True) -> str | None:
    """None if /dev/cuse can be opened, else why not (one line)."""
    if not os.path.exists(CUSE_DEV) and try_modprobe:
        try:
            subprocess.run(["modprobe", "cuse"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           timeout=10, check=False)
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        fd = os.open(CUSE_DEV, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        return f"{CUSE_DEV}: {e.strerror}"
    os.close(fd)  # closing before CUSE_INIT is answered creates nothing
    return None


def devname_for(path: str) -> tuple[str, bool]:
    """(CUSE DEVNAME, whether the kernel's node *is* ``path``)."""
    path = os.path.abspath(path)
    if path.startswith("/dev/") and len(path) > 5:
        return path[5:], True
    return "cusedev-" + path.strip("/").replace("_", "__").replace("/", "_"), False


def session_devname(devname: str) -> str:
    """The DEVNAME of the session node of the CUSE device ``devname``."""
    return devname + "-session"


def session_rdev_of(rdev: int) -> int | None:
    """The device number of the session node beside the CUSE device ``rdev`` (None: no such node).

    For observers that see the device only through another path (a bind
    mount): the kernel names the device in sysfs, the session node's name follows."""
    try:
        kobj = os.path.basename(os.readlink(f"/sys/dev/char/{os.major(rdev)}:{os.minor(rdev)}"))
        with open(f"/sys/class/cuse/{session_devname(kobj)}/dev") as f:
            ma, mi = f.read().strip().split(":")
    except (OSError, ValueError):
        return None
    return os.makedev(int(ma), int(mi))


class CuseOps(DeviceOps):
    """Device requests over CUSE, plus CUSE_INIT and the ioctl retry protocol."""

    def __init__(self, handler: DeviceHandler, devname: str, memory: str = "retry", node: str = DEVICE_NODE):
        super().__init__(handler)
        self.devname = devname
        self.node = node
        self.use_retry = memory == "retry"
        self.connection: Connection | None = None
        self.initialized: asyncio.Future[None] | None = None
        # tid -> (fh, cmd, arg, in_ranges, out_ranges) of the RETRY we last sent it.
        self._asked: dict[int, tuple[int, int, int, list[tuple[int, int]], list[tuple[int, int]]]] = {}

    def cuse_init(self, req: Request, body: memoryview) -> Any:
        major, minor = CUSE_INIT_IN.struct.unpack_from(body, 0)[:2]
        out = CUSE_INIT_OUT.encode(major=uapi.FUSE_KERNEL_VERSION,
                                   minor=min(minor, uapi.FUSE_KERNEL_MINOR_VERSION),
                                   flags=uapi.CUSE_UNRESTRICTED_IOCTL, max_read=MAX_IO, max_write=MAX_IO,
                                   dev_major=0, dev_minor=0)
        info = b"DEVNAME=" + self.devname.encode() + b"\0"
        assert self.connection is not None
        # Reply here so the device exists when ``initialized`` fires.
        self.connection.reply(req.unique, [out, info])
        if self.initialized is not None and not self.initialized.done():
            self.initialized.set_result(None)
        return NO_REPLY

    def memory_for(self, req: Request, cmd: int, arg: int, flags: int, in_data: memoryview,
                   in_size: int, out_size: int, fh: int) -> CallerMemory:
        if not self.use_retry or not flags & uapi.FUSE_IOCTL_UNRESTRICTED:
            return ProcessVmMemory(req.pid)
        asked = self._asked.pop(req.pid, None)
        if (asked is not None and asked[0] == fh and asked[1] == cmd and asked[2] == arg
                and sum(n for _a, n in asked[3]) == in_size and sum(n for _a, n in asked[4]) == out_size):
            return RetryMemory(req.pid, asked[3], bytes(in_data), asked[4], CUSE_MAX_IOCTL_BYTES)
        return RetryMemory(req.pid, max_bytes=CUSE_MAX_IOCTL_BYTES)

    def _prune(self) -> None:
        """Drop the retry state of threads that are gone.  A live thread has at most one call in
        flight, so what stays is bounded by the live callers and no in-flight state is lost."""
        for tid in [t for t in self._asked if not os.path.exists(f"/proc/{t}")]:
            del self._asked[tid]

    def ioctl_reply(self, result: int, mem: CallerMemory) -> Any:
        head = _pack_ioctl_out(result, 0, 0, 0)
        if type(mem) is RetryMemory:
            payload = mem.out_payload()
            if payload:
                return [head, payload]
        return head

    def ioctl(self, req: Request, body: memoryview) -> Any:
        try:
            return super().ioctl(req, body)
        except NeedRetry as r:
            fh, _flags, cmd, arg = IOCTL_IN.struct.unpack_from(body, 0)[:4]
            if len(self._asked) >= _MAX_RETRY_STATE:
                self._prune()
            self._asked[req.pid] = (fh, cmd, arg, r.in_ranges, r.out_ranges)
            parts = [_pack_ioctl_out(0, uapi.FUSE_IOCTL_RETRY, len(r.in_ranges), len(r.out_ranges))]
            parts += [_pack_iovec(a, n) for a, n in r.in_ranges]
            parts += [_pack_iovec(a, n) for a, n in r.out_ranges]
            return parts


class CuseChannel:
    """One CUSE device: a /dev/cuse connection, its kernel device and its /dev node."""

    def __init__(self, ops: CuseOps, *, mode: int, uid: int, gid: int, node_timeout: float):
        self.ops = ops
        self.devname = ops.devname
        self.dev_node = "/dev/" + self.devname
        self.sys_dir = "/sys/class/cuse/" + self.devname.replace("/", "!")
        self.mode, self.uid, self.gid = mode & 0o7777, uid, gid
        self.node_timeout = node_timeout
        self.fd = -1
        self.connection: Connection | None = None
        self.devt = 0
        self.made: list[str] = []  # nodes/symlinks we created, removed on stop

    def check_free(self, what: str) -> None:
        if os.path.exists(self.sys_dir):
            raise TransportError(f"{what}: a CUSE device named {self.devname!r} already exists "
                                 "(another emulator?)")
        if os.path.lexists(self.dev_node) and not clear_stale(self.dev_node, self.dev_node):
            raise TransportError(f"{self.dev_node}: already exists")

    async def start(self, what: str) -> None:
        """Register the device and wait for its /dev node (``what`` names it in errors)."""
        loop = asyncio.get_running_loop()
        try:
            self.fd = os.open(CUSE_DEV, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise TransportError(f"{CUSE_DEV}: {e.strerror}") from e
        self.connection = Connection(self.fd, self.ops, name=f"cuse:{self.devname}")
        self.ops.connection = self.connection
        self.ops.initialized = loop.create_future()
        self.connection.start(loop)
        assert self.connection.closed is not None
        await asyncio.wait([self.ops.initialized, self.connection.closed], timeout=10,
                           return_when=asyncio.FIRST_COMPLETED)
        if not self.ops.initialized.done():
            raise TransportError(f"{what}: no CUSE_INIT from the kernel")
        await asyncio.sleep(0)  # let an immediate ENODEV (name refused) be read
        if self.connection.closed.done() or not os.path.exists(self.sys_dir):
            raise TransportError(f"{what}: the kernel refused device name {self.devname!r} "
                                 "(already registered?)")
        self.devt = os.makedev(*self._read_devt())
        await self._wait_node()

    def _read_devt(self) -> tuple[int, int]:
        with open(os.path.join(self.sys_dir, "dev")) as f:
            ma, mi = f.read().strip().split(":")
        return int(ma), int(mi)

    def mknod(self, path: str) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.mknod(path, stat.S_IFCHR | self.mode, self.devt)
        self.made.append(path)

    async def _wait_node(self) -> None:
        """devtmpfs or udev usually makes /dev/<name>; if neither does, mknod it ourselves."""
        deadline = asyncio.get_running_loop().time() + self.node_timeout
        while True:
            try:
                st = os.stat(self.dev_node)
                if stat.S_ISCHR(st.st_mode) and st.st_rdev == self.devt:
                    return
            except FileNotFoundError:
                pass
            if asyncio.get_running_loop().time() >= deadline:
                break
            await asyncio.sleep(0.01)
        log.info("%s did not appear; creating it", self.dev_node)
        if os.path.lexists(self.dev_node):
            raise TransportError(f"{self.dev_node}: exists but is not our device")
        self.mknod(self.dev_node)

    def fix_node(self, path: str) -> None:
        os.chown(path, self.uid, self.gid, follow_symlinks=False)
        os.chmod(path, self.mode)

    def stop(self) -> None:
        """Close the channel (the kernel removes its device and devtmpfs node), then remove nodes we made."""
        if self.connection is not None:
            self.connection.stop()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        remove_made(self.made)


def remove_made(made: list[str]) -> None:
    """Unlink the nodes and links we made (newest first), emptying ``made``; a missing one is fine."""
    while made:
        p = made.pop()
        try:
            os.unlink(p)
        except OSError as e:
            if e.errno != errno.ENOENT:
                log.warning("remove %s: %s", p, e.strerror)


def clear_stale(path: str, dev_node: str) -> bool:
    """Remove a node a killed emulator left at ``path``; True if it was stale and is gone.

    Only ours can be stale: a char device whose number no registered device
    owns any more (/sys/dev/char/MAJ:MIN gone — the kernel dropped the CUSE
    device with the dead emulator's fd), or a symlink to our /dev node
    (``dev_node``) that no longer resolves.  A live device (a real
    /dev/liveupdate!) is kept.
    """
    try:
        st = os.lstat(path)
        if stat.S_ISCHR(st.st_mode):
            owner = f"/sys/dev/char/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
            if os.path.lexists(owner):
                return False
        elif stat.S_ISLNK(st.st_mode):
            if os.readlink(path) != dev_node or os.path.exists(path):
                return False
        else:
            return False
        os.unlink(path)
    except OSError as e:
        log.warning("%s: cannot check or remove a stale node: %s", path, e.strerror)
        return False
    log.warning("%s: removed a stale node left by an emulator that died", path)
    return True


class CuseTransport:
    """Serve ``handler`` as the character device ``device_path`` through CUSE.

    With ``session``, also the session node (``session_node_path``), on a
    second connection served by the same loop."""

    name = "cuse"

    def __init__(self, device_path: str, handler: DeviceHandler, *, mode: int = 0o600, uid: int = 0,
                 gid: int = 0, memory: str = "retry", node_timeout: float = 1.0, session: bool = False):
        self.device_path = os.path.abspath(device_path)
        self.devname, self._kernel_node_is_path = devname_for(self.device_path)
        self.handler = handler
        self.ops = CuseOps(handler, self.devname, memory)
        self.device = CuseChannel(self.ops, mode=mode, uid=uid, gid=gid, node_timeout=node_timeout)
        self.dev_node, self.sys_dir = self.device.dev_node, self.device.sys_dir
        self.session: CuseChannel | None = None
        if session:
            ops = CuseOps(handler, session_devname(self.devname), memory, SESSION_NODE)
            self.session = CuseChannel(ops, mode=0o600, uid=0, gid=0, node_timeout=node_timeout)
        #: the session node (None without ``session``): the handler's own opens of the files it makes
        self.session_node_path = self.session.dev_node if self.session is not None else None
        self.connection: Connection | None = None
        self._made: list[str] = []  # the node or symlink at device_path, removed on stop

    @property
    def channels(self) -> list[CuseChannel]:
        return [self.device] + ([self.session] if self.session is not None else [])

    def _check_free(self) -> None:
        for ch in self.channels:  # the /dev nodes first: the symlink may point at one
            ch.check_free(self.device_path)
        p = self.device_path
        if os.path.lexists(p) and not clear_stale(p, self.dev_node):
            raise TransportError(f"{p}: already exists")
        parent = os.path.dirname(self.device_path)
        if not os.path.isdir(parent):
            raise TransportError(f"{self.device_path}: parent directory does not exist")

    async def start(self) -> None:
        self._check_free()
        try:
            await self.device.start(self.device_path)
            self.connection = self.device.connection
            if self.session is not None:
                await self.session.start(self.session.dev_node)
            await self._udev_settle()
            for ch in self.channels:
                ch.fix_node(ch.dev_node)
            if not self._kernel_node_is_path:
                self._link_path()
        except BaseException:
            await self.stop()
            raise

    async def _udev_settle(self) -> None:
        """If udev runs, let it finish with our ADD uevents first: its default rules would reset the mode."""
        if not os.path.exists("/run/udev/control"):
            return
        try:
            proc = await asyncio.create_subprocess_exec("udevadm", "settle", "--timeout=5",
                                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            await asyncio.wait_for(proc.wait(), 10)
        except (OSError, asyncio.TimeoutError):
            pass

    def _link_path(self) -> None:
        parent = os.path.dirname(self.device_path)
        if os.statvfs(parent).f_flag & os.ST_NODEV:
            os.symlink(self.dev_node, self.device_path)
            self._made.append(self.device_path)
        else:
            self.device.mknod(self.device_path)
            self.device.fix_node(self.device_path)

    async def stop(self) -> None:
        """Close the channels (the kernel removes its devices), then remove nodes we made."""
        remove_made(self._made)
        for ch in reversed(self.channels):
            ch.stop()
