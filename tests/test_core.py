"""Unit tests of the pure core and the table dispatcher, in addition to the real-syscall tests."""

from __future__ import annotations

import errno
import struct

import pytest

from cusedev import uapi
from cusedev.device.dispatch import dispatch
from cusedev.profiles.v3.model import Event, LiveUpdateCore, State
from cusedev.profiles.v3.profile import DEVICE


class FakeFile:
    def __init__(self, size: int = 4096, fail_on: str = ""):
        self.size = size
        self.fail_on = fail_on
        self.calls: list[str] = []
        self.released = False

    def _do(self, what: str) -> None:
        self.calls.append(what)
        if what == self.fail_on:
            raise OSError(errno.EIO, "injected")

    def prepare(self) -> None:
        self._do("prepare")
        if self.size == 0:
            raise OSError(errno.EINVAL, "empty")

    def freeze(self) -> None:
        self._do("freeze")

    def cancel(self) -> None:
        self._do("cancel")

    def finish(self) -> None:
        self._do("finish")

    def release(self) -> None:
        assert not self.released, "released twice"
        self.released = True


def errno_of(fn, *a) -> int:
    with pytest.raises(OSError) as ei:
        fn(*a)
    return ei.value.errno


def test_global_cycle_and_counter() -> None:
    c = LiveUpdateCore()
    f = FakeFile()
    c.preserve(1, lambda: f)
    c.event(Event.PREPARE)
    assert c.state == State.PREPARED and c.outgoing[1].state == State.PREPARED
    assert c.kexec() is True
    assert c.state == State.UPDATED and c.update_count == 1
    assert c.incoming[1].state == State.UPDATED and not c.outgoing
    assert errno_of(c.event, Event.PREPARE) == errno.EINVAL
    c.event(Event.FINISH)
    assert c.state == State.NORMAL and not c.incoming and f.released
    assert c.kexec() is False and c.update_count == 0


def test_kho_quirks() -> None:
    c = LiveUpdateCore()
    assert errno_of(c.event, Event.CANCEL) == errno.ENOENT
    c.kho_finalized = True
    assert errno_of(c.event, Event.PREPARE) == errno.EEXIST
    assert c.state == State.PREPARED
    c.event(Event.CANCEL)
    assert c.state == State.NORMAL and not c.kho_finalized
    assert errno_of(c.event, Event.FREEZE) == errno.EINVAL
    assert errno_of(c.event, 99) == errno.EINVAL
    assert errno_of(c.event, Event.FINISH) == errno.EINVAL


def test_prepare_rolls_back() -> None:
    c = LiveUpdateCore()
    good, empty = FakeFile(), FakeFile(size=0)
    c.preserve(1, lambda: good)
    c.preserve(2, lambda: empty)
    assert errno_of(c.event, Event.PREPARE) == errno.EINVAL
    assert c.state == State.NORMAL and good.calls == ["prepare", "cancel"]
    assert c.outgoing[1].state == State.NORMAL


def test_failed_freeze_returns_to_normal() -> None:
    c = LiveUpdateCore()
    a, b = FakeFile(), FakeFile(fail_on="freeze")
    c.preserve(1, lambda: a)
    c.preserve(2, lambda: b)
    c.event(Event.PREPARE)
    assert errno_of(c.kexec) == errno.EIO
    assert c.state == State.NORMAL and all(pf.state == State.NORMAL for pf in c.outgoing.values())
    assert not a.released and not b.released


def test_file_events_and_restore_rules() -> None:
    c = LiveUpdateCore()
    f = FakeFile()
    c.preserve(7, lambda: f)
    assert errno_of(c.preserve, 7, FakeFile) == errno.EEXIST
    assert errno_of(c.file_event, 8, Event.PREPARE) == errno.ENOENT
    assert errno_of(c.file_event, 7, Event.FINISH) == errno.EBUSY
    assert errno_of(c.file_event, 7, 9) == errno.EINVAL
    c.file_event(7, Event.FREEZE)  # NORMAL: no-op
    assert c.file_state(7, False) == State.NORMAL
    c.file_event(7, Event.PREPARE)
    c.file_event(7, Event.FREEZE)
    assert c.file_state(7, False) == State.FROZEN
    c.file_event(7, Event.CANCEL)
    assert c.file_state(7, False) == State.NORMAL
    assert errno_of(c.restore, 7) == errno.EBUSY
    c.event(Event.PREPARE)
    assert errno_of(c.unpreserve, 7) == errno.EBUSY
    assert errno_of(c.preserve, 8, FakeFile) == errno.EBUSY
    c.kexec()
    assert errno_of(c.restore, 8) == errno.ENOENT
    pf = c.restore(7)
    c.mark_restored(pf)
    assert errno_of(c.restore, 7) == errno.EINVAL
    c.file_event(7, Event.FINISH)
    assert c.file_state(7, True) == State.NORMAL


class FakeMemory:
    """Caller memory as a bytearray at address 0x1000; anything else faults."""

    BASE = 0x1000
    direct = True

    def __init__(self, data: bytes):
        self.buf = bytearray(data)

    def _span(self, addr: int, n: int) -> slice:
        if addr < self.BASE or addr + n > self.BASE + len(self.buf):
            raise OSError(errno.EFAULT, "fault")
        return slice(addr - self.BASE, addr - self.BASE + n)

    def peek(self, addr: int, want: int, need: int) -> bytes:
        try:
            return bytes(self.buf[self._span(addr, want)])
        except OSError:
            return bytes(self.buf[self._span(addr, need)])

    def read(self, addr: int, n: int) -> bytes:
        return bytes(self.buf[self._span(addr, n)])

    def declare(self, in_range, out_range) -> None:
        return None

    def write(self, addr: int, data: bytes) -> None:
        self.buf[self._span(addr, len(data))] = data


class Ctx:
    def __init__(self) -> None:
        self.core = self.model = LiveUpdateCore()


def call(cmd: int, data: bytes, ctx: Ctx | None = None, addr: int = FakeMemory.BASE) -> tuple[int, bytes]:
    mem = FakeMemory(data)
    try:
        dispatch(DEVICE, ctx or Ctx(), None, cmd, addr, mem)
        return 0, bytes(mem.buf)
    except OSError as e:
        return e.errno, bytes(mem.buf)


GS = uapi.LIVEUPDATE_IOCTL_GET_STATE


@pytest.mark.parametrize(
    ("cmd", "data", "addr", "want"),
    [
        (uapi.IO(0xBA, 7), struct.pack("=II", 8, 0), FakeMemory.BASE, errno.EINVAL),
        (uapi.IO(0x42, 9), b"", 0, errno.EINVAL),  # nr checked before the pointer and the type
        (GS, b"", 0, errno.EFAULT),
        (uapi.IO(0x42, 3), struct.pack("=II", 8, 0), FakeMemory.BASE, errno.ENOTTY),
        (uapi.IOR(0xBA, 3, 8), struct.pack("=II", 8, 0), FakeMemory.BASE, errno.ENOTTY),
        (GS, struct.pack("=II", 7, 0), FakeMemory.BASE, errno.EINVAL),
        (GS, struct.pack("=III", 12, 0, 1), FakeMemory.BASE, errno.E2BIG),
        (GS, struct.pack("=III", 16, 0, 0), FakeMemory.BASE, errno.EFAULT),
        (GS, struct.pack("=I", 8), FakeMemory.BASE, errno.EFAULT),
    ],
)
def test_dispatch_order(cmd: int, data: bytes, addr: int, want: int) -> None:
    assert call(cmd, data, addr=addr)[0] == want


def test_writeback_is_min_size_and_keeps_padding() -> None:
    rc, out = call(GS, struct.pack("=IIII", 16, 0xFFFF, 0, 0))
    assert rc == 0 and out == struct.pack("=IIII", 16, 1, 0, 0)
    ctx = Ctx()
    ctx.core.preserve(5, FakeFile)
    raw = struct.pack("=IB3sQI4s", 24, 0, b"\xaa\xbb\xcc", 5, 0, b"\x11\x22\x33\x44")
    rc, out = call(uapi.LIVEUPDATE_IOCTL_GET_FD_STATE, raw, ctx)
    assert rc == 0 and out == struct.pack("=IB3sQI4s", 24, 0, b"\xaa\xbb\xcc", 5, 1, b"\x11\x22\x33\x44")
    # size 16 (min_size): the state field lies beyond what the caller owns and is not written
    rc, out = call(uapi.LIVEUPDATE_IOCTL_GET_FD_STATE, struct.pack("=IIQ", 16, 0, 5) + b"\xee" * 8, ctx)
    assert rc == 0 and out[16:] == b"\xee" * 8
