"""The sysfs shim through real syscalls: tree, modes, errnos, sysfs_notify poll semantics, the fallback.

The tests share the module's ``cusedev serve`` (``shared_emulator``) with the
sysfs tree under its directory, unless they need a server of their own.  The
tree is a FUSE mount whatever the device's transport, so the module runs on
the host only (not ``vm``).  Where the host's
own /sys is writable (as on a normal machine), errnos and poll masks are
also checked against a real kernfs attribute, so the table below is the
kernel's, not ours.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import select
import signal
import stat
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from _server import READY_TIMEOUT, REPO, ServerProc, force_cleanup, mounts_mentioning, reset

from cusedev.client import LiveUpdateDevice
from cusedev.control import paths

NOBODY = 65534
PRI = select.POLLPRI | select.POLLERR
WATCH = REPO / "examples" / "sysfs_watch.py"
# Python start-up dominates under TCG with other VMs on the same cores: be patient, fail only on a hang.
START_TIMEOUT = max(READY_TIMEOUT, 120.0)
WAKE_MS = 10_000  # an expected wake-up (returns as soon as it happens)
QUIET_MS = 300  # how long "no wake-up" is watched


class Emu:
    """A running emulator and the paths of its tree."""

    def __init__(self, srv: ServerProc, root: Path):
        self.srv = srv
        self.dev = srv.device
        self.root = root
        self.dir = root / "kernel" / "liveupdate"
        self.state = self.dir / "state"
        self.count = self.dir / "update_count"

    def open(self) -> LiveUpdateDevice:
        return LiveUpdateDevice(self.dev)


def _serve(public_dir: Path, transport: str, *args: str, root: Path | None = None) -> ServerProc:
    extra = ["--sysfs-root", str(root)] if root is not None else []
    return ServerProc(str(public_dir / "liveupdate"), transport, *extra, *args)


pytestmark = pytest.mark.serve("--sysfs", "fuse", "--sysfs-root", "{dir}/sys")  # the module's shared_emulator


@pytest.fixture
def emu(shared_emulator: ServerProc) -> Iterator[Emu]:
    """The module's emulator (a start is slow in the VM), back to "normal" with nothing open after each test."""
    e = Emu(shared_emulator, Path(shared_emulator.device).parent / "sys")
    yield e
    reset(shared_emulator)
    assert e.state.read_bytes() == b"normal\n"


def kexec(dev: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "cusedev.cli", "kexec", "--device", dev], capture_output=True,
                       text=True, env=env, timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout


def pri(fd: int, timeout_ms: int = 0) -> int:
    """poll() for POLLPRI|POLLERR: the revents (0 on timeout)."""
    p = select.poll()
    p.register(fd, PRI)
    r = p.poll(timeout_ms)
    return r[0][1] if r else 0


def reread(fd: int) -> bytes:
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 4096)


class Poller(threading.Thread):
    """A thread blocked in ``wait(fd)``; records when it woke and what it re-read."""

    def __init__(self, fd: int, wait: Callable[[int], object]):
        super().__init__(daemon=True)
        self.fd, self.wait = fd, wait
        self.woke_at = 0.0
        self.result: object = None
        self.value = b""
        self.blocked = threading.Event()

    def run(self) -> None:
        self.blocked.set()
        self.result = self.wait(self.fd)
        self.woke_at = time.perf_counter()
        self.value = reread(self.fd)


def start_poller(fd: int, wait: Callable[[int], object] = lambda fd: pri(fd, 10_000)) -> Poller:
    t = Poller(fd, wait)
    t.start()
    t.blocked.wait()
    time.sleep(0.05)  # let it reach the kernel's wait queue
    return t


# -- the tree ------------------------------------------------------------------------------------
def test_contents_cat_find(emu: Emu) -> None:
    assert emu.state.read_bytes() == b"normal\n"
    assert emu.count.read_bytes() == b"0\n"
    cat = subprocess.run(["cat", str(emu.state), str(emu.count)], capture_output=True, timeout=10)
    assert cat.returncode == 0 and cat.stdout == b"normal\n0\n"
    find = subprocess.run(["find", str(emu.root)], capture_output=True, text=True, timeout=10)
    assert sorted(find.stdout.split()) == sorted(str(p) for p in (emu.root, emu.root / "kernel", emu.dir,
                                                                   emu.state, emu.count))
    fd = os.open(emu.state, os.O_RDONLY)
    try:  # seq_file: partial sequential reads continue one snapshot, then EOF; pread(0) regenerates
        assert os.read(fd, 3) == b"nor" and os.read(fd, 100) == b"mal\n" and os.read(fd, 100) == b""
        assert os.pread(fd, 100, 2) == b"rmal\n" and os.pread(fd, 100, 0) == b"normal\n"
        assert os.lseek(fd, 0, os.SEEK_END) == 4096
    finally:
        os.close(fd)
    with emu.open() as d:
        d.prepare()
        assert emu.state.read_bytes() == b"prepared\n"  # produced on read: never stale
        d.cancel()
    assert emu.state.read_bytes() == b"normal\n"


def test_modes_and_sizes(emu: Emu) -> None:
    for p in (emu.state, emu.count):
        st = os.stat(p)
        assert st.st_mode == stat.S_IFREG | 0o444 and st.st_size == 4096
        assert (st.st_uid, st.st_gid, st.st_nlink, st.st_blksize) == (0, 0, 1, 4096)
    for p in (emu.root, emu.root / "kernel", emu.dir):
        st = os.stat(p)
        assert st.st_mode == stat.S_IFDIR | 0o555 and (st.st_uid, st.st_gid) == (0, 0)
    ls = subprocess.run(["ls", "-l", str(emu.dir)], capture_output=True, text=True, timeout=10)
    assert re.search(r"^-r--r--r-- 1 root root 4096 .* state$", ls.stdout, re.M), ls.stdout
    assert sorted(os.listdir(emu.dir)) == ["state", "update_count"]


def _real_attr() -> Path | None:
    """A read-only attribute of the running kernel's sysfs, if /sys is a writable sysfs (not in a container)."""
    try:
        with open("/proc/mounts") as f:
            if not any(ln.split()[1:4:2] == ["/sys", "sysfs"] and "rw" in ln.split()[3].split(",") for ln in f):
                return None
    except OSError:
        return None
    for p in sorted(Path("/sys/kernel").iterdir()):
        try:
            st = p.lstat()
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o444:
            return p
    return None


def _outcome(fn: Callable[[], object]) -> str:
    try:
        fn()
    except OSError as e:
        return errno.errorcode[e.errno]
    return "ok"


def _ops(attr: Path, other_dir: Path) -> dict[str, Callable[[], object]]:
    """Operations on an attribute and its directory that sysfs refuses (or, for root, quietly accepts)."""
    d = attr.parent
    n = "cusedev_test_x"

    def on_fd(fn: Callable[[int], object]) -> Callable[[], object]:
        def run() -> object:
            fd = os.open(attr, os.O_RDONLY)
            try:
                return fn(fd)
            finally:
                os.close(fd)
        return run

    return {
        "open_wronly": lambda: os.close(os.open(attr, os.O_WRONLY)),
        "open_rdwr": lambda: os.close(os.open(attr, os.O_RDWR)),
        "open_rdonly_trunc": lambda: os.close(os.open(attr, os.O_RDONLY | os.O_TRUNC)),
        "create": lambda: os.close(os.open(d / n, os.O_WRONLY | os.O_CREAT, 0o644)),
        "create_rdonly": lambda: os.close(os.open(d / n, os.O_RDONLY | os.O_CREAT, 0o644)),
        "mknod_reg": lambda: os.mknod(d / n, stat.S_IFREG | 0o644),
        "mkfifo": lambda: os.mkfifo(d / n),
        "mkdir": lambda: os.mkdir(d / n),
        "rmdir": lambda: os.rmdir(other_dir),
        "unlink": lambda: os.unlink(attr),
        "unlink_missing": lambda: os.unlink(d / n),
        "rename": lambda: os.rename(attr, d / n),
        "symlink": lambda: os.symlink("x", d / n),
        "link": lambda: os.link(attr, d / n),
        "chmod_same": lambda: os.chmod(attr, 0o444),
        "chown_same": lambda: os.chown(attr, 0, 0),
        "truncate": lambda: os.truncate(attr, 0),
        "setxattr": lambda: os.setxattr(attr, "user.x", b"1"),
        "getxattr": lambda: os.getxattr(attr, "user.x"),
        "listxattr": lambda: os.listxattr(attr),
        "write_rdonly_fd": on_fd(lambda fd: os.write(fd, b"1")),
        "ftruncate_rdonly_fd": on_fd(lambda fd: os.ftruncate(fd, 0)),
    }


# What a root caller gets on sysfs (fs/kernfs: no store, no ->create, no syscall_ops; setattr keeps
# mode/owner/times and ignores the size).
ROOT_OUTCOMES = {
    "open_wronly": "EACCES", "open_rdwr": "EACCES", "open_rdonly_trunc": "ok", "create": "EACCES",
    "create_rdonly": "EACCES", "mknod_reg": "EACCES", "mkfifo": "EPERM", "mkdir": "EPERM", "rmdir": "EPERM",
    "unlink": "EPERM", "unlink_missing": "ENOENT", "rename": "EPERM", "symlink": "EPERM", "link": "EPERM",
    "chmod_same": "ok", "chown_same": "ok", "truncate": "ok", "setxattr": errno.errorcode[errno.EOPNOTSUPP],
    "getxattr": "ENODATA", "listxattr": "ok", "write_rdonly_fd": "EBADF", "ftruncate_rdonly_fd": "EINVAL",
}
# What an unprivileged caller gets (the kernel's permission checks, before the filesystem is asked).
USER_OUTCOMES = {
    "open_wronly": "EACCES", "open_rdwr": "EACCES", "open_rdonly_trunc": "EACCES", "create": "EACCES",
    "mkdir": "EACCES", "unlink": "EACCES", "rename": "EACCES", "chmod_same": "EPERM", "chown_same": "EPERM",
    "truncate": "EACCES", "write_rdonly_fd": "EBADF",
}


def _outcomes_as(uid: int | None, attr: Path, other_dir: Path, names: list[str]) -> dict[str, str]:
    """Outcomes of ``names`` (in a child running as ``uid`` if given)."""
    if uid is None:
        ops = _ops(attr, other_dir)
        return {n: _outcome(ops[n]) for n in names}
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            ops = _ops(attr, other_dir)
            os.write(w, " ".join(_outcome(ops[n]) for n in names).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read().decode().split()
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    return dict(zip(names, out, strict=True))


@pytest.mark.parametrize("who", ["root", "nobody"])
def test_errnos_match_sysfs(emu: Emu, who: str) -> None:
    table = ROOT_OUTCOMES if who == "root" else USER_OUTCOMES
    uid = None if who == "root" else NOBODY
    names = list(table)
    ours = _outcomes_as(uid, emu.state, emu.root / "kernel", names)
    assert ours == table
    assert sorted(os.listdir(emu.dir)) == ["state", "update_count"] and emu.state.read_bytes() == b"normal\n"
    real = _real_attr()
    if real is not None:  # the table is the running kernel's (skipped silently where /sys is read-only)
        assert _outcomes_as(uid, real, Path("/sys/kernel/mm"), names) == table


def test_root_setattr_sticks_like_kernfs(emu: Emu) -> None:
    """chmod/chown by root change the node as on sysfs; a mode without read bits refuses even root."""
    os.chmod(emu.count, 0o400)
    os.chown(emu.count, NOBODY, NOBODY)
    st = os.stat(emu.count)
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_size) == (0o400, NOBODY, NOBODY, 4096)
    os.chmod(emu.count, 0)
    with pytest.raises(OSError) as e:
        os.open(emu.count, os.O_RDONLY)
    assert e.value.errno == errno.EACCES  # kernfs_fop_open's extra permission check
    os.chmod(emu.count, 0o444)
    os.chown(emu.count, 0, 0)
    assert emu.count.read_bytes() == b"0\n"


# -- sysfs_notify --------------------------------------------------------------------------------
def test_poll_masks_match_sysfs(emu: Emu) -> None:
    """Fresh open: POLLERR|POLLPRI until the first read; POLLIN|POLLOUT always (DEFAULT_POLLMASK)."""
    every = select.POLLIN | select.POLLOUT | select.POLLRDNORM | select.POLLWRNORM | PRI

    def masks(path: Path) -> tuple[int, int]:
        fd = os.open(path, os.O_RDONLY)
        try:
            p = select.poll()
            p.register(fd, every)
            before = p.poll(0)[0][1]
            os.read(fd, 4096)
            return before, p.poll(0)[0][1]
        finally:
            os.close(fd)

    default = select.POLLIN | select.POLLOUT | select.POLLRDNORM | select.POLLWRNORM
    assert masks(emu.state) == (default | PRI, default)
    real = _real_attr()
    if real is not None:
        assert masks(real) == (default | PRI, default)


def test_poll_wakes_on_change_then_quiet(emu: Emu) -> None:
    fd = os.open(emu.state, os.O_RDONLY)
    try:
        assert os.read(fd, 4096) == b"normal\n"
        assert pri(fd, QUIET_MS) == 0  # no change, no wake-up
        with emu.open() as d:
            t = start_poller(fd)
            d.prepare()
            t.join(20)
            assert t.result == PRI and t.value == b"prepared\n"
            assert pri(fd, QUIET_MS) == 0  # re-read: quiet again
            t = start_poller(fd)
            d.cancel()
            t.join(20)
            assert t.result == PRI and t.value == b"normal\n"
    finally:
        os.close(fd)


def test_only_own_changes_wake(emu: Emu) -> None:
    """update_count ignores state changes; state ignores changes that keep its string (a preserved file)."""
    sfd, cfd = os.open(emu.state, os.O_RDONLY), os.open(emu.count, os.O_RDONLY)
    mfd = os.memfd_create("sysfs-test")
    try:
        os.read(sfd, 4096)
        os.read(cfd, 4096)
        with emu.open() as d:
            d.preserve(mfd, 7)
            d.unpreserve(7)
            assert pri(sfd, 200) == 0
            d.prepare()
            assert pri(sfd, WAKE_MS) == PRI and pri(cfd, QUIET_MS) == 0
            d.cancel()
    finally:
        for fd in (sfd, cfd, mfd):
            os.close(fd)


def test_changes_coalesce(emu: Emu) -> None:
    fd = os.open(emu.state, os.O_RDONLY)
    try:
        os.read(fd, 4096)
        with emu.open() as d:
            d.prepare()
            d.cancel()
            d.prepare()
            assert pri(fd, WAKE_MS) == PRI
            assert reread(fd) == b"prepared\n"  # the latest value, once
            assert pri(fd, QUIET_MS) == 0
            d.cancel()
            assert pri(fd, WAKE_MS) == PRI
            assert os.pread(fd, 4096, 0) == b"normal\n"  # pread(0) re-reads too
            assert pri(fd, 0) == 0
    finally:
        os.close(fd)


def test_select_exceptfds(emu: Emu) -> None:
    fd = os.open(emu.state, os.O_RDONLY)
    try:
        os.read(fd, 4096)
        assert select.select([], [], [fd], 0.3) == ([], [], [])
        assert select.select([fd], [], [], 0)[0] == [fd]  # readable always, as on sysfs
        with emu.open() as d:
            t = start_poller(fd, lambda fd: select.select([], [], [fd], 10))
            d.prepare()
            t.join(20)
            assert t.result == ([], [], [fd]) and t.value == b"prepared\n"
            d.cancel()
    finally:
        os.close(fd)


def test_epoll_pri(emu: Emu) -> None:
    fd = os.open(emu.state, os.O_RDONLY)
    ep = select.epoll()
    try:
        os.read(fd, 4096)
        ep.register(fd, select.EPOLLPRI)
        assert ep.poll(0.3) == []
        with emu.open() as d:
            t = start_poller(fd, lambda fd: ep.poll(10))
            d.prepare()
            t.join(20)
            assert t.result == [(fd, select.EPOLLPRI | select.EPOLLERR)] and t.value == b"prepared\n"
            assert ep.poll(0.3) == []
            d.cancel()
            assert ep.poll(5) == [(fd, select.EPOLLPRI | select.EPOLLERR)]
    finally:
        ep.close()
        os.close(fd)


def test_two_readers_both_woken(emu: Emu) -> None:
    fds = [os.open(emu.state, os.O_RDONLY) for _ in range(2)]
    try:
        for fd in fds:
            os.read(fd, 4096)
        with emu.open() as d:
            threads = [start_poller(fd) for fd in fds]
            d.prepare()
            for t in threads:
                t.join(20)
                assert t.result == PRI and t.value == b"prepared\n"
            d.cancel()
    finally:
        for fd in fds:
            os.close(fd)


def _ioctl_times(emu: Emu, n: int) -> list[float]:
    out = []
    with emu.open() as d:
        for _ in range(n):
            t0 = time.perf_counter()
            d.prepare()
            d.cancel()
            out.append((time.perf_counter() - t0) / 2)
    return sorted(out)


def test_stuck_readers_do_not_delay_ioctls(emu: Emu) -> None:
    """A file opened and never read, and a stopped process that polled and never re-reads."""
    base = _ioctl_times(emu, 50)
    idle = os.open(emu.state, os.O_RDONLY)
    pid = os.fork()
    if pid == 0:
        try:
            fd = os.open(emu.state, os.O_RDONLY)
            os.read(fd, 4096)
            p = select.poll()
            p.register(fd, PRI)
            while True:
                p.poll()  # woken by every change; then stopped (below), never re-reading
        finally:
            os._exit(0)
    try:
        time.sleep(0.2)
        with emu.open() as d:
            d.prepare()  # the child wakes once and polls again
            d.cancel()
        time.sleep(0.1)
        os.kill(pid, signal.SIGSTOP)
        stuck = _ioctl_times(emu, 50)
        med_base, med_stuck = base[len(base) // 2], stuck[len(stuck) // 2]
        print(f"prepare/cancel median: {med_base * 1e6:.0f} us alone, {med_stuck * 1e6:.0f} us with stuck readers")
        assert stuck[-1] < 2 and med_stuck < 3 * med_base + 0.002
        assert emu.state.read_bytes() == b"normal\n"
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(idle)


# -- update_count and the full cycle ---------------------------------------------------------------
def _readline(p: subprocess.Popen[str], timeout: float = 60) -> str:
    assert p.stdout is not None
    if not select.select([p.stdout], [], [], timeout)[0]:
        raise AssertionError(f"no line from the watcher within {timeout}s")
    return p.stdout.readline()


def test_watcher_across_prepare_kexec_finish(public_dir: Path, transport_name: str) -> None:
    """examples/sysfs_watch.py prints each change with a timestamp; update_count wakes only on the kexec."""
    root = public_dir / "sys"
    with _serve(public_dir, transport_name, "--sysfs", "fuse", root=root) as srv:
        srv.start(START_TIMEOUT)
        _watch_cycle(Emu(srv, root))
    assert mounts_mentioning(str(root)) == [] and not root.exists()


def _watch_cycle(emu: Emu) -> None:
    cfd = os.open(emu.count, os.O_RDONLY)
    w = subprocess.Popen([sys.executable, str(WATCH), str(emu.state)], stdout=subprocess.PIPE, text=True)
    assert w.stdout is not None
    try:
        lines = [_readline(w)]
        assert lines[0].endswith(" normal\n")
        assert os.read(cfd, 4096) == b"0\n"
        with emu.open() as d:
            d.prepare()
        lines.append(_readline(w))
        assert pri(cfd, 200) == 0
        out = kexec(emu.dev)
        assert "live update" in out and "update_count=1" in out
        lines.append(_readline(w))
        assert pri(cfd, WAKE_MS) == PRI and reread(cfd) == b"1\n"
        with emu.open() as d:
            d.finish()
        lines.append(_readline(w))
        stamps = []
        for line, want in zip(lines, ("normal", "prepared", "updated", "normal"), strict=True):
            m = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}) (\w+)\n", line)
            assert m and m.group(2) == want, lines
            stamps.append(m.group(1))
        assert stamps == sorted(stamps)
        assert emu.state.read_bytes() == b"normal\n" and emu.count.read_bytes() == b"1\n"
        # A plain kexec (not prepared) resets the counter: a change, so a wake-up.
        kexec(emu.dev)
        assert pri(cfd, WAKE_MS) == PRI and reread(cfd) == b"0\n"
        # The emulator going away wakes the watcher with POLLERR; its re-read fails and it exits.
        os.close(cfd)
        cfd = -1
        assert emu.srv.stop() == 0
        assert w.wait(30) == 1
    finally:
        if cfd >= 0:
            os.close(cfd)
        if w.poll() is None:
            w.kill()
        w.wait()
        w.stdout.close()


# -- placement and cleanup -----------------------------------------------------------------------
def test_default_root_and_cleanup(public_dir: Path, transport_name: str) -> None:
    dev = str(public_dir / "liveupdate")
    root = os.path.join(paths.runtime_dir(dev), "sys")
    with _serve(public_dir, transport_name) as srv:
        srv.start(START_TIMEOUT)
        assert Path(root, "kernel/liveupdate/state").read_bytes() == b"normal\n"
        assert mounts_mentioning(dev) != []
        assert srv.stop() == 0
    assert mounts_mentioning(dev) == [] and not os.path.exists(root)
    assert not os.path.exists(paths.runtime_dir(dev))


def test_no_sysfs(public_dir: Path, transport_name: str) -> None:
    dev = str(public_dir / "liveupdate")
    with _serve(public_dir, transport_name, "--no-sysfs") as srv:
        srv.start(START_TIMEOUT)
        assert not os.path.exists(os.path.join(paths.runtime_dir(dev), "sys"))


def _inotify_moved_to(directory: Path) -> Callable[[float], list[str]]:
    libc = ctypes.CDLL(None, use_errno=True)
    ifd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    assert ifd >= 0
    in_moved_to = 0x80
    assert libc.inotify_add_watch(ifd, str(directory).encode(), in_moved_to) >= 0

    def names(timeout: float) -> list[str]:
        out: list[str] = []
        if select.select([ifd], [], [], timeout)[0]:
            buf = os.read(ifd, 4096)
            off = 0
            while off < len(buf):
                _wd, _mask, _cookie, n = struct.unpack_from("iIII", buf, off)
                out.append(buf[off + 16:off + 16 + n].rstrip(b"\0").decode())
                off += 16 + n
        return out

    names.fd = ifd  # type: ignore[attr-defined]
    return names


def test_files_fallback(public_dir: Path, transport_name: str) -> None:
    """Plain files: same paths and contents, replaced atomically (inotify IN_MOVED_TO), removed on stop."""
    root = public_dir / "sysfiles"
    with _serve(public_dir, transport_name, "--sysfs", "files", root=root) as srv:
        srv.start(START_TIMEOUT)
        e = Emu(srv, root)
        assert mounts_mentioning(str(root)) == []
        assert e.state.read_bytes() == b"normal\n" and e.count.read_bytes() == b"0\n"
        assert stat.S_IMODE(os.stat(e.state).st_mode) == 0o444
        assert stat.S_IMODE(os.stat(e.dir).st_mode) == 0o555
        watch = _inotify_moved_to(e.dir)
        try:
            with e.open() as d:
                d.prepare()
                assert "state" in watch(5)
                assert e.state.read_bytes() == b"prepared\n"
                d.cancel()
            assert "state" in watch(5)
            assert e.state.read_bytes() == b"normal\n"
        finally:
            os.close(watch.fd)  # type: ignore[attr-defined]
        assert srv.stop() == 0
    assert not root.exists()


def test_python_api_in_process(public_dir: Path, transport_name: str) -> None:
    """``Server(sysfs=..., sysfs_root=...)`` on the caller's loop; the core's changes reach a poller."""
    import asyncio

    from cusedev.control.server import Server

    path, root = str(public_dir / "inproc"), public_dir / "inproc-sys"
    state = root / "kernel/liveupdate/state"

    def reader() -> tuple[bytes, int, bytes]:
        fd = os.open(state, os.O_RDONLY)
        try:
            first = os.read(fd, 4096)
            with LiveUpdateDevice(path) as d:
                d.prepare()
                woke = pri(fd, WAKE_MS)
                d.cancel()
            return first, woke, reread(fd)
        finally:
            os.close(fd)

    async def main() -> None:
        async with Server(path, transport_name, sysfs="fuse", sysfs_root=str(root)) as srv:
            assert srv.sysfs.kind == "fuse" and srv.sysfs.root == str(root)
            assert await asyncio.to_thread(reader) == (b"normal\n", PRI, b"normal\n")
            assert srv.handler.core.listeners  # type: ignore[union-attr]
        assert mounts_mentioning(str(root), path) == [] and not root.exists()

    try:
        asyncio.run(main())
    finally:
        force_cleanup(str(root))
        force_cleanup(path)
