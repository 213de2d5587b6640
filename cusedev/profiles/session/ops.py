"""The session ABI's ioctl tables and handlers (spec luo-session.md sections 3-5).

Two kinds of open file: the device (``CREATE_SESSION``, ``RETRIEVE_SESSION``;
base 0) and a session fd (base 0x40: ``PRESERVE_FD``, ``RETRIEVE_FD``,
``FINISH``, and ``GET_NAME`` on 7.2), each a table of ``Op`` rows built from
``cdefs/luo_session.h``.  Handlers run the kernel's checks in its order
against the pure model; the three fd-returning commands answer EMFILE before
anything else when the caller's fd table is full (``_installer``), make every
check, and only then need `cusedev run` (or fail with EOPNOTSUPP).  A new
session fd is an open file of the emulator's own node, of kind ``"session"``,
bound to its LUO session.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from ...device.dispatch import Op, make_op
from ...libc import fail
from . import uapi
from .memfd import PreservedMemfd
from .model import Rules, Session, SessionModel

Out = Mapping[str, Any] | None


def _row(c: uapi.Command, handler: Callable[..., Any], outputs: tuple[str, ...] = ()) -> Op:
    last = c.fields[-1]  # min_size == sizeof for every session command: the last field is required
    op = make_op(uapi.IOCTL_TYPE, c.nr, c.name, c.ctype, last, handler, outputs, ffi=uapi.ffi)
    assert (op.cmd, op.size, op.min_size) == (c.cmd, c.size, c.min_size), c
    return op


def _model(file: Any) -> SessionModel:
    m: SessionModel = file.model
    return m


def _session(file: Any) -> Session:
    s: Session = file.bound
    if s.gone:  # its machine was rebooted under it (kexec): the file is revoked
        raise fail(errno.ENODEV)
    return s


def _installer(file: Any, caller: Any) -> Any:
    """Step 1 of every fd-returning command, the kernel's ``get_unused_fd_flags``: the installer of the
    call (None outside `cusedev run`).

    The kernel takes the caller's fd number before any check, so a full fd table answers EMFILE
    whatever else is wrong.  Checking that up front costs every call a ``prlimit`` and a /proc lookup
    (``FdInstaller.reserve``), and the install itself fails with EMFILE on a full table anyway; so
    the check runs only when a call fails before its fd is installed (``_emfile_first``), where it
    decides between EMFILE and the call's own error, and an EMFILE of the install undoes what the
    call did.  With an interceptor in the chain (fault injection, tracing) the check stays first: an
    injected fault point must not fire, nor be counted, in a call the kernel would refuse earlier."""
    inst = file.device.installer_for(caller)
    if inst is not None and file.device.chain:
        inst.reserve(caller)
    return inst


def _emfile_first(inst: Any, caller: Any) -> None:
    """A call failed before its fd was installed: EMFILE instead when the caller's table is full."""
    if inst is not None:
        inst.reserve(caller)


def _need_run(file: Any, inst: Any, what: str) -> Any:
    """After every check: an fd can only be installed under `cusedev run`."""
    if inst is None:
        file.device.warn_no_installer(what)
        raise fail(errno.EOPNOTSUPP)
    return inst


#: the first two words of every fd-returning struct: ``__u32 size; __s32 fd``
_HEAD = struct.Struct("=Ii")


def _install(file: Any, caller: Any, inst: Any, fd: int, size: int, old_fd: int) -> int:
    """Install ``fd`` in the caller only if its struct can take the write-back.

    The kernel copies the struct out before it installs the fd and drops the fd
    when that faults (spec 3, write-back): a read-only struct gets EFAULT and no
    descriptor.  ADDFD cannot be taken back, so the caller's size and fd words
    are rewritten with their own bytes first (``size``, ``old_fd``: as read for
    this call, so one write and no read); a fault there raises EFAULT here (or
    EMFILE, which the kernel would have found first), and the callers' error
    paths undo the rest as the kernel's do.
    """
    try:
        for t in getattr(file.device, "trapped", {}).values():
            if t.caller is caller:
                t.memory.write(t.arg, _HEAD.pack(size, old_fd))
                break
    except OSError:
        _emfile_first(inst, caller)
        raise
    return int(inst.install(caller, fd))


async def _hand_out(file: Any, caller: Any, inst: Any, s: Session, undo: Callable[[], None],
                    v: tuple) -> Out:
    """Open our own node as a session file bound to ``s``, install it in the caller, close our copy.

    Our copy is closed by the device's ``close_own``, which never blocks the loop: if it is the last
    reference (the caller died, or the install failed), the close waits for the kernel's RELEASE,
    which on CUSE is synchronous and is answered by this very loop.  On EMFILE nothing happened for
    the kernel: ``undo`` runs now and our file goes without a release (``disown_own``).
    """
    try:
        # only an incoming session's file can take a trapped call that succeeds (RETRIEVE_FD): the others
        # go untagged and keep the node's lock list short (each tag costs every close and fdinfo read a step)
        ours = await file.device.open_own("session", s, s.incoming)
    except BaseException as e:
        undo()
        if isinstance(e, OSError):
            _emfile_first(inst, caller)
        raise
    emfile = False
    try:
        newfd = _install(file, caller, inst, ours, v[0], v[1])
    except OSError as e:
        if e.errno == errno.EMFILE:
            emfile = True
            undo()
        raise
    finally:
        if emfile:
            file.device.disown_own(ours)
        else:  # on any other failure its release undoes the session, as the kernel's fput does
            file.device.close_own(ours)
    return {"fd": newfd}


# -- /dev/liveupdate ---------------------------------------------------------------------------------
def create_session(file: Any, caller: Any, v: tuple) -> Awaitable[Out]:
    _size, _fd, name = v
    m = _model(file)
    inst = _installer(file, caller)
    try:
        checked = m.check_create(name)  # once: its fault point counts calls
        inst = _need_run(file, inst, "CREATE_SESSION")
        s = m.create(name, checked)
    except OSError:
        _emfile_first(inst, caller)
        raise
    return _hand_out(file, caller, inst, s, lambda: m.release(s), v)


def retrieve_session(file: Any, caller: Any, v: tuple) -> Awaitable[Out]:
    _size, _fd, name = v
    m = _model(file)
    inst = _installer(file, caller)
    try:
        found = m.find_incoming(name)
        inst = _need_run(file, inst, "RETRIEVE_SESSION")
        s = m.retrieve(name, found)
    except OSError:
        _emfile_first(inst, caller)
        raise

    def undo() -> None:
        s.retrieved = False

    return _hand_out(file, caller, inst, s, undo, v)


# -- a session fd ------------------------------------------------------------------------------------
def preserve_fd(file: Any, caller: Any, v: tuple) -> None:
    _size, fd, token = v
    _model(file).preserve(_session(file), token, lambda: PreservedMemfd(file.device.take_fd(caller, fd)))


def retrieve_fd(file: Any, caller: Any, v: tuple) -> Out:
    _size, _fd, token = v
    m, s = _model(file), _session(file)
    inst = _installer(file, caller)
    try:
        first = m.find_file(s, token).retrieved is None
        inst = _need_run(file, inst, "RETRIEVE_FD")
        keep = m.rules.keep_seals
        got = m.retrieve_fd(s, token, lambda obj: obj.rebuild(keep))  # type: ignore[attr-defined]
    except OSError:
        _emfile_first(inst, caller)
        raise
    try:
        return {"fd": _install(file, caller, inst, got.fd, v[0], v[1])}  # type: ignore[attr-defined]
    except OSError as e:
        if e.errno == errno.EMFILE and first:
            m.unretrieve(s, token)
        raise


def finish(file: Any, caller: Any, v: tuple) -> None:
    _size, reserved = v
    _model(file).finish(_session(file), reserved)


def strscpy_out(name: bytes, buf: bytes) -> bytes:
    """strscpy(buf, name, 64) as x86_64 does it: whole words, the word holding the NUL zero-padded,
    the bytes after that word left as the caller sent them (spec 5, GET_NAME)."""
    n = len(name)
    end = min(64, (n // 8) * 8 + 8)
    return name + bytes(end - n) + buf[end:64]


def get_name(file: Any, caller: Any, v: tuple) -> Out:
    _size, reserved, buf = v
    if reserved != 0:
        raise fail(errno.EINVAL)
    return {"name": strscpy_out(_session(file).name, buf)}


DEVICE_OPS: tuple[Op, ...] = (
    _row(uapi.CREATE_SESSION, create_session, ("fd",)),
    _row(uapi.RETRIEVE_SESSION, retrieve_session, ("fd",)),
)
SESSION_OPS: tuple[Op, ...] = (
    _row(uapi.PRESERVE_FD, preserve_fd),
    _row(uapi.RETRIEVE_FD, retrieve_fd, ("fd",)),
    _row(uapi.FINISH, finish),
    _row(uapi.GET_NAME, get_name, ("name",)),
)


def session_ops(rules: Rules) -> tuple[Op, ...]:
    """The session-fd table of a profile: N = 3 rows on 6.19 (GET_NAME is then EINVAL), 4 on 7.2."""
    return SESSION_OPS[: rules.session_commands]


def kind_check(file: Any, op: Op) -> None:
    """7.2's luo_ioctl_type_valid: PRESERVE_FD on outgoing, RETRIEVE_FD and FINISH on incoming only."""
    s: Session = file.bound
    if op.cmd == uapi.PRESERVE_FD.cmd:
        if s.incoming:
            raise fail(errno.EINVAL)
    elif op.cmd in (uapi.RETRIEVE_FD.cmd, uapi.FINISH.cmd) and not s.incoming:
        raise fail(errno.EINVAL)


#: the commands that give the caller a new fd: trapped under `cusedev run`
FD_COMMANDS: tuple[int, ...] = (uapi.CREATE_SESSION.cmd, uapi.RETRIEVE_SESSION.cmd, uapi.RETRIEVE_FD.cmd)
