"""Fault injection in strace's ``--inject`` vocabulary, so clients' error paths can be tested.

Rules::

    CMD:error=ERRNO[:when=N|N+|N+S][:delay=DURATION]   CMD = FD_PRESERVE, LIVEUPDATE_IOCTL_FD_PRESERVE,
                                                        0xba00 or ``all``
    CMD:delay=DURATION[:when=...]                      delay only: the call then runs normally
    prepare:error=ERRNO[:when=...]                     a subsystem refuses SET_EVENT(PREPARE)
    kexec:error=ERRNO[:when=...]                       the freeze during reboot(KEXEC) fails

An injected ioctl error is returned before the handler runs, so it has no
side effects; fault points (v3: ``prepare``/``kexec``) are answered through
the model's fault hook at the point the real failure happens, so the model
rolls back exactly as for a real one (state stays/returns NORMAL).  ``when``
counts the calls matching the rule (1-based), as strace does.
"""

from __future__ import annotations

import asyncio
import builtins
import errno as errno_mod
import inspect
import re
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any

from .. import profiles
from ..device.dispatch import touch
from ..device.intercept import Call, Fault, Interceptor, Proceed
from ..device.seam import NeedRetry

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ns|us|ms|s)?$")
_UNITS = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0, None: 1e-6}  # strace: bare number = microseconds


class RuleError(ValueError):
    """A rule that does not parse; the message names the bad part."""


def parse_errno(text: str) -> int:
    if text.isdigit():
        return int(text)
    code = getattr(errno_mod, text.upper(), None)
    if not isinstance(code, int):
        raise RuleError(f"unknown errno {text!r}")
    return code


def parse_duration(text: str) -> float:
    m = _DURATION.match(text.strip())
    if not m:
        raise RuleError(f"bad duration {text!r} (e.g. 200ms, 1.5s, 500us)")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_cmd(text: str, profile: str | None = None) -> int | None:
    """A command number (by number, or by name in the profile's names), or None for ``all``."""
    if text == "all":
        return None
    if text.lower().startswith("0x") or text.isdigit():
        return int(text, 0)
    cmd = profiles.get(profile or profiles.DEFAULT).trace.parse_cmd(text)
    if cmd is None:
        raise RuleError(f"unknown command {text!r}")
    return cmd


@dataclass(eq=False)
class Rule:
    """One parsed rule; ``hits`` counts the matching calls seen so far."""

    text: str
    target: str  # "ioctl", "prepare" or "kexec"
    cmd: int | None = None  # ioctl only; None = every ioctl
    error: int = 0
    first: int = 1
    step: int = 0  # 0: only the first-th call; with ``repeat`` every step-th from there
    repeat: bool = True
    delay: float = 0.0
    hits: int = field(default=0)

    def fires(self, n: int) -> bool:
        """Whether the n-th matching call (1-based) is hit: strace's when=N / N+ / N+S."""
        if n < self.first:
            return False
        if not self.repeat:
            return n == self.first
        return self.step <= 1 or (n - self.first) % self.step == 0

    def to_dict(self) -> dict[str, Any]:
        return {"rule": self.text, "hits": self.hits}


def parse_rule(text: str, profile: str | None = None) -> Rule:
    parts = text.strip().split(":")
    head, opts = parts[0], parts[1:]
    if not head:
        raise RuleError(f"{text!r}: missing command")
    points = profiles.get(profile or profiles.DEFAULT).fault_points
    target = head.lower() if head.lower() in points else "ioctl"
    rule = Rule(text=text.strip(), target=target, repeat=True)
    rule.cmd = parse_cmd(head, profile) if target == "ioctl" else None
    when_given = False
    for opt in opts:
        key, eq, value = opt.partition("=")
        if not eq:
            raise RuleError(f"{text!r}: expected key=value, got {opt!r}")
        if key == "error":
            rule.error = parse_errno(value)
        elif key == "delay" and target == "ioctl":
            rule.delay = parse_duration(value)
        elif key == "when":
            m = re.fullmatch(r"(\d+)(\+(\d+)?)?", value)
            if not m or int(m.group(1)) < 1:
                raise RuleError(f"{text!r}: bad when={value!r} (N, N+ or N+S, N >= 1)")
            rule.first, rule.repeat = int(m.group(1)), bool(m.group(2))
            rule.step = int(m.group(3)) if m.group(3) else 1
            when_given = True
        else:
            raise RuleError(f"{text!r}: unknown option {key!r}")
    if not when_given:
        rule.first, rule.repeat, rule.step = 1, True, 1
    if not rule.error and not rule.delay:
        raise RuleError(f"{text!r}: needs error=ERRNO" + (" or delay=DURATION" if target == "ioctl" else ""))
    return rule


class Injector(Interceptor):
    """The rules of one device: a member of its interceptor chain, outside the tracer.

    An ioctl rule that fires marks the call (``Call.fail``, ``Call.injected``) rather than
    raising, so members further in (the tracer) see the call fail like any other; a
    delay holds the call, after a CUSE retry round has fetched its memory.  A fault
    point rule answers the model's fault hook through the device.
    """

    order = 10

    def __init__(self, device: Any):
        self.device = device
        self.rules: list[Rule] = []
        self.ioctl_rules: list[Rule] = []

    @property
    def wants_ioctls(self) -> bool:  # type: ignore[override]
        return bool(self.ioctl_rules)

    def add(self, rule: str | Rule) -> Rule:
        r = parse_rule(rule, self.device.profile.name) if isinstance(rule, str) else rule
        self.rules.append(r)
        self._refresh()
        return r

    def clear(self) -> None:
        self.rules.clear()
        self._refresh()

    def list(self) -> builtins.list[dict[str, Any]]:
        return [r.to_dict() for r in self.rules]

    @property
    def active(self) -> bool:
        return bool(self.rules)

    def _refresh(self) -> None:
        self.ioctl_rules = [r for r in self.rules if r.target == "ioctl"]
        if self.rules:
            self.device.add_interceptor(self)
        else:
            self.device.remove_interceptor(self)

    # -- ioctls: decide without committing (a CUSE retry round re-runs the same call) -----------
    def match(self, cmd: int) -> tuple[Rule | None, builtins.list[Rule]]:
        """(rule that fires for this call, rules whose count it advances) — see ``commit``."""
        fired = None
        counted = []
        for r in self.ioctl_rules:
            if r.cmd is None or r.cmd == cmd:
                counted.append(r)
                if fired is None and r.fires(r.hits + 1):
                    fired = r
        return fired, counted

    @staticmethod
    def commit(counted: builtins.list[Rule]) -> None:
        for r in counted:
            r.hits += 1

    def ioctl(self, call: Call, proceed: Proceed) -> int | Awaitable[int]:
        if not self.ioctl_rules:
            return proceed(call)
        rule, counted = self.match(call.cmd)
        if rule is not None:
            call.injected = {"rule": rule.text, "errno": rule.error, "delay": rule.delay}
            if rule.delay:
                if not rule.error:
                    self._touch(call)  # a CUSE retry round must happen now, not after the sleep
                self.commit(counted)
                return self._delayed(call, proceed, rule)
            if self.device.tracer is not None and not call.mem.direct:
                self._touch(call)  # the struct's CUSE retry round first, so the trace can show it
            self.commit(counted)
            call.fail = rule.error
            return proceed(call)
        try:
            ret = proceed(call)
        except NeedRetry:
            raise
        except OSError:
            self.commit(counted)
            raise
        self.commit(counted)
        return ret

    def _touch(self, call: Call) -> None:
        f = self.device.files.get(call.fh)
        if f is not None:
            touch(f.table, f, call.cmd, call.arg, call.mem)

    @staticmethod
    async def _delayed(call: Call, proceed: Proceed, rule: Rule) -> int:
        await asyncio.sleep(rule.delay)
        if rule.error:
            call.fail = rule.error
        else:
            call.injected = {"rule": rule.text, "delay": rule.delay, "errno": 0}
        res = proceed(call)
        if type(res) is not int and inspect.isawaitable(res):
            return int(await res)
        return int(res)

    # -- model fault points ----------------------------------------------------------------------
    def fault(self, point: str) -> Fault | None:
        for r in self.rules:
            if r.target == point:
                r.hits += 1
                if r.fires(r.hits) and r.error:
                    return Fault(point, r.error, r.text)
        return None
