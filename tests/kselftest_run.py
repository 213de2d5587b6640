"""Run the kernel's LUO selftests, unchanged, against the emulator serving a session profile.

Run inside a private mount namespace (``unshare -m --propagation private``):
``/dev`` there becomes a tmpfs holding binds of the host's null/zero/urandom/
fuse/cuse... and the emulator's own node at ``/dev/liveupdate`` (the path the
selftests hard-code), so the host's /dev is never touched.  Every binary runs
under `cusedev run` (session fds are real fds; its reboot(KEXEC) would be the
emulated kexec); the two-stage ones run stage 1, then `cusedev kexec`, then
``-s 2``.  Prints one JSON object: per binary its exit codes, the TAP summary
lines and the tail of its output.

    unshare -m --propagation private python3 tests/kselftest_run.py --abi 7.2 [BINARY...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from kselftest_build import BINARIES, TWO_STAGE, selftests_dir  # noqa: E402
from session_emulator import SessionEmulator  # noqa: E402

DEV_NODES = ("null", "zero", "full", "random", "urandom", "tty", "fuse", "cuse", "kmsg")
TIMEOUT = float(os.environ.get("CUSEDEV_KSELFTEST_TIMEOUT", "600"))


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True)


def private_dev() -> None:
    """A /dev of our own: a tmpfs with binds of the host nodes the tests and the emulator use."""
    try:
        shared = os.readlink("/proc/self/ns/mnt") == os.readlink(f"/proc/{os.getppid()}/ns/mnt")
    except OSError:
        shared = False
    if shared:
        raise SystemExit("kselftest_run: not in a private mount namespace (use unshare -m --propagation private)")
    old = tempfile.mkdtemp(prefix="cusedev-hostdev-")
    _mount("--bind", "/dev", old)
    _mount("-t", "tmpfs", "-o", "mode=0755,size=1m", "tmpfs", "/dev")
    for n in DEV_NODES:
        if os.path.exists(os.path.join(old, n)):
            Path("/dev", n).touch()
            _mount("--bind", os.path.join(old, n), f"/dev/{n}")
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                         ("stderr", "/proc/self/fd/2")):  # fmt: skip
        os.symlink(target, f"/dev/{name}")
    os.mkdir("/dev/shm")
    _mount("-t", "tmpfs", "-o", "mode=1777", "tmpfs", "/dev/shm")


def tap_summary(text: str) -> list[str]:
    """The TAP lines worth printing: per-case results, totals, and the two-stage tests' verdicts."""
    keep = ("ok ", "not ok ", "# Totals:", "# PASSED", "# FAILED", "1..")
    out = []
    for line in text.splitlines():
        s = line.strip()
        if s.startswith(keep) or "TEST PASSED" in s or "Stage mismatch" in s or "[STAGE 1]" in s:
            out.append(s)
    return out


def _progress(msg: str) -> None:
    print(f"[kselftest_run {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _run(emu: SessionEmulator, argv: list[str], cwd: Path) -> dict[str, Any]:
    _progress("run " + " ".join([Path(argv[0]).name, *argv[1:]]))
    t0 = time.monotonic()
    try:
        r = emu.run(argv, cwd=str(cwd), capture_output=True, text=True, timeout=TIMEOUT)
        rc, out = r.returncode, r.stdout + r.stderr
    except subprocess.TimeoutExpired as e:
        rc, out = -1, f"{e.stdout or ''}{e.stderr or ''}\n(timeout after {TIMEOUT}s)"
    return {"argv": [Path(argv[0]).name, *argv[1:]], "rc": rc, "seconds": round(time.monotonic() - t0, 2),
            "tap": tap_summary(out), "tail": out.splitlines()[-15:]}  # fmt: skip


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--abi", default="7.2")
    ap.add_argument("binaries", nargs="*", default=list(BINARIES))
    a = ap.parse_args(argv)
    bindir = selftests_dir()
    private_dev()
    # A soft fd limit below what the stress tests' 500 files need in the emulator (preserved + retrieved):
    # the kernel keeps them without any process's limit, so the emulator must raise its own (the VM's
    # shell gives 1,024, where luo_stress_files' stage 2 failed with EMFILE); the selftests raise
    # theirs as they need
    import resource

    resource.setrlimit(resource.RLIMIT_NOFILE, (512, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    results: dict[str, Any] = {}
    _progress(f"selftests from {bindir}; starting the emulator ({a.abi})")
    with SessionEmulator(a.abi, path="/dev/liveupdate") as emu:
        _progress(f"emulator ready: transport {emu.transport}")
        for b in a.binaries:
            steps = []
            if b in TWO_STAGE:
                steps.append(_run(emu, [str(bindir / b), "-s", "1"], bindir))
                _progress("cusedev kexec")
                k = emu.kexec()
                steps.append({"argv": ["cusedev", "kexec"], "rc": 0, "update_count": k.get("update_count")})
                steps.append(_run(emu, [str(bindir / b), "-s", "2"], bindir))
            else:
                steps.append(_run(emu, [str(bindir / b)], bindir))
            results[b] = steps
        results["_status"] = emu.status()
        results["_log"] = emu.log().splitlines()[-30:]
    print(json.dumps(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
