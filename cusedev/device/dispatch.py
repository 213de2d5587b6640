"""Table-driven ioctl dispatch, in the kernel's order of checks (luo_ioctl, luo_session_ioctl).

Each kind of open file has a table of ``Op`` rows and a command base.  ``dispatch``
does the generic steps: nr range against the base (EINVAL), read the size word
(EFAULT), exact cmd (ENOTTY), the kind's own check (7.2's kind check), min size
(EINVAL), copy in with the zero-tail rule (E2BIG, EFAULT), run the handler, write
back ``min(size, sizeof)`` bytes.  Handlers only see decoded field values (byte
arrays as ``bytes``) and never touch user memory; one may return an awaitable,
and the write-back then happens when it completes.
"""

from __future__ import annotations

import errno
import inspect
import struct
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from .. import uapi
from ..libc import fail
from .seam import Caller, CallerMemory

U32 = struct.Struct("=I")
_unpack_u32 = U32.unpack_from
_TAIL_CHUNK = 1 << 16

#: ``handler(file, caller, values)`` -> output fields, None, or an awaitable of either
Handler = Callable[[Any, Caller, tuple], Any]


@dataclass(frozen=True, slots=True)
class Op:
    """One row of an ioctl table: the kernel's ``IOCTL_OP(cmd, fn, struct, last)``."""

    nr: int  # _IOC_NR(cmd), the base included
    cmd: int
    name: str
    ctype: str
    size: int  # sizeof(struct)
    min_size: int  # offset of the end of the last required field
    unpack: Callable[[bytes], tuple]
    names: tuple[str, ...]
    outputs: dict[str, tuple[int, struct.Struct]]  # field -> (offset, codec) written back
    handler: Handler


class Table(Protocol):
    """What dispatch needs of an open file's kind (``cusedev.profiles.base.Kind``)."""

    @property
    def base(self) -> int: ...

    @property
    def ops(self) -> Sequence[Op]: ...

    @property
    def check(self) -> Callable[[Any, Op], None] | None: ...


def field_struct(ffi: Any, ctype: Any) -> struct.Struct:
    """The codec of one field: an integer, or a byte array (``__u8 name[64]``) as one ``bytes``."""
    if ctype.kind == "array":
        if ctype.item.kind != "primitive" or ffi.sizeof(ctype.item) != 1 or ctype.length is None:
            raise TypeError(f"{ctype.cname}: only byte arrays are supported as ioctl fields")
        return struct.Struct(f"={ctype.length}s")
    signed = int(ffi.cast(ctype, -1)) < 0
    code = {1: "b", 2: "h", 4: "i", 8: "q"}[ffi.sizeof(ctype)]
    return struct.Struct("=" + (code if signed else code.upper()))


def struct_format(ffi: Any, ctype: str) -> tuple[str, tuple[str, ...]]:
    """A ``struct`` format for a flat ioctl struct (integers and byte arrays) and its field names."""
    tp = ffi.typeof(ctype)
    parts, names, pos = ["="], [], 0
    for name, fld in tp.fields:
        if fld.offset > pos:
            parts.append(f"{fld.offset - pos}x")
        parts.append(field_struct(ffi, fld.type).format.lstrip("="))
        names.append(name)
        pos = fld.offset + ffi.sizeof(fld.type)
    if ffi.sizeof(tp) > pos:
        parts.append(f"{ffi.sizeof(tp) - pos}x")
    return "".join(parts), tuple(names)


def make_op(
    type_: int,
    nr: int,
    name: str,
    ctype: str,
    last_required: str,
    handler: Handler,
    outputs: Sequence[str] = (),
    ffi: Any = None,
) -> Op:
    """Build a row from the cdefs (``ffi``: the profile's, default the generic one): sizes, offsets
    and the ioctl number all come from cffi."""
    ffi = uapi.ffi if ffi is None else ffi
    fields = dict(ffi.typeof(ctype).fields)
    last = fields[last_required]
    fmt, names = struct_format(ffi, ctype)
    codec = struct.Struct(fmt)
    assert codec.size == ffi.sizeof(ctype), (ctype, fmt)
    return Op(
        nr=nr,
        cmd=uapi.IO(type_, nr),
        name=name,
        ctype=ctype,
        size=ffi.sizeof(ctype),
        min_size=last.offset + ffi.sizeof(last.type),
        unpack=codec.unpack,
        names=names,
        outputs={f: (fields[f].offset, field_struct(ffi, fields[f].type)) for f in outputs},
        handler=handler,
    )


def check_zero_tail(mem: CallerMemory, addr: int, length: int) -> None:
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


def op_for(table: Table, cmd: int) -> Op | None:
    """The row ``cmd`` lands on by its nr (not yet checked against the exact cmd), or None."""
    nr = (cmd & 0xFF) - table.base
    ops = table.ops
    return ops[nr] if 0 <= nr < len(ops) else None


def _copy_in(table: Table, file: Any, cmd: int, arg: int, mem: CallerMemory) -> tuple[Op, bytes, int]:
    """Every step before the handler: (row, struct bytes padded to sizeof, bytes to write back)."""
    nr = (cmd & 0xFF) - table.base
    ops = table.ops
    if nr < 0 or nr >= len(ops):
        raise fail(errno.EINVAL)
    op = ops[nr]
    size_of = op.size
    data = mem.peek(arg, size_of, 4)
    (size,) = U32.unpack_from(data)
    if cmd != op.cmd:
        raise fail(errno.ENOTTY)
    check = table.check
    if check is not None:
        check(file, op)
    if size < op.min_size:
        raise fail(errno.EINVAL)
    if size == size_of and len(data) == size_of:  # the common case: the caller's struct is ours
        if op.outputs and not mem.direct:
            mem.declare((arg, size), (arg, size))
        return op, data, size
    n = size if size < size_of else size_of
    mem.declare((arg, size), (arg, n) if op.outputs else None)
    if size > size_of:
        check_zero_tail(mem, arg + size_of, size - size_of)
    if len(data) < n:
        data = mem.read(arg, n)
    elif len(data) > n:
        data = data[:n]
    if n < size_of:
        data = data + bytes(size_of - n)
    return op, data, n


def touch(table: Table, file: Any, cmd: int, arg: int, mem: CallerMemory) -> None:
    """The memory steps of a call without its handler: a CUSE retry round happens now (a delayed
    call asks for its memory before it sleeps); errors are left for the real call."""
    try:
        _copy_in(table, file, cmd, arg, mem)
    except OSError:
        return


def _write_back(op: Op, out: Mapping[str, Any], data: bytes, n: int, arg: int, mem: CallerMemory) -> None:
    buf = bytearray(data)
    outputs = op.outputs
    for fname in out:
        off, codec = outputs[fname]
        codec.pack_into(buf, off, out[fname])
    try:
        mem.write(arg, buf if n == op.size else buf[:n])
    except OSError:
        undo = getattr(out, "undo", None)
        if undo is not None:
            undo()
        raise


async def _later(aw: Awaitable[Any], op: Op, data: bytes, n: int, arg: int, mem: CallerMemory) -> int:
    out = await aw
    if out:
        _write_back(op, out, data, n, arg, mem)
    return 0


def dispatch(table: Table, file: Any, caller: Caller, cmd: int, arg: int, mem: CallerMemory) -> int | Awaitable[int]:
    """Run one ioctl of an open file of ``table``'s kind; returns 0 (or an awaitable of it) or raises
    OSError(errno).

    Every access to the caller goes through ``mem``, so a tracer learns what the call saw (size,
    struct in, bytes out) by wrapping ``mem``; nothing here pays for tracing.
    """
    # _copy_in, inlined: this is every ioctl's path
    nr = (cmd & 0xFF) - table.base
    ops = table.ops
    if nr < 0 or nr >= len(ops):
        raise fail(errno.EINVAL)
    op = ops[nr]
    size_of = op.size
    data = mem.peek(arg, size_of, 4)
    (size,) = _unpack_u32(data)
    if cmd != op.cmd:
        raise fail(errno.ENOTTY)
    check = table.check
    if check is not None:
        check(file, op)
    if size < op.min_size:
        raise fail(errno.EINVAL)
    if size == size_of and len(data) == size_of:  # the common case: the caller's struct is ours
        n = size
        if op.outputs and not mem.direct:
            mem.declare((arg, size), (arg, size))
    else:
        op, data, n = _copy_in(table, file, cmd, arg, mem)
    out = op.handler(file, caller, op.unpack(data))
    if out is None:
        return 0
    if type(out) is not dict and inspect.isawaitable(out):
        return _later(out, op, data, n, arg, mem)
    if out:
        _write_back(op, out, data, n, arg, mem)
    return 0
