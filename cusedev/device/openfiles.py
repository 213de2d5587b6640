"""The device behind every transport: open descriptions, exclusive open, revocation, fd traffic.

``EmulatedDevice`` is the ``DeviceHandler`` the transports call.  It keeps
one ``OpenFile`` per open file description, enforces the single opener (EBUSY),
drops outgoing files when the opener goes away, and hands each ioctl to the
ABI profile's table with the open file as context.  Moving fds in and out of
the caller (pidfd_getfd in, an ``FdInstaller`` out) lives here too, so ABI
handlers stay a few lines each.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import resource
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from .. import profiles
from ..libc import fail
from ..tracing.inject import Injector
from . import pidfd
from .dispatch import dispatch
from .memfd import ShmemFile, check_usable
from .seam import Caller, CallerMemory, FdInstaller, einval

log = logging.getLogger(__name__)

_libc = ctypes.CDLL(None, use_errno=True)
_ioctl = _libc.ioctl
_ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong)
_ioctl.restype = ctypes.c_int


class SeccompInstaller:
    """Installs into a process stopped in a seccomp notification (SECCOMP_IOCTL_NOTIF_ADDFD)."""

    def __init__(self, notification: Any):
        self.n = notification

    def reserve(self, caller: Caller) -> None:
        """The kernel takes an fd number before any check: EMFILE when the table is full."""
        try:
            st = pidfd.status_values(caller.tid, (b"Tgid:", b"FDSize:"))
            tgid = st[b"Tgid:"]
            soft, _hard = resource.prlimit(tgid, resource.RLIMIT_NOFILE)
            # Every fd number from the table's size up is free: if that size is below the limit a
            # number is left, and the O(open fds) listing below (quadratic over a restore-all of
            # thousands of fds) is not needed.
            if soft == resource.RLIM_INFINITY or st[b"FDSize:"] < soft:
                return
            used = len(os.listdir(f"/proc/{tgid}/fd"))
        except OSError:
            return
        if soft != resource.RLIM_INFINITY and used >= soft:
            raise fail(errno.EMFILE)

    def install(self, caller: Caller, fd: int) -> int:
        return int(self.n.addfd(fd, os.O_CLOEXEC))


@dataclass(slots=True)
class Proxy:
    """An ioctl the emulator re-issues for a process under `cusedev run` (see ``Runtime._on_ioctl``)."""

    caller: Caller
    memory: CallerMemory
    installer: FdInstaller


class OpenFile:
    """One open file description of the device; the ``ctx`` of every ABI handler."""

    __slots__ = ("fh", "device", "core", "revoked")

    def __init__(self, fh: int, device: EmulatedDevice):
        self.fh = fh
        self.device = device
        self.core = device.core
        self.revoked = False

    def preserve(self, caller: Caller, fd: int, token: int) -> None:
        """FD_PRESERVE: EBADF (fd), then the core's EBUSY / ENOENT / EEXIST."""
        try:
            ours = pidfd.getfd(caller.tid, fd)
        except OSError as e:
            raise fail(errno.EBADF) from e
        check_usable(ours)
        probed = False

        def probe() -> ShmemFile:
            nonlocal probed
            probed = True
            return ShmemFile.probe(ours)

        try:
            self.core.preserve(token, probe)
        except OSError:
            if not probed:
                os.close(ours)
            raise

    def restore(self, caller: Caller, token: int) -> int:
        """FD_RESTORE: reserve an fd, the core's checks, then install a new description."""
        installer = self.device.installer_for(caller)
        if installer is not None:
            installer.reserve(caller)
        pf = self.core.restore(token)
        if installer is None:
            self.device.warn_no_installer()
            raise fail(errno.EOPNOTSUPP)
        assert isinstance(pf.ops, ShmemFile)
        fd = pf.ops.reopen()
        try:
            newfd = installer.install(caller, fd)
        finally:
            os.close(fd)
        self.core.mark_restored(pf)
        return newfd


class EmulatedDevice:
    """``DeviceHandler`` for /dev/liveupdate: one core, one ABI profile, any number of transports."""

    def __init__(self, core: Any = None, profile: str = profiles.DEFAULT):
        self.profile = profiles.get(profile)
        self.core: Any = core if core is not None else self.profile.model()
        self.ops = self.profile.kinds["device"].ops
        self.files: dict[int, OpenFile] = {}
        self.opener: OpenFile | None = None
        self.installer: FdInstaller | None = None
        self.proxies: dict[int, Proxy] = {}  # worker thread id -> the `cusedev run` call it carries
        self.on_open: list[Callable[[Caller], None]] = []
        #: wraps every ioctl when set (tracing, fault injection); None keeps the hot path bare
        self.interceptor: Callable[..., int | Awaitable[int]] | None = None
        #: ``cusedev.trace.Tracer`` while recording (open/release/read/write/kexec events); else None
        self.tracer: Any = None
        #: fault-injection rules (``device.injector.add("FD_PRESERVE:error=ENOSPC")``)
        self.injector = Injector(self)
        #: each FUSE connection's ``serve_queued`` (kept by ``DeviceOps.started``): see ``pump``
        self.pumps: list[Callable[[], None]] = []
        self.opener_tid = 0
        self._next_fh = 1
        self._warned = False

    # -- DeviceHandler ---------------------------------------------------------------------------
    def open(self, caller: Caller, flags: int) -> int:
        if self.opener is not None:
            if self.tracer is not None:
                self.tracer.open(caller, flags, 0, errno.EBUSY)
            raise fail(errno.EBUSY)
        fh = self._next_fh
        self._next_fh += 1
        self.opener = self.files[fh] = OpenFile(fh, self)
        self.opener_tid = caller.tid
        for cb in self.on_open:
            cb(caller)
        if self.tracer is not None:
            self.tracer.open(caller, flags, fh, 0)
        return fh

    def release(self, fh: int) -> None:
        s = self.files.pop(fh, None)
        if self.tracer is not None:
            self.tracer.release(fh)
        if s is not None and s is self.opener:
            self.opener = None
            self.core.drop_outgoing()

    def ioctl(self, fh: int, caller: Caller, cmd: int, arg: int, mem: CallerMemory) -> int | Awaitable[int]:
        if self.proxies:
            p = self.proxies.get(caller.tid)
            if p is not None:  # our own worker thread, acting for a `cusedev run` process
                caller, mem = p.caller, p.memory
        if self.interceptor is not None:
            return self.interceptor(self, fh, caller, cmd, arg, mem)
        # run_ioctl, inlined: this is every plain ioctl's path
        s = self.files.get(fh)
        if s is None or s.revoked:
            raise fail(errno.ENODEV)
        return dispatch(self.ops, s, caller, cmd, arg, mem)

    def pump(self) -> None:
        """Answer the requests already queued on every transport, without blocking: called by
        work that runs between requests and may take a while (the trace flush), so that a client
        on another CPU does not wait behind it.  On the loop's thread only."""
        for serve in tuple(self.pumps):  # a connection that ends while serving leaves the list
            serve()

    def run_ioctl(self, fh: int, caller: Caller, cmd: int, arg: int, mem: CallerMemory) -> int:
        """The ioctl itself, for an interceptor (tracing, fault injection)."""
        s = self.files.get(fh)
        if s is None or s.revoked:
            raise fail(errno.ENODEV)
        return dispatch(self.ops, s, caller, cmd, arg, mem)

    def read(self, fh: int, caller: Caller, size: int) -> bytes:
        if self.tracer is not None:
            self.tracer.rw("read", fh, caller, size, errno.EINVAL)
        raise einval()

    def write(self, fh: int, caller: Caller, data: bytes) -> int:
        if self.tracer is not None:
            self.tracer.rw("write", fh, caller, len(data), errno.EINVAL)
        raise einval()

    # -- the emulated reboot ---------------------------------------------------------------------
    def kexec(self) -> bool:
        """reboot(LINUX_REBOOT_CMD_KEXEC): the core's freeze and boot, then every handle is revoked.

        Revoked handles stay open in their processes (which a real kexec would
        have killed) but every later call fails with ENODEV; the exclusive-open
        slot is free at once.
        """
        if self.tracer is not None:
            return self.tracer.kexec(self._kexec)
        return self._kexec()

    def _kexec(self) -> bool:
        live = self.core.kexec()
        for s in self.files.values():
            s.revoked = True
        self.opener = None
        return live

    def installer_for(self, caller: Caller) -> FdInstaller | None:
        for p in self.proxies.values():
            if p.caller.tid == caller.tid:
                return p.installer
        return self.installer

    def proxied_ioctl(self, fd: int, cmd: int, arg: int, proxy: Proxy) -> int:
        """Run in a worker thread: ioctl on our copy of the caller's fd; returns 0 or the errno.

        The request comes back to the event loop through the transport like any
        other; ``ioctl`` recognises this thread and substitutes the real caller.
        """
        tid = threading.get_native_id()
        self.proxies[tid] = proxy
        try:
            if _ioctl(fd, cmd & 0xFFFFFFFF, arg) < 0:
                return ctypes.get_errno()
            return 0
        finally:
            del self.proxies[tid]

    def warn_no_installer(self) -> None:
        if not self._warned:
            self._warned = True
            log.warning(
                "FD_RESTORE cannot install an fd in a process that is not under `cusedev run`; "
                "returning EOPNOTSUPP (run the client with `cusedev run -- CMD`)"
            )
