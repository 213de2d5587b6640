"""seccomp user notification: trap fd-returning ioctls and reboot() in a client, answer them from asyncio.

FUSE/CUSE cannot install an fd in the caller; a seccomp listener can
(``SECCOMP_IOCTL_NOTIF_ADDFD``).  ``cusedev run`` therefore starts its command
under a filter (:func:`install_filter`, :func:`spawn`) that sends two things to
the listener and lets every other syscall through untouched:

- ``ioctl(fd, cmd, ...)`` for each ``cmd`` of the running profile's
  fd-returning commands (``Profile.fd_commands``; any fd: BPF cannot tell
  which file an fd is; the handler checks and uses
  :meth:`Notification.continue_` for foreign fds);
- ``reboot(..., LINUX_REBOOT_CMD_KEXEC, ...)``: the emulated kexec.

Every other ``reboot()`` fails with EPERM, and the child loses CAP_SYS_BOOT
as well, so a test client can never reboot the host even if the filter were
wrong.  :class:`Supervisor` serves one listener on an asyncio loop without
ever blocking it.  This module knows nothing about the device.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import fcntl
import logging
import os
import select
import signal
import socket
import struct
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from .. import uapi
from ..device import eager
from ..libc import check, function

__all__ = [
    "Notification",
    "Supervisor",
    "TargetGone",
    "build_filter",
    "drop_cap_sys_boot",
    "install_filter",
    "notif_sizes",
    "spawn",
    "SECCOMP_IOCTL_NOTIF_ADDFD",
    "SECCOMP_IOCTL_NOTIF_ID_VALID",
    "SECCOMP_IOCTL_NOTIF_RECV",
    "SECCOMP_IOCTL_NOTIF_SEND",
]

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------
# Numbers

_MAGIC = uapi.SECCOMP_IOC_MAGIC
SECCOMP_IOCTL_NOTIF_RECV: int = uapi.IOWR(_MAGIC, 0, "struct seccomp_notif")
SECCOMP_IOCTL_NOTIF_SEND: int = uapi.IOWR(_MAGIC, 1, "struct seccomp_notif_resp")
SECCOMP_IOCTL_NOTIF_ID_VALID: int = uapi.IOW(_MAGIC, 2, "__u64")
SECCOMP_IOCTL_NOTIF_ADDFD: int = uapi.IOW(_MAGIC, 3, "struct seccomp_notif_addfd")

_NOTIF = uapi.codec("seccomp_notif")
_RESP = uapi.codec("seccomp_notif_resp")
_ADDFD = uapi.codec("seccomp_notif_addfd")
_SIZES = uapi.codec("seccomp_notif_sizes")
_INSN = uapi.codec("sock_filter")
_U64 = struct.Struct("=Q")

# Offsets into struct seccomp_data for BPF_LD|BPF_W|BPF_ABS (x86_64: little endian, low half first).
_OFF_NR = uapi.ffi.offsetof("struct seccomp_data", "nr")
_OFF_ARCH = uapi.ffi.offsetof("struct seccomp_data", "arch")
_OFF_ARGS = uapi.ffi.offsetof("struct seccomp_data", "args")


def _arg_lo(i: int) -> int:
    return _OFF_ARGS + 8 * i


# prctl(2) and capabilities (linux/prctl.h, linux/capability.h)
PR_CAPBSET_DROP = 24
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38
CAP_SYS_BOOT = 22
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_SYS_CAPGET = 125
_SYS_CAPSET = 126

_syscall = function("syscall", restype=ctypes.c_long)
_prctl = function("prctl", [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong])
_check = check


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    """prctl(2), raising OSError."""
    return _check(_prctl(option, arg2, arg3, arg4, arg5))


# --------------------------------------------------------------------------
# The filter


class _Program:
    """A classic BPF program with named jump targets: offsets are computed, never written by hand."""

    def __init__(self) -> None:
        self.insns: list[tuple[int, str | None, str | None, int]] = []
        self.labels: dict[str, int] = {}

    def label(self, name: str) -> None:
        self.labels[name] = len(self.insns)

    def stmt(self, code: int, k: int) -> None:
        self.insns.append((code, None, None, k & 0xFFFFFFFF))

    def jeq(self, k: int, true: str | None, false: str | None) -> None:
        """Compare the accumulator with ``k``; go to label ``true`` or ``false`` (None: the next one)."""
        self.insns.append((uapi.BPF_JMP | uapi.BPF_JEQ | uapi.BPF_K, true, false, k & 0xFFFFFFFF))

    def assemble(self) -> bytes:
        out = []
        for i, (code, jt, jf, k) in enumerate(self.insns):
            offs = []
            for target in (jt, jf):
                off = 0 if target is None else self.labels[target] - (i + 1)
                if not 0 <= off <= 255:
                    raise ValueError(f"BPF jump from {i} to {target!r} out of range ({off})")
                offs.append(off)
            out.append(_INSN.pack(code, offs[0], offs[1], k))
        return b"".join(out)


def build_filter(trapped: int | Sequence[int]) -> bytes:
    """The classic BPF program, as packed ``struct sock_filter`` array.

    ``trapped``: the ioctl numbers sent to the listener (the running profile's
    fd-returning commands).  Fast path for every other syscall: 2 loads and
    a few compares.  The x32 and i386 entry points into reboot() get EPERM
    too: the arch check alone would let a 32-bit client reach the real reboot().
    """
    cmds = [trapped] if isinstance(trapped, int) else list(trapped)
    ld = uapi.BPF_LD | uapi.BPF_W | uapi.BPF_ABS
    ret = uapi.BPF_RET | uapi.BPF_K
    p = _Program()
    p.stmt(ld, _OFF_ARCH)
    p.jeq(uapi.AUDIT_ARCH_X86_64, None, "other_arch")
    p.stmt(ld, _OFF_NR)
    p.jeq(uapi.X86_64_NR_ioctl, None, "not_ioctl")
    p.stmt(ld, _arg_lo(1))  # ioctl cmd (unsigned int: low 32 bits)
    for cmd in cmds:
        p.jeq(cmd, "notify", None)
    p.stmt(ret, uapi.SECCOMP_RET_ALLOW)
    p.label("not_ioctl")
    p.jeq(uapi.X86_64_NR_reboot, "reboot", None)
    p.jeq(uapi.X86_64_X32_SYSCALL_BIT | uapi.X86_64_NR_reboot, "eperm", "allow")
    p.label("reboot")
    p.stmt(ld, _arg_lo(2))  # reboot cmd
    p.jeq(uapi.LINUX_REBOOT_CMD_KEXEC, "notify", "eperm")
    p.label("other_arch")
    p.jeq(uapi.AUDIT_ARCH_I386, None, "allow")
    p.stmt(ld, _OFF_NR)
    p.jeq(uapi.I386_NR_reboot, "eperm", "allow")
    p.label("allow")
    p.stmt(ret, uapi.SECCOMP_RET_ALLOW)
    p.label("notify")
    p.stmt(ret, uapi.SECCOMP_RET_USER_NOTIF)
    p.label("eperm")
    p.stmt(ret, uapi.SECCOMP_RET_ERRNO | errno.EPERM)
    return p.assemble()


def default_trapped() -> tuple[int, ...]:
    """The default profile's fd-returning commands (what `cusedev run` traps unless told otherwise)."""
    from .. import profiles

    return profiles.get(profiles.DEFAULT).fd_commands


def drop_cap_sys_boot() -> None:
    """Remove CAP_SYS_BOOT from the bounding, effective, permitted and inheritable sets.

    Belt and braces under the filter: without the capability the kernel's
    reboot() answers EPERM before looking at the command.  Dropping from the
    bounding set needs CAP_SETPCAP; without it the caller is not privileged
    and NO_NEW_PRIVS (set by install_filter) keeps setuid binaries from
    regaining the capability.  Clearing inheritable also clears ambient.
    """
    try:
        prctl(PR_CAPBSET_DROP, CAP_SYS_BOOT)
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EINVAL):
            raise
    header = (ctypes.c_uint32 * 2)(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()  # 2 x {effective, permitted, inheritable}
    _check(_syscall(_SYS_CAPGET, header, data))
    mask = ~(1 << CAP_SYS_BOOT) & 0xFFFFFFFF  # CAP_SYS_BOOT < 32: lives in data[0]
    for i in range(3):
        data[i] &= mask
    _check(_syscall(_SYS_CAPSET, header, data))


def _seccomp_set_filter(flags: int, prog: bytes) -> int:
    fprog = uapi.ffi.new("struct sock_fprog *")
    buf = uapi.ffi.from_buffer(prog)
    fprog.len = len(prog) // _INSN.size
    fprog.filter = uapi.ffi.cast("struct sock_filter *", buf)
    addr = int(uapi.ffi.cast("uintptr_t", fprog))
    return _check(
        _syscall(
            uapi.X86_64_NR_seccomp,
            ctypes.c_uint(uapi.SECCOMP_SET_MODE_FILTER),
            ctypes.c_uint(flags),
            ctypes.c_void_p(addr),
        )
    )


def install_filter(trapped: int | Sequence[int]) -> int:
    """Install the filter on the calling thread; return the listener fd (O_CLOEXEC).

    Meant for a freshly forked child before exec (no other threads).  Without
    CAP_SYS_ADMIN the kernel requires NO_NEW_PRIVS, so it is set only when
    the first attempt says EACCES.  WAIT_KILLABLE_RECV (5.19+) is asked for
    so that once the supervisor has received a notification, a non-fatal
    signal cannot restart the syscall behind its back (which would make an
    FD_RESTORE happen twice); older kernels get the plain behaviour.
    """
    if os.uname().machine != "x86_64":
        raise OSError(errno.ENOSYS, "cusedev.seccomp supports x86_64 only")
    prog = build_filter(trapped)
    flags = uapi.SECCOMP_FILTER_FLAG_NEW_LISTENER | uapi.SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV
    nnp_set = False
    while True:
        try:
            return _seccomp_set_filter(flags, prog)
        except OSError as e:
            if e.errno == errno.EACCES and not nnp_set:
                prctl(PR_SET_NO_NEW_PRIVS, 1)
                nnp_set = True
            elif e.errno == errno.EINVAL and flags & uapi.SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV:
                flags &= ~uapi.SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV
            else:
                raise


def notif_sizes() -> tuple[int, int, int]:
    """The running kernel's (sizeof seccomp_notif, seccomp_notif_resp, seccomp_data)."""
    buf = uapi.ffi.new("struct seccomp_notif_sizes *")
    addr = int(uapi.ffi.cast("uintptr_t", buf))
    _check(_syscall(uapi.X86_64_NR_seccomp, ctypes.c_uint(uapi.SECCOMP_GET_NOTIF_SIZES), 0, ctypes.c_void_p(addr)))
    return _SIZES.unpack_from(uapi.ffi.buffer(buf))  # type: ignore[return-value]


# --------------------------------------------------------------------------
# spawn


def _child(
    sock: socket.socket,
    gate: int,
    argv: Sequence[str],
    env: Mapping[str, str] | None,
    trapped: Sequence[int],
    foreground: bool,
) -> None:  # pragma: no cover - runs in the forked child, reports through ``sock``
    """Set up the forked child and exec; never returns.  Errors go back as ``E<errno> <text>``."""
    try:
        os.setpgid(0, 0)
        if foreground:
            # We are a background group now: tcsetpgrp would stop us with SIGTTOU.
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTTOU})
            os.tcsetpgrp(0, os.getpid())
        # Python ignores these; exec would keep SIG_IGN (subprocess's restore_signals does the same).
        for sig in (signal.SIGPIPE, signal.SIGXFSZ):
            signal.signal(sig, signal.SIG_DFL)
        drop_cap_sys_boot()
        listener = install_filter(trapped)
        socket.send_fds(sock, [b"L"], [listener])
        os.close(listener)
        if os.read(gate, 1) != b"g":
            os._exit(126)  # the parent gave up (handoff failed): never run the command
        os.close(gate)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        if env is None:
            os.execvp(argv[0], list(argv))
        else:
            os.execvpe(argv[0], list(argv), dict(env))
    except BaseException as e:
        code = getattr(e, "errno", None) or errno.EINVAL
        try:
            sock.sendall(b"E%d %s" % (code, str(e).encode(errors="replace")[:900]))
        finally:
            os._exit(127)


def spawn(
    argv: Sequence[str],
    env: Mapping[str, str] | None = None,
    *,
    trapped: Sequence[int] | None = None,
    foreground: bool = False,
    handoff: Callable[[int], None] | None = None,
) -> tuple[int, int]:
    """Fork and exec ``argv`` under the filter; return ``(pid, listener_fd)``.

    The child gets its own process group, loses CAP_SYS_BOOT, installs the
    filter, sends the listener back over an O_CLOEXEC socketpair
    (SCM_RIGHTS) and execs (``PATH`` lookup; ``env`` replaces the
    environment).  This returns once the exec happened; an exec failure is
    raised here as ``OSError`` after the child is reaped, like ``subprocess``.

    ``handoff(listener_fd)``, if given, is called before the child execs, so
    the command never runs before its supervisor has the listener; if it
    raises, the child is killed and reaped and the error propagates.
    ``foreground=True`` makes the child's group the foreground group of the
    terminal on fd 0 (only meaningful when the caller is in the foreground).

    The child runs Python between fork and exec: call this from a process
    whose other threads do not hold locks the child would need (the
    launcher is single-threaded; the tests' loop thread sits in epoll).
    """
    if not argv:
        raise ValueError("spawn: empty argv")
    cmds = default_trapped() if trapped is None else tuple(trapped)  # before fork: may import a profile
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)  # both O_CLOEXEC
    gate_r, gate_w = os.pipe2(os.O_CLOEXEC)
    try:
        pid = os.fork()
    except BaseException:
        for fd in (gate_r, gate_w):
            os.close(fd)
        parent.close()
        child.close()
        raise
    if pid == 0:  # pragma: no cover
        parent.close()
        os.close(gate_w)
        _child(child, gate_r, argv, env, cmds, foreground)
    child.close()
    os.close(gate_r)
    listener = -1
    try:
        listener, error = _read_child(parent)
        if error is None and listener < 0:
            error = OSError(errno.EPROTO, "spawn: the child sent no seccomp listener")
        if error is None:
            if handoff is not None:
                handoff(listener)
            os.write(gate_w, b"g")
            _, error = _read_child(parent)  # EOF once exec closed the child's end
        if error is not None:
            raise error
        return pid, listener
    except BaseException:
        if listener >= 0:
            os.close(listener)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(pid, 0)
        raise
    finally:
        os.close(gate_w)
        parent.close()


def _read_child(sock: socket.socket) -> tuple[int, OSError | None]:
    """One message from the child: ``(listener, None)``, ``(-1, error)``, or ``(-1, None)`` at EOF."""
    msg, fds, _, _ = socket.recv_fds(sock, 1024, 1)
    if msg == b"L" and len(fds) == 1:
        return fds[0], None
    for fd in fds:
        os.close(fd)
    if msg.startswith(b"E"):
        code_s, _, text = msg[1:].partition(b" ")
        code = int(code_s)
        return -1, OSError(code, text.decode(errors="replace") or os.strerror(code))
    if msg:
        return -1, OSError(errno.EPROTO, f"spawn: unexpected message {msg[:32]!r} from the child")
    return -1, None


# --------------------------------------------------------------------------
# Supervisor


class TargetGone(ProcessLookupError):
    """The notifying task died, or its syscall was interrupted: the notification no longer exists."""


class Notification:
    """One trapped syscall, waiting in the target until answered exactly once.

    ``pid`` is the calling *thread* id (as FUSE's header.pid).  Methods must be
    called on the supervisor's loop thread.
    """

    __slots__ = ("id", "pid", "flags", "nr", "arch", "instruction_pointer", "args", "answered", "_sup")

    def __init__(self, sup: Supervisor, raw: bytes) -> None:
        (self.id, self.pid, self.flags, self.nr, self.arch, self.instruction_pointer, *args) = _NOTIF.unpack_from(raw)
        self.args: tuple[int, ...] = tuple(args)
        self.answered = False
        self._sup = sup

    def __repr__(self) -> str:
        args = ", ".join(hex(a) for a in self.args)
        return f"<Notification id={self.id:#x} pid={self.pid} nr={self.nr} args=({args})>"

    def _ioctl(self, request: int, buf: bytearray) -> int:
        fd = self._sup.fd
        if fd < 0:
            raise TargetGone(errno.ENOENT, "seccomp listener closed")
        try:
            return fcntl.ioctl(fd, request, buf, True)
        except OSError as e:
            if e.errno == errno.ENOENT:
                raise TargetGone(errno.ENOENT, "notification gone (target died or was interrupted)") from None
            raise

    def valid(self) -> bool:
        """Whether the target is still waiting for this answer (guards against pid reuse)."""
        try:
            self._ioctl(SECCOMP_IOCTL_NOTIF_ID_VALID, bytearray(_U64.pack(self.id)))
        except TargetGone:
            return False
        return True

    def addfd(
        self,
        srcfd: int,
        newfd_flags: int = os.O_CLOEXEC,
        *,
        newfd: int | None = None,
        send: bool = False,
    ) -> int:
        """Install a duplicate of our ``srcfd`` in the target; return its fd number there.

        ``newfd`` installs at that number (replacing what is there, like dup2).
        ``send=True`` also answers the syscall with the fd number, atomically.
        Raises :class:`TargetGone` if the target is gone, OSError(EMFILE) if
        its fd table is full.
        """
        flags = 0
        if newfd is not None:
            flags |= uapi.SECCOMP_ADDFD_FLAG_SETFD
        if send:
            flags |= uapi.SECCOMP_ADDFD_FLAG_SEND
        buf = bytearray(_ADDFD.pack(self.id, flags, srcfd, newfd or 0, newfd_flags))
        remote = self._ioctl(SECCOMP_IOCTL_NOTIF_ADDFD, buf)
        if send:
            self.answered = True
        return remote

    def _send(self, val: int, error: int, flags: int) -> bool:
        if self.answered:
            raise RuntimeError(f"{self!r} already answered")
        self.answered = True
        try:
            self._ioctl(SECCOMP_IOCTL_NOTIF_SEND, bytearray(_RESP.pack(self.id, val, error, flags)))
        except TargetGone:
            return False
        return True

    def reply(self, val: int = 0, error: int = 0) -> bool:
        """Finish the syscall: it returns ``val``, or fails with ``error`` (an errno; EIO or -EIO alike).

        Returns False if the target is gone (nothing to answer any more).
        """
        return self._send(0 if error else val, -abs(error), 0)

    def continue_(self) -> bool:
        """Let the kernel run the real syscall (safe here: only a plain ioctl/reboot with the same args)."""
        return self._send(0, 0, uapi.SECCOMP_USER_NOTIF_FLAG_CONTINUE)


Handler = Callable[[Notification], Awaitable[Any]]


class Supervisor:
    """Serve one seccomp listener fd on an asyncio loop (one Supervisor per ``cusedev run``).

    Takes ownership of ``listener_fd``.  Each notification runs its handler in
    its own task (``on_ioctl`` for ioctl, ``on_reboot`` for reboot), started at once and
    made a task only if it waits (``device.eager``); a handler
    that returns without answering gets ENOSYS sent for it, one that raises
    gets EIO, so the target never hangs.  When every filtered process is gone
    (exited; on some kernels only once reaped) the kernel reports POLLHUP; the
    supervisor then stops reading, waits for running handlers and closes the
    fd: :meth:`wait_closed` returns.
    """

    def __init__(
        self,
        listener_fd: int,
        on_ioctl: Handler,
        on_reboot: Handler,
        *,
        loop: asyncio.AbstractEventLoop | None = None,
        name: str = "",
    ) -> None:
        self.fd = listener_fd
        self.name = name or f"seccomp-listener-{listener_fd}"
        self._on_ioctl = on_ioctl
        self._on_reboot = on_reboot
        self._loop = loop
        self._tasks: set[asyncio.Task[None]] = set()
        self._reading = False
        self._closed: asyncio.Event | None = None
        self._poll = select.poll()
        self._poll.register(listener_fd, select.POLLIN)
        self._recv_buf = bytearray(_NOTIF.size)
        self._zeros = bytes(_NOTIF.size)

    # lifecycle -------------------------------------------------------------

    def start(self) -> None:
        """Start reading (call on the loop thread)."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        self._closed = asyncio.Event()
        if self.fd < 0:
            raise ValueError(f"{self.name}: closed")
        self._loop.add_reader(self.fd, self._readable)
        self._reading = True

    async def wait_closed(self) -> None:
        """Return once the listener is closed (HUP, or :meth:`close`)."""
        assert self._closed is not None, "start() first"
        await self._closed.wait()

    @property
    def closed(self) -> bool:
        return self.fd < 0

    def close(self) -> None:
        """Stop now: cancel handlers and close the fd (the kernel fails pending syscalls with ENOSYS)."""
        for task in list(self._tasks):
            task.cancel()
        self._release()

    def _stop_reading(self) -> None:
        if self._reading and self._loop is not None:
            self._loop.remove_reader(self.fd)
            self._reading = False

    def _release(self) -> None:
        if self.fd < 0:
            return
        self._stop_reading()
        fd, self.fd = self.fd, -1  # Notifications see fd < 0: never touch a reused fd number
        os.close(fd)
        if self._closed is not None:
            self._closed.set()

    # reading ---------------------------------------------------------------

    def _readable(self) -> None:
        """Drain pending notifications without ever blocking: NOTIF_RECV waits if none is pending."""
        for _ in range(64):  # bounded: let other loop work run between bursts
            if self.fd < 0:
                return
            events = self._poll.poll(0)
            revents = events[0][1] if events else 0
            if revents & select.POLLIN:
                self._receive()
                continue
            if revents & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
                self._stop_reading()
                if not self._tasks:
                    self._release()
            return

    def _receive(self) -> None:
        buf = self._recv_buf
        buf[:] = self._zeros  # the kernel requires a zeroed struct
        try:
            fcntl.ioctl(self.fd, SECCOMP_IOCTL_NOTIF_RECV, buf, True)
        except OSError as e:
            if e.errno == errno.ENOENT:  # the target died between poll and recv
                return
            raise
        n = Notification(self, bytes(buf))
        assert self._loop is not None
        # run at once: most answers need no wait, and then no task (nor its loop turn) at all
        task = eager.start(self._dispatch(n), self._loop)
        if task is not None:
            task.set_name(f"{self.name}:{n.id:#x}")
            self._tasks.add(task)
            task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not self._reading and not self._tasks:
            self._release()

    async def _dispatch(self, n: Notification) -> None:
        if n.nr == uapi.X86_64_NR_ioctl:
            handler: Handler | None = self._on_ioctl
        elif n.nr == uapi.X86_64_NR_reboot:
            handler = self._on_reboot
        else:
            handler = None
        error = errno.ENOSYS
        try:
            if handler is not None:
                await handler(n)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s: handler failed for %r", self.name, n)
            error = errno.EIO
        if not n.answered and self.fd >= 0:
            if handler is not None and error == errno.ENOSYS:
                log.warning("%s: handler returned without answering %r", self.name, n)
            n.reply(error=error)
