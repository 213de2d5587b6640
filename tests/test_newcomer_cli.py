"""The ``cusedev`` command as a good Unix tool (issue 13, items 3 and 4), through the real CLI.

Pipes closed early, exit codes, usage of the right subcommand, messages that name the real
problem, and nothing left under /run/cusedev by an emulator that is not running.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from _server import ServerProc

from cusedev.client import LiveUpdateDevice

REPO = Path(__file__).resolve().parent.parent
RUN_DIR = Path("/run/cusedev")


def cli(*args: str, stdout: int | None = subprocess.PIPE, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cusedev.cli", *args], stdout=stdout, stderr=subprocess.PIPE,
                          text=True, timeout=timeout, cwd=str(REPO))


def cli_into_closed_pipe(*args: str) -> subprocess.CompletedProcess[str]:
    """Run with stdout a pipe whose reader is gone (as `| head -1` after its line, or `| true`)."""
    r, w = os.pipe()
    os.close(r)
    try:
        return cli(*args, stdout=w)
    finally:
        os.close(w)


def _our_entries(device: str) -> list[str]:
    from cusedev.control.paths import escape

    name = escape(os.path.abspath(device))
    return sorted(p.name for p in RUN_DIR.iterdir() if p.name.startswith(name)) if RUN_DIR.exists() else []


@pytest.fixture
def device(tmp_path: Path) -> str:
    return str(tmp_path / "liveupdate")


def _trace(path: Path, records: int, fmt: int = 1) -> None:
    head = {"type": "header", "format": fmt, "abi": "v3", "arch": "x86_64", "endian": sys.byteorder,
            "emulator": "cusedev 0.1.0", "time": 1.0, "mono_ns": 1, "emulator_pid": 1, "state": "normal"}
    rec = {"type": "ioctl", "seq": 0, "time": 2.0, "mono_ns": 2, "pid": 7, "tid": 7, "comm": "t", "fh": 1,
           "cmd": 0xBA03, "name": "LIVEUPDATE_IOCTL_GET_STATE", "arg": 4096, "size": 8, "in": {"size": 8},
           "out": {"state": "LIVEUPDATE_STATE_NORMAL"}, "ret": 0, "errno": 0, "state_before": "normal",
           "state_after": "normal", "dur_us": 3.0}
    with path.open("w") as f:
        f.write(json.dumps(head) + "\n")
        for i in range(records):
            f.write(json.dumps({**rec, "seq": i + 1}) + "\n")


def test_trace_show_into_a_closed_pipe_is_quiet(tmp_path: Path) -> None:
    big = tmp_path / "big.jsonl"
    _trace(big, 20000)
    p = cli_into_closed_pipe("trace", "show", str(big))
    assert p.stderr == "" and p.returncode == 128 + signal.SIGPIPE, p.stderr
    p = cli("trace", "show", str(big))
    assert p.returncode == 0 and len(p.stdout.splitlines()) == 20000


def test_status_into_a_closed_pipe_is_quiet(device: str, transport_name: str) -> None:
    with ServerProc(device, transport_name) as srv:
        srv.start()
        for args in (("status",), ("status", "--json")):
            p = cli_into_closed_pipe(*args, "--device", device)
            assert p.stderr == "" and p.returncode == 128 + signal.SIGPIPE, p.stderr
        assert srv.stop() == 0


@pytest.mark.parametrize("content, says", [
    ("root:x:0:0:root:/root:/bin/bash\n", "not a cusedev trace"),
    ('{"type":"ioctl","seq":1}\n', "not a cusedev trace"),
    (None, "trace format 99"),
])
def test_trace_show_refuses_what_is_not_a_trace(tmp_path: Path, content: str | None, says: str) -> None:
    path = tmp_path / "t.jsonl"
    if content is None:
        _trace(path, 3, fmt=99)
    else:
        path.write_text(content)
    p = cli("trace", "show", str(path))
    assert p.returncode == 1 and says in p.stderr and p.stdout == "", p.stderr
    assert len(p.stderr.splitlines()) == 1


def test_trace_show_of_a_missing_file_names_it(tmp_path: Path) -> None:
    p = cli("trace", "show", str(tmp_path / "nope.jsonl"))
    assert p.returncode == 1 and "nope.jsonl: No such file or directory" in p.stderr


def test_verbose_where_the_synopsis_shows_it(device: str) -> None:
    for args in (("serve", "-v", "--help"), ("status", "-v", "--help"), ("trace", "show", "-v", "--help")):
        p = cli(*args)
        assert p.returncode == 0 and "-v, --verbose" in p.stdout, (args, p.stderr)


@pytest.mark.parametrize("args, usage", [
    (("status", "--bogus"), "usage: cusedev status"),
    (("serve", "--nope"), "usage: cusedev serve"),
    (("trace", "show", "x", "--nope"), "usage: cusedev trace show"),
    (("kexec", "extra"), "usage: cusedev kexec"),
])
def test_a_wrong_flag_prints_that_subcommands_usage(args: tuple[str, ...], usage: str) -> None:
    p = cli(*args)
    assert p.returncode == 2 and p.stderr.startswith(usage), p.stderr


def test_run_of_a_missing_or_non_executable_command(device: str, tmp_path: Path) -> None:
    p = cli("run", "--device", device, "--", "/nonexistent")
    assert p.returncode == 127 and p.stderr == "cusedev run: /nonexistent: No such file or directory\n"
    p = cli("run", "--device", device, "--", "no-such-command-anywhere")
    assert p.returncode == 127 and p.stderr == "cusedev run: no-such-command-anywhere: command not found\n"
    script = tmp_path / "script"
    script.write_text("#!/bin/sh\n")
    p = cli("run", "--device", device, "--", str(script))
    assert p.returncode == 126 and p.stderr == f"cusedev run: {script}: Permission denied\n"


def test_killed_emulator_is_stale_and_leaves_nothing_after_restart(device: str, transport_name: str) -> None:
    p = cli("status", "--device", device)
    assert p.returncode == 1 and "no emulator is serving" in p.stderr
    for _ in range(2):  # SIGKILL twice in a row, each leaving its runtime files behind
        srv = ServerProc(device, transport_name, cleanup=False).start()
        assert _our_entries(device)
        srv.proc.kill()  # type: ignore[union-attr]
        srv.proc.wait()  # type: ignore[union-attr]
        for args in (("status",), ("kexec",), ("run", "--", "true")):
            p = cli(*args[:1], "--device", device, *args[1:])
            assert p.returncode == 1 and "stale" in p.stderr and "not running" in p.stderr, (args, p.stderr)
    with ServerProc(device, transport_name) as srv:
        srv.start()
        assert cli("status", "--device", device).returncode == 0
        assert srv.stop() == 0
    assert _our_entries(device) == []


def test_clean_stop_leaves_nothing_under_run_cusedev(device: str, transport_name: str) -> None:
    with ServerProc(device, transport_name) as srv:
        srv.start()
        assert srv.stop(signal.SIGINT) == 0
    assert _our_entries(device) == []


def test_inject_list(device: str, transport_name: str) -> None:
    with ServerProc(device, transport_name) as srv:
        srv.start()
        p = cli("inject", "--list", "--device", device)
        assert p.returncode == 0 and p.stdout == "no rules\n", p.stdout
        assert cli("inject", "GET_STATE:error=EIO:when=2", "--device", device).returncode == 0
        with LiveUpdateDevice(device) as dev:
            dev.state  # noqa: B018 - the first GET_STATE: matched, not failed (when=2)
            with pytest.raises(OSError):
                dev.state  # noqa: B018
        p = cli("inject", "--list", "--device", device)
        assert p.returncode == 0 and "GET_STATE:error=EIO:when=2" in p.stdout and "hits 2" in p.stdout, p.stdout
        help_text = cli("inject", "--help").stdout
        assert "hits" in help_text and "--list" in help_text
        p = cli("inject", "--clear", "--device", device)
        assert p.returncode == 0 and p.stdout == ""
        p = cli("inject", "--device", device)  # no RULE: list
        assert p.returncode == 0 and p.stdout == "no rules\n"
        assert srv.stop() == 0


def test_status_shows_tokens_in_hex(device: str, transport_name: str) -> None:
    with ServerProc(device, transport_name) as srv:
        srv.start()
        ram = os.memfd_create("guest-ram")
        os.write(ram, b"x" * 4096)
        with LiveUpdateDevice(device) as dev:
            dev.preserve(ram, 0x6775657374)
            p = cli("status", "--device", device)
            assert p.returncode == 0 and "0x6775657374" in p.stdout, p.stdout
        os.close(ram)
        assert srv.stop() == 0


def test_replay_into_the_emulator_writing_that_trace_is_refused(device: str, transport_name: str,
                                                                 tmp_path: Path) -> None:
    trace = tmp_path / "luo.jsonl"
    with ServerProc(device, transport_name, "--trace", str(trace)) as srv:
        srv.start()
        with LiveUpdateDevice(device) as dev:
            dev.state  # noqa: B018
        p = cli("trace", "replay", str(trace), "--device", device)
        assert p.returncode == 1 and "is recording" in p.stderr and len(p.stderr.splitlines()) == 1, p.stderr
        assert srv.stop() == 0


def test_errnos_are_named_as_the_kernel_names_them() -> None:
    from cusedev.tracing.record import errname

    assert errname(95) == "EOPNOTSUPP"
    assert errname(11) == "EAGAIN"


@pytest.mark.vm  # on CUSE the struct arrives through a retry round the injector asks for while tracing
def test_injected_calls_are_decoded_like_any_other(device: str, transport_name: str, tmp_path: Path) -> None:
    trace = tmp_path / "luo.jsonl"
    with ServerProc(device, transport_name, "--trace", str(trace), "--inject", "GET_STATE:error=EIO") as srv:
        srv.start()
        with LiveUpdateDevice(device) as dev, pytest.raises(OSError):
            dev.state  # noqa: B018
        assert srv.stop() == 0
    p = cli("trace", "show", str(trace))
    (line,) = [ln for ln in p.stdout.splitlines() if "GET_STATE" in ln]
    assert "ioctl(LIVEUPDATE_IOCTL_GET_STATE, {size=8}) = -1 EIO" in line and line.count("(INJECTED)") == 1, line
