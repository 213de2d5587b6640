"""Fault injection through real clients: each rule kind, its errno and the side effects of the real failure.

Host only, but for the delayed calls answered meanwhile (``vm``): on CUSE each of them is a retry round
trip whose state the emulator must keep while the others are answered.
"""

from __future__ import annotations

import errno
import json
import os
import threading
import time
from pathlib import Path

import pytest
from _server import ServerProc
from test_trace import cli, records, wait_for

from cusedev import control
from cusedev import uapi as U
from cusedev.client import LiveUpdateDevice, State
from cusedev.device.openfiles import EmulatedDevice as Device
from cusedev.tracing.inject import RuleError, parse_rule


def test_ioctl_error_when_2plus_traced_and_replayed(public_dir: Path, tmp_path: Path, transport_name: str) -> None:
    trace = tmp_path / "inj.jsonl"
    with ServerProc(str(public_dir / "d"), transport_name, "--inject", "FD_PRESERVE:error=ENOSPC:when=2+",
                    "--trace", str(trace)) as srv:
        srv.start()
        with LiveUpdateDevice(srv.device) as d:
            fd = os.memfd_create("t")
            os.write(fd, b"x" * 100)
            d.preserve(fd, 1)
            for token in (2, 3):
                with pytest.raises(OSError) as ei:
                    d.preserve(fd, token)
                assert ei.value.errno == errno.ENOSPC
            assert d.fd_state(1) == State.NORMAL
            with pytest.raises(OSError) as ei:  # no side effect: never registered
                d.fd_state(2)
            assert ei.value.errno == errno.ENOENT
            os.close(fd)
        wait_for(lambda: any(r["type"] == "release" for r in records(trace)))
    inj = [r for r in records(trace) if r.get("injected")]
    assert len(inj) == 2 and all(r["errno"] == errno.ENOSPC and r["name"].endswith("FD_PRESERVE") for r in inj)
    assert inj[0]["injected"]["rule"] == "FD_PRESERVE:error=ENOSPC:when=2+"
    show = cli("trace", "show", "--cmd", "FD_PRESERVE", str(trace), check=True).stdout.splitlines()
    assert [ln.endswith("us") and "= -1 ENOSPC (No space left on device) (INJECTED)" in ln for ln in show] == \
        [False, True, True]
    with ServerProc(str(public_dir / "fresh"), transport_name) as srv:
        srv.start()
        r = cli("trace", "replay", str(trace), "--device", srv.device)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "(2 injected faults skipped): 0 divergences" in r.stdout


def test_when_n_and_step_at_runtime_then_clear(shared_emulator: ServerProc) -> None:
    dev = shared_emulator.device
    r = cli("inject", "GET_STATE:error=EAGAIN:when=2", "LIVEUPDATE_IOCTL_SET_EVENT:error=EPERM:when=1+2",
            "--device", dev, check=True)
    assert "GET_STATE:error=EAGAIN:when=2  (hits 0)" in r.stdout

    def errs(fn, n: int) -> list[int]:  # type: ignore[no-untyped-def]
        out = []
        for _ in range(n):
            try:
                fn()
                out.append(0)
            except OSError as e:
                out.append(e.errno or 0)
        return out

    with LiveUpdateDevice(dev) as d:
        assert errs(lambda: d.state, 4) == [0, errno.EAGAIN, 0, 0]
        assert errs(lambda: d.set_event(7), 5) == [errno.EPERM, errno.EINVAL, errno.EPERM, errno.EINVAL,
                                                  errno.EPERM]
        r = cli("inject", "--clear", "--device", dev, check=True)
        assert r.stdout == ""
        assert errs(lambda: d.set_event(7), 2) == [errno.EINVAL, errno.EINVAL]
    bad = cli("inject", "GET_STATE:error=ENOPE", "--device", dev)
    assert bad.returncode == 1 and "unknown errno 'ENOPE'" in bad.stderr


def test_prepare_error_leaves_normal(public_dir: Path, transport_name: str) -> None:
    with ServerProc(str(public_dir / "d"), transport_name, "--inject", "prepare:error=EIO:when=1") as srv:
        srv.start()
        with LiveUpdateDevice(srv.device) as d:
            fd = os.memfd_create("t")
            os.write(fd, b"x" * 100)
            d.preserve(fd, 5)
            with pytest.raises(OSError) as ei:
                d.prepare()
            assert ei.value.errno == errno.EIO
            assert d.state == State.NORMAL and d.fd_state(5) == State.NORMAL
            with pytest.raises(OSError) as ei:  # KHO was not finalized: CANCEL has nothing to abort
                d.cancel()
            assert ei.value.errno == errno.ENOENT
            d.prepare()  # when=1: only the first
            assert d.state == State.PREPARED and d.fd_state(5) == State.PREPARED
            d.cancel()
            os.close(fd)


def test_kexec_error_back_to_normal(shared_emulator: ServerProc) -> None:
    dev = shared_emulator.device
    cli("inject", "kexec:error=EBUSY", "--device", dev, check=True)
    with LiveUpdateDevice(dev) as d:
        fd = os.memfd_create("t")
        os.write(fd, b"x" * 100)
        d.preserve(fd, 9)
        d.prepare()
        r = cli("kexec", "--device", dev)
        assert r.returncode != 0 and "Device or resource busy" in r.stderr, r.stdout + r.stderr
        assert d.state == State.NORMAL and d.fd_state(9) == State.NORMAL  # handle not revoked: no kexec happened
        st = json.loads(cli("status", "--json", "--device", dev, check=True).stdout)
        assert st["state"] == "normal" and st["kho_finalized"] is False
        os.close(fd)


@pytest.mark.vm
def test_delay_does_not_hold_up_other_calls(shared_emulator: ServerProc) -> None:
    """Exclusive open: the concurrent call comes from another thread on the same open file."""
    dev = shared_emulator.device
    rules = ["GET_FD_STATE:delay=300ms", "SET_FD_EVENT:error=EAGAIN:delay=200ms"]
    assert control.request(dev, "inject", rules=rules)["ok"]  # no CLI start: `cusedev inject` is tested above
    with LiveUpdateDevice(dev) as d:
        fd = os.memfd_create("t")
        os.write(fd, b"x" * 100)
        d.preserve(fd, 3)
        results: dict[str, object] = {}

        def slow() -> None:
            t = time.monotonic()
            results["state"] = d.fd_state(3)
            results["slow"] = time.monotonic() - t

        def slow_err() -> None:
            t = time.monotonic()
            try:
                d.set_fd_event(3, U.LIVEUPDATE_PREPARE)
            except OSError as e:
                results["errno"] = e.errno
            results["slow_err"] = time.monotonic() - t

        threads = [threading.Thread(target=slow), threading.Thread(target=slow_err)]
        for th in threads:
            th.start()
        time.sleep(0.05)
        t = time.monotonic()
        assert d.state == State.NORMAL
        fast = time.monotonic() - t
        for th in threads:
            th.join(10)
        assert fast < 0.15, fast
        assert results["state"] == State.NORMAL and results["slow"] >= 0.29  # type: ignore[operator]
        assert results["errno"] == errno.EAGAIN and results["slow_err"] >= 0.19  # type: ignore[operator]
        assert d.fd_state(3) == State.NORMAL  # the injected SET_FD_EVENT had no effect
        os.close(fd)


def test_bad_rule_stops_serve(public_dir: Path, transport_name: str) -> None:
    srv = ServerProc(str(public_dir / "d"), transport_name, "--inject", "NOPE:error=EIO")
    with srv:
        srv.start(expect_ready=False)
        assert srv.wait() == 1
        assert "--inject: unknown command 'NOPE'" in srv.stderr()


def test_python_api_and_parsing() -> None:
    dev = Device()
    assert dev.interceptor is None
    dev.injector.add("prepare:error=ENOMEM")
    assert dev.interceptor is None  # only core fault points: the ioctl path stays bare
    with pytest.raises(OSError) as ei:
        dev.core.event(U.LIVEUPDATE_PREPARE)
    assert ei.value.errno == errno.ENOMEM and dev.core.state == State.NORMAL
    dev.injector.add("all:error=EIO:when=3+2")
    assert dev.interceptor is not None
    dev.injector.clear()
    assert dev.interceptor is None
    dev.core.event(U.LIVEUPDATE_PREPARE)
    r = parse_rule("0xba03:error=5:delay=1.5s")
    assert (r.cmd, r.error, r.delay) == (U.LIVEUPDATE_IOCTL_GET_STATE, errno.EIO, 1.5)
    assert [n for n in range(1, 10) if parse_rule("all:error=EIO:when=3+2").fires(n)] == [3, 5, 7, 9]
    assert [n for n in range(1, 5) if parse_rule("all:error=EIO").fires(n)] == [1, 2, 3, 4]
    for bad in ("", "GET_STATE", "GET_STATE:error=EIO:when=0", "kexec:delay=1s", "x:error=EIO", "all:foo=1"):
        with pytest.raises(RuleError):
            parse_rule(bad)
