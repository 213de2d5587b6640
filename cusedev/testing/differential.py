"""A differential fuzzer for the session ABI: the same seeded call sequences against two devices.

``exec`` runs sequences of session-ABI calls — valid and malformed: struct sizes,
non-zero tails, NULL and half-unmapped pointers, names (empty, 63, 64 bytes
without a NUL, junk after the NUL), tokens, fds of every kind handed to
PRESERVE_FD, device commands on session fds and the reverse, kind mismatches,
repeated RETRIEVE/FINISH, closes, re-opens of the device through /proc, dup, fds used by a
forked child and passed over SCM_RIGHTS — against one device path.  A sequence
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
import ctypes
import mmap
import os
import random
import socket
import sys
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
            c = rng.choice(ALL)
            cmd = c.cmd if rng.random() < 0.75 else rng.choice(BOGUS_CMDS)
            slots = rng.choice((self.devs, self.sessions))
            if self.agree and c in AGREE_ON_DEVICE_ONLY and cmd == c.cmd:
                slots = self.devs
            target = self.pick(slots)
            fd = self.call(target, cmd, self.struct(c, name=self.name(), token=rng.choice(TOKENS)), c,
                           malformed=True)
            (self.sessions if c in (C, R) else self.files).append(fd)
        elif r < 0.82:  # close something
            slots = rng.choice((self.sessions, self.sessions, self.sessions, self.files, self.files, self.devs))
            if slots:
                i = rng.randrange(len(slots))
                if slots[i] >= 0:
                    os.close(slots[i])
                slots[i] = -1
        elif r < 0.87:  # open again (EBUSY), or re-open an fd through /proc
            if rng.random() < 0.5:
                self.devs.append(self.open_dev())
            else:
                # the device only: a session fd's /proc re-open is a documented deviation (ENXIO on the
                # kernel's anon inode, an open of the node on the emulator), and what follows would differ
                fd = self.pick(rng.choice((self.devs, self.devs)))
                try:
                    self.devs.append(os.open(f"/proc/self/fd/{fd}", os.O_RDWR | os.O_CLOEXEC) if fd >= 0 else -1)
                except OSError:
                    self.devs.append(-1)
        elif r < 0.91:  # dup: the same open file under another number
            fd = self.pick(self.sessions)
            self.sessions.append(os.dup(fd) if fd >= 0 else -1)
        else:  # another process uses a session fd: inherited by fork, or received over SCM_RIGHTS
            self.in_child(self.pick(self.sessions), rng.random() < 0.5)

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


def run_seed(seed: int, calls: int, device: str, agree: bool = False) -> int:
    """Run one sequence in a child named ``luo-seed-N``; its exit status."""
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - a forked child
        code = 0
        try:
            _prctl(PR_SET_NAME, f"{COMM_PREFIX}{seed}".encode()[:15], 0, 0, 0)
            Sequence_(seed, calls, device, agree).run()
        except BaseException as e:  # noqa: BLE001
            print(f"seed {seed}: {e!r}", file=sys.stderr, flush=True)
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


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
    """The records of each sequence (by the comm of its processes), each with the trace's header first."""
    header = records[0]
    out: dict[int, list[dict[str, Any]]] = {}
    for r in records[1:]:
        comm = str(r.get("comm", ""))
        if comm.startswith(COMM_PREFIX):
            out.setdefault(int(comm[len(COMM_PREFIX):]), [header]).append(r)
    return out


def compare(path_a: str, path_b: str, seeds: Sequence[int] | None = None, out: Any = None) -> int:
    """Diff two recorded runs sequence by sequence; prints every seed and the totals; 1 on a divergence."""
    from ..tracing import diff
    from ..tracing.record import read_records

    out = out or sys.stdout
    a, b = split_by_seed(list(read_records(path_a))), split_by_seed(list(read_records(path_b)))
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
    c = sub.add_parser("compare", help="diff two recorded runs sequence by sequence")
    c.add_argument("a")
    c.add_argument("b")
    c.add_argument("--seeds", default="", help="compare only these sequences (default: every one in A or B)")
    args = ap.parse_args(argv)
    if args.what == "compare":
        return compare(args.a, args.b, parse_seeds(args.seeds) if args.seeds else None)
    rc = 0
    todo = [(s, args.agree) for s in parse_seeds(args.seeds)] + [(s, True) for s in parse_seeds(args.agree_seeds)]
    for seed, agree in todo:
        print(f"seed {seed}" + (" (agree)" if agree and not args.agree else ""), flush=True)
        if run_seed(seed, args.calls, args.device, agree) != 0:
            rc = 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
