"""What an emulator runs beside its device: the control commands, kexec, status and `cusedev run` clients.

``Runtime`` attaches to a started ``Server`` and owns everything that is not
the ioctl path: the control socket, supervision of seccomp listeners handed
over by `cusedev run` (FD_RESTORE installs, reboot(KEXEC)), and the optional
state directory.  The transports and the ABI profile know nothing of it.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import stat
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .. import uapi
from ..device import pidfd
from ..device.fdpass import SeccompInstaller, TrappedCall
from ..device.memory import ProcessVmMemory
from ..device.openfiles import EmulatedDevice
from ..device.seam import Caller
from ..run.seccomp import Notification, Supervisor
from .channel import Command, Connection, ControlServer

if TYPE_CHECKING:
    from .server import Server

log = logging.getLogger(__name__)
#: how often a trapped call in progress checks that its task is still waiting (seconds)
TRAPPED_POLL = 0.2
REBOOT_MAGIC2 = {uapi.LINUX_REBOOT_MAGIC2, uapi.LINUX_REBOOT_MAGIC2A, uapi.LINUX_REBOOT_MAGIC2B,
                 uapi.LINUX_REBOOT_MAGIC2C}


class Runtime:
    """Control plane of one emulator (a leaf beside the device, never on the ioctl path)."""

    def __init__(self, server: Server, device: EmulatedDevice, *, gid: int = 0):
        self.server = server
        self.device = device
        self.runs: set[Connection] = set()
        self.control = ControlServer(
            server.device_path,
            {"status": self._status, "kexec": self._kexec, "attach": self._attach,
             "trace": self._trace, "inject": self._inject, **self._profile_commands()},
            gid=gid,
        )
        self.supervisors: list[Supervisor] = []
        self._waiters: set[asyncio.Future[None]] = set()
        #: the stat of each node (device, session), taken once off the loop by the first trapped call
        self._node_stats: list[os.stat_result] | None = None

    async def start(self) -> None:
        await self.control.start()
        self.server.add_cleanup(self.stop)

    def _forget(self, sup: Supervisor) -> None:
        if sup in self.supervisors:
            self.supervisors.remove(sup)
        # the fdinfo files kept for its clients' next calls go with it (reopened on demand by others)
        self.device.tags.close()

    async def stop(self) -> None:
        for sup in list(self.supervisors):
            sup.close()
        self.supervisors.clear()
        for w in list(self._waiters):
            w.cancel()
        await self.control.stop()

    # -- status ----------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        d = self.device
        opener = None
        if d.opener is not None:
            try:
                opener = pidfd.tgid_of(d.opener_tid)
            except OSError:
                opener = d.opener_tid
        return {
            "device": self.server.device_path,
            "session_node": self.server.session_node_path,
            "transport": self.server.transport_name,
            "abi": d.profile.name,
            "opener_pid": opener,
            **d.profile.status(d.core),
            "emulator_pid": os.getpid(),
            "runs": sorted(c.pid for c in self.runs),
        }

    def _status(self, c: Connection, msg: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        return {"ok": True, **self.status()}

    # -- kexec -----------------------------------------------------------------------------------
    def kexec(self) -> dict[str, Any]:
        """reboot(LINUX_REBOOT_CMD_KEXEC) on the emulated machine; every `cusedev run` tree dies."""
        try:
            live = self.device.kexec()
        except OSError as e:
            return {"ok": False, "errno": e.errno, "error": os.strerror(e.errno or 0)}
        st = self.device.profile.status(self.device.core)
        result = {"ok": True, "live": live, "state": st.get("state"), "update_count": st.get("update_count")}
        for c in list(self.runs):
            c.send({"event": "kexec", **result})
        # after the carry: run processes that detached from their tree (a daemon holding session fds) die
        # too; found off the loop (a stat of the FUSE file may be a request only the loop answers)
        from ..run.holders import kill_run_holders

        try:
            asyncio.get_running_loop().run_in_executor(None, kill_run_holders, *self.server.node_paths)
        except RuntimeError:  # no loop running (a synchronous caller): nothing to deadlock with
            kill_run_holders(*self.server.node_paths)
        log.info("kexec: %s, state=%s, update_count=%s", "live update" if live else "plain kexec",
                 result["state"], result["update_count"])
        return result

    def _kexec(self, c: Connection, msg: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        return self.kexec()

    def _profile_commands(self) -> dict[str, Command]:
        """The profile's own control commands (v3: ``kho``), called with the device."""
        def bind(fn: Callable[[Any, dict[str, Any]], dict[str, Any]]) -> Command:
            return lambda c, msg, fds: fn(self.device, msg)

        return {name: bind(fn) for name, fn in self.device.profile.control.items()}

    # -- tracing and fault injection (cusedev.trace, cusedev.inject) ------------------------------
    def _trace(self, c: Connection, msg: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        from ..tracing import record as trace

        return trace.control(self.device, msg)

    def _inject(self, c: Connection, msg: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        from ..tracing.inject import RuleError

        inj = self.device.injector
        if msg.get("clear"):
            inj.clear()
        try:
            for text in msg.get("rules", []):
                inj.add(str(text))
        except RuleError as e:
            return {"ok": False, "error": str(e)}
        return {"ok": True, "rules": inj.list()}

    # -- `cusedev run` ---------------------------------------------------------------------------
    def _attach(self, c: Connection, msg: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        """A `cusedev run` hands over its seccomp listener; it then hears of every kexec."""
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            return {"ok": False, "error": "attach needs exactly one seccomp listener fd"}
        sup = Supervisor(fds[0], self._on_ioctl, self._on_reboot, name=f"run-{c.pid}")
        sup.start()
        self.supervisors.append(sup)
        # the list holds the running ones only: a supervisor leaves it when its listener closes
        done = asyncio.ensure_future(sup.wait_closed())
        done.add_done_callback(lambda _f: self._forget(sup))
        self._waiters.add(done)
        done.add_done_callback(self._waiters.discard)
        self.runs.add(c)
        c.on_close.append(lambda: self.runs.discard(c))
        return {"ok": True}

    def _is_device(self, fd: int) -> bool:
        """Whether ``fd`` is an open file of this emulator's nodes, device or session (the filter
        cannot tell fds apart).

        Never on the loop's thread (see ``_on_ioctl``).  The nodes' identities are
        stat'ed once and kept: the nodes live as long as the server."""
        try:
            st = os.fstat(fd)
            refs = self._node_stats
            if refs is None:
                refs = self._node_stats = [os.stat(p) for p in self.server.node_paths]
        except OSError:
            return False
        for ref in refs:
            if stat.S_ISCHR(ref.st_mode):
                if stat.S_ISCHR(st.st_mode) and st.st_rdev == ref.st_rdev:
                    return True
            elif (st.st_dev, st.st_ino) == (ref.st_dev, ref.st_ino):
                return True
        return False

    async def _on_ioctl(self, n: Notification) -> None:
        """A trapped fd-returning ioctl of a `cusedev run` process, run on the caller's own open file.

        Fast path, on the loop: the caller's fd carries the tag of one of our open
        files (an OFD lock, ``fdpass.FileTags``), read from /proc/<tid>/fdinfo/<fd>
        without a request to us; the call runs at once on that file
        (``EmulatedDevice.run_tagged``) with a ``TrappedCall`` (the real caller, its
        memory, an installer bound to this notification), and is answered.

        Slow path, an untagged fd (a client's device fd the first time, or a
        foreign fd): one worker call (``fdpass.reissue_and_close``) checks that a
        pidfd_getfd copy of the fd is a file of our node (else the syscall goes on
        to the kernel untouched), re-issues the ioctl on it with the call's cookie
        so it reaches the caller's own open file through the kernel, tags that
        file, and closes the copy (off the loop: a stat or close of our own node
        may need a reply only the loop sends).  If the trapped task dies
        meanwhile, the call is cancelled.
        """
        # what our nodes have queued came first: a RELEASE of a file the caller closed just before this
        # call (the FUSE file sends it in the background) is seen before the call runs, as with the kernel
        self.device.pump()
        fd = n.args[0] & 0xFFFFFFFF  # the int argument as the syscall reads it
        if fd >= 0x80000000:
            fd -= 1 << 32
        fh = self.device.tags.lookup_fd(n.pid, fd) if fd >= 0 else None
        if fh is not None:
            call = TrappedCall(Caller(n.pid, 0, 0), ProcessVmMemory(n.pid), SeccompInstaller(n), n.args[2])
            res = self.device.run_tagged(fh, n.args[1], call)
            err = res if isinstance(res, int) else await self._outcome(n, call, res)
            if self.device.closing:  # CUSE: our copy of a handed-out file is closed first
                await self.device.closes_done()
            n.reply(error=err) if err else n.reply(0)  # False (not sent) when the caller is gone
            return
        try:
            dup = pidfd.getfd(n.pid, fd)
        except OSError:
            n.continue_()
            return
        try:
            call = TrappedCall(Caller(n.pid, 0, 0), ProcessVmMemory(n.pid), SeccompInstaller(n), n.args[2])
        except BaseException:
            asyncio.get_running_loop().run_in_executor(None, os.close, dup)  # maybe a last reference
            raise
        # the worker owns ``dup`` from here: it closes it, even if this task is cancelled
        work = asyncio.ensure_future(self.device.run_trapped(dup, n.args[1], call, self._is_device))
        err = await self._until_done(n, call, work)
        if self.device.closing:
            await self.device.closes_done()
        if err is None:  # not our node
            n.continue_()
        elif n.valid():
            n.reply(error=err) if err else n.reply(0)
        else:
            n.answered = True

    @staticmethod
    async def _outcome(n: Notification, call: TrappedCall, work: asyncio.Future[Any]) -> int:
        """0 or the errno of a trapped call's handler; if the trapped task dies meanwhile, it is cancelled.

        A timer checks the task now and then: cheaper than ``asyncio.wait`` with a timeout."""
        loop = asyncio.get_running_loop()
        timer: asyncio.TimerHandle | None = None

        def watch() -> None:
            nonlocal timer
            if not work.done():
                if n.valid():
                    timer = loop.call_later(TRAPPED_POLL, watch)
                else:
                    call.cancel()  # the caller died: its reply is EINTR, read by nobody

        timer = loop.call_later(TRAPPED_POLL, watch)
        try:
            await work
            return 0
        except asyncio.CancelledError:
            if call.cancelled:
                return errno.EINTR
            raise
        except OSError as e:
            return e.errno or errno.EIO
        except Exception:
            log.exception("trapped call failed")
            return errno.EIO
        finally:
            if timer is not None:
                timer.cancel()

    @staticmethod
    async def _until_done(n: Notification, call: TrappedCall, work: asyncio.Future[Any]) -> Any:
        """``work``'s result; meanwhile, if the trapped task dies, the call is cancelled."""
        while not work.done():
            await asyncio.wait([work], timeout=TRAPPED_POLL)
            if not work.done() and not n.valid():
                call.cancel()  # the caller died: its reply is EINTR, read by nobody
        return work.result()

    async def _on_reboot(self, n: Notification) -> None:
        """reboot(LINUX_REBOOT_CMD_KEXEC) from a `cusedev run` process is the emulated kexec."""
        magic1, magic2 = n.args[0] & 0xFFFFFFFF, n.args[1] & 0xFFFFFFFF
        if magic1 != uapi.LINUX_REBOOT_MAGIC1 or magic2 not in REBOOT_MAGIC2:
            n.reply(error=errno.EINVAL)
            return
        result = self.kexec()
        if not result["ok"]:
            n.reply(error=result["errno"])
            return
        # a successful kexec never returns: the launcher kills the caller; wait for that
        for _ in range(1000):
            if not n.valid():
                n.answered = True  # the caller died in the reboot, as it should: nothing to answer
                return
            await asyncio.sleep(0.01)
        n.reply(error=errno.EIO)
