"""The device's interceptor chain: tracing and fault injection are peers in it, neither knows the other.

An ``Interceptor`` sees every event of the device: each ioctl (as a ``Call``,
which it passes on with ``proceed``), each open, release, read/write, each
model fault point and each kexec.  The device owns one chain, outermost
first; with nothing in it the device's ``interceptor`` is None and the ioctl
path stays bare.  Fault injection does not raise on the device's behalf: it
marks the call (``Call.fail``, ``Call.injected``) and the end of the chain
refuses it before touching memory, so a tracer further in records it like any
other failed call.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from .seam import Caller, CallerMemory

#: the rest of the chain after an interceptor
Proceed = Callable[["Call"], "int | Awaitable[int]"]


@dataclass(slots=True, eq=False)
class Call:
    """One ioctl on its way through the chain."""

    fh: int
    caller: Caller
    cmd: int
    arg: int
    mem: CallerMemory
    #: an errno the call must fail with before it touches the caller's memory (fault injection)
    fail: int = 0
    #: what an injection rule did to this call (``{"rule", "errno", "delay"}``), for the records
    injected: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Fault:
    """A model fault point that an interceptor makes fail (``Interceptor.fault``)."""

    point: str
    errno: int
    rule: str


class Interceptor:
    """Every hook a no-op: subclasses override what they need.  ``order``: smaller is further out."""

    order = 50
    #: whether ``ioctl`` is overridden (the device leaves the path bare when no member needs it)
    wants_ioctls = True

    def ioctl(self, call: Call, proceed: Proceed) -> int | Awaitable[int]:
        return proceed(call)

    def fault(self, point: str) -> Fault | None:
        """Whether the model's fault point ``point`` fails now (first answer wins)."""
        return None

    def faulted(self, fault: Fault) -> None:
        """A fault point failed (told to every member, the one that made it fail included)."""

    def opened(self, caller: Caller, flags: int, fh: int, err: int) -> None:
        """An open of the node: ``fh``, or ``err`` (EBUSY) when refused."""

    def released(self, fh: int) -> None:
        """The last reference to open file ``fh`` is gone."""

    def rw(self, kind: str, fh: int, caller: Caller, size: int, err: int) -> None:
        """A read or write (``kind``) on the node and its errno."""

    def kexec(self, run: Callable[[], bool]) -> bool:
        """Around the emulated reboot: call ``run()`` and return what it returns."""
        return run()


def chain(members: list[Interceptor], terminal: Proceed) -> Proceed | None:
    """The ioctl path through ``members`` (outermost first) to ``terminal``; None when none wants ioctls."""
    wanted = [m for m in members if m.wants_ioctls]
    if not wanted:
        return None
    proceed = terminal
    for m in reversed(wanted):
        proceed = _link(m, proceed)
    return proceed


def _link(member: Interceptor, rest: Proceed) -> Proceed:
    hook = member.ioctl

    def step(call: Call) -> int | Awaitable[int]:
        return hook(call, rest)

    return step
