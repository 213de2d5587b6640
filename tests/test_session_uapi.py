"""Layout of the session UAPI (cdefs/luo_session.h): spec table, gcc, cffi and the kernel's own header agree.

Witnesses: the literal table of luo-session.md section 1; gcc compiling our
header; cffi's parse of it (what the emulator uses); gcc compiling the real
<linux/liveupdate.h> of Debian's linux-source-7.2, extracted at test time into
tmp (never copied into the project).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cusedev import uapi as generic
from cusedev.profiles.session import uapi

sys.path.insert(0, str(Path(__file__).resolve().parent))


# (macro, value, struct, sizeof, align, min_size) from luo-session.md section 1
SPEC_TABLE = [
    ("LIVEUPDATE_IOCTL_CREATE_SESSION", 0xBA00, "liveupdate_ioctl_create_session", 72, 4, 72),
    ("LIVEUPDATE_IOCTL_RETRIEVE_SESSION", 0xBA01, "liveupdate_ioctl_retrieve_session", 72, 4, 72),
    ("LIVEUPDATE_SESSION_PRESERVE_FD", 0xBA40, "liveupdate_session_preserve_fd", 16, 8, 16),
    ("LIVEUPDATE_SESSION_RETRIEVE_FD", 0xBA41, "liveupdate_session_retrieve_fd", 16, 8, 16),
    ("LIVEUPDATE_SESSION_FINISH", 0xBA42, "liveupdate_session_finish", 8, 4, 8),
    ("LIVEUPDATE_SESSION_GET_NAME", 0xBA43, "liveupdate_session_get_name", 72, 4, 72),
]
# struct -> field -> (offset, size), spec section 1
SPEC_FIELDS = {
    "liveupdate_ioctl_create_session": {"size": (0, 4), "fd": (4, 4), "name": (8, 64)},
    "liveupdate_ioctl_retrieve_session": {"size": (0, 4), "fd": (4, 4), "name": (8, 64)},
    "liveupdate_session_preserve_fd": {"size": (0, 4), "fd": (4, 4), "token": (8, 8)},
    "liveupdate_session_retrieve_fd": {"size": (0, 4), "fd": (4, 4), "token": (8, 8)},
    "liveupdate_session_finish": {"size": (0, 4), "reserved": (4, 4)},
    "liveupdate_session_get_name": {"size": (0, 4), "reserved": (4, 4), "name": (8, 64)},
}
CONSTANTS = {"LIVEUPDATE_IOCTL_TYPE": 0xBA, "LIVEUPDATE_SESSION_NAME_LENGTH": 64}


def _probe_body() -> list[str]:
    body = []
    for macro, _, tag, _, _, _ in SPEC_TABLE:
        ct = f"struct {tag}"
        body.append(f'printf("size:{tag} %zu\\n", sizeof({ct}));')
        body.append(f'printf("align:{tag} %zu\\n", _Alignof({ct}));')
        for f in SPEC_FIELDS[tag]:
            body.append(f'printf("off:{tag}:{f} %zu\\n", offsetof({ct}, {f}));')
            body.append(f'printf("fsize:{tag}:{f} %zu\\n", sizeof((({ct} *)0)->{f}));')
        body.append(f'printf("cmd:{macro} %lld\\n", (long long){macro});')
    body += [f'printf("const:{n} %lld\\n", (long long){n});' for n in CONSTANTS]
    return body


def _expected() -> dict[str, int]:
    want = {}
    for macro, value, tag, size, align, _ in SPEC_TABLE:
        want[f"size:{tag}"] = size
        want[f"align:{tag}"] = align
        want[f"cmd:{macro}"] = value
        for f, (off, fsize) in SPEC_FIELDS[tag].items():
            want[f"off:{tag}:{f}"] = off
            want[f"fsize:{tag}:{f}"] = fsize
    want.update({f"const:{n}": v for n, v in CONSTANTS.items()})
    return want


def _compile_and_run(tmp: Path, includes: list[str], body: list[str], extra: list[str] = ()) -> dict[str, int]:
    src, exe = tmp / "probe.c", tmp / "probe"
    src.write_text("\n".join([*(f"#include {i}" for i in includes), "int main(void) {", *body, "return 0; }", ""]))
    cc = subprocess.run(
        ["gcc", "-std=gnu11", "-Wall", "-Werror", *extra, "-o", str(exe), str(src)], capture_output=True, text=True
    )
    assert cc.returncode == 0, cc.stderr
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    return {k: int(v) for k, v in (line.rsplit(" ", 1) for line in out.splitlines())}


# Our header defines the _IO() macros' operands only; the C side computes the numbers as a client does.
_MACROS = [
    "#define LIVEUPDATE_IOCTL_CREATE_SESSION _IO(LIVEUPDATE_IOCTL_TYPE, LIVEUPDATE_CMD_CREATE_SESSION)",
    "#define LIVEUPDATE_IOCTL_RETRIEVE_SESSION _IO(LIVEUPDATE_IOCTL_TYPE, LIVEUPDATE_CMD_RETRIEVE_SESSION)",
    "#define LIVEUPDATE_SESSION_PRESERVE_FD _IO(LIVEUPDATE_IOCTL_TYPE, LIVEUPDATE_CMD_SESSION_PRESERVE_FD)",
    "#define LIVEUPDATE_SESSION_RETRIEVE_FD _IO(LIVEUPDATE_IOCTL_TYPE, LIVEUPDATE_CMD_SESSION_RETRIEVE_FD)",
    "#define LIVEUPDATE_SESSION_FINISH _IO(LIVEUPDATE_IOCTL_TYPE, LIVEUPDATE_CMD_SESSION_FINISH)",
    "#define LIVEUPDATE_SESSION_GET_NAME _IO(LIVEUPDATE_IOCTL_TYPE, LIVEUPDATE_CMD_SESSION_GET_NAME)",
]


def test_gcc_compiles_our_header_to_the_spec_table(tmp_path: Path) -> None:
    (tmp_path / "luo_session.h").write_text(generic.read_cdef("luo_session.h") + "\n".join(_MACROS) + "\n")
    includes = ["<stddef.h>", "<stdio.h>", "<stdint.h>", "<linux/types.h>", "<linux/ioctl.h>", '"luo_session.h"']
    got = _compile_and_run(tmp_path, includes, _probe_body(), [f"-I{tmp_path}"])
    assert got == _expected()


def test_cffi_parse_matches_the_spec_table() -> None:
    want = _expected()
    for macro, value, tag, size, _, min_size in SPEC_TABLE:
        c = uapi.BY_CMD[value]
        assert (c.name, c.ctype, c.size, c.min_size, c.struct.size) == (macro, f"struct {tag}", size, min_size, size)
        assert uapi.ffi.sizeof(c.ctype) == want[f"size:{tag}"]
        assert uapi.ffi.alignof(c.ctype) == want[f"align:{tag}"]
        for f, (off, _) in SPEC_FIELDS[tag].items():
            assert uapi.ffi.offsetof(c.ctype, f) == off
        assert c.fields == tuple(SPEC_FIELDS[tag])
    assert uapi.IOCTL_TYPE == 0xBA and uapi.NAME_LENGTH == 64 and uapi.SESSION_BASE == 0x40
    assert [c.cmd for c in uapi.DEVICE_COMMANDS] == [0xBA00, 0xBA01]
    assert [c.cmd for c in uapi.SESSION_COMMANDS] == [0xBA40, 0xBA41, 0xBA42, 0xBA43]


def test_struct_codec_round_trips() -> None:
    c = uapi.CREATE_SESSION
    raw = c.struct.pack(72, -1, b"vm-1".ljust(64, b"\0"))
    p = uapi.ffi.new(f"{c.ctype} *")
    uapi.ffi.memmove(p, raw, len(raw))
    assert (p.size, p.fd, bytes(p.name)[:4]) == (72, -1, b"vm-1")
    t = uapi.PRESERVE_FD
    raw = t.struct.pack(16, 7, 2**64 - 1)
    q = uapi.ffi.new(f"{t.ctype} *")
    uapi.ffi.memmove(q, raw, len(raw))
    assert (q.size, q.fd, q.token) == (16, 7, 2**64 - 1)


@pytest.fixture(scope="module")
def kernel_header() -> Path:
    """The real <linux/liveupdate.h> of Debian's linux-source-7.2, kept beside the built selftests (cached)."""
    from kselftest_build import selftests_dir

    return selftests_dir() / "hdr"


def test_kernel_header_agrees(kernel_header: Path, tmp_path: Path) -> None:
    includes = ["<stddef.h>", "<stdio.h>", "<stdint.h>", "<linux/types.h>", "<linux/liveupdate.h>"]
    got = _compile_and_run(tmp_path, includes, _probe_body(), ["-isystem", str(kernel_header)])
    assert got == _expected()
