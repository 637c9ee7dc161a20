"""Timeouts for the awaits made for every request, without a timer per request.

Design
------
``asyncio.timeout`` arms and cancels a loop timer for each use, and its context manager
costs microseconds more than the await it guards; the sender awaits one answer per
request under a timeout that almost never fires, so that cost is paid by every call.

A :class:`Deadlines` table per event loop holds the deadline of every guarded await
instead, and one timer, armed for the earliest deadline, checks the table when it
fires: what is due is cancelled, and the timer is armed again for the earliest
deadline left. Adding a deadline later than the armed one (the common case: every
request gets the same timeout) touches no timer; an earlier one re-arms it. Checks are
at least ``_MIN_INTERVAL`` apart, so many deadlines close together are checked at once
(a deadline may fire that much late).

Use it as ``asyncio.timeout`` is used, in the task that awaits::

    guard = deadlines(loop).start(loop, timeout)
    try:
        answer = await something()
    except asyncio.CancelledError:
        guard.timed_out()  # raises TimeoutError if this guard cancelled the task
        raise
    finally:
        guard.stop()

A cancellation from anywhere else stays a cancellation, as with ``asyncio.timeout``:
the task's pending cancel requests are counted when the guard starts, and only the one
the guard made is turned into ``TimeoutError``.
"""

from __future__ import annotations

import asyncio
import weakref
from typing import Any

__all__ = ["Deadlines", "Guard", "deadlines"]

# The shortest time between two checks of one table (seconds).
_MIN_INTERVAL = 0.001


class Guard:
    """One guarded await: its task, its deadline, and whether it was cancelled for it."""

    __slots__ = ("cancelling", "deadline", "fired", "owner", "task")

    def __init__(self, owner: Deadlines, task: asyncio.Task[Any], deadline: float) -> None:
        self.owner = owner
        # Weak: a table outlives its tasks, and must never keep a loop alive through one.
        self.task = weakref.ref(task)
        self.deadline = deadline
        self.cancelling = task.cancelling()
        self.fired = False

    def timed_out(self) -> None:
        """Called on ``CancelledError``: raise ``TimeoutError`` when the deadline cancelled
        the task and nobody else did; otherwise return (the caller re-raises)."""
        task = self.task()
        if self.fired and task is not None and task.uncancel() <= self.cancelling:
            raise TimeoutError from None

    def stop(self) -> None:
        """The await is over (answered, failed or cancelled): forget the deadline."""
        self.owner.guards.discard(self)


class Deadlines:
    """The deadlines of the guarded awaits on one event loop, checked by one timer.

    It refers to its loop weakly and keeps no timer handle (a handle refers to its
    loop): a timer made stale by an earlier one still fires, and does nothing, told by
    its number. A timer may also fire a little early (uvloop's timers count whole
    milliseconds): what is not due yet is then checked again.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = weakref.ref(loop)
        self.guards: set[Guard] = set()
        self._armed_for: float | None = None  # when the live timer is set for
        self._timer_number = 0  # the live timer's; older timers are stale

    def start(self, loop: asyncio.AbstractEventLoop, timeout: float) -> Guard:
        """Guard the current task's next await on ``loop`` (the running loop, whose
        table this is): the task is cancelled ``timeout`` seconds from now unless
        :meth:`Guard.stop` comes first."""
        task = asyncio.current_task(loop)
        if task is None:
            raise RuntimeError("a timeout guards an await inside a task")
        deadline = loop.time() + timeout
        guard = Guard(self, task, deadline)
        self.guards.add(guard)
        armed_for = self._armed_for
        if armed_for is None or deadline < armed_for - _MIN_INTERVAL:
            self._arm(loop, deadline)
        return guard

    def _arm(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        self._timer_number += 1
        self._armed_for = when
        loop.call_at(when, self._check, self._timer_number)

    def _check(self, timer_number: int) -> None:
        loop = self._loop()
        if loop is None or timer_number != self._timer_number:
            return  # a stale timer: an earlier one was set since
        now = loop.time()
        self._armed_for = None
        earliest: float | None = None
        for guard in list(self.guards):
            if guard.deadline <= now:
                self.guards.discard(guard)
                task = guard.task()
                if task is not None and not task.done():
                    guard.fired = True
                    task.cancel()
            elif earliest is None or guard.deadline < earliest:
                earliest = guard.deadline
        if earliest is not None:
            self._arm(loop, max(earliest, now + _MIN_INTERVAL))


_tables: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Deadlines] = (
    weakref.WeakKeyDictionary()
)


def deadlines(loop: asyncio.AbstractEventLoop) -> Deadlines:
    """The deadline table of ``loop``."""
    table = _tables.get(loop)
    if table is None:
        table = _tables[loop] = Deadlines(loop)
    return table
