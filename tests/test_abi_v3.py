"""Every errno row of the v3 spec (sections 2, 3, 5 and the reboot-free events of 4), through real syscalls.

Each test runs with a compiled C client and with the Python client, against
the transport of this run (FUSE file on the host, CUSE in the VM): every
argument shape (NULL, unmapped, read-only, ending at a hole, oversized) goes
through CUSE's retry iovecs in the VM phase (``vm``), at one server start.
"""

from __future__ import annotations

import errno
import os
import struct

import pytest
from clients import CClient, PyClient, build_c_runner

from cusedev import uapi

pytestmark = pytest.mark.vm
U = uapi
GS = U.LIVEUPDATE_IOCTL_GET_STATE
NORMAL, PREPARED, FROZEN = U.LIVEUPDATE_STATE_NORMAL, U.LIVEUPDATE_STATE_PREPARED, U.LIVEUPDATE_STATE_FROZEN
PREPARE, FREEZE, FINISH, CANCEL = (
    U.LIVEUPDATE_PREPARE,
    U.LIVEUPDATE_FREEZE,
    U.LIVEUPDATE_FINISH,
    U.LIVEUPDATE_CANCEL,
)


def enc(name: str, **kw: int) -> bytes:
    c = U.codec(f"struct liveupdate_ioctl_{name}")
    kw.setdefault("size", c.size)
    return c.encode(**kw)


def dec(name: str, data: bytes) -> dict:
    return U.codec(f"struct liveupdate_ioctl_{name}").decode(data)


def ok(r: tuple[int, int, bytes]) -> bytes:
    assert r[:2] == (0, 0), f"expected success, got errno {r[1]} ({os.strerror(r[1])})"
    return r[2]


def err(r: tuple[int, int, bytes]) -> int:
    assert r[0] == -1, f"expected failure, got {r}"
    return r[1]


class Luo:
    """Typed helpers over a test client; every call is a real ioctl."""

    def __init__(self, c):
        self.c = c

    def state(self) -> int:
        return dec("get_state", ok(self.c.ioctl(GS, enc("get_state"))))["state"]

    def event(self, ev: int):
        return self.c.ioctl(U.LIVEUPDATE_IOCTL_SET_EVENT, enc("set_event", event=ev))

    def preserve(self, fd: int, token: int):
        return self.c.ioctl(U.LIVEUPDATE_IOCTL_FD_PRESERVE, enc("fd_preserve", fd=fd, token=token))

    def unpreserve(self, token: int):
        return self.c.ioctl(U.LIVEUPDATE_IOCTL_FD_UNPRESERVE, enc("fd_unpreserve", token=token))

    def restore(self, token: int):
        return self.c.ioctl(U.LIVEUPDATE_IOCTL_FD_RESTORE, enc("fd_restore", token=token))

    def fd_state(self, token: int, incoming: int = 0):
        return self.c.ioctl(
            U.LIVEUPDATE_IOCTL_GET_FD_STATE, enc("get_fd_state", token=token, incoming=incoming)
        )

    def fd_state_ok(self, token: int, incoming: int = 0) -> int:
        return dec("get_fd_state", ok(self.fd_state(token, incoming)))["state"]

    def fd_event(self, token: int, ev: int):
        return self.c.ioctl(U.LIVEUPDATE_IOCTL_SET_FD_EVENT, enc("set_fd_event", token=token, event=ev))


@pytest.fixture(scope="session")
def c_runner(tmp_path_factory):
    return build_c_runner(tmp_path_factory.mktemp("c"))


def make_client(kind: str, c_runner):
    return CClient(c_runner) if kind == "c" else PyClient()


@pytest.fixture(params=["c", "python"])
def client(request, c_runner):
    c = make_client(request.param, c_runner)
    yield c
    c.quit()


@pytest.fixture
def other_client(client, c_runner):
    c = make_client("python" if client.kind == "c" else "c", c_runner)
    yield c
    c.quit()


@pytest.fixture
def device_path(shared_emulator):
    """The module's emulator (reset to a fresh machine after each test)."""
    return shared_emulator.device


@pytest.fixture
def luo(client, device_path):
    client.open(device_path)
    yield Luo(client)
    client.close()


# -- section 2: dispatch order ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("cmd", "where", "data", "want"),
    [
        (U.IO(0xBA, 7), "heap", struct.pack("=II", 8, 0), errno.EINVAL),
        (U.IO(0xBA, 0xFF), "null", b"", errno.EINVAL),
        (U.IO(0x42, 9), "null", b"", errno.EINVAL),  # nr first: the type is not looked at yet
        (GS, "null", b"", errno.EFAULT),
        (GS, "unmapped", b"", errno.EFAULT),
        (U.LIVEUPDATE_IOCTL_FD_PRESERVE, "null", b"", errno.EFAULT),
        (U.IO(0x42, 3), "heap", struct.pack("=II", 8, 0), errno.ENOTTY),
        (U.IOR(0xBA, 3, 8), "heap", struct.pack("=II", 8, 0), errno.ENOTTY),
        (U.IOW(0xBA, 3, 8), "heap", struct.pack("=II", 8, 0), errno.ENOTTY),
        (U.IOWR(0xBA, 4, 8), "heap", struct.pack("=II", 8, 0), errno.ENOTTY),
        (GS, "heap", struct.pack("=II", 7, 0), errno.EINVAL),
        (GS, "heap", struct.pack("=II", 0, 0), errno.EINVAL),
        (U.LIVEUPDATE_IOCTL_GET_FD_STATE, "heap", struct.pack("=IIII", 12, 0, 0, 0), errno.EINVAL),
        (GS, "heap", struct.pack("=III", 12, 0, 1), errno.E2BIG),
        (GS, "pageend", struct.pack("=IIIIII", 24, 0, 0, 0, 0, 0x100), errno.E2BIG),
        (GS, "pageend", struct.pack("=IIII", 4096, 0, 0, 0), errno.EFAULT),  # zero tail runs off the page
        (GS, "pageend", struct.pack("=I", 8), errno.EFAULT),
        (GS, "pageend", struct.pack("=II", 0xFFFFFFFF, 0), errno.EFAULT),
        (GS, "readonly", struct.pack("=II", 8, 0), errno.EFAULT),  # handler ran; copy-out faulted
        (U.LIVEUPDATE_IOCTL_SET_EVENT, "heap", struct.pack("=II", 8, 7), errno.EINVAL),
    ],
)
def test_dispatch_errnos(luo, cmd, where, data, want) -> None:
    assert err(luo.c.ioctl(cmd, data, where)) == want
    assert luo.state() == NORMAL


def test_size_rules_and_writeback(luo) -> None:
    assert dec("get_state", ok(luo.c.ioctl(GS, enc("get_state", state=0x55)))) == {"size": 8, "state": NORMAL}
    out = ok(luo.c.ioctl(GS, struct.pack("=IIII", 16, 0x55, 0, 0)))
    assert out == struct.pack("=IIII", 16, NORMAL, 0, 0)
    assert ok(luo.c.ioctl(GS, struct.pack("=II", 8, 0), "pageend")) == struct.pack("=II", 8, NORMAL)
    # size == sizeof of a struct with a trailing output; a caller's padding bytes come back as they were
    fd = luo.c.memfd(4096)
    ok(luo.preserve(fd, 11))
    raw = struct.pack("=IB3sQI4s", 24, 0, b"\xaa\xbb\xcc", 11, 0, b"\x01\x02\x03\x04")
    out = ok(luo.c.ioctl(U.LIVEUPDATE_IOCTL_GET_FD_STATE, raw))
    assert out == struct.pack("=IB3sQI4s", 24, 0, b"\xaa\xbb\xcc", 11, NORMAL, b"\x01\x02\x03\x04")
    # size == min_size (16): the output field is outside what the caller owns and is left alone
    raw = struct.pack("=IIQ", 16, 0, 11) + b"\xee" * 8
    assert ok(luo.c.ioctl(U.LIVEUPDATE_IOCTL_GET_FD_STATE, raw)) == raw
    # size > sizeof with a zero tail is accepted and only sizeof bytes are written back
    raw = struct.pack("=IIQIIQ", 32, 0, 11, 0x77, 0, 0)
    out = ok(luo.c.ioctl(U.LIVEUPDATE_IOCTL_GET_FD_STATE, raw))
    assert out == struct.pack("=IIQIIQ", 32, 0, 11, NORMAL, 0, 0)


# -- section 3: the device ------------------------------------------------------------------------
def test_exclusive_open(luo, device_path, other_client) -> None:
    with pytest.raises(OSError) as ei:
        other_client.open(device_path)
    assert ei.value.errno == errno.EBUSY
    luo.c.close()
    other_client.open(device_path)
    with pytest.raises(OSError) as ei:
        luo.c.open(device_path)
    assert ei.value.errno == errno.EBUSY
    other_client.close()
    luo.c.open(device_path)


def test_read_write_einval(luo) -> None:
    assert luo.c.read() == (-1, errno.EINVAL)
    assert luo.c.write() == (-1, errno.EINVAL)
    assert luo.state() == NORMAL


def test_close_drops_outgoing_keeps_state(luo, device_path) -> None:
    ok(luo.preserve(luo.c.memfd(4096), 1))
    ok(luo.preserve(luo.c.memfd(4096), 2))
    ok(luo.event(PREPARE))
    luo.c.close()
    luo.c.open(device_path)
    assert luo.state() == PREPARED
    assert err(luo.fd_state(1)) == errno.ENOENT
    assert err(luo.fd_state(2)) == errno.ENOENT
    ok(luo.event(CANCEL))
    assert luo.state() == NORMAL


# -- section 5: files -----------------------------------------------------------------------------
def test_preserve_errnos(luo, tmp_path) -> None:
    assert err(luo.preserve(987, 1)) == errno.EBADF
    assert err(luo.preserve(-1, 1)) == errno.EBADF
    (tmp_path / "f").write_bytes(b"x")
    assert err(luo.preserve(luo.c.openfile(str(tmp_path / "f"), "path"), 1)) == errno.EBADF
    assert err(luo.preserve(luo.c.openfile(str(tmp_path / "f"), "r"), 1)) == errno.ENOENT
    assert err(luo.preserve(luo.c.openfile("/dev/null", "w"), 1)) == errno.ENOENT
    # a linked tmpfs file is not preservable, an unlinked one is
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else "/run"
    linked = os.path.join(shm, f"cusedev-test-{os.getpid()}")
    with open(linked, "wb") as f:
        f.write(b"y")
    try:
        assert err(luo.preserve(luo.c.openfile(linked, "w"), 1)) == errno.ENOENT
    finally:
        os.unlink(linked)
    ok(luo.preserve(luo.c.tmpfile(shm), 3))
    m = luo.c.memfd(4096)
    ok(luo.preserve(m, 1))
    assert err(luo.preserve(m, 1)) == errno.EEXIST
    assert err(luo.preserve(luo.c.memfd(4096), 3)) == errno.EEXIST
    ok(luo.preserve(m, 2))  # the same file under a second token
    assert [luo.fd_state_ok(t) for t in (1, 2, 3)] == [NORMAL] * 3
    assert luo.state() == NORMAL


def test_unpreserve(luo) -> None:
    assert err(luo.unpreserve(5)) == errno.ENOENT
    ok(luo.preserve(luo.c.memfd(100), 5))
    ok(luo.fd_event(5, PREPARE))
    ok(luo.unpreserve(5))  # a PREPARED file is cancelled first
    assert err(luo.fd_state(5)) == errno.ENOENT
    assert err(luo.unpreserve(5)) == errno.ENOENT


def test_fd_states_and_events(luo) -> None:
    ok(luo.preserve(luo.c.memfd(8192), 9))
    ok(luo.preserve(luo.c.memfd(0), 10))
    assert err(luo.fd_state(8)) == errno.ENOENT
    assert err(luo.fd_state(9, incoming=1)) == errno.ENOENT
    assert err(luo.fd_event(8, PREPARE)) == errno.ENOENT
    assert err(luo.fd_event(9, 4)) == errno.EINVAL
    assert err(luo.fd_event(9, FINISH)) == errno.EBUSY
    assert err(luo.fd_event(10, PREPARE)) == errno.EINVAL  # empty memfd
    ok(luo.fd_event(9, FREEZE))  # NORMAL: no-op
    assert luo.fd_state_ok(9) == NORMAL
    ok(luo.fd_event(9, CANCEL))
    ok(luo.fd_event(9, PREPARE))
    ok(luo.fd_event(9, PREPARE))
    assert luo.fd_state_ok(9) == PREPARED
    ok(luo.fd_event(9, FREEZE))
    assert luo.fd_state_ok(9) == FROZEN
    ok(luo.fd_event(9, PREPARE))
    assert luo.fd_state_ok(9) == FROZEN
    ok(luo.fd_event(9, CANCEL))
    assert luo.fd_state_ok(9) == NORMAL
    assert luo.state() == NORMAL


# -- section 4: global events without a reboot ----------------------------------------------------
def test_global_events(luo) -> None:
    assert err(luo.event(CANCEL)) == errno.ENOENT
    assert err(luo.event(FINISH)) == errno.EINVAL
    assert err(luo.event(FREEZE)) == errno.EINVAL
    assert err(luo.restore(1)) == errno.EBUSY
    ok(luo.preserve(luo.c.memfd(4096), 1))
    empty = luo.c.memfd(0)
    ok(luo.preserve(empty, 2))
    assert err(luo.event(PREPARE)) == errno.EINVAL  # empty memfd: rolled back
    assert luo.state() == NORMAL and luo.fd_state_ok(1) == NORMAL
    ok(luo.unpreserve(2))
    ok(luo.event(PREPARE))
    assert luo.state() == PREPARED and luo.fd_state_ok(1) == PREPARED
    assert err(luo.event(PREPARE)) == errno.EINVAL
    assert err(luo.event(FINISH)) == errno.EINVAL
    assert err(luo.event(FREEZE)) == errno.EINVAL
    assert err(luo.preserve(luo.c.memfd(4096), 3)) == errno.EBUSY
    assert err(luo.preserve(999, 3)) == errno.EBADF  # the fd is looked up before the state
    assert err(luo.unpreserve(1)) == errno.EBUSY
    assert err(luo.restore(1)) == errno.EBUSY
    ok(luo.fd_event(1, CANCEL))  # per-file events ignore the global state
    ok(luo.fd_event(1, PREPARE))
    ok(luo.event(CANCEL))
    assert luo.state() == NORMAL and luo.fd_state_ok(1) == NORMAL
    assert err(luo.event(CANCEL)) == errno.ENOENT


def test_bad_input_changes_nothing(luo) -> None:
    ok(luo.preserve(luo.c.memfd(4096), 42))
    ok(luo.event(PREPARE))
    for cmd, where, data in [
        (U.IO(0xBA, 200), "null", b""),
        (GS, "null", b""),
        (U.LIVEUPDATE_IOCTL_SET_EVENT, "heap", struct.pack("=III", 12, CANCEL, 1)),
        (U.LIVEUPDATE_IOCTL_SET_EVENT, "heap", struct.pack("=I", 4)),
        (U.IOW(0xBA, 4, 8), "heap", struct.pack("=II", 8, CANCEL)),
        (U.LIVEUPDATE_IOCTL_FD_UNPRESERVE, "pageend", struct.pack("=I", 16)),
    ]:
        assert luo.c.ioctl(cmd, data, where)[0] == -1
    assert luo.state() == PREPARED and luo.fd_state_ok(42) == PREPARED
    ok(luo.event(CANCEL))
