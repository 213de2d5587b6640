"""Table-driven ioctl dispatch, in the order of the kernel's luo_ioctl() (spec section 2).

A profile is a tuple of ``Op`` rows indexed by command nr.  ``dispatch`` does
the generic steps (nr range, read size, match cmd, min size, copy in with the
zero-tail rule, write back min(size, sizeof)); handlers only see decoded
field values and never touch user memory.  A second ABI profile is a second
table.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .. import uapi
from ..libc import fail
from .seam import CallerMemory

_U32 = struct.Struct("=I")
_TAIL_CHUNK = 1 << 16

Handler = Callable[[Any, Any, tuple], "dict[str, int] | None"]


@dataclass(frozen=True, slots=True)
class Op:
    """One row of an ABI table: the kernel's ``IOCTL_OP(cmd, fn, struct, last)``."""

    nr: int
    cmd: int
    name: str
    ctype: str
    size: int  # sizeof(struct)
    min_size: int  # offset of the end of the last required field
    unpack: Callable[[bytes], tuple]
    names: tuple[str, ...]
    outputs: dict[str, tuple[int, struct.Struct]]  # field -> (offset, codec) written back
    handler: Handler


def _prim(ctype: Any) -> struct.Struct:
    signed = ctype.cname.startswith("int") or ctype.cname in ("int", "long", "short", "char", "signed char")
    code = {1: "b", 2: "h", 4: "i", 8: "q"}[uapi.ffi.sizeof(ctype)]
    return struct.Struct("=" + (code if signed else code.upper()))


def make_op(
    type_: int,
    nr: int,
    name: str,
    ctype: str,
    last_required: str,
    handler: Handler,
    outputs: Sequence[str] = (),
) -> Op:
    """Build a row from the cdefs: sizes, offsets and the ioctl number all come from cffi."""
    fields = dict(uapi.ffi.typeof(ctype).fields)
    last = fields[last_required]
    codec = uapi.codec(ctype)
    return Op(
        nr=nr,
        cmd=uapi.IO(type_, nr),
        name=name,
        ctype=ctype,
        size=uapi.ffi.sizeof(ctype),
        min_size=last.offset + uapi.ffi.sizeof(last.type),
        unpack=codec.struct.unpack,
        names=tuple(codec.names),
        outputs={f: (fields[f].offset, _prim(fields[f].type)) for f in outputs},
        handler=handler,
    )


def _check_zero_tail(mem: CallerMemory, addr: int, length: int) -> None:
    """copy_struct_from_user's tail rule: E2BIG on a non-zero byte, EFAULT where unreadable first."""
    end = addr + length
    while addr < end:
        n = min(_TAIL_CHUNK - (addr % _TAIL_CHUNK), end - addr)
        try:
            chunk = mem.read(addr, n)
        except OSError:
            # find the readable prefix page by page, so a non-zero byte before the hole wins
            page = 4096
            p = addr
            while p < addr + n:
                m = min(page - (p % page), addr + n - p)
                try:
                    part = mem.read(p, m)
                except OSError:
                    raise fail(errno.EFAULT) from None
                if part.count(0) != len(part):
                    raise fail(errno.E2BIG) from None
                p += m
            raise
        if chunk.count(0) != len(chunk):
            raise fail(errno.E2BIG)
        addr += n


def dispatch(table: Sequence[Op], ctx: Any, caller: Any, cmd: int, arg: int, mem: CallerMemory) -> int:
    """Run one ioctl against ``table``; returns 0 or raises OSError(errno).

    Every access to the caller goes through ``mem``, so a tracer learns what
    the call saw (size, struct in, bytes out) by wrapping ``mem``; nothing here
    pays for tracing.
    """
    nr = cmd & 0xFF
    if nr >= len(table):
        raise fail(errno.EINVAL)
    op = table[nr]
    size_of = op.size
    data = mem.peek(arg, size_of, 4)
    (size,) = _U32.unpack_from(data)
    if cmd != op.cmd:
        raise fail(errno.ENOTTY)
    if size < op.min_size:
        raise fail(errno.EINVAL)
    if size == size_of and len(data) == size_of:  # the common case: the caller's struct is ours
        n = size
        if op.outputs and not mem.direct:
            mem.declare((arg, size), (arg, size))
    else:
        n = size if size < size_of else size_of
        mem.declare((arg, size), (arg, n) if op.outputs else None)
        if size > size_of:
            _check_zero_tail(mem, arg + size_of, size - size_of)
        if len(data) < n:
            data = mem.read(arg, n)
        elif len(data) > n:
            data = data[:n]
        if n < size_of:
            data = data + bytes(size_of - n)
    out = op.handler(ctx, caller, op.unpack(data))
    if out:
        buf = bytearray(data)
        outputs = op.outputs
        for fname in out:
            off, codec = outputs[fname]
            codec.pack_into(buf, off, out[fname])
        mem.write(arg, buf if n == size_of else buf[:n])
    return 0
