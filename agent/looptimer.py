"""One asyncio timer that follows a sans-IO object's deadline: the drivers' glue between ``poll_timeout()`` and
``handle_timeout(now)`` (docs/architecture.md §5)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class DeadlineTimer:
    """Due at ``poll_timeout()`` (never before now), it calls ``on_due(now)``; :meth:`arm` after every change to the
    object re-schedules it, or cancels it when there is no deadline. Arming again for the same deadline keeps the
    scheduled call instead of replacing it (the drivers arm after every input)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        poll_timeout: Callable[[], float | None],
        on_due: Callable[[float], None],
    ) -> None:
        self.loop = loop
        self._poll_timeout = poll_timeout
        self._on_due = on_due
        self._handle: asyncio.TimerHandle | None = None
        self._deadline: float | None = None

    @property
    def armed(self) -> bool:
        return self._handle is not None

    def arm(self) -> None:
        deadline = self._poll_timeout()
        if self._handle is not None:
            if deadline == self._deadline:
                return
            self._handle.cancel()
            self._handle = None
        self._deadline = deadline
        if deadline is not None:
            self._handle = self.loop.call_at(max(deadline, self.loop.time()), self._fire)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _fire(self) -> None:
        self._handle = None
        self._on_due(self.loop.time())
