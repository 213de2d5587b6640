"""v3's replay rules: re-issue a v3 trace against a device (an emulator or a real kernel) and report divergences.

Each ioctl is re-issued with its recorded bytes (so malformed calls replay
too); pointers the recording could not read are reproduced: NULL stays
NULL, an unreadable argument becomes an address just past a mapping (with
whatever prefix was readable before it), an unwritable one a read-only page.
Preserved fds are stood in by fresh memfds of the recorded size and content
(one per recorded file), other fds by files of the same kind.  Compared per
record: errno, output fields (a restored fd only for being valid, its
contents against the preserved file's digest) and the state afterwards.

A trace spanning a kexec replays in one go against an emulator (the kexec
goes through its control socket) or in two stages against a kernel:
``--stop-at-kexec`` (then reboot with kexec) and ``--after-kexec``.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import time
from typing import Any, TextIO

from ...tracing.replay import (
    Region,
    ReplayError,
    emulator_kexec,
    file_digest,
    place_argument,
    standin_digest,
    standin_memfd,
    unused_fd,
)
from ...tracing.show import errname
from . import uapi
from .client import LiveUpdateDevice

_OP_SIZE = {cmd: io.size for cmd, io in uapi.LUO_IOCTLS.items()}
_GS = uapi.LIVEUPDATE_IOCTL_GET_STATE
_RESTORE = uapi.LIVEUPDATE_IOCTL_FD_RESTORE
_PRESERVE = uapi.LIVEUPDATE_IOCTL_FD_PRESERVE


class Replayer:
    def __init__(self, device: str, out: TextIO, quiet: bool, files: dict[int, dict[str, Any]]):
        self.device = device
        self.out = out
        self.quiet = quiet
        self.files_by_token = files  # token -> recorded file info (to check restored contents)
        self.handles: dict[int, LiveUpdateDevice] = {}
        self.standins: dict[tuple, int] = {}
        self.extra_fds: list[int] = []
        self.divergences = 0
        self.replayed = 0
        self.skipped = 0

    # -- reporting -------------------------------------------------------------------------------
    def diverge(self, rec: dict[str, Any], what: str) -> None:
        self.divergences += 1
        self.out.write(f"record {rec.get('seq')}: {self._label(rec)}: DIVERGED: {what}\n")

    @staticmethod
    def _label(rec: dict[str, Any]) -> str:
        if rec.get("type") == "ioctl":
            return f"ioctl {rec.get('name')}" if rec.get("name") != "unknown" else f"ioctl {rec.get('cmd', 0):#x}"
        return str(rec.get("type"))

    def ok(self, rec: dict[str, Any], text: str) -> None:
        if not self.quiet:
            self.out.write(f"record {rec.get('seq')}: {self._label(rec)}: {text}\n")

    def check_errno(self, rec: dict[str, Any], got: int) -> bool:
        want = rec.get("errno", 0)
        if want != got:
            hint = ""
            if got == errno.EOPNOTSUPP and rec.get("cmd") == _RESTORE:
                hint = (" (the emulator installs a restored fd only under `cusedev run`: "
                        "cusedev run -- cusedev trace replay ...)")
            self.diverge(rec, f"errno: recorded {errname(want) if want else 0}, got {errname(got) if got else 0}"
                         + hint)
            return False
        return True

    # -- handles ---------------------------------------------------------------------------------
    def handle(self, fh: int) -> LiveUpdateDevice:
        h = self.handles.get(fh)
        if h is None:  # the trace started with the device already open
            h = self.handles[fh] = LiveUpdateDevice(self.device)
        return h

    def close(self) -> None:
        for h in self.handles.values():
            h.close()
        self.handles.clear()
        for fd in [*self.standins.values(), *self.extra_fds]:
            try:
                os.close(fd)
            except OSError:
                pass
        self.standins.clear()

    # -- records ---------------------------------------------------------------------------------
    def step(self, rec: dict[str, Any]) -> None:
        kind = rec.get("type")
        fn = getattr(self, f"do_{kind}", None)
        if fn is None:
            return  # header, state, fault: context only
        self.replayed += 1
        fn(rec)

    def do_open(self, rec: dict[str, Any]) -> None:
        try:
            h = LiveUpdateDevice(self.device, rec.get("flags", os.O_RDWR) & os.O_ACCMODE)
            err = 0
        except OSError as e:
            h, err = None, e.errno or 0
        if self.check_errno(rec, err):
            self.ok(rec, "ok")
        if h is not None:
            if rec.get("fh"):
                old = self.handles.pop(rec["fh"], None)
                if old is not None:
                    old.close()
                self.handles[rec["fh"]] = h
            else:
                h.close()

    def do_release(self, rec: dict[str, Any]) -> None:
        h = self.handles.pop(rec.get("fh", -1), None)
        if h is not None:
            h.close()

    def do_read(self, rec: dict[str, Any]) -> None:
        self._rw(rec, lambda fd: os.read(fd, rec.get("count", 1)))

    def do_write(self, rec: dict[str, Any]) -> None:
        self._rw(rec, lambda fd: os.write(fd, bytes(rec.get("count", 1))))

    def _rw(self, rec: dict[str, Any], fn: Any) -> None:
        try:
            fn(self.handle(rec.get("fh", 0)).fd)
            err = 0
        except OSError as e:
            err = e.errno or 0
        if self.check_errno(rec, err):
            self.ok(rec, "ok")

    def do_kexec(self, rec: dict[str, Any]) -> None:
        r = emulator_kexec(self.device, rec)
        err = 0 if r.get("ok") else int(r.get("errno") or errno.EIO)
        if not self.check_errno(rec, err):
            return
        if err == 0 and bool(r.get("live")) != bool(rec.get("live")):
            self.diverge(rec, f"live update: recorded {rec.get('live')}, got {r.get('live')}")
        elif err == 0 and r.get("state") != rec.get("state_after"):
            self.diverge(rec, f"state: recorded {rec.get('state_after')}, got {r.get('state')}")
        else:
            self.ok(rec, "ok")

    def standin(self, info: dict[str, Any] | None, recorded_fd: int) -> int:
        """An fd of ours that FD_PRESERVE will treat as the recorded one was treated."""
        kind = (info or {}).get("kind")
        if kind is None or kind == "error" or recorded_fd < 0:
            return recorded_fd
        if kind == "none":
            return unused_fd(recorded_fd)
        assert info is not None  # kind came from it
        key = (kind, info.get("dev"), info.get("ino"))
        known = self.standins.get(key)
        if known is not None:
            return known
        if kind == "opath":
            fd = os.open("/", os.O_PATH | os.O_CLOEXEC)
        elif kind == "other":
            fd = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
        else:
            fd = standin_memfd(info)
        self.standins[key] = fd
        return fd

    def do_ioctl(self, rec: dict[str, Any]) -> None:
        inj = rec.get("injected")
        if inj and (inj.get("errno") or rec.get("errno")):
            self.skipped += 1
            self.ok(rec, f"skipped (fault injected by {inj.get('rule')!r})")
            return
        cmd = int(rec.get("cmd", 0))
        want = int(rec.get("errno", 0))
        data = bytearray(bytes.fromhex(rec.get("in_hex", "")))
        region: Region | None = None
        if cmd == _PRESERVE and len(data) >= 8 and "file" in rec:
            recorded_fd = int.from_bytes(data[4:8], sys.byteorder, signed=True)
            fd = self.standin(rec["file"], recorded_fd)
            data[4:8] = fd.to_bytes(4, sys.byteorder, signed=True)
        try:
            addr, region = place_argument(rec, data, want, blank=64, op_size=_OP_SIZE.get(cmd),
                                          tail=rec.get("tail") or {})
            try:
                self.handle(int(rec.get("fh", 0))).ioctl_raw(cmd, addr)
                got = 0
            except OSError as e:
                got = e.errno or 0
            if not self.check_errno(rec, got):
                return
            if got == 0 and "out_hex" in rec and region is not None:
                if not self._check_out(rec, cmd, region):
                    return
        finally:
            if region is not None:
                region.close()
        if not self._check_state(rec):
            return
        self.ok(rec, "ok")

    def _check_out(self, rec: dict[str, Any], cmd: int, region: Region) -> bool:
        want = bytes.fromhex(rec["out_hex"])
        got = region.read(len(want))
        op = uapi.LUO_IOCTLS.get(cmd)
        if op is None:
            return True
        c = uapi.codec(op.ctype)
        w = c.decode(want + bytes(c.size - len(want))) if len(want) <= c.size else {}
        g = c.decode(got + bytes(c.size - len(got))) if len(got) <= c.size else {}
        for name in rec.get("out", {}):
            if cmd == _RESTORE and name == "fd":
                fd = g.get("fd", -1)
                if fd < 0:
                    self.diverge(rec, f"output fd: got {fd}")
                    return False
                self.extra_fds.append(fd)
                return self._check_restored(rec, fd)
            if w.get(name) != g.get(name):
                self.diverge(rec, f"output {name}: recorded {rec['out'][name]}, got {g.get(name)}")
                return False
        return True

    def _check_restored(self, rec: dict[str, Any], fd: int) -> bool:
        token = rec.get("in", {}).get("token")
        info = self.files_by_token.get(token)
        if not info or "sha256" not in info:
            return True
        try:
            size = os.fstat(fd).st_size
            digest = file_digest(fd, info.get("digest_len"))
        except OSError as e:
            self.diverge(rec, f"restored fd {fd}: {e.strerror}")
            return False
        want = standin_digest(info)
        if size != info.get("size") or digest != want:
            what = "recorded" if "data" in info else "stand-in (contents not in the trace: zeros)"
            self.diverge(rec, f"restored contents: {what} {info.get('size')} bytes sha256 {want[:16]}…, "
                              f"got {size} bytes sha256 {digest[:16]}…")
            return False
        return True

    def _check_state(self, rec: dict[str, Any]) -> bool:
        want = rec.get("state_after")
        h = self.handles.get(int(rec.get("fh", 0)))
        if want is None or h is None:
            return True
        try:
            got = uapi.STATE_NAMES.get(int(h.state), "?")
        except OSError:
            return True  # revoked or closed: nothing to compare through this handle
        if got != want:
            self.diverge(rec, f"state: recorded {want}, got {got}")
            return False
        return True


def _hold_until_kexec(rep: Replayer, out: TextIO) -> None:
    """Stage one done: keep the device open (closing would unpreserve) until the kexec or a signal."""
    stop = False

    def on_signal(signum: int, frame: Any) -> None:
        nonlocal stop
        stop = True

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    out.write("reached the kexec: holding the device open; kexec now (or interrupt to give up)\n")
    out.flush()
    try:
        while not stop and rep.handles:
            h = next(iter(rep.handles.values()))
            try:
                h.state  # noqa: B018 - a revoked handle (the emulator's kexec) ends the wait
            except OSError:
                break
            time.sleep(0.1)
    finally:
        for s, prev in old.items():
            signal.signal(s, prev)


def replay(records: list[dict[str, Any]], device: str, *, stop_at_kexec: bool = False, after_kexec: bool = False,
           quiet: bool = False, out: TextIO | None = None, path: str = "") -> int:
    """Replay a v3 trace's ``records`` (header first, already checked) against ``device``; 0 when
    nothing diverged, 1 otherwise."""
    out = out or sys.stdout
    kexecs = [i for i, r in enumerate(records) if r.get("type") == "kexec" and r.get("ret", 0) == 0]
    if (stop_at_kexec or after_kexec) and not kexecs:
        raise ReplayError(f"{path}: the trace has no kexec")
    if stop_at_kexec:
        todo = records[1:kexecs[0]]
    elif after_kexec:
        todo = records[kexecs[0] + 1:]
    else:
        todo = records[1:]
    files = {}
    for r in records:
        if r.get("type") == "ioctl" and r.get("cmd") == _PRESERVE and r.get("errno") == 0 and "file" in r:
            files[r.get("in", {}).get("token")] = r["file"]
    rep = Replayer(device, out, quiet, files)
    try:
        for rec in todo:
            rep.step(rec)
        if stop_at_kexec:
            _hold_until_kexec(rep, out)
    finally:
        rep.close()
    out.write(f"replayed {rep.replayed} records ({rep.skipped} injected faults skipped): "
              f"{rep.divergences} divergence{'s' if rep.divergences != 1 else ''}\n")
    out.flush()
    return 0 if rep.divergences == 0 else 1
