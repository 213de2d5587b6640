"""The device through real syscalls, on the transport under test (FUSE file on the host, CUSE in the VM).

Every test drives a ``cusedev serve`` subprocess (see ``_server.py``) with
open/ioctl/read/write/poll from this process or a forked child, exactly as a
client would: the module's shared emulator where the test leaves it as it
found it, a server of its own where the test starts, stops or breaks one.
All of it is the transport, so all of it runs in the VM phase too (``vm``).
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import select
import signal
import stat
import struct
import sys
from pathlib import Path

import pytest
from _server import ServerProc, force_cleanup, mounts_mentioning

pytestmark = pytest.mark.vm

GET_STATE = 0xBA03
NORMAL = 1
NOBODY = 65534


def get_state(fd: int, size: int = 8) -> tuple[int, bytes]:
    buf = bytearray(size)
    struct.pack_into("I", buf, 0, size)
    r = fcntl.ioctl(fd, GET_STATE, buf, True)
    return r, bytes(buf)


def in_child(fn) -> int:  # type: ignore[no-untyped-def]
    """Run ``fn()`` (returns an int exit status) in a forked child; its status."""
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            code = fn()
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def open_errno(path: str, uid: int | None = None) -> int:
    """0 if ``path`` opens O_RDWR (as ``uid`` if given, in a child), else the errno."""

    def attempt() -> int:
        if uid is not None:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        try:
            os.close(os.open(path, os.O_RDWR))
        except OSError as e:
            return e.errno
        return 0

    return in_child(attempt)


# -- the device node -----------------------------------------------------------
def test_ready_line_and_node(shared_emulator: ServerProc, transport_name: str) -> None:
    m = re.fullmatch(r"cusedev: (\S+) ready \(transport=(\w+), pid=(\d+)\)", shared_emulator.ready_line)
    assert m, shared_emulator.ready_line
    assert m.group(1) == shared_emulator.device and m.group(2) == transport_name
    assert int(m.group(3)) == shared_emulator.proc.pid  # type: ignore[union-attr]
    st = os.stat(shared_emulator.device)
    assert (stat.S_ISREG if transport_name == "fuse" else stat.S_ISCHR)(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0 and st.st_gid == 0


def test_exclusive_open(shared_emulator: ServerProc) -> None:
    fd = os.open(shared_emulator.device, os.O_RDWR)
    try:
        with pytest.raises(OSError) as e:
            os.open(shared_emulator.device, os.O_RDWR)
        assert e.value.errno == errno.EBUSY
    finally:
        os.close(fd)
    os.close(os.open(shared_emulator.device, os.O_RDWR))  # free again after close


def test_ioctl_round_trip(shared_emulator: ServerProc) -> None:
    fd = os.open(shared_emulator.device, os.O_RDWR)
    try:
        r, out = get_state(fd)
        assert r == 0 and struct.unpack("II", out) == (8, NORMAL)
        with pytest.raises(OSError) as e:
            fcntl.ioctl(fd, GET_STATE, 0)  # NULL arg: the size word is unreadable
        assert e.value.errno == errno.EFAULT
        with pytest.raises(OSError) as e:
            fcntl.ioctl(fd, 0xBA07, 0)
        assert e.value.errno == errno.EINVAL
        with pytest.raises(OSError) as e:
            get_state_wrong_type = 0xBB03
            fcntl.ioctl(fd, get_state_wrong_type, bytearray(struct.pack("II", 8, 0)), True)
        assert e.value.errno == errno.ENOTTY
    finally:
        os.close(fd)


@pytest.mark.parametrize("size", [16, 4096, 200 * 1024])
def test_ioctl_extended_struct(shared_emulator: ServerProc, size: int) -> None:
    """A larger caller struct: zero tail accepted, nonzero tail E2BIG; 200 KiB exceeds CUSE's retry cap."""
    fd = os.open(shared_emulator.device, os.O_RDWR)
    try:
        r, out = get_state(fd, size)
        assert r == 0 and struct.unpack_from("II", out) == (size, NORMAL) and not any(out[8:])
        buf = bytearray(size)
        struct.pack_into("I", buf, 0, size)
        buf[-1] = 1
        with pytest.raises(OSError) as e:
            fcntl.ioctl(fd, GET_STATE, buf, True)
        assert e.value.errno == errno.E2BIG
    finally:
        os.close(fd)


def test_read_write_einval(shared_emulator: ServerProc) -> None:
    fd = os.open(shared_emulator.device, os.O_RDWR)
    try:
        for op in (lambda: os.read(fd, 16), lambda: os.write(fd, b"x")):
            with pytest.raises(OSError) as e:
                op()
            assert e.value.errno == errno.EINVAL
    finally:
        os.close(fd)


def test_poll_default_mask(shared_emulator: ServerProc) -> None:
    fd = os.open(shared_emulator.device, os.O_RDWR)
    try:
        p = select.poll()
        p.register(fd, select.POLLIN | select.POLLOUT | select.POLLPRI)
        [(_, mask)] = p.poll(1000)
        assert mask == select.POLLIN | select.POLLOUT  # DEFAULT_POLLMASK, no POLLPRI
    finally:
        os.close(fd)


def test_mode_0600_denies_others(shared_emulator: ServerProc) -> None:
    assert open_errno(shared_emulator.device, uid=NOBODY) == errno.EACCES
    assert open_errno(shared_emulator.device) == 0


@pytest.mark.serve("--mode", "0660", "--owner", str(NOBODY), "--group", "0")
def test_mode_owner_group(emulator: ServerProc) -> None:
    path = emulator.device
    st = os.stat(path)
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o660, NOBODY, 0)
    assert open_errno(path, uid=NOBODY) == 0
    assert open_errno(path, uid=NOBODY + 1) == errno.EACCES


# -- lifecycle -------------------------------------------------------------------
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_cleans_up(tmp_path: Path, transport_name: str, sig: int) -> None:
    path = str(tmp_path / "lu")
    with ServerProc(path, transport_name) as srv:
        srv.start()
        fd = os.open(path, os.O_RDWR)  # an open client must not block the shutdown
        try:
            assert srv.stop(sig) == 0, srv.stderr()
        finally:
            os.close(fd)
        assert not os.path.lexists(path)
        assert mounts_mentioning(path) == []
        assert not os.path.exists(f"/run/cusedev/{path.strip('/').replace('_', '__').replace('/', '_')}")
        if transport_name == "cuse":
            assert not os.path.exists("/sys/class/cuse/cusedev-" + path.strip("/").replace("_", "__")
                                      .replace("/", "_"))


def test_two_side_by_side(shared_emulator: ServerProc, tmp_path: Path, transport_name: str) -> None:
    """A second emulator next to the module's one (which stops cleanly at the end of the module)."""
    a, b = shared_emulator.device, str(tmp_path / "b")
    with ServerProc(b, transport_name) as sb:
        sb.start()
        fa, fb = os.open(a, os.O_RDWR), os.open(b, os.O_RDWR)  # exclusive per device, not global
        try:
            assert get_state(fa)[0] == 0 and get_state(fb)[0] == 0
        finally:
            os.close(fa)
            os.close(fb)
        assert sb.stop() == 0


def test_dev_path(transport_name: str) -> None:
    """A /dev/liveupdate-like path: the kernel's own node under CUSE, a bind-mounted file under FUSE."""
    path = f"/dev/cusedev-test-{os.getpid()}"
    if os.path.lexists(path):
        force_cleanup(path)
        os.unlink(path)
    with ServerProc(path, transport_name) as srv:
        srv.start()
        fd = os.open(path, os.O_RDWR)
        try:
            assert get_state(fd)[0] == 0
        finally:
            os.close(fd)
        assert srv.stop() == 0
    assert not os.path.lexists(path) and mounts_mentioning(path) == []


def _assert_one_line_error(srv: ServerProc, *words: str) -> None:
    assert srv.wait() == 1
    err = srv.stderr().strip()
    assert "Traceback" not in err, err
    last = err.splitlines()[-1]
    assert last.startswith("cusedev: error: "), err
    for w in words:
        assert w in last, err


def test_taken_by_another_emulator(shared_emulator: ServerProc, transport_name: str) -> None:
    with ServerProc(shared_emulator.device, transport_name, cleanup=False) as second:
        second.start(expect_ready=False)
        _assert_one_line_error(second, shared_emulator.device)
    fd = os.open(shared_emulator.device, os.O_RDWR)  # the first one still serves
    try:
        assert get_state(fd)[0] == 0
    finally:
        os.close(fd)


@pytest.mark.parametrize("content", [b"data", None])
def test_taken_by_a_file(tmp_path: Path, transport_name: str, content: bytes | None) -> None:
    path = tmp_path / "busy"
    if content is None:
        os.mkdir(path)
    else:
        path.write_bytes(content)
    with ServerProc(str(path), transport_name, cleanup=False) as srv:
        srv.start(expect_ready=False)
        _assert_one_line_error(srv, str(path))
    assert path.exists()
    if content is not None:
        assert path.read_bytes() == content


def test_not_root(public_dir: Path, transport_name: str) -> None:
    """In a forked child (a non-root user may not even exec root's python): one line, exit 1."""
    import cusedev.control.server  # noqa: F401  (nobody cannot read root's stdlib: import before dropping)
    from cusedev.cli import main

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            os.close(r)
            sys.stderr = os.fdopen(w, "w")  # pytest captures sys.stderr, not fd 2
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            code = main(["serve", "--device", str(public_dir / "lu"), "--transport", transport_name])
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        err = f.read().decode()
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 1, err
    assert err.strip().splitlines()[-1].startswith("cusedev: error: ") and "root" in err, err
    assert "Traceback" not in err and not os.path.lexists(public_dir / "lu")


def test_kernel_drops_connection(tmp_path: Path, transport_name: str) -> None:
    """The kernel ending the connection (FUSE: unmount; CUSE: sysfs abort) makes the server exit cleanly."""
    path = str(tmp_path / "lu")
    esc = path.strip("/").replace("_", "__").replace("/", "_")
    with ServerProc(path, transport_name) as srv:
        srv.start()
        if transport_name == "fuse":
            os.system(f"umount -l {path}; umount -l /run/cusedev/{esc}/mnt")
        else:
            Path(f"/sys/class/cuse/cusedev-{esc}/abort").write_text("1")
        assert srv.wait() == 0, srv.stderr()
        assert mounts_mentioning(path) == [] and not os.path.lexists(path)


def test_server_in_process(public_dir: Path, transport_name: str) -> None:
    """The Python API other front ends use: Server on the caller's loop, clients in threads."""
    import asyncio

    from cusedev.control.server import Server

    path = str(public_dir / "inproc")

    def client() -> tuple[int, int]:
        fd = os.open(path, os.O_RDWR)
        try:
            r, out = get_state(fd)
            return r, struct.unpack("II", out)[1]
        finally:
            os.close(fd)

    async def main() -> None:
        async with Server(path, transport_name) as srv:
            assert srv.transport_name == transport_name
            assert await asyncio.to_thread(client) == (0, NORMAL)
        assert not os.path.lexists(path) and mounts_mentioning(path) == []

    try:
        asyncio.run(main())
    finally:
        force_cleanup(path)


def test_auto_transport(public_dir: Path, transport_name: str) -> None:
    """``--transport auto`` picks CUSE where it exists, else the FUSE file with exactly one warning line."""
    path = str(public_dir / "auto")
    with ServerProc(path, "auto") as srv:
        srv.start()
        assert f"transport={transport_name}," in srv.ready_line
        assert srv.stop() == 0
        warnings = [line for line in srv.stderr().splitlines() if "CUSE" in line]
        assert len(warnings) == (1 if transport_name == "fuse" else 0), srv.stderr()
