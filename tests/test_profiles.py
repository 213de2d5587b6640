"""The ABI profile as the unit of the emulator (issue 17): the registry, `serve --abi`, the seams, and
that no module outside ``cusedev/profiles/v3/`` names a v3 command, struct, state or model field."""

from __future__ import annotations

import ast
import errno
import os
import re
import subprocess
import sys
from pathlib import Path

import cffi
import pytest

from cusedev import profiles, uapi
from cusedev.device.dispatch import dispatch, make_op
from cusedev.run import seccomp

PACKAGE = Path(__file__).resolve().parent.parent / "cusedev"
ENV = {**os.environ, "PYTHONPATH": str(PACKAGE.parent)}

#: what only the v3 profile may name: its commands, structs, states, events and model fields
V3_NAMES = re.compile(
    r"\b(?:LIVEUPDATE_(?:IOCTL|CMD)_)?(?:FD_PRESERVE|FD_UNPRESERVE|FD_RESTORE|GET_STATE|SET_EVENT|GET_FD_STATE"
    r"|SET_FD_EVENT)\b"
    r"|liveupdate_ioctl_(?:fd_preserve|fd_unpreserve|fd_restore|get_state|set_event|get_fd_state|set_fd_event)\b"
    r"|\bLIVEUPDATE_STATE_\w+|\bLIVEUPDATE_(?:PREPARE|FREEZE|FINISH|CANCEL)\b"
    r"|\bLiveUpdateCore\b|\bPreservedFile\b|\bkho_finalized\b|\bdrop_outgoing\b|\bLUO_IOCTLS\b"
)
#: (file, name): documented public API of the default profile kept where users find it
ALLOWED = {("testing/emulator.py", "set_kho_finalized")}


def _names(tree: ast.AST) -> list[tuple[int, str]]:
    """Identifiers and string constants of a module, docstrings left out (prose may name anything)."""
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docstrings.add(id(body[0].value))
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            out.append((node.lineno, node.id))
        elif isinstance(node, ast.Attribute):
            out.append((node.lineno, node.attr))
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.append((node.lineno, node.name))
        elif isinstance(node, ast.alias):
            out.append((getattr(node, "lineno", 0), node.asname or node.name))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            out.append((node.lineno, node.value))
    return out


def test_v3_names_only_in_the_v3_profile() -> None:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel.startswith("profiles/v3/") or "__pycache__" in rel:
            continue
        for line, name in _names(ast.parse(path.read_text(encoding="utf-8"))):
            m = V3_NAMES.search(name)
            if m and (rel, name) not in ALLOWED:
                found.append(f"cusedev/{rel}:{line}: {m.group(0)}")
    assert not found, "v3 names outside cusedev/profiles/v3/:\n" + "\n".join(found)


def test_the_check_finds_a_v3_name() -> None:
    """The check itself: a call by a v3 name and a v3 model field are found, a docstring is not."""
    src = '"""FD_RESTORE in prose is fine."""\nx = uapi.LIVEUPDATE_IOCTL_FD_RESTORE\ny = core.kho_finalized\n'
    hits = [n for _l, n in _names(ast.parse(src)) if V3_NAMES.search(n)]
    assert hits == ["LIVEUPDATE_IOCTL_FD_RESTORE", "kho_finalized"]


def test_registry() -> None:
    v3 = profiles.get("v3")
    assert profiles.get() is v3 and profiles.DEFAULT == "v3" and "v3" in profiles.names()
    with pytest.raises(ValueError, match="unknown ABI profile 'nope'"):
        profiles.get("nope")
    device = v3.kinds["device"]
    assert device.base == 0 and device.exclusive and device.release is not None
    assert v3.fd_commands == (uapi.LIVEUPDATE_IOCTL_FD_RESTORE,)
    assert [op.nr for op in device.ops] == list(range(len(device.ops)))
    assert set(v3.sysfs(v3.model())) == {"kernel/liveupdate/state", "kernel/liveupdate/update_count"}


def test_serve_abi_list_and_unknown() -> None:
    r = subprocess.run([sys.executable, "-m", "cusedev.cli", "serve", "--abi", "list"], capture_output=True,
                       text=True, env=ENV, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert any(line.startswith("v3 (default): ") for line in lines), r.stdout
    assert len(lines) == len({profiles.get(n).name for n in profiles.names()})
    r = subprocess.run([sys.executable, "-m", "cusedev.cli", "serve", "--abi", "nope", "--device", "/nonexistent/x"],
                       capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("cusedev: error: --abi: unknown ABI profile 'nope'")


# -- the dispatcher's seams, on a table of our own (no profile needs them all) ------------------------
class _Memory:
    """Caller memory over a bytearray at BASE (direct, as ProcessVmMemory)."""

    BASE = 0x10000
    direct = True

    def __init__(self, data: bytes):
        self.buf = bytearray(data)

    def read(self, addr: int, n: int) -> bytes:
        off = addr - self.BASE
        if off < 0 or off + n > len(self.buf):
            raise OSError(errno.EFAULT, "Bad address")
        return bytes(self.buf[off:off + n])

    def peek(self, addr: int, want: int, need: int) -> bytes:
        n = min(want, len(self.buf) - (addr - self.BASE))
        return self.read(addr, max(n, need))

    def declare(self, in_range: tuple[int, int], out_range: tuple[int, int] | None) -> None:
        return None

    def write(self, addr: int, data: bytes | bytearray) -> None:
        self.read(addr, len(data))
        off = addr - self.BASE
        self.buf[off:off + len(data)] = data


class _Table:
    def __init__(self, base: int, ops: tuple, check=None):  # type: ignore[no-untyped-def]
        self.base, self.ops, self.check = base, ops, check


_FFI = cffi.FFI()
_FFI.cdef("struct test_name { uint32_t size; uint32_t reserved; uint8_t name[16]; };")


def _name_op(nr: int, handler):  # type: ignore[no-untyped-def]
    """A row whose struct ends in a byte array, as the session ABI's GET_NAME (a table of the test's own)."""
    return make_op(0xEE, nr, "TEST_NAME", "struct test_name", "name", handler, ("name",), ffi=_FFI)


def test_base_check_array_output_and_awaitable() -> None:
    """A table at base 0x40: nr below or past it EINVAL, the kind check between ENOTTY and the size
    check, a byte-array output, and a handler that completes later (the write-back waits for it)."""
    import asyncio

    seen: list[tuple] = []

    def now(file, caller, v):  # type: ignore[no-untyped-def]
        seen.append(v)
        return {"name": b"hello"}

    async def later_value() -> dict:
        await asyncio.sleep(0)
        return {"name": b"later"}

    def later(file, caller, v):  # type: ignore[no-untyped-def]
        return later_value()

    def refuse(file, op):  # type: ignore[no-untyped-def]
        if file == "wrong kind":
            raise OSError(errno.EINVAL, "kind")

    ops = (_name_op(0x40, now), _name_op(0x41, later))
    table = _Table(0x40, ops, refuse)
    struct_in = (24).to_bytes(4, "little") + bytes(4) + b"x" * 16
    for cmd, want in ((uapi.IO(0xEE, 0x3F), errno.EINVAL), (uapi.IO(0xEE, 0x42), errno.EINVAL),
                      (uapi.IO(0xEF, 0x40), errno.ENOTTY)):
        with pytest.raises(OSError) as ei:
            dispatch(table, "file", None, cmd, _Memory.BASE, _Memory(struct_in))  # type: ignore[arg-type]
        assert ei.value.errno == want
    with pytest.raises(OSError) as ei:  # the kind check comes before the size check
        dispatch(table, "wrong kind", None, ops[0].cmd, _Memory.BASE, _Memory(bytes(4)))  # type: ignore[arg-type]
    assert ei.value.errno == errno.EINVAL and str(ei.value) == "[Errno 22] kind"
    mem = _Memory(struct_in)
    assert dispatch(table, "file", None, ops[0].cmd, _Memory.BASE, mem) == 0  # type: ignore[arg-type]
    assert seen == [(24, 0, b"x" * 16)] and bytes(mem.buf[8:]) == b"hello" + bytes(11)
    mem = _Memory(struct_in)
    aw = dispatch(table, "file", None, ops[1].cmd, _Memory.BASE, mem)  # type: ignore[arg-type]
    assert not isinstance(aw, int) and bytes(mem.buf) == struct_in  # nothing written yet
    assert asyncio.run(aw) == 0  # type: ignore[arg-type]
    assert bytes(mem.buf[8:]) == b"later" + bytes(11)


def _bpf_run(prog: bytes, nr: int, arch: int, args: tuple[int, ...]) -> int:
    data = uapi.codec("seccomp_data").pack(nr, arch, 0, *args)
    insn = uapi.codec("sock_filter")
    pc, acc = 0, 0
    while True:
        code, jt, jf, k = insn.unpack_from(prog, pc * insn.size)
        pc += 1
        if code == uapi.BPF_LD | uapi.BPF_W | uapi.BPF_ABS:
            acc = int.from_bytes(data[k:k + 4], "little")
        elif code == uapi.BPF_JMP | uapi.BPF_JEQ | uapi.BPF_K:
            pc += jt if acc == k else jf
        elif code == uapi.BPF_RET | uapi.BPF_K:
            return k
        else:
            raise AssertionError(f"unexpected opcode {code:#x}")


@pytest.mark.parametrize("trapped", [(), (0xBA02,), (0xBA00, 0xBA01, 0xBA41), tuple(range(0xEE00, 0xEE40))])
def test_filter_traps_exactly_the_profiles_commands(trapped: tuple[int, ...]) -> None:
    """The filter is assembled from the trapped list: each is sent to the listener, nothing else is."""
    prog = seccomp.build_filter(trapped)
    notify, allow = uapi.SECCOMP_RET_USER_NOTIF, uapi.SECCOMP_RET_ALLOW
    x86 = uapi.AUDIT_ARCH_X86_64
    for cmd in trapped:
        assert _bpf_run(prog, uapi.X86_64_NR_ioctl, x86, (3, cmd, 0, 0, 0, 0)) == notify
    for cmd in (0xBA03, 0x541B, 0xEE40):
        if cmd not in trapped:
            assert _bpf_run(prog, uapi.X86_64_NR_ioctl, x86, (3, cmd, 0, 0, 0, 0)) == allow
    kexec = (0xFEE1DEAD, 672274793, uapi.LINUX_REBOOT_CMD_KEXEC, 0, 0, 0)
    assert _bpf_run(prog, uapi.X86_64_NR_reboot, x86, kexec) == notify
    assert _bpf_run(prog, 0, x86, (3, *(trapped or (0,)), 0, 0, 0, 0)[:6]) == allow
