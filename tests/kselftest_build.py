"""The kernel's own LUO selftests, built unchanged from Debian's linux-source-7.2 and cached.

``scripts/linux-source`` fetches the package (once per machine); we extract
only what spec luo-session.md section 14 lists, build with the selftests' own
Makefile against the package's UAPI header (``KHDR_INCLUDES``, so an older
``<linux/liveupdate.h>`` from linux-libc-dev is never used), and keep the five
binaries and that header under ``$CUSEDEV_VM_CACHE/selftests/<version>/``:
the same place and marker (``.ready``) as ``vm/build-kernel``, so whichever
runs first builds for both.  Nothing of the kernel tree enters the project.

Run as a script it prints the directory (``python3 tests/kselftest_build.py``).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("CUSEDEV_VM_CACHE", "/var/lib/cusedev-vm"))
SERIES = os.environ.get("CUSEDEV_LINUX_SERIES", "7.2")
BINARIES = ("liveupdate", "luo_kexec_simple", "luo_multi_session", "luo_stress_sessions", "luo_stress_files")
TWO_STAGE = BINARIES[1:]
HEADER = "hdr/linux/liveupdate.h"  # kept next to the binaries (for the layout test)


def _source(*args: str) -> str:
    return subprocess.run(
        [str(ROOT / "scripts" / "linux-source"), "--series", SERIES, *args],
        capture_output=True, text=True, check=True, timeout=3600,
    ).stdout.strip()  # fmt: skip


def _ready(d: Path) -> bool:
    return (d / ".ready").is_file() and (d / HEADER).is_file() and all((d / b).is_file() for b in BINARIES)


def selftests_dir() -> Path:
    """The directory with the five binaries and ``hdr/linux/liveupdate.h``; builds them once.

    ``CUSEDEV_SELFTESTS`` names a ready directory (the VM runner passes the host's); inside the VM
    the cache is read-only and the package cannot be fetched, so a ready cached build is used.
    """
    given = os.environ.get("CUSEDEV_SELFTESTS")
    if given and _ready(Path(given)):
        return Path(given)
    try:
        version = _source("--version")
    except (subprocess.CalledProcessError, OSError):
        built = sorted(d for d in (CACHE / "selftests").glob("*") if _ready(d))
        if built:
            return built[-1]
        raise
    out = CACHE / "selftests" / version
    if _ready(out):
        return out
    (CACHE / "selftests").mkdir(parents=True, exist_ok=True)
    with open(CACHE / "selftests" / ".lock-tests", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _ready(out):
            return out
        tarball = _source()
        top = f"linux-source-{SERIES}"
        st = f"{top}/tools/testing/selftests"
        with tempfile.TemporaryDirectory(dir=CACHE / "selftests", prefix=".build-") as tmp:
            members = [f"{top}/include/uapi/linux/liveupdate.h", f"{top}/scripts/subarch.include", f"{st}/lib.mk",
                       f"{st}/kselftest.h", f"{st}/kselftest_harness.h", f"{st}/liveupdate"]  # fmt: skip
            subprocess.run(["tar", "-xJf", tarball, "-C", tmp, *members], check=True, timeout=1200)
            hdr = Path(tmp) / "hdr" / "linux"
            hdr.mkdir(parents=True)
            shutil.copy(Path(tmp) / top / "include/uapi/linux/liveupdate.h", hdr)
            make = subprocess.run(
                ["make", "-s", "-C", f"{tmp}/{st}/liveupdate", f"KHDR_INCLUDES=-isystem {tmp}/hdr"],
                capture_output=True, text=True, timeout=1200,
            )  # fmt: skip
            if make.returncode != 0:
                raise RuntimeError(f"selftest build failed:\n{make.stdout[-3000:]}\n{make.stderr[-3000:]}")
            stage = Path(tmp) / "out"
            (stage / "hdr" / "linux").mkdir(parents=True)
            for b in BINARIES:
                shutil.copy2(Path(tmp) / st / "liveupdate" / b, stage / b)
            shutil.copy(hdr / "liveupdate.h", stage / HEADER)
            (stage / ".ready").write_text(version + "\n")
            if out.exists():
                shutil.rmtree(out)
            os.rename(stage, out)
    return out


if __name__ == "__main__":
    print(selftests_dir())
    sys.exit(0)
