"""Start ``cusedev serve`` in a subprocess for tests, and clean up whatever it leaves even on failure.

The emulator fixtures built on it (``emulator``, ``shared_emulator``) live in
conftest.py.  ``ServerProc(...).start()`` for anything else; always pair with
``stop()``/``kill()`` (``ServerProc`` is a context manager).
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cusedev.control.paths import control_socket, escape

REPO = Path(__file__).resolve().parent.parent
# The VM run is software-emulated (TCG) and may share 2 CPUs with other VMs: Python
# start-up alone can take tens of seconds there.
IN_VM = os.environ.get("CUSEDEV_TEST_TRANSPORT", "fuse") == "cuse"
READY_TIMEOUT = float(os.environ.get("CUSEDEV_TEST_READY_TIMEOUT", "180" if IN_VM else "30"))
EXIT_TIMEOUT = 180.0 if IN_VM else 30.0


def mounts_mentioning(*paths: str) -> list[str]:
    """Lines of /proc/mounts whose mount point is one of ``paths`` (or below /run/cusedev/<them>)."""
    wanted = set(paths) | {f"/run/cusedev/{escape(os.path.abspath(p))}/{sub}" for p in paths for sub in ("mnt", "sys")}
    out = []
    with open("/proc/mounts") as f:
        for line in f:
            mp = line.split()[1].replace("\\040", " ")
            if mp in wanted:
                out.append(line.strip())
    return out


def force_cleanup(path: str) -> None:
    """Lazy-unmount anything a crashed server left at ``path`` and its private mount; drop its dirs."""
    private = f"/run/cusedev/{escape(os.path.abspath(path))}"
    for mp in (path, f"{private}/mnt", f"{private}/sys"):
        for _ in range(4):  # stacked mounts from repeated failures
            if subprocess.run(["umount", "-l", mp], stderr=subprocess.DEVNULL).returncode != 0:
                break
    for d in (f"{private}/mnt", f"{private}/sys", private):
        try:
            os.rmdir(d)
        except OSError:
            pass
    try:
        os.unlink(control_socket(path))
    except OSError:
        pass


class ServerProc:
    """One ``cusedev serve`` subprocess."""

    def __init__(self, device: str, transport: str, *args: str, env: dict[str, str] | None = None,
                 preexec_fn=None, cleanup: bool = True):  # type: ignore[no-untyped-def]
        self.device = device
        self.cleanup = cleanup  # False for a server expected to fail on a path another one serves
        self.transport = transport
        self.argv = [sys.executable, "-m", "cusedev.cli", "serve", "--device", device,
                     "--transport", transport, *args]
        self.env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                    **(env or {})}
        self.preexec_fn = preexec_fn
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready_line = ""
        # a file, not a pipe: nobody drains a pipe while the test runs, and a server blocked writing
        # its log would hang every client of the device (and the test with them)
        self._log = tempfile.TemporaryFile()

    def start(self, timeout: float = READY_TIMEOUT, expect_ready: bool = True) -> ServerProc:
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, stderr=self._log, env=self.env,
                                     cwd=str(REPO), preexec_fn=self.preexec_fn)
        if not expect_ready:
            return self
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        buf = b""
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                raise AssertionError(f"no ready line within {timeout}s; stderr: {self.stderr()}")
            r, _, _ = select.select([self.proc.stdout], [], [], left)
            if r:
                chunk = os.read(self.proc.stdout.fileno(), 4096)
                if not chunk:
                    rc = self.proc.wait()
                    raise AssertionError(f"server exited {rc} before ready; stderr: {self.stderr()}")
                buf += chunk
        self.ready_line = buf.decode().splitlines()[0]
        return self

    def wait(self, timeout: float = EXIT_TIMEOUT) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stderr(self) -> str:
        """Everything the server wrote to stderr so far (all of it once it exited)."""
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = EXIT_TIMEOUT) -> int:
        """Signal the server and wait; returns its exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.cleanup:
            force_cleanup(self.device)

    def __enter__(self) -> ServerProc:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.stop(timeout=EXIT_TIMEOUT / 3)  # let it clean up after itself first
            except subprocess.TimeoutExpired:
                pass
        self.kill()
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()


def assert_clean_log(text: str) -> None:
    """Nothing a client does may put a traceback or an error line into the emulator's log."""
    assert "Traceback" not in text, text[-4000:]
    assert "ERROR" not in text and "Exception" not in text, text[-4000:]


def assert_clean_stop(srv: ServerProc) -> None:
    """SIGTERM ends the emulator with exit 0 and a clean log."""
    assert srv.stop() == 0, srv.stderr()
    assert_clean_log(srv.stderr())


def mounts_below(directory: str) -> list[str]:
    """Lines of /proc/mounts whose mount point is ``directory`` or below it."""
    top = os.path.abspath(directory)
    with open("/proc/mounts") as f:
        return [line.strip() for line in f
                if (mp := line.split()[1].replace("\\040", " ")) == top or mp.startswith(top + "/")]


def reset(srv: ServerProc, release_timeout: float = 60.0 if IN_VM else 20.0) -> None:
    """Bring a running emulator back to a freshly booted machine: nobody holding the device, no
    `cusedev run` attached, state normal, update_count 0, no outgoing or incoming file, KHO not
    finalized, and only the injection rules it was started with.  A plain kexec does the state
    part, as it would on a kernel; everything goes through the control socket (no new process)."""
    from cusedev import control
    from cusedev.client import LiveUpdateDevice

    assert srv.proc is not None and srv.proc.poll() is None, f"the emulator died: {srv.stderr()}"
    dev = srv.device
    deadline = time.monotonic() + release_timeout
    while (st := control.request(dev, "status"))["opener_pid"] is not None or st["runs"]:
        assert time.monotonic() < deadline, f"a test left the device open or a `cusedev run` attached: {st}"
        time.sleep(0.02)
    if st["state"] == "prepared":
        with LiveUpdateDevice(dev) as d:
            d.cancel()
        while (st := control.request(dev, "status"))["opener_pid"] is not None:
            assert time.monotonic() < deadline, f"the reset's own handle was not released: {st}"
            time.sleep(0.02)
    if st["state"] != "normal" or st["update_count"] or st["outgoing"] or st["incoming"]:
        assert control.request(dev, "kexec")["ok"]
    control.request(dev, "kho", finalized=False)
    rules = [a for i, a in enumerate(srv.argv[1:], 1) if srv.argv[i - 1] == "--inject"]
    control.request(dev, "inject", rules=rules, clear=True)
    st = control.request(dev, "status")
    fresh = (st["state"], st["update_count"], st["outgoing"], st["incoming"], st["kho_finalized"], st["runs"])
    assert fresh == ("normal", 0, [], [], False, []), f"the emulator could not be reset: {st}"

