"""Kernel ABI of /dev/liveupdate (LUO v3) and of the FUSE/CUSE wire protocol.

The C declarations live in ``cdefs/*.h`` (package data ``cusedev.cdefs``) so that
one text is both compiled by gcc in the layout tests and parsed here by cffi in
ABI mode: no C compiler is needed at install or run time, and field offsets
come from cffi's layout engine instead of hand-written ``struct`` formats.

cffi is used only at import time.  The hot path (decoding a FUSE request,
encoding a reply) goes through :class:`Codec`, a precompiled ``struct.Struct``
derived from cffi's layout.

Every enum member and every ``#define`` of the cdefs becomes a module-level
``int`` (``uapi.FUSE_IOCTL``, ``uapi.LIVEUPDATE_STATE_NORMAL``, ...).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cffi

__all__ = [
    "CDEF_FILES",
    "CMD_NAMES",
    "Codec",
    "CONSTANTS",
    "EVENT_NAMES",
    "IOC",
    "IOC_DIR",
    "IOC_NONE",
    "IOC_NR",
    "IOC_READ",
    "IOC_SIZE",
    "IOC_TYPE",
    "IOC_WRITE",
    "IO",
    "IOCTL_NAMES",
    "IOCTL_STRUCTS",
    "IOR",
    "IOW",
    "IOWR",
    "LIVEUPDATE_IOCTL_TYPE",
    "LiveupdateIoctl",
    "LUO_IOCTLS",
    "STATE_NAMES",
    "codec",
    "ffi",
    "read_cdef",
]

#: Parse order matters: types.h (cffi-only typedefs) must come first.
CDEF_FILES: tuple[str, ...] = ("types.h", "luo_v3.h", "fuse.h", "seccomp.h")


def _cdefs_dir() -> Any:
    """Locate the headers: installed package data, else the source checkout."""
    try:
        from importlib.resources import files

        root = files("cusedev.cdefs")
        if root.joinpath("luo_v3.h").is_file():
            return root
    except (ModuleNotFoundError, TypeError):
        pass
    return Path(__file__).resolve().parent.parent / "cdefs"


def read_cdef(name: str) -> str:
    """Return the text of one cdefs header (also used by the layout tests)."""
    return _cdefs_dir().joinpath(name).read_text(encoding="utf-8")


def _parse() -> Any:
    """cffi's parse of the cdefs, through a generated out-of-line module when one is cached.

    pycparser is by far the slowest part of starting any cusedev process (about
    15x the rest of this module; seconds under the CI VM's emulated CPU), so the
    first import writes cffi's own serialisation of the parse
    (``set_source(name, None)``: out-of-line ABI mode, no compiler) next to the
    bytecode, keyed by a hash of the cdefs text and the cffi version; later
    imports load that.  Where nothing is writable, every import parses.
    """
    text = "".join(read_cdef(n) for n in CDEF_FILES)
    key = hashlib.sha256((cffi.__version__ + "\0" + text).encode()).hexdigest()[:16]
    name = f"_cusedev_ffi_{key}"
    cache = Path(__file__).resolve().parent / "__pycache__"
    path = cache / f"{name}.py"
    if path.is_file():
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is not None and spec.loader is not None:
            mod = importlib.util.module_from_spec(spec)
            try:
                spec.loader.exec_module(mod)
                return mod.ffi
            except Exception:  # a torn or foreign file: parse instead
                pass
    parsed = cffi.FFI()
    parsed.cdef(text)
    try:
        builder = cffi.FFI()
        builder.cdef(text)
        builder.set_source(name, None)
        cache.mkdir(exist_ok=True)
        tmp = cache / f".{name}.{os.getpid()}.tmp"
        builder.emit_python_code(str(tmp))
        os.replace(tmp, path)
    except OSError:
        pass
    return parsed


ffi = _parse()
# a freshly parsed FFI raises CDefError for an unknown type name, the out-of-line one ffi.error
_LOOKUP_ERRORS: tuple[type[Exception], ...] = (cffi.CDefError, *((ffi.error,) if hasattr(ffi, "error") else ()))

# ABI-mode library object: only used to enumerate the integer constants (enum
# members and "#define NAME literal") that cffi parsed; no symbol is looked up.
_lib = ffi.dlopen(None)

#: Every enum member and #define of the cdefs, name -> value.
CONSTANTS: Mapping[str, int] = {n: getattr(_lib, n) for n in dir(_lib) if isinstance(getattr(_lib, n), int)}
globals().update(CONSTANTS)
__all__ += sorted(CONSTANTS)

if TYPE_CHECKING:
    # The constants above (and the LIVEUPDATE_IOCTL_* numbers below) are created at import time;
    # this tells mypy that any other module attribute is one of those ints.  Type-checking only:
    # at run time a missing name still raises AttributeError as usual.
    def __getattr__(name: str) -> int: ...

# --------------------------------------------------------------------------
# ioctl numbers, as <asm-generic/ioctl.h> (x86, arm64, riscv: not alpha/mips/
# powerpc/sparc, whose dir/size widths differ).

_IOC_NRBITS = 8
_IOC_TYPEBITS = 8
_IOC_SIZEBITS = 14
_IOC_DIRBITS = 2
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS

IOC_NONE = 0
IOC_WRITE = 1
IOC_READ = 2


def IOC(dir: int, type: int, nr: int, size: int) -> int:
    """``_IOC(dir, type, nr, size)``."""
    return (dir << _IOC_DIRSHIFT) | (type << _IOC_TYPESHIFT) | (nr << _IOC_NRSHIFT) | (size << _IOC_SIZESHIFT)


def _sizeof(size: int | str) -> int:
    """Accept a byte count or a C type name, as ``_IOR(t, n, struct x)`` does."""
    return size if isinstance(size, int) else ffi.sizeof(size)


def IO(type: int, nr: int) -> int:
    """``_IO(type, nr)``: no direction, no size."""
    return IOC(IOC_NONE, type, nr, 0)


def IOR(type: int, nr: int, size: int | str) -> int:
    """``_IOR(type, nr, size)``; size may be a C type name."""
    return IOC(IOC_READ, type, nr, _sizeof(size))


def IOW(type: int, nr: int, size: int | str) -> int:
    """``_IOW(type, nr, size)``; size may be a C type name."""
    return IOC(IOC_WRITE, type, nr, _sizeof(size))


def IOWR(type: int, nr: int, size: int | str) -> int:
    """``_IOWR(type, nr, size)``; size may be a C type name."""
    return IOC(IOC_READ | IOC_WRITE, type, nr, _sizeof(size))


def IOC_DIR(cmd: int) -> int:
    """``_IOC_DIR(cmd)``."""
    return (cmd >> _IOC_DIRSHIFT) & ((1 << _IOC_DIRBITS) - 1)


def IOC_TYPE(cmd: int) -> int:
    """``_IOC_TYPE(cmd)``."""
    return (cmd >> _IOC_TYPESHIFT) & ((1 << _IOC_TYPEBITS) - 1)


def IOC_NR(cmd: int) -> int:
    """``_IOC_NR(cmd)``."""
    return (cmd >> _IOC_NRSHIFT) & ((1 << _IOC_NRBITS) - 1)


def IOC_SIZE(cmd: int) -> int:
    """``_IOC_SIZE(cmd)``."""
    return (cmd >> _IOC_SIZESHIFT) & ((1 << _IOC_SIZEBITS) - 1)


# --------------------------------------------------------------------------
# Codec: cffi layout -> struct.Struct

_INT_FORMATS = {1: "bB", 2: "hH", 4: "iI", 8: "qQ"}


class Codec:
    """Encoder/decoder of one C struct, built once from cffi's layout.

    Fields are flattened in offset order: nested structs as ``attr.ino``,
    arrays element by element as ``unused[3]`` (``char`` arrays as one
    ``bytes`` field).  Padding becomes pad bytes, so ``pack`` output is
    byte-identical to the C struct with zeroed padding.  Native byte order.
    """

    __slots__ = ("ctype", "names", "struct", "size", "unpack_from", "pack", "pack_into", "_defaults")

    def __init__(self, ctype: str, names: tuple[str, ...], fmt: str, defaults: tuple[Any, ...]) -> None:
        self.ctype = ctype
        self.names = names
        self.struct = struct.Struct(fmt)
        self.size: int = self.struct.size
        # Bound methods of the Struct: no Python-level indirection on the hot path.
        self.unpack_from = self.struct.unpack_from
        self.pack = self.struct.pack
        self.pack_into = self.struct.pack_into
        self._defaults = defaults

    def decode(self, buf: Any, offset: int = 0) -> dict[str, Any]:
        """Unpack into a ``{field: value}`` dict (for handlers and tracing)."""
        return dict(zip(self.names, self.struct.unpack_from(buf, offset), strict=True))

    def encode(self, **fields: Any) -> bytes:
        """Pack from keyword fields; missing fields are zero, unknown ones an error."""
        values = [fields.pop(n, d) for n, d in zip(self.names, self._defaults, strict=True)]
        if fields:
            raise TypeError(f"{self.ctype}: unknown field(s) {sorted(fields)}")
        return self.struct.pack(*values)

    def __repr__(self) -> str:
        return f"Codec({self.ctype!r}, size={self.size}, format={self.struct.format!r})"


def _ctype(name: str) -> Any:
    """Resolve ``fuse_in_header`` as well as ``struct fuse_in_header``."""
    try:
        return ffi.typeof(name)
    except _LOOKUP_ERRORS:
        return ffi.typeof("struct " + name)


def _flatten(tp: Any, base: int, prefix: str, out: list[tuple[int, int, str, str, Any]]) -> None:
    """Append (offset, size, format, name, default) for every scalar under ``tp``."""
    kind = tp.kind
    if kind == "struct":
        for fname, field in tp.fields:
            if field.bitsize != -1:
                raise TypeError(f"{tp.cname}.{fname}: bitfields are not supported")
            _flatten(field.type, base + field.offset, f"{prefix}.{fname}" if prefix else fname, out)
    elif kind == "array":
        item, length = tp.item, tp.length
        if length is None:  # flexible array member: not part of sizeof
            return
        if item.kind == "primitive" and item.cname == "char":
            out.append((base, length, f"{length}s", prefix, b""))
            return
        step = ffi.sizeof(item)
        for i in range(length):
            _flatten(item, base + i * step, f"{prefix}[{i}]", out)
    elif kind in ("primitive", "enum"):
        size = ffi.sizeof(tp)
        if kind == "primitive" and tp.cname in ("float", "double"):
            fmt = "f" if size == 4 else "d"
            out.append((base, size, fmt, prefix, 0.0))
            return
        if kind == "primitive" and tp.cname in ("char", "_Bool", "bool"):
            fmt = "c" if tp.cname == "char" else "?"
            out.append((base, size, fmt, prefix, b"\0" if fmt == "c" else False))
            return
        signed = int(ffi.cast(tp, -1)) < 0
        out.append((base, size, _INT_FORMATS[size][0 if signed else 1], prefix, 0))
    else:
        raise TypeError(f"{tp.cname}: {kind} fields are not supported by Codec")


def codec(ctype_name: str) -> Codec:
    """Return the (cached) :class:`Codec` of a struct: ``"fuse_in_header"`` or ``"struct fuse_in_header"``."""
    try:
        return _CODECS[ctype_name]
    except KeyError:
        pass
    result = _CODECS[ctype_name] = _build_codec(_ctype(ctype_name).cname)
    return result


_CODECS: dict[str, Codec] = {}


@functools.cache
def _build_codec(cname: str) -> Codec:
    """Build a Codec once per canonical C type name."""
    tp = ffi.typeof(cname)
    if tp.kind != "struct":
        raise TypeError(f"{cname}: not a struct")
    items: list[tuple[int, int, str, str, Any]] = []
    _flatten(tp, 0, "", items)
    items.sort(key=lambda it: it[0])
    parts = ["="]
    pos = 0
    for off, size, fmt, _, _ in items:
        if off < pos:
            raise TypeError(f"{tp.cname}: overlapping fields (unions are not supported)")
        if off > pos:
            parts.append(f"{off - pos}x")
        parts.append(fmt)
        pos = off + size
    total = ffi.sizeof(tp)
    if total > pos:
        parts.append(f"{total - pos}x")
    result = Codec(tp.cname, tuple(it[3] for it in items), "".join(parts), tuple(it[4] for it in items))
    assert result.size == total, (tp.cname, result.size, total)
    return result


# --------------------------------------------------------------------------
# LUO ioctl table and name tables (for dispatch and tracing)

LIVEUPDATE_IOCTL_TYPE: int = CONSTANTS["LIVEUPDATE_IOCTL_TYPE"]

#: command suffix -> (argument struct, last field the kernel requires: IOCTL_OP's "last")
_LUO_COMMANDS: tuple[tuple[str, str], ...] = (
    ("FD_PRESERVE", "token"),
    ("FD_UNPRESERVE", "token"),
    ("FD_RESTORE", "token"),
    ("GET_STATE", "state"),
    ("SET_EVENT", "event"),
    ("GET_FD_STATE", "token"),
    ("SET_FD_EVENT", "token"),
)


class LiveupdateIoctl:
    """One LUO ioctl: number, names, argument struct, sizeof and min_size."""

    __slots__ = ("cmd", "nr", "name", "cmd_name", "ctype", "size", "min_size")

    def __init__(self, suffix: str, last: str) -> None:
        self.cmd_name = f"LIVEUPDATE_CMD_{suffix}"
        self.name = f"LIVEUPDATE_IOCTL_{suffix}"
        self.nr: int = CONSTANTS[self.cmd_name]
        self.cmd: int = IO(LIVEUPDATE_IOCTL_TYPE, self.nr)
        self.ctype = f"struct liveupdate_ioctl_{suffix.lower()}"
        self.size: int = ffi.sizeof(self.ctype)
        # offsetofend(struct, last): the kernel's minimum accepted "size".
        fields = dict(ffi.typeof(self.ctype).fields)
        self.min_size: int = fields[last].offset + ffi.sizeof(fields[last].type)

    def __repr__(self) -> str:
        return f"<{self.name} {self.cmd:#x} {self.ctype} size={self.size} min_size={self.min_size}>"


#: ioctl number -> LiveupdateIoctl, in command order.
LUO_IOCTLS: Mapping[int, LiveupdateIoctl] = {
    io.cmd: io for io in (LiveupdateIoctl(s, last) for s, last in _LUO_COMMANDS)
}
for _io in LUO_IOCTLS.values():
    globals()[_io.name] = _io.cmd
    __all__.append(_io.name)

#: ioctl number -> "LIVEUPDATE_IOCTL_..."
IOCTL_NAMES: Mapping[int, str] = {cmd: io.name for cmd, io in LUO_IOCTLS.items()}
#: ioctl number -> "struct liveupdate_ioctl_..."
IOCTL_STRUCTS: Mapping[int, str] = {cmd: io.ctype for cmd, io in LUO_IOCTLS.items()}
#: command number (_IOC_NR) -> "LIVEUPDATE_CMD_..." (LIVEUPDATE_CMD_BASE is an alias, not listed)
CMD_NAMES: Mapping[int, str] = {io.nr: io.cmd_name for io in LUO_IOCTLS.values()}
#: enum liveupdate_event value -> "LIVEUPDATE_PREPARE", ...
EVENT_NAMES: Mapping[int, str] = dict(sorted(ffi.typeof("enum liveupdate_event").elements.items()))
#: enum liveupdate_state value -> C name ("LIVEUPDATE_STATE_NORMAL", ...)
STATE_CNAMES: Mapping[int, str] = dict(sorted(ffi.typeof("enum liveupdate_state").elements.items()))
#: enum liveupdate_state value -> the kernel's state string (sysfs, logs)
STATE_NAMES: Mapping[int, str] = {
    v: n.removeprefix("LIVEUPDATE_STATE_").lower() for v, n in STATE_CNAMES.items()
}
#: enum fuse_opcode value -> "FUSE_LOOKUP", ..., "CUSE_INIT"
FUSE_OPCODE_NAMES: Mapping[int, str] = dict(sorted(ffi.typeof("enum fuse_opcode").elements.items()))
__all__ += ["STATE_CNAMES", "FUSE_OPCODE_NAMES"]


def _check_layout() -> None:
    """Refuse to run where the cffi prelude's plain u64 typedef is not 8-aligned (e.g. i386)."""
    want = {"fd_unpreserve": (16, "token", 8), "get_fd_state": (24, "state", 16)}
    for short, (size, field, off) in want.items():
        ct = f"struct liveupdate_ioctl_{short}"
        if ffi.sizeof(ct) != size or ffi.offsetof(ct, field) != off:
            raise ImportError(f"cusedev.uapi: {ct} layout differs from the LUO ABI on this platform")


_check_layout()
