"""The sysfs shim: a profile's attributes (v3: ``<root>/kernel/liveupdate/{state,update_count}``)
with real sysfs semantics.

Two backends behind one ``SysfsTree`` interface:

- ``FuseSysfs`` (default): a read-only FUSE filesystem served by the same wire
  engine on the same asyncio loop as the device.  Content is produced on read
  from the live core, and ``sysfs_notify`` is modelled as kernfs does it
  (fs/kernfs/file.c): each attribute has an event counter (starting at 1) that
  a change bumps; each open file remembers the counter it saw when its content
  was last generated (0 at open).  POLL answers ``DEFAULT_POLLMASK`` plus
  ``POLLERR|POLLPRI`` while the two differ, and FUSE_NOTIFY_POLL wakes every
  poller after a change.  Reads follow seq_file: content is generated on a read
  at an offset other than where the previous read ended (so ``lseek(0)`` or
  ``pread(.., 0)`` refreshes); a sequential read continues the same snapshot;
  the read at its end returns 0 (so ``cat`` stops).
- ``FileSysfs`` (fallback, no FUSE): plain files rewritten with temp file +
  rename after each change, so inotify watchers of the directory see
  IN_MOVED_TO.  No poll semantics, and a read may lag a change by one loop
  iteration.

Errnos mirror sysfs for a root caller (checked against a running kernel):
open for write -> EACCES (kernfs has no store op), create/mknod(S_IFREG) ->
EACCES (no ->create), mkdir/rmdir/unlink/rename/link/symlink/mknod(other) ->
EPERM, renameat2 with flags -> EINVAL; chmod/chown/utimes/truncate succeed
(kernfs_iop_setattr keeps mode/owner/times and ignores the size).  Non-root
callers are refused by the kernel itself (``default_permissions``).

Notifications are sent from a loop callback after the change, never from
inside the ioctl, and never wait on a reader: a stuck reader cannot delay an
ioctl.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import select
import stat
import struct
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .. import uapi
from ..fuse import mount as sysmount
from ..fuse.wire import Connection, Operations, Request, apply_setattr, pack_dirents

log = logging.getLogger(__name__)

ENTRY_OUT = uapi.codec("struct fuse_entry_out")
ATTR_OUT = uapi.codec("struct fuse_attr_out")

OPEN_IN = uapi.codec("struct fuse_open_in")
OPEN_OUT = uapi.codec("struct fuse_open_out")
READ_IN = uapi.codec("struct fuse_read_in")
RELEASE_IN = uapi.codec("struct fuse_release_in")
POLL_IN = uapi.codec("struct fuse_poll_in")
POLL_OUT = uapi.codec("struct fuse_poll_out")
DIRENT = uapi.codec("struct fuse_dirent")
STATFS_OUT = uapi.codec("struct fuse_statfs_out")
# Not in cdefs/fuse.h; layouts from <linux/fuse.h>.
_GETXATTR_IN = struct.Struct("II")  # size, padding
_GETXATTR_OUT = struct.Struct("II")  # size, padding
_MKNOD_IN = struct.Struct("IIII")  # mode, rdev, umask, padding
_RENAME2_IN = struct.Struct("QII")  # newdir, flags, padding

#: What kernfs_generic_poll always reports (the kernel's DEFAULT_POLLMASK).
DEFAULT_POLLMASK = select.POLLIN | select.POLLOUT | select.POLLRDNORM | select.POLLWRNORM
#: Added while the open file has not read the attribute since its last change.
CHANGED_MASK = select.POLLERR | select.POLLPRI

FILE_MODE = 0o444
#: The issue asks for 0555; a real kernel shows 0755 on kobject directories (writes are refused either way).
DIR_MODE = 0o555
ATTR_SIZE = 4096  # what sysfs reports for every attribute, whatever it shows
_TTL = 86400  # attributes change only through our own SETATTR replies
_MS_NOEXEC = 8  # sysfs is mounted nosuid,nodev,noexec
MODES = ("auto", "fuse", "files")


class SysfsError(Exception):
    """The tree cannot be set up; one line for the user."""


# -- attributes ----------------------------------------------------------------------------------
class Attribute:
    """One sysfs attribute: how to show it, and its sysfs_notify event counter."""

    __slots__ = ("name", "show", "event", "last")

    def __init__(self, name: str, show: Callable[[], str]):
        self.name = name
        self.show = show
        self.event = 1  # kernfs_open_node.event starts at 1; an open file's seen counter at 0
        self.last = self.content()

    def content(self) -> bytes:
        return self.show().encode()

    def check(self) -> bool:
        """Bump the event counter if what the attribute shows changed since the last check."""
        new = self.content()
        if new == self.last:
            return False
        self.last = new
        self.event += 1
        return True


def attributes(shows: Mapping[str, Callable[[], str]]) -> dict[str, Attribute]:
    """A profile's ``sysfs(model)`` (path below the root -> text) as attributes."""
    return {rel: Attribute(os.path.basename(rel), show) for rel, show in shows.items()}


class SysfsTree:
    """Attributes under ``root`` kept in step with a core; subclasses publish them."""

    kind = ""

    def __init__(self, root: str, core: Any, attrs: dict[str, Attribute]):
        self.root = os.path.abspath(root)
        self.core = core
        self.attrs = attrs
        self.loop: asyncio.AbstractEventLoop | None = None
        self._pending: set[Attribute] = set()
        self._scheduled = False
        self._made_dirs: list[str] = []

    def path(self, rel: str) -> str:
        return os.path.join(self.root, rel)

    # -- change detection (runs inside the ioctl: cheap, never blocks) -------------------------
    def _on_change(self, old: Any, new: Any) -> None:
        for a in self.attrs.values():
            if a.check():
                self._pending.add(a)
        if self._pending and not self._scheduled and self.loop is not None:
            self._scheduled = True
            self.loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        pending, self._pending = self._pending, set()
        if pending:
            self.publish(pending)

    def publish(self, changed: set[Attribute]) -> None:
        """Tell the world (pollers, files) that ``changed`` changed; after the ioctl, on the loop."""

    # -- lifecycle -----------------------------------------------------------------------------
    def _makedirs(self, path: str) -> None:
        """``os.makedirs`` remembering what it created, to remove exactly that on stop."""
        missing = []
        p = os.path.abspath(path)
        while not os.path.isdir(p):
            missing.append(p)
            p = os.path.dirname(p)
        for d in reversed(missing):
            os.mkdir(d, 0o755)
            self._made_dirs.append(d)

    def _remove_dirs(self) -> None:
        while self._made_dirs:
            try:
                os.rmdir(self._made_dirs.pop())
            except OSError:
                pass

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.core.listeners.append(self._on_change)

    async def stop(self) -> None:
        try:
            self.core.listeners.remove(self._on_change)
        except ValueError:
            pass


# -- the FUSE tree -------------------------------------------------------------------------------
class Node:
    """A directory or an attribute file, with the attributes kernfs keeps per node."""

    __slots__ = ("ino", "name", "parent", "mode", "uid", "gid", "atime", "mtime", "ctime", "children", "attr")

    def __init__(self, ino: int, name: bytes, parent: int, mode: int, attr: Attribute | None, now: int):
        self.ino = ino
        self.name = name
        self.parent = parent
        self.mode = mode  # with the S_IF* type bits
        self.uid = self.gid = 0
        self.atime = self.mtime = self.ctime = now
        self.children: dict[bytes, int] = {}
        self.attr = attr

    @property
    def is_dir(self) -> bool:
        return self.attr is None


class OpenFile:
    """One open file description: kernfs_open_file's ``event`` plus the seq_file buffer and position."""

    __slots__ = ("attr", "seen", "buf", "pos", "kh")

    def __init__(self, attr: Attribute):
        self.attr = attr
        self.seen = 0
        self.buf: bytes | None = None
        self.pos = 0  # where the previous read ended (seq_file's read_pos)
        self.kh: int | None = None  # the kernel's poll handle, once it asked to be notified


def _eacces() -> OSError:
    return OSError(errno.EACCES, os.strerror(errno.EACCES))


def _eperm() -> OSError:
    return OSError(errno.EPERM, os.strerror(errno.EPERM))


def _name(body: memoryview, offset: int = 0) -> bytes:
    return bytes(body[offset:]).split(b"\0", 1)[0]


class SysfsOps(Operations):
    """FUSE requests on the tree; every answer computed from ``nodes`` and the live attributes."""

    max_write = 4096

    def __init__(self, attrs: dict[str, Attribute]):
        now = int(time.time())
        self.nodes: dict[int, Node] = {uapi.FUSE_ROOT_ID: Node(uapi.FUSE_ROOT_ID, b"", uapi.FUSE_ROOT_ID,
                                                               stat.S_IFDIR | DIR_MODE, None, now)}
        for rel, attr in attrs.items():
            parent = self.nodes[uapi.FUSE_ROOT_ID]
            *dirs, leaf = rel.split("/")
            for d in dirs:
                ino = parent.children.get(d.encode())
                if ino is None:
                    ino = len(self.nodes) + 1
                    self.nodes[ino] = Node(ino, d.encode(), parent.ino, stat.S_IFDIR | DIR_MODE, None, now)
                    parent.children[d.encode()] = ino
                parent = self.nodes[ino]
            ino = len(self.nodes) + 1
            self.nodes[ino] = Node(ino, leaf.encode(), parent.ino, stat.S_IFREG | FILE_MODE, attr, now)
            parent.children[leaf.encode()] = ino
        self.files: dict[int, OpenFile] = {}
        self._next_fh = 1
        self.connection: Connection | None = None

    # -- attributes of nodes -------------------------------------------------------------------
    def _node(self, nodeid: int) -> Node:
        n = self.nodes.get(nodeid)
        if n is None:
            raise OSError(errno.ENOENT, "no such node")
        return n

    def _attr(self, n: Node) -> dict[str, Any]:
        if n.is_dir:
            nlink = 2 + sum(self.nodes[i].is_dir for i in n.children.values())
            size = 0
        else:
            nlink, size = 1, ATTR_SIZE
        return {"attr.ino": n.ino, "attr.size": size, "attr.mode": n.mode, "attr.nlink": nlink,
                "attr.uid": n.uid, "attr.gid": n.gid, "attr.atime": n.atime, "attr.mtime": n.mtime,
                "attr.ctime": n.ctime, "attr.blksize": 4096}

    def lookup(self, req: Request, body: memoryview) -> Any:
        d = self._node(req.nodeid)
        ino = d.children.get(_name(body))
        if ino is None:
            raise OSError(errno.ENOENT, "no such file")
        return ENTRY_OUT.encode(nodeid=ino, entry_valid=_TTL, attr_valid=_TTL, **self._attr(self.nodes[ino]))

    def getattr(self, req: Request, body: memoryview) -> Any:
        return ATTR_OUT.encode(attr_valid=_TTL, **self._attr(self._node(req.nodeid)))

    def setattr(self, req: Request, body: memoryview) -> Any:
        """kernfs_iop_setattr: mode, owner and times stick; a size change is accepted and ignored.

        The kernel has already checked ownership / CAP_FOWNER (default_permissions).
        """
        n = self._node(req.nodeid)
        apply_setattr(n, body)
        return ATTR_OUT.encode(attr_valid=_TTL, **self._attr(n))

    def statfs(self, req: Request, body: memoryview) -> Any:
        return STATFS_OUT.encode(**{"st.bsize": 4096, "st.frsize": 4096, "st.namelen": 255})

    # -- attribute files -----------------------------------------------------------------------
    def open(self, req: Request, body: memoryview) -> Any:
        """kernfs_fop_open's KERNFS_ROOT_EXTRA_OPEN_PERM_CHECK: even root gets EACCES for a write."""
        n = self._node(req.nodeid)
        if n.attr is None:
            raise OSError(errno.EISDIR, "is a directory")
        flags = OPEN_IN.unpack_from(body, 0)[0]
        if flags & os.O_ACCMODE != os.O_RDONLY or not n.mode & 0o444:
            raise _eacces()
        fh = self._next_fh
        self._next_fh += 1
        self.files[fh] = OpenFile(n.attr)
        return OPEN_OUT.pack(fh, uapi.FOPEN_DIRECT_IO | uapi.FOPEN_NOFLUSH, 0)

    def read(self, req: Request, body: memoryview) -> Any:
        """seq_file: regenerate unless continuing where the previous read ended."""
        fh, off, size = READ_IN.unpack_from(body, 0)[:3]
        of = self.files.get(fh)
        if of is None:
            raise OSError(errno.EBADF, "bad file handle")
        if of.buf is None or off != of.pos:
            of.seen = of.attr.event
            of.buf = of.attr.content()
        data = of.buf[off:off + size]
        of.pos = off + len(data)
        return data

    def poll(self, req: Request, body: memoryview) -> Any:
        """kernfs_generic_poll; remember the poll handle so a change can wake this file."""
        fh, kh, flags, _events = POLL_IN.unpack_from(body, 0)
        of = self.files.get(fh)
        if of is None:
            return POLL_OUT.pack(DEFAULT_POLLMASK, 0)  # a directory: no ->poll
        if flags & uapi.FUSE_POLL_SCHEDULE_NOTIFY:
            of.kh = kh
        revents = DEFAULT_POLLMASK
        if of.seen != of.attr.event:
            revents |= CHANGED_MASK
        return POLL_OUT.pack(revents, 0)

    def release(self, req: Request, body: memoryview) -> Any:
        self.files.pop(RELEASE_IN.unpack_from(body, 0)[0], None)
        return None

    def flush(self, req: Request, body: memoryview) -> Any:
        return None

    def fsync(self, req: Request, body: memoryview) -> Any:
        return None  # noop_fsync

    def wake(self, changed: set[Attribute]) -> None:
        """FUSE_NOTIFY_POLL to every open file of a changed attribute that has polled."""
        connection = self.connection
        if connection is None:
            return
        for of in self.files.values():
            if of.kh is not None and of.attr in changed:
                connection.notify_poll(of.kh)

    # -- directories ---------------------------------------------------------------------------
    def opendir(self, req: Request, body: memoryview) -> Any:
        if not self._node(req.nodeid).is_dir:
            raise OSError(errno.ENOTDIR, "not a directory")
        return OPEN_OUT.pack(0, 0, 0)

    def readdir(self, req: Request, body: memoryview) -> Any:
        _fh, offset, size = READ_IN.unpack_from(body, 0)[:3]
        d = self._node(req.nodeid)
        entries = [(d.ino, b".", d.mode), (d.parent, b"..", stat.S_IFDIR)]
        entries += [(ino, name, self.nodes[ino].mode) for name, ino in d.children.items()]
        return pack_dirents(entries, offset, size)

    def releasedir(self, req: Request, body: memoryview) -> Any:
        return None

    def fsyncdir(self, req: Request, body: memoryview) -> Any:
        return None

    # -- what sysfs refuses --------------------------------------------------------------------
    def create(self, req: Request, body: memoryview) -> Any:
        raise _eacces()  # vfs: no ->create -> EACCES

    def mknod(self, req: Request, body: memoryview) -> Any:
        mode = _MKNOD_IN.unpack_from(body, 0)[0]
        raise _eacces() if stat.S_ISREG(mode) else _eperm()  # vfs_create vs vfs_mknod

    def mkdir(self, req: Request, body: memoryview) -> Any:
        raise _eperm()  # kernfs_iop_mkdir without syscall_ops

    def rmdir(self, req: Request, body: memoryview) -> Any:
        raise _eperm()

    def unlink(self, req: Request, body: memoryview) -> Any:
        raise _eperm()  # vfs_unlink: no ->unlink

    def rename(self, req: Request, body: memoryview) -> Any:
        raise _eperm()

    def rename2(self, req: Request, body: memoryview) -> Any:
        if _RENAME2_IN.unpack_from(body, 0)[1]:
            raise OSError(errno.EINVAL, "rename flags")  # kernfs_iop_rename
        raise _eperm()

    def link(self, req: Request, body: memoryview) -> Any:
        raise _eperm()

    def symlink(self, req: Request, body: memoryview) -> Any:
        raise _eperm()

    def getxattr(self, req: Request, body: memoryview) -> Any:
        raise OSError(errno.ENODATA, "no such attribute")

    def listxattr(self, req: Request, body: memoryview) -> Any:
        size = _GETXATTR_IN.unpack_from(body, 0)[0]
        return _GETXATTR_OUT.pack(0, 0) if size == 0 else b""

    def setxattr(self, req: Request, body: memoryview) -> Any:
        raise OSError(errno.EOPNOTSUPP, "no xattrs")

    def removexattr(self, req: Request, body: memoryview) -> Any:
        raise OSError(errno.EOPNOTSUPP, "no xattrs")


class FuseSysfs(SysfsTree):
    """The tree as a FUSE mount at ``root`` on the running loop."""

    kind = "fuse"

    def __init__(self, root: str, core: Any, attrs: dict[str, Attribute]):
        super().__init__(root, core, attrs)
        self.ops = SysfsOps(self.attrs)
        self.fd = -1
        self.connection: Connection | None = None
        self._mounted = False

    def publish(self, changed: set[Attribute]) -> None:
        self.ops.wake(changed)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            if sysmount.clear_stale_fuse(self.root, ("fuse.cusedev-sysfs",)):
                log.warning("%s: cleared a stale sysfs mount left by an emulator that died", self.root)
            if sysmount.is_mountpoint(self.root):
                raise SysfsError(f"{self.root}: something is already mounted there (a dead emulator? umount -l it)")
            self.fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
            self._makedirs(self.root)
            opts = f"fd={self.fd},rootmode=40000,user_id=0,group_id=0,allow_other,default_permissions"
            await loop.run_in_executor(None, sysmount.mount, "cusedev-sysfs", self.root, "fuse.cusedev-sysfs",
                                       sysmount.MS_NOSUID | sysmount.MS_NODEV | _MS_NOEXEC, opts)
            self._mounted = True
            self.connection = Connection(self.fd, self.ops, name=f"sysfs:{self.root}")
            self.ops.connection = self.connection
            self.connection.start(loop)
            await super().start()
            # FUSE_INIT and a lookup answered by this loop: the tree is usable once start() returns.
            await loop.run_in_executor(None, os.stat, self.path(next(iter(self.attrs))))
        except OSError as e:
            await self.stop()
            raise SysfsError(f"sysfs tree at {self.root}: {e.strerror or e}") from e
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Lazy unmount, then close the connection (pollers still waiting wake with POLLERR)."""
        await super().stop()
        if self._mounted:
            self._mounted = False
            try:
                await asyncio.get_running_loop().run_in_executor(None, sysmount.umount_lazy, self.root)
            except OSError as e:
                log.warning("umount %s: %s", self.root, e.strerror)
        if self.connection is not None:
            self.connection.stop()
            self.ops.connection = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self._remove_dirs()


# -- the plain-file fallback ---------------------------------------------------------------------
class FileSysfs(SysfsTree):
    """The tree as plain files, atomically replaced after each change (no poll, no live reads)."""

    kind = "files"

    def _write(self, rel: str, attr: Attribute) -> None:
        path = self.path(rel)
        tmp = os.path.join(os.path.dirname(path), f".{attr.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)
        try:
            os.write(fd, attr.content())
            os.fchmod(fd, FILE_MODE)
        finally:
            os.close(fd)
        os.replace(tmp, path)

    def _write_all(self, attrs: Iterable[Attribute]) -> None:
        wanted = set(attrs)
        for rel, a in self.attrs.items():
            if a in wanted:
                try:
                    self._write(rel, a)
                except OSError as e:
                    log.warning("sysfs file %s: %s", rel, e.strerror)

    def publish(self, changed: set[Attribute]) -> None:
        self._write_all(changed)

    async def start(self) -> None:
        try:
            for rel, a in self.attrs.items():
                self._makedirs(os.path.dirname(self.path(rel)))
                self._write(rel, a)
        except OSError as e:
            await self.stop()
            raise SysfsError(f"sysfs files at {self.root}: {e.strerror or e}") from e
        # Directories made read-only only after the files are in (root writes through anyway).
        for d in self._made_dirs:
            os.chmod(d, DIR_MODE)
        await super().start()

    async def stop(self) -> None:
        await super().stop()
        for rel, a in self.attrs.items():
            for p in (self.path(rel), os.path.join(os.path.dirname(self.path(rel)), f".{a.name}.tmp")):
                try:
                    os.unlink(p)
                except OSError:
                    pass
        self._remove_dirs()


async def start_sysfs(root: str, core: Any, attrs: dict[str, Attribute], mode: str = "auto") -> SysfsTree:
    """Serve the tree at ``root``: ``fuse``, ``files``, or ``auto`` (FUSE, else files with a warning).

    ``core`` is the model whose ``listeners`` say when to refresh ``attrs``."""
    if mode not in MODES:
        raise SysfsError(f"unknown sysfs mode {mode!r}")
    if mode in ("auto", "fuse"):
        tree: SysfsTree = FuseSysfs(root, core, attrs)
        try:
            await tree.start()
            return tree
        except SysfsError as e:
            if mode == "fuse":
                raise
            log.warning("%s; falling back to plain files (no poll)", e)
    tree = FileSysfs(root, core, attrs)
    await tree.start()
    return tree
