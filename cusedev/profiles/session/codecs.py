"""How the layers outside the profile show a session model: status, trace names and decoders, sysfs.

The session ABI has no global state and the kernel has no sysfs file for it,
so the sysfs tree holds no LUO attribute under these profiles; `cusedev
status` lists the sessions instead (kind, retrieved/finished, files by token).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

from . import uapi
from .model import Session, SessionModel

_PRESERVE_FD = uapi.ffi.offsetof(uapi.PRESERVE_FD.ctype, "fd")
_PRESERVE_TOKEN = uapi.ffi.offsetof(uapi.PRESERVE_FD.ctype, "token")


def _size(obj: Any) -> int | None:
    fd = getattr(obj, "fd", -1)
    try:
        return os.fstat(fd).st_size if isinstance(fd, int) and fd >= 0 else None
    except OSError:
        return None


def session_row(s: Session) -> dict[str, Any]:
    return {
        "name": s.name.decode("utf-8", "backslashreplace"),
        "kind": s.kind,
        "retrieved": s.retrieved,
        "finished": s.finished,
        "files": [{"token": t, "size": _size(f.obj), "retrieved": f.retrieved is not None} for t, f in s.files.items()],
    }


def status(model: SessionModel) -> dict[str, Any]:
    """The model's part of ``cusedev status --json``: no ``state`` key (the ABI has none)."""
    return {
        "update_count": model.update_count,
        "outgoing": [session_row(s) for s in model.outgoing.values()],
        "incoming": [session_row(s) for s in model.incoming.values()],
    }


def format_status(st: Mapping[str, Any]) -> str:
    def sessions(rows: list[dict[str, Any]]) -> list[str]:
        out = []
        for r in rows:
            flags = " ".join(f for f in ("retrieved", "finished") if r.get(f))
            out.append(f"  session {r['name']!r} ({r['kind']}{', ' + flags if flags else ''}): {len(r['files'])} files")
            for f in r["files"]:
                size = f["size"] if f["size"] is not None else "?"
                out.append(f"    token {f['token']:<20} {size:>12} bytes" + ("  retrieved" if f["retrieved"] else ""))
        return out or ["  none"]

    opener = st.get("opener_pid")
    return "\n".join(
        [
            f"device:       {st.get('device')} (transport {st.get('transport')}, abi {st.get('abi')}, "
            f"pid {st.get('emulator_pid')})",
            *([f"session node: {st['session_node']} (session fds; other opens: ENXIO)"]
              if st.get("session_node") else []),
            f"opener:       {'pid ' + str(opener) if opener else 'none'}",
            f"update_count: {st.get('update_count', 0)}",
            "outgoing sessions:",
            *sessions(st.get("outgoing", [])),
            "incoming sessions:",
            *sessions(st.get("incoming", [])),
        ]
    )


def sysfs_attributes(model: SessionModel) -> dict[str, Callable[[], str]]:
    """No attribute: the kernel exposes nothing of LUO in sysfs for the session ABI."""
    return {}


class TraceRules:
    """Names of session-ABI calls for trace records and injection rules (``preserve_fd:error=ENOSPC``)."""

    names: Mapping[int, str] = {c.cmd: c.name for c in uapi.BY_CMD.values()}
    _short: Mapping[str, int] = {c.key.upper(): c.cmd for c in uapi.BY_CMD.values()}

    def parse_cmd(self, text: str) -> int | None:
        name = text.upper()
        if name in self._short:
            return self._short[name]
        for cmd, n in self.names.items():
            if n == name:
                return cmd
        return None

    def enums(self, field: str) -> Mapping[int, str] | None:
        return None

    def state_label(self, model: Any) -> str:
        return f"sessions:{len(model.outgoing)}+{len(model.incoming)}"

    def label(self, state: Any) -> str:
        return str(state)

    def state_of(self, model: Any) -> Any:
        return self.state_label(model)

    def passed_fd(self, cmd: int, data: bytes) -> int | None:
        if cmd != uapi.PRESERVE_FD.cmd or len(data) < _PRESERVE_FD + 4:
            return None
        return int.from_bytes(data[_PRESERVE_FD : _PRESERVE_FD + 4], sys.byteorder, signed=True)

    def preserved_fd(self, model: Any, cmd: int, data: bytes) -> int | None:
        return None  # the preserved file is named by its session, which the record's open file carries


TRACE = TraceRules()
