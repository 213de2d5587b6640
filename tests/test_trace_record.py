"""`cusedev trace record -- CMD`: the ptrace recorder (issue 16, item 1).

The headline: one client run recorded both ways at once — by the emulator's
own tracer (`serve --trace`) and from outside by `trace record` — gives two
traces that `trace diff` finds equal.  The client forks, execs, uses threads,
dups and kills a child, so the recorder follows a process tree.  The rest is
the recorder as a Unix tool: CMD's output and exit status untouched, exit 127
for a missing CMD, an unwritable trace refused before CMD starts, Ctrl-C.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from _server import ServerProc

from cusedev.tracing.record import read_records

CLI = [sys.executable, "-m", "cusedev"]

#: a session-ABI client run under `cusedev run`: valid and failing calls, a forked child, an exec'ed
#: program using an inherited session fd, a thread, a dup, a child killed with SIGKILL
CLIENT = r'''
import os, signal, sys, threading, time
from cusedev.profiles.session.client import SessionDevice, call
from cusedev.profiles.session import uapi
path = sys.argv[1]
dev = SessionDevice(path)
s = dev.create_session("alpha")
m = os.memfd_create("x"); os.write(m, b"hello")
s.preserve(m, 7)
assert s.name == "alpha"
try: os.open(f"/proc/self/fd/{s.fd}", os.O_RDWR)     # a session fd has no open: ENXIO
except OSError as e: assert e.errno == 6, e
else: raise AssertionError("a session fd re-opened through /proc")
for bad in ("alpha", ""):
    try: dev.create_session(bad)
    except OSError: pass
try: call(dev.fd, uapi.CREATE_SESSION.cmd, None)          # NULL: EFAULT
except OSError: pass
try: call(s.fd, uapi.CREATE_SESSION.cmd, bytearray(72))   # a device command on a session fd: EINVAL
except OSError: pass
d = os.dup(s.fd)
t = threading.Thread(target=lambda: call(d, uapi.GET_NAME.cmd, bytearray(uapi.GET_NAME.struct.pack(72, 0, b""))))
t.start(); t.join()
pid = os.fork()
if pid == 0:
    try: s.preserve(m, 8)   # the same memfd again: EBUSY on 7.2
    except OSError: pass
    os._exit(0)
os.waitpid(pid, 0)
keep = os.dup(s.fd); os.set_inheritable(keep, True)
code = ("import sys; from cusedev.profiles.session.client import LuoSession; "
        "print('child', LuoSession(int(sys.argv[1])).name)")
pid = os.fork()
if pid == 0:
    os.execv(sys.executable, [sys.executable, "-c", code, str(keep)])
os.waitpid(pid, 0)
victim = os.fork()
if victim == 0:
    time.sleep(30); os._exit(0)
os.kill(victim, signal.SIGKILL); os.waitpid(victim, 0)
s2 = dev.create_session("beta")
k = s2.fd; s2.close()
m2 = os.memfd_create("y"); assert m2 == k     # the number that was a session is a memfd now
s.preserve(m2, 9)
n = dev.fd; dev.close()
x = os.dup(s.fd); assert x == n               # the device's number is now a session's
call(x, uapi.GET_NAME.cmd, bytearray(uapi.GET_NAME.struct.pack(72, 0, b"")))
os.close(x); s.close(); os.close(d); os.close(keep)
print("client done")
'''


def _record(out: Path, *cmd: str, device: str | None = None, timeout: float = 120,
            **kw: Any) -> subprocess.CompletedProcess[str]:
    dev = ["--device", device] if device else []
    return subprocess.run([*CLI, "trace", "record", "-o", str(out), *dev, "--", *cmd], capture_output=True,
                          text=True, timeout=timeout, **kw)


@pytest.mark.parametrize("kcmp", ["kcmp", "no-kcmp"])
@pytest.mark.parametrize("emulator", [("--abi", "7.2", "--trace", "{dir}/own.jsonl", "--no-sysfs")], indirect=True)
def test_the_same_run_recorded_both_ways_is_equal(emulator: ServerProc, tmp_path: Path, kcmp: str) -> None:
    """``no-kcmp``: as on a kernel without kcmp(2) (the test VM's), session files are told by a probe."""
    client = tmp_path / "client.py"
    client.write_text(CLIENT)
    rec = tmp_path / "rec.jsonl"
    env = {**os.environ, "CUSEDEV_RECORD_NO_KCMP": "1" if kcmp == "no-kcmp" else "0"}
    p = _record(rec, *CLI, "run", "--device", emulator.device, "--", sys.executable, str(client), emulator.device,
                device=emulator.device, env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "client done" in p.stdout and "child alpha" in p.stdout  # CMD's output passes through untouched
    own = Path(emulator.device).parent / "own.jsonl"
    time.sleep(0.5)  # the emulator writes a record right after its reply: let the last one land
    d = subprocess.run([*CLI, "trace", "diff", str(own), str(rec)], capture_output=True, text=True, timeout=60)
    assert d.returncode == 0, d.stdout + d.stderr
    assert "equal" in d.stdout

    recs = list(read_records(str(rec)))
    head = recs[0]
    assert head["type"] == "header" and head["abi"] == "7.2" and head["device_kind"] == "emulator"
    ioctls = [r for r in recs if r["type"] == "ioctl"]
    assert len(ioctls) >= 10
    first = ioctls[0]
    assert first["name"] == "LIVEUPDATE_IOCTL_CREATE_SESSION" and first["on"] == "device"
    assert first["ret_fd"]["kind"] == "session" and first["ret_fd"]["name"] == "alpha"
    pres = ioctls[1]
    assert pres["on"] == "session" and pres["session"] == "alpha"
    assert pres["file"]["kind"] == "shmem" and pres["file"]["size"] == 5
    reopen = [r for r in recs if r["type"] == "open" and r.get("errno")]
    assert [(r["on"], r.get("session"), r["err"]) for r in reopen] == [("session", "alpha", "ENXIO")], reopen
    pids = {r["pid"] for r in ioctls}
    assert len(pids) >= 3, "the forked and the exec'ed children's calls are recorded"
    assert any(r["name"] == "LIVEUPDATE_SESSION_GET_NAME" and r["tid"] != r["pid"] for r in ioctls), "thread"
    assert any(r.get("errno") == 14 for r in ioctls) and any(r.get("err") == "EBUSY" for r in ioctls)
    # fd numbers reused (close, then a new file under the same number) are named by what they are now
    reused = [r for r in ioctls if r["name"] == "LIVEUPDATE_SESSION_PRESERVE_FD" and r["in"].get("token") == 9]
    assert reused and reused[0]["file"]["kind"] == "shmem", reused
    last = ioctls[-1]
    assert last["name"] == "LIVEUPDATE_SESSION_GET_NAME" and last["on"] == "session" and last["errno"] == 0, last

    show = subprocess.run([*CLI, "trace", "show", str(rec)], capture_output=True, text=True, timeout=60)
    assert show.returncode == 0, show.stderr
    assert "ioctl(LIVEUPDATE_SESSION_PRESERVE_FD, {size=16, fd=" in show.stdout
    assert "= -1 EEXIST (File exists)" in show.stdout


def test_a_divergence_between_two_recordings_is_found(tmp_path: Path) -> None:
    """`trace diff` on a recording and a copy with one errno changed: exit 1, the record named."""
    rec = tmp_path / "rec.jsonl"
    p = _record(rec, "true")
    assert p.returncode == 0, p.stderr
    recs = list(read_records(str(rec)))
    assert [r["type"] for r in recs] == ["header"]  # no LUO call: an empty trace
    recs.append({"type": "ioctl", "seq": 1, "pid": 1, "tid": 1, "comm": "x", "cmd": 0xBA00, "on": "device",
                 "ret": 0, "errno": 0})
    a = tmp_path / "a.jsonl"
    a.write_text("".join(json.dumps(r) + "\n" for r in recs))
    recs[-1]["errno"] = 16
    b = tmp_path / "b.jsonl"
    b.write_text("".join(json.dumps(r) + "\n" for r in recs))
    d = subprocess.run([*CLI, "trace", "diff", str(a), str(b)], capture_output=True, text=True, timeout=60)
    assert d.returncode == 1 and "A#1 B#1: differ in errno (0 vs EBUSY)" in d.stdout


def test_cmd_output_and_exit_status_pass_through(tmp_path: Path) -> None:
    p = _record(tmp_path / "t.jsonl", "sh", "-c", "echo out; echo err >&2; exit 3")
    assert (p.returncode, p.stdout, p.stderr) == (3, "out\n", "err\n")
    p = _record(tmp_path / "t.jsonl", "sh", "-c", "kill -9 $$")
    assert p.returncode == 128 + signal.SIGKILL
    assert os.stat(tmp_path / "t.jsonl").st_mode & 0o777 == 0o600


def test_missing_cmd_exits_127(tmp_path: Path) -> None:
    for cmd in ("/nonexistent/prog", "no-such-command-cusedev"):
        out = tmp_path / "t.jsonl"
        p = _record(out, cmd)
        assert p.returncode == 127, p.stderr
        assert cmd in p.stderr and "Traceback" not in p.stderr
        assert not out.exists()


def test_unwritable_trace_file_is_refused_before_cmd_starts(tmp_path: Path) -> None:
    marker = tmp_path / "started"
    p = _record(tmp_path / "no" / "such" / "dir.jsonl", "sh", "-c", f"touch {marker}")
    assert p.returncode == 1
    assert "cannot write the trace" in p.stderr and "Traceback" not in p.stderr
    assert not marker.exists()


def _tracer_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("TracerPid:"))


def _child_pid(parent: int) -> int:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            kids = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
        except OSError:
            kids = []
        if kids:
            return int(kids[0])
        time.sleep(0.05)
    raise AssertionError("CMD did not start")


def test_ctrl_c_reaches_cmd_as_usual(tmp_path: Path) -> None:
    """Ctrl-C signals the whole foreground group: CMD dies of SIGINT as it would untraced, the recorder ends."""
    rec = subprocess.Popen([*CLI, "trace", "record", "-o", str(tmp_path / "t.jsonl"), "--", "sleep", "60"],
                           start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        cmd = _child_pid(rec.pid)
        deadline = time.monotonic() + 30
        while _tracer_of(cmd) != rec.pid and time.monotonic() < deadline:
            time.sleep(0.05)
        os.killpg(rec.pid, signal.SIGINT)
        assert rec.wait(timeout=30) == 128 + signal.SIGINT
    finally:
        if rec.poll() is None:
            os.killpg(rec.pid, signal.SIGKILL)
            rec.wait()


def test_ctrl_c_while_cmd_starts_is_delivered_as_later(tmp_path: Path) -> None:
    """Ctrl-C the moment CMD is forked (before the seize, before the recorder's handlers): CMD still dies
    of SIGINT and the recorder says so, never a KeyboardInterrupt that ends it with 0 and CMD untraced."""
    for i in range(8):
        rec = subprocess.Popen([*CLI, "trace", "record", "-o", str(tmp_path / f"t{i}.jsonl"), "--", "sleep", "60"],
                               start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
        cmd = 0
        try:
            deadline = time.monotonic() + 30
            while not cmd and time.monotonic() < deadline:
                try:
                    kids = Path(f"/proc/{rec.pid}/task/{rec.pid}/children").read_text().split()
                except OSError:
                    kids = []
                cmd = int(kids[0]) if kids else 0
            assert cmd, "CMD did not start"
            os.killpg(rec.pid, signal.SIGINT)
            assert rec.wait(timeout=30) == 128 + signal.SIGINT, rec.stderr.read() if rec.stderr else ""
            from _hostile import alive

            deadline = time.monotonic() + 10
            while alive(cmd) and time.monotonic() < deadline:
                time.sleep(0.01)
            assert not alive(cmd), "CMD survived the Ctrl-C"
        finally:
            if rec.poll() is None:
                os.killpg(rec.pid, signal.SIGKILL)
                rec.wait()
            if cmd:
                try:
                    os.kill(cmd, signal.SIGKILL)
                except ProcessLookupError:
                    pass


def test_cmd_starts_with_the_signals_it_would_untraced(tmp_path: Path) -> None:
    """No signal blocked, none ignored that Python ignores (SIGPIPE, SIGXFSZ), though the recorder blocks
    and ignores some of them itself."""
    p = subprocess.run([*CLI, "trace", "record", "-o", str(tmp_path / "t.jsonl"), "--", "cat", "/proc/self/status"],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert p.returncode == 0, p.stderr
    fields = dict(line.split(":\t", 1) for line in p.stdout.splitlines() if ":\t" in line)
    assert fields["SigBlk"].strip() == "0" * 16 and fields["SigIgn"].strip() == "0" * 16, fields


def test_sigint_to_the_recorder_alone_detaches(tmp_path: Path) -> None:
    """The recorder interrupted on its own lets CMD go on, untraced."""
    rec = subprocess.Popen([*CLI, "trace", "record", "-o", str(tmp_path / "t.jsonl"), "--", "sleep", "60"],
                           start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    cmd = 0
    try:
        cmd = _child_pid(rec.pid)
        deadline = time.monotonic() + 30
        while _tracer_of(cmd) != rec.pid and time.monotonic() < deadline:
            time.sleep(0.05)
        rec.send_signal(signal.SIGINT)
        rec.wait(timeout=30)
        assert _tracer_of(cmd) == 0
        with open(f"/proc/{cmd}/stat") as f:
            assert f.read().rsplit(")", 1)[1].split()[0] in ("S", "R"), "CMD keeps running"
    finally:
        if cmd:
            try:
                os.kill(cmd, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if rec.poll() is None:
            os.killpg(rec.pid, signal.SIGKILL)
        rec.wait()


V3_CLIENT = r'''
import os, sys
from cusedev.client import LiveUpdateDevice
d = LiveUpdateDevice(sys.argv[1])
m = os.memfd_create("x"); os.write(m, b"hello")
d.preserve(m, 5)
try: d.preserve(m, 5)
except OSError: pass
d.prepare(); d.state; d.cancel()
d.unpreserve(5)
d.close()
'''


@pytest.mark.parametrize("emulator", [("--trace", "{dir}/own.jsonl", "--no-sysfs")], indirect=True)
def test_v3_recording_diffs_equal_and_replays(emulator: ServerProc, tmp_path: Path, transport_name: str) -> None:
    """Any profile: a v3 client recorded from outside equals the emulator's own trace, and replays."""
    client = tmp_path / "v3.py"
    client.write_text(V3_CLIENT)
    rec = tmp_path / "rec.jsonl"
    p = _record(rec, sys.executable, str(client), emulator.device, device=emulator.device)
    assert p.returncode == 0, p.stdout + p.stderr
    time.sleep(0.5)
    own = Path(emulator.device).parent / "own.jsonl"
    d = subprocess.run([*CLI, "trace", "diff", str(own), str(rec)], capture_output=True, text=True, timeout=60)
    assert d.returncode == 0 and "7 calls compared" in d.stdout, d.stdout + d.stderr
    recs = list(read_records(str(rec)))
    assert recs[0]["abi"] == "v3"  # asked from the emulator's control socket
    assert any(r.get("in", {}).get("event") == "LIVEUPDATE_PREPARE" for r in recs), "enums named as the emulator does"
    other = tmp_path / "other"
    other.mkdir()
    with ServerProc(str(other / "liveupdate"), transport_name, "--no-sysfs") as srv:
        srv.start()
        r = subprocess.run([*CLI, "trace", "replay", str(rec), "--device", srv.device], capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "0 divergences" in r.stdout


#: the same memfd handed in under two numbers (EBUSY the second time, by inode), and an O_PATH fd of the device
SAME_FILE_CLIENT = r'''
import os, sys
from cusedev.profiles.session.client import SessionDevice
dev = SessionDevice(sys.argv[1])
a, b = dev.create_session("a"), dev.create_session("b")
m = os.memfd_create("x"); os.write(m, b"data")
a.preserve(m, 1)
m2 = os.dup(m)
try: b.preserve(m2, 2)
except OSError as e: assert e.errno == 16, e
p = os.open(sys.argv[1], os.O_PATH)
try: b.preserve(p, 3)
except OSError as e: assert e.errno == 9, e
print("client done")
'''


@pytest.mark.parametrize("emulator", [("--abi", "7.2", "--no-sysfs")], indirect=True)
def test_handed_in_files_carry_dev_ino_and_o_path(emulator: ServerProc, tmp_path: Path, transport_name: str,
                                                   public_dir: Path) -> None:
    """A file handed to PRESERVE_FD is recorded with its dev and ino, an O_PATH fd as ``opath`` (not as the
    file it names): the replay then stands in one file for one file, whatever its numbers were."""
    client = tmp_path / "client.py"
    client.write_text(SAME_FILE_CLIENT)
    rec = tmp_path / "rec.jsonl"
    p = _record(rec, *CLI, "run", "--device", emulator.device, "--", sys.executable, str(client), emulator.device,
                device=emulator.device)
    assert p.returncode == 0 and "client done" in p.stdout, p.stdout + p.stderr
    files = [(r["file"], r.get("err")) for r in read_records(str(rec)) if r.get("type") == "ioctl" and "file" in r]
    assert [(f["kind"], err) for f, err in files] == [("shmem", None), ("shmem", "EBUSY"), ("opath", "EBADF")]
    (first, _), (again, _), (opath, _) = files
    assert (first["dev"], first["ino"]) == (again["dev"], again["ino"])  # one file under two numbers
    node = os.stat(emulator.device)
    assert (opath["dev"], opath["ino"]) == (node.st_dev, node.st_ino)
    with ServerProc(str(public_dir / "replay"), transport_name, "--abi", "7.2", "--no-sysfs") as srv:
        srv.start()
        r = subprocess.run([*CLI, "run", "--device", srv.device, "--", *CLI, "trace", "replay", str(rec),
                            "--device", srv.device, "-q"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip().endswith(": 0 divergences"), r.stdout + r.stderr
