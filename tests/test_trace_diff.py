"""`cusedev trace diff A B`: call-by-call comparison of two traces (issue 16, item 2).

Traces are written here as the two recorders write them (the emulator's own
tracer and `trace record`'s ptrace records), so each rule is checked on its
own: what is compared, what is ignored, the documented deviations, the
report (strace view, record numbers of both sides) and the exit status.  The
real recorders are compared end to end in test_trace_record.py.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cusedev.tracing import diff

CREATE, PRESERVE, GET_NAME = 0xBA00, 0xBA40, 0xBA43
NAME_HEX = b"alpha".ljust(64, b"\0").hex()


def _own_trace() -> list[dict[str, Any]]:
    """An emulator's own trace (serve --trace, profile 7.2): its own open of its node is the session file."""
    return [
        {"type": "header", "format": 1, "abi": "7.2", "arch": "x86_64", "endian": sys.byteorder,
         "emulator": "cusedev 0.1.0", "emulator_pid": 100, "state": "sessions:0+0"},
        {"type": "open", "seq": 1, "time": 1.0, "pid": 200, "tid": 200, "comm": "vmm", "flags": 0o100002, "fh": 1,
         "ret": 0, "errno": 0},
        {"type": "open", "seq": 2, "time": 1.1, "pid": 100, "tid": 101, "comm": "cusedev", "flags": 0o100002,
         "fh": 2, "ret": 0, "errno": 0},
        {"type": "ioctl", "seq": 3, "time": 1.2, "pid": 200, "tid": 200, "comm": "vmm", "fh": 1, "cmd": CREATE,
         "name": "LIVEUPDATE_IOCTL_CREATE_SESSION", "arg": 0x7000, "size": 72,
         "in_hex": "48000000ffffffff" + NAME_HEX, "in": {"size": 72, "name": "alpha"},
         "out_hex": "4800000004000000" + NAME_HEX, "out": {"fd": 4}, "ret": 0, "errno": 0,
         "state_before": "sessions:0+0", "state_after": "sessions:1+0", "dur_us": 10.0},
        {"type": "ioctl", "seq": 4, "time": 1.3, "pid": 200, "tid": 200, "comm": "vmm", "fh": 2, "cmd": PRESERVE,
         "name": "LIVEUPDATE_SESSION_PRESERVE_FD", "arg": 0x7100, "size": 16,
         "in_hex": "10000000050000000700000000000000", "in": {"size": 16, "fd": 5, "token": 7}, "ret": 0,
         "errno": 0, "state_before": "sessions:1+0", "state_after": "sessions:1+0", "dur_us": 5.0,
         "file": {"kind": "shmem", "ino": 11, "dev": 1, "size": 5, "sha256": "ab", "data": "aGVsbG8="}},
        {"type": "ioctl", "seq": 5, "time": 1.4, "pid": 200, "tid": 200, "comm": "vmm", "fh": 1, "cmd": CREATE,
         "name": "LIVEUPDATE_IOCTL_CREATE_SESSION", "arg": 0x7000, "size": 72,
         "in_hex": "48000000ffffffff" + NAME_HEX, "in": {"size": 72, "name": "alpha"}, "ret": -1, "errno": 17,
         "err": "EEXIST", "state_before": "sessions:1+0", "state_after": "sessions:1+0", "dur_us": 3.0},
        {"type": "release", "seq": 6, "time": 1.5, "fh": 2},
    ]


def _ptrace_trace() -> list[dict[str, Any]]:
    """The same run as `trace record` writes it: other pids, times, addresses, fd numbers, no model state."""
    return [
        {"type": "header", "format": 1, "abi": "7.2", "arch": "x86_64", "endian": sys.byteorder,
         "recorder": "cusedev 0.1.0 ptrace", "device": "/dev/liveupdate", "device_kind": "kernel"},
        {"type": "open", "seq": 1, "time": 9.0, "pid": 900, "tid": 900, "comm": "vmm", "flags": 0o2000002,
         "on": "device", "fh": 1, "ret": 0, "errno": 0},
        {"type": "ioctl", "seq": 2, "time": 9.1, "pid": 900, "tid": 900, "comm": "vmm", "fh": 1, "fd": 3,
         "on": "device", "cmd": CREATE, "name": "LIVEUPDATE_IOCTL_CREATE_SESSION", "arg": 0x5000, "size": 72,
         "in_hex": "48000000ffffffff" + NAME_HEX, "in": {"size": 72, "name": "alpha"},
         "out_hex": "4800000009000000" + NAME_HEX, "out": {"fd": 9}, "ret_fd": {"kind": "session", "name": "alpha"},
         "ret": 0, "errno": 0},
        {"type": "ioctl", "seq": 3, "time": 9.2, "pid": 900, "tid": 901, "comm": "vmm", "fh": 2, "fd": 9,
         "on": "session", "session": "alpha", "cmd": PRESERVE, "name": "LIVEUPDATE_SESSION_PRESERVE_FD",
         "arg": 0x5100, "size": 16, "in_hex": "100000000a0000000700000000000000",
         "in": {"size": 16, "fd": 10, "token": 7}, "ret": 0, "errno": 0,
         "file": {"kind": "shmem", "size": 5, "sha256": "ab"}},
        {"type": "ioctl", "seq": 4, "time": 9.3, "pid": 900, "tid": 900, "comm": "vmm", "fh": 1, "fd": 3,
         "on": "device", "cmd": CREATE, "name": "LIVEUPDATE_IOCTL_CREATE_SESSION", "arg": 0x5000, "size": 72,
         "in_hex": "48000000ffffffff" + NAME_HEX, "in": {"size": 72, "name": "alpha"}, "ret": -1, "errno": 17,
         "err": "EEXIST"},
        {"type": "ioctl", "seq": 5, "time": 9.4, "pid": 900, "tid": 900, "comm": "vmm", "fd": 11, "cmd": 0x5451,
         "name": "unknown", "arg": 0, "ret": 0, "errno": 0, "on": "device", "vfs": True},
    ]


def _write(path: Path, records: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cusedev", "trace", "diff", *args], capture_output=True,
                          text=True, timeout=60)


def test_the_same_run_from_both_recorders_is_equal(tmp_path: Path) -> None:
    """pids, times, addresses, fd numbers, inode numbers, states, the emulator's own open and release, and a
    FIOCLEX the VFS answered (only the ptrace side can see it) are all ignored."""
    a = _write(tmp_path / "own.jsonl", _own_trace())
    b = _write(tmp_path / "ptrace.jsonl", _ptrace_trace())
    p = _cli(a, b)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "4 calls compared" in p.stdout and "equal" in p.stdout
    assert "1 answered by the VFS left out" in p.stdout


@pytest.mark.parametrize(("field", "value", "what"), [
    ("errno", 22, "errno (EEXIST vs EINVAL)"),
    ("cmd", 0xBA01, "cmd"),
    ("in_hex", "48000000ffffffff" + b"beta".ljust(64, b"\0").hex(), "in_hex"),
    ("on", "session", "on (device vs session)"),
])
def test_a_divergence_is_reported_with_both_record_numbers(tmp_path: Path, field: str, value: Any,
                                                           what: str) -> None:
    b_records = _ptrace_trace()
    b_records[4][field] = value
    a = _write(tmp_path / "own.jsonl", _own_trace())
    b = _write(tmp_path / "ptrace.jsonl", b_records)
    p = _cli(a, b)
    assert p.returncode == 1, p.stdout
    head = p.stdout.splitlines()[0]
    assert head.startswith("A#5 B#4: differ in ") and what in head, p.stdout
    # the strace view of both records follows
    assert "  A " in p.stdout and "ioctl(LIVEUPDATE_IOCTL_CREATE_SESSION, {size=72, name=alpha})" in p.stdout
    assert "1 divergences" in p.stdout


def test_write_back_and_described_files_are_compared(tmp_path: Path) -> None:
    b_records = _ptrace_trace()
    b_records[2]["out_hex"] = "4800000009000000" + b"alphX".ljust(64, b"\0").hex()
    b_records[3]["file"] = {"kind": "other", "mode": "crw-rw-rw-"}
    res = diff.compare(diff.load(_write(tmp_path / "a", _own_trace())), diff.load(_write(tmp_path / "b", b_records)))
    assert [f for _x, _y, f in res.divergences] == [["out_hex"], ["file"]]


def test_fd_numbers_in_structs_are_masked_but_not_the_rest_of_the_struct(tmp_path: Path) -> None:
    b_records = _ptrace_trace()
    b_records[3]["in_hex"] = "10000000" + "0a000000" + "0800000000000000"  # another token
    res = diff.compare(diff.load(_write(tmp_path / "a", _own_trace())), diff.load(_write(tmp_path / "b", b_records)))
    assert [f for _x, _y, f in res.divergences] == [["in_hex"]]


def test_a_missing_call_is_only_in_one_side(tmp_path: Path) -> None:
    a = _write(tmp_path / "own.jsonl", _own_trace())
    b = _write(tmp_path / "ptrace.jsonl", _ptrace_trace()[:4])
    p = _cli(a, b)
    assert p.returncode == 1
    assert "A#5 B#-: only in A" in p.stdout


def test_documented_deviation_is_counted_not_failed(tmp_path: Path) -> None:
    """An emulator outside `cusedev run` answers CREATE_SESSION with EOPNOTSUPP where the kernel gives an fd."""
    a_records = _own_trace()
    a_records[3].update(ret=-1, errno=95, err="EOPNOTSUPP")
    del a_records[3]["out_hex"], a_records[3]["out"]
    b = _ptrace_trace()
    del b[3]  # the PRESERVE on the session fd the emulator never made
    del a_records[4]
    p = _cli(_write(tmp_path / "a", a_records), _write(tmp_path / "b", b))
    assert p.returncode == 0, p.stdout
    assert "documented deviations: 1 fd-install-needs-run" in p.stdout
    # a /proc re-open of a session fd is ENXIO on both sides now (its own node): no longer a deviation
    assert {d.name for d in diff.DEVIATIONS} == {"fd-install-needs-run"}


def test_identical_traces_and_limits(tmp_path: Path) -> None:
    a = _write(tmp_path / "a", _own_trace())
    many = copy.deepcopy(_own_trace())
    for r in many:
        if r.get("type") == "ioctl":
            r["errno"] = 1
    b = _write(tmp_path / "b", many)
    assert _cli(a, a).returncode == 0
    p = _cli(a, b, "--max", "1")
    assert p.returncode == 1 and "... and 2 more" in p.stdout


def test_not_a_trace_is_an_error_not_a_difference(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.write_text("hello\n")
    p = _cli(str(bad), str(bad))
    assert p.returncode == 2 and "not a cusedev trace" in p.stderr
    p = _cli(str(tmp_path / "missing"), str(bad))
    assert p.returncode == 2 and "No such file" in p.stderr
