"""The machinery every profile's ``--state-dir`` shares; each profile keeps only its codec.

A state dir mirrors a model in a directory: ``attach`` loads what is there,
then follows every change.  On each change ``state.json`` is written
atomically (temp file + rename) from the profile's document; the bytes of
each carried memfd are copied to ``files/`` by a background thread (so the
emulated kexec stays flat in the preserved size) and count as saved only once
the copy is complete.  Content files no carried file refers to are pruned.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
from collections.abc import Callable, Iterable
from typing import Any

log = logging.getLogger(__name__)

#: A carried file whose bytes are still to be copied: (key object, token, memfd, size or None = the fd's size).
Unsaved = tuple[object, int, int, "int | None"]


def copy_fd(src: int, dst: int, size: int) -> None:
    """Copy ``size`` bytes from the start of ``src`` to ``dst`` in the kernel (sendfile)."""
    off = 0
    while off < size:
        n = os.sendfile(dst, src, off, min(size - off, 1 << 30))
        if n == 0:
            break
        off += n


class StateDirBase:
    """Directory mirror of one model; a profile supplies ``load``, ``document``, ``unsaved`` and ``carried``."""

    def __init__(self, path: str, listeners: list[Callable[[Any, Any], None]]):
        self.path = os.path.abspath(path)
        self.files_dir = os.path.join(self.path, "files")
        self._listeners = listeners
        self.saved: dict[int, str] = {}  # id(carried file) -> content file name, once complete
        self.pending: set[int] = set()
        self.lock = threading.Lock()
        self.loop: asyncio.AbstractEventLoop | None = None

    # -- the profile's codec ---------------------------------------------------------------------
    def load(self) -> None:
        raise NotImplementedError

    def document(self) -> dict[str, Any]:
        """What ``state.json`` holds now."""
        raise NotImplementedError

    def unsaved(self) -> Iterable[Unsaved]:
        """Carried memfds whose bytes are neither saved nor being copied (see ``is_new``)."""
        raise NotImplementedError

    def carried(self) -> Iterable[object]:
        """Every carried file now, whose content files are kept."""
        raise NotImplementedError

    # -- shared machinery ------------------------------------------------------------------------
    def attach(self) -> None:
        os.makedirs(self.files_dir, mode=0o700, exist_ok=True)
        with contextlib.suppress(RuntimeError):
            self.loop = asyncio.get_running_loop()
        self.load()
        self._listeners.append(lambda old, new: self.save())
        self.save()

    def is_new(self, key: object) -> bool:
        return id(key) not in self.saved and id(key) not in self.pending

    def save(self) -> None:
        for key, token, fd, size in list(self.unsaved()):
            self._save_content(key, token, fd, size)
        doc = self.document()
        with self.lock:
            tmp = os.path.join(self.path, ".state.json.tmp")
            with open(tmp, "w") as fh:
                json.dump(doc, fh)
            os.replace(tmp, os.path.join(self.path, "state.json"))
            self._prune()

    def read_document(self) -> dict[str, Any] | None:
        """``state.json`` as saved, or None when there is none yet."""
        try:
            with open(os.path.join(self.path, "state.json")) as fh:
                doc: dict[str, Any] = json.load(fh)
        except FileNotFoundError:
            return None
        return doc

    def restore_content(self, content: str, name: str, flags: int) -> int:
        """A new memfd holding the saved bytes of ``files/<content>``."""
        fd = os.memfd_create(name, flags)
        src = os.open(os.path.join(self.files_dir, content), os.O_RDONLY | os.O_CLOEXEC)
        try:
            copy_fd(src, fd, os.fstat(src).st_size)
        finally:
            os.close(src)
        return fd

    def _prune(self) -> None:
        keep = {self.saved.get(id(key)) for key in self.carried()}
        for name in os.listdir(self.files_dir):
            if name not in keep and not name.endswith(".tmp"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.files_dir, name))

    def _save_content(self, key: object, token: int, fd: int, size: int | None) -> None:
        """Copy the bytes in the background from a private dup (the model may release its fd meanwhile)."""
        src = os.dup(fd)
        name = f"{token:016x}-{id(key):x}.bin"
        self.pending.add(id(key))

        def work() -> None:
            tmp = os.path.join(self.files_dir, name + ".tmp")
            try:
                dst = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
                try:
                    copy_fd(src, dst, os.fstat(src).st_size if size is None else size)
                finally:
                    os.close(dst)
                with self.lock:
                    os.replace(tmp, os.path.join(self.files_dir, name))
                    self.saved[id(key)] = name
                    self.pending.discard(id(key))
            except OSError:
                log.exception("saving preserved file %#x to %s failed", token, self.path)
                return
            finally:
                os.close(src)
            if self.loop is not None:
                self.loop.call_soon_threadsafe(self.save)

        threading.Thread(target=work, name=f"statedir-{token:x}", daemon=True).start()

    def flush(self, timeout: float = 60.0) -> None:
        """Wait for background copies (tests, and a clean shutdown)."""
        for t in threading.enumerate():
            if t.name.startswith("statedir-"):
                t.join(timeout)
