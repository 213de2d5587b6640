"""The FUSE-file fallback: the device as a regular file of a one-file FUSE mount, bind-mounted at the path.

For hosts without CUSE.  We mount our own /dev/fuse connection on a private
directory (/run/cusedev/<name>/mnt) serving a root directory with the file
``device``, and bind-mount that file over the device path (an empty file we
create if missing).  Clients open the path and get a FUSE regular file.
When the handler makes files of its own (session fds), the root also holds
``session``, which only the emulator opens (any other open of it, a client's
re-open through /proc, gets the handler's ENXIO); it is never bind-mounted.

- GETATTR reports S_IFREG with the node's mode/uid/gid, never S_IFCHR (the
  kernel would then open the *real* device number).  ``default_permissions``
  makes the kernel enforce the mode, like a device node's.
- OPEN replies FOPEN_DIRECT_IO so every read/write reaches us; on the
  session file also FOPEN_NONSEEKABLE, so pread/pwrite/lseek give ESPIPE there
  as on the kernel's anon inode (the device keeps pread's EINVAL).
- IOCTL arrives restricted (flags=0): for the LUO ``_IO`` commands in_size =
  out_size = 0 and ``arg`` is the caller's raw pointer, reached with
  process_vm_readv/writev.  Deviation for commands with _IOC_WRITE bits: the
  kernel copies ``_IOC_SIZE`` bytes in before we see the request, so an
  unreadable ``arg`` gives the caller EFAULT from the kernel even where the
  real device would have failed earlier (e.g. ENOTTY/EINVAL); we ignore the
  pre-copied bytes and still read through process_vm.
- POLL → ENOSYS, so the kernel answers the default mask (the LUO device has
  no poll handler).
- SETATTR behaves like a char device node: chmod/chown/utimes apply to the
  node (the kernel checks ownership first), truncate()/ftruncate() → EINVAL
  (vfs_truncate refuses non-regular files).  O_TRUNC on open is ignored
  (FUSE_ATOMIC_O_TRUNC, so no separate truncate is sent), as for a device.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import stat
import time
from typing import Any

from .. import uapi
from ..control import paths
from ..device.seam import DEVICE_NODE, SESSION_NODE, DeviceHandler
from ..fuse import mount as sysmount
from ..fuse.wire import SETATTR_IN, Connection, Request, apply_setattr, pack_dirents
from . import TransportError
from .devops import DeviceOps

log = logging.getLogger(__name__)

ENTRY_OUT = uapi.codec("struct fuse_entry_out")
ATTR_OUT = uapi.codec("struct fuse_attr_out")

READ_IN = uapi.codec("struct fuse_read_in")
OPEN_OUT = uapi.codec("struct fuse_open_out")
DIRENT = uapi.codec("struct fuse_dirent")

ROOT_ID = uapi.FUSE_ROOT_ID
DEVICE_ID = 2
DEVICE_NAME = "device"
SESSION_ID = 3
SESSION_NAME = "session"
FSTYPE = "fuse.cusedev"
# Attributes only change through our own SETATTR replies, so let the kernel cache them.
_TTL = 86400


class Node:
    """The device file's attributes (what GETATTR reports and default_permissions enforces)."""

    __slots__ = ("mode", "uid", "gid", "atime", "mtime", "ctime")

    def __init__(self, mode: int = 0o600, uid: int = 0, gid: int = 0):
        now = int(time.time())
        self.mode = mode & 0o7777
        self.uid = uid
        self.gid = gid
        self.atime = self.mtime = self.ctime = now


class FuseFileOps(DeviceOps):
    """Root directory (nodeid 1) holding the device file (nodeid 2) and maybe the session file (3)."""

    open_flags = uapi.FOPEN_DIRECT_IO | uapi.FOPEN_NOFLUSH  # no FLUSH round trip: the device has no ->flush
    init_flags = uapi.FUSE_ATOMIC_O_TRUNC

    def __init__(self, handler: DeviceHandler, node: Node, session: Node | None = None):
        super().__init__(handler)
        #: the files by nodeid: (name, node kind, attributes)
        self.files: dict[int, tuple[str, str, Node]] = {DEVICE_ID: (DEVICE_NAME, DEVICE_NODE, node)}
        if session is not None:
            self.files[SESSION_ID] = (SESSION_NAME, SESSION_NODE, session)
        self._root_time = int(time.time())

    def _attr(self, nodeid: int) -> dict[str, Any]:
        if nodeid == ROOT_ID:
            t = self._root_time
            return {"attr.ino": ROOT_ID, "attr.mode": stat.S_IFDIR | 0o755, "attr.nlink": 2,
                    "attr.atime": t, "attr.mtime": t, "attr.ctime": t, "attr.blksize": 4096}
        file = self.files.get(nodeid)
        if file is None:
            raise OSError(errno.ENOENT, "no such node")
        n = file[2]
        return {"attr.ino": nodeid, "attr.mode": stat.S_IFREG | n.mode, "attr.nlink": 1,
                "attr.uid": n.uid, "attr.gid": n.gid, "attr.atime": n.atime, "attr.mtime": n.mtime,
                "attr.ctime": n.ctime, "attr.blksize": 4096}

    def node_of(self, req: Request) -> str:
        file = self.files.get(req.nodeid)
        if file is None:
            raise OSError(errno.EISDIR, "is a directory")
        return file[1]

    def open_flags_for(self, node: str) -> int:
        # the session file, like the kernel's anon inode, has no position: pread/pwrite/lseek ESPIPE
        return self.open_flags | (uapi.FOPEN_NONSEEKABLE if node == SESSION_NODE else 0)

    # -- namespace ------------------------------------------------------
    def lookup(self, req: Request, body: memoryview) -> Any:
        name = bytes(body).split(b"\0", 1)[0].decode(errors="replace")
        nodeid = next((i for i, f in self.files.items() if f[0] == name), None)
        if req.nodeid != ROOT_ID or nodeid is None:
            raise OSError(errno.ENOENT, "no such file")
        return ENTRY_OUT.encode(nodeid=nodeid, entry_valid=_TTL, attr_valid=_TTL, **self._attr(nodeid))

    def getattr(self, req: Request, body: memoryview) -> Any:
        return ATTR_OUT.encode(attr_valid=_TTL, **self._attr(req.nodeid))

    def setattr(self, req: Request, body: memoryview) -> Any:
        file = self.files.get(req.nodeid)
        if file is None:
            raise OSError(errno.EPERM, "read-only root")
        if SETATTR_IN.decode(body)["valid"] & uapi.FATTR_SIZE:
            raise OSError(errno.EINVAL, "cannot truncate a device")
        apply_setattr(file[2], body)
        return ATTR_OUT.encode(attr_valid=_TTL, **self._attr(req.nodeid))

    def opendir(self, req: Request, body: memoryview) -> Any:
        if req.nodeid != ROOT_ID:
            raise OSError(errno.ENOTDIR, "not a directory")
        return OPEN_OUT.struct.pack(0, 0, 0)

    def readdir(self, req: Request, body: memoryview) -> Any:
        _fh, offset, size = READ_IN.struct.unpack_from(body, 0)[:3]
        entries = ((ROOT_ID, b".", stat.S_IFDIR), (ROOT_ID, b"..", stat.S_IFDIR),
                   *((i, f[0].encode(), stat.S_IFREG) for i, f in self.files.items()))
        return pack_dirents(entries, offset, size)

    def releasedir(self, req: Request, body: memoryview) -> Any:
        return None

    def statfs(self, req: Request, body: memoryview) -> Any:
        return bytes(uapi.codec("struct fuse_statfs_out").size)


class FuseFileTransport:
    """Serve ``handler`` as a FUSE regular file bind-mounted at ``device_path``.

    With ``session``, the same mount also serves the session file (root-only,
    like the kernel's anon inode), at ``session_node_path`` under the private
    mount directory."""

    name = "fuse"

    def __init__(self, device_path: str, handler: DeviceHandler, *, mode: int = 0o600, uid: int = 0,
                 gid: int = 0, run_dir: str = paths.RUN_DIR, session: bool = False):
        self.device_path = os.path.abspath(device_path)
        self.handler = handler
        self.node = Node(mode, uid, gid)
        self.ops = FuseFileOps(handler, self.node, Node(0o600, 0, 0) if session else None)
        self.private_dir = paths.runtime_dir(self.device_path, run_dir)
        self.mnt = os.path.join(self.private_dir, "mnt")
        #: the session file (None without ``session``): the handler's own opens of the files it makes
        self.session_node_path = os.path.join(self.mnt, SESSION_NAME) if session else None
        self.fd = -1
        self.connection: Connection | None = None
        self._created_file = False
        self._mounted = False
        self._bound = False
        self._made_dirs: list[str] = []

    # -- checks ----------------------------------------------------------
    def _claim_path(self) -> None:
        """Make sure ``device_path`` is an empty regular file nobody uses; create it if missing."""
        p = self.device_path
        parent = os.path.dirname(p)
        if not os.path.isdir(parent):
            raise TransportError(f"{p}: parent directory does not exist")
        stale = self._clear_stale(p)
        try:
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            pass
        else:
            os.close(fd)
            self._created_file = True
            return
        try:
            st = os.lstat(p)
        except OSError as e:
            if e.errno == errno.ENOTCONN:
                raise TransportError(f"{p}: in use by a dead FUSE server (umount -l {p})") from e
            raise TransportError(f"{p}: {e.strerror}") from e
        if sysmount.is_mountpoint(p):
            raise TransportError(f"{p}: already in use (something is mounted there, another emulator?)")
        if stat.S_ISCHR(st.st_mode):
            raise TransportError(f"{p}: a character device already exists there")
        if not stat.S_ISREG(st.st_mode) or st.st_size != 0:
            raise TransportError(f"{p}: exists and is not an empty regular file")
        # the placeholder under a dead emulator's mount was almost surely its own: remove it on stop
        self._created_file = stale

    @staticmethod
    def _clear_stale(path: str) -> bool:
        """Unmount what a killed emulator left at ``path`` (dead connection only), with a log line."""
        try:
            cleared = sysmount.clear_stale_fuse(path, (FSTYPE,))
        except OSError as e:
            raise TransportError(f"{path}: cannot clear a stale mount: {e.strerror}") from e
        if cleared:
            log.warning("%s: cleared a stale mount left by an emulator that died", path)
        return cleared

    def _make_private_dir(self) -> None:
        self._clear_stale(self.mnt)
        if sysmount.is_mountpoint(self.mnt):
            raise TransportError(f"{self.device_path}: already served (mount at {self.mnt})")
        paths.make_private_dir(self.device_path, os.path.dirname(self.private_dir))
        os.makedirs(self.mnt, mode=0o700, exist_ok=True)
        # Ours by name even if a crashed run left them: remove them on stop.
        self._made_dirs = [self.private_dir, self.mnt]

    # -- lifecycle -------------------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            self.fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise TransportError(f"/dev/fuse: {e.strerror}") from e
        try:
            self._claim_path()
            self._make_private_dir()
            opts = (f"fd={self.fd},rootmode=40000,user_id=0,group_id=0,allow_other,"
                    "default_permissions")
            # The fd reads EPERM until mounted, so serve only afterwards; mount(2) itself
            # does not wait for FUSE_INIT (it is queued), but run it in a thread anyway.
            await loop.run_in_executor(None, sysmount.mount, "cusedev", self.mnt, FSTYPE,
                                       sysmount.MS_NOSUID | sysmount.MS_NODEV, opts)
            self._mounted = True
            self.connection = Connection(self.fd, self.ops, name=f"fuse:{self.device_path}")
            self.connection.start(loop)
            # In a thread: the bind's path lookup waits on requests this loop must answer.
            await loop.run_in_executor(None, sysmount.mount, os.path.join(self.mnt, DEVICE_NAME),
                                       self.device_path, None, sysmount.MS_BIND, None)
            self._bound = True
        except OSError as e:
            await self.stop()
            raise TransportError(f"{self.device_path}: {e.strerror or e}") from e
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Lazy-unmount bind and FUSE mounts, close the connection, remove what we created."""
        loop = asyncio.get_running_loop()
        for flag, target in (("_bound", self.device_path), ("_mounted", self.mnt)):
            if getattr(self, flag):
                setattr(self, flag, False)
                try:
                    await loop.run_in_executor(None, sysmount.umount_lazy, target)
                except OSError as e:
                    log.warning("umount %s: %s", target, e.strerror)
        if self.connection is not None:
            self.connection.stop()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self._created_file:
            self._created_file = False
            try:
                os.unlink(self.device_path)
            except OSError as e:
                log.warning("remove %s: %s", self.device_path, e.strerror)
        while self._made_dirs:
            d = self._made_dirs.pop()
            try:
                os.rmdir(d)
            except OSError:
                pass
