"""The processes of `cusedev run` that still hold the emulator's node at a kexec, found and killed.

A reboot ends every process.  The emulated one ends the processes of the
runs: the launchers kill their trees, but a daemon that detached (setsid,
its parent gone, as the kernel's selftests leave one holding session fds) is
in no tree any more.  It is still a process of a run: it carries the run's
seccomp filter and lacks CAP_SYS_BOOT in its bounding set (``seccomp.spawn``
drops it), which no ordinary process does.  Such a process that holds an fd
of our node is killed here, after the kexec carried what it carries, so its
releases change nothing.  Other holders keep revoked fds (ENODEV).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import stat

log = logging.getLogger(__name__)

_CAP_SYS_BOOT = 22


def _is_run_process(pid: str) -> bool:
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            fields = dict(line.split(b":", 1) for line in f.read().splitlines() if b":" in line)
        seccomp = int(fields.get(b"Seccomp", b"0").strip() or 0)
        capbnd = int(fields.get(b"CapBnd", b"0").strip() or b"0", 16)
    except (OSError, ValueError):
        return False
    return seccomp == 2 and not capbnd >> _CAP_SYS_BOOT & 1


def _key(st: os.stat_result) -> tuple[bool, int, int]:
    """A node's identity: a char device by number, a (FUSE) file by inode."""
    if stat.S_ISCHR(st.st_mode):
        return True, st.st_rdev, 0
    return False, st.st_dev, st.st_ino


def _mounts(pid: str) -> dict[int, tuple[int, str]]:
    """mount id -> (st_dev, fstype) in ``pid``'s mount namespace (its mountinfo)."""
    out: dict[int, tuple[int, str]] = {}
    try:
        with open(f"/proc/{pid}/mountinfo") as f:
            for line in f:
                fields = line.split()
                ma, mi = fields[2].split(":")
                out[int(fields[0])] = (os.makedev(int(ma), int(mi)), fields[fields.index("-") + 1])
    except (OSError, ValueError, IndexError):
        pass
    return out


def _fdinfo(pid: str, n: str) -> tuple[int, int] | None:
    """(mnt_id, ino) of ``pid``'s fd ``n``, read without touching the file."""
    mnt = ino = None
    try:
        with open(f"/proc/{pid}/fdinfo/{n}") as f:
            for line in f:
                if line.startswith("mnt_id:"):
                    mnt = int(line.split()[1])
                elif line.startswith("ino:"):
                    ino = int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return (mnt, ino) if mnt is not None and ino is not None else None


def _holds(pid: str, match: set[tuple[bool, int, int]]) -> bool:
    """Whether ``pid`` has an fd of a node in ``match``.

    A file on a FUSE mount is matched by the mount's device and the inode from
    fdinfo, never stat'ed: a stat is a GETATTR to that mount's server, and a
    server that does not answer (stopped, or waiting on us) would hang the kill
    and so the emulated reboot.  Other files (a CUSE node on devtmpfs) are stat'ed.
    """
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    mounts: dict[int, tuple[int, str]] | None = None
    for n in names:
        info = _fdinfo(pid, n)
        if info is None:
            continue
        if mounts is None:
            mounts = _mounts(pid)
        if info[0] not in mounts:
            continue  # a detached mount (lazily unmounted): none of ours, which stay mounted while we serve
        dev, fstype = mounts[info[0]]
        if fstype == "fuse" or fstype.startswith(("fuse.", "fuseblk")):
            if (False, dev, info[1]) in match:
                return True
            continue
        try:
            st = os.stat(f"/proc/{pid}/fd/{n}")
        except OSError:
            continue
        if _key(st) in match:
            return True
    return False


def run_holders(*nodes: str) -> list[int]:
    """Pids of `cusedev run` processes holding an fd of any of ``nodes`` (device, session node; the
    emulator itself excluded)."""
    match = set()
    for node in nodes:
        try:
            match.add(_key(os.stat(node)))
        except OSError:
            pass
    if not match:
        return []
    me = str(os.getpid())
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit() and pid != me and _is_run_process(pid) and _holds(pid, match):
            out.append(int(pid))
    return out


def kill_run_holders(*nodes: str) -> list[int]:
    """SIGKILL every run process holding any of ``nodes``.

    Not waited for: a dying holder's close of a CUSE file waits for its RELEASE, which the caller's
    loop answers; and its releases need not come first (the files are revoked, the sessions carried).
    """
    pids = run_holders(*nodes)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if pids:
        log.info("kexec: killed %d process(es) of `cusedev run` still holding %s", len(pids), " and ".join(nodes))
    return pids
