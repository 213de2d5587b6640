"""The two ``CallerMemory`` backends: direct (process_vm_*) and CUSE retry iovecs.

``ProcessVmMemory`` reaches the calling thread's memory with one syscall per
access; it works on both transports and for callers of any uid (the server
is root).  ``RetryMemory`` is the CUSE-native way: the kernel copies ranges
in and out for us, but only after the server answers FUSE_IOCTL_RETRY naming
them, so the handler is re-run once per round (see ``device.NeedRetry``).
"""

from __future__ import annotations

import ctypes
import errno
import os
from typing import Any

from ..libc import function
from .seam import NeedRetry

__all__ = ["ProcessVmMemory", "RetryMemory", "PAGE_SIZE", "CUSE_MAX_IOCTL_BYTES", "FUSE_IOCTL_MAX_IOV"]

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
# CUSE never negotiates max_pages (cuse_init_out has no such field), so the
# connection keeps fuse_conn_init's FUSE_DEFAULT_MAX_PAGES_PER_REQ (32): each
# direction of an ioctl may move at most 32 pages, else the caller gets ENOMEM.
CUSE_MAX_IOCTL_BYTES = 32 * PAGE_SIZE
# in_iovs + out_iovs of one FUSE_IOCTL_RETRY reply (linux/fuse.h).
FUSE_IOCTL_MAX_IOV = 256


class _IOVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


# No argtypes: every argument is already a ctypes object or a small int, which
# skips ctypes' per-call conversion (this is on the ioctl hot path).
_readv = function("process_vm_readv", restype=ctypes.c_ssize_t)
_writev = function("process_vm_writev", restype=ctypes.c_ssize_t)

# One scratch buffer and one pair of iovecs shared by every call: the event
# loop is single-threaded and a call never yields, so sharing them saves the
# allocations (a process_vm round trip costs ~2.5 µs instead of ~4.5 µs).
_local = _IOVec()
_remote = _IOVec()
_plocal = ctypes.byref(_local)
_premote = ctypes.byref(_remote)
_scratch: Any = ctypes.create_string_buffer(0)  # Any: slicing a c_char array gives bytes
_scratch_mv = memoryview(b"")  # bytes in by slice assignment, out by slicing ``_scratch``: no ctypes calls
_scratch_addr = 0
_scratch_len = 0
# What the remote iovec holds now: a client looping on one struct asks for the same range
# every time, and a ctypes field store costs more than comparing two ints.
_remote_addr = -1
_remote_len = -1


def _scratch_for(length: int) -> int:
    """Grow the scratch buffer to ``length``; the local iovec always spans all of it.

    Only the remote iovec's length bounds a transfer (the kernel moves the
    smaller total), so a call sets just the remote side.
    """
    global _scratch, _scratch_mv, _scratch_addr, _scratch_len
    if length > _scratch_len:
        _scratch = ctypes.create_string_buffer(max(length, 64 * 1024))
        _scratch_mv = memoryview(_scratch).cast("B")
        _scratch_addr = ctypes.addressof(_scratch)
        _scratch_len = len(_scratch)
        _local.iov_base = _scratch_addr
        _local.iov_len = _scratch_len
    return _scratch_addr


_scratch_for(1)


def _efault() -> OSError:
    return OSError(errno.EFAULT, "Bad address")


class ProcessVmMemory:
    """Direct access to thread ``tid``'s memory; any failure, short transfer included, is EFAULT.

    A vanished caller (ESRCH) is EFAULT too: the reply will be dropped anyway.
    """

    __slots__ = ("tid",)
    direct = True

    def __init__(self, tid: int):
        self.tid = tid

    def _readv(self, addr: int, length: int) -> int:
        """Read into the scratch buffer; bytes read (-1 on failure)."""
        global _remote_addr, _remote_len
        if length > _scratch_len:
            _scratch_for(length)
        if addr != _remote_addr:
            _remote.iov_base = _remote_addr = addr
        if length != _remote_len:
            _remote.iov_len = _remote_len = length
        return _readv(self.tid, _plocal, 1, _premote, 1, 0)

    def read(self, addr: int, length: int) -> bytes:
        if length <= 0:
            return b""
        if self._readv(addr, length) != length:
            raise _efault()
        return _scratch[:length]

    def peek(self, addr: int, want: int, need: int) -> bytes:
        """Up to ``want`` bytes in one syscall; EFAULT only if fewer than ``need`` are readable."""
        if want < need:
            want = need
        if want <= 0:
            return b""
        # _readv inlined: this runs once per ioctl
        global _remote_addr, _remote_len
        if want > _scratch_len:
            _scratch_for(want)
        if addr != _remote_addr:
            _remote.iov_base = _remote_addr = addr
        if want != _remote_len:
            _remote.iov_len = _remote_len = want
        n = _readv(self.tid, _plocal, 1, _premote, 1, 0)
        if n >= need and n > 0:
            return _scratch[:n]
        # A read that *starts* on an unmapped page fails outright even if ``need``
        # alone would fit a shorter mapping: retry small before calling it EFAULT.
        if n <= 0 and need < want:
            return self.read(addr, need)
        raise _efault()

    def declare(self, in_range: tuple[int, int], out_range: tuple[int, int] | None) -> None:
        return None

    def write(self, addr: int, data: bytes | bytearray) -> None:
        global _remote_addr, _remote_len
        length = len(data)
        if length == 0:
            return
        if length > _scratch_len:
            _scratch_for(length)
        _scratch_mv[:length] = data
        if addr != _remote_addr:
            _remote.iov_base = _remote_addr = addr
        if length != _remote_len:
            _remote.iov_len = _remote_len = length
        if _writev(self.tid, _plocal, 1, _premote, 1, 0) != length:
            raise _efault()


def _covers(ranges: list[tuple[int, int]], addr: int, length: int) -> int:
    """Index of the first range holding [addr, addr+length), or -1."""
    end = addr + length
    for i, (a, n) in enumerate(ranges):
        if a <= addr and end <= a + n:
            return i
    return -1


class RetryMemory:
    """Caller memory for one round of a CUSE unrestricted ioctl.

    ``in_ranges``/``out_ranges`` are the iovecs this server asked for in its
    previous FUSE_IOCTL_RETRY reply (the kernel does not echo them) and
    ``in_data`` the bytes the kernel copied in for them, concatenated.  A
    ``read``/``peek``/``declare`` of anything not delivered raises
    ``NeedRetry`` with the cumulative ranges; the transport replies RETRY and
    re-runs the handler from the start when the data arrives.

    Ranges bigger than the kernel allows (``max_bytes`` per direction,
    FUSE_IOCTL_MAX_IOV iovecs) cannot be retried — the caller would get
    ENOMEM — so those are served by ``ProcessVmMemory`` instead (same result
    for the caller; only the syscall path differs).  Writes outside every
    declared range also go direct: they happen after the handler's side
    effects, when a re-run is no longer allowed.
    """

    __slots__ = ("tid", "in_ranges", "in_data", "out_ranges", "max_bytes", "_out", "_direct",
                 "_direct_ranges", "_in_offsets")
    direct = False

    def __init__(self, tid: int, in_ranges: list[tuple[int, int]] | None = None, in_data: bytes = b"",
                 out_ranges: list[tuple[int, int]] | None = None, max_bytes: int = CUSE_MAX_IOCTL_BYTES):
        self.tid = tid
        self.in_ranges = in_ranges or []
        self.in_data = in_data
        self.out_ranges = out_ranges or []
        self.max_bytes = max_bytes
        self._out: list[bytearray | None] = [None] * len(self.out_ranges)
        self._direct: ProcessVmMemory | None = None
        self._direct_ranges: list[tuple[int, int]] = []
        offs = []
        o = 0
        for _a, n in self.in_ranges:
            offs.append(o)
            o += n
        self._in_offsets = offs

    # -- helpers ---------------------------------------------------------
    def _pvm(self) -> ProcessVmMemory:
        if self._direct is None:
            self._direct = ProcessVmMemory(self.tid)
        return self._direct

    def _delivered(self, addr: int, length: int) -> bytes | None:
        i = _covers(self.in_ranges, addr, length)
        if i < 0:
            return None
        off = self._in_offsets[i] + addr - self.in_ranges[i][0]
        data = self.in_data[off:off + length]
        return data if len(data) == length else None

    def _fits(self, ranges: list[tuple[int, int]], extra: int) -> bool:
        return (sum(n for _a, n in ranges) <= self.max_bytes
                and len(self.in_ranges) + len(self.out_ranges) + extra <= FUSE_IOCTL_MAX_IOV)

    @staticmethod
    def _merge(ranges: list[tuple[int, int]], new: tuple[int, int]) -> list[tuple[int, int]]:
        """``ranges`` plus ``new``, dropping ranges ``new`` covers (no need to copy twice)."""
        a0, n0 = new
        kept = [(a, n) for a, n in ranges if not (a0 <= a and a + n <= a0 + n0)]
        if _covers(kept, a0, n0) < 0:
            kept.append(new)
        return kept

    def _need_in(self, addr: int, length: int) -> bytes:
        data = self._delivered(addr, length)
        if data is not None:
            return data
        if _covers(self._direct_ranges, addr, length) >= 0:
            return self._pvm().read(addr, length)
        new_in = self._merge(self.in_ranges, (addr, length))
        if self._fits(new_in, 1):
            raise NeedRetry(new_in, list(self.out_ranges))
        self._direct_ranges.append((addr, length))
        return self._pvm().read(addr, length)

    # -- CallerMemory ----------------------------------------------------
    def read(self, addr: int, length: int) -> bytes:
        if length <= 0:
            return b""
        return self._need_in(addr, length)

    def peek(self, addr: int, want: int, need: int) -> bytes:
        data = self._delivered(addr, want)
        if data is not None:
            return data
        return self.read(addr, need)

    def declare(self, in_range: tuple[int, int], out_range: tuple[int, int] | None) -> None:
        new_in = list(self.in_ranges)
        new_out = list(self.out_ranges)
        changed = False
        a, n = in_range
        if n > 0 and self._delivered(a, n) is None and _covers(self._direct_ranges, a, n) < 0:
            if n > self.max_bytes:
                self._direct_ranges.append(in_range)
            else:
                new_in = self._merge(new_in, in_range)
                changed = True
        if out_range is not None and out_range[1] > 0 and _covers(self.out_ranges, *out_range) < 0:
            if out_range[1] > self.max_bytes:
                self._direct_ranges.append(out_range)
            else:
                new_out = self._merge(new_out, out_range)
                changed = True
        if not changed:
            return
        if (sum(x for _a, x in new_in) > self.max_bytes or sum(x for _a, x in new_out) > self.max_bytes
                or len(new_in) + len(new_out) > FUSE_IOCTL_MAX_IOV):
            # Together too big for one round: keep only what was asked now.
            new_in = [in_range] if in_range[1] <= self.max_bytes and in_range[1] > 0 else []
            new_out = [out_range] if out_range and 0 < out_range[1] <= self.max_bytes else []
        raise NeedRetry(new_in, new_out)

    def write(self, addr: int, data: bytes | bytearray) -> None:
        length = len(data)
        if length == 0:
            return
        i = _covers(self.out_ranges, addr, length)
        if i < 0:
            self._pvm().write(addr, data)
            return
        base, n = self.out_ranges[i]
        buf = self._out[i]
        if buf is None:
            # Unwritten bytes go back as they came in (or zero): the kernel copies
            # the out iovecs sequentially up to the reply's length.
            buf = self._out[i] = bytearray(self._delivered(base, n) or bytes(n))
        off = addr - base
        buf[off:off + length] = data

    # -- for the transport -----------------------------------------------
    def out_payload(self) -> bytes:
        """The bytes to append to the final ioctl reply: out ranges in order, up to the last one written."""
        last = -1
        for i, b in enumerate(self._out):
            if b is not None:
                last = i
        if last < 0:
            return b""
        parts = []
        for i in range(last + 1):
            b = self._out[i]
            if b is None:
                a, n = self.out_ranges[i]
                parts.append(bytes(self._delivered(a, n) or bytes(n)))
            else:
                parts.append(bytes(b))
        return b"".join(parts)
