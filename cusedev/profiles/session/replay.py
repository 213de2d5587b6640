"""The session ABI's replay rules: re-issue a 6.19/7.2 trace against a device and report divergences.

A session trace names its files by what they are: the device (``"on":
"device"``) or a session fd (``"on": "session"``, ``"session": NAME``), each
with an ``fh``.  Replay keeps one fd of its own per recorded ``fh``: device
files from ``open`` records, session files from the fd that a successful
CREATE_SESSION / RETRIEVE_SESSION gave back (the record's ``ret_fd.fh``); a
session record whose ``fh`` is unknown falls back to the newest fd of the
session it names.  The fd-returning commands need the replayer to run under
`cusedev run` against an emulator (as v3's FD_RESTORE does).

``trace record`` (ptrace) writes no close: a file is closed when every
process that used it has made its last call (a process's files die with it),
or earlier when the trace proves it: a successful open of the exclusive
device means every device file was closed, a successful CREATE_SESSION of a
name means the outgoing session of that name was released.  ``release``
records (``serve --trace``) close at once.

Each ioctl goes in with its recorded bytes (NULL, unmapped and read-only
pointers reproduced as v3's replay does); compared: errno, the bytes written
back (fd numbers aside: a returned fd only for being valid, a retrieved
file's contents against what was preserved).
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import sys
from typing import Any, TextIO

from ...libc import function
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

_FD_OFFSET = {c.cmd: uapi.ffi.offsetof(c.ctype, "fd")
              for c in (uapi.CREATE_SESSION, uapi.RETRIEVE_SESSION, uapi.RETRIEVE_FD)}
_PRESERVE = uapi.PRESERVE_FD.cmd
_PRESERVE_FD_AT = uapi.ffi.offsetof(uapi.PRESERVE_FD.ctype, "fd")
_SESSION_CMDS = (uapi.CREATE_SESSION.cmd, uapi.RETRIEVE_SESSION.cmd)
_RETRIEVE_FD = uapi.RETRIEVE_FD.cmd


_raw_ioctl = function("ioctl", (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p))


def _ioctl(fd: int, cmd: int, addr: int) -> int:
    """The raw ioctl; 0 or the errno."""
    return 0 if _raw_ioctl(fd, cmd & 0xFFFFFFFF, addr or None) >= 0 else ctypes.get_errno()


class SessionReplayer:
    def __init__(self, device: str, out: TextIO, quiet: bool, records: list[dict[str, Any]]):
        self.device, self.out, self.quiet = device, out, quiet
        self.fds: dict[int, int] = {}  # recorded fh -> our fd
        self.kind: dict[int, str] = {}  # recorded fh -> "device" | "session"
        self.session_of: dict[int, str] = {}  # session fh -> name
        self.standins: dict[tuple, int] = {}
        self.extra: list[int] = []
        self.preserved: dict[tuple[str, int], dict[str, Any]] = {}  # (session, token) -> file info
        # a file dies with the last process that used it: its close is due after that process's last record
        last_of_pid: dict[int, int] = {}
        pids_of: dict[int, set[int]] = {}
        newest: dict[str, int] = {}  # session name -> fh of its newest session file
        for i, r in enumerate(records):
            if "pid" not in r:
                continue
            pid = int(r["pid"])
            last_of_pid[pid] = i
            ret = r.get("ret_fd") or {}
            if ret.get("fh") is not None and ret.get("kind") == "session":
                newest[str(ret.get("name"))] = int(ret["fh"])
            fhs = [r.get("fh"), ret.get("fh")]
            if r.get("on") == "session" and r.get("session") is not None:
                # a file another process got (fork, SCM_RIGHTS) may carry an fh of its own: it keeps the
                # session's file alive as long as that process runs
                fhs.append(newest.get(str(r["session"])))
            for fh in fhs:
                if fh is not None:
                    pids_of.setdefault(int(fh), set()).add(pid)
        self.close_after = {fh: max(last_of_pid[p] for p in pids) for fh, pids in pids_of.items()}
        for r in records:  # what each (session, token) held, also for a replay that starts after the kexec
            if r.get("cmd") == _PRESERVE and r.get("errno") == 0 and "file" in r and r.get("session"):
                self.preserved[(str(r["session"]), int((r.get("in") or {}).get("token", 0)))] = r["file"]
        head = records[0] if records else {}
        # `serve --trace`: the emulator's own opens of its node are the session files it hands out, and
        # releases are recorded; `trace record`: neither, closes are inferred
        self.own_pid = None if "recorder" in head else head.get("emulator_pid")
        self.infer_closes = "recorder" in head
        self.own_fh: int | None = None
        self.divergences = self.replayed = self.skipped = 0

    # -- reporting -------------------------------------------------------------------------------
    @staticmethod
    def _label(rec: dict[str, Any]) -> str:
        if rec.get("type") == "ioctl":
            name = rec.get("name") if rec.get("name") != "unknown" else f"{rec.get('cmd', 0):#x}"
            on = rec.get("on")
            if on is None:
                return f"ioctl {name}"
            return f"ioctl {name} on {on}" + (f" {rec.get('session')!r}" if on == "session" else "")
        return str(rec.get("type"))

    def diverge(self, rec: dict[str, Any], what: str) -> None:
        self.divergences += 1
        self.out.write(f"record {rec.get('seq')}: {self._label(rec)}: DIVERGED: {what}\n")

    def ok(self, rec: dict[str, Any], text: str = "ok") -> None:
        if not self.quiet:
            self.out.write(f"record {rec.get('seq')}: {self._label(rec)}: {text}\n")

    def check_errno(self, rec: dict[str, Any], got: int) -> bool:
        want = int(rec.get("errno", 0) or 0)
        if want == got:
            return True
        hint = ""
        if got == errno.EOPNOTSUPP and rec.get("cmd") in _FD_OFFSET:
            hint = (" (the emulator installs a returned fd only under `cusedev run`: "
                    "cusedev run -- cusedev trace replay ...)")
        self.diverge(rec, f"errno: recorded {errname(want) if want else 0}, got {errname(got) if got else 0}{hint}")
        return False

    # -- files -----------------------------------------------------------------------------------
    def _close_fh(self, fh: int) -> None:
        fd = self.fds.pop(fh, None)
        self.kind.pop(fh, None)
        self.session_of.pop(fh, None)
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    def _adopt(self, fh: int | None, fd: int, kind: str, session: str | None = None) -> None:
        if fh is None:
            self.extra.append(fd)
            return
        self._close_fh(fh)
        self.fds[fh], self.kind[fh] = fd, kind
        if session is not None:
            self.session_of[fh] = session

    def fd_for(self, rec: dict[str, Any]) -> int | None:
        fh = rec.get("fh")
        if fh is not None and fh in self.fds:
            return self.fds[fh]
        if rec.get("on") == "session":
            name = rec.get("session")
            for f in sorted(self.fds, reverse=True):
                if self.session_of.get(f) == name:
                    return self.fds[f]
            return None
        if rec.get("on") == "device" or fh is not None:  # the trace began with the device open
            try:
                fd = os.open(self.device, os.O_RDWR | os.O_CLOEXEC)
            except OSError:
                return None
            self._adopt(fh if fh is not None else -1, fd, "device")
            return fd
        return None

    def reap(self, index: int) -> None:
        """Close the files whose every user has made its last call (their processes are gone)."""
        if not self.infer_closes:
            return
        for fh in [fh for fh in self.fds if self.close_after.get(fh, index) < index]:
            self._close_fh(fh)

    def close(self) -> None:
        for fh in list(self.fds):
            self._close_fh(fh)
        for fd in [*self.standins.values(), *self.extra]:
            try:
                os.close(fd)
            except OSError:
                pass
        self.standins.clear()
        self.extra.clear()

    # -- records ---------------------------------------------------------------------------------
    def step(self, index: int, rec: dict[str, Any]) -> None:
        self.reap(index)
        fn = getattr(self, f"do_{rec.get('type')}", None)
        if fn is None:
            return  # header, state, fault: context only
        self.replayed += 1
        fn(rec)

    def do_release(self, rec: dict[str, Any]) -> None:
        self._close_fh(int(rec.get("fh", -1)))

    def do_open(self, rec: dict[str, Any]) -> None:
        if self.own_pid is not None and rec.get("pid") == self.own_pid:
            self.own_fh = rec.get("fh")  # the session file the next fd-returning call hands out
            return
        flags = int(rec.get("flags", os.O_RDWR))
        # a re-open of a session fd through /proc (an own trace names no node: only the session node is ENXIO)
        if (rec.get("on") or ("session" if rec.get("errno") == errno.ENXIO else "device")) == "session":
            self._reopen_session(rec, flags)
            return
        real = not flags & os.O_PATH
        if real and rec.get("errno", 0) == 0:
            for fh, kind in list(self.kind.items()):  # the device is exclusive: the old opener has closed it
                if kind == "device":
                    self._close_fh(fh)
        try:
            fd, err = os.open(self.device, flags | os.O_CLOEXEC), 0
        except OSError as e:
            fd, err = -1, e.errno or 0
        if self.check_errno(rec, err):
            self.ok(rec)
        if fd >= 0:
            if real and rec.get("fh") is not None:
                self._adopt(int(rec["fh"]), fd, "device")
            else:
                os.close(fd)

    def _reopen_session(self, rec: dict[str, Any], flags: int) -> None:
        """Re-open, through /proc, the fd the replay holds for the recorded session (its latest)."""
        name = rec.get("session")
        held = [fh for fh in sorted(self.fds, reverse=True)
                if self.kind.get(fh) == "session" and (name is None or self.session_of.get(fh) == name)]
        if not held:
            self.diverge(rec, f"no session fd to re-open ({name!s})")
            return
        try:
            fd, err = os.open(f"/proc/self/fd/{self.fds[held[0]]}", flags | os.O_CLOEXEC), 0
        except OSError as e:
            fd, err = -1, e.errno or 0
        if fd >= 0:
            os.close(fd)
        if self.check_errno(rec, err):
            self.ok(rec)

    def do_kexec(self, rec: dict[str, Any]) -> None:
        r = emulator_kexec(self.device, rec)
        if self.check_errno(rec, 0 if r.get("ok") else int(r.get("errno") or errno.EIO)):
            self.ok(rec)

    def _keep(self, fd: int) -> int:
        self.extra.append(fd)
        return fd

    def standin(self, info: dict[str, Any] | None, recorded_fd: int, want: int) -> int:
        """An fd of ours that PRESERVE_FD will treat as the recorded one was treated."""
        kind = (info or {}).get("kind")
        if kind is None or kind == "error" or recorded_fd < 0:
            return recorded_fd
        assert info is not None
        if kind == "none":
            return unused_fd(recorded_fd)
        if kind == "session":
            for fh, name in self.session_of.items():
                if name == info.get("name"):
                    return self.fds[fh]
        if kind == "device":  # the trace does not say how it was opened; an O_PATH one is EBADF to fdget
            if want == errno.EBADF:
                return self._keep(os.open(self.device, os.O_PATH | os.O_CLOEXEC))
            for fh, k in self.kind.items():
                if k == "device":
                    return self.fds[fh]
        # one stand-in per recorded file: by dev/ino (`serve --trace`, `trace record`), else (a trace recorded
        # before `trace record` kept them) by the number it had and what it held (a file preserved twice must
        # be the same file twice: EBUSY)
        if info.get("ino") is not None:
            key: tuple = (kind, info.get("dev"), info.get("ino"))
        else:
            key = (kind, recorded_fd, info.get("size"), info.get("sha256"))
        known = self.standins.get(key)
        if known is not None:
            return known
        if kind == "opath":
            fd = os.open("/", os.O_PATH | os.O_CLOEXEC)
        elif kind == "shmem":
            fd = standin_memfd(info)
        else:  # other, or a session/device the replay does not hold
            fd = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
        self.standins[key] = fd
        return fd

    def _released_by_create(self, rec: dict[str, Any]) -> None:
        """A successful CREATE_SESSION of NAME: the recorded outgoing session NAME had been released."""
        name = (rec.get("in") or {}).get("name")
        if rec.get("cmd") != uapi.CREATE_SESSION.cmd or rec.get("errno", 0) != 0 or name is None:
            return
        for fh, n in list(self.session_of.items()):
            if n == name:
                self._close_fh(fh)

    def do_ioctl(self, rec: dict[str, Any]) -> None:
        inj = rec.get("injected")
        if inj and (inj.get("errno") or rec.get("errno")):
            self.skipped += 1
            self.ok(rec, f"skipped (fault injected by {inj.get('rule')!r})")
            return
        self._released_by_create(rec)
        fd = self.fd_for(rec)
        if fd is None:
            self.diverge(rec, f"no open file for fh {rec.get('fh')} ({rec.get('on')} {rec.get('session', '')!s})")
            return
        cmd = int(rec.get("cmd", 0))
        want = int(rec.get("errno", 0) or 0)
        data = bytearray(bytes.fromhex(rec.get("in_hex", "")))
        if cmd == _PRESERVE and len(data) >= _PRESERVE_FD_AT + 4 and "file" in rec:
            at = _PRESERVE_FD_AT
            given = self.standin(rec["file"], int.from_bytes(data[at:at + 4], sys.byteorder, signed=True),
                                 want)
            data[at:at + 4] = given.to_bytes(4, sys.byteorder, signed=True)
        region: Region | None = None
        c = uapi.BY_CMD.get(cmd)
        try:
            addr, region = place_argument(rec, data, want, blank=80, op_size=None if c is None else c.size,
                                          tail=rec.get("tail") or ({"offset": 0} if want == errno.E2BIG else {}))
            got = _ioctl(fd, cmd, addr)
            if not self.check_errno(rec, got):
                return
            if got == 0 and region is not None and not self._check_out(rec, cmd, region):
                return
        finally:
            if region is not None:
                region.close()
        if got == 0 and cmd == _PRESERVE:
            token = (rec.get("in") or {}).get("token")
            if token is not None and "file" in rec:
                self.preserved[(self._session_name(rec), int(token))] = rec["file"]
        self.ok(rec)

    def _check_out(self, rec: dict[str, Any], cmd: int, region: Region) -> bool:
        if "out_hex" not in rec:
            return True
        want = bytes.fromhex(rec["out_hex"])
        got = bytearray(region.read(len(want)))
        at = _FD_OFFSET.get(cmd)
        newfd = -1
        if at is not None and len(got) >= at + 4:
            newfd = int.from_bytes(got[at:at + 4], sys.byteorder, signed=True)
            got[at:at + 4] = want[at:at + 4]
            if newfd < 0:
                self.diverge(rec, f"output fd: got {newfd}")
                return False
        if bytes(got) != want:
            self.diverge(rec, f"output bytes: recorded {want.hex()}, got {bytes(got).hex()}")
            if newfd >= 0:
                self.extra.append(newfd)
            return False
        if newfd < 0:
            return True
        ret = rec.get("ret_fd") or {}
        if cmd in _SESSION_CMDS:
            name = ret.get("name", (rec.get("in") or {}).get("name"))
            fh, self.own_fh = ret.get("fh", self.own_fh), None
            self._adopt(fh, newfd, "session", name)
            return True
        self.extra.append(newfd)  # RETRIEVE_FD: a file of the client's, compared with what was preserved
        return self._check_retrieved(rec, newfd)

    def _session_name(self, rec: dict[str, Any]) -> str:
        return str(rec.get("session") or self.session_of.get(int(rec.get("fh", -1)), ""))

    def _check_retrieved(self, rec: dict[str, Any], fd: int) -> bool:
        token = (rec.get("in") or {}).get("token")
        info = self.preserved.get((self._session_name(rec), int(token or 0)))
        if not info or "sha256" not in info:
            return True
        try:
            size, digest = os.fstat(fd).st_size, file_digest(fd, info.get("digest_len"))
        except OSError as e:
            self.diverge(rec, f"retrieved fd {fd}: {e.strerror}")
            return False
        want = standin_digest(info)
        if size != info.get("size") or digest != want:
            self.diverge(rec, f"retrieved contents: preserved {info.get('size')} bytes sha256 {want[:16]}…, "
                              f"got {size} bytes sha256 {digest[:16]}…")
            return False
        return True


def replay(records: list[dict[str, Any]], device: str, *, stop_at_kexec: bool = False, after_kexec: bool = False,
           quiet: bool = False, out: TextIO | None = None, path: str = "") -> int:
    """Replay a session trace's ``records`` (header first, already checked) against ``device``; 0 when
    nothing diverged, 1 otherwise."""
    out = out or sys.stdout
    kexecs = [i for i, r in enumerate(records) if r.get("type") == "kexec" and r.get("ret", 0) == 0]
    if (stop_at_kexec or after_kexec) and not kexecs:
        raise ReplayError(f"{path}: the trace has no kexec")
    start, end = 1, len(records)
    if stop_at_kexec:
        end = kexecs[0]
    elif after_kexec:
        start = kexecs[0] + 1
    rep = SessionReplayer(device, out, quiet, records)

    def summary() -> None:
        out.write(f"replayed {rep.replayed} records ({rep.skipped} injected faults skipped): "
                  f"{rep.divergences} divergence{'s' if rep.divergences != 1 else ''}\n")
        out.flush()

    try:
        for i in range(start, end):
            rep.step(i, records[i])
        if stop_at_kexec:
            # said before the wait: under `cusedev run` the kexec ends this process, as a reboot would
            summary()
            out.write("reached the kexec: holding the files open; kexec now (or interrupt to give up)\n")
            out.flush()
            sigs = {signal.SIGINT, signal.SIGTERM}
            old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
            try:
                signal.sigwait(sigs)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, old)
    finally:
        rep.close()
    if not stop_at_kexec:
        summary()
    return 0 if rep.divergences == 0 else 1
