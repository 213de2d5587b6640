"""A scripted client for lifecycle tests, run under `cusedev run` (or not) by the test suite.

argv[1] is a JSON list of steps; one JSON result line per step goes to stdout
(flushed, since a reboot step may end the process).  Errors are results, not
exceptions: {"errno": N}.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import json
import os
import sys
import time

from cusedev.client import LiveUpdateDevice

libc = ctypes.CDLL(None, use_errno=True)
REBOOT_MAGIC1, REBOOT_MAGIC2 = 0xFEE1DEAD, 672274793
CMDS = {"kexec": 0x45584543, "cad_off": 0x00000000}


def pattern(size: int, seed: int) -> bytes:
    block = hashlib.sha256(seed.to_bytes(8, "little")).digest() * 128  # 4 KiB
    return (block * (size // len(block) + 1))[:size]


def digest(fd: int) -> str:
    h = hashlib.sha256()
    off = 0
    while chunk := os.pread(fd, 1 << 20, off):
        h.update(chunk)
        off += len(chunk)
    return h.hexdigest()


def main() -> None:
    dev: LiveUpdateDevice | None = None
    keep: list[int] = []
    for step in json.loads(sys.argv[1]):
        op, *args = step
        try:
            if op == "open":
                dev = LiveUpdateDevice(args[0])
                out: object = {}
            elif op == "close":
                assert dev
                dev.close()
                out = {}
            elif op == "memfd":  # token, size, seed, pos
                token, size, seed, pos = args
                fd = os.memfd_create(f"ram-{token}", os.MFD_CLOEXEC)
                os.write(fd, pattern(size, seed))
                os.lseek(fd, pos, os.SEEK_SET)
                keep.append(fd)
                assert dev
                dev.preserve(fd, token)
                out = {"fd": fd, "sha": digest(fd)}
            elif op == "prepare":
                assert dev
                dev.prepare()
                out = {}
            elif op == "finish":
                assert dev
                dev.finish()
                out = {}
            elif op == "state":
                assert dev
                out = {"state": int(dev.state)}
            elif op == "fd_state":
                assert dev
                out = {"state": int(dev.fd_state(args[0], incoming=bool(args[1])))}
            elif op == "restore":
                assert dev
                fd = dev.restore(args[0])
                keep.append(fd)
                out = {
                    "fd": fd,
                    "cloexec": bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC),
                    "size": os.fstat(fd).st_size,
                    "pos": os.lseek(fd, 0, os.SEEK_CUR),
                    "sha": digest(fd),
                    "writable": os.pwrite(fd, b"", 0) == 0,
                }
            elif op == "sleeper":  # a grandchild that would outlive us without the kexec
                pid = os.fork()
                if pid == 0:
                    os.setsid()
                    time.sleep(600)
                    os._exit(0)
                out = {"pid": pid}
            elif op == "reboot":
                sys.stdout.flush()
                r = libc.syscall(169, REBOOT_MAGIC1, REBOOT_MAGIC2, CMDS[args[0]], None)
                out = {"rc": r, "errno": ctypes.get_errno() if r < 0 else 0}
            else:
                out = {"error": f"unknown step {op}"}
        except OSError as e:
            out = {"errno": e.errno}
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
