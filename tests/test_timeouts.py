"""The deadline table that times out the sender's awaits (feste._timeouts).

Every test runs on asyncio's own loop and on uvloop's, whose timers count whole
milliseconds and may fire a little before their time.
"""

from __future__ import annotations

import asyncio
import gc
import time
import weakref
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from feste._timeouts import deadlines

Run = Callable[[Coroutine[Any, Any, Any]], Any]


@pytest.fixture(params=["asyncio", "uvloop"])
def loop_factory(request: pytest.FixtureRequest) -> Callable[[], asyncio.AbstractEventLoop]:
    """Makes new loops of the kind named by the parameter."""
    if request.param == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        return uvloop.new_event_loop  # type: ignore[no-any-return]
    return asyncio.new_event_loop


@pytest.fixture
def run(loop_factory: Callable[[], asyncio.AbstractEventLoop]) -> Run:
    """Runs a coroutine on a new loop of that kind."""

    def run_on_loop(coroutine: Coroutine[Any, Any, Any]) -> Any:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            return runner.run(coroutine)

    return run_on_loop


async def _guarded(awaitable: Any, timeout: float) -> Any:
    """The way the sender uses a guard."""
    loop = asyncio.get_running_loop()
    guard = deadlines(loop).start(loop, timeout)
    try:
        return await awaitable
    except asyncio.CancelledError:
        guard.timed_out()
        raise
    finally:
        guard.stop()


def test_an_await_past_its_deadline_raises_timeout_error(run: Run) -> None:
    async def main() -> None:
        with pytest.raises(TimeoutError):
            await _guarded(asyncio.sleep(30), 0.02)
        # The task is usable afterwards: it holds no pending cancellation.
        task = asyncio.current_task()
        assert task is not None and task.cancelling() == 0
        assert await _guarded(asyncio.sleep(0, "answer"), 5) == "answer"

    run(main())


def test_an_await_within_its_deadline_is_never_cancelled_later(run: Run) -> None:
    async def main() -> str:
        await _guarded(asyncio.sleep(0), 0.02)
        # Past the stopped guard's deadline: nothing cancels this task.
        await asyncio.sleep(0.1)
        return "done"

    assert run(main()) == "done"


def test_a_cancellation_from_elsewhere_stays_a_cancellation(run: Run) -> None:
    async def main() -> None:
        task = asyncio.create_task(_guarded(asyncio.sleep(30), 10))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(main())


def test_a_cancellation_when_the_deadline_also_passed_stays_a_cancellation(run: Run) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.create_task(_guarded(asyncio.sleep(30), 0.05))
        await asyncio.sleep(0)
        (guard,) = deadlines(loop).guards
        # Due in the same turn as the deadline, just after it: the guard cancels the
        # task first, then this cancel comes before the task runs again.
        loop.call_at(guard.deadline + 0.001, task.cancel)
        time.sleep(0.1)  # block the loop past both
        with pytest.raises(asyncio.CancelledError):
            await task
        assert guard.fired

    run(main())


def test_an_earlier_deadline_added_later_fires_first(run: Run) -> None:
    async def main() -> None:
        slow = asyncio.create_task(_guarded(asyncio.sleep(30), 20))
        await asyncio.sleep(0)
        with pytest.raises(TimeoutError):
            await _guarded(asyncio.sleep(30), 0.02)
        assert not slow.done()  # its own deadline is far away
        loop = asyncio.get_running_loop()
        assert [guard.deadline > loop.time() + 10 for guard in deadlines(loop).guards] == [True]
        slow.cancel()
        with pytest.raises(asyncio.CancelledError):
            await slow

    run(main())


def test_many_awaits_time_out_each_at_its_deadline(run: Run) -> None:
    async def main() -> list[str]:
        async def one(timeout: float) -> str:
            try:
                await _guarded(asyncio.sleep(30), timeout)
            except TimeoutError:
                return f"timed out {timeout}"
            return "answered"

        outcomes = await asyncio.gather(*(one(0.01 * (i % 5 + 1)) for i in range(50)))
        loop = asyncio.get_running_loop()
        assert deadlines(loop).guards == set()
        return outcomes

    outcomes = run(main())
    assert outcomes == [f"timed out {0.01 * (i % 5 + 1)}" for i in range(50)]


def test_awaits_one_after_another_each_time_out(run: Run) -> None:
    # Each deadline is earlier than the timer set for the one before it was, and a
    # timer that fires a little early finds its guard not yet due: every await still
    # times out, none runs its full 0.5 s.
    async def main() -> list[bool]:
        outcomes = []
        for index in range(20):
            try:
                await _guarded(asyncio.sleep(0.5), 0.0123 + index * 0.0007)
            except TimeoutError:
                outcomes.append(True)
            else:
                outcomes.append(False)
        return outcomes

    assert run(main()) == [True] * 20


def test_a_closed_loop_is_not_kept_alive_by_its_table(
    loop_factory: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    loop = loop_factory()

    async def main() -> None:
        with pytest.raises(TimeoutError):
            await _guarded(asyncio.sleep(30), 0.01)
        await _guarded(asyncio.sleep(0), 60)  # leaves a timer set a minute ahead

    loop.run_until_complete(main())
    loop.close()
    dropped = weakref.ref(loop)
    del loop
    gc.collect()
    assert dropped() is None


def test_a_guard_outside_a_task_is_refused() -> None:
    loop = asyncio.new_event_loop()
    try:
        with pytest.raises(RuntimeError, match="inside a task"):
            deadlines(loop).start(loop, 1.0)
    finally:
        loop.close()
