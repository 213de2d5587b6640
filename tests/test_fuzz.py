"""Fuzzing (issue 7.1): ≥100,000 random ioctls through the real kernel path, each checked against a model.

The client is an in-process ctypes loop (no pipe round trip per call): a
seeded PRNG picks the command number (valid, nr ≥ 7, wrong type, dir/size
bits), the ``size`` word (0, short, min, sizeof, huge, 0xFFFFFFFF), the tail
(zero or not), the pointer (NULL, unmapped, kernel, read-only, data ending at
a page followed by a hole), fds (memfds, an empty memfd, closed, O_PATH, a
regular file, a pipe, /dev/null), tokens and events; now and then the device
is closed and reopened, KHO is marked finalized, or the machine is kexeced
through the control socket.  After every call (rc, errno, the bytes of the
argument buffer) are compared with ``Model``, a small pure model of
luo-v3.md written here independently of ``cusedev.core``; every few
thousand calls the emulator's state (status), liveness, fd count and RSS are
checked.  Its stderr must hold no traceback at the end.

Knobs: CUSEDEV_FUZZ_IOCTLS (default 100000 on the host, 4000 in the VM: the
bounded fuzz on CUSE, ``vm``), CUSEDEV_FUZZ_SEED (default random; printed in
the header and summary of every run, and in a failure's message).
"""

from __future__ import annotations

import collections
import ctypes
import errno
import mmap
import os
import random
import struct
import time
from pathlib import Path

import pytest
from _hostile import IN_VM, alive, assert_clean_log, fd_count, knob, open_retry, rss_kb, status
from _server import ServerProc

from cusedev import control
from cusedev.device.memory import CUSE_MAX_IOCTL_BYTES

N_IOCTLS = int(knob("CUSEDEV_FUZZ_IOCTLS", 100_000, 4_000))
CHECK_EVERY = 5000 if not IN_VM else 500
PAGE = mmap.PAGESIZE

NORMAL, PREPARED, FROZEN, UPDATED = 1, 2, 3, 4
LABEL = {1: "normal", 2: "prepared", 3: "frozen", 4: "updated"}
# nr -> (sizeof, min_size, output field offset or None, output width)
OPS = {0: (16, 16, None, 0), 1: (16, 16, None, 0), 2: (16, 16, 4, 4), 3: (8, 8, 4, 4), 4: (8, 8, None, 0),
       5: (24, 16, 16, 4), 6: (16, 16, None, 0)}
# ioctl types the VFS never intercepts (do_vfs_ioctl handles 0x00, 'T', 'X', 'f', 0x94...)
OTHER_TYPES = (0xB9, 0xBB, 0x3A, 0xAB, 0xFF, 0x42, 0xCA)
TOKENS = (0, 1, 2, 3, 7, 1 << 63, (1 << 64) - 1)

# a private CDLL: argtypes set here must not change _hostile's shared libc functions
_own = ctypes.CDLL(None, use_errno=True)
_mmap = _own.mmap
_mmap.restype = ctypes.c_void_p
_mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
_munmap = _own.munmap
_munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_ioctl = _own.ioctl
_ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong)
MAP_FIXED = 0x10


class Model:
    """luo-v3.md sections 2, 4, 5 for one opener outside `cusedev run` (FD_RESTORE cannot install)."""

    def __init__(self) -> None:
        self.state = NORMAL
        self.kho = False
        self.outgoing: dict[int, list] = {}  # token -> [kind, file state]
        self.incoming: dict[int, list] = {}  # token -> [file state, restored]

    def close(self) -> None:
        self.outgoing.clear()

    def kexec(self) -> None:
        if self.state == PREPARED:
            for f in self.outgoing.values():
                if f[1] == PREPARED:
                    f[1] = FROZEN
            self.incoming = {t: [UPDATED, False] for t, f in self.outgoing.items() if f[1] == FROZEN}
            self.state = UPDATED
        else:
            self.incoming = {}
            self.state = NORMAL
        self.outgoing = {}
        self.kho = False

    def call(self, nr: int, v: tuple, kinds: dict[int, str]) -> tuple[int, int | None]:
        """(errno, output value) of the handler of ``nr`` with decoded fields ``v``."""
        if nr == 0:
            _s, fd, token = v
            kind = kinds.get(fd)
            if kind is None or kind == "opath":
                return errno.EBADF, None
            if self.state not in (NORMAL, UPDATED):
                return errno.EBUSY, None
            if kind not in ("memfd", "empty"):
                return errno.ENOENT, None
            if token in self.outgoing:
                return errno.EEXIST, None
            self.outgoing[token] = [kind, NORMAL]
            return 0, None
        if nr == 1:
            token = v[-1]
            if self.state not in (NORMAL, UPDATED):
                return errno.EBUSY, None
            if token not in self.outgoing:
                return errno.ENOENT, None
            del self.outgoing[token]
            return 0, None
        if nr == 2:
            token = v[-1]
            if self.state != UPDATED:
                return errno.EBUSY, None
            f = self.incoming.get(token)
            if f is None:
                return errno.ENOENT, None
            if f[1]:
                return errno.EINVAL, None
            return errno.EOPNOTSUPP, None  # deviation: no fd can be installed outside `cusedev run`
        if nr == 3:
            return 0, self.state
        if nr == 4:
            return self.event(v[1]), None
        if nr == 5:
            _s, incoming, token, _st = v
            f = (self.incoming if incoming else self.outgoing).get(token)
            if f is None:
                return errno.ENOENT, None
            return 0, (f[0] if incoming else f[1])
        _s, ev, token = v
        if ev == 2:  # FINISH
            if self.state != UPDATED:
                return errno.EBUSY, None
            f = self.incoming.get(token)
            if f is None:
                return errno.ENOENT, None
            if f[0] == UPDATED:
                f[0] = NORMAL
            return 0, None
        if ev not in (0, 1, 3):
            return errno.EINVAL, None
        f = self.outgoing.get(token)
        if f is None:
            return errno.ENOENT, None
        if ev == 0 and f[1] == NORMAL:
            if f[0] == "empty":
                return errno.EINVAL, None
            f[1] = PREPARED
        elif ev == 1 and f[1] == PREPARED:
            f[1] = FROZEN
        elif ev == 3 and f[1] in (PREPARED, FROZEN):
            f[1] = NORMAL
        return 0, None

    def event(self, ev: int) -> int:
        if ev == 0:
            if self.state != NORMAL:
                return errno.EINVAL
            if any(f[0] == "empty" and f[1] == NORMAL for f in self.outgoing.values()):
                return errno.EINVAL  # rolled back: nothing changes
            for f in self.outgoing.values():
                if f[1] == NORMAL:
                    f[1] = PREPARED
            self.state = PREPARED
            if self.kho:
                return errno.EEXIST
            self.kho = True
            return 0
        if ev == 3:
            if not self.kho:
                return errno.ENOENT
            self.kho = False
            if self.state not in (PREPARED, FROZEN):
                return errno.EINVAL
            for f in self.outgoing.values():
                if f[1] in (PREPARED, FROZEN):
                    f[1] = NORMAL
            self.state = NORMAL
            return 0
        if ev == 2:
            if self.state != UPDATED:
                return errno.EINVAL
            self.incoming = {}
            self.state = NORMAL
            return 0
        return errno.EINVAL


def dispatch(model: Model, cmd: int, buf: bytes, avail: int, writable: bool, fuse: bool,
             kinds: dict[int, str]) -> tuple[int, bytes | None]:
    """Spec section 2 over ``buf`` (the ``avail`` readable bytes at arg, zeros past the data).

    Returns (errno, bytes written back at arg or None).
    """
    if fuse and cmd >> 30 & 1:  # _IOC_WRITE: the FUSE-file kernel path copies _IOC_SIZE bytes in first
        if (cmd >> 16 & 0x3FFF) > avail:
            return errno.EFAULT, None
    nr = cmd & 0xFF
    if nr >= 7:
        return errno.EINVAL, None
    if avail < 4:
        return errno.EFAULT, None
    size = struct.unpack_from("=I", buf)[0]
    if cmd != 0xBA00 | nr:
        return errno.ENOTTY, None
    sizeof, min_size, out_off, out_w = OPS[nr]
    if size < min_size:
        return errno.EINVAL, None
    if not fuse and size > avail and size <= CUSE_MAX_IOCTL_BYTES:
        # CUSE retry iovecs: the kernel copies the whole declared range in before the emulator
        # scans the tail, so a hole anywhere in it is EFAULT (a documented deviation from E2BIG)
        return errno.EFAULT, None
    if size > sizeof:
        if any(buf[sizeof:min(size, avail)]):
            return errno.E2BIG, None
        if size > avail:
            return errno.EFAULT, None
    n = min(size, sizeof)
    if n > avail:
        return errno.EFAULT, None
    data = buf[:n] + bytes(sizeof - n)
    v = struct.unpack({0: "=IiQ", 1: "=I4xQ", 2: "=IiQ", 3: "=II", 4: "=II", 5: "=IB3xQI4x", 6: "=IIQ"}[nr], data)
    err, out = model.call(nr, v, kinds)
    if err or out is None:
        return err, None
    if not writable:
        return errno.EFAULT, None
    w = bytearray(data)
    struct.pack_into("=I", w, out_off, out)
    return 0, bytes(w[:n])


class Arena:
    """A memfd mapped twice (read-write and read-only), each view followed by an unmapped page."""

    SPAN = 2 * PAGE

    def __init__(self) -> None:
        self.fd = os.memfd_create("fuzz-arena", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, self.SPAN)
        self.rw = self._map(3)
        self.ro = self._map(1)
        self.hole = self.rw + self.SPAN

    def _map(self, prot: int) -> int:
        base = _mmap(None, self.SPAN + PAGE, 0, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
        got = _mmap(base, self.SPAN, prot, mmap.MAP_SHARED | MAP_FIXED, self.fd, 0)
        assert got == base
        _munmap(base + self.SPAN, PAGE)
        return base

    def close(self) -> None:
        _munmap(self.rw, self.SPAN)
        _munmap(self.ro, self.SPAN)
        os.close(self.fd)


class Fuzzer:
    def __init__(self, dev: str, seed: int, fuse: bool, tmp: Path):
        self.dev, self.rng, self.fuse = dev, random.Random(seed), fuse
        self.model = Model()
        self.arena = Arena()
        self.kinds: dict[int, str] = {}
        self.own: list[int] = []
        for kind, fd in self._make_fds(tmp):
            self.kinds[fd] = kind
            self.own.append(fd)
        closed = 4000  # a number no open() of this test reaches (they take the lowest free one)
        assert str(closed) not in os.listdir("/proc/self/fd")
        self.fd_choices = [*self.kinds, closed, -1, 1 << 30, 0x7FFFFFFF]
        self.devfd = open_retry(dev)
        self.recent: collections.deque[str] = collections.deque(maxlen=12)
        self.counts = collections.Counter()

    def _make_fds(self, tmp: Path) -> list[tuple[str, int]]:
        out = []
        for size in (4096, 1, 3 * PAGE + 5):
            fd = os.memfd_create("fuzz", os.MFD_CLOEXEC)
            os.write(fd, os.urandom(size))
            out.append(("memfd", fd))
        out.append(("empty", os.memfd_create("fuzz-empty", os.MFD_CLOEXEC)))
        reg = tmp / "regular"
        reg.write_bytes(b"regular file")
        out.append(("regular", os.open(reg, os.O_RDWR | os.O_CLOEXEC)))
        out.append(("opath", os.open(reg, os.O_PATH | os.O_CLOEXEC)))
        r, w = os.pipe()
        out += [("pipe", r), ("pipe", w)]
        out.append(("devnull", os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)))
        return out

    def close(self) -> None:
        os.close(self.devfd)
        for fd in self.own:
            os.close(fd)
        self.arena.close()

    # -- one random call -------------------------------------------------------------------------
    def _cmd(self) -> int:
        r = self.rng.random()
        if r < 0.75:
            return 0xBA00 | self.rng.randrange(7)
        if r < 0.83:
            return 0xBA00 | self.rng.choice((7, 8, 0x3F, 0x80, 0xFF, self.rng.randrange(7, 256)))
        if r < 0.91:
            return self.rng.choice(OTHER_TYPES) << 8 | self.rng.randrange(8)
        d = self.rng.randrange(1, 4)
        size = self.rng.choice((0, 4, 8, 16, 24, 0x3FFF, self.rng.randrange(0x4000)))
        return d << 30 | size << 16 | 0xBA00 | self.rng.randrange(8)

    def _struct(self, nr: int) -> bytes:
        rng = self.rng
        fd = rng.choice(self.fd_choices)
        token = rng.choice(TOKENS) if rng.random() < 0.95 else rng.getrandbits(64)
        ev = rng.choice((0, 1, 2, 3, 0, 2, 3, 4, 0xFFFFFFFF)) if rng.random() < 0.97 else rng.getrandbits(32)
        pad = rng.getrandbits(32) if rng.random() < 0.1 else 0
        sizeof = OPS.get(nr, (16,))[0]
        if nr in (0, 2):
            body = struct.pack("=IiQ", 0, fd, token)
        elif nr == 1:
            body = struct.pack("=IIQ", 0, pad, token)
        elif nr in (3, 4):
            body = struct.pack("=II", 0, ev if nr == 4 else rng.choice((0, pad)))
        elif nr == 5:
            body = struct.pack("=IB3sQI4s", 0, rng.choice((0, 1, 1, 255)), pad.to_bytes(4, "little")[:3], token,
                               rng.choice((0, pad)), bytes(4))
        elif nr == 6:
            body = struct.pack("=IIQ", 0, rng.choice((0, 1, 2, 3, 2, 5, 0xFFFFFFFF)), token)
        else:
            body = bytes(sizeof)
        return body

    def _size(self, sizeof: int, min_size: int) -> int:
        r = self.rng.random()
        if r < 0.7:
            return sizeof
        return self.rng.choice((0, 1, 3, 4, min_size - 1, min_size, sizeof - 1, sizeof + 1, sizeof + 8, 64,
                                PAGE, 2 * PAGE, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF))

    def one(self) -> None:
        rng = self.rng
        cmd = self._cmd()
        nr = cmd & 0xFF
        sizeof, min_size = OPS.get(nr, (16, 16))[:2]
        body = bytearray(self._struct(nr))
        size = self._size(sizeof, min_size)
        struct.pack_into("=I", body, 0, size)
        if rng.random() < 0.3:  # a tail, zero or not
            tail = bytearray(rng.choice((1, 7, 8, 40)))
            if rng.random() < 0.5:
                tail[rng.randrange(len(tail))] = rng.randrange(1, 256)
            body += tail
        if size < len(body) and rng.random() < 0.5:
            body = body[:max(size, 0)]
        data = bytes(body)
        where = rng.choices(("heap", "pageend", "readonly", "null", "unmapped", "kernel", "straddle"),
                            (70, 8, 6, 4, 4, 2, 6))[0]
        a = self.arena
        if where in ("heap", "readonly"):
            off = rng.randrange(0, 64)
            base = a.rw if where == "heap" else a.ro
            ctypes.memmove(a.rw + off, data, len(data))
            addr, avail, writable = base + off, a.SPAN - off, where == "heap"
        elif where in ("pageend", "straddle"):
            off = a.SPAN - len(data) if where == "pageend" else PAGE - rng.randrange(1, 16)
            ctypes.memmove(a.rw + off, data, len(data))
            addr, avail, writable = a.rw + off, a.SPAN - off, True
        else:
            off = -1
            addr = {"null": 0, "unmapped": a.hole, "kernel": 0xFFFFFFFF81000000}[where]
            avail, writable = 0, False
        view = bytes(avail and ctypes.string_at(addr if where != "readonly" else a.rw + off, min(avail, 4096)))
        want_err, want_out = dispatch(self.model, cmd, view, avail, writable, self.fuse, self.kinds)
        r = _ioctl(self.devfd, cmd, addr)
        err = ctypes.get_errno() if r < 0 else 0
        desc = f"cmd={cmd:#x} where={where} off={off} data={data.hex()} -> rc={r} errno={err}"
        self.recent.append(desc)
        self.counts[err] += 1
        if err != want_err or (r != 0 and r != -1):
            raise AssertionError(f"errno {err} ({errno.errorcode.get(err)}), model says {want_err} "
                                 f"({errno.errorcode.get(want_err)}): {desc}")
        if off >= 0:
            got = ctypes.string_at(a.rw + off, len(data))
            want = data if want_out is None else want_out + data[len(want_out):]
            if got != want:
                raise AssertionError(f"buffer after the call {got.hex()}, model says {want.hex()}: {desc}")
            ctypes.memset(a.rw + off, 0, len(data))

    # -- between calls ---------------------------------------------------------------------------
    def reopen(self) -> None:
        os.close(self.devfd)
        self.model.close()
        self.devfd = open_retry(self.dev)

    def kexec(self) -> None:
        res = control.request(self.dev, "kexec")
        assert res["ok"], res
        self.model.kexec()
        r = _ioctl(self.devfd, 0xBA03, self.arena.rw)  # the old handle is revoked
        assert r == -1 and ctypes.get_errno() == errno.ENODEV
        os.close(self.devfd)
        self.devfd = open_retry(self.dev)

    def compare_status(self, where: str) -> None:
        st = status(self.dev)
        m = self.model
        got = (st["state"], st["kho_finalized"], [(f["token"], f["state"]) for f in st["outgoing"]],
               [(f["token"], f["state"], f["restored"]) for f in st["incoming"]])
        want = (LABEL[m.state], m.kho, sorted((t, LABEL[f[1]]) for t, f in m.outgoing.items()),
                sorted((t, LABEL[f[0]], f[1]) for t, f in m.incoming.items()))
        assert got == want, f"{where}: emulator {got} != model {want}"


@pytest.mark.vm
def test_fuzz_ioctls(public_dir: Path, transport_name: str, tmp_path: Path, seeds: dict[str, int]) -> None:
    seed = seeds["fuzz"]
    dev = str(public_dir / "liveupdate")
    with ServerProc(dev, transport_name) as srv:
        srv.start()
        pid = srv.proc.pid  # type: ignore[union-attr]
        fz = Fuzzer(dev, seed, transport_name == "fuse", tmp_path)
        base_fds, base_rss = fd_count(pid), rss_kb(pid)
        peak_fds = peak_rss = 0
        t0 = time.monotonic()
        i = 0
        try:
            for i in range(N_IOCTLS):
                fz.one()
                roll = fz.rng.random()
                if roll < 0.0004:
                    fz.reopen()
                elif roll < 0.0007:
                    fz.kexec()
                elif roll < 0.0008:
                    assert control.request(dev, "kho", finalized=True)["ok"]
                    fz.model.kho = True
                if i % CHECK_EVERY == CHECK_EVERY - 1:
                    assert alive(pid), "the emulator died"
                    fz.compare_status(f"after call {i}")
                    nfd, rss = fd_count(pid), rss_kb(pid)
                    peak_fds, peak_rss = max(peak_fds, nfd), max(peak_rss, rss)
                    held = len(fz.model.outgoing) + len(fz.model.incoming)
                    assert nfd <= base_fds + held + 8, f"emulator fds {nfd} (start {base_fds}, files {held})"
                    assert rss <= base_rss + 40 * 1024, f"emulator RSS {rss} KiB (start {base_rss} KiB)"
            fz.compare_status("at the end")
        except BaseException as e:
            recent = "\n  ".join(fz.recent)
            raise AssertionError(f"fuzz seed {seed} (CUSEDEV_FUZZ_SEED={seed}), call #{i}: {e}\n"
                                 f"last calls:\n  {recent}") from e
        finally:
            fz.close()
        elapsed = time.monotonic() - t0
        print(f"\nfuzz: {N_IOCTLS} ioctls in {elapsed:.1f}s ({N_IOCTLS / elapsed:.0f}/s), seed {seed}, "
              f"transport {transport_name}; errnos {dict(sorted(fz.counts.items()))}; emulator fds "
              f"{base_fds}->{peak_fds}, RSS {base_rss}->{peak_rss} KiB")
        assert srv.stop() == 0
        assert_clean_log(srv.stderr())
