"""Own-node files opened ahead of need, and our own fds closed, by one thread beside the loop.

A session fd handed out by CREATE/RETRIEVE_SESSION is an open of our own
node; opening it on demand costs a worker-thread hop and a round trip through
the kernel back to our loop while the caller waits.  ``SparePool`` keeps a few
such files open in advance (``spares``), tagged (``fdpass.FileTags``) and
unbound: ``take`` hands one out at once and a refill runs in the background,
a batch at a time, so the hand-offs to the thread are few.  Our copies of
handed-out files are closed by a second thread (``close``), never queued
behind a refill: a close may be the last reference of a CUSE file, whose
RELEASE only the loop answers, so neither ever runs on the loop.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import queue
import threading
from collections.abc import Callable
from typing import NamedTuple

from ..libc import fail
from .seam import Caller

log = logging.getLogger(__name__)


class Spare(NamedTuple):
    """One spare: our fd, its open file's fh, and the open as the device saw it."""

    fd: int
    fh: int
    caller: Caller
    flags: int


#: (count, generation) of a refill, or None (stop)
_Job = tuple[int, int] | None
#: (fd, the loop's future to complete, or None), or None (stop)
_Close = tuple[int, "asyncio.Future[None] | None"] | None


class SparePool:
    """Spares of one node, opened by ``opener`` (in the pool's thread) and kept between ``low`` and ``target``.

    ``opener()`` opens the node and returns the ``Spare`` (the device knows
    its fh from the OPEN it answered); ``tag(fd, fh, fresh)`` tags it.  Methods
    other than the thread's are called on the loop's thread.
    """

    def __init__(self, opener: Callable[[], Spare], tag: Callable[[int, int, bool], bool],
                 target: int = 8, low: int = 4):
        self._opener = opener
        self._tag = tag
        self.target, self.low = target, low
        self.ready: list[Spare] = []
        #: bumped by ``drop``: spares of an older generation arriving later are closed
        self.gen = 0
        self._inflight = 0
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._closes: queue.SimpleQueue[_Close] = queue.SimpleQueue()
        self._waiters: list[asyncio.Future[None]] = []
        self._thread: threading.Thread | None = None
        self._closer: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped = False
        #: the errno of a refill that opened nothing, for the next ``get`` waiting on it
        self._error = 0

    # -- on the loop ------------------------------------------------------------------------------
    def take(self) -> Spare | None:
        """A spare at once, or None when none is ready (a refill is then on its way)."""
        s = self.ready.pop() if self.ready else None
        self._refill()
        return s

    async def get(self) -> Spare:
        """A spare, waiting for the refill when none is ready."""
        while True:
            s = self.take()
            if s is not None:
                return s
            if self._stopped:
                raise fail(errno.EIO)  # shutting down
            if self._error:
                e, self._error = self._error, 0
                raise fail(e)
            w = asyncio.get_running_loop().create_future()
            self._waiters.append(w)
            await w

    def give_back(self, s: Spare) -> None:
        self.ready.append(s)

    def close(self, fd: int, wait: bool = False) -> asyncio.Future[None] | None:
        """Close our fd ``fd`` in the closing thread; with ``wait`` (on the loop), a future done once it
        is closed.  Without, any thread may call it (a synchronous kexec)."""
        if self._closer is None:
            self._closer = threading.Thread(target=self._close_work, name="cusedev-closes", daemon=True)
            self._closer.start()
        fut = asyncio.get_running_loop().create_future() if wait else None
        self._closes.put((fd, fut))
        return fut

    def drop(self) -> None:
        """Close every ready spare; those still being opened are closed when they arrive (kexec)."""
        self.gen += 1
        spares, self.ready = self.ready, []
        for s in spares:
            self.close(s.fd)

    async def stop(self) -> None:
        """Shutdown: close every spare and end the thread (waiting for it, the loop still serving)."""
        self._stopped = True
        self.drop()
        for w in self._waiters:
            if not w.done():
                w.set_result(None)
        loop = asyncio.get_running_loop()
        for t, q in ((self._thread, self._jobs), (self._closer, self._closes)):
            if t is not None:
                q.put(None)
                await loop.run_in_executor(None, t.join, 10.0)

    def _start(self) -> None:
        if self._thread is None:
            self._loop = asyncio.get_running_loop()
            self._thread = threading.Thread(target=self._work, name="cusedev-spares", daemon=True)
            self._thread.start()

    def _refill(self) -> None:
        have = len(self.ready) + self._inflight
        if not self._stopped and have < self.low:
            n = self.target - have
            self._inflight += n
            self._start()
            self._jobs.put((n, self.gen))

    def _arrived(self, spares: list[Spare], asked: int, gen: int, errno_: int) -> None:
        self._inflight -= asked
        if gen != self.gen or self._stopped:
            for s in spares:
                self.close(s.fd)
        else:
            self.ready.extend(spares)
        if errno_ and not spares:
            self._error = errno_
        waiters, self._waiters = self._waiters, []
        for w in waiters:
            if not w.done():
                w.set_result(None)

    # -- in the pool's thread ---------------------------------------------------------------------
    def _work(self) -> None:
        # the lowest priority: on a busy CPU the refill runs when the loop and its clients wait, off the
        # path of the calls it serves (an OPEN of ours still needs the loop, which outranks us)
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except OSError:
            pass
        fresh = False
        while True:
            job = self._jobs.get()
            if job is None:
                return
            n, gen = job
            batch: list[Spare] = []
            err = 0
            for _ in range(n):
                try:
                    s = self._opener()
                except OSError as e:
                    err = e.errno or errno.EIO
                    log.warning("spare open of our node failed: %s", e)
                    break
                fresh = self._tag(s.fd, s.fh, fresh) or fresh
                batch.append(s)
            assert self._loop is not None
            try:
                self._loop.call_soon_threadsafe(self._arrived, batch, n, gen, err)
            except RuntimeError:  # the loop is closed: nobody will use them
                for s in batch:
                    os.close(s.fd)

    def _close_work(self) -> None:
        while True:
            job = self._closes.get()
            if job is None:
                return
            fd, fut = job
            try:
                os.close(fd)
            except OSError as e:
                log.warning("close of our fd %d: %s", fd, e)
            if fut is not None:
                try:
                    fut.get_loop().call_soon_threadsafe(_set_done, fut)
                except RuntimeError:  # the loop is closed
                    pass


def _set_done(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
