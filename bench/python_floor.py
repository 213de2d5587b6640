"""The floor for any Python server of this ABI on the FUSE-file path: bench/baseline_server.c's
``fuse-pvm`` mode, line for line in CPython.

One blocking ``os.read`` per request, one ``struct`` unpack of the header and
``fuse_ioctl_in``, ``process_vm_readv`` of the caller's struct and, for
GET_STATE, ``process_vm_writev`` of it (ctypes, preset iovecs), one
``os.write`` of a reply packed in one go — and no checks at all.  Whatever the
emulator takes above this is its own Python (sizes, sessions, the ABI table);
what this takes above the C ``fuse-pvm`` server is the interpreter's.

    python3 bench/python_floor.py MNTDIR    mount a one-file FUSE fs; the file is MNTDIR/dev

Prints "ready" once mounted; exits when the connection ends (umount/kill).
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cusedev import uapi  # noqa: E402

HDR = uapi.codec("struct fuse_in_header")
OUT = uapi.codec("struct fuse_out_header")
IOCTL_IN = uapi.codec("struct fuse_ioctl_in")
INIT_IN = uapi.codec("struct fuse_init_in")
INIT_OUT = uapi.codec("struct fuse_init_out")
ENTRY_OUT = uapi.codec("struct fuse_entry_out")
ATTR_OUT = uapi.codec("struct fuse_attr_out")
OPEN_OUT = uapi.codec("struct fuse_open_out")

# header + fuse_ioctl_in in one unpack; header + fuse_ioctl_out in one pack
_REQ = struct.Struct(HDR.struct.format + IOCTL_IN.struct.format[1:])
_REPLY = struct.Struct(OUT.struct.format + "iIII")
_GET_STATE_NR = uapi.LIVEUPDATE_CMD_GET_STATE
_IOCTL_OPCODE = struct.pack("=I", uapi.FUSE_IOCTL)


class _IOVec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


def attr(ino: int) -> dict[str, int]:
    root = ino == uapi.FUSE_ROOT_ID
    return {"attr.ino": ino, "attr.mode": (stat.S_IFDIR | 0o755) if root else (stat.S_IFREG | 0o666),
            "attr.nlink": 2 if root else 1, "attr.blksize": 4096}


def main() -> int:
    mnt = sys.argv[1]
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    libc = ctypes.CDLL(None, use_errno=True)
    opts = f"fd={fd},rootmode=40000,user_id=0,group_id=0,allow_other".encode()
    if libc.mount(b"bench-python-floor", mnt.encode(), b"fuse.bench-python-floor", 0x2 | 0x4, opts):
        raise OSError(ctypes.get_errno(), "mount")
    print("ready", flush=True)

    readv, writev = libc.process_vm_readv, libc.process_vm_writev
    scratch = ctypes.create_string_buffer(16)
    local, remote, remote8 = _IOVec(ctypes.addressof(scratch), 16), _IOVec(0, 16), _IOVec(0, 8)
    plocal, premote, premote8 = ctypes.byref(local), ctypes.byref(remote), ctypes.byref(remote8)
    # one reusable buffer, as large as a WRITE request can be (the kernel refuses smaller reads)
    rbuf = bytearray(132 * 1024)
    iov = [rbuf]
    readinto, write, unpack, pack = os.readv, os.write, _REQ.unpack_from, _REPLY.pack
    out_size = OUT.size
    while True:
        try:
            n = readinto(fd, iov)
        except OSError as e:
            if e.errno in (errno.EINTR, errno.ENOENT):
                continue
            return 0 if e.errno == errno.ENODEV else 1
        if n >= _REQ.size and rbuf[4:8] == _IOCTL_OPCODE:
            (_len, _opcode, unique, _nodeid, _uid, _gid, pid, _ext, _pad,
             _fh, _flags, cmd, arg, _isz, _osz) = unpack(rbuf)
            remote.iov_base = arg
            if readv(pid, plocal, 1, premote, 1, 0) < 4:
                write(fd, OUT.struct.pack(out_size, -errno.EFAULT, unique))
                continue
            if cmd & 0xFF == _GET_STATE_NR:
                remote8.iov_base = arg
                if writev(pid, plocal, 1, premote8, 1, 0) != 8:
                    write(fd, OUT.struct.pack(out_size, -errno.EFAULT, unique))
                    continue
            write(fd, pack(out_size + 16, 0, unique, 0, 0, 0, 0))
            continue
        if n < HDR.size:
            continue
        buf = bytes(rbuf[:n])
        h = HDR.decode(buf)
        opcode, unique, body = h["opcode"], h["unique"], buf[HDR.size:]
        if opcode in (uapi.FUSE_FORGET, uapi.FUSE_BATCH_FORGET, uapi.FUSE_INTERRUPT):
            continue
        payload, err = b"", 0
        if opcode == uapi.FUSE_INIT:
            i = INIT_IN.decode(body)
            payload = INIT_OUT.encode(major=uapi.FUSE_KERNEL_VERSION,
                                      minor=min(i["minor"], uapi.FUSE_KERNEL_MINOR_VERSION),
                                      max_readahead=i["max_readahead"], max_background=16,
                                      congestion_threshold=12, max_write=128 * 1024, time_gran=1)
        elif opcode == uapi.FUSE_LOOKUP:
            if h["nodeid"] == uapi.FUSE_ROOT_ID and body.rstrip(b"\0") == b"dev":
                payload = ENTRY_OUT.encode(nodeid=2, entry_valid=86400, attr_valid=86400, **attr(2))
            else:
                err = errno.ENOENT
        elif opcode == uapi.FUSE_GETATTR:
            payload = ATTR_OUT.encode(attr_valid=86400, **attr(h["nodeid"]))
        elif opcode in (uapi.FUSE_OPEN, uapi.FUSE_OPENDIR):
            payload = OPEN_OUT.encode(fh=1, open_flags=uapi.FOPEN_DIRECT_IO)
        elif opcode not in (uapi.FUSE_RELEASE, uapi.FUSE_RELEASEDIR, uapi.FUSE_FLUSH, uapi.FUSE_DESTROY):
            err = errno.ENOSYS
        try:
            write(fd, OUT.struct.pack(out_size + len(payload), -err, unique) + payload)
        except OSError:
            pass


if __name__ == "__main__":
    sys.exit(main())
