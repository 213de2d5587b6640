"""Replay a trace against a device (an emulator or a real kernel) and report divergences.

The trace's header names its ABI profile; that profile's replay rules
(``Profile.replay``) re-issue the calls and compare.  Checked here: the file
is a trace of this format, from a machine of this byte order.  Also here: the
profile-neutral pieces every profile's rules use (argument placement in fresh
pages, content digests), so each profile keeps only what its ABI decides.
"""

from __future__ import annotations

import base64
import ctypes
import errno
import hashlib
import mmap
import os
import sys
from typing import Any, TextIO

from .. import profiles
from ..libc import function
from .record import FORMAT_VERSION
from .show import read_records


class ReplayError(Exception):
    """The trace cannot be replayed here; the message is one line for the user."""


def emulator_kexec(device: str, rec: dict[str, Any]) -> dict[str, Any]:
    """The kexec record ``rec`` done through the emulator's control socket (its reply); a kernel has
    none, so a trace spanning a kexec replays against it in two stages."""
    from ..control.channel import ControlError, request

    try:
        reply: dict[str, Any] = request(device, "kexec")
    except ControlError as e:
        raise ReplayError(f"record {rec.get('seq')} is a kexec and {device} has no emulator control "
                          f"socket ({e}); against a kernel replay in two stages: --stop-at-kexec, kexec, "
                          "then --after-kexec") from None
    return reply


PAGE = mmap.PAGESIZE
MAX_BUF = 1 << 22  # the largest argument buffer a replay allocates for a recorded size
_mmap = function("mmap", (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long),
                 ctypes.c_void_p)
_munmap = function("munmap", (ctypes.c_void_p, ctypes.c_size_t))
_mprotect = function("mprotect", (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int))


class Region:
    """``data`` placed in fresh pages: normally, right before an unmapped page, or read-only."""

    def __init__(self, data: bytes, how: str = "normal"):
        n = len(data)
        pages = (n + PAGE - 1) // PAGE + 1
        self.length = (pages + 1) * PAGE
        base = _mmap(None, self.length, 3, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
        if base in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap")
        self.base = base
        _munmap(base + pages * PAGE, PAGE)  # a hole after the data pages
        self.length = pages * PAGE
        self.addr = base + pages * PAGE - n if how in ("edge", "readonly") else base
        ctypes.memmove(self.addr, data, n)
        if how == "readonly":
            _mprotect(base, self.length, 1)
        self.n = n

    def read(self, n: int) -> bytes:
        return ctypes.string_at(self.addr, min(n, self.n))

    def close(self) -> None:
        _munmap(self.base, self.length)


def unmapped_addr() -> int:
    """An address no mapping covers (one just unmapped)."""
    p = _mmap(None, PAGE, 0, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    _munmap(p, PAGE)
    return p


def place_argument(rec: dict[str, Any], data: bytes | bytearray, want: int, *, blank: int, op_size: int | None,
                   tail: dict[str, Any]) -> tuple[int, Region | None]:
    """The address to re-issue ``rec``'s ioctl with, and the region behind it (to read and close).

    NULL stays NULL; nothing read becomes an unmapped address (EFAULT) or ``blank`` zeros; an
    EFAULT on output becomes a read-only copy, on input a copy right before a hole; else the
    recorded bytes padded to the recorded size, with the recorded non-zero byte past the struct
    (``tail``: its offset past ``op_size``)."""
    if int(rec.get("arg", 0)) == 0:
        return 0, None
    if "in_hex" not in rec and "size" not in rec:
        # nothing was read: either the size word was unreadable, or the command was never looked up
        if want == errno.EFAULT:
            return unmapped_addr(), None
        region = Region(bytes(blank))
    elif want == errno.EFAULT and "out_hex" in rec:
        region = Region(bytes(data), "readonly")
    elif want == errno.EFAULT:
        region = Region(bytes(data), "edge")
    else:
        size = rec.get("size")
        total = len(data)
        if isinstance(size, int) and len(data) < size <= MAX_BUF:
            total = size
        buf = bytearray(data) + bytes(total - len(data))
        if "offset" in tail and op_size is not None and op_size + tail["offset"] < len(buf):
            buf[op_size + tail["offset"]] = tail.get("byte", 1) or 1
        region = Region(bytes(buf))
    return region.addr, region


def file_digest(fd: int, limit: int | None) -> str:
    """sha256 of the first ``limit`` bytes of ``fd`` (all of it when None)."""
    h = hashlib.sha256()
    size = os.fstat(fd).st_size
    end = size if limit is None else min(size, limit)
    pos = 0
    while pos < end:
        chunk = os.pread(fd, min(1 << 20, end - pos), pos)
        if not chunk:
            break
        h.update(chunk)
        pos += len(chunk)
    return h.hexdigest()


def standin_memfd(info: dict[str, Any]) -> int:
    """A memfd standing in for a recorded preserved file: its recorded bytes (if the trace has them), its size."""
    fd = os.memfd_create("cusedev-replay", os.MFD_CLOEXEC)
    if "data" in info:
        os.write(fd, base64.b64decode(info["data"]))
    os.ftruncate(fd, int(info.get("size", 0)))
    return fd


def unused_fd(at_least: int) -> int:
    """The lowest fd number >= max(``at_least``, 900) not open here: the stand-in for a recorded fd
    that was not open in the recording (EBADF there, EBADF here; far above what the replay opens)."""
    fd = max(at_least, 900)
    while True:
        try:
            os.fstat(fd)
        except OSError:
            return fd
        fd += 1


def standin_digest(info: dict[str, Any]) -> str:
    """What a file restored from our stand-in must hash to: the recorded digest when the trace has
    the contents, else that of the zeros the stand-in holds (the recorder keeps only a digest of
    files over ``CONTENT_LIMIT``; the original bytes are not in the trace)."""
    if "data" in info:
        return str(info["sha256"])
    size = int(info.get("size", 0))
    left = size if info.get("digest_len") is None else min(size, int(info["digest_len"]))
    h, zeros = hashlib.sha256(), memoryview(bytes(1 << 20))
    while left > 0:
        h.update(zeros[:min(left, len(zeros))])
        left -= len(zeros)
    return h.hexdigest()


def replay(path: str, device: str, *, stop_at_kexec: bool = False, after_kexec: bool = False,
           quiet: bool = False, out: TextIO | None = None) -> int:
    """Replay ``path`` against ``device``; 0 when nothing diverged, 1 otherwise."""
    try:
        records = list(read_records(path))
    except OSError as e:
        raise ReplayError(f"{path}: {e.strerror}") from None
    if not records or records[0].get("type") != "header":
        raise ReplayError(f"{path}: not a cusedev trace (no header record)")
    head = records[0]
    if head.get("format") != FORMAT_VERSION:
        raise ReplayError(f"{path}: trace format {head.get('format')}, this cusedev reads {FORMAT_VERSION}")
    try:
        profile = profiles.get(str(head.get("abi")))
    except ValueError:
        raise ReplayError(f"{path}: ABI profile {head.get('abi')!r} is not known here") from None
    if profile.replay is None:
        raise ReplayError(f"{path}: ABI profile {profile.name!r} has no replay rules")
    if head.get("endian") != sys.byteorder:
        raise ReplayError(f"{path}: recorded on a {head.get('endian')}-endian machine")
    return profile.replay(records, device, stop_at_kexec=stop_at_kexec, after_kexec=after_kexec, quiet=quiet,
                          out=out, path=path)
