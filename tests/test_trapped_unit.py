"""Unit tests of the trapped-call fast path's kernel reads, on real /proc and real OFD locks.

The EMFILE check (``SeccompInstaller.reserve``) reads /proc status only when the
limit's last fd number is in use, so it must stay exact on both sides of that
shortcut; the fdinfo lookup keeps the fdinfo file open, so it must show what the
fd number holds *now* and forget a number that is closed.
"""

from __future__ import annotations

import errno
import os
import resource
import socket
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cusedev.device.fdpass import FileTags, SeccompInstaller  # noqa: E402
from cusedev.device.seam import Caller  # noqa: E402

LIMIT = 64


def _child(sock: socket.socket) -> None:  # pragma: no cover - runs in the forked child
    """Lower the fd limit, then arrange the table as told: b"top" (only the last number under the
    limit used), b"full" (every number used), b"free" (the last number free again); reply b"k".
    The fds inherited from pytest go first (after hundreds of tests they may reach past the limit),
    and the parent hears b"k" once the table is as the test starts it."""
    if sock.fileno() != 3:
        os.dup2(sock.fileno(), 3)
        sock = socket.socket(fileno=3)
    keep = 3
    os.closerange(keep + 1, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    resource.setrlimit(resource.RLIMIT_NOFILE, (LIMIT, LIMIT))
    sock.send(b"k")
    while True:
        cmd = sock.recv(16)
        if cmd == b"top":
            os.dup2(keep, LIMIT - 1)
        elif cmd == b"full":
            while True:
                try:
                    os.dup(keep)
                except OSError:
                    break
        elif cmd == b"free":
            os.close(LIMIT - 1)
        else:
            os._exit(0)
        sock.send(b"k")


@pytest.fixture
def child() -> object:
    a, b = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # pragma: no cover
        a.close()
        try:
            _child(b)
        finally:
            os._exit(0)
    b.close()
    assert a.recv(1) == b"k"  # its table is set up

    def tell(cmd: bytes) -> None:
        a.send(cmd)
        assert a.recv(1) == b"k"

    tell.pid = pid  # type: ignore[attr-defined]
    yield tell
    a.send(b"bye")
    a.close()
    os.waitpid(pid, 0)


def _reserve(pid: int) -> int:
    try:
        SeccompInstaller(None).reserve(Caller(pid, 0, 0))  # type: ignore[arg-type]
    except OSError as e:
        return e.errno or 0
    return 0


def test_reserve_exact_around_the_shortcut(child: object) -> None:
    tell = child
    pid = tell.pid  # type: ignore[attr-defined]
    assert _reserve(pid) == 0  # the last number free: the shortcut
    tell(b"top")
    assert _reserve(pid) == 0  # the last number used, lower ones free: the slow reads, still no EMFILE
    tell(b"full")
    assert _reserve(pid) == errno.EMFILE  # every number used: the kernel's EMFILE
    tell(b"free")
    assert _reserve(pid) == 0


def test_fdinfo_lookup_follows_the_fd_number(tmp_path: Path) -> None:
    tags = FileTags()
    tid = os.getpid()
    path = tmp_path / "node"
    path.write_bytes(b"")
    fd = os.open(path, os.O_RDWR)
    other = -1
    try:
        assert tags.tag(fd, 7)
        assert tags.lookup_fd(tid, fd) == 7
        assert tags.lookup_fd(tid, fd) == 7  # again, through the kept fdinfo file
        os.close(fd)
        assert tags.lookup_fd(tid, fd) is None  # closed: forgotten
        other = os.open(path, os.O_RDONLY)  # the same number, an untagged file now
        assert other == fd
        assert tags.lookup_fd(tid, other) is None
        os.close(other)
        fd = os.open(path, os.O_RDWR)
        assert tags.tag(fd, 9)
        assert tags.lookup_fd(tid, fd) == 9  # kept file, new file under the number: its tag
        many = [os.open(path, os.O_RDONLY) for _ in range(2 * FileTags.FDINFO_CACHE)]
        try:
            for n in many:
                assert tags.lookup_fd(tid, n) is None
            kept = len(os.listdir("/proc/self/fd"))
            assert len(tags._fdinfo) == FileTags.FDINFO_CACHE  # bounded: the oldest closed
        finally:
            for n in many:
                os.close(n)
        tags.close()
        assert len(os.listdir("/proc/self/fd")) == kept - FileTags.FDINFO_CACHE - len(many)
    finally:
        tags.close()
        os.close(fd)
