"""``--state-dir`` for the session profiles: carried sessions survive a crash or restart of the emulator.

What can survive is what no fd holds: the incoming sessions not yet
retrieved, with their files (bytes, size, offset, seals), and the counter.
Outgoing sessions, and retrieved ones, lived through session fds that died
with the emulator, so their release happened (torn down, or implicitly
finished), as the kernel's release would do.  After a live update the
carried files' bytes are copied to ``files/`` by a background thread (the
kexec itself stays flat in the preserved size); ``state.json`` is written
atomically on every change.  A state written by another profile is refused.
The machinery is ``control.statedir``'s; this module is the session codec.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from typing import Any

from ...control.statedir import StateDirBase, Unsaved
from .memfd import PreservedMemfd
from .model import File, Session, SessionModel

log = logging.getLogger(__name__)
FORMAT = 1


class SessionStateDir(StateDirBase):
    """Mirror of one session model in a directory; ``attach`` loads what is there, then follows changes."""

    def __init__(self, path: str, model: SessionModel):
        super().__init__(path, model.listeners)
        self.model = model

    def _carried(self) -> list[Session]:
        return [s for s in self.model.incoming.values() if not s.retrieved]

    def carried(self) -> Iterable[object]:
        return [f for s in self._carried() for f in s.files.values()]

    def unsaved(self) -> Iterable[Unsaved]:
        for s in self._carried():
            for f in s.files.values():
                if self.is_new(f) and isinstance(f.obj, PreservedMemfd):
                    yield f, f.token, f.obj.fd, None

    def document(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "abi": self.model.rules.name,
            "update_count": self.model.update_count,
            "outgoing": len(self.model.outgoing),
            "incoming": [
                {
                    "name": s.name.hex(),
                    "files": [
                        {"token": t, "pos": getattr(f.obj, "pos", 0), "seals": getattr(f.obj, "seals", 0),
                         "content": self.saved.get(id(f))}
                        for t, f in s.files.items()
                    ],
                }
                for s in self._carried()
            ],
        }  # fmt: skip

    def load(self) -> None:
        doc = self.read_document()
        if doc is None:
            return
        if doc.get("format") != FORMAT or doc.get("abi") != self.model.rules.name:
            raise ValueError(f"{self.path}: state of format {doc.get('format')!r}, abi {doc.get('abi')!r}: "
                             f"not loadable by profile {self.model.rules.name}")  # fmt: skip
        self.model.update_count = int(doc["update_count"])
        lost = 0
        for row in doc["incoming"]:
            s = Session(bytes.fromhex(row["name"]), incoming=True)
            for fr in row["files"]:
                if not fr.get("content"):
                    lost += 1
                    continue
                fd = self.restore_content(fr["content"], "", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
                f = File(fr["token"], PreservedMemfd.saved(fd, fr["pos"], fr["seals"]))
                s.files[f.token] = f
                self.saved[id(f)] = fr["content"]
            self.model.incoming[s.name] = s
        if doc.get("outgoing"):
            log.warning("%s: %d outgoing session(s) dropped: their fds died with the emulator",
                        self.path, doc["outgoing"])  # fmt: skip
        if lost:
            log.warning("%s: %d carried file(s) lost: the emulator stopped before their bytes were saved",
                        self.path, lost)  # fmt: skip


def state_dir(path: str, model: SessionModel) -> SessionStateDir:
    return SessionStateDir(path, model)
