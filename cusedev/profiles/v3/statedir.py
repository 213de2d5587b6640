"""``--state-dir``: the emulated machine's state survives a crash or restart of the emulator.

On every change the global state, KHO flag, counter and the token tables are
written atomically (temp file + rename) to ``state.json``.  After a live
update the incoming memfds' bytes are copied to ``files/`` by a background
thread, so the emulated kexec itself stays flat in the preserved size; a file
counts as saved only once its copy is complete.  On restart the incoming set
comes back restorable from those copies.  Outgoing files belonged to an
opener whose handle died with the emulator, so they are dropped, exactly as
close() would drop them; the global state is kept, as close() keeps it.
The machinery is ``control.statedir``'s; this module is the v3 codec.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from typing import Any

from ...control.statedir import StateDirBase, Unsaved
from ...device.memfd import ShmemFile
from .model import LiveUpdateCore, PreservedFile, State

log = logging.getLogger(__name__)
FORMAT = 1


class StateDir(StateDirBase):
    """Mirror of one core in a directory; ``attach`` loads what is there, then follows every change."""

    def __init__(self, path: str, core: LiveUpdateCore):
        super().__init__(path, core.listeners)
        self.core = core

    # -- writing ---------------------------------------------------------------------------------
    def _row(self, pf: PreservedFile) -> dict[str, Any]:
        ops = pf.ops
        return {
            "token": pf.token,
            "state": int(pf.state),
            "restored": pf.restored,
            "pos": getattr(ops, "pos", 0),
            "size": getattr(ops, "frozen_size", 0),
            "content": self.saved.get(id(pf)),
        }

    def carried(self) -> Iterable[object]:
        return self.core.incoming.values()

    def unsaved(self) -> Iterable[Unsaved]:
        for pf in self.core.incoming.values():
            if self.is_new(pf) and isinstance(pf.ops, ShmemFile):
                yield pf, pf.token, pf.ops.fd, pf.ops.frozen_size or pf.ops.size

    def document(self) -> dict[str, Any]:
        core = self.core
        return {
            "format": FORMAT,
            "state": int(core.state),
            "kho_finalized": core.kho_finalized,
            "update_count": core.update_count,
            "outgoing": sorted(core.outgoing),
            "incoming": [self._row(pf) for pf in core.incoming.values()],
        }

    # -- reading ---------------------------------------------------------------------------------
    def load(self) -> None:
        doc = self.read_document()
        if doc is None:
            return
        if doc.get("format") != FORMAT:
            raise ValueError(f"{self.path}: unknown state format {doc.get('format')!r}")
        core = self.core
        core.state = State(doc["state"])
        core.kho_finalized = bool(doc["kho_finalized"])
        core.update_count = int(doc["update_count"])
        lost = 0
        for row in doc["incoming"]:
            if not row.get("content"):
                lost += 1
                continue
            fd = self.restore_content(row["content"], f"luo:{row['token']:x}", os.MFD_CLOEXEC)
            ops = ShmemFile(fd)
            ops.pos, ops.frozen_size = row["pos"], row["size"]
            pf = PreservedFile(row["token"], ops, State(row["state"]), row["restored"])
            core.incoming[pf.token] = pf
            self.saved[id(pf)] = row["content"]
        if doc["outgoing"]:
            log.warning("%s: %d outgoing file(s) dropped: their opener's handle died with the emulator",
                        self.path, len(doc["outgoing"]))
        if lost:
            log.warning("%s: %d incoming file(s) lost: the emulator stopped before their bytes were saved",
                        self.path, lost)
