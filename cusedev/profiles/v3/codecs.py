"""v3's status, state-dir, sysfs and trace codecs: how the layers outside the profile show a v3 model."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import Any

from . import uapi
from .model import LiveUpdateCore, PreservedFile, State

_FD_PRESERVE: int = uapi.LIVEUPDATE_IOCTL_FD_PRESERVE
_PRESERVE_FD = uapi.ffi.offsetof("struct liveupdate_ioctl_fd_preserve", "fd")
_PRESERVE_TOKEN = uapi.ffi.offsetof("struct liveupdate_ioctl_fd_preserve", "token")


# -- status (`cusedev status`) ---------------------------------------------------------------------
def file_rows(files: Mapping[int, PreservedFile]) -> list[dict[str, Any]]:
    rows = []
    for token, pf in sorted(files.items()):
        try:
            size = getattr(pf.ops, "size", None)
        except OSError:
            size = None
        rows.append({"token": token, "state": pf.state.label, "size": size, "restored": pf.restored})
    return rows


def status(core: LiveUpdateCore) -> dict[str, Any]:
    """The model's part of ``cusedev status --json``."""
    return {
        "state": core.state.label,
        "update_count": core.update_count,
        "kho_finalized": core.kho_finalized,
        "outgoing": file_rows(core.outgoing),
        "incoming": file_rows(core.incoming),
    }


def format_status(st: Mapping[str, Any]) -> str:
    """``cusedev status`` for people: the model's part and the runtime's (device, transport, opener)."""

    def files(rows: list[dict[str, Any]]) -> str:
        if not rows:
            return "none"
        return "\n" + "\n".join(
            f"  token {r['token']:<#20x} {r['state']:<9} {r['size'] if r['size'] is not None else '?':>12} bytes"
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


# -- sysfs --------------------------------------------------------------------------------------------
def sysfs_attributes(core: LiveUpdateCore) -> dict[str, Callable[[], str]]:
    """``kernel/liveupdate/{state,update_count}``, as the v3 series shows them."""
    return {
        "kernel/liveupdate/state": lambda: core.state.label + "\n",
        "kernel/liveupdate/update_count": lambda: f"{core.update_count}\n",
    }


# -- state dir ----------------------------------------------------------------------------------------
def state_dir(path: str, core: LiveUpdateCore) -> Any:
    """The v3 ``--state-dir`` (``statedir.StateDir``), imported only when asked for."""
    from .statedir import StateDir

    return StateDir(path, core)


# -- replay and control ------------------------------------------------------------------------------
def replay(*args: Any, **kwargs: Any) -> int:
    """v3's replay rules (``replay.replay``), imported only when a trace is replayed."""
    from .replay import replay as run

    return run(*args, **kwargs)


def kho(device: Any, msg: dict[str, Any]) -> dict[str, Any]:
    """The ``kho`` control command: set the "KHO finalized" flag as the kernel's debugfs finalize
    would (to test PREPARE's EEXIST)."""
    core: LiveUpdateCore = device.core
    core.kho_finalized = bool(msg.get("finalized", True))
    return {"ok": True, "kho_finalized": core.kho_finalized}


# -- trace --------------------------------------------------------------------------------------------
class TraceRules:
    """Names and decoders of v3 calls for trace records and injection rules."""

    names: Mapping[int, str] = uapi.IOCTL_NAMES
    _enums: Mapping[str, Mapping[int, str]] = {"event": uapi.EVENT_NAMES, "state": uapi.STATE_CNAMES}
    _labels = {st: st.label for st in State}

    def parse_cmd(self, text: str) -> int | None:
        name = text.upper()
        if not name.startswith("LIVEUPDATE_IOCTL_"):
            name = "LIVEUPDATE_IOCTL_" + name
        for cmd, n in self.names.items():
            if n == name:
                return cmd
        return None

    def enums(self, field: str) -> Mapping[int, str] | None:
        return self._enums.get(field)

    def state_label(self, model: LiveUpdateCore) -> str:
        return self._labels[model.state]

    def label(self, state: Any) -> str:
        """A state value's label (the records keep the state seen before and after a call)."""
        return self._labels[state]

    def state_of(self, model: LiveUpdateCore) -> Any:
        return model.state

    def passed_fd(self, cmd: int, data: bytes) -> int | None:
        if cmd != _FD_PRESERVE or len(data) < _PRESERVE_FD + 4:
            return None
        return int.from_bytes(data[_PRESERVE_FD:_PRESERVE_FD + 4], sys.byteorder, signed=True)

    def preserved_fd(self, model: LiveUpdateCore, cmd: int, data: bytes) -> int | None:
        if cmd != _FD_PRESERVE or len(data) < _PRESERVE_TOKEN + 8:
            return None
        token = int.from_bytes(data[_PRESERVE_TOKEN:_PRESERVE_TOKEN + 8], sys.byteorder)
        pf = model.outgoing.get(token)
        fd = getattr(pf.ops, "fd", None) if pf is not None else None
        return fd if isinstance(fd, int) and fd >= 0 else None


TRACE = TraceRules()
