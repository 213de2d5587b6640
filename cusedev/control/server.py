"""Run the emulator: pick a transport, serve a DeviceHandler at a path on an asyncio loop.

In-process use (tests, other front ends sharing the loop)::

    server = Server("/dev/liveupdate", transport="auto")
    await server.start()          # raises ServeError with a one-line reason
    ...                           # server.loop, server.handler, server.add_connection(...)
    await server.stop()

or ``await serve(path, ...)`` which runs until SIGINT/SIGTERM.  Another FUSE
filesystem joins the same loop with ``wire.Connection(fd, ops).start()`` — or
``server.add_connection(connection)`` so that ``stop()`` stops it too — and any
other component with ``server.add_cleanup(async_fn)``.
"""

from __future__ import annotations

import asyncio
import gc
import importlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from ..device.seam import DeviceHandler
from ..fuse.wire import Connection

if TYPE_CHECKING:
    from .runtime import Runtime
    from .sysfs import SysfsTree
from ..transport import Transport, TransportError

log = logging.getLogger(__name__)

DEFAULT_DEVICE = "/dev/liveupdate"
TRANSPORTS = ("auto", "cuse", "fuse")


class ServeError(Exception):
    """The emulator cannot start; the message is one line for the user."""


def raise_fd_limit() -> int:
    """Raise RLIMIT_NOFILE as far as the kernel lets root (``fs.nr_open``, at most 2**20); the new soft limit.

    The kernel keeps every preserved and every retrieved file without any
    process's fd limit; the emulator holds each as an fd.  Under a shell's
    default 1,024 the kernel's own stress test (500 files preserved, then 500
    retrieved) failed with EMFILE that the kernel never gives."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        with open("/proc/sys/fs/nr_open") as f:
            want = min(int(f.read()), 1 << 20)
    except (OSError, ValueError):
        want = hard
    if hard != resource.RLIM_INFINITY and want > hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
            return want
        except (OSError, ValueError):
            pass  # not root, or no CAP_SYS_RESOURCE: the hard limit is as far as we go
    top = want if hard == resource.RLIM_INFINITY else hard
    if soft < top:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (top, hard))
        except (OSError, ValueError):
            return int(soft)
    return int(max(soft, top))


def load_handler(spec: str | None, abi: str | None = None) -> DeviceHandler:
    """A handler from ``module:factory`` (default: the emulated device of ABI profile ``abi``)."""
    if not spec:
        from .. import profiles
        from ..device.openfiles import EmulatedDevice

        try:
            return EmulatedDevice(profile=abi or profiles.DEFAULT)
        except ValueError as e:
            raise ServeError(f"--abi: {e}; `cusedev serve --abi list` shows them") from None
    mod, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(mod), attr or "Handler")
    except (ImportError, AttributeError) as e:
        raise ServeError(f"cannot load handler {spec!r}: {e}") from e
    return factory()


def choose_transport(requested: str) -> str:
    """``auto`` → cuse if /dev/cuse is usable (after modprobe), else fuse with one warning."""
    from ..transport.cuse import cuse_available

    if requested not in TRANSPORTS:
        raise ServeError(f"unknown transport {requested!r}")
    if requested != "auto":
        return requested
    why = cuse_available()
    if why is None:
        return "cuse"
    if not os.path.exists("/dev/fuse"):
        raise ServeError(f"neither CUSE ({why}) nor FUSE (/dev/fuse missing) is usable")
    log.warning("CUSE unavailable (%s); using the FUSE-file fallback", why)
    return "fuse"


class Server:
    """One emulated device on the running asyncio loop."""

    def __init__(self, device_path: str = DEFAULT_DEVICE, transport: str = "auto", *,
                 handler: DeviceHandler | None = None, mode: int = 0o600, uid: int = 0, gid: int = 0,
                 memory: str = "retry", state_dir: str | None = None, sysfs: str | None = None,
                 sysfs_root: str | None = None, abi: str | None = None):
        self.device_path = os.path.abspath(device_path)
        self.requested_transport = transport
        self.handler = handler
        #: the ABI profile of the device made at start when no handler is given (None: the default)
        self.abi = abi
        self.mode, self.uid, self.gid = mode, uid, gid
        self.memory = memory
        self.transport: Transport | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._connections: list[Connection] = []
        self._cleanups: list[Callable[[], Awaitable[None]]] = []
        self._stopped = False
        self.runtime: Runtime | None = None
        self.state_dir = state_dir
        #: sysfs tree: None (none), "auto", "fuse" or "files"; root default <runtime dir>/sys
        self.sysfs_mode, self.sysfs_root = sysfs, sysfs_root
        self.sysfs: SysfsTree | None = None

    @property
    def transport_name(self) -> str:
        return self.transport.name if self.transport else self.requested_transport

    @property
    def session_node_path(self) -> str | None:
        """The node of the files the profile makes (session fds), once started; None if it has none."""
        return self.transport.session_node_path if self.transport is not None else None

    @property
    def node_paths(self) -> list[str]:
        """Every node of this emulator: the device, then the session node if any."""
        session = self.session_node_path
        return [self.device_path] + ([session] if session else [])

    @property
    def connection(self) -> Connection:
        """The device's FUSE connection (its ``closed`` future ends when the kernel drops us)."""
        assert self.transport is not None and self.transport.connection is not None, "not started"
        return self.transport.connection

    def add_connection(self, connection: Connection) -> None:
        """Stop another FUSE connection (e.g. a sysfs tree) together with this server."""
        self._connections.append(connection)

    def add_cleanup(self, fn: Callable[[], Awaitable[None]]) -> None:
        """Run ``await fn()`` on stop, before the device goes away (last added, first run)."""
        self._cleanups.append(fn)

    async def start(self) -> None:
        if os.geteuid() != 0:
            raise ServeError("must run as root (mounting FUSE / creating device nodes)")
        self.loop = asyncio.get_running_loop()
        log.debug("fd limit %d", raise_fd_limit())
        if self.handler is None:
            self.handler = load_handler(None, self.abi)
        if self.state_dir is not None:
            profile = getattr(self.handler, "profile", None)
            if profile is None or profile.state_dir is None:
                raise ServeError(f"--state-dir: the ABI profile {getattr(profile, 'name', '?')} keeps no state dir")
            try:
                profile.state_dir(self.state_dir, self.handler.core).attach()  # type: ignore[attr-defined]
            except (OSError, ValueError) as e:
                raise ServeError(f"--state-dir {self.state_dir}: {e}") from e
        name = choose_transport(self.requested_transport)
        session = _makes_files(self.handler)
        if name == "cuse":
            from ..transport.cuse import CuseTransport

            self.transport = CuseTransport(self.device_path, self.handler, mode=self.mode, uid=self.uid,
                                           gid=self.gid, memory=self.memory, session=session)
        else:
            if not os.path.exists("/dev/fuse"):
                raise ServeError("/dev/fuse missing: FUSE is not usable")
            from ..transport.fusefile import FuseFileTransport

            self.transport = FuseFileTransport(self.device_path, self.handler, mode=self.mode, uid=self.uid,
                                               gid=self.gid, session=session)
        try:
            await self.transport.start()
        except TransportError as e:
            self.transport = None
            raise ServeError(str(e)) from e
        if hasattr(self.handler, "node_path"):
            self.handler.node_path = self.device_path
            # the profile's own opens (session files) go to the session node: ENXIO for anyone else
            self.handler.session_node_path = self.transport.session_node_path  # type: ignore[attr-defined]
        from ..device.openfiles import EmulatedDevice

        if isinstance(self.handler, EmulatedDevice):  # its own fds go before the node, runtime or not
            self.add_cleanup(self.handler.shutdown)
        log.info("%s ready (transport=%s)", self.device_path, self.transport.name)
        if self.sysfs_mode is not None:
            try:
                await self.start_sysfs(self.sysfs_mode, self.sysfs_root)
            except BaseException:
                await self.stop()
                raise

    async def start_sysfs(self, mode: str = "auto", root: str | None = None) -> Any:
        """The sysfs tree (kernel/liveupdate/...) at ``root`` on this loop, removed on stop."""
        from . import paths
        from .sysfs import SysfsError, attributes, start_sysfs

        core = getattr(self.handler, "core", None)
        profile = getattr(self.handler, "profile", None)
        if core is None or profile is None:
            return None  # a stub handler: nothing to show
        attrs = attributes(profile.sysfs(core))
        if not attrs:
            log.info("the ABI profile %s has no sysfs attributes", profile.name)
            return None
        root = root or os.path.join(paths.runtime_dir(self.device_path), "sys")
        try:
            self.sysfs = await start_sysfs(root, core, attrs, mode)
        except SysfsError as e:
            raise ServeError(str(e)) from e
        self.add_cleanup(self.sysfs.stop)
        return self.sysfs

    async def start_runtime(self) -> Any:
        """The control plane (control socket, kexec, `cusedev run` supervision) beside the device."""
        from ..device.openfiles import EmulatedDevice
        from .channel import ControlError
        from .runtime import Runtime

        if not isinstance(self.handler, EmulatedDevice):
            return None
        self.runtime = Runtime(self, self.handler, gid=self.gid)
        try:
            await self.runtime.start()
        except ControlError as e:
            raise ServeError(str(e)) from e
        return self.runtime

    async def stop(self) -> None:
        """Idempotent: cleanups, extra connections, then the device (node/mounts removed, fds closed)."""
        if self._stopped:
            return
        self._stopped = True
        while self._cleanups:
            fn = self._cleanups.pop()
            try:
                await fn()
            except Exception:
                log.exception("cleanup failed")
        for s in self._connections:
            s.stop()
        if self.transport is not None:
            await self.transport.stop()
        _remove_runtime_dirs(self.device_path)

    async def wait_closed(self) -> None:
        """Until the kernel ends the device's connection (unmount, abort)."""
        if self.transport is not None and self.connection.closed is not None:
            await asyncio.shield(self.connection.closed)

    async def __aenter__(self) -> Server:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def _makes_files(handler: DeviceHandler) -> bool:
    """Whether ``handler``'s profile makes files of its own (kinds besides the device): they get a node."""
    from ..device.openfiles import EmulatedDevice

    return isinstance(handler, EmulatedDevice) and any(k != "device" for k in handler.kinds)


def _remove_runtime_dirs(device_path: str) -> None:
    """Drop this path's directories under /run/cusedev once empty, also those a killed run left.

    The transports and the sysfs tree remove what they created, but a directory that a SIGKILLed
    emulator left behind was not created by this run, so nobody else would ever remove it.
    Only ``rmdir``: a directory still in use (a mount point, or not empty) stays.
    """
    from . import paths

    private = paths.runtime_dir(device_path)
    for d in (os.path.join(private, "sys"), os.path.join(private, "mnt"), private):
        try:
            os.rmdir(d)
        except OSError:
            pass


def sd_notify(state: str) -> bool:
    """Tell systemd (``Type=notify``) about ``state`` ("READY=1", "STOPPING=1") if it is listening.

    The protocol is one datagram to the AF_UNIX socket named by ``NOTIFY_SOCKET``
    (a leading ``@`` means the abstract namespace), so no libsystemd is needed.
    Returns whether a message was sent; never raises: a missing or broken
    socket must not stop the emulator.
    """
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr or addr[0] not in "/@":
        return False
    target = "\0" + addr[1:] if addr[0] == "@" else addr
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(state.encode(), target)
    except OSError as e:
        log.warning("NOTIFY_SOCKET %s: %s", addr, e.strerror)
        return False
    return True


def ready_line(server: Server) -> str:
    return f"cusedev: {server.device_path} ready (transport={server.transport_name}, pid={os.getpid()})"


async def serve(device_path: str = DEFAULT_DEVICE, transport: str = "auto", *,
                on_ready: Callable[[Server], None] | None = None, **kwargs: Any) -> None:
    """Run one device until SIGINT/SIGTERM or until the kernel drops the connection."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    server = Server(device_path, transport, **kwargs)
    notified = False
    try:
        await server.start()
        await server.start_runtime()
        # Start-up objects (cffi types, codecs, tables) live as long as the process: move them out
        # of the collector's view so a collection triggered on the request path stays short.
        gc.collect()
        gc.freeze()
        if on_ready is not None:
            on_ready(server)
        notified = sd_notify(f"READY=1\nMAINPID={os.getpid()}\nSTATUS={ready_line(server)}")
        closed = asyncio.ensure_future(server.wait_closed())
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait([closed, stopped], return_when=asyncio.FIRST_COMPLETED)
        for t in (closed, stopped):
            t.cancel()
        if closed.done() and not stopped.done():
            log.warning("%s: the kernel closed the connection", device_path)
    finally:
        if notified:
            sd_notify("STOPPING=1")
        await server.stop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def print_ready(server: Server) -> None:
    print(ready_line(server), flush=True)
    sys.stdout.flush()
