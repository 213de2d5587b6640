"""Reading and showing traces: records of a JSON Lines file, one strace-style line per record."""

from __future__ import annotations

import errno
import json
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

#: errno names as the kernel's headers and docs spell them (Python's table says ENOTSUP for 95)
_ERRNAMES = {**errno.errorcode, errno.EOPNOTSUPP: "EOPNOTSUPP", errno.EAGAIN: "EAGAIN", errno.EDEADLK: "EDEADLK"}


def errname(code: int) -> str:
    return _ERRNAMES.get(code, str(code))


# -- reading and showing ----------------------------------------------------------------------------------
def read_records(path: str) -> Iterator[dict[str, Any]]:
    """Records of a trace file; a torn last line (crash mid-write) is skipped."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                yield json.loads(line)
            except ValueError:
                continue


def _fmt_value(v: Any) -> str:
    return str(v)


def _struct(fields: dict[str, Any]) -> str:
    return "{" + ", ".join(f"{k}={v:#x}" if k == "token" and isinstance(v, int) else f"{k}={_fmt_value(v)}"
                           for k, v in fields.items()) + "}"


_COLORS = {"err": "\033[31m", "inj": "\033[35m", "ev": "\033[33m", "dim": "\033[2m", "off": "\033[0m"}


def format_record(r: dict[str, Any], color: bool = False) -> str | None:
    """One strace-style line, or None for the header."""
    kind = r.get("type")
    if kind == "header":
        return None
    c = _COLORS if color else dict.fromkeys(_COLORS, "")
    t = r.get("time", 0.0)
    stamp = time.strftime("%H:%M:%S", time.localtime(t)) + f".{int(round((t % 1) * 1e6)) % 1000000:06d}"
    who = f"[pid {r['pid']} {r.get('comm', '?')}] " if "pid" in r else ""
    err = r.get("errno", 0)

    def result(ok: str = "0") -> str:
        if r.get("ret", 0) == -1 or err:
            s = f"{c['err']}= -1 {errname(err)} ({os.strerror(err)}){c['off']}"
        else:
            s = f"= {ok}"
        if r.get("injected") and (r["injected"].get("errno") or err):
            s += f" {c['inj']}(INJECTED){c['off']}"
        elif r.get("injected"):
            s += f" {c['inj']}(DELAYED {r['injected'].get('delay', 0) * 1000:g}ms){c['off']}"
        return s

    if kind == "ioctl":
        name = r.get("name", "unknown")
        cmdtxt = name if name != "unknown" else f"{r.get('cmd', 0):#x}"
        if "in" in r:
            argtxt = _struct(r["in"])
        elif r.get("arg") == 0:
            argtxt = "NULL"
        else:
            argtxt = f"{r.get('arg', 0):#x}"
        if r.get("out"):
            argtxt += " => " + _struct(r["out"])
        if r.get("file"):
            f = r["file"]
            argtxt += f" <{f.get('kind')}" + (f" {f['size']}B" if "size" in f else "") + ">"
        if "state_before" not in r:  # a client-side (ptrace) record: no model state, no time in a driver
            return f"{stamp} {who}ioctl({cmdtxt}, {argtxt}) {result()}"
        sb, sa = r.get("state_before", "?"), r.get("state_after", "?")
        states = f"<{sb}>" if sb == sa else f"{c['ev']}<{sb} → {sa}>{c['off']}"
        dur = f"{r.get('dur_us', 0):.0f}us"
        return f"{stamp} {who}ioctl({cmdtxt}, {argtxt}) {result()} {states} {dur}"
    if kind == "open":
        fh = r.get("fh")
        return f"{stamp} {who}open({open_flags(r.get('flags', 0))}) {result(f'fh {fh}')}"
    if kind == "release":
        return f"{stamp} release(fh {r.get('fh')}) = 0"
    if kind in ("read", "write"):
        return f"{stamp} {who}{kind}(fh {r.get('fh')}, {r.get('count')}) {result(str(r.get('ret')))}"
    if kind == "kexec":
        if r.get("ret") == -1:
            return f"{stamp} reboot(LINUX_REBOOT_CMD_KEXEC) {result()} <{r.get('state_before')} → " \
                   f"{r.get('state_after')}>"
        what = "live update" if r.get("live") else "plain kexec"
        return f"{stamp} {c['ev']}--- kexec: {what}, update_count={r.get('update_count')} ---{c['off']}"
    if kind == "state":
        return f"{stamp} {c['ev']}--- state {r.get('from')} → {r.get('to')} ---{c['off']}"
    if kind == "fault":
        return f"{stamp} {c['inj']}--- injected {r.get('point')} fault {r.get('err')} ({r.get('rule')}) ---{c['off']}"
    return f"{stamp} {kind} {json.dumps(r)}"


_OPEN_FLAGS = [(getattr(os, n), n) for n in ("O_NONBLOCK", "O_APPEND", "O_CLOEXEC", "O_SYNC", "O_NOCTTY")]


def open_flags(flags: int) -> str:
    parts = [{os.O_RDONLY: "O_RDONLY", os.O_WRONLY: "O_WRONLY", os.O_RDWR: "O_RDWR"}.get(flags & 3, "3")]
    parts += [n for v, n in _OPEN_FLAGS if flags & v == v]
    return "|".join(parts)


def matches(r: dict[str, Any], pid: int | None, cmd: int | None) -> bool:
    if r.get("type") == "header":
        return True
    if pid is not None and pid not in (r.get("pid"), r.get("tid")):
        return False
    if cmd is not None and (r.get("type") != "ioctl" or r.get("cmd") != cmd):
        return False
    return True


def show(path: str, *, as_json: bool = False, pid: int | None = None, cmd: int | None = None,
         color: bool | None = None, out: Any = None) -> int:
    """Print the trace; returns the number of records shown."""
    out = out or sys.stdout
    if color is None:
        color = out.isatty() and "NO_COLOR" not in os.environ
    n = 0
    for r in read_records(path):
        if not matches(r, pid, cmd):
            continue
        if as_json:
            out.write(json.dumps(r, separators=(",", ":")) + "\n")
        else:
            line = format_record(r, color)
            if line is None:
                continue
            out.write(line + "\n")
        n += 1
    return n
