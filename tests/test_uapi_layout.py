"""Layout tests for cusedev.uapi: cffi's view of cdefs/*.h must equal gcc's.

Three independent witnesses are compared:
  1. gcc compiling our cdefs (sizes, offsets, constants, _IO numbers);
  2. gcc compiling the system's real <linux/fuse.h> (our FUSE subset must be
     byte-compatible with the kernel's);
  3. the LUO v3 spec table (literal values from /work/shared/spec/luo-v3.md).
The codec is checked against cffi itself (bytes from ffi.new + ffi.buffer).
"""

from __future__ import annotations

import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cffi
import pytest

from cusedev import uapi

# Fields the kernel may carve new members out of in a newer <linux/fuse.h>;
# their offsets are only compared when the header speaks exactly our minor.
RESERVED_PREFIXES = ("unused", "padding", "spare", "dummy")
# Constants a newer header may legitimately raise.
MAY_GROW = {"FUSE_KERNEL_MINOR_VERSION", "FUSE_NOTIFY_CODE_MAX"}
# The kernel writes these as "(1 << 31)", an int: gcc sees INT_MIN; the bit is what counts.
SIGN_BIT_FLAGS = {"FUSE_INIT_RESERVED"}


def _file_ffi(name: str) -> cffi.FFI:
    """An FFI holding one cdefs file (plus the typedef prelude) to tell the files apart."""
    f = cffi.FFI()
    f.cdef(uapi.read_cdef("types.h"))
    f.cdef(uapi.read_cdef(name))
    return f


def _structs(name: str) -> list[str]:
    return sorted(_file_ffi(name).list_types()[1])


def _constants(name: str) -> dict[str, int]:
    lib = _file_ffi(name).dlopen(None)
    return {n: getattr(lib, n) for n in dir(lib)}


LUO_STRUCTS = _structs("luo_v3.h")
FUSE_STRUCTS = _structs("fuse.h")
ALL_STRUCTS = LUO_STRUCTS + FUSE_STRUCTS
FUSE_CONSTANTS = _constants("fuse.h")


def _members(tp: Any, base: int = 0, prefix: str = "") -> Iterator[tuple[str, int, int]]:
    """(C member designator, offset, size) for every field, nested and array element included."""
    for fname, field in tp.fields:
        name = f"{prefix}.{fname}" if prefix else fname
        off, ftp = base + field.offset, field.type
        yield name, off, uapi.ffi.sizeof(ftp)
        if ftp.kind == "struct":
            yield from _members(ftp, off, name)
        elif ftp.kind == "array" and ftp.item.kind == "primitive":
            step = uapi.ffi.sizeof(ftp.item)
            for i in range(ftp.length):
                yield f"{name}[{i}]", off + i * step, step


def _layout_probe(structs: list[str], guard_reserved: bool) -> list[str]:
    """C statements printing 'size:S', 'off:S:F', 'fsize:S:F' lines for the given structs."""
    lines = []
    for tag in structs:
        ct = f"struct {tag}"
        lines.append(f'printf("size:{tag} %zu\\n", sizeof({ct}));')
        for name, _, _ in _members(uapi.ffi.typeof(ct)):
            stmt = (
                f'printf("off:{tag}:{name} %zu\\n", offsetof({ct}, {name}));'
                f' printf("fsize:{tag}:{name} %zu\\n", sizeof((({ct} *)0)->{name}));'
            )
            if guard_reserved and name.startswith(RESERVED_PREFIXES):
                stmt = f"#if FUSE_KERNEL_MINOR_VERSION == {uapi.FUSE_KERNEL_MINOR_VERSION}\n{stmt}\n#endif"
            lines.append(stmt)
    return lines


def _cffi_layout(structs: list[str]) -> dict[str, int]:
    out = {}
    for tag in structs:
        tp = uapi.ffi.typeof(f"struct {tag}")
        out[f"size:{tag}"] = uapi.ffi.sizeof(tp)
        for name, off, size in _members(tp):
            out[f"off:{tag}:{name}"] = off
            out[f"fsize:{tag}:{name}"] = size
    return out


def _run_c(tmp_path: Path, name: str, includes: list[str], body: list[str]) -> dict[str, int]:
    """Compile and run a probe; return its 'key value' lines as a dict."""
    src = tmp_path / f"{name}.c"
    exe = tmp_path / name
    head = [f"#include {inc}" for inc in includes]
    src.write_text("\n".join([*head, "int main(void) {", *body, "return 0;", "}", ""]))
    cc = subprocess.run(
        ["gcc", "-std=gnu11", "-Wall", "-Werror", f"-I{tmp_path}", "-o", str(exe), str(src)],
        capture_output=True,
        text=True,
    )
    assert cc.returncode == 0, cc.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, check=True)
    result = {}
    for line in run.stdout.splitlines():
        key, value = line.rsplit(" ", 1)
        result[key] = int(value)
    return result


@pytest.fixture
def cdefs_dir(tmp_path: Path) -> Path:
    """Copy the very headers cffi parsed into tmp_path, so gcc reads the same text."""
    for name in uapi.CDEF_FILES:
        (tmp_path / name).write_text(uapi.read_cdef(name))
    return tmp_path


def test_cdefs_compile_and_match_cffi(cdefs_dir: Path) -> None:
    body = _layout_probe(ALL_STRUCTS, guard_reserved=False)
    body += [f'printf("const:{n} %lld\\n", (long long){n});' for n in uapi.CONSTANTS]
    for io in uapi.LUO_IOCTLS.values():
        body.append(
            f'printf("ioctl:{io.name} %lld\\n", (long long)_IO(LIVEUPDATE_IOCTL_TYPE, {io.cmd_name}));'
        )
    body += [
        'printf("ioc:ior %lld\\n", (long long)_IOR(FUSE_DEV_IOC_MAGIC, 0, uint32_t));',
        'printf("ioc:iow %lld\\n", (long long)_IOW(0xBA, 3, struct liveupdate_ioctl_get_fd_state));',
        'printf("ioc:iowr %lld\\n", (long long)_IOWR(0xBA, 6, struct fuse_init_out));',
        'printf("ioc:nr %d\\n", _IOC_NR(0xc040ba06));',
        'printf("ioc:type %d\\n", _IOC_TYPE(0xc040ba06));',
        'printf("ioc:size %d\\n", _IOC_SIZE(0xc040ba06));',
        'printf("ioc:dir %d\\n", _IOC_DIR(0xc040ba06));',
    ]
    includes = ["<stddef.h>", "<stdio.h>", "<stdint.h>", "<linux/types.h>", "<linux/ioctl.h>"]
    ours = [f'"{name}"' for name in uapi.CDEF_FILES if name != "types.h"]  # types.h is cffi-only
    got = _run_c(cdefs_dir, "ours", [*includes, *ours], body)

    want = _cffi_layout(ALL_STRUCTS)
    want.update({f"const:{n}": v for n, v in uapi.CONSTANTS.items()})
    want.update({f"ioctl:{io.name}": io.cmd for io in uapi.LUO_IOCTLS.values()})
    want.update(
        {
            "ioc:ior": uapi.IOR(uapi.FUSE_DEV_IOC_MAGIC, 0, "uint32_t"),
            "ioc:iow": uapi.IOW(0xBA, 3, "struct liveupdate_ioctl_get_fd_state"),
            "ioc:iowr": uapi.IOWR(0xBA, 6, uapi.codec("fuse_init_out").size),
            "ioc:nr": uapi.IOC_NR(0xC040BA06),
            "ioc:type": uapi.IOC_TYPE(0xC040BA06),
            "ioc:size": uapi.IOC_SIZE(0xC040BA06),
            "ioc:dir": uapi.IOC_DIR(0xC040BA06),
        }
    )
    assert got == want


def test_fuse_matches_kernel_header(tmp_path: Path) -> None:
    assert Path("/usr/include/linux/fuse.h").is_file()
    body = _layout_probe(FUSE_STRUCTS, guard_reserved=True)
    body.append('printf("kminor %d\\n", FUSE_KERNEL_MINOR_VERSION);')
    body += [f'printf("const:{n} %lld\\n", (long long){n});' for n in FUSE_CONSTANTS]
    got = _run_c(tmp_path, "kernel", ["<stddef.h>", "<stdio.h>", "<stdint.h>", "<linux/fuse.h>"], body)

    kminor = got.pop("kminor")
    for name in SIGN_BIT_FLAGS:
        got[f"const:{name}"] &= 0xFFFFFFFF
    assert kminor >= uapi.FUSE_KERNEL_MINOR_VERSION
    want = _cffi_layout(FUSE_STRUCTS)
    if kminor != uapi.FUSE_KERNEL_MINOR_VERSION:
        # Newer header: reserved fields may have been reused (checked by size only).
        want = {k: v for k, v in want.items() if not k.split(":")[-1].startswith(RESERVED_PREFIXES)}
    for name, value in FUSE_CONSTANTS.items():
        key = f"const:{name}"
        if name in MAY_GROW and kminor != uapi.FUSE_KERNEL_MINOR_VERSION:
            assert got.pop(key) >= value, name
        else:
            want[key] = value
    assert got == want


def test_fuse_subset_is_complete() -> None:
    required = {
        "fuse_in_header", "fuse_out_header", "fuse_init_in", "fuse_init_out", "cuse_init_in",
        "cuse_init_out", "fuse_attr", "fuse_attr_out", "fuse_entry_out", "fuse_getattr_in",
        "fuse_setattr_in", "fuse_open_in", "fuse_open_out", "fuse_release_in", "fuse_flush_in",
        "fuse_read_in", "fuse_write_in", "fuse_write_out", "fuse_ioctl_in", "fuse_ioctl_out",
        "fuse_ioctl_iovec", "fuse_poll_in", "fuse_poll_out", "fuse_notify_poll_wakeup_out",
        "fuse_notify_inval_inode_out", "fuse_forget_in", "fuse_batch_forget_in", "fuse_forget_one",
        "fuse_interrupt_in", "fuse_dirent", "fuse_kstatfs", "fuse_statfs_out", "fuse_access_in",
    }  # fmt: skip
    assert required <= set(FUSE_STRUCTS)
    assert uapi.CUSE_INIT == 4096
    assert uapi.FUSE_OPCODE_NAMES[uapi.FUSE_IOCTL] == "FUSE_IOCTL"


# (macro, value, struct, sizeof, min_size) from luo-v3.md section 1.
SPEC_TABLE = [
    ("LIVEUPDATE_IOCTL_FD_PRESERVE", 0xBA00, "liveupdate_ioctl_fd_preserve", 16, 16),
    ("LIVEUPDATE_IOCTL_FD_UNPRESERVE", 0xBA01, "liveupdate_ioctl_fd_unpreserve", 16, 16),
    ("LIVEUPDATE_IOCTL_FD_RESTORE", 0xBA02, "liveupdate_ioctl_fd_restore", 16, 16),
    ("LIVEUPDATE_IOCTL_GET_STATE", 0xBA03, "liveupdate_ioctl_get_state", 8, 8),
    ("LIVEUPDATE_IOCTL_SET_EVENT", 0xBA04, "liveupdate_ioctl_set_event", 8, 8),
    ("LIVEUPDATE_IOCTL_GET_FD_STATE", 0xBA05, "liveupdate_ioctl_get_fd_state", 24, 16),
    ("LIVEUPDATE_IOCTL_SET_FD_EVENT", 0xBA06, "liveupdate_ioctl_set_fd_event", 16, 16),
]


@pytest.mark.parametrize(("macro", "value", "tag", "size", "min_size"), SPEC_TABLE)
def test_luo_spec_table(macro: str, value: int, tag: str, size: int, min_size: int) -> None:
    assert getattr(uapi, macro) == value
    io = uapi.LUO_IOCTLS[value]
    assert (io.name, io.ctype, io.size, io.min_size) == (macro, f"struct {tag}", size, min_size)
    assert uapi.codec(tag).size == size
    assert uapi.IOCTL_NAMES[value] == macro
    assert uapi.IOCTL_STRUCTS[value] == f"struct {tag}"


def test_luo_spec_layouts_and_names() -> None:
    offsets = {
        "liveupdate_ioctl_fd_preserve": {"size": 0, "fd": 4, "token": 8},
        "liveupdate_ioctl_fd_unpreserve": {"size": 0, "token": 8},
        "liveupdate_ioctl_fd_restore": {"size": 0, "fd": 4, "token": 8},
        "liveupdate_ioctl_get_state": {"size": 0, "state": 4},
        "liveupdate_ioctl_set_event": {"size": 0, "event": 4},
        "liveupdate_ioctl_get_fd_state": {"size": 0, "incoming": 4, "token": 8, "state": 16},
        "liveupdate_ioctl_set_fd_event": {"size": 0, "event": 4, "token": 8},
    }
    assert set(offsets) == set(LUO_STRUCTS)
    for tag, fields in offsets.items():
        assert {f: uapi.ffi.offsetof(f"struct {tag}", f) for f in fields} == fields
    assert uapi.LIVEUPDATE_IOCTL_TYPE == 0xBA
    assert uapi.STATE_NAMES == {0: "undefined", 1: "normal", 2: "prepared", 3: "frozen", 4: "updated"}
    assert uapi.EVENT_NAMES == {
        0: "LIVEUPDATE_PREPARE",
        1: "LIVEUPDATE_FREEZE",
        2: "LIVEUPDATE_FINISH",
        3: "LIVEUPDATE_CANCEL",
    }
    assert uapi.CMD_NAMES[0] == "LIVEUPDATE_CMD_FD_PRESERVE"
    assert uapi.LIVEUPDATE_STATE_UPDATED == 4 and uapi.LIVEUPDATE_CANCEL == 3
    assert uapi.codec("liveupdate_ioctl_get_fd_state").struct.format == "=IB3xQI4x"


def _sample(size: int, signed: bool, i: int) -> int:
    """A distinct value per field with the top bit set: negative for signed types."""
    v = (0x80 | (i * 7 & 0x7F)) << (8 * size - 8) | (i + 1)
    return v - (1 << (8 * size)) if signed else v


def _set(cdata: Any, path: str, value: Any) -> None:
    """Assign through a designator such as 'attr.ino' or 'unused[3]'."""
    *parents, last = path.replace("[", ".[").split(".")
    for part in parents:
        cdata = cdata[int(part[1:-1])] if part.startswith("[") else getattr(cdata, part)
    if last.startswith("["):
        cdata[int(last[1:-1])] = value
    else:
        setattr(cdata, last, value)


@pytest.mark.parametrize("tag", ALL_STRUCTS)
def test_codec_matches_cffi(tag: str) -> None:
    c = uapi.codec(tag)
    assert c is uapi.codec(f"struct {tag}")
    assert c.size == uapi.ffi.sizeof(f"struct {tag}") == c.struct.size
    fmt_chars = [ch for ch in c.struct.format[1:] if ch.isalpha() and ch != "x"]
    assert len(fmt_chars) == len(c.names)
    values = []
    for i, ch in enumerate(fmt_chars):
        values.append(_sample(struct.calcsize("=" + ch), ch.islower(), i))
    p = uapi.ffi.new(f"struct {tag} *")
    for name, v in zip(c.names, values, strict=True):
        _set(p, name, v)
    expected = bytes(uapi.ffi.buffer(p))

    assert c.pack(*values) == expected
    assert c.unpack_from(expected) == tuple(values)
    assert c.encode(**dict(zip(c.names, values, strict=True))) == expected
    assert c.decode(b"\xee" + expected, 1) == dict(zip(c.names, values, strict=True))
    buf = bytearray(c.size + 3)
    c.pack_into(buf, 3, *values)
    assert bytes(buf[3:]) == expected
    assert c.encode() == bytes(c.size)
    with pytest.raises(TypeError):
        c.encode(no_such_field=1)
