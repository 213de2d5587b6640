"""Dispatch of one ioctl on an open file of a given kind, in the order of luo_ioctl / luo_session_ioctl.

The steps (spec luo-session.md section 3): nr range against the kind's base
and table (EINVAL), the size word (EFAULT), the exact command (ENOTTY), the
kind's own check (7.2: wrong session kind, EINVAL), the minimum size (EINVAL),
the zero tail (E2BIG), the handler, the write-back of ``min(size, sizeof)``
bytes.  A handler may return an awaitable (it opens the emulator's own node);
the write-back then happens when it completes.  Output fields may be ints or
byte arrays (``name[64]``).
"""

from __future__ import annotations

import errno
import inspect
import struct
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from ...device.dispatch import Op
from ...device.seam import CallerMemory
from ...libc import fail

_U32 = struct.Struct("=I")
_PAGE = 4096


def _zero_tail(mem: CallerMemory, addr: int, length: int) -> None:
    """copy_struct_from_user: E2BIG on a non-zero byte, EFAULT at the first unreadable page."""
    end = addr + length
    while addr < end:
        n = min(_PAGE - (addr % _PAGE), end - addr)
        try:
            part = mem.read(addr, n)
        except OSError:
            raise fail(errno.EFAULT) from None
        if part.count(0) != len(part):
            raise fail(errno.E2BIG)
        addr += n


def _write_back(op: Op, data: bytes, n: int, out: Mapping[str, Any] | None, mem: CallerMemory, arg: int) -> int:
    if out:
        buf = bytearray(data)
        for fname, value in out.items():
            off, codec = op.outputs[fname]
            codec.pack_into(buf, off, value)
        try:
            mem.write(arg, bytes(buf[:n]))
        except OSError:
            undo = getattr(out, "undo", None)
            if undo is not None:
                undo()
            raise
    return 0


async def _later(aw: Awaitable[Mapping[str, Any] | None], op: Op, data: bytes, n: int, mem: CallerMemory,
                 arg: int) -> int:  # fmt: skip
    return _write_back(op, data, n, await aw, mem, arg)


def dispatch_kind(
    base: int,
    table: Sequence[Op],
    check: Callable[[Any, Op], None] | None,
    file: Any,
    caller: Any,
    cmd: int,
    arg: int,
    mem: CallerMemory,
) -> int | Awaitable[int]:
    """Run one ioctl on ``file`` against its kind's table; 0, an awaitable of 0, or OSError(errno)."""
    nr = (cmd & 0xFF) - base
    if nr < 0 or nr >= len(table):
        raise fail(errno.EINVAL)
    op = table[nr]
    size_of = op.size
    data = mem.peek(arg, size_of, 4)
    (size,) = _U32.unpack_from(data)
    if cmd != op.cmd:
        raise fail(errno.ENOTTY)
    if check is not None:
        check(file, op)
    if size < op.min_size:
        raise fail(errno.EINVAL)
    n = min(size, size_of)
    mem.declare((arg, size), (arg, n) if op.outputs else None)
    if size > size_of:
        _zero_tail(mem, arg + size_of, size - size_of)
    if len(data) < n:
        data = mem.read(arg, n)
    data = bytes(data[:n]) + bytes(size_of - n)
    out = op.handler(file, caller, op.unpack(data))
    if inspect.isawaitable(out):
        return _later(out, op, data, n, mem, arg)
    return _write_back(op, data, n, out, mem, arg)
