"""`cusedev trace replay` of session-ABI traces (issue 16): what `trace record` saw replays on an emulator.

A client (the differential fuzzer's seeded sequences: session fds, passed
memfds, malformed structs, forks, closes) is recorded from outside with
`trace record` (ptrace) against a 7.2 emulator, then replayed, under
`cusedev run`, into a fresh 7.2 emulator (no divergence) and into a 6.19 one,
which has no GET_NAME: the replay diverges there and names it.  Everything
goes through real open()/ioctl() on the FUSE file (CUSE in the VM).
"""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from _server import ServerProc

from cusedev.tracing.record import read_records

CLI = [sys.executable, "-m", "cusedev"]
SEEDS, CALLS = "1-12", 40


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory, transport_name: str) -> Path:
    """The sequences recorded against a 7.2 emulator."""
    d = tmp_path_factory.mktemp("replay", numbered=True)
    d.chmod(0o755)
    out = d / "client.jsonl"
    with ServerProc(str(d / "rec-dev"), transport_name, "--abi", "7.2", "--no-sysfs") as srv:
        srv.start()
        dev = srv.device
        p = subprocess.run(
            [*CLI, "trace", "record", "-o", str(out), "--device", dev, "--abi", "7.2", "--",
             *CLI, "run", "--device", dev, "--",
             sys.executable, "-m", "cusedev.testing.differential", "exec", "--device", dev, "--seeds", SEEDS,
             "--calls", str(CALLS)],
            capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stdout + p.stderr
    return out


def _replay(path: Path, abi: str, where: Path, transport: str, *, run: bool = True) -> subprocess.CompletedProcess[str]:
    with ServerProc(str(where / f"replay-{abi}"), transport, "--abi", abi, "--no-sysfs") as srv:
        srv.start()
        pre = [*CLI, "run", "--device", srv.device, "--"] if run else []
        return subprocess.run([*pre, *CLI, "trace", "replay", str(path), "--device", srv.device, "-q"],
                              capture_output=True, text=True, timeout=300)


def test_a_recorded_session_client_replays_without_divergence(recorded: Path, transport_name: str) -> None:
    recs = list(read_records(str(recorded)))
    calls = [r for r in recs if r.get("type") == "ioctl"]
    # the trace holds what makes session replay hard: session fds, returned fds, passed memfds, failures
    assert any(r.get("on") == "session" for r in calls)
    assert any(r.get("ret_fd") for r in calls)
    assert any(r.get("file", {}).get("kind") == "shmem" and r.get("errno") == 0 for r in calls)
    assert {"EINVAL", "EFAULT", "EBUSY"} <= {r.get("err") for r in recs}

    p = _replay(recorded, "7.2", recorded.parent, transport_name)
    assert p.returncode == 0, p.stdout + p.stderr
    last = p.stdout.strip().splitlines()[-1]
    assert last == f"replayed {len(recs) - 1} records (0 injected faults skipped): 0 divergences", p.stdout


def test_a_profile_without_get_name_diverges_and_says_where(recorded: Path, transport_name: str) -> None:
    """6.19 has no GET_NAME: a recorded 7.2 GET_NAME that succeeded is EINVAL there (6.19 differs in
    other rules too, e.g. an empty name: those diverge as well)."""
    p = _replay(recorded, "6.19", recorded.parent, transport_name)
    assert p.returncode == 1, p.stdout + p.stderr
    diverged = [ln for ln in p.stdout.splitlines() if "DIVERGED" in ln]
    assert any("LIVEUPDATE_SESSION_GET_NAME" in ln and "recorded 0, got EINVAL" in ln for ln in diverged), p.stdout
    first = next(r for r in read_records(str(recorded))
                 if r.get("name") == "LIVEUPDATE_SESSION_GET_NAME" and r.get("errno") == 0)
    assert any(ln.startswith(f"record {first['seq']}: ioctl LIVEUPDATE_SESSION_GET_NAME on session ")
               for ln in diverged), (first["seq"], diverged)
    assert p.stdout.strip().splitlines()[-1].endswith(f"{len(diverged)} divergences")


def test_a_changed_answer_is_found(recorded: Path, transport_name: str, tmp_path: Path) -> None:
    recs = list(read_records(str(recorded)))
    victim = next(r for r in recs if r.get("type") == "ioctl" and r.get("errno") == 22 and r.get("on") == "session"
                  and r.get("name") != "unknown")
    victim["errno"] = 9
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in recs))
    bad.chmod(0o644)
    p = _replay(bad, "7.2", recorded.parent, transport_name)
    assert p.returncode == 1
    assert f"record {victim['seq']}: ioctl {victim['name']} on session" in p.stdout
    assert "errno: recorded EBADF, got EINVAL" in p.stdout
    assert p.stdout.strip().endswith(": 1 divergence"), p.stdout


def test_returned_fds_need_cusedev_run(recorded: Path, transport_name: str) -> None:
    p = _replay(recorded, "7.2", recorded.parent, transport_name, run=False)
    assert p.returncode == 1
    assert "LIVEUPDATE_IOCTL_CREATE_SESSION on device: DIVERGED: errno: recorded 0, got EOPNOTSUPP" in p.stdout
    assert "cusedev run -- cusedev trace replay" in p.stdout


CLIENT = r"""
import ctypes, os, sys
from cusedev.profiles.session.client import SessionDevice
d = SessionDevice(sys.argv[2])
if sys.argv[1] == "1":
    s = d.create_session("vm0")
    m = os.memfd_create("ram")
    os.write(m, b"guest ram " * 50)
    s.preserve(m, 7)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall(169, 0xFEE1DEAD, 672274793, 0x45584543, None)  # reboot(LINUX_REBOOT_CMD_KEXEC)
else:
    s = d.retrieve_session("vm0")
    fd = s.retrieve(7)
    assert os.pread(fd, 10, 0) == b"guest ram ", "retrieved contents"
    s.finish()
"""


def test_a_trace_across_a_kexec_replays_in_two_stages(public_dir: Path, transport_name: str, tmp_path: Path) -> None:
    """Stage 1 (create, preserve, reboot) and stage 2 (retrieve, finish) recorded as two runs, as a VMM's two
    instances are, joined into one trace; replayed up to the kexec, the emulator kexec'd, then the rest."""
    recs: list[dict] = []
    with ServerProc(str(public_dir / "rec"), transport_name, "--abi", "7.2", "--no-sysfs") as srv:
        srv.start()
        for stage in ("1", "2"):
            out = tmp_path / f"stage{stage}.jsonl"
            p = subprocess.run([*CLI, "trace", "record", "-o", str(out), "--device", srv.device, "--abi", "7.2", "--",
                                *CLI, "run", "--device", srv.device, "--", sys.executable, "-c", CLIENT, stage,
                                srv.device], capture_output=True, text=True, timeout=120)
            assert p.returncode == 0, p.stdout + p.stderr
            part = list(read_records(str(out)))
            if recs:  # the second run numbers its records and files from 1 again
                part = part[1:]
                for r in part:
                    r["seq"] += len(recs)
                    if "fh" in r:
                        r["fh"] += 1000
                    if (r.get("ret_fd") or {}).get("fh") is not None:
                        r["ret_fd"]["fh"] += 1000
            recs += part
    assert [r.get("name", r["type"]) for r in recs if r["type"] in ("ioctl", "kexec")] == [
        "LIVEUPDATE_IOCTL_CREATE_SESSION", "LIVEUPDATE_SESSION_PRESERVE_FD", "kexec",
        "LIVEUPDATE_IOCTL_RETRIEVE_SESSION", "LIVEUPDATE_SESSION_RETRIEVE_FD", "LIVEUPDATE_SESSION_FINISH"]
    trace = tmp_path / "both.jsonl"
    trace.write_text("".join(json.dumps(r) + "\n" for r in recs))
    trace.chmod(0o644)
    changed = tmp_path / "changed.jsonl"  # what was preserved differs from what comes back
    for r in recs:
        if r.get("name") == "LIVEUPDATE_SESSION_PRESERVE_FD":
            r["file"]["data"] = base64.b64encode(b"other ram " * 50).decode()
            r["file"]["sha256"] = hashlib.sha256(b"other ram " * 50).hexdigest()
    changed.write_text("".join(json.dumps(r) + "\n" for r in recs))
    changed.chmod(0o644)

    with ServerProc(str(public_dir / "rep"), transport_name, "--abi", "7.2", "--no-sysfs") as srv:
        srv.start()
        first, second = _two_stages(srv.device, trace)
        assert "replayed 3 records (0 injected faults skipped): 0 divergences" in first, first
        assert second.returncode == 0, second.stdout + second.stderr
        assert second.stdout.endswith("replayed 4 records (0 injected faults skipped): 0 divergences\n"), second.stdout
        assert "LIVEUPDATE_SESSION_RETRIEVE_FD on session 'vm0': ok" in second.stdout
        # stage 2 of a trace saying the preserved file held other bytes: the retrieved contents are compared
        first, second = _two_stages(srv.device, trace, changed)
        assert second.returncode == 1, second.stdout + second.stderr
        assert "RETRIEVE_FD on session 'vm0': DIVERGED: retrieved contents" in second.stdout, second.stdout


def _two_stages(device: str, trace: Path, rest: Path | None = None) -> tuple[str, subprocess.CompletedProcess[str]]:
    """Replay up to the kexec (under `cusedev run`, which the kexec ends), kexec, replay the rest (of ``rest``)."""
    run = [*CLI, "run", "--device", device, "--", *CLI, "trace", "replay", "--device", device]
    p1 = subprocess.Popen([*run, str(trace), "--stop-at-kexec"], stdout=subprocess.PIPE, text=True)
    try:
        assert p1.stdout is not None
        out = ""
        while "reached the kexec" not in out:
            line = p1.stdout.readline()
            assert line, out
            out += line
        subprocess.run([*CLI, "kexec", "--device", device], check=True, capture_output=True, timeout=60)
        p1.wait(60)
    finally:
        if p1.poll() is None:
            p1.kill()
            p1.wait()
    return out, subprocess.run([*run, str(rest or trace), "--after-kexec"], capture_output=True, text=True, timeout=120)


REOPEN = r"""
import os, sys
from cusedev.profiles.session.client import SessionDevice
dev = SessionDevice(sys.argv[1])
s = dev.create_session("reopened")
for fd in (s.fd, dev.fd):    # a session fd: ENXIO (its own node); the device: EBUSY (exclusive)
    try: os.close(os.open(f"/proc/self/fd/{fd}", os.O_RDWR))
    except OSError as e: print(e.errno)
"""


@pytest.mark.parametrize("how", ["record", "serve-trace"])
def test_a_session_fd_reopened_through_proc_replays_as_enxio(public_dir: Path, transport_name: str, tmp_path: Path,
                                                              how: str) -> None:
    """Recorded from outside (``on: session``) or by the emulator itself (no node: ENXIO tells), the re-open
    replays as a re-open of the replay's own session fd, ENXIO again."""
    tmp_path.chmod(0o755)
    out, client = tmp_path / "reopen.jsonl", tmp_path / "client.py"
    client.write_text(REOPEN)
    own = ("--trace", str(out)) if how == "serve-trace" else ()
    with ServerProc(str(tmp_path / "rec-dev"), transport_name, "--abi", "7.2", "--no-sysfs", *own) as srv:
        srv.start()
        dev = srv.device
        rec = [*CLI, "trace", "record", "-o", str(out), "--device", dev, "--abi", "7.2", "--"] if not own else []
        p = subprocess.run([*rec, *CLI, "run", "--device", dev, "--", sys.executable, str(client), dev],
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0 and p.stdout.split() == ["6", "16"], p.stdout + p.stderr
        if own:
            subprocess.run([*CLI, "status", "--device", dev], capture_output=True, timeout=60)  # records land
    opens = [r for r in read_records(str(out)) if r.get("type") == "open" and r.get("errno")]
    assert [r.get("err") for r in opens] == ["ENXIO", "EBUSY"], opens
    p = _replay(out, "7.2", tmp_path, transport_name)
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.strip().splitlines()[-1].endswith(": 0 divergences"), p.stdout
