"""Load (issue 7.3): open races, concurrent threads of one opener, and a long mixed run without growth.

CUSEDEV_LOAD_SECONDS sets the mixed run's length (60 on the host, 10 in the VM).
One emulator serves the module (``shared_emulator``; its exit status and log are checked at the end).
The open race and the threads of one opener run in the VM phase too (``vm``): concurrent opens and
concurrent retry rounds of one open file are CUSE's own paths; the mixed run is host only.
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import struct
import threading
import time

import pytest
from _hostile import (
    EV_CANCEL,
    EV_PREPARE,
    GET_FD_STATE,
    GET_STATE,
    NORMAL,
    PREPARED,
    SET_FD_EVENT,
    UNPRESERVE,
    alive,
    fd_count,
    fork,
    get_state,
    ioctl,
    knob,
    memfd,
    open_retry,
    preserve,
    reap,
    rss_kb,
    set_event,
    status,
)
from _server import ServerProc

LOAD_SECONDS = knob("CUSEDEV_LOAD_SECONDS", 60, 10)
RACERS = int(knob("CUSEDEV_LOAD_RACERS", 24, 8))
THREADS = 4
STATES = {b"normal\n", b"prepared\n"}


pytestmark = pytest.mark.serve("--sysfs-root", "{dir}/sys")  # the module's shared_emulator


@pytest.fixture
def emu(shared_emulator: ServerProc) -> ServerProc:
    where = os.path.dirname(shared_emulator.device)
    shared_emulator.sysfs_state = os.path.join(where, "sys/kernel/liveupdate/state")  # type: ignore[attr-defined]
    return shared_emulator


@pytest.mark.vm
def test_open_race_exactly_one_wins(emu: ServerProc) -> None:
    for _round in range(3):
        go_r, go_w = os.pipe()
        res_r, res_w = os.pipe()
        end_r, end_w = os.pipe()

        def racer(go_r: int = go_r, go_w: int = go_w, res_r: int = res_r, res_w: int = res_w, end_r: int = end_r,
                  end_w: int = end_w) -> None:
            for fd in (go_w, res_r, end_w):  # only the parent may hold these ends, or nobody sees EOF
                os.close(fd)
            os.read(go_r, 1)
            try:
                fd = os.open(emu.device, os.O_RDWR | os.O_CLOEXEC)
            except OSError as e:
                os.write(res_w, bytes([e.errno]))
                return
            os.write(res_w, b"\0")
            os.read(end_r, 1)  # hold the device until everyone has answered
            os.close(fd)

        kids = [fork(racer) for _ in range(RACERS)]
        for fd in (go_r, res_w, end_r):
            os.close(fd)
        os.write(go_w, b"g" * RACERS)
        results = b""
        while len(results) < RACERS:
            chunk = os.read(res_r, RACERS)
            assert chunk, f"a racer died: {results!r}"
            results += chunk
        os.close(end_w)
        for k in kids:
            assert reap(k) == 0
        for fd in (go_w, res_r):
            os.close(fd)
        assert results.count(0) == 1, results
        assert sorted(set(results) - {0}) == [errno.EBUSY], results
        os.close(open_retry(emu.device))  # the winner's close freed the device


@pytest.mark.vm
def test_threads_of_one_opener(emu: ServerProc) -> None:
    """Each thread works its own tokens through the shared fd: every answer is the sequential one."""
    fd = open_retry(emu.device)
    files = [memfd() for _ in range(THREADS)]
    errors: list[str] = []
    rounds = int(knob("CUSEDEV_LOAD_THREAD_ROUNDS", 400, 40))

    def work(k: int) -> None:
        tok = 1000 + k
        b16 = ctypes.create_string_buffer(16)
        b24 = ctypes.create_string_buffer(24)
        try:
            for _ in range(rounds):
                if (e := preserve(fd, files[k], tok)) != 0:
                    errors.append(f"t{k} preserve {e}")
                ctypes.memmove(b16, struct.pack("=IIQ", 16, EV_PREPARE, tok), 16)
                if ioctl(fd, SET_FD_EVENT, b16)[1]:
                    errors.append(f"t{k} fd prepare")
                ctypes.memmove(b24, struct.pack("=IB3xQI4x", 24, 0, tok, 0), 24)
                r, e = ioctl(fd, GET_FD_STATE, b24)
                if r or struct.unpack_from("=I", b24.raw, 16)[0] != PREPARED:
                    errors.append(f"t{k} fd state {e} {b24.raw.hex()}")
                if get_state(fd) != NORMAL:
                    errors.append(f"t{k} global state")
                ctypes.memmove(b16, struct.pack("=I4xQ", 16, tok), 16)
                if ioctl(fd, UNPRESERVE, b16)[1]:
                    errors.append(f"t{k} unpreserve")
        except Exception as e:  # noqa: BLE001
            errors.append(f"t{k}: {e!r}")

    ts = [threading.Thread(target=work, args=(k,)) for k in range(THREADS)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    try:
        assert not errors, errors[:10]
        st = status(emu.device)
        assert st["state"] == "normal" and st["outgoing"] == [], st
    finally:
        os.close(fd)
        for m in files:
            os.close(m)


def _tight_loop(dev: str, seconds: float) -> None:
    """GET_STATE/preserve/PREPARE/CANCEL as fast as possible; exit 1 on any unexpected answer."""
    fd = open_retry(dev)
    m = memfd()
    b = ctypes.create_string_buffer(struct.pack("=II", 8, 0), 8)
    end = time.monotonic() + seconds
    i = 0
    while time.monotonic() < end:
        for _ in range(50):
            if ioctl(fd, GET_STATE, b)[0] != 0:
                os._exit(2)
            i += 1
        if preserve(fd, m, 1) not in (0, errno.EEXIST):
            os._exit(3)
        if set_event(fd, EV_PREPARE) != 0 or set_event(fd, EV_CANCEL) != 0:
            os._exit(4)
    os.write(1, f"loop: {i} GET_STATE\n".encode())


def test_tight_loop_with_sysfs_and_status(emu: ServerProc) -> None:
    pid = emu.proc.pid  # type: ignore[union-attr]
    loop = fork(lambda: _tight_loop(emu.device, LOAD_SECONDS))
    stop = threading.Event()
    errors: list[str] = []
    counts = {"sysfs": 0, "status": 0}

    def sysfs_reader() -> None:
        while not stop.is_set():
            try:
                with open(emu.sysfs_state, "rb") as f:  # type: ignore[attr-defined]
                    v = f.read()
                if v not in STATES:
                    errors.append(f"sysfs {v!r}")
                counts["sysfs"] += 1
            except OSError as e:
                errors.append(f"sysfs {e}")

    def status_reader() -> None:
        while not stop.is_set():
            try:
                st = status(emu.device)
                if st["state"] not in ("normal", "prepared"):
                    errors.append(f"status {st}")
                counts["status"] += 1
            except Exception as e:  # noqa: BLE001
                errors.append(f"status {e!r}")
            time.sleep(0.005)

    ts = [threading.Thread(target=sysfs_reader), threading.Thread(target=status_reader)]
    for t in ts:
        t.start()
    samples = []
    try:
        t0 = time.monotonic()
        while time.monotonic() - t0 < LOAD_SECONDS:
            time.sleep(min(2.0, LOAD_SECONDS / 10))
            assert alive(pid)
            samples.append((fd_count(pid), rss_kb(pid)))
        st = reap(loop, LOAD_SECONDS + 60)
        assert os.WIFEXITED(st) and os.WEXITSTATUS(st) == 0, f"tight loop failed: status {st}"
    finally:
        stop.set()
        for t in ts:
            t.join()
        try:
            os.kill(loop, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not errors, errors[:10]
    assert counts["sysfs"] > 10 and counts["status"] > 10, counts
    warm = samples[len(samples) // 3:]
    fds, rss = [s[0] for s in warm], [s[1] for s in warm]
    assert max(fds) - min(fds) <= 4, samples
    assert max(rss) - min(rss) <= 8 * 1024, samples  # no growth after warm-up (KiB)
    print(f"\nload: {LOAD_SECONDS:.0f}s, sysfs reads {counts['sysfs']}, status queries {counts['status']}, "
          f"emulator fds/RSS samples {samples[0]} .. {samples[-1]}")
