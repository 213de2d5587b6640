"""Caller-memory backends without a kernel device: process_vm on ourselves, and the retry protocol's rounds."""

from __future__ import annotations

import ctypes
import errno
import os
import struct

import pytest

from cusedev.device.memory import CUSE_MAX_IOCTL_BYTES, ProcessVmMemory, RetryMemory
from cusedev.device.seam import NeedRetry


def test_process_vm_read_write_fault() -> None:
    buf = ctypes.create_string_buffer(b"abcdefgh" * 2)
    addr = ctypes.addressof(buf)
    m = ProcessVmMemory(os.getpid())
    assert m.read(addr, 8) == b"abcdefgh"
    assert m.peek(addr, 12, 4) == b"abcdefghabcd"
    m.write(addr + 2, b"XY")
    assert buf.raw[:4] == b"abXY"
    for op in (lambda: m.read(0, 4), lambda: m.write(0, b"x"), lambda: m.peek(0, 24, 4)):
        with pytest.raises(OSError) as e:
            op()
        assert e.value.errno == errno.EFAULT


def test_process_vm_vanished_thread_is_efault() -> None:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    with pytest.raises(OSError) as e:
        ProcessVmMemory(pid).read(0x1000, 4)
    assert e.value.errno == errno.EFAULT


def _get_state_like(mem, arg: int) -> int:  # type: ignore[no-untyped-def]
    """What an ABI op does: size word, declare, copy in, write the output field."""
    (size,) = struct.unpack("I", mem.peek(arg, 8, 4)[:4])
    mem.declare((arg, size), (arg, min(size, 8)))
    data = mem.read(arg, size)
    assert len(data) == size
    mem.write(arg + 4, struct.pack("I", 1))
    return 0


def test_retry_rounds() -> None:
    arg = 0x7000_0000
    caller = struct.pack("II", 8, 0)
    with pytest.raises(NeedRetry) as r:
        _get_state_like(RetryMemory(1), arg)
    assert (r.value.in_ranges, r.value.out_ranges) == ([(arg, 4)], [])
    with pytest.raises(NeedRetry) as r:
        _get_state_like(RetryMemory(1, [(arg, 4)], caller[:4]), arg)
    assert (r.value.in_ranges, r.value.out_ranges) == ([(arg, 8)], [(arg, 8)])  # (arg, 4) is covered
    mem = RetryMemory(1, [(arg, 8)], caller, [(arg, 8)])
    assert _get_state_like(mem, arg) == 0
    assert mem.out_payload() == struct.pack("II", 8, 1)  # untouched bytes go back as they came


def test_retry_too_big_falls_back_to_process_vm() -> None:
    """Over CUSE's 32-page cap the kernel would answer ENOMEM: such ranges go through process_vm."""
    size = CUSE_MAX_IOCTL_BYTES + 4096
    buf = ctypes.create_string_buffer(size)
    struct.pack_into("I", buf, 0, size)
    arg = ctypes.addressof(buf)
    mem = RetryMemory(os.getpid(), [(arg, 4)], struct.pack("I", size))
    with pytest.raises(NeedRetry) as r:
        _get_state_like(mem, arg)
    assert r.value.in_ranges == [(arg, 4)] and r.value.out_ranges == [(arg, 8)]  # big one not asked
    mem = RetryMemory(os.getpid(), [(arg, 4)], struct.pack("I", size), [(arg, 8)])
    assert _get_state_like(mem, arg) == 0
    assert mem.out_payload()[4:8] == struct.pack("I", 1)


def test_retry_write_outside_declared_goes_direct() -> None:
    buf = ctypes.create_string_buffer(8)
    mem = RetryMemory(os.getpid())
    mem.write(ctypes.addressof(buf), b"ok")
    assert buf.raw[:2] == b"ok" and mem.out_payload() == b""


@pytest.mark.parametrize("size, rounds, err", [(8, 2, 0), (12, 2, 0), (6, 1, errno.EINVAL)])
def test_dispatch_over_retry_rounds_as_traced(size: int, rounds: int, err: int) -> None:
    """The real ABI table over CUSE-style rounds, seen through the tracer's wrapper: how many
    rounds the kernel is asked for, the reply payload, and what the trace records (size, in, out)."""
    from cusedev.device.dispatch import dispatch
    from cusedev.profiles.v3.model import LiveUpdateCore
    from cusedev.profiles.v3.profile import DEVICE as OPS
    from cusedev.tracing.record import Seen
    from cusedev.uapi import LIVEUPDATE_IOCTL_GET_STATE as GS

    class Ctx:
        core = model = LiveUpdateCore()

    arg = 0x7000_0000
    caller = struct.pack("=II", size, 0)[:size] + bytes(max(0, size - 8))
    mem, asked, got = RetryMemory(1), 0, 0
    while True:
        seen = Seen(mem, arg, mem.direct)
        try:
            dispatch(OPS, Ctx(), None, GS, arg, seen)
            break
        except NeedRetry as r:
            asked += 1
            assert asked < 5
            data = b"".join(caller[a - arg:a - arg + n] for a, n in r.in_ranges)
            mem = RetryMemory(1, r.in_ranges, data, r.out_ranges)
        except OSError as e:
            got = e.errno
            break
    assert (asked, got) == (rounds, err)
    n = min(size, 8)
    assert seen.seen(OPS, GS)[1:] == (size, caller[:n] if size >= 8 else caller[:4])
    if not err:
        assert mem.out_payload() == struct.pack("=II", size, 1)[:n]
        assert bytes(seen.out or b"") == struct.pack("=II", size, 1)[:n]
