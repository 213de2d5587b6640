"""A differential fuzzer for the session ABI: the same seeded call sequences against two devices.

``exec`` runs sequences of session-ABI calls — valid and malformed: struct sizes,
non-zero tails, NULL and half-unmapped pointers, names (empty, 63, 64 bytes
without a NUL, junk after the NUL), tokens, fds of every kind handed to
PRESERVE_FD, device commands on session fds and the reverse, kind mismatches,
repeated RETRIEVE/FINISH, closes, re-opens of the device and of session fds through /proc, dup, fds
used by a forked child and passed over SCM_RIGHTS — against one device path.  A sequence
is a function of its seed and of the answers so far (a failed call leaves
fd -1 in its slot; calls go mostly to open slots), so two devices that
answer alike get the same calls, and the first divergence is where two runs
part.  Each sequence runs in a child process named ``luo-seed-N`` (its
``comm``), which ends by exiting (every fd closed: the device and the kernel
are back to where they were).

The calls are recorded from outside with `cusedev trace record` (ptrace),
once against a real kernel and once against the emulator, and ``compare``
diffs the two traces sequence by sequence with `trace diff`'s rules.  This
module issues calls and compares traces; it never looks at what the emulator
thinks, so the kernel is the only judge.

    python3 -m cusedev.testing.differential exec --device /dev/liveupdate --seeds 1-20 --calls 30
    python3 -m cusedev.testing.differential compare kernel.jsonl emulator.jsonl
"""

from __future__ import annotations

import argparse
import array
import contextlib
import ctypes
import errno
import fcntl
import hashlib
import mmap
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from ..libc import function
from ..profiles.session import uapi

_ioctl = function("ioctl", (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p))
_mprotect = function("mprotect", (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int))
_prctl = function("prctl", (ctypes.c_int, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong))
PR_SET_NAME = 15
PAGE = mmap.PAGESIZE
COMM_PREFIX = "luo-seed-"

C, R, P, F, G, N = (uapi.CREATE_SESSION, uapi.RETRIEVE_SESSION, uapi.PRESERVE_FD, uapi.RETRIEVE_FD,
                    uapi.FINISH, uapi.GET_NAME)
ALL = (C, R, P, F, G, N)
#: numbers next to the real ones: out of a table, wrong type, wrong direction bits, a VFS-level one
BOGUS_CMDS = (0xBA02, 0xBA3F, 0xBA44, 0xBAFF, 0xAB00, 0xC048BA00, 0x4048BA40, 0x541B)
TOKENS = (0, 1, 2, 7, 0xFFFFFFFFFFFFFFFF, 0x1A)
#: ``--agree``: the session commands 6.19 and 7.2 answer differently on a session fd (spec 12: no GET_NAME
#: on 6.19; RETRIEVE_FD and FINISH on an outgoing session unguarded there); in that mode they go to the
#: device only (EINVAL on both).  Also left out then: empty and unterminated names, a memfd preserved twice.
AGREE_ON_DEVICE_ONLY = (F, G, N)


class Memory:
    """Two pages, the second PROT_NONE: a struct can be placed so that it runs into the hole."""

    def __init__(self) -> None:
        self.map = mmap.mmap(-1, 2 * PAGE)
        self.base = ctypes.addressof(ctypes.c_char.from_buffer(self.map))
        if _mprotect(self.base + PAGE, PAGE, 0) != 0:
            raise OSError(ctypes.get_errno(), "mprotect")

    def place(self, data: bytes, readable: int | None = None) -> int:
        """``data`` at an address; ``readable``: only that many bytes before the hole."""
        at = PAGE - (len(data) if readable is None else readable)
        at = max(0, at - (at % 4 if readable is None else 0))
        n = min(len(data), PAGE - at)
        self.map[at:at + n] = data[:n]
        return self.base + at

    def read(self, addr: int, n: int) -> bytes:
        off = addr - self.base
        return bytes(self.map[off:off + min(n, PAGE - off)])


def ioctl(fd: int, cmd: int, addr: int) -> tuple[int, int]:
    r = _ioctl(fd, cmd & 0xFFFFFFFF, addr or None)
    return (r, 0) if r >= 0 else (r, ctypes.get_errno())


class Sequence_:
    """One seeded sequence, run in the current (child) process."""

    def __init__(self, seed: int, calls: int, device: str, agree: bool = False):
        self.rng = random.Random(seed)
        self.seed, self.calls, self.device = seed, calls, device
        self.agree = agree  # only calls that 6.19 and 7.2 answer alike (spec 12): see ``AGREE``
        self.mem = Memory()
        self.devs: list[int] = []
        self.sessions: list[int] = []
        self.files: list[int] = []
        self.names: list[bytes] = []
        self.counter = 0

    # -- building blocks -------------------------------------------------------------------------------
    def pick(self, slots: list[int]) -> int:
        """A slot's fd: mostly an open one, half of those times the newest (calls cluster on the file just
        made).  Which slots are open follows from earlier answers, so two devices that answered alike so far
        get the same pick; after a divergence the sequences may part, and the first divergence is reported."""
        r = self.rng.random()
        live = [fd for fd in slots if fd >= 0]
        if not live or r < 0.1:
            return slots[self.rng.randrange(len(slots))] if slots else -1
        return live[-1] if r < 0.55 else live[self.rng.randrange(len(live))]

    def open_dev(self) -> int:
        try:
            return os.open(self.device, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            return -1

    def name(self) -> bytes:
        r = self.rng.random()
        if r < 0.15 and self.names:
            return self.rng.choice(self.names)  # EEXIST, or a retrieve of a known name
        if r < 0.22:
            return b"" if not self.agree else b"e"  # 6.19 accepts an empty name, 7.2 refuses it
        if r < 0.29:
            return b"n" * 63
        if r < 0.34:
            return b"X" * 64 if not self.agree else b"X" * 63  # no NUL in 64 bytes: 6.19 cuts it, 7.2 refuses
        if r < 0.40:
            return b"junk\0after-the-nul"
        self.counter += 1
        n = f"s{self.seed}-{self.counter}".encode()
        self.names.append(n)
        return n

    def memfd(self) -> int:
        fd = os.memfd_create(f"m{self.counter}", os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if self.rng.random() < .3
                                                                   else 0))
        size = self.rng.choice((0, 1, 100, 4096, 5000))
        if size:
            os.write(fd, self.rng.randbytes(size))
        return fd

    def some_fd(self) -> int:
        """An fd of some kind for PRESERVE_FD: memfds mostly, and everything that must be refused."""
        r = self.rng.random()
        if r < 0.45:
            fd = self.memfd()
            self.files.append(fd)
            return fd
        if r < 0.55 and self.files and not self.agree:
            return self.pick(self.files)  # preserved again (EBUSY / EEXIST; 6.19 takes the same memfd twice)
        if r < 0.62:
            fd = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
            self.files.append(fd)
            return fd
        if r < 0.67:
            a, b = os.pipe()
            self.files += [a, b]
            return a
        if r < 0.72:
            return self.pick(self.sessions)
        if r < 0.77:
            return self.pick(self.devs)
        if r < 0.82:
            fd = os.open(self.device, os.O_PATH | os.O_CLOEXEC)
            self.files.append(fd)
            return fd
        return self.rng.choice((-1, 999))

    def struct(self, c: uapi.Command, **v: Any) -> bytes:
        vals = {"size": c.size, "fd": -1, "name": b"", "token": 0, "reserved": 0, **v}
        return c.struct.pack(*(vals[f] for f in c.fields))

    # -- one call --------------------------------------------------------------------------------------
    def call(self, fd: int, cmd: int, data: bytes, c: uapi.Command | None, malformed: bool = False) -> int:
        """Issue the ioctl (sometimes with its memory made wrong); the fd it returned, or -1."""
        readable = None
        addr: int
        if malformed:
            r = self.rng.random()
            if r < 0.2:
                ioctl(fd, cmd, 0)
                return -1
            if r < 0.4:
                readable = self.rng.choice((0, 2, 4, 8, max(4, len(data) - 1)))
            elif r < 0.75:
                size = self.rng.choice((0, 3, 4, 8, len(data) - 1, len(data) + 8, len(data) + 64))
                tail = bytes(max(0, size - len(data)))
                if tail and self.rng.random() < 0.5:
                    t = bytearray(tail)
                    t[self.rng.randrange(len(t))] = self.rng.randrange(1, 256)
                    tail = bytes(t)
                data = size.to_bytes(4, sys.byteorder) + data[4:] + tail
        addr = self.mem.place(data, readable)
        r, _err = ioctl(fd, cmd, addr)
        if r < 0 or c is None or c not in (C, R, F) or cmd != c.cmd:
            return -1
        got = self.mem.read(addr, 8)
        return int.from_bytes(got[4:8], sys.byteorder, signed=True) if len(got) == 8 else -1

    def step(self) -> None:
        rng = self.rng
        r = rng.random()
        if r < 0.14:  # CREATE_SESSION
            fd = self.call(self.pick(self.devs) if rng.random() < .9 else self.pick(self.sessions), C.cmd,
                           self.struct(C, name=self.name()), C)
            self.sessions.append(fd)
        elif r < 0.20:  # RETRIEVE_SESSION: ENOENT without a live update
            self.sessions.append(self.call(self.pick(self.devs), R.cmd, self.struct(R, name=self.name()), R))
        elif r < 0.40:  # PRESERVE_FD
            target = self.pick(self.sessions) if rng.random() < .9 else self.pick(self.devs)
            self.call(target, P.cmd, self.struct(P, fd=self.some_fd(), token=rng.choice(TOKENS)), P)
        elif r < 0.46:  # RETRIEVE_FD: on an outgoing session, a kind mismatch
            self.files.append(self.call(self.pick(self.sessions if not self.agree else self.devs), F.cmd,
                                        self.struct(F, token=rng.choice(TOKENS)), F))
        elif r < 0.51:  # FINISH
            self.call(self.pick(self.sessions if not self.agree else self.devs), G.cmd,
                      self.struct(G, reserved=rng.choice((0, 0, 1))), G)
        elif r < 0.58:  # GET_NAME
            buf = self.struct(N, reserved=rng.choice((0, 0, 0, 5)), name=rng.randbytes(64) if rng.random() < .3
                              else b"")
            on_session = rng.random() < .9 and not self.agree  # 6.19 has no GET_NAME: only a device's EINVAL
            self.call(self.pick(self.sessions) if on_session else self.pick(self.devs), N.cmd, buf, N)
        elif r < 0.74:  # malformed: any command, any file, wrong sizes, tails, pointers; unknown numbers
            self.malformed()
        elif r < 0.82:  # close something
            self.close_one()
        elif r < 0.87:  # open again (EBUSY), or re-open an fd through /proc
            if rng.random() < 0.5:
                self.devs.append(self.open_dev())
            else:
                # the device (EBUSY while held) or a session fd (ENXIO: the kernel's anon inode has no open,
                # nor has the emulator's session node)
                fd = self.pick(rng.choice((self.devs, self.sessions)))
                try:
                    self.devs.append(os.open(f"/proc/self/fd/{fd}", os.O_RDWR | os.O_CLOEXEC) if fd >= 0 else -1)
                except OSError:
                    self.devs.append(-1)
        elif r < 0.91:  # dup: the same open file under another number
            self.dup_session()
        else:  # another process uses a session fd: inherited by fork, or received over SCM_RIGHTS
            self.in_child(self.pick(self.sessions), rng.random() < 0.5)

    def malformed(self) -> None:
        rng = self.rng
        c = rng.choice(ALL)
        cmd = c.cmd if rng.random() < 0.75 else rng.choice(BOGUS_CMDS)
        slots = rng.choice((self.devs, self.sessions))
        if self.agree and c in AGREE_ON_DEVICE_ONLY and cmd == c.cmd:
            slots = self.devs
        target = self.pick(slots)
        fd = self.call(target, cmd, self.struct(c, name=self.name(), token=rng.choice(TOKENS)), c,
                       malformed=True)
        (self.sessions if c in (C, R) else self.files).append(fd)

    def close_one(self) -> None:
        slots = self.rng.choice((self.sessions, self.sessions, self.sessions, self.files, self.files, self.devs))
        if slots:
            i = self.rng.randrange(len(slots))
            if slots[i] >= 0:
                os.close(slots[i])
            slots[i] = -1

    def dup_session(self) -> None:
        fd = self.pick(self.sessions)
        self.sessions.append(os.dup(fd) if fd >= 0 else -1)

    def in_child(self, fd: int, over_socket: bool) -> None:
        """A child makes one call (GET_NAME or PRESERVE_FD of a new memfd) on the session fd, then exits."""
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        sub = self.rng.random()
        token = self.rng.choice(TOKENS)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - a forked child
            code = 0
            try:
                a.close()
                use = fd
                if over_socket:
                    fds = array.array("i")
                    _m, anc, _f, _a = b.recvmsg(1, socket.CMSG_LEN(fds.itemsize))
                    use = -1
                    for _lvl, _typ, data in anc:
                        fds.frombytes(data[:fds.itemsize])
                        use = fds[0]
                if sub < 0.5 and not self.agree:
                    self.call(use, N.cmd, self.struct(N), N)
                else:
                    m = self.memfd()
                    self.call(use, P.cmd, self.struct(P, fd=m, token=token), P)
            except BaseException:  # noqa: BLE001 - a child never returns into the parent's code
                code = 1
            os._exit(code)
        b.close()
        if over_socket:
            if fd >= 0:
                a.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
            else:
                a.send(b"x")
        os.waitpid(pid, 0)
        a.close()

    def run(self) -> None:
        self.devs.append(self.open_dev())
        for _ in range(self.calls):
            self.step()

    def hold(self) -> list[socket.socket]:
        """The end of part 1, before a live update: the device closed (it admits one open file, and the next
        sequence opens it), some session fds closed (those sessions must not cross), and one put in flight:
        sent over SCM_RIGHTS into a socket nobody reads, then closed here (the message alone keeps it
        alive).  The sockets returned must stay open until the kexec."""
        for i, fd in enumerate(self.devs):
            if fd >= 0:
                os.close(fd)
                self.devs[i] = -1
        for i, fd in enumerate(self.sessions):
            if fd >= 0 and self.rng.random() < 0.2:
                os.close(fd)
                self.sessions[i] = -1
        live = [i for i, fd in enumerate(self.sessions) if fd >= 0]
        if not live:
            return []
        i = self.rng.choice(live)
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        a.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [self.sessions[i]]))])
        os.close(self.sessions[i])
        self.sessions[i] = -1
        return [a, b]


class BeforeKexec(Sequence_):
    """Part 1 of a two-part sequence: the calls of ``Sequence_`` with more CREATE_SESSION and PRESERVE_FD of
    memfds, so that there is something to carry; then ``hold``."""

    def step(self) -> None:
        rng = self.rng
        r = rng.random()
        if r < 0.15:
            self.sessions.append(self.call(self.pick(self.devs), C.cmd, self.struct(C, name=self.name()), C))
        elif r < 0.35:
            fd = self.memfd()
            self.files.append(fd)
            self.call(self.pick(self.sessions), P.cmd, self.struct(P, fd=fd, token=rng.choice(TOKENS)), P)
        else:
            super().step()


class AfterKexec(Sequence_):
    """Part 2 of a two-part sequence: the calls after the live update that followed part 1 of the same seed.

    RETRIEVE_SESSION by the names part 1 used (``s<seed>-1`` .. ``-8`` and the fixed ones, found or not),
    RETRIEVE_FD with the tokens part 1 used and others, FINISH (repeated too), GET_NAME, device commands
    and malformed calls on the incoming sessions, new sessions beside them, a retrieved memfd preserved
    again, and reads of what was retrieved (``readback`` lines: size, offset, seals, flags, digest —
    what a trace does not show of a file).  Like part 1, a function of the seed and the answers."""

    def __init__(self, seed: int, calls: int, device: str):
        super().__init__(seed, calls, device)
        self.counter = 100  # new names (``s<seed>-101`` ..) apart from part 1's, which ``known`` draws
        self.retrieved: list[int] = []
        self.incoming: list[int] = []  # what RETRIEVE_SESSION returned (also in ``sessions``)

    def run(self) -> None:
        """A sweep first (every name part 1 may have made, in order; two tokens on each session found),
        then the random calls."""
        self.devs.append(self.open_dev())
        for k in range(1, 9):
            fd = self.call(self.devs[0], R.cmd, self.struct(R, name=f"s{self.seed}-{k}".encode()), R)
            self.sessions.append(fd)
            self.incoming.append(fd)
        for fd in [fd for fd in self.incoming if fd >= 0]:
            for token in self.rng.sample(TOKENS, 2):
                self.retrieved.append(self.call(fd, F.cmd, self.struct(F, token=token), F))
        for _ in range(self.calls):
            self.step()

    def known(self) -> bytes:
        r = self.rng.random()
        if r < 0.7:
            return f"s{self.seed}-{self.rng.randint(1, 8)}".encode()
        if r < 0.85:
            return self.rng.choice((b"n" * 63, b"junk", b"junk\0after-the-nul", b"X" * 63, b""))
        return self.name()

    def step(self) -> None:
        rng = self.rng
        r = rng.random()
        if r < 0.22:  # RETRIEVE_SESSION (sometimes on a session fd: a kind mismatch)
            target = self.pick(self.devs) if rng.random() < .9 else self.pick(self.sessions)
            fd = self.call(target, R.cmd, self.struct(R, name=self.known()), R)
            self.sessions.append(fd)
            self.incoming.append(fd)
        elif r < 0.42:  # RETRIEVE_FD with a token part 1 may have used, or another; mostly on an incoming session
            r = rng.random()
            live = [fd for fd in self.incoming if fd >= 0]
            target = live[rng.randrange(len(live))] if r < .8 and live else self.pick(self.sessions) if r < .95 \
                else self.pick(self.devs)
            self.retrieved.append(self.call(target, F.cmd, self.struct(F, token=rng.choice(TOKENS + (3, 0x1B))), F))
        elif r < 0.50:  # FINISH, repeated too
            target = self.pick(self.incoming) if rng.random() < .7 else self.pick(self.sessions)
            self.call(target, G.cmd, self.struct(G, reserved=rng.choice((0, 0, 0, 1))), G)
        elif r < 0.55:  # GET_NAME of an incoming session
            self.call(self.pick(self.sessions), N.cmd, self.struct(N), N)
        elif r < 0.61:  # CREATE_SESSION, by a name an incoming session may have
            self.sessions.append(self.call(self.pick(self.devs), C.cmd, self.struct(C, name=self.known()), C))
        elif r < 0.69:  # PRESERVE_FD: a retrieved memfd again, or any fd; into an incoming or a new session
            fd = self.pick(self.retrieved) if rng.random() < .6 else self.some_fd()
            self.call(self.pick(self.sessions), P.cmd, self.struct(P, fd=fd, token=rng.choice(TOKENS)), P)
        elif r < 0.77:
            self.malformed()
        elif r < 0.84:
            self.readback()
        elif r < 0.91:
            self.close_one()
        elif r < 0.94:
            self.dup_session()
        elif r < 0.97:
            self.devs.append(self.open_dev())
        else:
            self.in_child(self.pick(self.sessions), rng.random() < 0.5)

    def close_one(self) -> None:
        slots = self.rng.choice((self.sessions, self.sessions, self.retrieved, self.files, self.devs))
        if slots:
            i = self.rng.randrange(len(slots))
            fd = slots[i]
            if fd >= 0:
                os.close(fd)
            for slots in (self.sessions, self.incoming, self.retrieved, self.files, self.devs):
                slots[:] = [-1 if x == fd else x for x in slots]

    def readback(self) -> None:
        """One ``readback`` line about a retrieved file (sometimes written to first): what crossed."""
        fd = self.pick(self.retrieved)
        line = f"readback seed {self.seed}:"
        if fd < 0:
            print(f"{line} no file", flush=True)
            return
        if self.rng.random() < 0.3:
            data = self.rng.randbytes(self.rng.choice((1, 100, 5000)))
            try:
                line += f" wrote {os.write(fd, data)}"
            except OSError as e:
                line += f" write {errno.errorcode.get(e.errno or 0, e.errno)}"
        st = os.fstat(fd)
        try:
            seals = f"{fcntl.fcntl(fd, F_GET_SEALS):#x}"
        except OSError as e:
            seals = errno.errorcode.get(e.errno or 0, str(e.errno))
        flags = fcntl.fcntl(fd, fcntl.F_GETFL) & (os.O_ACCMODE | os.O_APPEND | os.O_NONBLOCK)
        cloexec = fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        digest = hashlib.sha256(os.pread(fd, st.st_size, 0)).hexdigest()[:16]
        print(f"{line} size {st.st_size} offset {os.lseek(fd, 0, os.SEEK_CUR)} seals {seals} flags {flags:#o}"
              f" cloexec {cloexec} sha256 {digest}", flush=True)


F_GET_SEALS = 1034


def run_seed(seed: int, calls: int, device: str, agree: bool = False, part: int = 0) -> int:
    """Run one sequence in a child named ``luo-seed-N``; its exit status.  ``part`` 1: part 1 of a two-part
    sequence, whose child then holds its sessions (until killed, as a kexec does) and only reports that it
    got there; 2: part 2 (``AfterKexec``)."""
    sys.stdout.flush()
    r, w = os.pipe() if part == 1 else (-1, -1)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - a forked child
        code = 0
        try:
            _prctl(PR_SET_NAME, f"{COMM_PREFIX}{seed}".encode()[:15], 0, 0, 0)
            if part == 2:
                AfterKexec(seed, calls, device).run()
            else:
                seq = BeforeKexec(seed, calls, device) if part == 1 else Sequence_(seed, calls, device, agree)
                seq.run()
            if part == 1:
                kept = seq.hold()
                os.close(r)
                null = os.open(os.devnull, os.O_RDWR)
                for n in (0, 1, 2):  # nobody waits for the end of our output: a caller's pipe sees EOF
                    os.dup2(null, n)
                os.write(w, b"1")
                os.close(w)
                while kept is not None:
                    time.sleep(3600)
        except BaseException as e:  # noqa: BLE001
            print(f"seed {seed}: {e!r}", file=sys.stderr, flush=True)
            code = 1
        os._exit(code)
    if part == 1:
        os.close(w)
        holding = os.read(r, 1) == b"1"
        os.close(r)
        if holding:
            return 0
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) or (1 if part == 1 else 0)


def parse_seeds(text: str) -> list[int]:
    """``1-20``, ``3,7,9`` or a mix."""
    out: list[int] = []
    for part in text.split(","):
        if "-" in part.strip()[1:]:
            a, b = part.split("-", 1)
            out += range(int(a), int(b) + 1)
        elif part.strip():
            out.append(int(part))
    return out


# -- comparing two recorded runs -------------------------------------------------------------------------
def split_by_seed(records: list[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    """The records of each sequence (by the comm of its processes), each with the trace's header first.
    In an emulator's own trace the session files are named first, from the whole trace: the emulator's
    own opens that make them are in no sequence."""
    from ..tracing.diff import session_names

    header = records[0]
    if "recorder" not in header:
        files = session_names(records, header)
        records = [header] + [{**r, "on": files[r["fh"]][0], "session": files[r["fh"]][1]}
                              if r.get("type") == "ioctl" and "on" not in r and r.get("fh") in files else r
                              for r in records[1:]]
    out: dict[int, list[dict[str, Any]]] = {}
    for r in records[1:]:
        comm = str(r.get("comm", ""))
        if comm.startswith(COMM_PREFIX):
            out.setdefault(int(comm[len(COMM_PREFIX):]), [header]).append(r)
    return out


def part_of(records: list[dict[str, Any]], part: int) -> list[dict[str, Any]]:
    """The records of one part of a two-part run (header first): in a trace that holds a kexec (the
    emulator's own, across `cusedev kexec`), part 1 is what precedes the first one and part 2 what follows
    it; a trace without one (`trace record` of one part) is taken whole."""
    at = next((i for i, r in enumerate(records) if r.get("type") == "kexec"), None)
    if not part or at is None:
        return records
    return records[:at] if part == 1 else records[:1] + records[at + 1:]


def compare(path_a: str, path_b: str, seeds: Sequence[int] | None = None, out: Any = None, part: int = 0) -> int:
    """Diff two recorded runs sequence by sequence; prints every seed and the totals; 1 on a divergence.
    ``part``: compare only that part of traces that cross a kexec (``part_of``)."""
    from ..tracing import diff
    from ..tracing.record import read_records

    out = out or sys.stdout
    a = split_by_seed(part_of(list(read_records(path_a)), part))
    b = split_by_seed(part_of(list(read_records(path_b)), part))
    seeds = sorted(set(a) | set(b)) if seeds is None else list(seeds)
    total = ioctls = bad = 0
    devs: dict[str, int] = {}
    for seed in seeds:
        ha, ca = diff.reduce(a.get(seed, [read_header(path_a)]))
        hb, cb = diff.reduce(b.get(seed, [read_header(path_b)]))
        sa, sb = diff.Side(path_a, ha, ca), diff.Side(path_b, hb, cb)
        res = diff.compare(sa, sb)
        n = sum(1 for c in ca if c.kind == "ioctl")
        total += 1
        ioctls += min(n, sum(1 for c in cb if c.kind == "ioctl"))
        for k, v in res.deviations.items():
            devs[k] = devs.get(k, 0) + v
        if res.equal:
            out.write(f"seed {seed}: {len(ca)} calls ({n} ioctls) compared: equal\n")
        else:
            bad += 1
            out.write(f"seed {seed}: DIVERGED\n")
            diff.report(sa, sb, res, out=out)
    extra = ", ".join(f"{k} {v}" for k, v in sorted(devs.items()))
    out.write(f"differential: {total} sequences, {ioctls} ioctls compared, {bad} divergent sequences"
              + (f" (documented deviations: {extra})" if extra else "") + "\n")
    return 1 if bad or not total else 0


def record_hold(out: str, device: str, seeds: str, calls: int, run: str | None = None,
                timeout: float = 600.0) -> int:
    """Part 1 of the two-part sequences, recorded with `trace record` (under `cusedev run --device RUN` when
    given): returns once every sequence holds its sessions and the recorder has let go of them (SIGTERM:
    it detaches, the trace is complete), so that a kexec, real or `cusedev kexec`, comes next.  The
    holders' output and the recorder's go to ``out``.log."""
    ready = out + ".ready"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(ready)
    py = sys.executable
    cmd = [py, "-m", "cusedev", "trace", "record", "-o", out, "--abi", "7.2", "--device", device, "--",
           py, "-m", "cusedev.testing.differential", "exec", "--part", "1", "--ready", ready, "--device", device,
           "--seeds", seeds, "--calls", str(calls)]
    if run:
        cmd = [py, "-m", "cusedev", "run", "--device", run, "--", *cmd]
    with open(out + ".log", "wb") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while not os.path.exists(ready):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            print(f"part 1: no sequence holding (exit {proc.wait()}; see {out}.log)", file=sys.stderr)
            return 1
        time.sleep(0.1)
    recorder, main, rc, holders = open(ready).read().split(" ", 3)
    # the recorder sees its command exit (and reaps it) before it is told to let the holders go
    while _alive(main) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(int(recorder), signal.SIGTERM)
    while _alive(recorder) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    print(f"part 1: seeds {seeds} holding their sessions (pids {holders.strip()}), exit {rc}", flush=True)
    return int(rc)


def read_header(path: str) -> dict[str, Any]:
    from ..tracing.record import read_records

    return next(iter(read_records(path)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m cusedev.testing.differential")
    sub = ap.add_subparsers(dest="what", required=True)
    e = sub.add_parser("exec", help="run the seeded sequences against a device")
    e.add_argument("--device", default="/dev/liveupdate")
    e.add_argument("--seeds", default="1-20")
    e.add_argument("--calls", type=int, default=40)
    e.add_argument("--agree", action="store_true",
                   help="only calls that profiles 6.19 and 7.2 answer alike (spec section 12)")
    e.add_argument("--agree-seeds", default="",
                   help="more seeds, run after --seeds as with --agree (one traced process for both sets)")
    e.add_argument("--part", type=int, choices=(1, 2), default=0,
                   help="part 1 of two-part sequences (they then hold their sessions for a kexec) or part 2")
    e.add_argument("--ready", default="", help="part 1: write 'RECORDER-PID PID EXIT HOLDER-PIDS' here at the end")
    h = sub.add_parser("record-hold", help="record part 1 (trace record), return with the sequences holding")
    h.add_argument("-o", dest="out", required=True)
    h.add_argument("--device", default="/dev/liveupdate")
    h.add_argument("--run", default="", help="under `cusedev run --device RUN` (an emulator's node)")
    h.add_argument("--seeds", default="1-3")
    h.add_argument("--calls", type=int, default=40)
    c = sub.add_parser("compare", help="diff two recorded runs sequence by sequence")
    c.add_argument("a")
    c.add_argument("b")
    c.add_argument("--seeds", default="", help="compare only these sequences (default: every one in A or B)")
    c.add_argument("--part", type=int, choices=(1, 2), default=0,
                   help="of a trace across a kexec, only the part before (1) or after (2) it")
    args = ap.parse_args(argv)
    if args.what == "compare":
        return compare(args.a, args.b, parse_seeds(args.seeds) if args.seeds else None, part=args.part)
    if args.what == "record-hold":
        return record_hold(args.out, args.device, args.seeds, args.calls, args.run or None)
    rc = 0
    todo = [(s, args.agree) for s in parse_seeds(args.seeds)] + [(s, True) for s in parse_seeds(args.agree_seeds)]
    holders = []
    for seed, agree in todo:
        print(f"seed {seed}" + (" (agree)" if agree and not args.agree else "")
              + (f" (part {args.part})" if args.part else ""), flush=True)
        if run_seed(seed, args.calls, args.device, agree, args.part) != 0:
            rc = 1
    if args.part == 1:
        holders = _children()
    if args.ready:
        with open(args.ready + ".tmp", "w") as f:
            f.write(f"{os.getppid()} {os.getpid()} {rc} {','.join(holders) or '-'}\n")
        os.rename(args.ready + ".tmp", args.ready)
    return rc


def _alive(pid: str) -> bool:
    """Running (not gone, not a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _children() -> list[str]:
    """Our children's pids (part 1's holders), from /proc."""
    try:
        with open(f"/proc/{os.getpid()}/task/{os.getpid()}/children") as f:
            return f.read().split()
    except OSError:
        return []


if __name__ == "__main__":
    sys.exit(main())
