"""What an emulator runs beside its device: the control commands, kexec, status and `cusedev run` clients.

``Runtime`` attaches to a started ``Server`` and owns everything that is not
the ioctl path: the control socket, supervision of seccomp listeners handed
over by `cusedev run` (FD_RESTORE installs, reboot(KEXEC)), and the optional
state directory.  The transports and the ABI profile know nothing of it.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from . import pidfd
from .control import Connection, ControlServer
from .handles import LiveUpdateDevice

log = logging.getLogger(__name__)


def file_rows(files: dict[int, Any]) -> list[dict[str, Any]]:
    rows = []
    for token, pf in sorted(files.items()):
        try:
            size = pf.ops.size
        except (OSError, AttributeError):
            size = None
        rows.append({"token": token, "state": pf.state.label, "size": size, "restored": pf.restored})
    return rows


class Runtime:
    """Control plane of one emulator (a leaf beside the device, never on the ioctl path)."""

    def __init__(self, server: Any, device: LiveUpdateDevice, *, gid: int = 0):
        self.server = server
        self.device = device
        self.runs: set[Connection] = set()
        self.control = ControlServer(
            server.device_path,
            {"status": self._status, "kexec": self._kexec, "attach": self._attach, "kho": self._kho,
             "trace": self._trace, "inject": self._inject},
            gid=gid,
        )
        self.supervisors: list[Any] = []

    async def start(self) -> None:
        await self.control.start()
        self.server.add_cleanup(self.stop)

    async def stop(self) -> None:
        for sup in self.supervisors:
            sup.close()
        self.supervisors.clear()
        await self.control.stop()

    # -- status ----------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        d, core = self.device, self.device.core
        opener = None
        if d.opener is not None:
            try:
                opener = pidfd.tgid_of(d.opener_tid)
            except OSError:
                opener = d.opener_tid
        return {
            "device": self.server.device_path,
            "transport": self.server.transport_name,
            "abi": d.profile.NAME,
            "state": core.state.label,
            "update_count": core.update_count,
            "kho_finalized": core.kho_finalized,
            "opener_pid": opener,
            "outgoing": file_rows(core.outgoing),
            "incoming": file_rows(core.incoming),
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
        core = self.device.core
        result = {"ok": True, "live": live, "state": core.state.label, "update_count": core.update_count}
        for c in list(self.runs):
            c.send({"event": "kexec", **result})
        log.info("kexec: %s, state=%s, update_count=%d", "live update" if live else "plain kexec",
                 core.state.label, core.update_count)
        return result

    def _kexec(self, c: Connection, msg: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        return self.kexec()

    def _kho(self, c: Connection, msg: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        """Set the "KHO finalized" flag as the kernel's debugfs finalize would (to test EEXIST)."""
        self.device.core.kho_finalized = bool(msg.get("finalized", True))
        return {"ok": True, "kho_finalized": self.device.core.kho_finalized}

    # -- tracing and fault injection (cusedev.trace, cusedev.inject) ------------------------------
    def _trace(self, c: Connection, msg: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        from . import trace

        return trace.control(self.device, msg)

    def _inject(self, c: Connection, msg: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        from .inject import RuleError

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
        raise NotImplementedError


def format_status(st: dict[str, Any]) -> str:
    """The human form of ``Runtime.status()`` for `cusedev status`."""

    def files(rows: list[dict[str, Any]]) -> str:
        if not rows:
            return "none"
        return "\n" + "\n".join(
            f"  token {r['token']:<20} {r['state']:<9} {r['size'] if r['size'] is not None else '?':>12} bytes"
            + ("  restored" if r.get("restored") else "")
            for r in rows
        )

    lines = [
        f"device:       {st['device']} (transport {st['transport']}, abi {st['abi']}, pid {st['emulator_pid']})",
        f"state:        {st['state']}",
        f"update_count: {st['update_count']}",
        f"kho:          {'finalized' if st['kho_finalized'] else 'not finalized'}",
        f"opener:       {'pid ' + str(st['opener_pid']) if st['opener_pid'] else 'none'}",
        f"outgoing:     {files(st['outgoing'])}",
        f"incoming:     {files(st['incoming'])}",
    ]
    return "\n".join(lines)
