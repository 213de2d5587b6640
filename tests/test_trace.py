"""Traces through real syscalls: record a session of every ioctl (malformed ones too), show it, replay it.

Every emulator is a `cusedev serve` subprocess on the transport under test, or a Server in this
process.  The VM phase records and replays the every-ioctl session (on CUSE the tracer sees the
caller's memory through retry rounds) and checks the flush that answers queued requests (a CUSE
retry round is another queued request); showing, editing and the CLI's trace commands do not
depend on the transport and run on the host only.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from _server import REPO, ServerProc, force_cleanup
from clients import PyClient

from cusedev import uapi as U

GS = U.LIVEUPDATE_IOCTL_GET_STATE
ENV = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def cli(*args: str, check: bool = False, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([sys.executable, "-m", "cusedev.cli", *args], capture_output=True, text=True, env=ENV,
                       cwd=str(REPO), timeout=timeout)
    if check:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


def enc(name: str, **kw: int) -> bytes:
    c = U.codec(f"struct liveupdate_ioctl_{name}")
    kw.setdefault("size", c.size)
    return c.encode(**kw)


MALFORMED = [
    (U.IO(0xBA, 7), "heap", struct.pack("=II", 8, 0), errno.EINVAL),
    (U.IO(0xBA, 0xFF), "null", b"", errno.EINVAL),
    (GS, "null", b"", errno.EFAULT),
    (GS, "unmapped", b"", errno.EFAULT),
    (U.LIVEUPDATE_IOCTL_FD_PRESERVE, "null", b"", errno.EFAULT),
    (U.IO(0x42, 3), "heap", struct.pack("=II", 8, 0), errno.ENOTTY),
    (U.IOWR(0xBA, 4, 8), "heap", struct.pack("=II", 8, 0), errno.ENOTTY),
    (GS, "heap", struct.pack("=II", 7, 0), errno.EINVAL),
    (U.LIVEUPDATE_IOCTL_GET_FD_STATE, "heap", struct.pack("=IIII", 12, 0, 0, 0), errno.EINVAL),
    (GS, "heap", struct.pack("=III", 12, 0, 1), errno.E2BIG),
    (GS, "pageend", struct.pack("=IIIIII", 24, 0, 0, 0, 0, 0x100), errno.E2BIG),
    (GS, "pageend", struct.pack("=IIII", 4096, 0, 0, 0), errno.EFAULT),
    (GS, "pageend", struct.pack("=I", 8), errno.EFAULT),
    (GS, "pageend", struct.pack("=II", 0xFFFFFFFF, 0), errno.EFAULT),
    (GS, "readonly", struct.pack("=II", 8, 0), errno.EFAULT),
    (U.LIVEUPDATE_IOCTL_SET_EVENT, "heap", struct.pack("=II", 8, 7), errno.EINVAL),
    (GS, "heap", struct.pack("=IIII", 16, 0x55, 0, 0), 0),
]


def session(device: str, tmpdir: Path) -> None:
    """Every ioctl, successful and failing, plus open/EBUSY/read/write, as one client."""
    c = PyClient()
    try:
        c.open(device)
        with pytest.raises(OSError) as ei:
            PyClient().open(device)
        assert ei.value.errno == errno.EBUSY
        for cmd, where, data, want in MALFORMED:
            assert c.ioctl(cmd, data, where)[1] == want, (hex(cmd), where, data)
        mem, empty = c.memfd(5000), c.memfd(0)
        null = c.openfile("/dev/null", "w")
        opath = c.openfile("/", "path")
        P, UNP = U.LIVEUPDATE_IOCTL_FD_PRESERVE, U.LIVEUPDATE_IOCTL_FD_UNPRESERVE
        assert c.ioctl(P, enc("fd_preserve", fd=mem, token=1))[1] == 0
        assert c.ioctl(P, enc("fd_preserve", fd=mem, token=2))[1] == 0
        assert c.ioctl(P, enc("fd_preserve", fd=mem, token=1))[1] == errno.EEXIST
        assert c.ioctl(P, enc("fd_preserve", fd=null, token=3))[1] == errno.ENOENT
        assert c.ioctl(P, enc("fd_preserve", fd=opath, token=3))[1] == errno.EBADF
        assert c.ioctl(P, enc("fd_preserve", fd=999, token=3))[1] == errno.EBADF
        assert c.ioctl(P, enc("fd_preserve", fd=empty, token=4))[1] == 0
        SFE, GFS, SE = U.LIVEUPDATE_IOCTL_SET_FD_EVENT, U.LIVEUPDATE_IOCTL_GET_FD_STATE, U.LIVEUPDATE_IOCTL_SET_EVENT
        assert c.ioctl(SFE, enc("set_fd_event", token=2, event=U.LIVEUPDATE_PREPARE))[1] == 0
        assert c.ioctl(GFS, enc("get_fd_state", token=2))[1] == 0
        assert c.ioctl(GFS, enc("get_fd_state", token=2, incoming=1))[1] == errno.ENOENT
        assert c.ioctl(SFE, enc("set_fd_event", token=2, event=U.LIVEUPDATE_FREEZE))[1] == 0
        assert c.ioctl(SFE, enc("set_fd_event", token=2, event=U.LIVEUPDATE_CANCEL))[1] == 0
        assert c.ioctl(SFE, enc("set_fd_event", token=2, event=U.LIVEUPDATE_FINISH))[1] == errno.EBUSY
        assert c.ioctl(SE, enc("set_event", event=U.LIVEUPDATE_PREPARE))[1] == errno.EINVAL  # empty memfd
        assert c.ioctl(UNP, enc("fd_unpreserve", token=4))[1] == 0
        assert c.ioctl(UNP, enc("fd_unpreserve", token=4))[1] == errno.ENOENT
        assert c.ioctl(SE, enc("set_event", event=U.LIVEUPDATE_CANCEL))[1] == errno.ENOENT
        assert c.ioctl(SE, enc("set_event", event=U.LIVEUPDATE_PREPARE))[1] == 0
        assert c.ioctl(P, enc("fd_preserve", fd=mem, token=5))[1] == errno.EBUSY
        assert c.ioctl(U.LIVEUPDATE_IOCTL_FD_RESTORE, enc("fd_restore", token=1))[1] == errno.EBUSY
        assert c.ioctl(GS, enc("get_state"))[1] == 0
        assert c.ioctl(SE, enc("set_event", event=U.LIVEUPDATE_CANCEL))[1] == 0
        assert c.read() == (-1, errno.EINVAL)
        assert c.write() == (-1, errno.EINVAL)
    finally:
        c.quit()


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def wait_for(pred, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.fixture
def recorded(public_dir: Path, tmp_path: Path, transport_name: str) -> Path:
    """The trace of ``session`` on a fresh emulator (served with --trace, stopped cleanly)."""
    trace = tmp_path / "session.jsonl"
    with ServerProc(str(public_dir / "rec"), transport_name, "--trace", str(trace)) as srv:
        srv.start()
        session(srv.device, tmp_path)
        wait_for(lambda: any(r["type"] == "release" for r in records(trace)))
    return trace


@pytest.mark.vm
def test_record_and_replay_every_ioctl(recorded: Path, public_dir: Path, transport_name: str) -> None:
    assert stat.S_IMODE(recorded.stat().st_mode) == 0o600
    recs = records(recorded)
    head = recs[0]
    assert head["type"] == "header" and head["format"] == 1 and head["abi"] == "v3"
    assert head["endian"] == sys.byteorder and head["arch"] and head["emulator"].startswith("cusedev ")
    ioctls = [r for r in recs if r["type"] == "ioctl"]
    assert {r["name"] for r in ioctls} >= set(U.IOCTL_NAMES.values()) | {"unknown"}
    assert len(ioctls) == len(MALFORMED) + 22
    seqs = [r["seq"] for r in recs[1:]]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    pres = next(r for r in ioctls if r["name"].endswith("FD_PRESERVE") and r["errno"] == 0)
    assert pres["file"]["kind"] == "shmem" and pres["file"]["size"] == 5000 and len(pres["file"]["sha256"]) == 64
    assert pres["pid"] == os.getpid() and pres["comm"] and pres["in"]["token"] == 1
    prep = next(r for r in ioctls if r["name"] == "LIVEUPDATE_IOCTL_SET_EVENT"
                and r["in"]["event"] == "LIVEUPDATE_PREPARE" and r["errno"] == 0)
    assert (prep["state_before"], prep["state_after"]) == ("normal", "prepared")
    gs = next(r for r in ioctls if r["name"].endswith("GET_STATE") and r["errno"] == 0)
    assert gs["out"]["state"].startswith("LIVEUPDATE_STATE_") and gs["out_hex"] and gs["dur_us"] >= 0
    null = next(r for r in ioctls if r["arg"] == 0 and r["name"].endswith("GET_STATE"))
    assert (null["ret"], null["errno"], null["err"]) == (-1, errno.EFAULT, "EFAULT")
    assert {r["type"] for r in recs} >= {"open", "release", "read", "write", "state"}
    assert any(r["type"] == "open" and r["errno"] == errno.EBUSY for r in recs)

    with ServerProc(str(public_dir / "fresh"), transport_name) as srv:
        srv.start()
        r = cli("trace", "replay", str(recorded), "--device", srv.device)
        assert r.returncode == 0, r.stdout + r.stderr
        assert " 0 divergences" in r.stdout
        assert "DIVERGED" not in r.stdout


def test_edited_trace_diverges(recorded: Path, public_dir: Path, transport_name: str, tmp_path: Path) -> None:
    recs = records(recorded)
    # claim the emptied-memfd PREPARE succeeded, and that a GET_STATE saw another state
    bad = next(r for r in recs if r["type"] == "ioctl" and r["name"] == "LIVEUPDATE_IOCTL_SET_EVENT"
               and r["in"]["event"] == "LIVEUPDATE_PREPARE")
    bad["errno"], bad["ret"] = 0, 0
    gs = next(r for r in recs if r["type"] == "ioctl" and r["name"].endswith("GET_STATE") and r["errno"] == 0)
    gs["out_hex"] = gs["out_hex"][:8] + struct.pack("=I", U.LIVEUPDATE_STATE_FROZEN).hex() + gs["out_hex"][16:]
    edited = tmp_path / "edited.jsonl"
    edited.write_text("".join(json.dumps(r) + "\n" for r in recs))
    with ServerProc(str(public_dir / "fresh"), transport_name) as srv:
        srv.start()
        r = cli("trace", "replay", "-q", str(edited), "--device", srv.device)
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"record {bad['seq']}: ioctl LIVEUPDATE_IOCTL_SET_EVENT: DIVERGED: errno: recorded 0, got EINVAL" \
        in r.stdout
    assert re.search(rf"record {gs['seq']}: .*DIVERGED: output state", r.stdout), r.stdout
    assert "2 divergences" in r.stdout


def test_show(recorded: Path) -> None:
    out = cli("trace", "show", str(recorded), check=True).stdout
    assert "\033[" not in out  # not a terminal: no colours
    lines = out.splitlines()
    stamp = r"\d\d:\d\d:\d\d\.\d{6}"
    who = rf"\[pid {os.getpid()} [^\]]+\]"
    assert any(re.fullmatch(rf"{stamp} {who} ioctl\(LIVEUPDATE_IOCTL_SET_EVENT, \{{size=8, "
                            rf"event=LIVEUPDATE_PREPARE\}}\) = 0 <normal → prepared> \d+us", ln) for ln in lines), out
    assert any(re.fullmatch(rf"{stamp} {who} ioctl\(LIVEUPDATE_IOCTL_SET_EVENT, \{{size=8, event=7\}}\) "
                            r"= -1 EINVAL \(Invalid argument\) <normal> \d+us", ln) for ln in lines), out
    assert any(re.search(r"ioctl\(LIVEUPDATE_IOCTL_GET_STATE, NULL\) = -1 EFAULT \(Bad address\)", ln)
               for ln in lines)
    assert any(re.search(r"ioctl\(0xba07, 0x[0-9a-f]+\) = -1 EINVAL", ln) for ln in lines)
    assert any(re.search(r"ioctl\(LIVEUPDATE_IOCTL_GET_STATE, \{size=8\} => \{state=LIVEUPDATE_STATE_PREPARED\}\) "
                         r"= 0 <prepared>", ln) for ln in lines), out
    assert any(re.search(r"open\(O_RDWR.*\) = -1 EBUSY \(Device or resource busy\)", ln) for ln in lines)
    assert any("--- state normal → prepared ---" in ln for ln in lines)
    only = cli("trace", "show", "--cmd", "SET_EVENT", str(recorded), check=True).stdout.splitlines()
    assert only and all("ioctl(LIVEUPDATE_IOCTL_SET_EVENT," in ln for ln in only)
    assert cli("trace", "show", "--pid", "1", str(recorded), check=True).stdout == ""
    js = cli("trace", "show", "--json", "--cmd", "LIVEUPDATE_IOCTL_FD_PRESERVE", "--pid", str(os.getpid()),
             str(recorded), check=True).stdout.splitlines()
    recs = [json.loads(ln) for ln in js]
    assert recs[0]["type"] == "header" and len(recs) > 5
    assert all(r["name"] == "LIVEUPDATE_IOCTL_FD_PRESERVE" for r in recs[1:])


def test_trace_start_stop_at_runtime(shared_emulator: ServerProc, tmp_path: Path) -> None:
    trace = tmp_path / "rt.jsonl"
    old = os.umask(0)
    try:
        cli("trace", "start", str(trace), "--device", shared_emulator.device, check=True)
    finally:
        os.umask(old)
    assert stat.S_IMODE(trace.stat().st_mode) == 0o600
    c = PyClient()
    c.open(shared_emulator.device)
    assert c.ioctl(GS, enc("get_state"))[1] == 0
    cli("trace", "stop", "--device", shared_emulator.device, check=True)
    assert c.ioctl(U.LIVEUPDATE_IOCTL_SET_EVENT, enc("set_event", event=9))[1] == errno.EINVAL
    c.quit()
    kinds = [(r["type"], r.get("name")) for r in records(trace)]
    assert kinds == [("header", None), ("open", None), ("ioctl", "LIVEUPDATE_IOCTL_GET_STATE")]


def kexec_session(device: str) -> None:
    c = PyClient()
    c.open(device)
    fd = c.memfd(12345)
    assert c.ioctl(U.LIVEUPDATE_IOCTL_FD_PRESERVE, enc("fd_preserve", fd=fd, token=42))[1] == 0
    assert c.ioctl(U.LIVEUPDATE_IOCTL_SET_EVENT, enc("set_event", event=U.LIVEUPDATE_PREPARE))[1] == 0
    cli("kexec", "--device", device, check=True)
    c.quit()
    c = PyClient()
    c.open(device)
    assert c.ioctl(GS, enc("get_state"))[1] == 0
    assert c.ioctl(U.LIVEUPDATE_IOCTL_GET_FD_STATE, enc("get_fd_state", token=42, incoming=1))[1] == 0
    assert c.ioctl(U.LIVEUPDATE_IOCTL_SET_FD_EVENT, enc("set_fd_event", token=42, event=U.LIVEUPDATE_FINISH))[1] == 0
    assert c.ioctl(U.LIVEUPDATE_IOCTL_SET_EVENT, enc("set_event", event=U.LIVEUPDATE_FINISH))[1] == 0
    c.quit()


def test_replay_across_kexec(public_dir: Path, tmp_path: Path, transport_name: str) -> None:
    trace = tmp_path / "kexec.jsonl"
    with ServerProc(str(public_dir / "rec"), transport_name, "--trace", str(trace)) as srv:
        srv.start()
        kexec_session(srv.device)
        wait_for(lambda: sum(r["type"] == "release" for r in records(trace)) == 2)
    kx = [r for r in records(trace) if r["type"] == "kexec"]
    assert len(kx) == 1 and kx[0]["live"] and kx[0]["state_after"] == "updated"
    assert "--- kexec: live update, update_count=1 ---" in cli("trace", "show", str(trace), check=True).stdout
    # one go: the kexec goes through the emulator's control socket
    with ServerProc(str(public_dir / "one"), transport_name) as srv:
        srv.start()
        r = cli("trace", "replay", str(trace), "--device", srv.device)
        assert r.returncode == 0 and " 0 divergences" in r.stdout, r.stdout + r.stderr
    # two stages, as against a kernel: stop at the kexec holding the device, reboot, replay the rest
    with ServerProc(str(public_dir / "two"), transport_name) as srv:
        srv.start()
        p = subprocess.Popen([sys.executable, "-m", "cusedev.cli", "trace", "replay", "--stop-at-kexec", str(trace),
                              "--device", srv.device], stdout=subprocess.PIPE, text=True, env=ENV, cwd=str(REPO))
        try:
            assert p.stdout is not None
            out = ""
            while "reached the kexec" not in out:
                line = p.stdout.readline()
                assert line, out
                out += line
            cli("kexec", "--device", srv.device, check=True)
            out += p.stdout.read()
            assert p.wait(30) == 0, out
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        assert " 0 divergences" in out and "LIVEUPDATE_IOCTL_SET_FD_EVENT" not in out
        r = cli("trace", "replay", "--after-kexec", str(trace), "--device", srv.device)
        assert r.returncode == 0 and " 0 divergences" in r.stdout, r.stdout + r.stderr
        assert "LIVEUPDATE_IOCTL_FD_PRESERVE" not in r.stdout


def traced_in_process(dev: Any, path: str, out: Path, transport_name: str, client: Callable[[], None]) -> None:
    """Serve ``dev`` in this process (the Python API), tracing to ``out``, while ``client`` runs in a thread."""
    import asyncio

    from cusedev.control.server import Server
    from cusedev.tracing import record as T

    async def main() -> None:
        T.start(dev, str(out))
        try:
            async with Server(path, transport_name, handler=dev, sysfs=None):
                await asyncio.to_thread(client)
        finally:
            T.stop(dev)

    try:
        asyncio.run(main())
    finally:
        force_cleanup(path)


@pytest.mark.vm
def test_flush_answers_queued_requests_before_writing(public_dir: Path, transport_name: str, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A flush that took a while (an FD_PRESERVE record describes the file) answers the requests
    queued meanwhile before it writes (``LiveUpdateDevice.pump``), and the trace keeps event
    order.  Forced for every flush here; at the first one a second client thread's GET_STATE is
    queued, and must be answered while the flushed records are not yet in the file."""
    import fcntl
    import select
    import threading

    from cusedev.device.openfiles import EmulatedDevice as LiveUpdateDevice
    from cusedev.tracing import record as T

    monkeypatch.setattr(T, "PUMP_AFTER_NS", -1)
    path, out = str(public_dir / "pump"), tmp_path / "pump.jsonl"
    dev = LiveUpdateDevice()
    real_pump = dev.pump
    got: dict = {}
    done = threading.Event()

    def get_state(fd: int) -> None:
        buf = bytearray(enc("get_state"))
        got["tid"] = threading.get_native_id()
        got["ret"] = fcntl.ioctl(fd, GS, buf)

    def pump() -> None:
        if "fd" not in got or "first" in got:
            return real_pump()
        last = records(out)[-1].get("seq", 0)  # the records being flushed are numbered, not yet written
        unwritten = last < dev.tracer.seq
        t = threading.Thread(target=get_state, args=(got["fd"],))
        t.start()
        fds = [serve.__self__.fd for serve in dev.pumps]  # type: ignore[attr-defined]
        deadline = time.monotonic() + 30
        while t.is_alive() and time.monotonic() < deadline:  # CUSE: a retry round is another request
            select.select(fds, [], [], 0.1)
            real_pump()
            t.join(0.001)
        got["first"] = (not t.is_alive(), unwritten, records(out)[-1].get("seq", 0) == last)
        done.set()

    dev.pump = pump  # type: ignore[method-assign]

    def client() -> None:
        fd = got["fd"] = os.open(path, os.O_RDWR)
        try:
            mfd = os.memfd_create("pump")
            os.pwrite(mfd, b"x" * 8192, 0)
            p = bytearray(enc("fd_preserve", fd=mfd, token=7))
            assert fcntl.ioctl(fd, U.LIVEUPDATE_IOCTL_FD_PRESERVE, p) == 0
            os.close(mfd)
            assert done.wait(60)  # the flush after the open or the preserve pumped
        finally:
            os.close(fd)

    traced_in_process(dev, path, out, transport_name, client)
    assert got["first"] == (True, True, True) and got["ret"] == 0
    recs = records(out)
    assert [r["seq"] for r in recs[1:]] == list(range(1, len(recs)))
    kinds = [(r["type"], r.get("name")) for r in recs[1:]]
    gs = next(i for i, r in enumerate(recs[1:]) if r.get("tid") == got["tid"])
    assert kinds[gs] == ("ioctl", "LIVEUPDATE_IOCTL_GET_STATE") and recs[1 + gs]["ret"] == 0
    assert kinds[0] == ("open", None) and gs > 0
    assert sorted(kinds) == sorted([("open", None), ("ioctl", "LIVEUPDATE_IOCTL_GET_STATE"),
                                    ("ioctl", "LIVEUPDATE_IOCTL_FD_PRESERVE"), ("release", None)])
    pres = next(r for r in recs if r.get("name") == "LIVEUPDATE_IOCTL_FD_PRESERVE")
    assert pres["file"]["kind"] == "shmem" and pres["file"]["size"] == 8192


def test_replay_restores_under_cusedev_run(public_dir: Path, tmp_path: Path, transport_name: str) -> None:
    """A VMM's cycle recorded and replayed under `cusedev run` (FD_RESTORE installs fds only there):
    restored contents are checked, for a file whose contents are in the trace and for one over
    CONTENT_LIMIT (digest only, replayed with a stand-in of the same size)."""
    prog = str(REPO / "tests/progs/luo_script.py")
    trace = tmp_path / "vmm.jsonl"

    def run(device: str, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "cusedev.cli", "run", "--device", device, "--", *argv],
                              capture_output=True, text=True, env=ENV, cwd=str(REPO), timeout=300)

    with ServerProc(str(public_dir / "rec"), transport_name, "--trace", str(trace)) as srv:
        srv.start()
        stage1 = [["open", srv.device], ["memfd", 1, 12345, 1, 0], ["memfd", 2, 300_000, 2, 0], ["prepare"],
                  ["reboot", "kexec"]]
        p = run(srv.device, sys.executable, prog, json.dumps(stage1))
        assert "live update" in p.stderr, p.stdout + p.stderr
        stage2 = [["open", srv.device], ["restore", 1], ["restore", 2], ["finish"]]
        p = run(srv.device, sys.executable, prog, json.dumps(stage2))
        out = [json.loads(line) for line in p.stdout.splitlines()]
        assert p.returncode == 0 and [o.get("size") for o in out[1:3]] == [12345, 300_000], p.stdout + p.stderr
        wait_for(lambda: sum(r["type"] == "release" for r in records(trace)) == 2)
    files = [r["file"] for r in records(trace) if r.get("name") == "LIVEUPDATE_IOCTL_FD_PRESERVE"]
    assert ["data" in f for f in files] == [True, False] and all("sha256" in f for f in files)
    with ServerProc(str(public_dir / "rep"), transport_name) as srv:
        srv.start()
        # two stages, as a VMM's two instances: a live update ends the processes of `cusedev run`
        replay = [sys.executable, "-m", "cusedev.cli", "trace", "replay", str(trace), "--device", srv.device]
        p1 = subprocess.Popen([sys.executable, "-m", "cusedev.cli", "run", "--device", srv.device, "--", *replay,
                               "--stop-at-kexec"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=ENV, cwd=str(REPO))
        try:
            assert p1.stdout is not None
            out = ""
            while "reached the kexec" not in out:
                line = p1.stdout.readline()
                assert line, out + (p1.stderr.read() if p1.stderr else "")
                out += line
            cli("kexec", "--device", srv.device, check=True)
            p1.wait(60)
        finally:
            if p1.poll() is None:
                p1.kill()
                p1.wait()
        assert "diverge" not in out, out
        r = run(srv.device, *replay, "--after-kexec")
        assert r.returncode == 0 and " 0 divergences" in r.stdout, r.stdout + r.stderr
        assert r.stdout.count("LIVEUPDATE_IOCTL_FD_RESTORE") == 2, r.stdout


@pytest.mark.parametrize("fails", [False, True], ids=["digest", "digest-fails"])
def test_big_file_digest_off_the_loop(public_dir: Path, transport_name: str, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch, fails: bool) -> None:
    """A preserved file over CONTENT_LIMIT is hashed in the digest thread: the device keeps
    answering meanwhile, and its record keeps its place, the records behind it waiting with it.
    The digest is held here until the client has been answered again; if it fails, the record
    says so and the trace goes on."""
    import fcntl
    import hashlib
    import threading

    from cusedev.device.openfiles import EmulatedDevice as LiveUpdateDevice
    from cusedev.tracing import record as T

    release = threading.Event()
    real = T.file_json

    def held_file_json(file, st=None):  # type: ignore[no-untyped-def]
        if threading.current_thread().name.startswith("cusedev-trace-digest"):
            assert release.wait(60)
            if fails:
                os.close(file[0])
                raise RuntimeError("digest")
        return real(file, st)

    monkeypatch.setattr(T, "file_json", held_file_json)
    path, out = str(public_dir / "digest"), tmp_path / "digest.jsonl"
    dev = LiveUpdateDevice()
    contents = bytes((i * 7 + 3) & 0xFF for i in range(256)) * 4096  # 1 MiB
    got: dict = {}

    def client() -> None:
        fd = os.open(path, os.O_RDWR)
        try:
            mfd = os.memfd_create("big")
            os.write(mfd, contents)
            p = bytearray(enc("fd_preserve", fd=mfd, token=9))
            assert fcntl.ioctl(fd, U.LIVEUPDATE_IOCTL_FD_PRESERVE, p) == 0
            os.close(mfd)
            buf = bytearray(enc("get_state"))
            assert fcntl.ioctl(fd, GS, buf) == 0  # answered while the digest is held
            got["held"] = [r.get("name", r["type"]) for r in records(out)]  # ("open": maybe not yet)
            release.set()
            wait_for(lambda: any(r.get("name") == "LIVEUPDATE_IOCTL_GET_STATE" for r in records(out)))
        finally:
            release.set()
            os.close(fd)

    traced_in_process(dev, path, out, transport_name, client)
    assert got["held"] in (["header"], ["header", "open"])
    recs = records(out)
    assert [r["seq"] for r in recs[1:]] == list(range(1, len(recs)))
    assert [r.get("name", r["type"]) for r in recs[1:]] == [
        "open", "LIVEUPDATE_IOCTL_FD_PRESERVE", "LIVEUPDATE_IOCTL_GET_STATE", "release"]
    f = recs[2]["file"]
    if fails:
        assert f == {"kind": "error", "error": "RuntimeError('digest')"}
        return
    assert f["kind"] == "shmem" and f["size"] == len(contents) and "data" not in f
    assert f["sha256"] == hashlib.sha256(contents).hexdigest()


def test_traced_preserve_of_the_node_itself_after_a_read_does_not_hang() -> None:
    """FD_PRESERVE of the emulator's own node after a read() on it: the tracer describes the file
    handed in, and a stat of a FUSE file whose attributes a read() invalidated is a GETATTR that only
    the emulator's loop answers — it must not be asked from the loop (it hung the emulator)."""
    from cusedev.testing.emulator import Emulator

    client = (
        "import errno, os, sys\n"
        "from cusedev.client import LiveUpdateDevice\n"
        "dev = LiveUpdateDevice(sys.argv[1])\n"
        "try:\n    os.read(dev.fd, 8)\nexcept OSError as e:\n    print('read', errno.errorcode[e.errno])\n"
        "try:\n    dev.preserve(dev.fd, 7)\nexcept OSError as e:\n    print('preserve', errno.errorcode[e.errno])\n"
        "print('state', dev.state.name)\n"
    )
    transport = os.environ.get("CUSEDEV_TEST_TRANSPORT", "auto") or "auto"
    with Emulator(None, transport, trace=True, sysfs=None) as e:
        r = subprocess.run([sys.executable, "-c", client, e.path], capture_output=True, text=True,
                           env=ENV, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        assert r.stdout.split("\n")[:3] == ["read EINVAL", "preserve ENOENT", "state NORMAL"], r.stdout
        rec = [x for x in e.trace_records() if x.get("name") == "LIVEUPDATE_IOCTL_FD_PRESERVE"]
        assert rec and rec[-1]["errno"] == errno.ENOENT and rec[-1]["file"]["kind"] == "other", rec
