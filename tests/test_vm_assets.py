"""Host checks of the VM runner's pieces (vm/): the kernel config check and the guest's initramfs.

The VM phase itself is what proves the runner; these catch a broken piece in seconds on the host,
before a 15-minute VM run would.  Host only: the guest has no use for them.
"""

from __future__ import annotations

import gzip
import importlib.machinery
import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

VM = Path(__file__).resolve().parent.parent / "vm"


def _check(tmp_path: Path, fragment: str, config: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "fragment").write_text(fragment)
    (tmp_path / "config").write_text(config)
    return subprocess.run([str(VM / "check-config"), str(tmp_path / "fragment"), str(tmp_path / "config")],
                          capture_output=True, text=True)


def test_config_check_names_every_dropped_option(tmp_path: Path) -> None:
    r = _check(tmp_path,
               "# comment\nCONFIG_KEPT=y\nCONFIG_GONE=y\n# CONFIG_OFF is not set\n# CONFIG_BACK is not set\n",
               "CONFIG_KEPT=y\n# CONFIG_GONE is not set\nCONFIG_BACK=y\n")
    assert r.returncode == 1
    assert r.stdout.splitlines() == [
        "dropped by olddefconfig: CONFIG_GONE=y (now: # CONFIG_GONE is not set)",
        "dropped by olddefconfig: # CONFIG_BACK is not set (now: CONFIG_BACK=y)",
    ]


def test_config_check_passes_when_everything_survived(tmp_path: Path) -> None:
    r = _check(tmp_path, "CONFIG_A=y\nCONFIG_N=16\n# CONFIG_B is not set\n",
               "CONFIG_A=y\nCONFIG_N=16\nCONFIG_AB=y\n")
    assert (r.returncode, r.stdout) == (0, "")
    # a value that changed is a dropped line too
    assert _check(tmp_path, "CONFIG_N=16\n", "CONFIG_N=8\n").returncode == 1


def test_kernel_fragment_is_well_formed() -> None:
    """Every line is a comment, blank, `CONFIG_X=v` or `# CONFIG_X is not set`, and no option twice."""
    seen: list[str] = []
    for line in (VM / "kernel.config").read_text().splitlines():
        m = re.fullmatch(r"(CONFIG_\w+)=\S+|# (CONFIG_\w+) is not set", line)
        if m:
            seen.append(m.group(1) or m.group(2))
        else:
            assert line == "" or (line.startswith("#") and "CONFIG_" not in line), line
    assert len(seen) == len(set(seen))
    for needed in ("CONFIG_LIVEUPDATE", "CONFIG_KEXEC_HANDOVER", "CONFIG_KEXEC_FILE", "CONFIG_CUSE", "CONFIG_9P_FS"):
        assert needed in seen


def _run_guest() -> ModuleType:
    loader = importlib.machinery.SourceFileLoader("run_guest", str(VM / "run-guest"))
    spec = importlib.util.spec_from_loader("run_guest", loader)
    assert spec is not None
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


def test_initramfs_holds_init_busybox_and_console(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if shutil.which("cpio") is None or not Path("/bin/busybox").exists():
        pytest.fail("cpio or busybox-static missing (scripts/test-all installs both)")
    mod = _run_guest()
    monkeypatch.setattr(mod, "CACHE", tmp_path)
    image = mod.initramfs()
    assert image == mod.initramfs()  # cached: the same file, which the in-guest kexec reuses
    listing = subprocess.run(["cpio", "-t", "-v", "--quiet"], input=gzip.decompress(image.read_bytes()),
                             capture_output=True, check=True).stdout.decode()
    names = {line.split()[-1]: line for line in listing.splitlines()}
    assert {"init", "bin/busybox", "dev/console"} <= set(names)
    assert names["init"].startswith("-rwx")
    assert names["dev/console"].startswith("c")
    assert (VM / "init").read_bytes().startswith(b"#!/bin/busybox sh\n")


def test_guest_scripts_parse() -> None:
    for name in ("guest-exec", "guest-kexec", "guest-steps", "build-kernel", "check-config", "init"):
        shell = ["/bin/busybox", "sh"] if name == "init" else ["bash"]
        r = subprocess.run([*shell, "-n", str(VM / name)], capture_output=True, text=True)
        assert r.returncode == 0, f"{name}: {r.stderr}"
    r = subprocess.run([sys.executable, str(VM / "run-guest"), "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--timeout" in r.stdout
