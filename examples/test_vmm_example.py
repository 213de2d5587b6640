"""How a VMM project tests its live-update code with cusedev's pytest fixtures.

``pip install cusedev`` registers the plugin (entry point ``pytest11``); then
``pytest`` (as root, with /dev/cuse or /dev/fuse) gives every test a fresh
emulator: ``liveupdate_emulator`` (a ``cusedev.Emulator``) and
``liveupdate_device`` (an open ``cusedev.client.LiveUpdateDevice`` on it).
Tests run in parallel with pytest-xdist; a failing test's report shows the
tail of the emulator's ioctl trace.

The "VMM" here is a few functions; a real project would call its own code
(or run its binary under ``emulator.run([...])``).
"""

from __future__ import annotations

import errno
import os
import sys

import pytest

from cusedev.client import LiveUpdateDevice, State

GUEST_RAM_TOKEN = 0x5EED
GUEST_RAM = b"guest memory page " * 4096  # ~72 KiB

# What the VMM runs in the new "kernel": restore its guest RAM and check it (under `cusedev run`,
# FD_RESTORE installs a real fd in this process, as the kernel would).
RESTORE_SNIPPET = f"""
import os, sys
from cusedev.client import LiveUpdateDevice
with LiveUpdateDevice(sys.argv[1]) as dev:
    fd = dev.restore({GUEST_RAM_TOKEN:#x})
    data = os.pread(fd, os.fstat(fd).st_size, 0)
    assert data == {GUEST_RAM!r}, "guest RAM differs"
    dev.finish()
    print("restored", len(data), "bytes; state", dev.state.label)
"""


def vmm_save_guest(dev: LiveUpdateDevice) -> int:
    """The VMM side before the update: guest RAM in a memfd, preserved, then PREPARE."""
    ram = os.memfd_create("guest-ram")
    os.write(ram, GUEST_RAM)
    dev.preserve(ram, GUEST_RAM_TOKEN)
    dev.prepare()
    return ram


def test_guest_ram_survives_live_update(liveupdate_emulator, liveupdate_device) -> None:
    emu = liveupdate_emulator
    vmm_save_guest(liveupdate_device)
    assert liveupdate_device.state == State.PREPARED

    result = emu.kexec()  # reboot(LINUX_REBOOT_CMD_KEXEC) on the emulated machine
    assert result["live"] and result["update_count"] == 1
    with pytest.raises(OSError) as e:  # the old "kernel"'s handles are gone
        liveupdate_device.state  # noqa: B018
    assert e.value.errno == errno.ENODEV

    st = emu.status()
    assert st["state"] == "updated" and [f["token"] for f in st["incoming"]] == [GUEST_RAM_TOKEN]
    p = emu.run([sys.executable, "-c", RESTORE_SNIPPET, emu.path], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert f"restored {len(GUEST_RAM)} bytes; state normal" in p.stdout
    assert emu.status()["state"] == "normal"

    # the trace tells what the VMM did, call by call
    calls = [r["name"] for r in emu.trace_records() if r.get("type") == "ioctl"]
    assert calls[:2] == ["LIVEUPDATE_IOCTL_FD_PRESERVE", "LIVEUPDATE_IOCTL_SET_EVENT"]


@pytest.mark.liveupdate(in_process=True)  # no kexec across processes needed: the cheaper in-process emulator
def test_vmm_survives_a_failed_freeze(liveupdate_emulator, liveupdate_device) -> None:
    emu = liveupdate_emulator
    emu.inject("kexec:error=EIO")  # a subsystem refuses to freeze during reboot()
    vmm_save_guest(liveupdate_device)
    with pytest.raises(OSError) as e:
        emu.kexec()
    assert e.value.errno == errno.EIO
    # the kernel rolls back: state normal, the file still registered and usable for another try
    assert liveupdate_device.state == State.NORMAL
    assert liveupdate_device.fd_state(GUEST_RAM_TOKEN) == State.NORMAL

    emu.clear_injections()
    emu.inject("FD_PRESERVE:error=ENOSPC")  # the next preserve fails as the kernel could
    with pytest.raises(OSError) as e:
        liveupdate_device.preserve(os.memfd_create("more"), GUEST_RAM_TOKEN + 1)
    assert e.value.errno == errno.ENOSPC
