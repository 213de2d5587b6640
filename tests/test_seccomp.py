"""cusedev.seccomp and cusedev.launcher through real syscalls.

Filtered children are small Python programs (``python -I -S -c``) that write
a JSON report to the file named by argv[1].  A Supervisor serves their
listener on an asyncio loop in a thread, as the emulator will.

Safety: the only reboot() commands ever issued are LINUX_REBOOT_CMD_CAD_OFF
(harmless even unfiltered) and LINUX_REBOOT_CMD_KEXEC, the latter only by a
child that first checks it runs under a seccomp filter (and has no
CAP_SYS_BOOT; with no kexec image loaded the real kernel would say EINVAL).
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import json
import os
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cusedev import uapi
from cusedev.run import launcher, seccomp

REPO = Path(__file__).resolve().parent.parent
RESTORE = uapi.LIVEUPDATE_IOCTL_FD_RESTORE
assert RESTORE == 0xBA02

PRELUDE = r"""
import ctypes, errno, fcntl, json, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
OUT = sys.argv[1]
def report(path=OUT, **kw):
    with open(path + ".tmp", "w") as f:
        json.dump(kw, f)
    os.rename(path + ".tmp", path)
def ioctl_errno(fd, cmd, arg=None):
    try:
        return fcntl.ioctl(fd, cmd, bytearray(16) if arg is None else arg)
    except OSError as e:
        return -e.errno
def reboot(cmd, nr=169):
    ctypes.set_errno(0)
    r = libc.syscall(ctypes.c_long(nr), ctypes.c_uint(0xfee1dead), ctypes.c_uint(672274793),
                     ctypes.c_uint(cmd), ctypes.c_void_p(0))
    return r if r >= 0 else -ctypes.get_errno()
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return line.split(":", 1)[1].strip()
def filtered():
    return status("Seccomp") == "2"
"""


# --------------------------------------------------------------------------
# harness


class LoopThread:
    """An asyncio loop in a daemon thread, standing in for the emulator's loop."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def call(self, coro: Awaitable[Any], timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)  # type: ignore[arg-type]

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def loop_thread() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.stop()


def wait_exit(pid: int, timeout: float = 30.0) -> int:
    """waitpid with a deadline (SIGKILL on expiry, so a bug fails the test instead of hanging it)."""
    deadline = time.monotonic() + timeout
    while True:
        got, status = os.waitpid(pid, os.WNOHANG)
        if got == pid:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"child {pid} did not exit within {timeout}s")
        time.sleep(0.005)


Handler = Callable[[seccomp.Notification], Awaitable[Any]]


class Run:
    """One filtered child + its Supervisor; records every notification."""

    def __init__(self, lt: LoopThread, tmp_path: Path, body: str, on_ioctl: Handler, on_reboot: Handler | None = None):
        self.lt = lt
        self.out = tmp_path / f"report-{id(self)}.json"
        self.seen: list[seccomp.Notification] = []
        code = PRELUDE + textwrap.dedent(body)
        self.pid, listener = seccomp.spawn([sys.executable, "-I", "-S", "-c", code, str(self.out)])

        async def record_ioctl(n: seccomp.Notification) -> None:
            self.seen.append(n)
            await on_ioctl(n)

        async def record_reboot(n: seccomp.Notification) -> None:
            self.seen.append(n)
            if on_reboot is None:
                pytest.fail(f"unexpected reboot notification {n!r}")
            await on_reboot(n)

        async def start() -> seccomp.Supervisor:
            sup = seccomp.Supervisor(listener, record_ioctl, record_reboot)
            sup.start()
            return sup

        self.sup: seccomp.Supervisor = lt.call(start())

    def finish(self) -> dict[str, Any]:
        """Wait for the child, then for the listener's HUP; return the child's report."""
        code = wait_exit(self.pid)
        assert code == 0, f"child exited {code}"
        self.lt.call(asyncio.wait_for(self.sup.wait_closed(), 20))
        return json.loads(self.out.read_text())


async def reply_zero(n: seccomp.Notification) -> None:
    n.reply(0)


# --------------------------------------------------------------------------
# the filter


def test_notif_numbers_and_kernel_sizes() -> None:
    assert seccomp.SECCOMP_IOCTL_NOTIF_RECV == 0xC0502100
    assert seccomp.SECCOMP_IOCTL_NOTIF_SEND == 0xC0182101
    assert seccomp.SECCOMP_IOCTL_NOTIF_ID_VALID == 0x40082102
    assert seccomp.SECCOMP_IOCTL_NOTIF_ADDFD == 0x40182103
    # The running kernel agrees with our struct sizes.
    sizes = (
        uapi.ffi.sizeof("struct seccomp_notif"),
        uapi.ffi.sizeof("struct seccomp_notif_resp"),
        uapi.ffi.sizeof("struct seccomp_data"),
    )
    assert seccomp.notif_sizes() == sizes == (80, 24, 64)


def _bpf_run(prog: bytes, nr: int, arch: int, args: tuple[int, ...]) -> int:
    """A tiny classic-BPF interpreter for the instructions build_filter uses."""
    data = uapi.codec("seccomp_data").pack(nr, arch, 0, *args)
    insn = uapi.codec("sock_filter")
    pc, acc = 0, 0
    while True:
        code, jt, jf, k = insn.unpack_from(prog, pc * insn.size)
        pc += 1
        if code == uapi.BPF_LD | uapi.BPF_W | uapi.BPF_ABS:
            acc = int.from_bytes(data[k : k + 4], "little")
        elif code == uapi.BPF_JMP | uapi.BPF_JEQ | uapi.BPF_K:
            pc += jt if acc == k else jf
        elif code == uapi.BPF_RET | uapi.BPF_K:
            return k
        else:
            raise AssertionError(f"unexpected opcode {code:#x}")


@pytest.mark.parametrize(
    ("nr", "arch", "args", "want"),
    [
        (16, uapi.AUDIT_ARCH_X86_64, (3, RESTORE, 0x7FFF0000, 0, 0, 0), "notify"),
        (16, uapi.AUDIT_ARCH_X86_64, (3, 0xDEAD_0000_0000 | RESTORE, 0, 0, 0, 0), "notify"),  # cmd is 32-bit
        (16, uapi.AUDIT_ARCH_X86_64, (3, RESTORE + 1, 0, 0, 0, 0), "allow"),
        (16, uapi.AUDIT_ARCH_X86_64, (3, 0x541B, 0, 0, 0, 0), "allow"),  # FIONREAD
        (0, uapi.AUDIT_ARCH_X86_64, (3, RESTORE, 0, 0, 0, 0), "allow"),  # read(), same args
        (169, uapi.AUDIT_ARCH_X86_64, (0xFEE1DEAD, 672274793, uapi.LINUX_REBOOT_CMD_KEXEC, 0, 0, 0), "notify"),
        (169, uapi.AUDIT_ARCH_X86_64, (0xFEE1DEAD, 672274793, uapi.LINUX_REBOOT_CMD_RESTART, 0, 0, 0), "eperm"),
        (169, uapi.AUDIT_ARCH_X86_64, (0xFEE1DEAD, 672274793, uapi.LINUX_REBOOT_CMD_POWER_OFF, 0, 0, 0), "eperm"),
        (169, uapi.AUDIT_ARCH_X86_64, (0, 0, uapi.LINUX_REBOOT_CMD_CAD_OFF, 0, 0, 0), "eperm"),
        (0x40000000 | 169, uapi.AUDIT_ARCH_X86_64, (0, 0, uapi.LINUX_REBOOT_CMD_KEXEC, 0, 0, 0), "eperm"),  # x32
        (88, uapi.AUDIT_ARCH_I386, (0, 0, uapi.LINUX_REBOOT_CMD_RESTART, 0, 0, 0), "eperm"),  # i386 reboot
        (54, uapi.AUDIT_ARCH_I386, (3, RESTORE, 0, 0, 0, 0), "allow"),  # i386 ioctl: not ours
        (169, uapi.AUDIT_ARCH_I386, (0, 0, 0, 0, 0, 0), "allow"),  # i386 169 is not reboot
    ],
)
def test_filter_program(nr: int, arch: int, args: tuple[int, ...], want: str) -> None:
    actions = {
        "notify": uapi.SECCOMP_RET_USER_NOTIF,
        "allow": uapi.SECCOMP_RET_ALLOW,
        "eperm": uapi.SECCOMP_RET_ERRNO | errno.EPERM,
    }
    assert _bpf_run(seccomp.build_filter(RESTORE), nr, arch, args) == actions[want]


# --------------------------------------------------------------------------
# (a) FD_RESTORE: notified, fd installed with ADDFD, O_CLOEXEC, same file


def test_restore_installs_fd(loop_thread: LoopThread, tmp_path: Path) -> None:
    memfd = os.memfd_create("restored", os.MFD_CLOEXEC)
    os.write(memfd, b"preserved bytes")

    async def on_ioctl(n: seccomp.Notification) -> None:
        assert n.valid()
        n.reply(n.addfd(memfd))

    body = """
    fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    new = ioctl_errno(fd, 0xBA02)
    data = os.pread(new, 100, 0)
    os.pwrite(new, b"P", 0)  # visible to the supervisor's memfd if it is the same file
    report(fd=fd, new=new, fdflags=fcntl.fcntl(new, fcntl.F_GETFD), data=data.decode(),
           target=os.readlink(f"/proc/self/fd/{new}"))
    """
    run = Run(loop_thread, tmp_path, body, on_ioctl)
    rep = run.finish()
    (n,) = run.seen
    assert (n.pid, n.nr, n.args[0], n.args[1]) == (run.pid, 16, rep["fd"], RESTORE)
    assert rep["new"] >= 0 and rep["new"] != rep["fd"]
    assert rep["fdflags"] & fcntl.FD_CLOEXEC
    assert rep["data"] == "preserved bytes"
    assert rep["target"].startswith("/memfd:restored")
    assert os.pread(memfd, 100, 0) == b"Preserved bytes"
    os.close(memfd)


def test_addfd_flags_and_send(loop_thread: LoopThread, tmp_path: Path) -> None:
    """newfd_flags=0 gives an inheritable fd; SETFD picks the number; SEND answers atomically."""
    memfd = os.memfd_create("m", os.MFD_CLOEXEC)

    async def on_ioctl(n: seccomp.Notification) -> None:
        assert n.addfd(memfd, 0, newfd=40) == 40
        assert n.addfd(memfd, send=True) >= 0
        assert n.answered

    body = """
    new = ioctl_errno(0, 0xBA02)
    report(new=new, flags40=fcntl.fcntl(40, fcntl.F_GETFD), flagsnew=fcntl.fcntl(new, fcntl.F_GETFD))
    """
    run = Run(loop_thread, tmp_path, body, on_ioctl)
    rep = run.finish()
    os.close(memfd)
    assert rep["flags40"] == 0 and rep["flagsnew"] == fcntl.FD_CLOEXEC and rep["new"] not in (40, 0)


# --------------------------------------------------------------------------
# (b) continue_ runs the real ioctl; (c) other ioctls and (d) other reboots are not notified


def test_continue_runs_real_ioctl(loop_thread: LoopThread, tmp_path: Path) -> None:
    async def on_ioctl(n: seccomp.Notification) -> None:
        assert n.continue_()

    body = """
    fd = os.open("/dev/null", os.O_RDONLY)
    report(r=ioctl_errno(fd, 0xBA02))
    """
    run = Run(loop_thread, tmp_path, body, on_ioctl)
    assert run.finish() == {"r": -errno.ENOTTY}
    assert len(run.seen) == 1


def test_only_restore_and_kexec_are_notified(loop_thread: LoopThread, tmp_path: Path) -> None:
    body = """
    import termios
    r, w = os.pipe()
    os.write(w, b"abc")
    null = os.open("/dev/null", os.O_RDONLY)
    res = {
        "fionread": ioctl_errno(r, termios.FIONREAD, bytearray(4)),
        "tcgets": ioctl_errno(null, termios.TCGETS, bytearray(64)),
        "get_state": ioctl_errno(null, 0xBA03),
        "fd_preserve": ioctl_errno(null, 0xBA00),
        "cad_off": reboot(0x00000000),
        "cad_off_x32": reboot(0x00000000, nr=0x40000000 | 169),
    }
    res["marker"] = ioctl_errno(null, 0xBA02)  # the only one the supervisor may see
    report(**res)
    """
    run = Run(loop_thread, tmp_path, body, reply_zero)
    rep = run.finish()
    assert rep == {
        "fionread": 0,
        "tcgets": -errno.ENOTTY,
        "get_state": -errno.ENOTTY,
        "fd_preserve": -errno.ENOTTY,
        "cad_off": -errno.EPERM,
        "cad_off_x32": -errno.EPERM,
        "marker": 0,
    }
    assert [(n.nr, n.args[1]) for n in run.seen] == [(16, RESTORE)]


# --------------------------------------------------------------------------
# (e) reboot(KEXEC) is notified; the reply's error is what reboot() returns; (g) no CAP_SYS_BOOT


def test_kexec_is_notified_and_answered(loop_thread: LoopThread, tmp_path: Path) -> None:
    async def on_reboot(n: seccomp.Notification) -> None:
        n.reply(error=-errno.EIO)

    body = """
    if not filtered() or int(status("CapEff"), 16) & (1 << 22):
        sys.exit(3)  # never issue KEXEC unfiltered
    report(kexec=reboot(0x45584543))
    """
    run = Run(loop_thread, tmp_path, body, reply_zero, on_reboot)
    assert run.finish() == {"kexec": -errno.EIO}
    (n,) = run.seen
    assert n.nr == 169 and n.args[:3] == (0xFEE1DEAD, 672274793, uapi.LINUX_REBOOT_CMD_KEXEC)


def test_child_has_no_cap_sys_boot(loop_thread: LoopThread, tmp_path: Path) -> None:
    body = """
    report(**{f: int(status(f), 16) for f in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")},
           nnp=status("NoNewPrivs"), filters=status("Seccomp_filters"))
    """
    rep = Run(loop_thread, tmp_path, body, reply_zero).finish()
    boot = 1 << 22
    assert not any(rep[f] & boot for f in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")), rep
    assert rep["filters"] == "1"
    if os.geteuid() == 0:
        assert rep["nnp"] == "0"  # root needs no NO_NEW_PRIVS
        assert rep["CapEff"] | boot == _own_cap("CapEff")  # only CAP_SYS_BOOT went
    assert _own_cap("CapEff") & boot or os.geteuid() != 0  # the test process itself is untouched


def _own_cap(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1], 16)
    raise AssertionError(field)


# --------------------------------------------------------------------------
# (f) inheritance; several listeners at once; target death


def test_filter_is_inherited_by_grandchildren(loop_thread: LoopThread, tmp_path: Path) -> None:
    async def on_ioctl(n: seccomp.Notification) -> None:
        n.reply(n.pid)

    body = """
    pid = os.fork()
    if pid == 0:
        report(OUT + ".gc", pid=os.getpid(), r=ioctl_errno(0, 0xBA02), filtered=filtered())
        os._exit(0)
    os.waitpid(pid, 0)
    report(gc=json.load(open(OUT + ".gc")))
    """
    run = Run(loop_thread, tmp_path, body, on_ioctl)
    gc = run.finish()["gc"]
    assert gc["filtered"] and gc["r"] == gc["pid"] != run.pid
    assert [n.pid for n in run.seen] == [gc["pid"]]


def test_several_listeners_at_once(loop_thread: LoopThread, tmp_path: Path) -> None:
    """Two children block in FD_RESTORE at the same time, each answered on its own listener."""
    both = asyncio.Event()
    pending: list[seccomp.Notification] = []

    async def on_ioctl(n: seccomp.Notification) -> None:
        pending.append(n)
        if len(pending) == 2:
            both.set()
        await asyncio.wait_for(both.wait(), 5)
        n.reply(1000 + n.pid % 1000)

    body = """
    report(r=ioctl_errno(0, 0xBA02), pid=os.getpid())
    """
    runs = [Run(loop_thread, tmp_path, body, on_ioctl) for _ in range(2)]
    reps = [r.finish() for r in runs]
    assert {n._sup.fd for n in pending} == {-1}  # both listeners closed after HUP
    for run, rep in zip(runs, reps, strict=True):
        assert rep == {"r": 1000 + run.pid % 1000, "pid": run.pid}
        assert len(run.seen) == 1


def test_dead_target_is_tolerated(loop_thread: LoopThread, tmp_path: Path) -> None:
    results: dict[str, Any] = {}

    async def on_ioctl(n: seccomp.Notification) -> None:
        os.kill(n.pid, signal.SIGKILL)
        for _ in range(500):
            if not n.valid():
                break
            await asyncio.sleep(0.005)
        results["valid"] = n.valid()
        memfd = os.memfd_create("x", os.MFD_CLOEXEC)
        try:
            n.addfd(memfd)
        except seccomp.TargetGone as e:
            results["addfd"] = e.errno
        finally:
            os.close(memfd)
        results["reply"] = n.reply(0)

    run = Run(loop_thread, tmp_path, "ioctl_errno(0, 0xBA02)\n", on_ioctl)
    assert wait_exit(run.pid) == -signal.SIGKILL
    loop_thread.call(asyncio.wait_for(run.sup.wait_closed(), 5))
    assert results == {"valid": False, "addfd": errno.ENOENT, "reply": False}


def test_unanswered_and_failing_handlers_do_not_hang_the_target(loop_thread: LoopThread, tmp_path: Path) -> None:
    async def on_ioctl(n: seccomp.Notification) -> None:
        if n.args[2] == 1:
            raise RuntimeError("handler bug (expected by the test)")
        # returns without answering

    body = """
    report(a=ioctl_errno(0, 0xBA02, 0), b=ioctl_errno(0, 0xBA02, 1))
    """
    assert Run(loop_thread, tmp_path, body, on_ioctl).finish() == {"a": -errno.ENOSYS, "b": -errno.EIO}


# --------------------------------------------------------------------------
# (i) HUP, spawn errors, handoff ordering


def test_listener_hup_when_children_are_gone(loop_thread: LoopThread, tmp_path: Path) -> None:
    pid, listener = seccomp.spawn(["true"])
    p = select.poll()
    p.register(listener, select.POLLIN)
    # HUP comes when the filter's last user is gone: at exit on 6.18, at the latest once reaped.
    assert wait_exit(pid) == 0
    assert p.poll(1000) == [(listener, select.POLLHUP)]

    async def serve() -> bool:
        sup = seccomp.Supervisor(listener, reply_zero, reply_zero)
        sup.start()
        await asyncio.wait_for(sup.wait_closed(), 5)
        return sup.closed

    assert loop_thread.call(serve())
    with pytest.raises(OSError) as exc:
        os.fstat(listener)  # released (nothing else opened in between in this thread)
    assert exc.value.errno == errno.EBADF


def test_spawn_exec_failure_is_raised() -> None:
    with pytest.raises(FileNotFoundError):
        seccomp.spawn(["/nonexistent/cusedev-test-command"])


def test_handoff_runs_before_exec_and_failure_stops_the_command(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    seen: list[int] = []

    def handoff(fd: int) -> None:
        seen.append(fd)
        time.sleep(0.05)
        assert not marker.exists()  # the command has not started yet
        raise ConnectionRefusedError("emulator not reachable")

    with pytest.raises(ConnectionRefusedError):
        seccomp.spawn(["touch", str(marker)], handoff=handoff)
    time.sleep(0.05)
    assert seen and not marker.exists()


# --------------------------------------------------------------------------
# launcher: (h) kill_tree, exit codes, signal forwarding (in a process of its own: it becomes a subreaper)

LAUNCHER_SCRIPT = r"""
import asyncio, json, os, signal, sys
from cusedev.run import launcher

def sleeps():
    out = {}
    for p in launcher.descendants():
        try:
            with open(f"/proc/{p}/comm") as f:
                comm = f.read().strip()
        except (FileNotFoundError, ProcessLookupError):
            continue
        st = launcher._stat(p)
        if comm == "sleep" and st and st[0] not in "ZX":
            out[p] = st[1]
    return out

async def main():
    res = {}
    handed = []
    # 1. exit code of a plain command
    res["exit3"] = await launcher.run(["sh", "-c", "exit 3"], handoff=handed.append)
    # 2. kexec: the whole tree dies, double-forked and setsid'ed processes included
    kexec = asyncio.Event()
    tree = "sleep 60 & (sleep 61 &) ; (setsid sleep 62 &) ; sh -c 'sleep 63 & sleep 64' & exec sleep 65"
    lau = launcher.Launcher(["sh", "-c", tree], handoff=handed.append)
    task = asyncio.ensure_future(lau.run(kexec.wait()))
    for _ in range(1000):
        found = sleeps()
        if len(found) == 6:
            break
        await asyncio.sleep(0.01)
    res["tree"] = found
    kexec.set()
    res["kexec_code"] = await asyncio.wait_for(task, 10)
    res["kexeced"] = lau.kexeced
    res["left"] = launcher.descendants()
    res["cmd"] = lau.pid
    # 3. SIGTERM to the launcher reaches the command
    lau = launcher.Launcher(["sleep", "30"], handoff=handed.append)
    task = asyncio.ensure_future(lau.run())
    while lau.pid is None:
        await asyncio.sleep(0.01)
    os.kill(os.getpid(), signal.SIGTERM)
    res["sigterm_code"] = await asyncio.wait_for(task, 10)
    res["handed"] = len(handed)
    res["me"] = os.getpid()
    print(json.dumps(res))

asyncio.run(main())
"""


def test_launcher_kill_tree_exit_codes_and_signals() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-c", LAUNCHER_SCRIPT], env=env, capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    assert res["exit3"] == 3
    tree = {int(p): ppid for p, ppid in res["tree"].items()}
    assert len(tree) == 6, tree
    assert res["cmd"] in tree  # `exec sleep 65`
    reparented = [p for p, ppid in tree.items() if ppid == res["me"] and p != res["cmd"]]
    assert len(reparented) >= 2, tree  # the double-forked and setsid'ed sleeps came up to the subreaper
    assert res["kexec_code"] == 128 + signal.SIGKILL and res["kexeced"]
    assert res["left"] == []
    for pid in tree:
        assert not Path(f"/proc/{pid}").exists() or launcher._stat(pid) is None, pid
    assert res["sigterm_code"] == 128 + signal.SIGTERM
    assert res["handed"] == 3


def test_descendants_and_kill_tree_of_another_root() -> None:
    """kill_tree on a root that is not us: zombies count as gone, the walk still finds grandchildren."""
    proc = subprocess.Popen(["sh", "-c", "sleep 30 & sleep 31 & wait"])
    try:
        deadline = time.monotonic() + 5
        while len(launcher.descendants(proc.pid)) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        killed = launcher.kill_tree(proc.pid)
        assert len(killed) == 2
        assert proc.wait(5) == 0  # sh's `wait` returns once its children died
    finally:
        proc.kill()
        proc.wait()
