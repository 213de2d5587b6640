"""The README's first command, verbatim, in a clean Debian 12 root (issue 13, "How we will know").

``scripts/check-fresh-debian`` does the work (see its header): a debootstrap'ed bookworm with only
Debian's python3, cached in /var/lib/cusedev-vm/deb12 and used through a throw-away overlay; inside
a private mount namespace it runs ``scripts/install && cusedev serve`` in a copy of this checkout,
asks the device for its state as a client would, and stops the emulator with SIGTERM.  The first
run on a machine pays the debootstrap (~2–3 min); later runs ~25 s (apt python3-venv, pip).
Host phase only: it needs the network (apt, the package index) and its own kernel mounts.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_readme_first_command_on_fresh_debian() -> None:
    readme = (REPO / "README.md").read_text()
    assert "\nscripts/install && cusedev serve\n" in readme, "the README's first command changed: update the check"
    p = subprocess.run([str(REPO / "scripts/check-fresh-debian")], capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    assert "a client asked /dev/liveupdate: state normal" in p.stderr
    assert "python3 is externally managed" in p.stderr  # it really was Debian's PEP 668 python
    with open("/proc/self/mounts") as f:
        assert "cusedev-fresh" not in f.read()
