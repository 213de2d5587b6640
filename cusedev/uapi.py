"""The generic cffi machinery: header loading, ``_IO`` macros, struct codecs; FUSE/CUSE and seccomp.

The C declarations live in ``cdefs/*.h`` (package data ``cusedev.cdefs``) so that
one text is both compiled by gcc in the layout tests and parsed here by cffi in
ABI mode: no C compiler is needed at install or run time, and field offsets
come from cffi's layout engine instead of hand-written ``struct`` formats.

cffi is used only at import time.  The hot path (decoding a FUSE request,
encoding a reply) goes through :class:`Codec`, a precompiled ``struct.Struct``
derived from cffi's layout.

Every enum member and every ``#define`` of the cdefs becomes a module-level
``int`` (``uapi.FUSE_IOCTL``, ``uapi.SECCOMP_RET_ALLOW``, ...).  An ABI profile's own
names (its command table, enum names) live in its folder under ``cusedev/profiles/``.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import io
import os
import pwd
import struct
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cffi

__all__ = [
    "CDEF_FILES",
    "Codec",
    "CONSTANTS",
    "IOC",
    "IOC_DIR",
    "IOC_NONE",
    "IOC_NR",
    "IOC_READ",
    "IOC_SIZE",
    "IOC_TYPE",
    "IOC_WRITE",
    "IO",
    "IOR",
    "IOW",
    "IOWR",
    "codec",
    "ffi",
    "cache_dir",
    "load_ffi",
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


def cache_dir() -> Path | None:
    """Where parsed cdefs are kept: ``$CUSEDEV_CACHE_DIR``, else ``$XDG_CACHE_HOME/cusedev``, else ``~/.cache/cusedev``.

    Per user and outside the package, so an install is never written to at run
    time (a read-only or root-owned site-packages stays as pip left it, and
    ``pip uninstall`` removes everything).  ``None`` when there is no home.
    """
    explicit = os.environ.get("CUSEDEV_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "cusedev"
    home = os.path.expanduser("~")
    return Path(home) / ".cache" / "cusedev" if os.path.isabs(home) else None


def load_ffi(*names: str) -> Any:
    """cffi's parse of the cdefs ``names`` (concatenated in order), cached per user.

    pycparser is by far the slowest part of starting any cusedev process (about
    15x the rest of this module; seconds under the CI VM's emulated CPU), so the
    first parse is saved as cffi's own serialisation (an out-of-line ABI-mode
    module: no compiler) in :func:`cache_dir`, keyed by a hash of the text and the
    cffi version, written once, atomically and silently; later imports load it.
    Where the cache cannot be written every import parses, and nothing is printed.
    """
    text = "".join(read_cdef(n) for n in names)
    key = hashlib.sha256((cffi.__version__ + "\0" + text).encode()).hexdigest()[:16]
    name = f"_cusedev_ffi_{key}"
    cache = cache_dir()
    for where in _lookup_dirs(cache):
        cached = _load_cached(where / f"{name}.py", name)
        if cached is not None:
            return cached
    parsed = cffi.FFI()
    parsed.cdef(text)
    if cache is not None:
        _store(parsed, cache, name)
    return parsed


def _lookup_dirs(cache: Path | None) -> list[Path]:
    """Where a cached parse is looked for: the cache dir, then (read only) the user's own home's.

    A process whose ``$HOME`` points elsewhere (the CI VM runs the host's files with a throw-away
    home) still finds the parse the same user made before; it never writes there.
    """
    dirs = [cache] if cache is not None else []
    try:
        home = Path(pwd.getpwuid(os.geteuid()).pw_dir) / ".cache" / "cusedev"
    except (KeyError, OSError):
        return dirs
    return dirs if home in dirs else [*dirs, home]


def _load_cached(path: Path, name: str) -> Any:
    try:
        st = path.stat()
    except OSError:
        return None
    # executed as code: only a file of ours (or root's) that nobody else can rewrite
    if st.st_uid not in (0, os.geteuid()) or st.st_mode & 0o022:
        return None
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        return None
    mod = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(mod)
        return mod.ffi
    except Exception:  # a foreign or damaged file: parse instead (and rewrite it)
        return None


def _store(parsed: Any, cache: Path, name: str) -> None:
    from cffi.recompiler import make_py_source

    source = io.StringIO()
    try:
        make_py_source(parsed, name, source)  # emit_python_code() would print "generating ..."
        cache.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=cache)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(source.getvalue())
            os.replace(tmp, cache / f"{name}.py")
        except BaseException:
            os.unlink(tmp)
            raise
    except Exception:  # read-only home, full disk, a cffi without the recompiler: parse next time too
        pass


ffi = load_ffi(*CDEF_FILES)
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
    # The constants above are created at import time; this tells mypy that any other module
    # attribute is one of those ints.
    def __getattr__(name: str) -> int: ...
else:
    def __getattr__(name: str) -> Any:
        """The default profile's names (its ioctl numbers, documented as ``cusedev.uapi.*`` before
        there were profiles) are still found here; they live in ``cusedev.profiles.<default>.uapi``."""
        if name.startswith("__"):
            raise AttributeError(name)
        from .profiles.base import DEFAULT

        mod = importlib.import_module(f"{__package__}.profiles.{DEFAULT}.uapi")
        try:
            return getattr(mod, name)
        except AttributeError:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None

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
# name tables of the generic declarations (for tracing and logs)

#: enum fuse_opcode value -> "FUSE_LOOKUP", ..., "CUSE_INIT"
FUSE_OPCODE_NAMES: Mapping[int, str] = dict(sorted(ffi.typeof("enum fuse_opcode").elements.items()))
__all__ += ["FUSE_OPCODE_NAMES"]
