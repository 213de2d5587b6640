"""``--state-dir`` for the session profiles: carried sessions survive a crash or restart of the emulator.

What can survive is what no fd holds: the incoming sessions not yet
retrieved, with their files (bytes, size, offset, seals), and the counter.
Outgoing sessions, and retrieved ones, lived through session fds that died
with the emulator, so their release happened (torn down, or implicitly
finished), as the kernel's release would do.  After a live update the
carried files' bytes are copied to ``files/`` by a background thread (the
kexec itself stays flat in the preserved size); ``state.json`` is written
atomically on every change.  A state written by another profile is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
from typing import Any

from .memfd import PreservedMemfd
from .model import File, Session, SessionModel

log = logging.getLogger(__name__)
FORMAT = 1


def _copy(src: int, dst: int, size: int) -> None:
    off = 0
    while off < size:
        n = os.sendfile(dst, src, off, min(size - off, 1 << 30))
        if n == 0:
            break
        off += n


class SessionStateDir:
    """Mirror of one session model in a directory; ``attach`` loads what is there, then follows changes."""

    def __init__(self, path: str, model: SessionModel):
        self.path = os.path.abspath(path)
        self.files_dir = os.path.join(self.path, "files")
        self.model = model
        self.saved: dict[int, str] = {}  # id(File) -> content file name, once complete
        self.pending: set[int] = set()
        self.lock = threading.Lock()
        self.loop: asyncio.AbstractEventLoop | None = None

    def attach(self) -> None:
        os.makedirs(self.files_dir, mode=0o700, exist_ok=True)
        with contextlib.suppress(RuntimeError):
            self.loop = asyncio.get_running_loop()
        self.load()
        self.model.listeners.append(lambda old, new: self.save())
        self.save()

    def _carried(self) -> list[Session]:
        return [s for s in self.model.incoming.values() if not s.retrieved]

    def save(self) -> None:
        sessions = self._carried()
        for s in sessions:
            for f in s.files.values():
                if id(f) not in self.saved and id(f) not in self.pending and isinstance(f.obj, PreservedMemfd):
                    self._save_content(f)
        doc = {
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
                for s in sessions
            ],
        }  # fmt: skip
        with self.lock:
            tmp = os.path.join(self.path, ".state.json.tmp")
            with open(tmp, "w") as fh:
                json.dump(doc, fh)
            os.replace(tmp, os.path.join(self.path, "state.json"))
            keep = {self.saved.get(id(f)) for s in sessions for f in s.files.values()}
            for name in os.listdir(self.files_dir):
                if name not in keep and not name.endswith(".tmp"):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(os.path.join(self.files_dir, name))

    def _save_content(self, f: File) -> None:
        """Copy the bytes in the background from a private dup (the model may release its fd meanwhile)."""
        assert isinstance(f.obj, PreservedMemfd)
        src = os.dup(f.obj.fd)
        name = f"{f.token:016x}-{id(f):x}.bin"
        self.pending.add(id(f))

        def work() -> None:
            tmp = os.path.join(self.files_dir, name + ".tmp")
            try:
                dst = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
                try:
                    _copy(src, dst, os.fstat(src).st_size)
                finally:
                    os.close(dst)
                with self.lock:
                    os.replace(tmp, os.path.join(self.files_dir, name))
                    self.saved[id(f)] = name
                    self.pending.discard(id(f))
            except OSError:
                log.exception("saving preserved file %#x to %s failed", f.token, self.path)
                return
            finally:
                os.close(src)
            if self.loop is not None:
                self.loop.call_soon_threadsafe(self.save)

        threading.Thread(target=work, name=f"statedir-{f.token:x}", daemon=True).start()

    def flush(self, timeout: float = 60.0) -> None:
        """Wait for background copies (tests, and a clean shutdown)."""
        for t in threading.enumerate():
            if t.name.startswith("statedir-"):
                t.join(timeout)

    def load(self) -> None:
        try:
            with open(os.path.join(self.path, "state.json")) as fh:
                doc: dict[str, Any] = json.load(fh)
        except FileNotFoundError:
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
                fd = os.memfd_create("", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
                src = os.open(os.path.join(self.files_dir, fr["content"]), os.O_RDONLY | os.O_CLOEXEC)
                try:
                    _copy(src, fd, os.fstat(src).st_size)
                finally:
                    os.close(src)
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
