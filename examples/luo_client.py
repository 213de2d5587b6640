#!/usr/bin/env python3
"""luo_client.py: every /dev/liveupdate ioctl through ``cusedev.client``, with its result printed.

The Python twin of luo_client.c; works against a real LUO v3 kernel and the emulator alike.

Usage:  luo_client.py tour    [DEVICE]         every ioctl, success and error cases; leaves nothing behind
        luo_client.py prepare [DEVICE] TOKEN   preserve a 64 KiB memfd, PREPARE, hold the device open
                                               until a line arrives on stdin (do the kexec meanwhile)
        luo_client.py restore [DEVICE] TOKEN   after the kexec: restore, verify, FINISH
                                               (with the emulator: under `cusedev run`)
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import sys
from collections.abc import Callable
from typing import Any, TextIO

from cusedev.client import Event, LiveUpdateDevice, State, new_struct
from cusedev.uapi import IO, LIVEUPDATE_IOCTL_GET_STATE, LIVEUPDATE_IOCTL_TYPE

RAM_SIZE = 64 * 1024


class Client:
    """Prints ``NAME(args) = 0 [-> out]`` or ``NAME(args) = -1 ERRNO (message)`` per call, counts surprises."""

    def __init__(self, dev: LiveUpdateDevice, out: TextIO):
        self.dev, self.out, self.failures = dev, out, 0

    def call(self, what: str, fn: Callable[[], Any], expect: int = 0, want: Any = None) -> Any:
        try:
            result = fn()
            err = 0
        except OSError as e:
            result, err = None, e.errno or 0
        if err:
            print(f"{what} = -1 {errno.errorcode[err]} ({os.strerror(err)})", file=self.out)
        elif isinstance(result, State):
            print(f"{what} = 0 -> {result.label}", file=self.out)
        elif isinstance(result, int) and "RESTORE" in what:
            print(f"{what} = 0 -> fd {result}", file=self.out)
        else:
            print(f"{what} = 0", file=self.out)
        if err != expect or (want is not None and result != want):
            print(f"luo_client.py: unexpected result of {what}", file=sys.stderr)
            self.failures += 1
        return result


def guest_ram(token: int) -> int:
    fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC)
    os.write(fd, pattern(token))
    return fd


def pattern(token: int) -> bytes:
    return bytes((i * 31 + token) & 0xFF for i in range(RAM_SIZE))


def tour(c: Client) -> None:
    d, tok = c.dev, 0x1001
    fd = guest_ram(tok)
    c.call("GET_STATE()", lambda: d.state, want=State.NORMAL)
    c.call(f"FD_PRESERVE(fd={fd}, token={tok:#x})", lambda: d.preserve(fd, tok))
    c.call(f"FD_PRESERVE(fd={fd}, token={tok:#x})", lambda: d.preserve(fd, tok), errno.EEXIST)
    c.call("FD_PRESERVE(fd=9999, token=0x2002)", lambda: d.preserve(9999, 0x2002), errno.EBADF)
    c.call(f"GET_FD_STATE(token={tok:#x}, incoming=0)", lambda: d.fd_state(tok), want=State.NORMAL)
    c.call(f"GET_FD_STATE(token={tok:#x}, incoming=1)", lambda: d.fd_state(tok, incoming=True), errno.ENOENT)
    c.call(f"SET_FD_EVENT(token={tok:#x}, PREPARE)", lambda: d.set_fd_event(tok, Event.PREPARE))
    c.call(f"GET_FD_STATE(token={tok:#x}, incoming=0)", lambda: d.fd_state(tok), want=State.PREPARED)
    c.call(f"SET_FD_EVENT(token={tok:#x}, CANCEL)", lambda: d.set_fd_event(tok, Event.CANCEL))
    c.call(f"SET_FD_EVENT(token={tok:#x}, FINISH)", lambda: d.set_fd_event(tok, Event.FINISH), errno.EBUSY)
    c.call(f"FD_UNPRESERVE(token={tok:#x})", lambda: d.unpreserve(tok))
    c.call(f"FD_UNPRESERVE(token={tok:#x})", lambda: d.unpreserve(tok), errno.ENOENT)
    c.call(f"FD_RESTORE(token={tok:#x})", lambda: d.restore(tok), errno.EBUSY)
    c.call(f"FD_PRESERVE(fd={fd}, token={tok:#x})", lambda: d.preserve(fd, tok))
    c.call("SET_EVENT(FREEZE)", lambda: d.set_event(Event.FREEZE), errno.EINVAL)
    c.call("SET_EVENT(PREPARE)", d.prepare)
    c.call("GET_STATE()", lambda: d.state, want=State.PREPARED)
    c.call(f"GET_FD_STATE(token={tok:#x}, incoming=0)", lambda: d.fd_state(tok), want=State.PREPARED)
    c.call(f"FD_PRESERVE(fd={fd}, token=0x3003)", lambda: d.preserve(fd, 0x3003), errno.EBUSY)
    c.call("SET_EVENT(CANCEL)", d.cancel)
    c.call("GET_STATE()", lambda: d.state, want=State.NORMAL)
    c.call("SET_EVENT(FINISH)", d.finish, errno.EINVAL)
    # the raw escape hatch: malformed input built from the cdefs
    c.call("GET_STATE(size=4)", lambda: d.ioctl(LIVEUPDATE_IOCTL_GET_STATE, new_struct("get_state", size=4)),
           errno.EINVAL)
    c.call("ioctl(nr=7)", lambda: d.ioctl(IO(LIVEUPDATE_IOCTL_TYPE, 7), new_struct("get_state")), errno.EINVAL)
    os.close(fd)


def prepare(c: Client, token: int, stdin: TextIO) -> None:
    d = c.dev
    fd = guest_ram(token)
    c.call(f"FD_PRESERVE(fd={fd}, token={token:#x})", lambda: d.preserve(fd, token))
    c.call("SET_EVENT(PREPARE)", d.prepare)
    c.call("GET_STATE()", lambda: d.state, want=State.PREPARED)
    print("prepared: holding the device open until the kexec (press enter)", file=c.out, flush=True)
    stdin.readline()
    # a real kernel would have ended this process; the emulator revokes the handle (ENODEV)
    c.call("GET_STATE()", lambda: d.state, errno.ENODEV)


def restore(c: Client, token: int) -> None:
    d = c.dev
    c.call("GET_STATE()", lambda: d.state, want=State.UPDATED)
    c.call(f"GET_FD_STATE(token={token:#x}, incoming=1)", lambda: d.fd_state(token, True), want=State.UPDATED)
    fd = c.call(f"FD_RESTORE(token={token:#x})", lambda: d.restore(token))
    c.call(f"FD_RESTORE(token={token:#x})", lambda: d.restore(token), errno.EINVAL)  # single use
    if fd is not None:
        with mmap.mmap(fd, RAM_SIZE, prot=mmap.PROT_READ) as m:
            bad = sum(a != b for a, b in zip(m[:], pattern(token), strict=True))
        cloexec = bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC)
        print(f"restored fd {fd}: {bad} of {RAM_SIZE} bytes differ, {'O_CLOEXEC' if cloexec else 'no O_CLOEXEC'}",
              file=c.out)
        c.failures += bad != 0 or not cloexec
        os.close(fd)
    c.call(f"SET_FD_EVENT(token={token:#x}, FINISH)", lambda: d.set_fd_event(token, Event.FINISH))
    c.call(f"GET_FD_STATE(token={token:#x}, incoming=1)", lambda: d.fd_state(token, True), want=State.NORMAL)
    c.call("SET_EVENT(FINISH)", d.finish)
    c.call("GET_STATE()", lambda: d.state, want=State.NORMAL)


def main(argv: list[str] | None = None, out: TextIO = sys.stdout, stdin: TextIO = sys.stdin) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    mode = args.pop(0) if args else "tour"
    path = args.pop(0) if args and args[0].startswith("/") else "/dev/liveupdate"
    token = int(args[0], 0) if args else 0x1001
    if mode not in ("tour", "prepare", "restore"):
        print("usage: luo_client.py tour|prepare|restore [DEVICE] [TOKEN]", file=sys.stderr)
        return 2
    with LiveUpdateDevice(path) as dev:
        print(f"open({path}) = {dev.fileno()}", file=out)
        c = Client(dev, out)
        if mode == "tour":
            tour(c)
        elif mode == "prepare":
            prepare(c, token, stdin)
        else:
            restore(c, token)
    print(f"{mode}: {'UNEXPECTED RESULTS' if c.failures else 'ok'}", file=out)
    return 1 if c.failures else 0


if __name__ == "__main__":
    sys.exit(main())
