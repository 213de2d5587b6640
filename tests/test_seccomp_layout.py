"""cdefs/seccomp.h and the numbers in cusedev.seccomp against the system's kernel headers, via gcc.

Our header restates <linux/seccomp.h>, <linux/filter.h>, <linux/bpf_common.h>,
<linux/audit.h>, <linux/reboot.h> and x86_64 syscall numbers under names
that cffi can parse; every size, offset and value must equal the kernel's.
(tests/test_uapi_layout.py separately checks that gcc and cffi agree on our
header itself.)
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cffi

from cusedev import uapi
from cusedev.run import seccomp

# Our name -> the kernel header's expression, where they differ.
RENAMED = {
    "X86_64_NR_ioctl": "__NR_ioctl",
    "X86_64_NR_reboot": "__NR_reboot",
    "X86_64_NR_seccomp": "__NR_seccomp",
    "X86_64_X32_SYSCALL_BIT": "__X32_SYSCALL_BIT",
}
# Constants from <asm/unistd_32.h>, which cannot share a translation unit with unistd_64.h.
I386 = {"I386_NR_reboot": "__NR_reboot"}
KERNEL_HEADERS = [
    "<stddef.h>",
    "<stdio.h>",
    "<linux/types.h>",
    "<linux/ioctl.h>",
    "<linux/seccomp.h>",
    "<linux/filter.h>",
    "<linux/audit.h>",
    "<linux/reboot.h>",
    "<linux/prctl.h>",
    "<linux/capability.h>",
    "<asm/unistd_64.h>",
    "<asm/unistd.h>",
]


def _seccomp_ffi() -> cffi.FFI:
    f = cffi.FFI()
    f.cdef(uapi.read_cdef("types.h"))
    f.cdef(uapi.read_cdef("seccomp.h"))
    return f


def _members(tp: Any, base: int = 0, prefix: str = "") -> Iterator[tuple[str, int, int]]:
    for fname, field in tp.fields:
        name = f"{prefix}.{fname}" if prefix else fname
        off = base + field.offset
        yield name, off, uapi.ffi.sizeof(field.type)
        if field.type.kind == "struct":
            yield from _members(field.type, off, name)


def _run_c(tmp_path: Path, name: str, includes: list[str], body: list[str]) -> dict[str, int]:
    src, exe = tmp_path / f"{name}.c", tmp_path / name
    lines = [f"#include {inc}" for inc in includes] + ["int main(void) {", *body, "return 0;", "}", ""]
    src.write_text("\n".join(lines))
    cc = subprocess.run(
        ["gcc", "-std=gnu11", "-Wall", "-Werror", "-o", str(exe), str(src)], capture_output=True, text=True
    )
    assert cc.returncode == 0, cc.stderr
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    return {k: int(v) for k, v in (line.rsplit(" ", 1) for line in out.splitlines())}


def test_seccomp_h_matches_kernel_headers(tmp_path: Path) -> None:
    ours = _seccomp_ffi()
    structs = sorted(ours.list_types()[1])
    lib = ours.dlopen(None)
    constants = {n: getattr(lib, n) for n in dir(lib)}
    assert {"seccomp_data", "seccomp_notif", "seccomp_notif_resp", "seccomp_notif_addfd", "sock_filter"} <= set(structs)

    body, want = [], {}
    for tag in structs:
        ct = f"struct {tag}"
        body.append(f'printf("size:{tag} %zu\\n", sizeof({ct}));')
        want[f"size:{tag}"] = uapi.ffi.sizeof(ct)
        for name, off, size in _members(uapi.ffi.typeof(ct)):
            body.append(f'printf("off:{tag}:{name} %zu\\n", offsetof({ct}, {name}));')
            body.append(f'printf("fsize:{tag}:{name} %zu\\n", sizeof((({ct} *)0)->{name}));')
            want[f"off:{tag}:{name}"] = off
            want[f"fsize:{tag}:{name}"] = size
    for name, value in constants.items():
        if name in I386:
            continue
        body.append(f'printf("const:{name} %lld\\n", (long long)({RENAMED.get(name, name)}));')
        want[f"const:{name}"] = value
    python_side = {
        "SECCOMP_IOCTL_NOTIF_RECV": seccomp.SECCOMP_IOCTL_NOTIF_RECV,
        "SECCOMP_IOCTL_NOTIF_SEND": seccomp.SECCOMP_IOCTL_NOTIF_SEND,
        "SECCOMP_IOCTL_NOTIF_ID_VALID": seccomp.SECCOMP_IOCTL_NOTIF_ID_VALID,
        "SECCOMP_IOCTL_NOTIF_ADDFD": seccomp.SECCOMP_IOCTL_NOTIF_ADDFD,
        "PR_CAPBSET_DROP": seccomp.PR_CAPBSET_DROP,
        "PR_SET_CHILD_SUBREAPER": seccomp.PR_SET_CHILD_SUBREAPER,
        "PR_SET_NO_NEW_PRIVS": seccomp.PR_SET_NO_NEW_PRIVS,
        "CAP_SYS_BOOT": seccomp.CAP_SYS_BOOT,
        "_LINUX_CAPABILITY_VERSION_3": seccomp._LINUX_CAPABILITY_VERSION_3,
        "__NR_capget": seccomp._SYS_CAPGET,
        "__NR_capset": seccomp._SYS_CAPSET,
    }
    for name, value in python_side.items():
        body.append(f'printf("py:{name} %lld\\n", (long long)({name}));')
        want[f"py:{name}"] = value
    assert _run_c(tmp_path, "kernel", KERNEL_HEADERS, body) == want

    i386 = [f'printf("const:{n} %lld\\n", (long long)({k}));' for n, k in I386.items()]
    got = _run_c(tmp_path, "kernel32", ["<stdio.h>", "<asm/unistd_32.h>"], i386)
    assert got == {f"const:{n}": constants[n] for n in I386}


def test_seccomp_h_constants_are_in_uapi() -> None:
    assert "seccomp.h" in uapi.CDEF_FILES
    assert uapi.SECCOMP_RET_USER_NOTIF == 0x7FC00000 and uapi.LINUX_REBOOT_CMD_KEXEC == 0x45584543
    assert uapi.codec("seccomp_notif").size == 80
