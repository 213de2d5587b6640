"""Run a coroutine at once, up to its first real wait, and make a task of it only if it waits.

A trapped call is usually finished without ever waiting; a task costs a loop
turn before its first step and an object per call.  ``start`` runs the first
step inline and, if the coroutine yields, hands the rest to a task exactly as
if it had run there from the start (a cancel reaches the coroutine's wait).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Generator
from typing import Any

__all__ = ["Started", "start"]


class Started:
    """A coroutine already run by hand up to a wait (``step``, what it yielded), finished as a task.

    Awaiting ``run()`` hands ``step`` to the task, which waits for it (and on
    cancel cancels it) exactly as if the coroutine had run in the task from the
    start.
    """

    def __init__(self, coro: Coroutine[Any, Any, Any], step: Any):
        self.coro, self.step = coro, step

    def __await__(self) -> Generator[Any, None, Any]:
        step = self.step
        while True:
            try:
                yield step
            except BaseException as e:  # thrown in by the task (a cancel)
                try:
                    step = self.coro.throw(e)
                except StopIteration as done:
                    return done.value
                continue
            try:
                step = self.coro.send(None)
            except StopIteration as done:
                return done.value

    async def run(self) -> Any:
        return await self


def start(coro: Coroutine[Any, Any, Any], loop: asyncio.AbstractEventLoop,
          name: str | None = None) -> asyncio.Task[Any] | None:
    """Run ``coro`` now; None if it finished without waiting (its result is dropped: for coroutines run
    for their effect), else the task finishing it.  An exception of the first step propagates."""
    try:
        step = coro.send(None)
    except StopIteration:
        return None
    return loop.create_task(Started(coro, step).run(), name=name)
