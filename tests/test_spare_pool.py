"""SparePool alone, on an event loop (pure core; the pool on real nodes is tests/test_trapped_tags.py)."""

from __future__ import annotations

import asyncio
import os
import threading

from cusedev.device.seam import Caller
from cusedev.device.spares import Spare, SparePool


class _Opener:
    """Opens /dev/null as a spare; counts the opens and lets a test hold them back."""

    def __init__(self) -> None:
        self.opens = 0
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self) -> Spare:
        self.gate.wait(10)
        self.opens += 1
        return Spare(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC), self.opens, Caller(os.getpid(), 0, 0), 0)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def _until(cond, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond() and loop.time() < end:
        await asyncio.sleep(0.005)


def test_refill_once_idle_then_dropped_at_kexec_without_a_late_refill() -> None:
    """A take arms the idle timer; a drop (kexec) right after cancels it: nothing is opened after the
    kexec until a call takes a spare, and every spare of the old generation is closed, even one that
    was still being opened."""

    async def main() -> None:
        opener = _Opener()
        calls = [0]
        pool = SparePool(opener, target=4, idle=0.002, calls=lambda: calls[0])
        base = _open_fds()
        s = await pool.get()  # empty: refills at once
        os.close(s.fd)
        await _until(lambda: len(pool.ready) == 3)
        taken = pool.take()  # arms the idle timer (a refill of 2 in ~4 ms)
        assert taken is not None
        opener.gate.clear()
        pool._refill()  # a batch under way (held back) when the kexec comes
        pool.drop()
        opens = opener.opens
        await asyncio.sleep(0.05)  # the timer would have fired by now
        opener.gate.set()
        await _until(lambda: pool._inflight == 0)
        await asyncio.sleep(0.05)
        assert pool.ready == [] and opener.opens == opens + 2, (pool.ready, opener.opens, opens)
        await _until(lambda: _open_fds() <= base + 1)  # the one taken above is ours to close
        assert _open_fds() <= base + 1
        got = await pool.get()  # the next call refills, in the new generation
        assert pool.gen == 1 and got is not None
        await pool.stop()
        os.close(got.fd)
        os.close(taken.fd)
        await _until(lambda: _open_fds() <= base)
        assert _open_fds() <= base

    asyncio.run(main())
