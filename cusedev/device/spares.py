"""Own-node files opened ahead of need, and our own fds closed, by one thread beside the loop.

A session fd handed out by CREATE/RETRIEVE_SESSION is an open of our own
node; opening it on demand costs a worker-thread hop and a round trip through
the kernel back to our loop while the caller waits.  ``SparePool`` keeps such
files open in advance (``spares``), unbound: ``take`` hands one out at once.
The pool is topped up in one batch when the node's calls pause (``idle``), or, when
it runs dry in a burst of calls, by the call that finds it empty.  Never a
trickle during a burst: each spare's OPEN is a request our loop answers, and
on a shared CPU an open slipped between every two calls would lengthen each
of them, where one batch lengthens one call in ``target``.  Our copies of
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
    """Spares of one node, opened by ``opener`` (in the pool's thread), topped up to ``target``.

    ``opener()`` opens the node and returns the ``Spare`` (the device knows
    its fh from the OPEN it answered).  A refill runs once the node served no
    call (``calls``, a count) for ``idle`` seconds, or at once for a ``get``
    that finds none.
    Methods other than the threads' are called on the loop's thread.
    """

    def __init__(self, opener: Callable[[], Spare], target: int = 32, idle: float = 0.002,
                 calls: Callable[[], int] | None = None):
        self._opener = opener
        self.target, self.idle = target, idle
        #: how many calls of any kind the node has served (a burst of other calls is not a pause), and the
        #: count the timer saw last: the timer, armed by ``take``, tops the pool up once it has not moved
        self._calls = calls or (lambda: 0)
        self._seen = -1
        self._timer: asyncio.TimerHandle | None = None
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
        """A spare at once, or None when none is ready (``get`` then refills and waits)."""
        s = self.ready.pop() if self.ready else None
        if self._timer is None and not self._stopped:
            self._timer = asyncio.get_running_loop().call_later(self.idle, self._when_idle)
        return s

    async def get(self) -> Spare:
        """A spare, waiting for a refill when none is ready."""
        while True:
            s = self.take()
            if s is not None:
                return s
            self._refill()
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
        """Close every ready spare; those still being opened are closed when they arrive (kexec).

        The idle timer goes too: armed before the kexec, it would refill after it, and the
        spares of the new generation wait for the first call that takes one."""
        self.gen += 1
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
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

    def _when_idle(self) -> None:
        """The timer: top up if no call came in the last ``idle`` seconds, else look again then."""
        self._timer = None
        if self._stopped:
            return
        calls = self._calls()
        if calls != self._seen:
            self._seen = calls
            self._timer = asyncio.get_running_loop().call_later(self.idle, self._when_idle)
        else:
            self._refill()

    def _refill(self) -> None:
        have = len(self.ready) + self._inflight
        if not self._stopped and have < self.target:
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
        # a batch runs when hand-outs pause or while a call waits for it: at the loop's own priority, so
        # that it ends quickly (a starved refill would keep that call waiting)
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
