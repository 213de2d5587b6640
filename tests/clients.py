"""Two real clients with one interface: compiled C (tests/c/luo_runner.c) and Python (ctypes).

Every ABI scenario runs through both, so a result holds for compiled callers
as well as for Python's, and each goes through real open()/ioctl()/read().
"""

from __future__ import annotations

import ctypes
import mmap
import os
import subprocess
from pathlib import Path

from cusedev.client import LiveUpdateDevice

ROOT = Path(__file__).resolve().parent.parent
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
)
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
PAGE = mmap.PAGESIZE


def build_c_runner(outdir: Path) -> Path:
    exe = outdir / "luo_runner"
    subprocess.run(
        [
            "gcc",
            "-O2",
            "-Wall",
            "-Werror",
            "-I",
            str(ROOT / "cdefs"),
            "-o",
            str(exe),
            str(ROOT / "tests/c/luo_runner.c"),
        ],
        check=True,
    )
    return exe


class CClient:
    """Drives the compiled runner over a pipe; every call is one line each way."""

    kind = "c"

    def __init__(self, exe: Path):
        self.p = subprocess.Popen([str(exe)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.pid = self.p.pid

    def _cmd(self, line: str) -> list[str]:
        assert self.p.stdin and self.p.stdout
        self.p.stdin.write(line + "\n")
        self.p.stdin.flush()
        return self.p.stdout.readline().split()

    def _fd(self, reply: list[str]) -> int:
        if reply[0] == "err":
            raise OSError(int(reply[1]), os.strerror(int(reply[1])))
        return int(reply[1])

    def open(self, path: str) -> None:
        r = self._cmd(f"open {path}")
        if r[0] == "err":
            raise OSError(int(r[1]), os.strerror(int(r[1])))

    def close(self) -> None:
        self._cmd("close")

    def memfd(self, size: int) -> int:
        return self._fd(self._cmd(f"memfd {size}"))

    def openfile(self, path: str, mode: str) -> int:
        return self._fd(self._cmd(f"openfile {path} {mode}"))

    def tmpfile(self, directory: str) -> int:
        return self._fd(self._cmd(f"tmpfile {directory}"))

    def closefd(self, fd: int) -> None:
        self._cmd(f"closefd {fd}")

    def ioctl(self, cmd: int, data: bytes, where: str = "heap") -> tuple[int, int, bytes]:
        _, rc, err, out = self._cmd(f"ioctl {cmd:x} {where} {data.hex() or '-'}")
        return int(rc), int(err), b"" if out == "-" else bytes.fromhex(out)

    def read(self) -> tuple[int, int]:
        _, rc, err = self._cmd("read")
        return int(rc), int(err)

    def write(self) -> tuple[int, int]:
        _, rc, err = self._cmd("write")
        return int(rc), int(err)

    def quit(self) -> None:
        if self.p.poll() is None:
            try:
                self._cmd("quit")
            except (BrokenPipeError, IndexError):
                pass
            self.p.wait(5)


class PyClient:
    """The same interface in-process, through cusedev.client and ctypes pointers."""

    kind = "python"

    def __init__(self) -> None:
        self.dev: LiveUpdateDevice | None = None
        self.fds: list[int] = []
        self.pid = os.getpid()

    def open(self, path: str) -> None:
        self.dev = LiveUpdateDevice(path)

    def close(self) -> None:
        if self.dev:
            self.dev.close()
            self.dev = None

    def memfd(self, size: int) -> int:
        fd = os.memfd_create("luo-test", os.MFD_CLOEXEC)
        os.write(fd, bytes((i * 7 + 3) & 0xFF for i in range(size)) if size < 1 << 20 else b"")
        if size >= 1 << 20:
            os.ftruncate(fd, size)
        self.fds.append(fd)
        return fd

    def openfile(self, path: str, mode: str) -> int:
        fl = {"path": os.O_PATH, "w": os.O_RDWR, "r": os.O_RDONLY}[mode]
        fd = os.open(path, fl | os.O_CLOEXEC)
        self.fds.append(fd)
        return fd

    def tmpfile(self, directory: str) -> int:
        fd = os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
        self.fds.append(fd)
        return fd

    def closefd(self, fd: int) -> None:
        os.close(fd)
        self.fds.remove(fd)

    def ioctl(self, cmd: int, data: bytes, where: str = "heap") -> tuple[int, int, bytes]:
        assert self.dev is not None
        n = len(data)
        if where == "null":
            addr, cleanup = 0, None
        elif where == "unmapped":
            p = _libc.mmap(None, PAGE, 0, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
            _libc.munmap(p, PAGE)
            addr, cleanup = p, None
        else:
            pages = (n + PAGE - 1) // PAGE + 1
            length = (pages + 1) * PAGE
            base = _libc.mmap(None, length, 3, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
            _libc.munmap(base + pages * PAGE, PAGE)
            addr = base + pages * PAGE - n if where in ("pageend", "readonly") else base
            ctypes.memmove(addr, data, n)
            if where == "readonly":
                _libc.mprotect(base, pages * PAGE, 1)
            cleanup = (base, pages * PAGE)
        try:
            try:
                rc, err = self.dev.ioctl_raw(cmd, addr), 0
            except OSError as e:
                rc, err = -1, e.errno
            out = ctypes.string_at(addr, n) if cleanup else b""
        finally:
            if cleanup:
                _libc.munmap(*cleanup)
        return rc, err, out

    def _rw(self, fn) -> tuple[int, int]:
        assert self.dev is not None
        try:
            return fn(), 0
        except OSError as e:
            return -1, e.errno

    def read(self) -> tuple[int, int]:
        return self._rw(lambda: len(os.read(self.dev.fd, 16)))  # type: ignore[union-attr]

    def write(self) -> tuple[int, int]:
        return self._rw(lambda: os.write(self.dev.fd, b"x"))  # type: ignore[union-attr]

    def quit(self) -> None:
        self.close()
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()
