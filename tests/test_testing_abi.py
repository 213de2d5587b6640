"""The testing API speaks every profile (issue 14, item 4): ``Emulator(abi=...)`` and the fixtures' ``abi``.

Through real syscalls on the run's transport: the fixture's emulator serves
the session profile, its ``liveupdate_device`` is a ``SessionDevice``, and a
memfd preserved in a session comes back with the same bytes after
``emulator.kexec()``.  In-process, this process's own calls get their session
fds installed directly; a subprocess emulator needs ``emulator.run()``.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest

from cusedev import Emulator
from cusedev.profiles.session.client import SessionDevice

pytestmark = pytest.mark.vm

PAYLOAD = b"guest RAM page\0" * 300


def _memfd(data: bytes) -> int:
    m = os.memfd_create("ram")
    os.write(m, data)
    return m


def _read_all(fd: int) -> bytes:
    return os.pread(fd, 1 << 20, 0)


def test_unknown_abi_is_named() -> None:
    with pytest.raises(ValueError, match=r"unknown ABI profile 'nope'.*7\.2"):
        Emulator(abi="nope")


def test_default_abi_is_v3(liveupdate_emulator: Emulator, liveupdate_device: object) -> None:
    from cusedev.client import LiveUpdateDevice

    assert liveupdate_emulator.abi == "v3"
    assert isinstance(liveupdate_device, LiveUpdateDevice)
    assert liveupdate_emulator.status()["abi"] == "v3"


@pytest.mark.parametrize("abi", ["7.2", "6.19"])
def test_in_process_session_carried_across_kexec(abi: str) -> None:
    transport = os.environ.get("CUSEDEV_TEST_TRANSPORT", "fuse").strip().lower() or "fuse"
    with Emulator(transport=transport, in_process=True, abi=abi, sysfs=None) as emu:
        assert emu.status()["abi"] == abi
        dev = emu.open()
        assert isinstance(dev, SessionDevice)
        s = dev.create_session("vm0")
        m = _memfd(PAYLOAD)
        s.preserve(m, 7)
        if abi == "7.2":
            assert s.name == "vm0"
        os.close(m)
        r = emu.kexec()
        assert r["update_count"] == 1
        # the old device and session fds are revoked, as a reboot ends the process that held them
        with pytest.raises(OSError) as e:
            s.preserve(_memfd(b"x"), 8)
        assert e.value.errno == errno.ENODEV
        s.close()
        dev.close()
        with emu.open() as dev2, dev2.retrieve_session("vm0") as back:
            fd = back.retrieve(7)
            try:
                assert _read_all(fd) == PAYLOAD
            finally:
                os.close(fd)
            back.finish()


@pytest.mark.liveupdate(abi="7.2", in_process=True)
def test_fixture_marker_gives_session_profile(liveupdate_emulator: Emulator,
                                              liveupdate_device: SessionDevice) -> None:
    assert isinstance(liveupdate_device, SessionDevice)
    s = liveupdate_device.create_session("marked")
    m = _memfd(PAYLOAD)
    s.preserve(m, 1)
    liveupdate_emulator.kexec()
    with liveupdate_emulator.open() as dev, dev.retrieve_session("marked") as back:
        fd = back.retrieve(1)
        assert _read_all(fd) == PAYLOAD
        os.close(fd)


HOLD = """
import os, sys, time
from cusedev.profiles.session.client import SessionDevice
dev = SessionDevice(sys.argv[1])
s = dev.create_session("vm0")
m = os.memfd_create("ram"); os.write(m, bytes.fromhex(sys.argv[2])); s.preserve(m, 9)
print("held", flush=True)
time.sleep(600)
"""

RESTORE = """
import json, os, sys
from cusedev.profiles.session.client import SessionDevice
dev = SessionDevice(sys.argv[1])
s = dev.retrieve_session("vm0")
fd = s.retrieve(9)
print(json.dumps({"data": os.pread(fd, 1 << 20, 0).hex()}))
s.finish()
"""


@pytest.mark.liveupdate(abi="7.2", trace=False, sysfs=None)
def test_subprocess_emulator_needs_run_for_fds(liveupdate_emulator: Emulator,
                                               liveupdate_device: SessionDevice) -> None:
    emu = liveupdate_emulator
    with pytest.raises(OSError) as e:  # this process is not under `cusedev run`
        liveupdate_device.create_session("vm0")
    assert e.value.errno == errno.EOPNOTSUPP
    liveupdate_device.close()
    holder = emu.popen([sys.executable, "-c", HOLD, emu.path, PAYLOAD.hex()],
                       stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        emu.kexec()  # ends the holder as a reboot would, carrying the session it held
        holder.wait(60)  # `cusedev run` ends with the reboot (status 0: the live update went through)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    out = emu.run([sys.executable, "-c", RESTORE, emu.path], capture_output=True, text=True,
                  check=True, timeout=120)
    assert bytes.fromhex(json.loads(out.stdout.splitlines()[-1])["data"]) == PAYLOAD
    assert emu.status()["update_count"] == 1


USER_TEST = """
import pytest
from cusedev.profiles.session.client import SessionDevice

@pytest.mark.liveupdate(in_process=True, sysfs=None, trace=False)
def test_profile_from_command_line(liveupdate_emulator, liveupdate_device):
    assert liveupdate_emulator.abi == "6.19"
    assert isinstance(liveupdate_device, SessionDevice)
    liveupdate_device.create_session("cli").close()
"""


def test_command_line_abi_default(tmp_path: os.PathLike[str]) -> None:
    """``--cusedev-abi`` gives a user's unmarked tests the profile they target (a pytest run of its own)."""
    test = os.path.join(tmp_path, "test_user.py")
    with open(test, "w") as f:
        f.write(USER_TEST)
    r = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "--cusedev-abi", "6.19",
                        test], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 passed" in r.stdout
