"""Permissions (issue 7.4): who may open the node, reach the control plane, and whose fds/memory are used.

Non-root callers are forked children that drop to uid/gid 65534 (or a test
group) before the syscall under test, so no new interpreter is started.
One emulator serves the module (``shared_emulator``, traced; its exit status and log are checked at
the end).  Whose memory and fds a call uses is read by the kernel on CUSE (retry iovecs) and by
the emulator on the FUSE file, so that test runs in the VM phase too (``vm``); node modes on CUSE
are covered by test_transport.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import mmap
import os
import socket
import stat
import struct
import time
from pathlib import Path

import pytest
from _hostile import (
    GET_FD_STATE,
    GET_STATE,
    fork,
    ioctl,
    libc,
    memfd,
    open_retry,
    preserve,
    reap,
    status,
)
from _server import ServerProc

from cusedev import control
from cusedev.control import paths
from cusedev.control.channel import ControlError

NOBODY = 65534
GROUP = 43210


def _as_user(uid: int, gid: int, fn) -> int:  # type: ignore[no-untyped-def]
    """Exit status of ``fn`` (returns an int code) run in a child with the given ids."""

    def child() -> None:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
        os._exit(fn())

    st = reap(fork(child))
    assert os.WIFEXITED(st), st
    return os.WEXITSTATUS(st)


def _open_errno(path: str) -> int:
    try:
        os.close(os.open(path, os.O_RDWR))
    except OSError as e:
        return e.errno
    return 0


def _connect_errno(path: str) -> int:
    """0 if the control socket answers a status request, else the errno (or 255: dropped)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(path)
            s.sendall(b'{"cmd": "status"}\n')
            return 0 if s.recv(100) else 255
    except OSError as e:
        return e.errno or 254


pytestmark = pytest.mark.serve("--trace", "{dir}/trace.jsonl")  # the module's shared_emulator


@pytest.fixture
def emu(shared_emulator: ServerProc) -> ServerProc:
    shared_emulator.trace = os.path.join(os.path.dirname(shared_emulator.device), "trace.jsonl")  # type: ignore[attr-defined]
    return shared_emulator


def test_default_node_root_only(emu: ServerProc) -> None:
    st = os.stat(emu.device)
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0 and st.st_gid == 0
    assert _as_user(NOBODY, NOBODY, lambda: _open_errno(emu.device)) == errno.EACCES
    assert _open_errno(emu.device) == 0  # root
    # control socket and trace file: root only
    sock = paths.control_socket(emu.device)
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600 and os.stat(sock).st_uid == 0
    assert _as_user(NOBODY, NOBODY, lambda: _connect_errno(sock)) in (errno.EACCES, 255)
    assert _connect_errno(sock) == 0
    assert stat.S_IMODE(os.stat(emu.trace).st_mode) == 0o600  # type: ignore[attr-defined]
    assert _as_user(NOBODY, NOBODY, lambda: _open_errno(emu.trace)) == errno.EACCES  # type: ignore[attr-defined]


def test_mode_owner_group(public_dir: Path, transport_name: str) -> None:
    dev = str(public_dir / "lu-group")
    with ServerProc(dev, transport_name, "--mode", "0660", "--owner", str(NOBODY), "--group", str(GROUP)) as srv:
        srv.start()
        st = os.stat(dev)
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o660, NOBODY, GROUP)
        assert _as_user(NOBODY, NOBODY, lambda: _open_errno(dev)) == 0  # owner
        assert _as_user(1234, GROUP, lambda: _open_errno(dev)) == 0  # group
        assert _as_user(1234, 1234, lambda: _open_errno(dev)) == errno.EACCES  # other
        # the configured group may reach the control socket, others may not
        sock = paths.control_socket(dev)
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o660 and os.stat(sock).st_gid == GROUP
        assert _as_user(1234, GROUP, lambda: _connect_errno(sock)) == 0
        assert _as_user(1234, 1234, lambda: _connect_errno(sock)) in (errno.EACCES, 255)
        assert srv.stop() == 0


@pytest.mark.vm
def test_fd_and_pointer_of_another_process(emu: ServerProc) -> None:
    """FD_PRESERVE pulls the fd number from the caller only; arg is read in the caller only."""
    r, w = os.pipe()
    k_r, k_w = os.pipe()
    fixed = 0x7E0000000000

    def other() -> None:
        os.close(r)
        fd = os.memfd_create("other", 0)
        os.write(fd, b"secret" * 100)
        fd = os.dup2(fd, 1000)  # a number this test process does not have open (below any fd limit)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_long)
        p = libc.mmap(fixed, mmap.PAGESIZE, 3, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | 0x100000, -1, 0)
        ctypes.memmove(p, struct.pack("=II", 8, 0), 8)
        os.write(w, struct.pack("=iQ", fd, p))
        os.read(k_r, 1)

    child = fork(other)
    os.close(w)
    fd_there, addr = struct.unpack("=iQ", os.read(r, 12))
    os.close(r)
    dev = open_retry(emu.device)
    try:
        assert addr == fixed
        with open("/proc/self/maps") as f:
            assert not any(line.startswith(f"{fixed:x}-") for line in f)
        assert fd_there == 1000 and str(fd_there) not in os.listdir("/proc/self/fd")
        assert preserve(dev, fd_there, 1) == errno.EBADF
        assert ioctl(dev, GET_STATE, ctypes.c_void_p(addr))[1] == errno.EFAULT  # type: ignore[arg-type]
        assert status(emu.device)["outgoing"] == []
    finally:
        os.close(dev)
        os.write(k_w, b"x")
        os.close(k_w)
        os.close(k_r)
        reap(child)


def _fd_state(dev: int, token: int, incoming: int) -> int:
    b = ctypes.create_string_buffer(struct.pack("=IB3xQI4x", 24, incoming, token, 0), 24)
    return ioctl(dev, GET_FD_STATE, b)[1]


def test_tokens_of_other_and_revoked_handles(emu: ServerProc) -> None:
    # another opener's tokens vanish with its close
    a = open_retry(emu.device)
    m = memfd()
    assert preserve(a, m, 5) == 0
    os.close(a)
    b = open_retry(emu.device)
    assert _fd_state(b, 5, 0) == errno.ENOENT
    # a revoked (pre-kexec) handle reaches nothing, not even the incoming files
    assert preserve(b, m, 6) == 0
    buf = ctypes.create_string_buffer(struct.pack("=II", 8, 0), 8)
    assert ioctl(b, 0xBA04, buf)[1] == 0  # PREPARE
    assert control.request(emu.device, "kexec")["live"]
    for token, inc in ((6, 1), (6, 0), (5, 0)):
        assert _fd_state(b, token, inc) == errno.ENODEV
    assert ioctl(b, 0xBA02, ctypes.create_string_buffer(struct.pack("=IiQ", 16, 0, 6), 16))[1] == errno.ENODEV
    c = open_retry(emu.device)
    try:
        assert _fd_state(c, 6, 1) == 0  # the new boot's opener sees it (and restores it only under run)
        assert ioctl(c, 0xBA02, ctypes.create_string_buffer(struct.pack("=IiQ", 16, 0, 6), 16))[1] == \
            errno.EOPNOTSUPP
    finally:
        os.close(b)
        os.close(c)
        os.close(m)


def test_run_refuses_a_non_root_emulator(public_dir: Path) -> None:
    """`cusedev run` checks SO_PEERCRED of the control socket: a socket served by uid 65534 is refused."""
    dev = str(public_dir / "fake")
    path = paths.control_socket(dev)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    ready_r, ready_w = os.pipe()
    end_r, end_w = os.pipe()

    def fake() -> None:
        os.close(ready_r)
        os.close(end_w)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(path)  # as root, in the root-only run dir
        os.setgid(NOBODY)
        os.setuid(NOBODY)
        s.listen(1)  # SO_PEERCRED is taken at listen(): uid 65534
        os.write(ready_w, b"r")
        os.read(end_r, 1)

    child = fork(fake)
    os.close(ready_w)
    os.close(end_r)
    try:
        assert os.read(ready_r, 1) == b"r"
        from cusedev.run.command import run_under

        marker = public_dir / "ran"
        with pytest.raises(ControlError, match="does not run as root"):
            asyncio.run(run_under(dev, ["touch", str(marker)]))
        time.sleep(0.1)
        assert not marker.exists()
    finally:
        os.close(end_w)
        os.close(ready_r)
        reap(child)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
