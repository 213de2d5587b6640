"""The whole live-update cycle (issue 3): emulated kexec, restore under `cusedev run`, the counter,
revoked handles, control/status, --state-dir restarts, and the VMM example — all through real syscalls.

One emulator serves the module (``shared_emulator``, reset after each test).  The VM phase runs the two
tests where `cusedev run` restores fds from the device (the seccomp launcher on the transport under
test: a trapped FD_RESTORE on a CUSE node) and the VMM walkthrough; the control plane, the CLI and
the state dir do not depend on the transport and run on the host only.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _server import REPO, ServerProc

from cusedev import control
from cusedev.client import LiveUpdateDevice, State

PROG = str(REPO / "tests/progs/luo_script.py")
ENV = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
TIMEOUT = 300


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    p = subprocess.run([sys.executable, "-m", "cusedev", *args], capture_output=True, text=True, env=ENV,
                       cwd=REPO, timeout=TIMEOUT)
    if check:
        assert p.returncode == 0, p.stderr
    return p


def script(dev: str, steps: list, run: bool = True) -> tuple[list[dict], subprocess.CompletedProcess[str]]:
    cmd = [sys.executable, PROG, json.dumps(steps)]
    if run:
        cmd = [sys.executable, "-m", "cusedev", "run", "--device", dev, "--", *cmd]
    p = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=REPO, timeout=TIMEOUT)
    return [json.loads(line) for line in p.stdout.splitlines()], p


def status(dev: str) -> dict:
    return json.loads(cli("status", "--device", dev, "--json").stdout)


@pytest.fixture
def emu(shared_emulator: ServerProc) -> ServerProc:
    return shared_emulator


def prepare_and_kexec(dev: str, files: list[tuple[int, int, int, int]]) -> list[dict]:
    """Stage 1 of a live update: preserve memfds (token, size, seed, pos), PREPARE, reboot(KEXEC)."""
    steps: list = [["open", dev], *[["memfd", *f] for f in files], ["prepare"], ["reboot", "kexec"]]
    out, p = script(dev, steps)
    assert p.returncode == 0, p.stderr
    assert "cusedev run: live update" in p.stderr
    assert len(out) == len(files) + 2, f"reboot returned: {out}"  # the reboot step never printed
    return out[1:-1]


def test_kexec_cli_live_and_plain(emu) -> None:
    dev = emu.device
    with LiveUpdateDevice(dev) as d:
        m = os.memfd_create("x")
        os.write(m, b"a" * 5000)
        d.preserve(m, 1)
        d.prepare()
        r = cli("kexec", "--device", dev)
        assert r.stdout.strip() == "live update: state=updated update_count=1"
        with pytest.raises(OSError) as ei:  # revoked: as if the process died with the old kernel
            d.state  # noqa: B018
        assert ei.value.errno == errno.ENODEV
        with LiveUpdateDevice(dev) as d2:  # the exclusive-open slot is free
            assert d2.state == State.UPDATED
            assert d2.fd_state(1, incoming=True) == State.UPDATED
            with pytest.raises(OSError) as ei:
                d2.fd_state(1)
            assert ei.value.errno == errno.ENOENT
    st = status(dev)
    assert st["update_count"] == 1 and st["state"] == "updated"
    assert st["incoming"] == [{"token": 1, "state": "updated", "size": 5000, "restored": False}]
    r = cli("kexec", "--device", dev)
    assert r.stdout.strip() == "plain kexec: state=normal update_count=0"
    st = status(dev)
    assert st["incoming"] == [] and st["outgoing"] == [] and st["state"] == "normal"


def test_counter_three_updates_then_reset(emu) -> None:
    dev = emu.device
    for n in (1, 2, 3):
        with LiveUpdateDevice(dev) as d:
            if n > 1:
                d.finish()
            m = os.memfd_create("x")
            os.write(m, b"z" * 100)
            d.preserve(m, n)
            d.prepare()
        assert cli("kexec", "--device", dev).stdout.split()[-1] == f"update_count={n}"
        assert status(dev)["update_count"] == n
    assert cli("kexec", "--device", dev).stdout.split()[-1] == "update_count=0"


@pytest.mark.vm
def test_restore_under_run(emu) -> None:
    dev = emu.device
    sent = prepare_and_kexec(dev, [(0x10, 3 << 20, 1, 12345), (0x20, 4096, 2, 0), (0x30, 8192, 3, 7)])
    out, p = script(dev, [
        ["open", dev], ["state"], ["fd_state", 0x10, 1],
        ["restore", 0x10], ["restore", 0x10], ["restore", 0x99], ["restore", 0x20],
        ["fd_state", 0x10, 1], ["finish"], ["state"], ["fd_state", 0x30, 1], ["fd_state", 0x10, 1],
    ])
    assert p.returncode == 0, p.stderr
    assert out[1] == {"state": State.UPDATED} and out[2] == {"state": State.UPDATED}
    r = out[3]
    assert r["cloexec"] and r["writable"] and r["size"] == 3 << 20 and r["pos"] == 12345
    assert r["sha"] == sent[0]["sha"]
    assert out[4] == {"errno": errno.EINVAL}  # single use
    assert out[5] == {"errno": errno.ENOENT}
    assert out[6]["sha"] == sent[1]["sha"] and out[6]["fd"] != r["fd"]
    assert out[7] == {"state": State.UPDATED}
    assert out[9] == {"state": State.NORMAL}
    assert out[10] == {"errno": errno.ENOENT} and out[11] == {"errno": errno.ENOENT}  # 0x30 dropped unrestored


def test_restore_errnos_outside_run(emu) -> None:
    dev = emu.device
    out, _ = script(dev, [["open", dev], ["restore", 1]], run=False)
    assert out[1] == {"errno": errno.EBUSY}  # NORMAL
    prepare_and_kexec(dev, [(5, 4096, 1, 0)])
    out, _ = script(dev, [["open", dev], ["restore", 6], ["restore", 5], ["restore", 5]], run=False)
    assert out[1] == {"errno": errno.ENOENT}
    assert out[2] == {"errno": errno.EOPNOTSUPP} and out[3] == {"errno": errno.EOPNOTSUPP}  # not consumed
    out, _ = script(dev, [["open", dev], ["restore", 5], ["restore", 5]])
    assert out[1]["cloexec"] and out[2] == {"errno": errno.EINVAL}


def test_run_kills_tree_and_blocks_other_reboots(emu) -> None:
    dev = emu.device
    out, p = script(dev, [["reboot", "cad_off"], ["sleeper"], ["reboot", "kexec"]])
    assert out[0] == {"rc": -1, "errno": errno.EPERM}
    sleeper = out[1]["pid"]
    assert len(out) == 2 and p.returncode == 0 and "plain kexec" in p.stderr
    from _hostile import alive

    deadline = time.monotonic() + 30  # killed with the run's tree (a loaded machine may take a moment)
    while alive(sleeper) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not alive(sleeper)


def test_other_runs_die_on_cli_kexec(emu) -> None:
    dev = emu.device
    p = subprocess.Popen([sys.executable, "-m", "cusedev", "run", "--device", dev, "--", "sleep", "600"],
                         env=ENV, cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(100):
            if status(dev)["runs"]:
                break
            time.sleep(0.05)
        cli("kexec", "--device", dev)
        assert p.wait(30) == 0
        assert "plain kexec" in (p.stderr.read() if p.stderr else "")
    finally:
        p.kill()


def test_status_human_and_json(emu) -> None:
    dev = emu.device
    with LiveUpdateDevice(dev) as d:
        m = os.memfd_create("x")
        os.write(m, b"q" * 777)
        d.preserve(m, 42)
        st = status(dev)
        assert st["opener_pid"] == os.getpid()
        assert st["transport"] == emu.transport and st["abi"] == "v3"
        assert st["outgoing"] == [{"token": 42, "state": "normal", "size": 777, "restored": False}]
        human = cli("status", "--device", dev).stdout
        assert "state:        normal" in human and "token 0x2a" in human and f"pid {os.getpid()}" in human
    assert status(dev)["opener_pid"] is None
    r = cli("status", "--device", "/nonexistent/dev", check=False)
    assert r.returncode == 1 and "no emulator is serving" in r.stderr and "Traceback" not in r.stderr


def test_control_socket_is_root_only(emu) -> None:
    sock = f"/run/cusedev/{emu.device.strip('/').replace('_', '__').replace('/', '_')}.control"
    st = os.stat(sock)
    assert st.st_mode & 0o777 == 0o600 and st.st_uid == 0
    pid = os.fork()
    if pid == 0:
        try:
            os.setgid(65534)
            os.setuid(65534)
            try:
                control.request(emu.device, "status")
                os._exit(1)
            except control.ControlError:
                os._exit(0)
        except BaseException:
            os._exit(2)
    assert os.waitpid(pid, 0)[1] == 0


@pytest.mark.parametrize("where", ["normal", "prepared", "updated"])
def test_state_dir_restart(tmp_path: Path, transport_name: str, where: str) -> None:
    dev, sd = str(tmp_path / "liveupdate"), str(tmp_path / "state")
    with ServerProc(dev, transport_name, "--state-dir", sd) as srv:
        srv.start()
        sent = []
        if where == "updated":
            sent = prepare_and_kexec(dev, [(7, 1 << 20, 9, 100)])
            cli("kexec", "--device", dev)  # plain: counter to 0 ...
            sent = prepare_and_kexec(dev, [(7, 1 << 20, 9, 100)])  # ... then one live update
            for _ in range(200):  # bytes are saved in the background after the kexec
                if any(f.endswith(".bin") for f in os.listdir(os.path.join(sd, "files"))):
                    break
                time.sleep(0.05)
        elif where == "prepared":
            out, _ = script(dev, [["open", dev], ["memfd", 1, 4096, 1, 0], ["prepare"]], run=False)
        assert srv.stop() == 0
    before = json.load(open(os.path.join(sd, "state.json")))
    with ServerProc(dev, transport_name, "--state-dir", sd) as srv:
        srv.start()
        st = status(dev)
        assert st["state"] == where and st["outgoing"] == []
        assert st["update_count"] == before["update_count"] == (1 if where == "updated" else 0)
        if where == "updated":
            assert st["incoming"] == [{"token": 7, "state": "updated", "size": 1 << 20, "restored": False}]
            out, p = script(dev, [["open", dev], ["restore", 7], ["finish"]])
            assert out[1]["sha"] == sent[0]["sha"] and out[1]["pos"] == 100, p.stderr
            assert status(dev)["state"] == "normal"
        if where == "prepared":
            with LiveUpdateDevice(dev) as d:
                d.cancel()
                assert d.state == State.NORMAL
    assert json.load(open(os.path.join(sd, "state.json")))["state"] == State.NORMAL


def test_no_state_dir_writes_nothing(emulator: ServerProc) -> None:
    where = os.path.dirname(emulator.device)  # the emulator's own directory
    before = set(os.listdir(where))
    prepare_and_kexec(emulator.device, [(1, 4096, 1, 0)])
    assert set(os.listdir(where)) == before


@pytest.fixture(scope="module")
def vmm_demo(tmp_path_factory) -> str:
    exe = str(tmp_path_factory.mktemp("vmm") / "vmm_demo")
    subprocess.run(["gcc", "-O2", "-Wall", "-Werror", "-I", str(REPO / "cdefs"), "-o", exe,
                    str(REPO / "examples/vmm_demo.c")], check=True)
    return exe


@pytest.mark.vm
def test_vmm_demo_256mib(emu, vmm_demo: str) -> None:
    dev = emu.device
    s1 = cli("run", "--device", dev, "--", vmm_demo, "stage1", "-d", dev, "-s", "256")
    assert "rebooting into the next kernel" in s1.stdout and "live update" in s1.stderr
    s2 = cli("run", "--device", dev, "--", vmm_demo, "stage2", "-d", dev, "-s", "256")
    assert "all 256 MiB verified" in s2.stdout and "(O_CLOEXEC)" in s2.stdout
    assert "finished, state normal" in s2.stdout
    assert status(dev)["update_count"] == 1


def test_vmm_demo_refuses_real_reboot_outside_run(emu, vmm_demo: str) -> None:
    p = subprocess.run([vmm_demo, "stage1", "-d", emu.device, "-s", "1"], capture_output=True, text=True,
                       env={k: v for k, v in os.environ.items() if k != "CUSEDEV_RUN"}, timeout=60)
    assert p.returncode == 2 and "refusing to call reboot()" in p.stderr


def test_run_needs_an_emulator(tmp_path: Path) -> None:
    r = cli("run", "--device", str(tmp_path / "none"), "--", "true", check=False)
    assert r.returncode == 1 and "no emulator is serving" in r.stderr


def test_sigterm_while_run_attached(emulator: ServerProc) -> None:
    p = subprocess.Popen([sys.executable, "-m", "cusedev", "run", "--device", emulator.device, "--", "sleep", "600"],
                         env=ENV, cwd=REPO)
    try:
        for _ in range(100):
            if status(emulator.device)["runs"]:
                break
            time.sleep(0.05)
        assert emulator.stop(signal.SIGTERM) == 0
    finally:
        p.kill()
        p.wait()
