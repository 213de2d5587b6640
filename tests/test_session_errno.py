"""Every errno rule of the session ABI (spec luo-session.md sections 2-5, 7, 11, 12), for 6.19 and 7.2.

The cases are written once against a small harness (``H``) and run twice:

* **model harness** (``ModelHarness``): the profile's own dispatcher and
  handlers over a fake caller memory, in this process: fast, every case;
* **syscall harness** (``SyscallHarness``): real ``ioctl()`` calls on the
  emulator's FUSE file (or CUSE node) from a process under `cusedev run`, so
  session fds are real fds.  This file is also that process's program
  (``python3 test_session_errno.py --stage 1|2 --abi A --device PATH``):
  stage 1 runs every case's ``before`` (sessions to carry), leaves a daemon
  holding them and exits; the test runs `cusedev kexec`; stage 2 runs every
  case's ``check`` and prints one JSON line per case.

A case's ``before`` makes outgoing sessions named after the case; ``check``
may retrieve them (they are incoming by then) and make new ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import inspect
import json
import os
import resource
import stat
import struct
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from cusedev.profiles.session import uapi  # noqa: E402
from cusedev.profiles.session.model import RULES, Rules  # noqa: E402

C, R, P, RF, F, G = (uapi.CREATE_SESSION, uapi.RETRIEVE_SESSION, uapi.PRESERVE_FD, uapi.RETRIEVE_FD,
                     uapi.FINISH, uapi.GET_NAME)  # fmt: skip
NULL = None


def name_of(s: str | bytes) -> bytes:
    raw = s.encode() if isinstance(s, str) else s
    return raw.ljust(64, b"\0")[:64]


def create_buf(name: str | bytes, size: int = 72) -> bytearray:
    return _sized(C.struct.pack(72, -1, name_of(name)), size)


def _sized(raw: bytes, size: int, tail: bytes = b"") -> bytearray:
    """The struct bytes with ``size`` in the size word, cut or padded (with ``tail``, else zeros) to ``size``."""
    buf = bytearray(struct.pack("=I", size) + raw[4:])
    if size >= len(buf):
        pad = (tail + bytes(size)).ljust(size - len(buf), b"\0")[: size - len(buf)]
        return buf + pad
    return buf[: max(size, 4)]


def pfd_buf(fd: int, token: int, size: int = 16) -> bytearray:
    return _sized(P.struct.pack(16, fd, token), size)


def rfd_buf(token: int, size: int = 16) -> bytearray:
    return _sized(RF.struct.pack(16, -1, token), size)


def fin_buf(reserved: int = 0, size: int = 8) -> bytearray:
    return _sized(F.struct.pack(8, reserved), size)


def gn_buf(reserved: int = 0, fill: bytes = b"", size: int = 72) -> bytearray:
    return _sized(G.struct.pack(72, reserved, fill.ljust(64, b"\0")[:64]), size)


class H:
    """What a case may do (both harnesses implement it)."""

    rules: Rules
    dev: int

    def ioctl(self, fd: int, cmd: int, buf: bytearray | None) -> bytearray | None:
        raise NotImplementedError

    def close(self, fd: int) -> None:
        raise NotImplementedError

    def memfd(self, data: bytes = b"", flags: int = 0) -> int:
        fd = os.memfd_create("case", flags | os.MFD_CLOEXEC)
        os.write(fd, data)
        os.lseek(fd, 0, os.SEEK_SET)
        return fd

    @contextlib.contextmanager
    def no_free_fd(self) -> Iterator[None]:
        raise NotImplementedError
        yield

    # -- helpers built on the above --------------------------------------------------------------
    def err(self, fd: int, cmd: int, buf: bytearray | None) -> int:
        try:
            self.ioctl(fd, cmd, buf)
        except OSError as e:
            return e.errno or -1
        return 0

    def create(self, name: str | bytes) -> int:
        buf = self.ioctl(self.dev, C.cmd, create_buf(name))
        assert buf is not None
        return int(C.struct.unpack(buf)[1])

    def retrieve(self, name: str | bytes) -> int:
        buf = self.ioctl(self.dev, R.cmd, create_buf(name))
        assert buf is not None
        return int(R.struct.unpack(buf)[1])

    def preserve(self, s: int, fd: int, token: int) -> None:
        self.ioctl(s, P.cmd, pfd_buf(fd, token))

    def retrieve_fd(self, s: int, token: int) -> int:
        buf = self.ioctl(s, RF.cmd, rfd_buf(token))
        assert buf is not None
        return int(RF.struct.unpack(buf)[1])

    def finish(self, s: int) -> None:
        self.ioctl(s, F.cmd, fin_buf())


@dataclass
class Case:
    name: str
    check: Callable[[H], None]
    before: Callable[[H], None] | None = None
    profiles: tuple[str, ...] = ("6.19", "7.2")
    real_only: bool = False  # needs real fds of the emulator's node (open through /proc, fstat...)


CASES: dict[str, Case] = {}


def case(
    *, before: Callable[[H], None] | None = None, profiles: tuple[str, ...] = ("6.19", "7.2"), real_only: bool = False
) -> Any:
    def deco(fn: Callable[[H], None]) -> Callable[[H], None]:
        CASES[fn.__name__] = Case(fn.__name__, fn, before, profiles, real_only)
        return fn

    return deco


def new72(h: H) -> bool:
    return h.rules.name == "7.2"


# ===================================== the device (section 3, 4) ======================================
@case()
def dev_nr_out_of_range_einval(h: H) -> None:
    for cmd in (0xBA02, 0xBA07, 0xAB07, 0xBA40, 0xBA1B, uapi.IOCTL_TYPE << 8 | 0xFF):
        assert h.err(h.dev, cmd, create_buf("x")) == errno.EINVAL, hex(cmd)


@case()
def dev_size_unreadable_efault(h: H) -> None:
    assert h.err(h.dev, C.cmd, NULL) == errno.EFAULT
    assert h.err(h.dev, R.cmd, NULL) == errno.EFAULT


@case()
def dev_wrong_cmd_bits_enotty(h: H) -> None:
    iowr = (3 << 30) | (72 << 16) | C.cmd
    for cmd in (0xAB00, iowr, 0xAB01):
        assert h.err(h.dev, cmd, create_buf("enotty")) == errno.ENOTTY, hex(cmd)


@case()
def dev_size_below_min_einval(h: H) -> None:
    for size in (0, 8, 71):
        assert h.err(h.dev, C.cmd, create_buf("small", size)) == errno.EINVAL, size
        assert h.err(h.dev, R.cmd, create_buf("small", size)) == errno.EINVAL, size


@case()
def dev_nonzero_tail_e2big_zero_tail_ok(h: H) -> None:
    buf = create_buf("tail", 80)
    buf[79] = 1
    assert h.err(h.dev, C.cmd, buf) == errno.E2BIG
    buf = create_buf("tail", 80)
    buf[4:8] = b"\xff\xff\xff\xff"
    h.ioctl(h.dev, C.cmd, buf)
    fd = struct.unpack_from("=i", buf, 4)[0]
    assert fd >= 0 and buf[72:] == bytes(8)  # bytes past sizeof are never written
    assert bytes(buf[8:72]) == name_of("tail")  # the name is echoed as sent
    h.close(fd)


@case()
def create_duplicate_eexist(h: H) -> None:
    s = h.create("dup")
    assert h.err(h.dev, C.cmd, create_buf("dup")) == errno.EEXIST
    t = h.create("dup2")
    h.close(s)
    h.close(t)
    h.close(h.create("dup"))  # closing frees the name


@case()
def create_name_rules(h: H) -> None:
    if new72(h):
        assert h.err(h.dev, C.cmd, create_buf(b"")) == errno.EINVAL
        assert h.err(h.dev, C.cmd, create_buf(b"X" * 64)) == errno.EINVAL
        h.close(h.create(b"M" * 63))
    else:
        e = h.create(b"")
        x = h.create(b"X" * 64)
        assert h.err(h.dev, C.cmd, create_buf(b"X" * 63 + b"Y")) == errno.EEXIST  # cut to the same 63
        h.close(e)
        h.close(x)


@case()
def create_emfile(h: H) -> None:
    with h.no_free_fd():
        assert h.err(h.dev, C.cmd, create_buf("emfile")) == errno.EMFILE
    h.close(h.create("emfile"))  # nothing was created


@case()
def retrieve_before_update_enoent(h: H) -> None:
    assert h.err(h.dev, R.cmd, create_buf("never-carried")) == errno.ENOENT


def _carry_one(name: str, data: bytes = b"payload") -> Callable[[H], None]:
    def before(h: H) -> None:
        s = h.create(name)
        m = h.memfd(data)
        h.preserve(s, m, 7)
        os.close(m)

    return before


@case(before=_carry_one("rs-twice"))
def retrieve_twice_einval_and_name_matching(h: H) -> None:
    assert h.err(h.dev, R.cmd, create_buf(b"rs-twice" + b"Z" * 56)) == errno.ENOENT  # no NUL in 64
    buf = create_buf(b"rs-twice\0junk after the nul")
    h.ioctl(h.dev, R.cmd, buf)
    s = struct.unpack_from("=i", buf, 4)[0]
    assert h.err(h.dev, R.cmd, create_buf("rs-twice")) == errno.EINVAL
    h.finish(s)
    assert h.err(h.dev, R.cmd, create_buf("rs-twice")) == errno.EINVAL  # listed until closed
    h.close(s)
    assert h.err(h.dev, R.cmd, create_buf("rs-twice")) == errno.ENOENT


@case(before=_carry_one("rs-emfile"))
def retrieve_session_emfile_first(h: H) -> None:
    with h.no_free_fd():
        assert h.err(h.dev, R.cmd, create_buf("rs-emfile")) == errno.EMFILE
        assert h.err(h.dev, R.cmd, create_buf("no-such")) == errno.EMFILE  # before the lookup
    h.close(h.retrieve("rs-emfile"))  # not consumed by the failure


@case(before=_carry_one("same-name"))
def outgoing_may_reuse_an_incoming_name(h: H) -> None:
    s = h.create("same-name")
    h.close(s)
    r = h.retrieve("same-name")
    h.close(r)


# ===================================== a session fd (section 3, 5) ====================================
@case()
def sess_nr_range_einval(h: H) -> None:
    s = h.create("nr-range")
    top = 0x44 if new72(h) else 0x43  # 6.19: GET_NAME is EINVAL, not ENOTTY
    for nr in (0x00, 0x01, 0x1B, 0x3F, top, 0xFF):
        assert h.err(s, uapi.IOCTL_TYPE << 8 | nr, gn_buf()) == errno.EINVAL, hex(nr)
    h.close(s)


@case()
def sess_efault_enotty(h: H) -> None:
    s = h.create("efault")
    assert h.err(s, P.cmd, NULL) == errno.EFAULT
    assert h.err(s, 0xAB40, pfd_buf(0, 1)) == errno.ENOTTY
    assert h.err(s, (1 << 30) | (16 << 16) | P.cmd, pfd_buf(0, 1)) == errno.ENOTTY
    h.close(s)


@case()
def sess_size_and_tail(h: H) -> None:
    s = h.create("sizes")
    m = h.memfd(b"x")
    assert h.err(s, P.cmd, pfd_buf(m, 1, 15)) == errno.EINVAL
    buf = pfd_buf(m, 1, 24)
    buf[20] = 9
    assert h.err(s, P.cmd, buf) == errno.E2BIG
    h.ioctl(s, P.cmd, pfd_buf(m, 1, 24))  # a zero tail is fine
    if new72(h):
        assert h.err(s, G.cmd, gn_buf(size=71)) == errno.EINVAL
    os.close(m)
    h.close(s)


@case(before=_carry_one("kind-in"))
def sess_kind_check(h: H) -> None:
    out = h.create("kind-out")
    inc = h.retrieve("kind-in")
    m = h.memfd(b"k")
    if new72(h):
        assert h.err(inc, P.cmd, pfd_buf(m, 1)) == errno.EINVAL
        assert h.err(inc, P.cmd, pfd_buf(m, 1, 3)) == errno.EINVAL  # before the size check
        assert h.err(out, RF.cmd, rfd_buf(7)) == errno.EINVAL
        assert h.err(out, F.cmd, fin_buf()) == errno.EINVAL
        assert h.err(out, F.cmd, fin_buf(size=2)) == errno.EINVAL
    else:  # choices of spec 12
        h.preserve(inc, m, 1)
        assert h.err(out, RF.cmd, rfd_buf(7)) == errno.ENOENT
        h.finish(out)
    os.close(m)
    h.close(out)
    h.close(inc)


@case()
def preserve_errors_in_order(h: H) -> None:
    s = h.create("pres-order")
    m = h.memfd(b"first")
    h.preserve(s, m, 1)
    assert h.err(s, P.cmd, pfd_buf(-1, 1)) == errno.EEXIST  # the token first, before the fd
    assert h.err(s, P.cmd, pfd_buf(m, 1)) == errno.EEXIST  # same memfd, same token: EEXIST not EBUSY
    assert h.err(s, P.cmd, pfd_buf(-1, 2)) == errno.EBADF
    assert h.err(s, P.cmd, pfd_buf(9999, 2)) == errno.EBADF
    opath = os.open("/proc/self/exe", os.O_PATH | os.O_CLOEXEC)
    assert h.err(s, P.cmd, pfd_buf(opath, 2)) == errno.EBADF
    os.close(opath)
    null = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
    assert h.err(s, P.cmd, pfd_buf(null, 2)) == errno.ENOENT
    os.close(null)
    r, w = os.pipe()
    assert h.err(s, P.cmd, pfd_buf(r, 3)) == errno.ENOENT
    os.close(r)
    os.close(w)
    h.preserve(s, h.memfd(b""), 0)  # size 0 is fine; token 0 too
    os.close(m)
    h.close(s)


@case()
def preserve_double_ebusy(h: H) -> None:
    a, b = h.create("dbl-a"), h.create("dbl-b")
    m = h.memfd(b"twice")
    h.preserve(a, m, 1)
    again = os.open(f"/proc/self/fd/{m}", os.O_RDWR | os.O_CLOEXEC)  # the same inode, another file
    want = errno.EBUSY if new72(h) else 0
    assert h.err(a, P.cmd, pfd_buf(m, 2)) == want
    assert h.err(b, P.cmd, pfd_buf(again, 3)) == want
    h.close(a)  # unpreserved: the key is free again
    assert h.err(b, P.cmd, pfd_buf(m, 4)) == 0
    os.close(m)
    os.close(again)
    h.close(b)


@case()
def preserve_file_cap(h: H) -> None:
    if new72(h):  # 630,000 files: far beyond what a test should build; the model test checks the number
        return
    s = h.create("files-cap")
    fds = []
    for t in range(128):
        m = h.memfd()
        h.preserve(s, m, t)
        fds.append(m)
    m = h.memfd()
    assert h.err(s, P.cmd, pfd_buf(m, 128)) == errno.ENOSPC
    assert h.err(s, P.cmd, pfd_buf(m, 5)) == errno.EEXIST  # the token check comes first
    for fd in (*fds, m):
        os.close(fd)
    h.close(s)


def _carry_two(name: str) -> Callable[[H], None]:
    def before(h: H) -> None:
        s = h.create(name)
        for token, data in ((1, b"one"), (2, b"two")):
            m = h.memfd(data)
            h.preserve(s, m, token)
            os.close(m)

    return before


@case(before=_carry_two("rfd"))
def retrieve_fd_rules(h: H) -> None:
    s = h.retrieve("rfd")
    assert h.err(s, RF.cmd, rfd_buf(99)) == errno.ENOENT
    with h.no_free_fd():
        assert h.err(s, RF.cmd, rfd_buf(1)) == errno.EMFILE
        assert h.err(s, RF.cmd, rfd_buf(99)) == errno.EMFILE  # the fd reservation comes first
    a = h.retrieve_fd(s, 1)
    b = h.retrieve_fd(s, 1)  # again: another fd, the same open file (shared offset)
    assert os.read(a, 2) == b"on" and os.read(b, 10) == b"e"
    assert fcntl.fcntl(a, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    assert fcntl.fcntl(a, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDWR
    if new72(h):  # retrieved, not finished: cannot be preserved again yet
        out = h.create("rfd-out")
        assert h.err(out, P.cmd, pfd_buf(a, 1)) == errno.EBUSY
    h.finish(s)
    assert h.err(s, RF.cmd, rfd_buf(2)) == errno.ENOENT  # FINISH dropped the unretrieved file
    assert os.pread(a, 3, 0) == b"one"  # a retrieved memfd lives on through its fds
    if new72(h):
        h.preserve(out, a, 1)  # FINISH freed the key
        h.close(out)
    os.close(a)
    os.close(b)
    h.close(s)


@case(before=_carry_one("fin-res"))
def finish_reserved(h: H) -> None:
    s = h.retrieve("fin-res")
    assert h.err(s, F.cmd, fin_buf(1)) == (errno.EINVAL if new72(h) else 0)
    h.finish(s)
    h.finish(s)  # no files: 0 at once
    if new72(h):
        buf = gn_buf()
        h.ioctl(s, G.cmd, buf)  # GET_NAME still works after FINISH
        assert bytes(buf[8:16]) == b"fin-res\0"
    h.close(s)


@case(profiles=("7.2",))
def get_name_strscpy_bytes(h: H) -> None:
    s = h.create("abcdefghij")  # 10 bytes: NUL in the second word
    buf = gn_buf(fill=b"\xee" * 64)
    h.ioctl(s, G.cmd, buf)
    assert bytes(buf[8:24]) == b"abcdefghij" + bytes(6)
    assert bytes(buf[24:72]) == b"\xee" * 48  # later words: the caller's own bytes
    assert h.err(s, G.cmd, gn_buf(reserved=1)) == errno.EINVAL
    h.close(s)
    t = h.create("x" * 63)
    buf = gn_buf(fill=b"\xee" * 64)
    h.ioctl(t, G.cmd, buf)
    assert bytes(buf[8:72]) == b"x" * 63 + b"\0"
    h.close(t)


@case(before=_carry_one("seal-rules", b"sealed data"))
def seals_follow_the_profile(h: H) -> None:
    s = h.retrieve("seal-rules")
    fd = h.retrieve_fd(s, 7)
    seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)  # type: ignore[attr-defined]
    assert seals == 1  # a default memfd (no MFD_ALLOW_SEALING) comes back with F_SEAL_SEAL in both
    assert os.pread(fd, 64, 0) == b"sealed data"
    os.close(fd)
    h.close(s)


def _carry_sealed(h: H) -> None:
    s = h.create("sealed")
    m = h.memfd(b"abc", os.MFD_ALLOW_SEALING)
    fcntl.fcntl(m, fcntl.F_ADD_SEALS, 0x2 | 0x4)  # type: ignore[attr-defined]  # SHRINK | GROW
    h.preserve(s, m, 1)
    fcntl.fcntl(m, fcntl.F_ADD_SEALS, 0x1)  # type: ignore[attr-defined]  # added after PRESERVE: not carried
    os.close(m)
    u = h.memfd(b"open", os.MFD_ALLOW_SEALING)
    h.preserve(s, u, 2)
    os.close(u)


@case(before=_carry_sealed)
def seals_carried_by_7_2_only(h: H) -> None:
    s = h.retrieve("sealed")
    a, b = h.retrieve_fd(s, 1), h.retrieve_fd(s, 2)
    ga = fcntl.fcntl(a, fcntl.F_GET_SEALS)  # type: ignore[attr-defined]
    gb = fcntl.fcntl(b, fcntl.F_GET_SEALS)  # type: ignore[attr-defined]
    if new72(h):
        assert (ga, gb) == (0x6, 0)
    else:
        assert (ga, gb) == (1, 1)
    assert os.pread(a, 8, 0) == b"abc" and os.pread(b, 8, 0) == b"open"
    os.close(a)
    os.close(b)
    h.close(s)


def _carry_offset(h: H) -> None:
    s = h.create("offset")
    m = h.memfd(b"0123456789")
    h.preserve(s, m, 1)
    os.lseek(m, 4, os.SEEK_SET)  # the offset at kexec time is what is carried
    # keep m open: the daemon of stage 1 holds it, and the kexec reads its offset
    h.keep(m)  # type: ignore[attr-defined]


@case(before=_carry_offset)
def offset_and_bytes_carried(h: H) -> None:
    s = h.retrieve("offset")
    fd = h.retrieve_fd(s, 1)
    assert os.read(fd, 3) == b"456"
    os.close(fd)
    h.close(s)


@case()
def close_outgoing_unpreserves(h: H) -> None:
    s = h.create("unpres")
    m = h.memfd(b"data")
    h.preserve(s, m, 1)
    h.close(s)
    assert os.pread(m, 4, 0) == b"data"  # the memfd is untouched
    t = h.create("unpres")  # the name is free, and so is the memfd
    h.preserve(t, m, 1)
    os.close(m)
    h.close(t)


def _carry_then_release(h: H) -> None:
    s = h.create("released-before-kexec")
    h.close(s)
    h.create("empty-carried")  # no files, not closed: crosses


@case(before=_carry_then_release)
def only_unreleased_sessions_cross(h: H) -> None:
    assert h.err(h.dev, R.cmd, create_buf("released-before-kexec")) == errno.ENOENT
    s = h.retrieve("empty-carried")
    h.finish(s)  # FINISH on an empty session: 0
    h.close(s)


@case(real_only=True)
def preserve_the_device_or_a_session_fd_enoent(h: H) -> None:
    s, t = h.create("self-pres"), h.create("self-pres-2")
    for fd in (h.dev, t):  # a read() makes FUSE re-read the node's attributes at the next stat of it: the
        assert _errno_of(os.read, fd, 1) == errno.EINVAL  # emulator must not stat a passed file of its own
    assert h.err(s, P.cmd, pfd_buf(h.dev, 1)) == errno.ENOENT
    assert h.err(s, P.cmd, pfd_buf(t, 2)) == errno.ENOENT
    assert h.err(s, P.cmd, pfd_buf(s, 3)) == errno.ENOENT
    h.close(t)
    h.close(s)


# ============================ fd properties (section 2, 6): real fds only ==============================
@case(real_only=True)
def reopen_through_proc(h: H) -> None:
    assert h.err_open(f"/proc/self/fd/{h.dev}") == errno.EBUSY  # type: ignore[attr-defined]
    s = h.create("reopen")
    # The kernel's anon inode has no open: ENXIO.  The emulator's session fds live on their own node,
    # which refuses every open but the emulator's own, whether the device is held or free.
    assert h.err_open(f"/proc/self/fd/{s}") == errno.ENXIO  # type: ignore[attr-defined]
    os.close(h.dev)
    h.settle_closed()  # type: ignore[attr-defined]
    assert h.err_open(f"/proc/self/fd/{s}") == errno.ENXIO  # type: ignore[attr-defined]
    h.dev = os.open(h.path, os.O_RDWR | os.O_CLOEXEC)  # type: ignore[attr-defined]
    assert h.err(h.dev, C.cmd, create_buf("reopen")) == errno.EEXIST  # nothing was lost
    h.close(s)


def _errno_of(fn: Callable[..., object], *args: object) -> int:
    try:
        fn(*args)
    except OSError as e:
        return e.errno or -1
    return 0


@case(real_only=True)
def pread_pwrite_lseek(h: H) -> None:
    """pread/pwrite: EINVAL on the device (no read/write), ESPIPE on a session fd (an anon inode has no
    FMODE_PREAD); lseek ESPIPE on a session fd.  On CUSE the session node is a char device whose open
    CUSE makes seekable whatever we reply: pread/pwrite answer as read/write (EINVAL) and lseek gives 0
    (docs/session-abi.md, fidelity)."""
    s = h.create("pread")
    cuse = stat.S_ISCHR(os.fstat(s).st_mode)
    for fd, want in ((h.dev, errno.EINVAL), (s, errno.EINVAL if cuse else errno.ESPIPE)):
        assert _errno_of(os.pread, fd, 1, 0) == want, fd
        assert _errno_of(os.pwrite, fd, b"x", 0) == want, fd
        assert _errno_of(os.read, fd, 1) == errno.EINVAL, fd
    assert _errno_of(os.lseek, s, 0, os.SEEK_SET) == (0 if cuse else errno.ESPIPE)
    if new72(h):  # the session still answers
        buf = gn_buf()
        h.ioctl(s, G.cmd, buf)
        assert bytes(buf[8:14]) == b"pread\0"
    h.close(s)


@case(real_only=True)
def session_fd_flags_and_vfs_ops(h: H) -> None:
    s = h.create("fd-flags")
    assert fcntl.fcntl(s, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    assert fcntl.fcntl(s, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDWR
    for op in (lambda: os.read(s, 1), lambda: os.write(s, b"x")):
        try:
            op()
            raise AssertionError("read/write on a session fd succeeded")
        except OSError as e:
            assert e.errno == errno.EINVAL, e
    d = os.dup(s)  # a dup is the same session
    buf = gn_buf()
    if new72(h):
        h.ioctl(d, G.cmd, buf)
        assert bytes(buf[8:17]) == b"fd-flags\0"
    h.close(s)
    assert h.err(h.dev, C.cmd, create_buf("fd-flags")) == errno.EEXIST  # the dup keeps it alive
    os.close(d)
    h.settle()  # type: ignore[attr-defined]
    h.close(h.create("fd-flags"))


@case(real_only=True)
def device_close_keeps_sessions(h: H) -> None:
    s = h.create("outlives-device")
    os.close(h.dev)
    h.dev = os.open(h.path, os.O_RDWR | os.O_CLOEXEC)  # type: ignore[attr-defined]
    assert h.err(h.dev, C.cmd, create_buf("outlives-device")) == errno.EEXIST
    if new72(h):
        buf = gn_buf()
        h.ioctl(s, G.cmd, buf)
    h.close(s)


# ====================================== harness: the model ============================================
class _FakeMemory:
    """The caller's memory for the model harness: one buffer at a fixed address; elsewhere EFAULT."""

    direct = True
    BASE = 0x10000

    def __init__(self, buf: bytearray | None):
        self.buf = buf if buf is not None else bytearray()

    def _slice(self, addr: int, length: int) -> tuple[int, int]:
        off = addr - self.BASE
        if addr == 0 or off < 0 or off + length > len(self.buf):
            raise OSError(errno.EFAULT, "fault")
        return off, off + length

    def read(self, addr: int, length: int) -> bytes:
        a, b = self._slice(addr, length)
        return bytes(self.buf[a:b])

    def peek(self, addr: int, want: int, need: int) -> bytes:
        off = addr - self.BASE
        have = max(0, len(self.buf) - off) if addr else 0
        return self.read(addr, min(want, have) if have >= need else need)

    def declare(self, in_range: tuple[int, int], out_range: tuple[int, int] | None) -> None:
        return None

    def write(self, addr: int, data: bytes | bytearray) -> None:
        a, b = self._slice(addr, len(data))
        self.buf[a:b] = data


@dataclass(eq=False)
class _File:
    fh: int
    kind: str
    bound: Any
    model: Any
    device: Any


class ModelHarness(H):
    """The profile's tables and handlers, driven directly: fds of kind "session" are numbers of ours."""

    def __init__(self, abi: str):
        from cusedev.profiles.base import get

        self.profile = get(abi)
        self.rules = RULES[abi]
        self.model = self.profile.model()
        self.files: dict[int, _File] = {}
        self.pending: dict[int, _File] = {}
        self.kept: list[int] = []
        self.emfile = False
        self.chain: list[Any] = []  # no interceptors: handlers check EMFILE only when a call fails
        self.next = 10_000
        self.dev = self._add(_File(0, "device", None, self.model, self))

    def _add(self, f: _File) -> int:
        self.next += 1
        f.fh = self.next
        self.files[self.next] = f
        return self.next

    # DeviceServices
    def take_fd(self, caller: Any, fd: int) -> int:
        try:
            ours = os.dup(fd)
        except OSError:
            raise OSError(errno.EBADF, "bad fd") from None
        if fcntl.fcntl(ours, fcntl.F_GETFL) & os.O_PATH:
            os.close(ours)
            raise OSError(errno.EBADF, "O_PATH")
        return ours

    def installer_for(self, caller: Any) -> Any:
        return self

    def warn_no_installer(self, what: str) -> None:
        return None

    async def open_own(self, kind: str, bound: Any, tagged: bool = True) -> int:
        fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        self.pending[fd] = _File(0, kind, bound, self.model, self)
        return fd

    def close_own(self, fd: int) -> None:
        os.close(fd)

    def disown_own(self, fd: int) -> None:
        self.pending.pop(fd, None)
        os.close(fd)

    # FdInstaller
    def reserve(self, caller: Any) -> None:
        if self.emfile:
            raise OSError(errno.EMFILE, "no fd")

    def install(self, caller: Any, fd: int) -> int:
        if self.emfile:  # as SECCOMP_IOCTL_NOTIF_ADDFD on a full table
            raise OSError(errno.EMFILE, "no fd")
        f = self.pending.pop(fd, None)
        return self._add(f) if f is not None else os.dup(fd)

    # H
    def ioctl(self, fd: int, cmd: int, buf: bytearray | None) -> bytearray | None:
        from cusedev.device.dispatch import dispatch

        f = self.files.get(fd)
        if f is None:  # a real fd of this process (a memfd): not ours, the kernel's answer
            raise OSError(errno.ENOTTY, "not a session")
        kind = self.profile.kinds[f.kind]
        mem = _FakeMemory(buf)
        res = dispatch(kind, f, None, cmd, mem.BASE if buf is not None else 0, mem)  # type: ignore[arg-type]
        if inspect.isawaitable(res):
            asyncio.run(_await(res))
        return buf

    def close(self, fd: int) -> None:
        f = self.files.pop(fd)
        rel = self.profile.kinds[f.kind].release
        if rel is not None:
            rel(f)

    def keep(self, fd: int) -> None:
        self.kept.append(fd)

    @contextlib.contextmanager
    def no_free_fd(self) -> Iterator[None]:
        self.emfile = True
        try:
            yield
        finally:
            self.emfile = False

    def kexec(self) -> None:
        for f in self.files.values():
            if f.kind == "session":
                f.bound.gone = True
        self.model.kexec()
        self.files = {k: v for k, v in self.files.items() if v.kind == "device"}
        for fd in self.kept:
            os.close(fd)
        self.kept.clear()


async def _await(aw: Any) -> Any:
    return await aw


def run_cases(h: H, stage: int, real: bool = False) -> dict[str, str]:
    """Stage 1: every ``before``; stage 2: every ``check``; returns case -> "ok" or the failure."""
    out = {}
    for c in CASES.values():
        if h.rules.name not in c.profiles or (c.real_only and not real):
            continue
        fn = c.before if stage == 1 else c.check
        if fn is None:
            continue
        try:
            fn(h)
            out[c.name] = "ok"
        except BaseException as e:  # noqa: BLE001  - every failure is a result to report
            out[c.name] = f"{type(e).__name__}: {e}"
    return out


def case_ids(abi: str, real: bool = False) -> list[str]:
    return [c.name for c in CASES.values() if abi in c.profiles and (real or not c.real_only)]


# ====================================== harness: real syscalls ========================================
class SyscallHarness(H):
    """Real ioctl() on the emulator's node from this process (which runs under `cusedev run`)."""

    def __init__(self, abi: str, path: str):
        import ctypes

        self.rules = RULES[abi]
        self.path = path
        self.dev = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        self.kept: list[int] = []
        libc = ctypes.CDLL(None, use_errno=True)
        self._ioctl = libc.ioctl
        self._ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)
        self._ctypes = ctypes

    def ioctl(self, fd: int, cmd: int, buf: bytearray | None) -> bytearray | None:
        ct = self._ctypes
        if buf is None:
            r = self._ioctl(fd, cmd, None)
        else:
            cbuf = (ct.c_char * len(buf)).from_buffer(buf)
            r = self._ioctl(fd, cmd, ct.addressof(cbuf))
        if r < 0:
            e = ct.get_errno()
            raise OSError(e, os.strerror(e))
        return buf

    def close(self, fd: int) -> None:
        os.close(fd)
        self.settle()

    def settle(self) -> None:
        """FUSE sends RELEASE after close() returns: one device round trip lets it be served first."""
        self.err(self.dev, 0xBA7F, None)

    def settle_closed(self) -> None:
        """``settle`` while the device is closed: a round trip on an fd of our own of the node."""
        fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        os.close(fd)

    def keep(self, fd: int) -> None:
        self.kept.append(fd)

    def err_open(self, path: str) -> int:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            return e.errno or -1
        os.close(fd)
        return 0

    @contextlib.contextmanager
    def no_free_fd(self) -> Iterator[None]:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        lowest = os.dup(0)  # the lowest free number: from it up, nothing may be free
        os.close(lowest)
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowest, hard))
        try:
            yield
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def main(argv: list[str]) -> int:
    """The program of the syscall harness: ``--stage N --abi A --device PATH`` (under `cusedev run`)."""
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", type=int, required=True)
    ap.add_argument("--abi", required=True)
    ap.add_argument("--device", required=True)
    a = ap.parse_args(argv)
    h = SyscallHarness(a.abi, a.device)
    results = run_cases(h, a.stage, real=True)
    print(json.dumps(results), flush=True)
    if a.stage == 1:  # hold every session fd (and kept memfd) across the kexec, as the selftests' daemon does
        if os.fork() == 0:
            os.setsid()
            devnull = os.open("/dev/null", os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(devnull, fd)
            while True:  # until the kexec ends it, or the emulator is gone (a failed run leaves nothing)
                __import__("time").sleep(1)
                if h.err(h.dev, 0xBA7F, None) != errno.EINVAL:  # ENOTCONN/ENODEV: no server any more
                    os._exit(0)
    return 0


# ====================================== tests: model harness ==========================================
_MODEL_RESULTS: dict[str, dict[str, str]] = {}


def _model_results(abi: str) -> dict[str, str]:
    """Both stages of every case through the model harness, once per profile."""
    if abi not in _MODEL_RESULTS:
        h = ModelHarness(abi)
        first = run_cases(h, 1)
        h.kexec()
        second = run_cases(h, 2)
        _MODEL_RESULTS[abi] = {**{k: v for k, v in first.items() if v != "ok"}, **second}
    return _MODEL_RESULTS[abi]


@pytest.mark.parametrize(("abi", "name"), [(a, c) for a in ("6.19", "7.2") for c in case_ids(a)])
def test_model_harness(abi: str, name: str) -> None:
    assert _model_results(abi)[name] == "ok"


# ====================================== tests: real syscalls ==========================================
_REAL_RESULTS: dict[str, dict[str, str]] = {}


def _real_results(abi: str) -> dict[str, str]:
    """Stage 1 under `cusedev run`, `cusedev kexec`, stage 2 under `cusedev run`, on a fresh emulator."""
    if abi not in _REAL_RESULTS:
        from session_emulator import SessionEmulator  # noqa: I001

        with SessionEmulator(abi) as emu:
            prog = [sys.executable, str(Path(__file__).resolve()), "--abi", abi, "--device", emu.path]
            out: dict[str, str] = {}
            for stage in (1, 2):
                if stage == 2:
                    emu.kexec()
                r = emu.run([*prog, "--stage", str(stage)], capture_output=True, text=True, timeout=120)
                assert r.returncode == 0, f"stage {stage}: rc {r.returncode}\n{r.stdout}\n{r.stderr}\n{emu.log()}"
                got = json.loads(r.stdout.strip().splitlines()[-1])
                out.update(got if stage == 2 else {k: v for k, v in got.items() if v != "ok"})
        _REAL_RESULTS[abi] = out
    return _REAL_RESULTS[abi]


def _real_params() -> list[Any]:
    """7.2's rows run on real CUSE too (the VM phase: one emulator, two processes); 6.19's on the host
    (the C rows of test_session_errno_c.py run both profiles there)."""
    return [pytest.param(a, c, marks=[pytest.mark.vm] if a == "7.2" else [])
            for a in ("6.19", "7.2") for c in case_ids(a, real=True)]  # fmt: skip


@pytest.mark.parametrize(("abi", "name"), _real_params())
def test_real_syscalls(abi: str, name: str) -> None:
    assert _real_results(abi)[name] == "ok"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
