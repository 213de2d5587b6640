"""``--state-dir``: the emulated machine's state survives a crash or restart of the emulator.

On every change the global state, KHO flag, counter and the token tables are
written atomically (temp file + rename) to ``state.json``.  After a live
update the incoming memfds' bytes are copied to ``files/`` by a background
thread, so the emulated kexec itself stays flat in the preserved size; a file
counts as saved only once its copy is complete.  On restart the incoming set
comes back restorable from those copies.  Outgoing files belonged to an
opener whose handle died with the emulator, so they are dropped, exactly as
close() would drop them; the global state is kept, as close() keeps it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
from typing import Any

from ...device.memfd import ShmemFile
from .model import LiveUpdateCore, PreservedFile, State

log = logging.getLogger(__name__)
FORMAT = 1


def _copy(src: int, dst: int, size: int) -> None:
    off = 0
    while off < size:
        n = os.sendfile(dst, src, off, min(size - off, 1 << 30))
        if n == 0:
            break
        off += n


class StateDir:
    """Mirror of one core in a directory; ``attach`` loads what is there, then follows every change."""

    def __init__(self, path: str, core: LiveUpdateCore):
        self.path = os.path.abspath(path)
        self.files_dir = os.path.join(self.path, "files")
        self.core = core
        self.saved: dict[int, str] = {}  # id(PreservedFile) -> content file name, once complete
        self.pending: set[int] = set()
        self.lock = threading.Lock()
        self.loop: asyncio.AbstractEventLoop | None = None

    def attach(self) -> None:
        os.makedirs(self.files_dir, mode=0o700, exist_ok=True)
        with contextlib.suppress(RuntimeError):
            self.loop = asyncio.get_running_loop()
        self.load()
        self.core.listeners.append(lambda old, new: self.save())
        self.save()

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

    def save(self) -> None:
        core = self.core
        for pf in core.incoming.values():
            if id(pf) not in self.saved and id(pf) not in self.pending and isinstance(pf.ops, ShmemFile):
                self._save_content(pf)
        doc = {
            "format": FORMAT,
            "state": int(core.state),
            "kho_finalized": core.kho_finalized,
            "update_count": core.update_count,
            "outgoing": sorted(core.outgoing),
            "incoming": [self._row(pf) for pf in core.incoming.values()],
        }
        with self.lock:
            tmp = os.path.join(self.path, ".state.json.tmp")
            with open(tmp, "w") as f:
                json.dump(doc, f)
            os.replace(tmp, os.path.join(self.path, "state.json"))
            self._prune()

    def _prune(self) -> None:
        keep = {self.saved.get(id(pf)) for pf in self.core.incoming.values()}
        for name in os.listdir(self.files_dir):
            if name not in keep and not name.endswith(".tmp"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.files_dir, name))

    def _save_content(self, pf: PreservedFile) -> None:
        """Copy the bytes in the background from a private dup (the core may release its fd meanwhile)."""
        assert isinstance(pf.ops, ShmemFile)
        src = os.dup(pf.ops.fd)
        size = pf.ops.frozen_size or pf.ops.size
        name = f"{pf.token:016x}-{id(pf):x}.bin"
        self.pending.add(id(pf))

        def work() -> None:
            tmp = os.path.join(self.files_dir, name + ".tmp")
            try:
                dst = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
                try:
                    _copy(src, dst, size)
                finally:
                    os.close(dst)
                with self.lock:
                    os.replace(tmp, os.path.join(self.files_dir, name))
                    self.saved[id(pf)] = name
                    self.pending.discard(id(pf))
            except OSError:
                log.exception("saving preserved file %#x to %s failed", pf.token, self.path)
                return
            finally:
                os.close(src)
            if self.loop is not None:
                self.loop.call_soon_threadsafe(self.save)

        threading.Thread(target=work, name=f"statedir-{pf.token:x}", daemon=True).start()

    def flush(self, timeout: float = 60.0) -> None:
        """Wait for background copies (tests, and a clean shutdown)."""
        for t in threading.enumerate():
            if t.name.startswith("statedir-"):
                t.join(timeout)

    # -- reading ---------------------------------------------------------------------------------
    def load(self) -> None:
        try:
            with open(os.path.join(self.path, "state.json")) as f:
                doc = json.load(f)
        except FileNotFoundError:
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
            fd = os.memfd_create(f"luo:{row['token']:x}", os.MFD_CLOEXEC)
            src = os.open(os.path.join(self.files_dir, row["content"]), os.O_RDONLY | os.O_CLOEXEC)
            try:
                _copy(src, fd, os.fstat(src).st_size)
            finally:
                os.close(src)
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
