"""Crashes and signals (issue 7.2): dying clients never wedge the emulator; a dying emulator leaves nothing.

Clients are forked children (cheap in the TCG VM) SIGKILLed before, during
and after ioctls, while blocked in a delayed ioctl, while holding the device,
and during a restore under `cusedev run`.  After each: the emulator serves,
the device reopens, the dead opener's outgoing files are gone (close
semantics) and the global state is untouched.  The emulator itself is
stopped by SIGTERM/SIGINT at several points (node and mounts gone, exit 0)
and SIGKILLed (the next `serve` on the path clears what it left).
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import random
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from _hostile import (
    EV_CANCEL,
    EV_PREPARE,
    GET_STATE,
    IN_VM,
    NORMAL,
    PREPARED,
    alive,
    assert_clean_log,
    fd_count,
    fork,
    get_state,
    ioctl,
    knob,
    memfd,
    open_retry,
    preserve,
    reap,
    set_event,
    status,
)
from _server import REPO, ServerProc, mounts_mentioning

from cusedev import Emulator, control
from cusedev.control import channel
from cusedev.fuse import abort as fuse_abort

KILL_ROUNDS = int(knob("CUSEDEV_CRASH_ROUNDS", 40, 8))
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
TIMEOUT = 300 if IN_VM else 60


pytestmark = pytest.mark.serve("--inject", "GET_FD_STATE:delay=30s")  # the module's shared_emulator


@pytest.fixture
def emu(shared_emulator: ServerProc) -> ServerProc:
    """One emulator for the client-side scenarios (each start costs seconds in the VM)."""
    return shared_emulator


def _wait_released(dev: str, timeout: float = 20.0) -> dict:
    """The opener slot is free again (release of a killed client is asynchronous)."""
    deadline = time.monotonic() + timeout
    while True:
        st = status(dev)
        if st["opener_pid"] is None or time.monotonic() > deadline:
            return st
        time.sleep(0.02)


def _check_serving(srv: ServerProc, prev_fds: int | None = None) -> None:
    dev = srv.device
    assert srv.proc is not None and alive(srv.proc.pid), "emulator died"
    st = _wait_released(dev)
    assert st["opener_pid"] is None and st["outgoing"] == [], st
    fd = open_retry(dev)
    try:
        assert get_state(fd) == NORMAL
    finally:
        os.close(fd)


def _looper(dev: str, ready_w: int) -> None:
    """Open, preserve two memfds, then ioctl forever (GET_STATE, PREPARE/CANCEL, preserve/unpreserve)."""
    fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
    m = memfd()
    preserve(fd, m, 1)
    preserve(fd, m, 2)
    os.write(ready_w, b"r")
    b = ctypes.create_string_buffer(struct.pack("=II", 8, 0), 8)
    i = 0
    while True:
        ioctl(fd, GET_STATE, b)
        if i % 16 == 0:
            set_event(fd, EV_PREPARE)
            set_event(fd, EV_CANCEL)
        if i % 7 == 0:
            preserve(fd, m, 100 + i % 5)
        i += 1


@pytest.mark.vm
def test_client_killed_at_random_times(emu: ServerProc, seeds: dict[str, int]) -> None:
    """A client looping ioctls is SIGKILLed at random points, many times: the emulator carries on."""
    seed = seeds["crash"]
    rng = random.Random(seed)
    pid0 = emu.proc.pid  # type: ignore[union-attr]
    base_fds = fd_count(pid0)
    for rnd in range(KILL_ROUNDS):
        r, w = os.pipe()
        child = fork(lambda w=w: _looper(emu.device, w))
        os.close(w)
        try:
            assert os.read(r, 1) == b"r", f"seed {seed} round {rnd}: the client could not start"
            time.sleep(rng.random() * 0.02)
            os.kill(child, signal.SIGKILL)
        finally:
            os.close(r)
            reap(child)
        st = _wait_released(emu.device)
        assert st["outgoing"] == [], f"seed {seed} round {rnd}: {st}"
        # a kill between PREPARE and CANCEL leaves the global state PREPARED: close does not change it
        if st["state"] == "prepared":
            fd = open_retry(emu.device)
            assert set_event(fd, EV_CANCEL) == 0
            os.close(fd)
    _check_serving(emu)
    assert fd_count(pid0) <= base_fds + 2, f"seed {seed}: emulator fds grew"


@pytest.mark.vm
def test_killed_holding_the_device_with_prepared_files(emu: ServerProc) -> None:
    r, w = os.pipe()

    def hold() -> None:
        fd = os.open(emu.device, os.O_RDWR | os.O_CLOEXEC)
        m = memfd()
        assert preserve(fd, m, 7) == 0
        assert set_event(fd, EV_PREPARE) == 0
        os.write(w, b"r")
        time.sleep(600)

    child = fork(hold)
    os.close(w)
    assert os.read(r, 1) == b"r"
    os.close(r)
    st = status(emu.device)
    assert st["state"] == "prepared" and [f["token"] for f in st["outgoing"]] == [7]
    with pytest.raises(OSError) as ei:
        os.open(emu.device, os.O_RDWR)
    assert ei.value.errno == 16  # EBUSY while held
    os.kill(child, signal.SIGKILL)
    reap(child)
    st = _wait_released(emu.device)
    assert st["outgoing"] == [] and st["state"] == "prepared", st  # files dropped, global state kept
    fd = open_retry(emu.device)
    try:
        assert get_state(fd) == PREPARED
        assert set_event(fd, EV_CANCEL) == 0
    finally:
        os.close(fd)
    _check_serving(emu)


@pytest.mark.vm
def test_killed_while_blocked_in_a_delayed_ioctl(emu: ServerProc) -> None:
    """GET_FD_STATE is delayed 30 s by fault injection: the caller dies inside it."""
    r, w = os.pipe()

    def blocked() -> None:
        fd = os.open(emu.device, os.O_RDWR | os.O_CLOEXEC)
        assert preserve(fd, memfd(), 5) == 0
        os.write(w, b"r")
        b = ctypes.create_string_buffer(struct.pack("=IBxxxQI4x", 24, 0, 5, 0), 24)
        ioctl(fd, 0xBA05, b)

    child = fork(blocked)
    os.close(w)
    assert os.read(r, 1) == b"r"
    os.close(r)
    time.sleep(0.3)
    t0 = time.monotonic()
    fd2 = None
    try:
        # the emulator is not held up by the sleeping call: status and a new open attempt answer now
        assert status(emu.device)["opener_pid"] is not None
        os.kill(child, signal.SIGKILL)
        reap(child)
        st = _wait_released(emu.device)
        assert st["outgoing"] == [], st
        fd2 = open_retry(emu.device)
        assert get_state(fd2) == NORMAL
        assert time.monotonic() - t0 < 25, "the release waited for the delayed ioctl"
    finally:
        if fd2 is not None:
            os.close(fd2)
    _check_serving(emu)


def test_killed_during_restore_under_run(emu: ServerProc) -> None:
    """A `cusedev run` client dies in FD_RESTORE (delayed); a second run restores the same token."""
    dev = emu.device
    fd = open_retry(dev)
    m = memfd(b"restore-me" * 500)
    try:
        assert preserve(fd, m, 9) == 0
        assert set_event(fd, EV_PREPARE) == 0
    finally:
        os.close(m)
    assert status(dev)["state"] == "prepared"
    assert status(dev)["outgoing"][0]["token"] == 9
    # the emulated kexec (the handle is revoked; the file comes back as incoming)
    res = control.request(dev, "kexec")
    assert res["ok"] and res["live"], res
    os.close(fd)
    assert control.request(dev, "inject", rules=["FD_RESTORE:delay=30s"])["ok"]
    prog = str(REPO / "tests/progs/luo_script.py")
    run = subprocess.Popen([sys.executable, "-m", "cusedev", "run", "--device", dev, "--", sys.executable, prog,
                            json.dumps([["open", dev], ["restore", 9]])], env=ENV, cwd=REPO,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while status(dev)["opener_pid"] is None and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5 if not IN_VM else 3)  # inside the delayed FD_RESTORE by now
        os.killpg(run.pid, signal.SIGKILL)  # the run and its client together
    finally:
        run.wait(TIMEOUT)
        run.stdout.close()  # type: ignore[union-attr]
        run.stderr.close()  # type: ignore[union-attr]
        control.request(dev, "inject", clear=True, rules=["GET_FD_STATE:delay=30s"])
    st = _wait_released(dev, 40)
    assert st["state"] == "updated" and st["opener_pid"] is None, st
    # The proxied call still holds a copy of the dead client's fd until its delay ends; whether the
    # install then lands (the kernel too may complete a restore for a task that is being killed) or
    # not, the token is still incoming and the machine can finish.
    assert [f["token"] for f in st["incoming"]] == [9], st
    steps = [["open", dev], ["finish"]] if st["incoming"][0]["restored"] else [["open", dev], ["restore", 9],
                                                                                ["finish"]]
    res = subprocess.run([sys.executable, "-m", "cusedev", "run", "--device", dev, "--", sys.executable, prog,
                          json.dumps(steps)], env=ENV, cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT)
    assert res.returncode == 0, res.stderr
    outs = [json.loads(x) for x in res.stdout.splitlines()]
    assert all("errno" not in o for o in outs), outs
    _check_serving(emu)


# -- the emulator's own death ----------------------------------------------------------------------
def _gone(path: str) -> None:
    assert not mounts_mentioning(path), mounts_mentioning(path)
    assert not os.path.lexists(path), f"{path} left behind"


@pytest.mark.parametrize("when", ["idle", "open-client", pytest.param("ioctl-loop", marks=pytest.mark.vm)])
def test_emulator_sigterm_sigint(public_dir: Path, transport_name: str, when: str) -> None:
    sig = {"idle": signal.SIGTERM, "open-client": signal.SIGINT, "ioctl-loop": signal.SIGTERM}[when]
    dev = str(public_dir / "liveupdate")
    child = None
    with ServerProc(dev, transport_name) as srv:
        srv.start()
        if when != "idle":
            r, w = os.pipe()
            if when == "open-client":
                def hold() -> None:
                    fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
                    preserve(fd, memfd(), 1)
                    os.write(w, b"r")
                    time.sleep(600)
                child = fork(hold)
            else:
                child = fork(lambda: _looper(dev, w))
            os.close(w)
            assert os.read(r, 1) == b"r"
            os.close(r)
            time.sleep(0.2)
        try:
            assert srv.stop(sig) == 0, srv.stderr()
        finally:
            if child is not None:
                os.kill(child, signal.SIGKILL)
                reap(child)
        assert_clean_log(srv.stderr())
    _gone(dev)


@pytest.mark.vm
def test_emulator_sigkill_then_restart(public_dir: Path, transport_name: str) -> None:
    """A SIGKILLed emulator leaves mounts/nodes; the next serve clears them (with a log line) and serves."""
    dev = str(public_dir / "liveupdate")
    with ServerProc(dev, transport_name) as srv:
        srv.cleanup = False  # leave the debris for the next one
        srv.start()
        fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
        srv.proc.kill()  # type: ignore[union-attr]
        srv.proc.wait()  # type: ignore[union-attr]
        with pytest.raises(OSError):
            ioctl_ok = ioctl(fd, GET_STATE, ctypes.create_string_buffer(struct.pack("=II", 8, 0), 8))
            raise OSError(ioctl_ok[1], "dead")
        os.close(fd)
    with ServerProc(dev, transport_name) as srv2:
        srv2.start()
        fd = open_retry(dev)
        try:
            assert get_state(fd) == NORMAL
        finally:
            os.close(fd)
        assert srv2.stop() == 0
        err = srv2.stderr()
        assert "stale" in err, err
        assert_clean_log(err)
    _gone(dev)


# -- an emulator wedged on its own FUSE node -----------------------------------------------------------------

#: Imported first by the emulator subprocess (``PYTHONPATH``): SIGUSR1 wedges it on its own node for real.
#: A thread's GET_STATE is read by the loop and held by the injected delay; a second later the loop
#: itself (SIGUSR2's handler runs on it) waits on a STATFS of its own file.  SIGTERM then finds no
#: loop to run its handler, and SIGKILL cannot end the thread: the kernel waits uninterruptibly for
#: the answer to a request the server has read, and only this dying process could answer.
WEDGE_HOOK = """
import os, signal, threading
path = os.environ.get("CUSEDEV_TEST_WEDGE")
if path:
    def _held():
        from cusedev.client import LiveUpdateDevice
        LiveUpdateDevice(path).state
    def _wedge(signum, frame):
        threading.Thread(target=_held, daemon=True).start()
        threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGUSR2)).start()
    def _block_loop(signum, frame):
        os.statvfs(path)
    signal.signal(signal.SIGUSR1, _wedge)
    signal.signal(signal.SIGUSR2, _block_loop)
"""


def _ours_mounted(emu: Emulator) -> list[str]:
    return mounts_mentioning(emu.path, os.path.join(emu.tmpdir, "sys"))  # device, its FUSE mount, sysfs tree


def test_emulator_wedged_on_its_own_node_is_ended_by_stop(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """SIGKILL leaves a wedged emulator in D state for ever; stop() aborts its connections and it is gone."""
    (tmp_path / "sitecustomize.py").write_text(WEDGE_HOOK)
    emu = Emulator(transport="fuse", inject=["GET_STATE:delay=600s"], trace=False)
    emu.env = {"PYTHONPATH": str(tmp_path), "CUSEDEV_TEST_WEDGE": emu.path}
    emu.start()
    proc = emu._proc
    assert proc is not None and emu.transport == "fuse"
    conns = list(emu._conns)
    assert len(conns) == 2, conns  # the device's mount (and its bind) and the sysfs tree
    try:
        os.kill(proc.pid, signal.SIGUSR1)
        _wait_blocked(emu.path)  # the loop blocks on its own node a second after the held ioctl
        stopper = threading.Thread(target=emu.stop, kwargs={"timeout": 2})
        t0 = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="cusedev.testing.emulator"):
            stopper.start()
            stopper.join(60)
        took = time.monotonic() - t0
        assert not stopper.is_alive(), "stop() hangs on the wedged emulator"
        assert proc.poll() is not None, "the emulator survived stop()"
        assert took < 30, took
        assert "aborted its connections /sys/fs/fuse/connections/" in caplog.text, caplog.text  # a real wedge
        assert not _ours_mounted(emu)
        assert not os.path.exists(emu.tmpdir)
    finally:
        if proc.poll() is None:  # the test failed: free the process so that the run can go on
            fuse_abort.abort(conns)
            proc.kill()
            proc.wait(30)
            emu.stop(timeout=5)


def _wait_blocked(path: str) -> None:
    deadline = time.monotonic() + 30
    while not _loop_blocked(path):
        assert time.monotonic() < deadline, "the emulator did not wedge"
        time.sleep(0.2)


def _loop_blocked(path: str) -> bool:
    """Whether the emulator's loop no longer answers its control socket (within a second)."""
    with channel.connect(path) as s, s.makefile("rb") as r:
        s.settimeout(1)
        channel.send(s, {"cmd": "status"})
        try:
            channel.receive(s, r)
        except TimeoutError:
            return True
    return False


def test_in_process_emulator_wedged_on_its_own_node_is_ended_by_stop(caplog: pytest.LogCaptureFixture) -> None:
    """An in-process emulator whose loop thread waits on its own FUSE file: stop() frees and ends it."""
    emu = Emulator(transport="fuse", in_process=True, trace=False)
    emu.start()
    thread, loop = emu._thread, emu._loop
    assert thread is not None and loop is not None
    conns = list(emu._conns)
    assert len(conns) == 2, conns
    failed: list[BaseException] = []

    def block() -> None:  # on the loop thread: a STATFS that only this blocked loop would answer
        try:
            os.statvfs(emu.path)
        except OSError as e:
            failed.append(e)

    try:
        loop.call_soon_threadsafe(block)
        _wait_blocked(emu.path)
        t0 = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="cusedev.testing.emulator"):
            emu.stop(timeout=2)
        took = time.monotonic() - t0
        assert not thread.is_alive(), "the loop thread is still wedged after stop()"
        assert took < 30, took
        assert [e.errno for e in failed] in ([errno.ENOTCONN], [errno.ECONNABORTED]), failed
        assert "aborted its connections /sys/fs/fuse/connections/" in caplog.text, caplog.text
        assert not _ours_mounted(emu)
    finally:
        if thread.is_alive():  # the test failed: free the thread
            fuse_abort.abort(conns)
            thread.join(30)
            emu.stop(timeout=5)
