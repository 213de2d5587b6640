"""The Live Update Orchestrator itself: global state machine and preserved-file registry.

Pure logic, as in the kernel's luo_core.c / luo_files.c: it knows nothing of
transports, struct bytes or fds.  A preserved file is reached only through a
``FileOps`` object (the kernel's ``liveupdate_file_ops``), so the core can be
driven by unit tests with fake files and by the device with real memfds.
Every error is an ``OSError`` carrying the errno the kernel returns.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Protocol


class State(IntEnum):
    """Global and per-file states (values are the v3 ``enum liveupdate_state``)."""

    UNDEFINED = 0
    NORMAL = 1
    PREPARED = 2
    FROZEN = 3
    UPDATED = 4

    @property
    def label(self) -> str:
        return self.name.lower()

    def __str__(self) -> str:
        """``print(dev.state)`` shows ``prepared``, not ``2`` (``int(state)`` is the number)."""
        return self.label

    def __format__(self, spec: str) -> str:
        """f"{state}" the name too; a numeric spec (``d``, ``x``, ...) formats the number."""
        return format(int(self), spec) if spec[-1:] in "bcdoxXn" and spec else format(self.label, spec)


class Event(IntEnum):
    """Global and per-file events (values are the v3 ``enum liveupdate_event``)."""

    PREPARE = 0
    FREEZE = 1
    FINISH = 2
    CANCEL = 3


def fail(code: int) -> OSError:
    return OSError(code, os.strerror(code))


class FileOps(Protocol):
    """What the core asks of a preserved file (the kernel's per-type handler)."""

    def prepare(self) -> None: ...
    def freeze(self) -> None: ...
    def cancel(self) -> None: ...
    def finish(self) -> None: ...
    def release(self) -> None: ...


@dataclass(slots=True, eq=False)
class PreservedFile:
    token: int
    ops: FileOps
    state: State = State.NORMAL
    restored: bool = False


class Fault(Protocol):
    """Hook for fault injection: may raise OSError before a named operation."""

    def __call__(self, point: str) -> None: ...


def _no_fault(point: str) -> None:
    return None


@dataclass(eq=False)
class LiveUpdateCore:
    """One machine's LUO: state, the KHO-finalized flag, outgoing and incoming files, the counter."""

    state: State = State.NORMAL
    kho_finalized: bool = False
    update_count: int = 0
    outgoing: dict[int, PreservedFile] = field(default_factory=dict)
    incoming: dict[int, PreservedFile] = field(default_factory=dict)
    listeners: list[Callable[[Any, Any], None]] = field(default_factory=list)
    fault: Callable[[str], None] = field(default=_no_fault)

    # -- change notification -------------------------------------------------------------------
    def _set_state(self, new: State) -> None:
        old, self.state = self.state, new
        self.changed(old)

    def changed(self, old: State | None = None) -> None:
        """Tell listeners (sysfs, persistence, trace) that something changed."""
        for cb in self.listeners:
            cb(self.state if old is None else old, self.state)

    # -- per-file registry ---------------------------------------------------------------------
    def preserve(self, token: int, probe: Callable[[], FileOps]) -> PreservedFile:
        """FD_PRESERVE after the fd was found: EBUSY, then ENOENT from ``probe``, then EEXIST."""
        if self.state not in (State.NORMAL, State.UPDATED):
            raise fail(errno.EBUSY)
        ops = probe()
        if token in self.outgoing:
            ops.release()
            raise fail(errno.EEXIST)
        pf = PreservedFile(token, ops)
        self.outgoing[token] = pf
        self.changed()
        return pf

    def unpreserve(self, token: int) -> None:
        if self.state not in (State.NORMAL, State.UPDATED):
            raise fail(errno.EBUSY)
        pf = self.outgoing.get(token)
        if pf is None:
            raise fail(errno.ENOENT)
        self._drop(pf)
        del self.outgoing[token]
        self.changed()

    def _drop(self, pf: PreservedFile) -> None:
        if pf.state in (State.PREPARED, State.FROZEN):
            pf.ops.cancel()
            pf.state = State.NORMAL
        pf.ops.release()

    def restore(self, token: int) -> PreservedFile:
        """The checks of FD_RESTORE; the caller installs the fd, then calls ``mark_restored``."""
        if self.state != State.UPDATED:
            raise fail(errno.EBUSY)
        pf = self.incoming.get(token)
        if pf is None:
            raise fail(errno.ENOENT)
        if pf.restored:
            raise fail(errno.EINVAL)
        return pf

    def mark_restored(self, pf: PreservedFile) -> None:
        pf.restored = True
        self.changed()

    def file_state(self, token: int, incoming: bool) -> State:
        pf = (self.incoming if incoming else self.outgoing).get(token)
        if pf is None:
            raise fail(errno.ENOENT)
        return pf.state

    def file_event(self, token: int, event: int) -> None:
        """SET_FD_EVENT: per-file transitions; only FINISH looks at the global state."""
        if event == Event.FINISH:
            if self.state != State.UPDATED:
                raise fail(errno.EBUSY)
            pf = self.incoming.get(token)
            if pf is None:
                raise fail(errno.ENOENT)
            if pf.state == State.UPDATED:
                pf.ops.finish()
                pf.state = State.NORMAL
                self.changed()
            return
        if event not in (Event.PREPARE, Event.FREEZE, Event.CANCEL):
            raise fail(errno.EINVAL)
        pf = self.outgoing.get(token)
        if pf is None:
            raise fail(errno.ENOENT)
        if event == Event.PREPARE and pf.state == State.NORMAL:
            pf.ops.prepare()
            pf.state = State.PREPARED
        elif event == Event.FREEZE and pf.state == State.PREPARED:
            pf.ops.freeze()
            pf.state = State.FROZEN
        elif event == Event.CANCEL and pf.state in (State.PREPARED, State.FROZEN):
            pf.ops.cancel()
            pf.state = State.NORMAL
        else:
            return
        self.changed()

    # -- global events -------------------------------------------------------------------------
    def event(self, event: int) -> None:
        """SET_EVENT."""
        if event == Event.PREPARE:
            self._prepare()
        elif event == Event.CANCEL:
            self._cancel()
        elif event == Event.FINISH:
            self._finish()
        else:
            raise fail(errno.EINVAL)

    def _prepare(self) -> None:
        if self.state != State.NORMAL:
            raise fail(errno.EINVAL)
        done: list[PreservedFile] = []
        try:
            self.fault("prepare")
            self._advance(State.NORMAL, "prepare", State.PREPARED, done)
        except OSError:
            self._cancel_files(done)
            raise
        self._set_state(State.PREPARED)
        if self.kho_finalized:
            raise fail(errno.EEXIST)  # kernel quirk: the state stays PREPARED
        self.kho_finalized = True

    def _advance(self, old: State, action: str, new: State, done: list[PreservedFile]) -> None:
        """Run ``action`` on every outgoing file in ``old``; each that succeeds is ``new`` and in ``done``."""
        for pf in self.outgoing.values():
            if pf.state == old:
                getattr(pf.ops, action)()
                pf.state = new
                done.append(pf)

    def _cancel_files(self, files: Iterable[PreservedFile]) -> None:
        for pf in files:
            if pf.state in (State.PREPARED, State.FROZEN):
                pf.ops.cancel()
                pf.state = State.NORMAL

    def _cancel(self) -> None:
        if not self.kho_finalized:
            raise fail(errno.ENOENT)
        self.kho_finalized = False
        if self.state not in (State.PREPARED, State.FROZEN):
            raise fail(errno.EINVAL)
        self._cancel_files(self.outgoing.values())
        self._set_state(State.NORMAL)

    def _finish(self) -> None:
        if self.state != State.UPDATED:
            raise fail(errno.EINVAL)
        for pf in self.incoming.values():
            if pf.state == State.UPDATED:
                pf.ops.finish()
            pf.state = State.NORMAL
            pf.ops.release()
        self.incoming.clear()
        self._set_state(State.NORMAL)

    # -- the opener went away ------------------------------------------------------------------
    def drop_outgoing(self) -> None:
        """close() of the device: every outgoing file is unpreserved; the global state stays."""
        if not self.outgoing:
            return
        for pf in self.outgoing.values():
            self._drop(pf)
        self.outgoing.clear()
        self.changed()

    # -- reboot(LINUX_REBOOT_CMD_KEXEC) and the next boot ---------------------------------------
    def kexec(self) -> bool:
        """Freeze and "reboot"; returns True for a live update, False for a plain kexec.

        A failed freeze puts every file back to NORMAL, the state to NORMAL (KHO
        aborted, as CANCEL does) and raises; nothing is carried or lost then.
        """
        if self.state != State.PREPARED:
            self._boot(carry=[], live=False)
            return False
        try:
            self.fault("kexec")
            self._advance(State.PREPARED, "freeze", State.FROZEN, [])
        except OSError:
            self._cancel_files(self.outgoing.values())
            self.kho_finalized = False
            self._set_state(State.NORMAL)
            raise
        carry = [pf for pf in self.outgoing.values() if pf.state == State.FROZEN]
        self._boot(carry, live=True)
        return True

    def _boot(self, carry: list[PreservedFile], live: bool) -> None:
        carried = {id(pf) for pf in carry}
        for pf in [*self.outgoing.values(), *self.incoming.values()]:
            if id(pf) not in carried:
                pf.ops.release()
        self.outgoing = {}
        self.incoming = {}
        for pf in carry:
            pf.state = State.UPDATED
            pf.restored = False
            self.incoming[pf.token] = pf
        self.kho_finalized = False
        self.update_count = self.update_count + 1 if live else 0
        self._set_state(State.UPDATED if live else State.NORMAL)
