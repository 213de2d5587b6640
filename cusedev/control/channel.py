"""The control socket: status, kexec and `cusedev run` attachment, for root only.

One Unix stream socket per emulator (``paths.control_socket``), mode 0600,
and every connection's peer credentials are checked (uid 0, or the group
given to ``serve --group``), because a peer can make the emulator reboot its
clients or hand it a seccomp listener.  Messages are JSON lines; a seccomp
listener fd rides along with ``attach`` as SCM_RIGHTS.  Requests are served
on the emulator's asyncio loop and never block it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

from . import paths

log = logging.getLogger(__name__)

MAX_MSG = 1 << 16
MAX_PENDING = 4 << 20  # bytes of replies and events a peer may leave unread
Command = Callable[
    ["Connection", dict[str, Any], list[int]], "dict[str, Any] | Awaitable[dict[str, Any]] | None"
]


class ControlError(Exception):
    """A control request could not be made; the message is for the user."""


def peer_ids(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the peer, from SO_PEERCRED."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


class Connection:
    """One accepted peer; ``send`` pushes a JSON line (replies and, for `run`, events)."""

    def __init__(self, server: ControlServer, sock: socket.socket, pid: int):
        self.server = server
        self.sock = sock
        self.pid = pid
        self.buf = b""
        self.out = bytearray()  # what the peer has not taken yet (sent when the socket is writable)
        self.closed = False
        self.on_close: list[Callable[[], None]] = []

    def send(self, msg: dict[str, Any]) -> None:
        """Queue one line; never blocks the loop.  A peer that lets MAX_PENDING pile up is dropped."""
        if self.closed:
            return
        was_empty = not self.out
        self.out += json.dumps(msg).encode() + b"\n"
        if len(self.out) > MAX_PENDING:
            log.warning("control peer %d does not read its replies: dropped", self.pid)
            self.close()
            return
        if was_empty:
            self._flush()

    def _flush(self) -> None:
        try:
            n = self.sock.send(self.out)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError:
            self.close()
            return
        del self.out[:n]
        loop = self.server.loop
        if loop is None:
            return
        if self.out:
            loop.add_writer(self.sock.fileno(), self._flush)
        else:
            loop.remove_writer(self.sock.fileno())

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        loop = self.server.loop
        if loop is not None:
            loop.remove_reader(self.sock.fileno())
            loop.remove_writer(self.sock.fileno())
        self.sock.close()
        self.server.connections.discard(self)
        for cb in self.on_close:
            cb()


class ControlServer:
    """Serves ``commands`` (name -> handler) on the control socket of ``device_path``."""

    def __init__(self, device_path: str, commands: dict[str, Command], *, gid: int = 0):
        self.path = paths.control_socket(device_path)
        self.commands = commands
        self.gid = gid
        self.sock: socket.socket | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.connections: set[Connection] = set()

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        os.makedirs(os.path.dirname(self.path), mode=0o755, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(self.path)
            except ConnectionRefusedError:
                os.unlink(self.path)  # left by an emulator that was killed
                log.info("removed a stale control socket %s", self.path)
            else:
                probe.close()
                raise ControlError(f"{self.path}: another emulator is serving this device")
            finally:
                probe.close()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        old = os.umask(0o177)
        try:
            s.bind(self.path)
        finally:
            os.umask(old)
        if self.gid:
            os.chown(self.path, 0, self.gid)
            os.chmod(self.path, 0o660)
            # the group must be able to reach the socket: let everyone traverse (not list) the run
            # dir; what lies inside it (private mounts) stays 0700
            run_dir = os.path.dirname(self.path)
            mode = os.stat(run_dir).st_mode & 0o7777
            if mode & 0o111 != 0o111:
                os.chmod(run_dir, mode | 0o111)
        s.listen(16)
        self.sock = s
        self.loop.add_reader(s.fileno(), self._accept)

    async def stop(self) -> None:
        for c in list(self.connections):
            c.close()
        if self.sock is not None and self.loop is not None:
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    def _accept(self) -> None:
        assert self.sock is not None and self.loop is not None
        try:
            conn, _ = self.sock.accept()
        except BlockingIOError:
            return
        pid, uid, gid = peer_ids(conn)
        if uid != 0 and not (self.gid and gid == self.gid):
            conn.close()
            return
        conn.setblocking(False)
        c = Connection(self, conn, pid)
        self.connections.add(c)
        self.loop.add_reader(conn.fileno(), self._readable, c)

    def _readable(self, c: Connection) -> None:
        try:
            data, fds, _flags, _addr = socket.recv_fds(c.sock, MAX_MSG, 8)
        except BlockingIOError:
            return
        except OSError:
            c.close()
            return
        if not data:
            for fd in fds:
                os.close(fd)
            c.close()
            return
        c.buf += data
        while b"\n" in c.buf:
            line, c.buf = c.buf.split(b"\n", 1)
            self._dispatch(c, line, fds)
            fds = []
        for fd in fds:
            os.close(fd)
        if len(c.buf) > MAX_MSG:
            c.close()

    def _dispatch(self, c: Connection, line: bytes, fds: list[int]) -> None:
        try:
            msg = json.loads(line)
            handler = self.commands[msg["cmd"]]
        except (ValueError, KeyError, TypeError):
            for fd in fds:
                os.close(fd)
            c.send({"ok": False, "error": "bad request"})
            return
        try:
            result = handler(c, msg, fds)
        except Exception as e:
            log.exception("control command %s failed", msg.get("cmd"))
            c.send({"ok": False, "error": str(e)})
            return
        if asyncio.iscoroutine(result) or isinstance(result, asyncio.Future):
            task: asyncio.Future[dict[str, Any]] = asyncio.ensure_future(result)
            task.add_done_callback(
                lambda t: c.send(
                    t.result() if not t.exception() else {"ok": False, "error": str(t.exception())}
                )
            )
        elif isinstance(result, dict):
            c.send(result)


def connect(device_path: str) -> socket.socket:
    path = paths.control_socket(device_path)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        s.connect(path)
    except (FileNotFoundError, ConnectionRefusedError) as e:
        s.close()
        raise ControlError(f"no emulator is serving {device_path} (no control socket at {path})") from e
    except PermissionError as e:
        s.close()
        raise ControlError(f"{path}: permission denied (the control socket is root-only)") from e
    return s


def send(sock: socket.socket, msg: dict[str, Any], fds: list[int] | None = None) -> None:
    data = json.dumps(msg).encode() + b"\n"
    if fds:
        socket.send_fds(sock, [data], fds)
    else:
        sock.sendall(data)


def receive(sock: socket.socket, rfile: Any) -> dict[str, Any]:
    line = rfile.readline()
    if not line:
        raise ControlError("the emulator closed the control connection")
    return json.loads(line)


def request(device_path: str, cmd: str, **args: Any) -> dict[str, Any]:
    """One request/reply exchange with the emulator serving ``device_path``."""
    with connect(device_path) as s, s.makefile("rb") as r:
        send(s, {"cmd": cmd, **args})
        return receive(s, r)
