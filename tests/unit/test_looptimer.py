"""agent.looptimer.DeadlineTimer: the asyncio timer that follows a sans-IO object's poll_timeout()."""

from __future__ import annotations

import asyncio

from agent.looptimer import DeadlineTimer


class Deadlines:
    """A sans-IO stand-in: its deadline is whatever the test sets; the timer's calls are recorded."""

    def __init__(self) -> None:
        self.deadline: float | None = None
        self.fired: list[float] = []

    def poll_timeout(self) -> float | None:
        return self.deadline

    def handle_timeout(self, now: float) -> None:
        self.fired.append(now)
        self.deadline = None


async def test_it_fires_at_the_deadline_with_the_loops_time() -> None:
    loop = asyncio.get_running_loop()
    target = Deadlines()
    timer = DeadlineTimer(loop, target.poll_timeout, target.handle_timeout)
    deadline = target.deadline = loop.time() + 0.02
    timer.arm()
    assert timer.armed and target.fired == []
    await asyncio.sleep(0.1)
    assert len(target.fired) == 1 and target.fired[0] >= deadline and not timer.armed


async def test_arming_again_for_the_same_deadline_keeps_the_scheduled_call() -> None:
    loop = asyncio.get_running_loop()
    target = Deadlines()
    timer = DeadlineTimer(loop, target.poll_timeout, target.handle_timeout)
    target.deadline = loop.time() + 60
    timer.arm()
    handle = timer._handle
    timer.arm()
    assert timer._handle is handle
    target.deadline -= 30  # earlier: replaced
    timer.arm()
    assert timer._handle is not handle and handle is not None and handle.cancelled()
    timer.cancel()


async def test_no_deadline_cancels_and_a_past_one_fires_at_once() -> None:
    loop = asyncio.get_running_loop()
    target = Deadlines()
    timer = DeadlineTimer(loop, target.poll_timeout, target.handle_timeout)
    target.deadline = loop.time() + 60
    timer.arm()
    target.deadline = None
    timer.arm()
    assert not timer.armed
    target.deadline = loop.time() - 5  # overdue: runs on the next loop turn, never in the past
    timer.arm()
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert len(target.fired) == 1 and target.fired[0] >= loop.time() - 1
