"""The session ABI's LUO as pure logic: sessions, their files, the profile's rules, kexec.

What the kernel's luo_session.c and luo_file.c decide (spec luo-session.md
sections 4, 5, 7, 8, 11, 12), with no fds, struct bytes or transports: a
preserved file is reached only through :class:`PreservedObject`, so unit tests
drive the model with fakes and the device with real memfds.  The checks that
need the caller (EMFILE, EBADF, ENOENT for an unsupported file) are callbacks
run at the kernel's point in the order.  Every error is an ``OSError`` with
the kernel's errno.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

NAME_LENGTH = 64


def fail(code: int) -> OSError:
    return OSError(code, os.strerror(code))


@dataclass(frozen=True)
class Rules:
    """Where 6.19 and 7.2 differ (spec section 12); everything else is common."""

    name: str
    get_name: bool  # GET_NAME exists (session-fd table has 4 rows, else 3)
    check_name: bool  # CREATE: empty or unterminated name -> EINVAL (else strscpy cuts it)
    kind_check: bool  # PRESERVE_FD only outgoing, RETRIEVE_FD/FINISH only incoming -> EINVAL
    finish_reserved: bool  # FINISH with reserved != 0 -> EINVAL
    busy_by_object: bool  # one underlying object preserved once, globally -> EBUSY
    sticky_retrieve: bool  # a failed RETRIEVE_FD gives the same errno for good
    keep_seals: bool  # memfd seals carried (memfd-v2)
    max_sessions: int
    sessions_errno: int  # the errno at the session cap
    max_files: int  # per session; ENOSPC beyond
    compatible: str  # the memfd handler's compatible string (state-dir format)

    @property
    def session_commands(self) -> int:
        """N of the session-fd nr range check (0x40 .. 0x40+N-1)."""
        return 4 if self.get_name else 3


RULES_6_19 = Rules(
    name="6.19", get_name=False, check_name=False, kind_check=False, finish_reserved=False,
    busy_by_object=False, sticky_retrieve=False, keep_seals=False,
    max_sessions=819, sessions_errno=errno.ENOMEM, max_files=128, compatible="memfd-v1",
)  # fmt: skip
RULES_7_2 = Rules(
    name="7.2", get_name=True, check_name=True, kind_check=True, finish_reserved=True,
    busy_by_object=True, sticky_retrieve=True, keep_seals=True,
    max_sessions=510_000, sessions_errno=errno.ENOSPC, max_files=630_000, compatible="memfd-v2",
)  # fmt: skip
RULES: dict[str, Rules] = {r.name: r for r in (RULES_6_19, RULES_7_2)}


class PreservedObject(Protocol):
    """A file LUO holds for a session (the kernel's liveupdate_file_handler for one file)."""

    @property
    def key(self) -> Hashable:
        """Identity of the underlying object (a memfd's inode): the 7.2 EBUSY rule is keyed by it."""

    def freeze(self) -> None:
        """At kexec: record what is read then (a memfd's file offset)."""

    def release(self) -> None:
        """Unpreserve or discard: drop LUO's reference (idempotent)."""


class Retrieved(Protocol):
    """What a successful RETRIEVE_FD produced (an open file); LUO keeps it until FINISH or close."""

    def release(self) -> None:
        """LUO drops its reference (idempotent); the caller's fds keep the file."""


@dataclass(eq=False, slots=True)
class File:
    """One preserved file of a session, by token."""

    token: int
    obj: PreservedObject
    retrieved: Retrieved | None = None
    retrieve_errno: int = 0  # 7.2: the first failure, returned for good


@dataclass(eq=False)
class Session:
    """One LUO session: outgoing (created in this boot) or incoming (carried from the last)."""

    name: bytes  # without the NUL, at most 63 bytes
    incoming: bool
    files: dict[int, File] = field(default_factory=dict)  # token -> file, in preservation order
    retrieved: bool = False  # incoming: a RETRIEVE_SESSION gave an fd
    finished: bool = False
    gone: bool = False  # released, dropped or carried away by a kexec: its fd has no effect

    @property
    def kind(self) -> str:
        return "incoming" if self.incoming else "outgoing"


def stored_name(raw: bytes) -> bytes:
    """strscpy(dst, raw, 64): up to the first NUL, at most 63 bytes."""
    return raw[:NAME_LENGTH].split(b"\0", 1)[0][: NAME_LENGTH - 1]


def lookup_name(raw: bytes) -> bytes | None:
    """strncmp(stored, raw, 64) against NUL-terminated stored names: a raw name without NUL never matches."""
    raw = raw[:NAME_LENGTH]
    nul = raw.find(b"\0")
    return None if nul < 0 else raw[:nul]


def _no_fault(point: str) -> None:
    return None


def _no_prepare(objs: list[Any], keep_seals: bool) -> None:
    return None


@dataclass(eq=False)
class SessionModel:
    """One machine's LUO under a session profile."""

    rules: Rules = RULES_7_2
    outgoing: dict[bytes, Session] = field(default_factory=dict)  # creation order
    incoming: dict[bytes, Session] = field(default_factory=dict)
    #: 7.2's global luo_preserved_files: object key -> file (preserved or retrieved-not-finished)
    objects: dict[Hashable, File] = field(default_factory=dict)
    update_count: int = 0
    #: fault injection: may raise OSError (ENOMEM) at "session_alloc", "file_preserve", "file_restore"
    fault: Callable[[str], None] = _no_fault
    #: told ``(None, None)`` after every change (the session ABI has no global state to pass)
    listeners: list[Callable[[Any, Any], None]] = field(default_factory=list)
    #: after a kexec, given every carried object and whether seals are kept: may build what RETRIEVE_FD
    #: will return ahead of it (``memfd.prepare_ahead``); the bare model does nothing
    prepare: Callable[[list[Any], bool], None] = _no_prepare

    def changed(self) -> None:
        for cb in self.listeners:
            cb(None, None)

    # -- /dev/liveupdate -------------------------------------------------------------------------
    def check_create(self, raw: bytes) -> bytes:
        """CREATE_SESSION's checks after the fd reservation; returns the name to store."""
        raw = raw[:NAME_LENGTH]
        if self.rules.check_name:
            n = raw.find(b"\0")
            if n == 0 or n < 0:  # strnlen == 0, or 64 (no NUL in the buffer)
                raise fail(errno.EINVAL)
        name = stored_name(raw)
        self.fault("session_alloc")
        if len(self.outgoing) + 1 > self.rules.max_sessions:
            raise fail(self.rules.sessions_errno)
        if name in self.outgoing:
            raise fail(errno.EEXIST)
        return name

    def create(self, raw: bytes, checked: bytes | None = None) -> Session:
        """CREATE_SESSION: a new outgoing session with no files (``checked``: what ``check_create(raw)``
        returned for this very call, when the caller ran the checks first)."""
        name = self.check_create(raw) if checked is None else checked
        s = self.outgoing[name] = Session(name, incoming=False)
        self.changed()
        return s

    def find_incoming(self, raw: bytes) -> Session:
        """RETRIEVE_SESSION's checks: ENOENT (no such incoming session), EINVAL (already retrieved)."""
        name = lookup_name(raw)
        s = self.incoming.get(name) if name is not None else None
        if s is None:
            raise fail(errno.ENOENT)
        if s.retrieved:
            raise fail(errno.EINVAL)
        return s

    def retrieve(self, raw: bytes, found: Session | None = None) -> Session:
        """RETRIEVE_SESSION (``found``: what ``find_incoming(raw)`` returned for this very call)."""
        s = self.find_incoming(raw) if found is None else found
        s.retrieved = True
        self.changed()
        return s

    # -- a session fd ----------------------------------------------------------------------------
    def preserve(self, s: Session, token: int, take: Callable[[], PreservedObject]) -> File:
        """PRESERVE_FD: EEXIST, ENOSPC, then ``take`` (EBADF, ENOENT), then 7.2's EBUSY."""
        if s.gone:
            raise fail(errno.EBADF)
        if token in s.files:
            raise fail(errno.EEXIST)
        if len(s.files) + 1 > self.rules.max_files:
            raise fail(errno.ENOSPC)
        obj = take()
        try:
            if self.rules.busy_by_object and obj.key in self.objects:
                raise fail(errno.EBUSY)
            self.fault("file_preserve")
        except OSError:
            obj.release()
            raise
        f = s.files[token] = File(token, obj)
        if self.rules.busy_by_object:
            self.objects[obj.key] = f
        self.changed()
        return f

    def find_file(self, s: Session, token: int) -> File:
        """RETRIEVE_FD's lookup (after the fd reservation): ENOENT; 7.2's sticky errno."""
        if not s.incoming:  # 6.19 only (7.2 refused the kind): choice, nothing to retrieve
            raise fail(errno.ENOENT)
        f = s.files.get(token)
        if f is None:
            raise fail(errno.ENOENT)
        if f.retrieve_errno:
            raise fail(f.retrieve_errno)
        return f

    def retrieve_fd(self, s: Session, token: int, rebuild: Callable[[PreservedObject], Retrieved]) -> Retrieved:
        """RETRIEVE_FD: the first call rebuilds the file, later ones return the same open file."""
        f = self.find_file(s, token)
        if f.retrieved is not None:
            return f.retrieved
        try:
            self.fault("file_restore")
            f.retrieved = rebuild(f.obj)
        except OSError as e:
            if self.rules.sticky_retrieve:
                f.retrieve_errno = e.errno or errno.EIO
                f.obj.release()  # the failed restore already gave the pages back
            raise
        if self.rules.busy_by_object:
            self.objects[f.obj.key] = f
        self.changed()
        return f.retrieved

    def unretrieve(self, s: Session, token: int) -> None:
        """Undo a first RETRIEVE_FD whose fd could not be installed (EMFILE: the kernel takes the fd
        number before it retrieves anything, so for it nothing happened)."""
        f = s.files.get(token)
        if f is None or f.retrieved is None:
            return
        if self.objects.get(f.obj.key) is f:
            del self.objects[f.obj.key]
        f.retrieved.release()
        f.retrieved = None
        self.changed()

    def finish(self, s: Session, reserved: int = 0, explicit: bool = True) -> None:
        """FINISH (explicit) or the implicit one of closing a retrieved session."""
        if explicit and self.rules.finish_reserved and reserved != 0:
            raise fail(errno.EINVAL)
        if not s.incoming:  # 6.19 only: choice, 0 with no effect
            return
        self._drop_files(s)
        s.finished = True
        self.changed()

    def get_name(self, s: Session) -> bytes:
        return s.name

    def release(self, s: Session) -> None:
        """The last reference of a session fd is gone (luo_session_release)."""
        if s.gone:
            return
        s.gone = True
        if s.incoming:
            self.finish(s, explicit=False)
            self.incoming.pop(s.name, None)
        else:
            self._drop_files(s)
            self.outgoing.pop(s.name, None)
        self.changed()

    def _drop_files(self, s: Session) -> None:
        """Unpreserve (outgoing) or finish (incoming) every file, newest first."""
        for f in reversed(list(s.files.values())):
            if self.objects.get(f.obj.key) is f:
                del self.objects[f.obj.key]
            if f.retrieved is not None:
                f.retrieved.release()
            f.obj.release()
        s.files.clear()

    # -- reboot(LINUX_REBOOT_CMD_KEXEC) ----------------------------------------------------------
    def serialize(self) -> list[Session]:
        """luo_session_serialize: freeze every file of every outgoing session (records offsets)."""
        carried = list(self.outgoing.values())
        for s in carried:
            for f in s.files.values():
                f.obj.freeze()
        return carried

    def kexec(self) -> bool:
        """The live update: carry the outgoing sessions not yet released, drop everything else.

        The old ``Session`` objects are marked gone *before* anything is
        released, so the close of a session fd that a reboot kills afterwards
        has no effect; the carried ones become new incoming sessions.
        """
        carried = self.serialize()
        for s in carried:
            s.gone = True
        for s in self.incoming.values():
            s.gone = True
            for f in s.files.values():
                if f.retrieved is not None:
                    f.retrieved.release()
                f.obj.release()
            s.files.clear()
        self.incoming = {}
        for old in carried:
            new = Session(old.name, incoming=True)
            new.files = {t: File(t, f.obj) for t, f in old.files.items()}
            self.incoming[old.name] = new
        self.outgoing = {}
        self.objects = {}
        self.update_count += 1
        self.changed()
        self.prepare([f.obj for s in self.incoming.values() for f in s.files.values()], self.rules.keep_seals)
        return True  # every kexec of a live-update kernel is a live update (spec 8)

    # -- views -----------------------------------------------------------------------------------
    def sessions(self) -> Iterator[Session]:
        yield from self.outgoing.values()
        yield from self.incoming.values()
