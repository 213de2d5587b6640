"""The device behind every transport: open files of each kind, exclusive open, revocation, fd traffic.

``EmulatedDevice`` is the ``DeviceHandler`` the transports call.  Every open
file of the emulator's node is an ``OpenFile`` with a kind of the running
profile (``"device"`` for a client's open(); others for the files the
profile's fd-returning commands make of the node) and that kind's ioctl
table.  The device enforces exclusive open per kind (EBUSY), runs the kind's
release when the last reference goes, runs each ioctl through its interceptor
chain to the table-driven dispatcher, and offers handlers the fd services of
``cusedev.profiles.base.DeviceServices``.
"""

from __future__ import annotations

import asyncio
import errno
import inspect
import logging
import os
import stat
import threading
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from .. import profiles
from ..libc import fail
from . import fdpass, pidfd
from .dispatch import dispatch
from .eager import Started
from .fdpass import TrappedCall
from .intercept import Call, Fault, Interceptor, chain
from .seam import DEVICE_NODE, Caller, CallerMemory, FdInstaller, einval
from .spares import Spare, SparePool

if TYPE_CHECKING:
    from ..tracing.record import Tracer

log = logging.getLogger(__name__)


class OpenFile:
    """One open file description of the emulator's node: the ``file`` of every handler."""

    __slots__ = ("fh", "kind", "table", "bound", "model", "device", "revoked")

    def __init__(self, fh: int, kind: profiles.Kind, bound: Any, device: EmulatedDevice):
        self.fh = fh
        self.kind = kind.name
        self.table = kind
        self.bound = bound
        self.model = device.core
        self.device = device
        self.revoked = False

    @property
    def core(self) -> Any:
        """The model (its older name)."""
        return self.model


class EmulatedDevice:
    """``DeviceHandler`` of the emulated /dev/liveupdate: one model, one ABI profile, any transports."""

    def __init__(self, core: Any = None, profile: str = profiles.DEFAULT):
        self.profile = profiles.get(profile)
        #: the profile's model (state machine and registries)
        self.core: Any = core if core is not None else self.profile.model()
        self.core.fault = self._fault_point  # type: ignore[method-assign]  # the model's hook (Model.fault)
        self.kinds = self.profile.kinds
        self.ops = self.kinds["device"].ops
        self.files: dict[int, OpenFile] = {}
        #: kind name -> the open file holding an exclusive kind
        self.holders: dict[str, OpenFile] = {}
        #: the path of the node, set by the server: the profile's own opens (``open_own``) use it
        self.node_path: str | None = None
        #: the node of the files the profile makes, set by the server (None: they are opens of
        #: ``node_path``).  Any open of it but our own gets ENXIO, as the kernel's anon inode does.
        self.session_node_path: str | None = None
        #: installer for callers that are not trapped calls (None: EOPNOTSUPP outside `cusedev run`)
        self.installer: FdInstaller | None = None
        #: `cusedev run` calls in flight, by cookie (created and dropped on the loop thread)
        self.trapped: dict[int, TrappedCall] = {}
        self.on_open: list[Callable[[Caller], None]] = []
        #: the interceptor chain (outermost first), and its ioctl path: None keeps the hot path bare
        self.chain: list[Interceptor] = []
        self.interceptor: Callable[[Call], int | Awaitable[int]] | None = None
        #: ``cusedev.tracing.record.Tracer`` while recording, else None
        self.tracer: Tracer | None = None
        #: each FUSE connection's ``serve_pending`` (kept by ``DeviceOps.started``): see ``pump``
        self.pumps: list[Callable[[], None]] = []
        self.opener_tid = 0
        self._next_fh = 1
        self._own: tuple[str, Any] | None = None
        #: the worker thread making the announced own-open (its tid: no /proc read to know it is ours)
        self._own_tid = 0
        #: OFD-lock tags of our open files: a trapped call's fd is mapped to its fh from fdinfo
        self.tags = fdpass.FileTags()
        #: spare own-node opens, unbound and invisible until ``open_own`` binds one (None: not yet used)
        self.spares: SparePool | None = None
        #: fh -> OpenFile of every spare not yet taken nor released (dropped ones until their release)
        self._spare_files: dict[int, OpenFile] = {}
        self._spare_kind = ""
        #: ioctls served so far: the spare pool refills only once this count stops moving
        self.calls = 0
        #: our fd -> its open file, from ``open_own`` until ``close_own`` (``disown_own`` finds it here)
        self._handing: dict[int, OpenFile] = {}
        #: a spare of ours was tagged once (later tags of spares skip the fdinfo checks: ``FileTags.tag``)
        self._spares_tagged = False
        #: whether the last close of our node's file waits for its RELEASE (CUSE); None: not known yet
        self._sync_release: bool | None = None
        #: closes of ours in flight (``close_own``)
        self.closing: set[asyncio.Future[None]] = set()
        #: the last spare open answered (read by the pool's thread when its open returns)
        self._spare_opened: tuple[int, Caller, int] = (0, Caller(0, 0, 0), 0)
        self._warned: set[str] = set()
        from ..tracing.inject import Injector

        #: fault-injection rules (``device.injector.add("all:error=EIO:when=3")``), a chain member
        self.injector = Injector(self)

    @property
    def opener(self) -> OpenFile | None:
        """The open file holding the device kind (None: the node is free)."""
        return self.holders.get("device")

    # -- the interceptor chain -------------------------------------------------------------------
    def add_interceptor(self, member: Interceptor) -> None:
        if member not in self.chain:
            self.chain.append(member)
            self.chain.sort(key=lambda m: m.order)
        self.refresh()

    def remove_interceptor(self, member: Interceptor) -> None:
        if member in self.chain:
            self.chain.remove(member)
        self.refresh()

    def refresh(self) -> None:
        """Rebuild the ioctl path after a member joined, left, or changed what it wants."""
        self.interceptor = chain(self.chain, self._terminal)

    def _terminal(self, call: Call) -> int | Awaitable[int]:
        """The end of the chain: the open file's table."""
        if call.fail:
            raise fail(call.fail)
        f = self.files.get(call.fh)
        if f is None or f.revoked:
            raise fail(errno.ENODEV)
        return dispatch(f.table, f, call.caller, call.cmd, call.arg, call.mem)

    def _fault_point(self, point: str) -> None:
        """The model's fault hook: the first member that fails ``point`` wins; all hear of it."""
        for m in self.chain:
            fault = m.fault(point)
            if fault is not None:
                for other in self.chain:
                    other.faulted(fault)
                raise OSError(fault.errno, f"{errno.errorcode.get(fault.errno, fault.errno)} (injected)")

    # -- DeviceHandler ---------------------------------------------------------------------------
    def open(self, caller: Caller, flags: int, node: str = DEVICE_NODE) -> int:
        kind_name, bound = "device", None
        if node == DEVICE_NODE and self.session_node_path is not None:
            pass  # a client's open of the device node: always the device kind (EBUSY when held)
        elif self._own is not None and self._is_own(caller):
            (kind_name, bound), self._own = self._own, None
            if not kind_name:
                return self._open_spare(caller, flags)
        elif node != DEVICE_NODE:  # a client's re-open of a session fd through /proc
            for m in self.chain:
                m.opened(caller, flags, 0, errno.ENXIO)
            raise fail(errno.ENXIO)
        kind = self.kinds[kind_name]
        if kind.exclusive and kind_name in self.holders:
            for m in self.chain:
                m.opened(caller, flags, 0, errno.EBUSY)
            raise fail(errno.EBUSY)
        fh = self._next_fh
        self._next_fh += 1
        f = self.files[fh] = OpenFile(fh, kind, bound, self)
        if kind.exclusive:
            self.holders[kind_name] = f
        if kind_name == "device":
            self.opener_tid = caller.tid
            for cb in self.on_open:
                cb(caller)
        for m in self.chain:
            m.opened(caller, flags, fh, 0)
        return fh

    def release(self, fh: int) -> None:
        if self._spare_files and self._spare_files.pop(fh, None) is not None:
            return  # a spare never taken: nobody saw it open
        f = self.files.pop(fh, None)
        for m in self.chain:
            m.released(fh)
        if f is None:
            return
        if self.holders.get(f.kind) is f:
            del self.holders[f.kind]
        if not f.revoked and f.table.release is not None:
            f.table.release(f)

    def ioctl(self, fh: int, caller: Caller, cmd: int, arg: int, mem: CallerMemory) -> int | Awaitable[int]:
        self.calls += 1
        if self.trapped:
            t = self.trapped.get(arg)
            if t is not None and self._is_own(caller):  # our worker, re-issuing a `cusedev run` call
                return self._trapped_ioctl(t, fh, cmd)
        run = self.interceptor
        if run is not None:
            return run(Call(fh, caller, cmd, arg, mem))
        f = self.files.get(fh)  # the bare path: every plain ioctl
        if f is None or f.revoked:
            raise fail(errno.ENODEV)
        return dispatch(f.table, f, caller, cmd, arg, mem)

    def _trapped_ioctl(self, t: TrappedCall, fh: int, cmd: int, eager: bool = False) -> int | Awaitable[int]:
        t.fh = fh
        if t.cancelled:
            raise fail(errno.EINTR)
        run = self.interceptor
        if run is not None:
            res = run(Call(fh, t.caller, cmd, t.arg, t.memory))
        else:
            f = self.files.get(fh)
            if f is None or f.revoked:
                raise fail(errno.ENODEV)
            res = dispatch(f.table, f, t.caller, cmd, t.arg, t.memory)
        if type(res) is not int and inspect.isawaitable(res):
            if eager and inspect.iscoroutine(res):  # run it now up to its first real wait
                try:
                    step = res.send(None)
                except StopIteration as done:
                    return int(done.value or 0)
                res = Started(res, step).run()
            t.task = asyncio.ensure_future(res)
            return t.task
        return res

    def read(self, fh: int, caller: Caller, size: int) -> bytes:
        for m in self.chain:
            m.rw("read", fh, caller, size, errno.EINVAL)
        raise einval()

    def write(self, fh: int, caller: Caller, data: bytes) -> int:
        for m in self.chain:
            m.rw("write", fh, caller, len(data), errno.EINVAL)
        raise einval()

    def pump(self) -> None:
        """Answer the requests already queued on every transport, without blocking: called by
        work that runs between requests and may take a while (the trace flush), so that a client
        on another CPU does not wait behind it.  On the loop's thread only."""
        for serve in tuple(self.pumps):  # a connection that ends while serving leaves the list
            serve()

    # -- the emulated reboot ---------------------------------------------------------------------
    def kexec(self) -> bool:
        """reboot(LINUX_REBOOT_CMD_KEXEC): the model's freeze and boot, then every open file is revoked.

        Revoked files stay open in their processes (which a real kexec would
        have killed) but every later call fails with ENODEV and their release
        has no effect; the exclusive-open slots are free at once.
        """
        run = self._kexec
        for m in reversed(self.chain):
            run = _around(m, run)
        return run()

    def _kexec(self) -> bool:
        live = self.core.kexec()
        for f in self.files.values():
            f.revoked = True
        self.holders.clear()
        self._drop_spares()
        return live

    # -- services for handlers (cusedev.profiles.base.DeviceServices) ----------------------------
    def take_fd(self, caller: Caller, fd: int) -> int:
        return fdpass.take_fd(caller, fd)

    def installer_for(self, caller: Caller) -> FdInstaller | None:
        """The installer of the call being run (a trapped call's, bound to its notification)."""
        for t in self.trapped.values():
            if t.caller is caller:
                return t.installer
        return self.installer

    def warn_no_installer(self, what: str) -> None:
        if what not in self._warned:
            self._warned.add(what)
            log.warning("%s cannot install an fd in a process that is not under `cusedev run`; "
                        "returning EOPNOTSUPP (run the client with `cusedev run -- CMD`)", what)

    async def open_own(self, kind: str, bound: Any, tagged: bool = True) -> int:
        """An fd of ours on our own node whose open file has ``kind`` and ``bound`` (see the Protocol).

        A spare (``SparePool``: opened earlier by the pool's thread, unbound) is
        bound now, so the caller does not wait for an open round trip; with none
        ready this waits for the refill.  With ``tagged`` it gets its fast-path tag
        here (``fdpass.FileTags``).  The file is seen by the interceptors (traces)
        as opened now.
        """
        if self.node_path is None:
            raise fail(errno.EOPNOTSUPP)
        if kind not in self.kinds:
            raise ValueError(f"{self.profile.name} has no kind {kind!r}")
        self._spare_kind = kind
        pool = self.spares
        if pool is None:
            pool = self.spares = SparePool(self._open_spare_in_thread, self.spare_target,
                                           calls=lambda: self.calls)
        s = pool.take() or await pool.get()
        f = self._spare_files.pop(s.fh)
        k = f.table = self.kinds[kind]
        f.kind, f.bound = kind, bound
        if k.exclusive and kind in self.holders:  # as open() refuses it
            self._spare_files[s.fh] = f
            pool.give_back(s)
            for m in self.chain:
                m.opened(s.caller, s.flags, 0, errno.EBUSY)
            raise fail(errno.EBUSY)
        self.files[s.fh] = f
        self._handing[s.fd] = f
        if k.exclusive:
            self.holders[kind] = f
        if tagged:  # a fresh open of a node tagged before needs no fdinfo read
            self._spares_tagged = self.tags.tag(s.fd, s.fh, self._spares_tagged) or self._spares_tagged
        for m in self.chain:
            m.opened(s.caller, s.flags, s.fh, 0)
        return s.fd

    #: spare own-node opens kept ready (each holds an fd and an open file of our node)
    spare_target = 32

    def close_own(self, fd: int) -> None:
        """Close our copy ``fd`` of a file handed out, before the trapped call is answered.

        On the FUSE file a RELEASE never blocks the close (the kernel sends it in the
        background): closed here and now.  On CUSE the last reference's close waits
        for the RELEASE, which only the loop answers: closed by the pool's closing
        thread, and the runtime waits for it (``closes_done``) before it answers, so
        that a caller closing its fd right after sees the release at once, as with
        the kernel."""
        self._handing.pop(fd, None)
        if self._sync_release is False:
            os.close(fd)
            return
        fut = self.spares.close(fd, wait=True) if self.spares is not None else None
        if fut is None:
            _close_later(fd)
            return
        self.closing.add(fut)
        fut.add_done_callback(self.closing.discard)

    def disown_own(self, fd: int) -> None:
        """Close our copy ``fd`` of a file that was never handed out (its install failed with EMFILE,
        which the kernel finds before it opens anything): its release has no effect."""
        f = self._handing.get(fd)
        if f is not None:
            f.revoked = True
        self.close_own(fd)

    async def closes_done(self) -> None:
        """Until every close of ours in flight (``close_own``) is done."""
        while self.closing:
            await asyncio.wait(list(self.closing))

    def _open_spare(self, caller: Caller, flags: int) -> int:
        """open() of a spare (on the loop): an unbound file outside ``files``, the chain never hears of it."""
        fh = self._next_fh
        self._next_fh += 1
        self._spare_files[fh] = OpenFile(fh, self.kinds[self._spare_kind], None, self)
        self._spare_opened = (fh, caller, flags)
        return fh

    def _open_spare_in_thread(self) -> Spare:
        """In the pool's thread: open our node, announced as a spare (one open at a time)."""
        path = self.session_node_path or self.node_path
        if path is None:
            raise fail(errno.EOPNOTSUPP)
        self._own_tid = threading.get_native_id()
        self._own = ("", None)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        finally:
            self._own, self._own_tid = None, 0
        fh, caller, flags = self._spare_opened
        if self._sync_release is None:  # a CUSE node is a char device; the FUSE file is a regular file
            self._sync_release = stat.S_ISCHR(os.fstat(fd).st_mode)
        return Spare(fd, fh, caller, flags)

    def _drop_spares(self) -> None:
        """kexec: every spare is closed (their releases stay unseen) and replaced by the next refill."""
        if self.spares is not None:
            self.spares.drop()

    async def shutdown(self) -> None:
        """The server stops: our own fds go (the spares, ending the pool's threads, and the kept
        fdinfo files) while the node is still served (a spare's close may need our reply)."""
        if self.spares is not None:
            await self.spares.stop()
        self.tags.close()

    def _is_own(self, caller: Caller) -> bool:
        """Whether the request comes from a thread of this process (our own worker)."""
        if caller.tid == self._own_tid:
            return True
        try:
            return pidfd.tgid_of(caller.tid) == os.getpid()
        except OSError:
            return False

    # -- `cusedev run` ---------------------------------------------------------------------------
    async def run_trapped(self, fd: int, cmd: int, t: TrappedCall,
                          ours: Callable[[int], bool] | None = None) -> int | None:
        """Re-issue trapped call ``t`` on ``fd`` (our copy of the caller's fd) from a worker thread;
        returns 0 or the errno.  Called on the loop thread: ``t`` is registered only meanwhile.

        With ``ours`` the same worker first checks that ``fd`` is a file of our node (None if
        not) and closes ``fd`` afterwards, either way (``fdpass.reissue_and_close``)."""
        self.trapped[t.cookie] = t
        try:
            loop = asyncio.get_running_loop()
            if ours is None:
                return await loop.run_in_executor(None, fdpass.reissue, fd, cmd, t.cookie)

            def tag(dup: int) -> None:  # in the worker: the next call on this file takes the fast path
                if t.fh:
                    self.tags.tag(dup, t.fh)

            return await loop.run_in_executor(None, fdpass.reissue_and_close, fd, cmd, t.cookie, ours, tag)
        finally:
            del self.trapped[t.cookie]

    def run_tagged(self, fh: int, cmd: int, t: TrappedCall) -> int | asyncio.Future[Any]:
        """Run trapped call ``t`` on our open file ``fh`` right here on the loop (the fast path: the
        caller's fd carries ``fh``'s tag): 0 or the errno, or the handler's future when it completes
        later (``t.task``; ``t`` stays registered until then).  The same path as a re-issued call,
        without the trip through the kernel."""
        self.calls += 1
        self.trapped[t.cookie] = t
        err = 0
        try:
            self._trapped_ioctl(t, fh, cmd, eager=True)
        except OSError as e:
            err = e.errno or errno.EIO
        except Exception:
            log.exception("trapped call on fh %d failed", fh)
            err = errno.EIO
        task = t.task
        if task is None:
            del self.trapped[t.cookie]
            return err
        task.add_done_callback(lambda _f: self.trapped.pop(t.cookie, None))
        return task


def _around(member: Interceptor, run: Callable[[], bool]) -> Callable[[], bool]:
    return lambda: member.kexec(run)


def _close_later(fd: int) -> None:
    """Close our fd ``fd`` in a worker thread (it may be the last reference of a CUSE file)."""
    try:
        asyncio.get_running_loop().run_in_executor(None, os.close, fd)
    except RuntimeError:  # no loop (a synchronous caller): nothing to deadlock with
        os.close(fd)


__all__ = ["Call", "EmulatedDevice", "Fault", "OpenFile"]
