"""``Emulator``: one /dev/liveupdate emulator for a test, started and torn down in a few lines.

A test suite needs an emulated machine it can drive — open the device,
trigger a kexec, inject faults, read the trace — and that disappears again
whatever happens to the test.  ``Emulator`` wraps ``cusedev serve`` for that:

* ``Emulator()`` runs the emulator **as a subprocess** (the default): a bug or
  a crash in the emulator cannot take the test process down, and a test that
  hangs in an ioctl can still be killed.
* ``Emulator(in_process=True)`` runs ``Server`` + its runtime on an asyncio
  loop in a thread of the test process: no Python start-up (seconds on a slow
  VM), and the test can set breakpoints in the emulator.  Do not fork-exec
  from a thread holding the device open in that mode without care: the
  emulator lives and dies with the test process.

Both modes have the same API, because everything after start-up goes through
the emulator's control socket (``control.request``): status, kexec,
injection.  Every instance serves a unique path in a private temporary
directory (device node or file, control socket, sysfs tree, trace, log), so
tests can run in parallel (pytest-xdist); ``stop()`` (also on ``__exit__``,
garbage collection and interpreter exit) lazily unmounts whatever is left.

::

    from cusedev import Emulator

    with Emulator() as emu, emu.open() as dev:
        dev.preserve(memfd, 42)
        dev.prepare()
        emu.kexec()               # the handle is now revoked (ENODEV), as if the process died
        emu.run(["my-vmm", "--restore", emu.path], check=True)
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from .. import control
from ..control import paths
from ..fuse import abort as fuse_abort
from ..libc import function

if TYPE_CHECKING:
    from ..control.server import Server
    from ..device.seam import Caller, FdInstaller

__all__ = ["Emulator", "EmulatorError", "available_transport"]

#: The source tree holding this package: children must import the same cusedev as we do.
_PKG_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_MNT_DETACH = 2
_umount2 = function("umount2", [ctypes.c_char_p, ctypes.c_int])
#: how long a SIGKILLed emulator (or a stopped in-process one) may take before its connections are aborted
_KILL_GRACE = 3.0
log = logging.getLogger(__name__)


class EmulatorError(RuntimeError):
    """The emulator could not be started (the message says why, with the emulator's log)."""


def _default_timeout() -> float:
    # a software-emulated VM needs many seconds just to start Python; only a failure waits this long
    env = os.environ.get("CUSEDEV_READY_TIMEOUT") or os.environ.get("CUSEDEV_TEST_READY_TIMEOUT")
    return float(env or 180)


def available_transport() -> tuple[str | None, str]:
    """(best usable transport or None, why not) — "cuse" if /dev/cuse opens, else "fuse" if /dev/fuse does."""
    from ..transport.cuse import cuse_available

    why_cuse = cuse_available()
    if why_cuse is None:
        return "cuse", ""
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC))
    except OSError as e:
        return None, f"neither CUSE ({why_cuse}) nor FUSE (/dev/fuse: {e.strerror}) is usable"
    return "fuse", ""


def _mounted(points: Iterable[str]) -> list[str]:
    wanted = set(points)
    found = []
    try:
        with open("/proc/mounts") as f:
            for line in f:
                mp = line.split()[1].replace("\\040", " ")
                if mp in wanted:
                    found.append(mp)
    except OSError:
        pass
    return found


def _abort_wedged(what: str, conns: list[fuse_abort.Conn]) -> None:
    """``what`` outlived its stop: abort its connections (a thread waiting on its own node, see fuse/abort.py)."""
    done = fuse_abort.abort(conns)
    log.warning("%s did not end when told to (wedged on its own node?): aborted its connections %s", what,
                ", ".join(done) or "(none left)")


def _kill(proc: subprocess.Popen[bytes], conns: list[fuse_abort.Conn]) -> None:
    """SIGKILL ``proc`` and reap it; if it is wedged on its own node, abort its connections, then reap it."""
    proc.kill()
    try:
        proc.wait(_KILL_GRACE)
    except subprocess.TimeoutExpired:
        _abort_wedged(f"emulator pid {proc.pid} (SIGKILLed)", conns)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(30)


def _cleanup(device_path: str, tmpdir: str | None, proc: subprocess.Popen[bytes] | None,
             conns: list[fuse_abort.Conn]) -> None:
    """Kill a leftover emulator, lazily unmount what it left, drop stale sockets and directories."""
    if proc is not None and proc.poll() is None:
        _kill(proc, conns)
    rundir = paths.runtime_dir(device_path)
    points = [device_path, os.path.join(rundir, "mnt"), os.path.join(rundir, "sys")]
    if tmpdir:
        points.append(os.path.join(tmpdir, "sys"))
    for _ in range(4):  # stacked mounts (a crashed emulator restarted on the same path)
        left = _mounted(points)
        if not left:
            break
        for mp in left:
            _umount2(mp.encode(), _MNT_DETACH)
    sock = paths.control_socket(device_path)
    if os.path.exists(sock):
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(sock)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(sock)  # nobody serves it: stale
        finally:
            probe.close()
    for d in (os.path.join(rundir, "mnt"), os.path.join(rundir, "sys"), rundir):
        with contextlib.suppress(OSError):
            os.rmdir(d)
    if tmpdir:
        shutil.rmtree(tmpdir, ignore_errors=True)


class _SelfInstaller:
    """Puts a new fd into the caller when the caller is this very process (an in-process emulator)."""

    def reserve(self, caller: Caller) -> None:
        return None

    def install(self, caller: Caller, fd: int) -> int:
        return os.dup(fd)  # os.dup: O_CLOEXEC set, lowest free number, as ADDFD does


def _in_this_process(tid: int) -> bool:
    return os.path.exists(f"/proc/self/task/{tid}")


def _in_process_device(profile: str) -> Any:
    """The in-process emulator's device: its own threads' fd-returning calls install here."""
    from ..device.openfiles import EmulatedDevice

    class InProcessDevice(EmulatedDevice):
        def installer_for(self, caller: Caller) -> FdInstaller | None:
            found = super().installer_for(caller)
            if found is self.installer and not _in_this_process(caller.tid):
                return None  # another process outside `cusedev run`: EOPNOTSUPP, as served
            return found

    dev = InProcessDevice(profile=profile)
    if set(dev.kinds) != {"device"}:  # a profile whose commands return open files of its own (sessions)
        dev.installer = _SelfInstaller()
    return dev


class Emulator:
    """One emulated /dev/liveupdate with its control plane; a context manager.

    ``path`` defaults to ``<private tmp dir>/liveupdate``.  ``transport`` is
    ``auto`` (CUSE if usable, else the FUSE file), ``cuse`` or ``fuse``.
    ``trace`` (default on) records every device event to ``trace_path`` for
    ``trace_records()`` and for failure reports; ``inject`` rules are active
    from the first call; ``sysfs`` is ``auto``/``fuse``/``files`` or None.
    ``state_dir`` is passed to ``serve --state-dir``.  ``abi`` names the ABI
    profile served (``serve --abi``: "v3", "6.19", "7.2", "mainline"); ``open()``
    then gives that profile's client.  In-process, fd-returning commands of a
    session profile install their fd into this process when this process is
    the caller (the emulator is the caller's own process, as under `cusedev
    run` the supervisor would install it); other processes need ``run()``.
    """

    def __init__(self, path: str | None = None, transport: str = "auto", *, in_process: bool = False,
                 trace: bool = True, inject: Sequence[str] = (), sysfs: str | None = "auto",
                 state_dir: str | None = None, ready_timeout: float | None = None,
                 env: dict[str, str] | None = None, abi: str = "v3"):
        from ..profiles import base as profiles

        profiles.get(abi)  # ValueError naming the known profiles, before anything is created
        self.abi = abi
        if transport not in ("auto", "cuse", "fuse"):
            raise ValueError(f"unknown transport {transport!r} (auto, cuse or fuse)")
        self.requested_transport = transport
        self.in_process = in_process
        self.trace_enabled = trace
        self.initial_rules = list(inject)
        self.sysfs_mode = sysfs
        self.state_dir = state_dir
        self.ready_timeout = ready_timeout if ready_timeout is not None else _default_timeout()
        self.env = env
        #: the private directory (0755 so that non-root clients can reach the device)
        self.tmpdir = tempfile.mkdtemp(prefix="cusedev-emu-", dir="/tmp")
        os.chmod(self.tmpdir, 0o755)
        self.path = os.path.abspath(path) if path else os.path.join(self.tmpdir, "liveupdate")
        self.trace_path = os.path.join(self.tmpdir, "trace.jsonl")
        self.log_path = os.path.join(self.tmpdir, "emulator.log")
        #: the transport in use once started ("cuse" or "fuse")
        self.transport: str | None = None
        self.pid: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._server: Server | None = None
        #: our FUSE/CUSE connections, recorded once serving: what stop() aborts if the emulator wedges
        self._conns: list[fuse_abort.Conn] = []
        self._finalizer = weakref.finalize(self, _cleanup, self.path, self.tmpdir, None, self._conns)

    # -- paths -----------------------------------------------------------------------------------
    @property
    def sysfs_path(self) -> str | None:
        """The stand-in for ``/sys`` (``<it>/kernel/liveupdate/state``), or None without a tree."""
        return os.path.join(self.tmpdir, "sys") if self.sysfs_mode else None

    @property
    def sysfs_state_path(self) -> str | None:
        """The emulated ``/sys/kernel/liveupdate/state`` file."""
        root = self.sysfs_path
        return os.path.join(root, "kernel", "liveupdate", "state") if root else None

    @property
    def control_socket(self) -> str:
        return paths.control_socket(self.path)

    @property
    def running(self) -> bool:
        if self._proc is not None:
            return self._proc.poll() is None
        return self._thread is not None and self._thread.is_alive()

    # -- start / stop ----------------------------------------------------------------------------
    def start(self) -> Emulator:
        """Start serving; raises ``EmulatorError`` (with the emulator's log) if it does not come up."""
        if self.running:
            return self
        if os.geteuid() != 0:
            raise EmulatorError("the emulator must run as root (it mounts FUSE / creates CUSE devices)")
        try:
            self._start_thread() if self.in_process else self._start_subprocess()
            self._record_connections()
        except BaseException:
            self.stop()
            raise
        return self

    def _record_connections(self) -> None:
        """Remember our connections while they are surely ours (their numbers are reused once they end)."""
        from ..transport.cuse import devname_for, session_devname

        rundir = paths.runtime_dir(self.path)
        points = [self.path, os.path.join(rundir, "mnt")] + ([self.sysfs_path] if self.sysfs_path else [])
        names: list[str] = []
        if self.transport == "cuse":
            name = devname_for(self.path)[0]
            names = [name, session_devname(name)]
        self._conns[:] = fuse_abort.connections(points, names)

    def _serve_args(self) -> list[str]:
        args = ["--device", self.path, "--transport", self.requested_transport]
        if self.abi != "v3":
            args += ["--abi", self.abi]
        if self.sysfs_mode:
            args += ["--sysfs", self.sysfs_mode, "--sysfs-root", str(self.sysfs_path)]
        else:
            args += ["--no-sysfs"]
        if self.trace_enabled:
            args += ["--trace", self.trace_path]
        for rule in self.initial_rules:
            args += ["--inject", rule]
        if self.state_dir:
            args += ["--state-dir", self.state_dir]
        return args

    def child_env(self) -> dict[str, str]:
        """The environment for children that import cusedev (this very package first on the path)."""
        env = {**os.environ, **(self.env or {})}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PKG_PARENT, env.get("PYTHONPATH", "")) if p)
        env.pop("NOTIFY_SOCKET", None)
        return env

    def _start_subprocess(self) -> None:
        # Readiness comes over a private NOTIFY_SOCKET (the systemd protocol `serve` speaks),
        # so the emulator's stdout and stderr can both go to a log file and never block it.
        notify_path = os.path.join(self.tmpdir, "notify")
        nsock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            nsock.bind(notify_path)
            env = {**self.child_env(), "NOTIFY_SOCKET": notify_path}
            with open(self.log_path, "ab") as log:
                self._proc = subprocess.Popen(
                    [sys.executable, "-m", "cusedev", "serve", *self._serve_args()],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, cwd="/")
            self._finalizer.detach()
            self._finalizer = weakref.finalize(self, _cleanup, self.path, self.tmpdir, self._proc, self._conns)
            pidfd = os.pidfd_open(self._proc.pid)
            try:
                deadline = time.monotonic() + self.ready_timeout
                while True:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise EmulatorError(f"no readiness within {self.ready_timeout:.0f}s{self._log_tail()}")
                    r, _, _ = select.select([nsock.fileno(), pidfd], [], [], left)
                    if nsock.fileno() in r:
                        msg = dict(kv.split("=", 1) for kv in nsock.recv(4096).decode().splitlines() if "=" in kv)
                        if msg.get("READY") == "1":
                            self.pid = int(msg.get("MAINPID", self._proc.pid))
                            st = msg.get("STATUS", "")
                            self.transport = st.split("transport=", 1)[1].split(",")[0] if "transport=" in st \
                                else None
                            break
                    elif pidfd in r:
                        rc = self._proc.wait()
                        raise EmulatorError(f"the emulator exited {rc} before it was ready{self._log_tail()}")
            finally:
                os.close(pidfd)
        finally:
            nsock.close()
            with contextlib.suppress(OSError):
                os.unlink(notify_path)
        if self.transport is None:
            self.transport = str(self.status()["transport"])

    def _start_thread(self) -> None:
        ready: dict[str, Any] = {}
        started = threading.Event()
        self._thread = threading.Thread(target=self._thread_main, args=(ready, started),
                                        name=f"cusedev-emulator {self.path}", daemon=True)
        self._thread.start()
        if not started.wait(self.ready_timeout):
            raise EmulatorError(f"the in-process emulator was not ready within {self.ready_timeout:.0f}s")
        if "error" in ready:
            self._thread.join(30)
            raise EmulatorError(str(ready["error"])) from ready["error"]
        self.pid = os.getpid()

    def _thread_main(self, ready: dict[str, Any], started: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve_in_thread(ready, started))
        except BaseException as e:  # noqa: BLE001 - reported to start() or logged below
            if not started.is_set():
                ready["error"] = e
            else:
                import logging

                logging.getLogger(__name__).exception("in-process emulator at %s failed", self.path)
        finally:
            started.set()
            loop.close()

    async def _serve_in_thread(self, ready: dict[str, Any], started: threading.Event) -> None:
        from ..control.server import ServeError, Server
        from ..tracing import record as trace

        handler = _in_process_device(self.abi)
        for rule in self.initial_rules:
            handler.injector.add(rule)
        if self.trace_enabled:
            trace.start(handler, self.trace_path)
        self._stop_event = asyncio.Event()
        server = Server(self.path, self.requested_transport, handler=handler, state_dir=self.state_dir,
                        sysfs=self.sysfs_mode, sysfs_root=self.sysfs_path)
        self._server = server
        try:
            try:
                await server.start()
                await server.start_runtime()
            except ServeError as e:
                raise EmulatorError(str(e)) from e
            self.transport = server.transport_name
            started.set()
            await self._stop_event.wait()
        finally:
            await server.stop()
            if self.trace_enabled:
                trace.stop(handler)

    def stop(self, timeout: float = 60.0) -> None:
        """Stop the emulator (SIGTERM, then SIGKILL) and remove everything it left; idempotent.

        An emulator wedged on its own node (a thread waiting for a reply only
        it could send) survives SIGKILL: ``timeout`` after SIGTERM (and a few
        seconds after SIGKILL), its FUSE/CUSE connections are aborted, which
        fails the request it waits for and lets it die (see fuse/abort.py).
        In-process, the loop thread gets the same once ``timeout`` has passed.
        """
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                _kill(proc, self._conns)
        thread, self._thread = self._thread, None
        if thread is not None:
            loop, ev = self._loop, self._stop_event
            if loop is not None and ev is not None and thread.is_alive():
                with contextlib.suppress(RuntimeError):  # the loop already closed
                    loop.call_soon_threadsafe(ev.set)
            thread.join(timeout)
            if thread.is_alive():
                _abort_wedged(f"the in-process emulator at {self.path}", self._conns)
                thread.join(_KILL_GRACE)
        self._finalizer()  # umount -l leftovers, stale socket, private dir (runs once)

    def __enter__(self) -> Emulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        mode = "in-process" if self.in_process else f"pid {self.pid}"
        return f"<Emulator {self.path} transport={self.transport} {mode}>"

    # -- logs ------------------------------------------------------------------------------------
    def log(self) -> str:
        """What the emulator subprocess wrote to stdout/stderr so far."""
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def _log_tail(self, lines: int = 20) -> str:
        text = self.log().strip()
        return ("; emulator log:\n" + "\n".join(text.splitlines()[-lines:])) if text else ""

    # -- the control socket ----------------------------------------------------------------------
    def request(self, cmd: str, **args: Any) -> dict[str, Any]:
        """One raw control-socket request (``status``, ``kexec``, ``inject``, ``trace``, ``kho``)."""
        return control.request(self.path, cmd, **args)

    def status(self) -> dict[str, Any]:
        """State, update_count, kho_finalized, opener pid, outgoing/incoming files, `run` pids."""
        st = self.request("status")
        st.pop("ok", None)
        return st

    def kexec(self) -> dict[str, Any]:
        """The emulated reboot(LINUX_REBOOT_CMD_KEXEC).

        Returns ``{"live": bool, "state": ..., "update_count": n}``; every open
        handle is revoked (ENODEV) and every ``run`` tree is killed, as a
        reboot would.  A failed freeze raises ``OSError`` with its errno (the
        state is back to normal then, as the kernel leaves it).
        """
        r = self.request("kexec")
        if not r.get("ok"):
            code = int(r.get("errno") or errno.EIO)
            raise OSError(code, f"kexec: {os.strerror(code)}")
        r.pop("ok", None)
        return r

    def set_kho_finalized(self, finalized: bool = True) -> None:
        """Set the "KHO finalized" flag as debugfs would (PREPARE then fails with EEXIST)."""
        self.request("kho", finalized=finalized)

    def inject(self, *rules: str) -> list[dict[str, Any]]:
        """Add fault-injection rules (``"FD_PRESERVE:error=ENOSPC:when=2"``, ``"kexec:error=EIO"``...).

        Returns the active rules with their hit counts; a bad rule raises ``ValueError``.
        """
        r = self.request("inject", rules=list(rules))
        if not r.get("ok"):
            raise ValueError(str(r.get("error")))
        return list(r["rules"])

    def clear_injections(self) -> None:
        """Remove every fault-injection rule."""
        self.request("inject", rules=[], clear=True)

    # -- trace -----------------------------------------------------------------------------------
    def trace_records(self) -> list[dict[str, Any]]:
        """Every record of the trace so far (JSON objects; see "ioctl traces" in README.md for the schema).

        A status round trip first: the emulator writes records after the
        replies, and its control loop answers only after those writes.
        """
        from ..tracing.show import read_records

        if not self.trace_enabled:
            raise RuntimeError("this Emulator was started with trace=False")
        if self.running:
            with contextlib.suppress(control.ControlError, OSError):
                self.request("status")
        try:
            return list(read_records(self.trace_path))
        except FileNotFoundError:
            return []

    def trace_tail(self, lines: int = 30) -> list[str]:
        """The last ``lines`` trace records, strace-style (what failure reports show)."""
        from ..tracing.show import format_record

        if not self.trace_enabled:
            return []
        out = [line for r in self.trace_records() if (line := format_record(r)) is not None]
        return out[-lines:]

    # -- clients ---------------------------------------------------------------------------------
    def open(self, flags: int = os.O_RDWR) -> Any:
        """An open client of the served profile on this emulator (a context manager):
        ``cusedev.client.LiveUpdateDevice`` for v3, ``SessionDevice`` for 6.19/7.2."""
        from ..profiles import base as profiles

        client: type = profiles.get(self.abi).client
        return client(self.path, flags)

    def run_argv(self, cmd: Sequence[str] | str) -> list[str]:
        """The argv that runs ``cmd`` under ``cusedev run`` (a string runs through /bin/sh -c)."""
        argv = ["/bin/sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        return [sys.executable, "-m", "cusedev", "run", "--device", self.path, "--", *argv]

    def run(self, cmd: Sequence[str] | str, **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        """``subprocess.run`` of ``cmd`` under ``cusedev run``: FD_RESTORE installs real fds in it
        and its reboot(LINUX_REBOOT_CMD_KEXEC) is the emulated kexec.  Keyword arguments go to
        ``subprocess.run`` (``check``, ``capture_output``, ``text``, ``timeout``, ``env``...).
        """
        kwargs.setdefault("env", self.child_env())
        return subprocess.run(self.run_argv(cmd), **kwargs)

    def popen(self, cmd: Sequence[str] | str, **kwargs: Any) -> subprocess.Popen[Any]:
        """Like ``run`` but in the background (e.g. a VMM that holds the device while a kexec happens)."""
        kwargs.setdefault("env", self.child_env())
        return subprocess.Popen(self.run_argv(cmd), **kwargs)
