"""`cusedev run` and the control plane, straightened (issue 17): a trapped call whose task dies is
cancelled, and a control peer that never reads its replies cannot stop the emulator."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

from _server import IN_VM, REPO

from cusedev import control
from cusedev.client import LiveUpdateDevice
from cusedev.control.paths import control_socket

ENV = {**os.environ, "PYTHONPATH": str(REPO)}
TIMEOUT = 300 if IN_VM else 60
DELAY = 120  # the held call's injected delay: far longer than a cancelled call takes to end


def _status(dev: str) -> dict[str, Any]:
    return control.request(dev, "status")


def test_trapped_call_of_a_dead_task_is_cancelled(emulator: Any) -> None:
    """A `cusedev run` client dies inside a (delayed) FD_RESTORE: the emulator drops the call at
    once (its copy of the client's fd goes, so the open file is released long before the delay
    ends) and installs nothing; the file stays restorable."""
    dev = emulator.device
    with LiveUpdateDevice(dev) as d:  # (closing the device before the kexec would drop the file)
        m = os.memfd_create("guest")
        os.write(m, b"guest ram")
        d.preserve(m, 9)
        d.prepare()
        os.close(m)
        res = control.request(dev, "kexec")
    assert res["ok"] and res["live"], res
    assert control.request(dev, "inject", rules=[f"FD_RESTORE:delay={DELAY}s"])["ok"]
    prog = str(REPO / "tests/progs/luo_script.py")
    run = subprocess.Popen([sys.executable, "-m", "cusedev", "run", "--device", dev, "--", sys.executable, prog,
                            json.dumps([["open", dev], ["restore", 9]])], env=ENV, cwd=REPO,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + TIMEOUT
        while (client := _status(dev)["opener_pid"]) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client is not None
        time.sleep(3 if IN_VM else 0.5)  # inside the delayed FD_RESTORE by now
        killed = time.monotonic()
        os.kill(client, signal.SIGKILL)  # the client alone (it leads a process group of its own)
        assert run.wait(TIMEOUT) == 128 + signal.SIGKILL
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait(TIMEOUT)
    st = _status(dev)
    while st["opener_pid"] is not None and time.monotonic() < killed + DELAY - 10:
        time.sleep(0.1)
        st = _status(dev)
    assert st["opener_pid"] is None, "the trapped call kept the dead client's open file until its delay ended"
    assert st["incoming"] == [{"token": 9, "state": "updated", "size": 9, "restored": False}], st
    control.request(dev, "inject", clear=True)
    res = subprocess.run([sys.executable, "-m", "cusedev", "run", "--device", dev, "--", sys.executable, prog,
                          json.dumps([["open", dev], ["restore", 9], ["finish"]])], env=ENV, cwd=REPO,
                         capture_output=True, text=True, timeout=TIMEOUT)
    assert res.returncode == 0, res.stderr
    assert all("errno" not in json.loads(x) for x in res.stdout.splitlines()), res.stdout


def test_control_peer_that_never_reads(emulator: Any) -> None:
    """A root peer floods status requests and reads nothing: other peers are still answered (the
    loop never waits on a socket), and the flooding peer is dropped once its unread replies pile up."""
    dev = emulator.device
    flood = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    flood.connect(control_socket(dev))
    sent: dict[str, Any] = {}

    def send() -> None:
        line = b'{"cmd": "status"}\n' * 1000
        try:
            for _ in range(60):
                flood.sendall(line)
            sent["all"] = True
        except OSError as e:  # dropped while we were still sending
            sent["error"] = e.errno

    t = threading.Thread(target=send, daemon=True)
    t.start()
    try:
        time.sleep(0.5)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as other:
            other.settimeout(TIMEOUT)
            other.connect(control_socket(dev))
            other.sendall(b'{"cmd": "status"}\n')
            reply = other.makefile("rb").readline()
        assert json.loads(reply)["ok"] is True
        t.join(TIMEOUT)
        assert not t.is_alive()
        flood.settimeout(TIMEOUT)
        got = 0
        while True:  # what the emulator had sent, then end of file: the peer was dropped
            try:
                chunk = flood.recv(1 << 16)
            except ConnectionResetError:
                break
            if not chunk:
                break
            got += len(chunk)
        assert got < 60_000 * 200, "every reply was delivered: the peer was never dropped"
    finally:
        flood.close()
    assert _status(dev)["ok"] is True
