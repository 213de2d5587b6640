"""The process-tree side of ``cusedev run -- CMD ARGS``.

The launcher process becomes a child subreaper, starts CMD under the seccomp
filter (:func:`cusedev.seccomp.spawn`), gives the listener fd away through a
``handoff`` callable (the lead wires it to the emulator's control socket),
then waits: it reaps every descendant that gets re-parented to it, forwards
SIGINT/SIGTERM to CMD's process group, and when the emulated kexec happens
kills the whole tree, as a reboot would end those processes.

Being a subreaper matters twice: double-forked daemons of CMD stay in our
tree (so :func:`kill_tree` finds them), and their zombies are reaped here:
depending on the kernel version a task's filter reference goes at exit or
only at reap time, and the listener reports POLLHUP once the last one went.

The launcher reaps with ``waitpid(-1)``: run it in a process of its own (as
``cusedev run`` is), not next to other code that waits for its own children.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any

from . import seccomp

__all__ = ["Launcher", "descendants", "exit_code", "kill_tree", "run", "set_child_subreaper"]

log = logging.getLogger(__name__)

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def set_child_subreaper() -> None:
    """Orphaned descendants get re-parented to this process instead of init."""
    seccomp.prctl(seccomp.PR_SET_CHILD_SUBREAPER, 1)


def exit_code(status: int) -> int:
    """A wait status as a shell reports it: the exit code, or 128 + signal number."""
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


# --------------------------------------------------------------------------
# Walking the tree

# /proc/<pid>/task/<tid>/children needs CONFIG_PROC_CHILDREN (Debian has it;
# the project host kernel does not): fall back to scanning every /proc/<pid>/stat.
_HAVE_CHILDREN_FILE = os.path.exists(f"/proc/self/task/{os.getpid()}/children")


def _children_from_files(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except (FileNotFoundError, ProcessLookupError):
        return out
    for tid in tids:  # a child forked by a thread is listed under that thread
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                out.extend(int(c) for c in f.read().split())
        except (FileNotFoundError, ProcessLookupError):
            pass
    return out


def _stat(pid: int | str) -> tuple[str, int] | None:
    """(state, ppid) from /proc/<pid>/stat, or None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = data[data.rindex(b")") + 2 :].split()  # comm may contain spaces and ')'
    return fields[0].decode(), int(fields[1])


def _parent_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _stat(name)
            if st is not None:
                kids.setdefault(st[1], []).append(int(name))
    return kids


def descendants(root: int | None = None) -> list[int]:
    """Every descendant of ``root`` (default: this process), parents before children, zombies included."""
    root = os.getpid() if root is None else root
    if _HAVE_CHILDREN_FILE:
        children: Callable[[int], list[int]] = _children_from_files
    else:
        children = _parent_map().get  # type: ignore[assignment]
    out: list[int] = []
    seen = {root}
    todo = [root]
    while todo:
        pid = todo.pop(0)
        for child in children(pid) or ():
            if child not in seen:
                seen.add(child)
                out.append(child)
                todo.append(child)
    return out


def _reap_all(on_reap: Callable[[int, int], None] | None) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        if on_reap is not None:
            on_reap(pid, status)


def kill_tree(
    root: int | None = None,
    *,
    timeout: float = 10.0,
    on_reap: Callable[[int, int], None] | None = None,
) -> set[int]:
    """SIGKILL every descendant of ``root`` until none is left; return the pids signalled.

    The tree is walked again after each round: a process may fork between
    the walk and the kill, and orphans move up to us (the subreaper).  When
    ``root`` is this process (the default) everything is also reaped, with
    ``on_reap(pid, status)`` called for each; for another root, zombies
    count as gone.  Blocks (a few ms usually); TimeoutError if something
    survives ``timeout`` seconds (e.g. stuck in uninterruptible sleep).
    """
    ours = root is None or root == os.getpid()
    root = os.getpid() if root is None else root
    killed: set[int] = set()
    deadline = time.monotonic() + timeout
    delay = 0.0005
    while True:
        if ours:
            _reap_all(on_reap)
        pids = descendants(root)
        if not ours:
            pids = [p for p in pids if (st := _stat(p)) is not None and st[0] not in "ZX"]
        if not pids:
            return killed
        if time.monotonic() > deadline:
            raise TimeoutError(f"kill_tree({root}): still alive after {timeout}s: {pids}")
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            killed.add(pid)
        time.sleep(delay)
        delay = min(delay * 2, 0.02)


# --------------------------------------------------------------------------
# The launcher


def _terminal_foreground() -> bool:
    """Whether we own the foreground of the terminal on fd 0 (then CMD must get it, or it stops on read)."""
    try:
        return os.isatty(0) and os.tcgetpgrp(0) == os.getpgrp()
    except OSError:
        return False


@contextlib.contextmanager
def _sigttou_blocked() -> Iterator[None]:
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTTOU})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class Launcher:
    """Run one command under the filter and own its process tree.

    ``handoff(listener_fd)`` is called before the command execs; it must pass
    the fd on (e.g. SCM_RIGHTS to the emulator) and return; the launcher
    closes its own copy afterwards.  Use from the main thread (signal
    handlers) of a process that has no other children to wait for.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        handoff: Callable[[int], None],
        env: Mapping[str, str] | None = None,
        trapped: Sequence[int] | None = None,
        foreground: bool | None = None,
    ) -> None:
        self.argv = list(argv)
        self.env = env
        #: the ioctl numbers the filter traps (None: the default profile's fd-returning commands)
        self.trapped = trapped
        self.foreground = foreground
        self._handoff = handoff
        self.pid: int | None = None
        #: raw wait status of the command, once reaped
        self.status: int | None = None
        #: True once kill_tree ran because the emulated kexec happened
        self.kexeced = False
        self._done: asyncio.Future[int] | None = None

    def _on_reap(self, pid: int, status: int) -> None:
        if pid == self.pid and self.status is None:
            self.status = status
            if self._done is not None and not self._done.done():
                self._done.set_result(status)

    def _sigchld(self) -> None:
        _reap_all(self._on_reap)

    def _forward(self, sig: int) -> None:
        if self.pid is None or self.status is not None:
            return
        try:
            os.killpg(self.pid, sig)  # CMD leads its own group: reach it as a terminal would
        except ProcessLookupError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def kill_tree(self) -> set[int]:
        """SIGKILL and reap every descendant (the command included)."""
        return kill_tree(on_reap=self._on_reap)

    async def run(self, kexec: Awaitable[Any] | None = None) -> int:
        """Start the command and wait for it; return its exit code (128+N if killed by signal N).

        If ``kexec`` completes first (e.g. ``event.wait()`` of the emulator's
        "kexec happened"), every descendant is killed and reaped; then the
        result is 137 and :attr:`kexeced` is True.  Descendants still running
        when the command exits normally are left alone.
        """
        loop = asyncio.get_running_loop()
        fg = _terminal_foreground() if self.foreground is None else self.foreground
        set_child_subreaper()
        self._done = loop.create_future()
        loop.add_signal_handler(signal.SIGCHLD, self._sigchld)
        kexec_task: asyncio.Future[Any] | None = None
        try:
            pid, listener = seccomp.spawn(
                self.argv, self.env, trapped=self.trapped, foreground=fg, handoff=self._handoff
            )
            self.pid = pid
            os.close(listener)  # the supervisor holds its own copy now
            for sig in FORWARDED_SIGNALS:
                loop.add_signal_handler(sig, self._forward, sig)
            self._sigchld()  # an exit that came before self.pid was known
            waiters: set[asyncio.Future[Any]] = {self._done}
            if kexec is not None:
                kexec_task = asyncio.ensure_future(kexec)
                waiters.add(kexec_task)
            while not self._done.done():
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                if kexec_task is not None and kexec_task.done():
                    waiters.discard(kexec_task)
                    if kexec_task.cancelled() or kexec_task.exception() is not None:
                        log.warning("kexec awaitable failed; waiting for the command only")
                    elif not self._done.done():
                        self.kexeced = True
                        self.kill_tree()
            return exit_code(self._done.result())
        finally:
            if kexec_task is not None and not kexec_task.done():
                kexec_task.cancel()
            for sig in (signal.SIGCHLD, *FORWARDED_SIGNALS):
                loop.remove_signal_handler(sig)
            if fg:
                with _sigttou_blocked(), contextlib.suppress(OSError):
                    os.tcsetpgrp(0, os.getpgrp())


async def run(
    argv: Sequence[str],
    *,
    handoff: Callable[[int], None],
    kexec: Awaitable[Any] | None = None,
    env: Mapping[str, str] | None = None,
    trapped: Sequence[int] | None = None,
    foreground: bool | None = None,
) -> int:
    """``Launcher(argv, ...).run(kexec)`` in one call."""
    launcher = Launcher(argv, handoff=handoff, env=env, trapped=trapped, foreground=foreground)
    return await launcher.run(kexec)
