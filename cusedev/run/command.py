"""`cusedev run -- CMD`: run a client so that fd-returning ioctls install real fds and reboot(KEXEC) is emulated.

The command starts under the seccomp filter (``seccomp.spawn`` via the
``Launcher``); its listener goes to the emulator over the control socket
before the command execs.  The connection then stays open: when the emulated
kexec happens (from this command's reboot(), another run's, or `cusedev
kexec`), the emulator says so and every process of this run is killed, as a
reboot would end them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import sys
from collections.abc import Sequence
from typing import Any

from .. import control, profiles
from ..control.channel import ControlError
from .launcher import Launcher


class _Events:
    """Reads the emulator's event lines on the attached control connection."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = b""
        self.kexec: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()

    def readable(self) -> None:
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            data = None
        except OSError:
            data = b""
        if data is None and not self.buf:
            return
        if data == b"":
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
            if not self.kexec.done():
                self.kexec.set_exception(ControlError("the emulator went away"))
            return
        self.buf += data or b""
        while b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            msg = json.loads(line)
            if msg.get("event") == "kexec" and not self.kexec.done():
                self.kexec.set_result(msg)


def trapped_by(device: str) -> tuple[int, ...]:
    """The fd-returning commands of the profile the emulator serving ``device`` runs (the filter traps them)."""
    st = control.request(device, "status")
    return profiles.get(st.get("abi") or profiles.DEFAULT).fd_commands


async def run_under(device: str, argv: Sequence[str]) -> int:
    """Run ``argv`` attached to the emulator serving ``device``; returns the exit code to use."""
    loop = asyncio.get_running_loop()
    sock = control.connect(device)
    events = _Events(sock)
    try:
        _pid, uid, _gid = control.peer_ids(sock)
        if uid != 0:
            raise ControlError(f"the emulator serving {device} does not run as root (uid {uid}): refusing")

        def handoff(listener: int) -> None:
            """Give the listener away before CMD execs; the reply line comes first, events after it."""
            control.send(sock, {"cmd": "attach"}, [listener])
            while b"\n" not in events.buf:
                chunk = sock.recv(65536)
                if not chunk:
                    raise ControlError("the emulator closed the control connection")
                events.buf += chunk
            line, events.buf = events.buf.split(b"\n", 1)
            reply = json.loads(line)
            if not reply.get("ok"):
                raise ControlError(f"the emulator refused the listener: {reply.get('error')}")
            sock.setblocking(False)
            loop.add_reader(sock.fileno(), events.readable)
            if events.buf:
                loop.call_soon(events.readable)

        env = {**os.environ, "CUSEDEV_RUN": "1", "CUSEDEV_DEVICE": os.path.abspath(device)}
        launcher = Launcher(argv, handoff=handoff, env=env, trapped=trapped_by(device))
        rc = await launcher.run(events.kexec)
        if launcher.kexeced and events.kexec.done() and not events.kexec.exception():
            info = events.kexec.result()
            kind = "live update" if info.get("live") else "plain kexec"
            print(f"cusedev run: {kind} (state={info.get('state')}, update_count={info.get('update_count')}); "
                  "the command's processes ended as a reboot ends them", file=sys.stderr, flush=True)
            return 0
        return rc
    finally:
        with contextlib.suppress(ValueError, OSError):
            loop.remove_reader(sock.fileno())
        sock.close()
