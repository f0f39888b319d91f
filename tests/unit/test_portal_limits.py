"""agent/portal.py limits without a network: write timeout, fixed metric labels, frame size and queue (issue 11)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, cast

from websockets.asyncio.client import ClientConnection

import agent.portal as portal_module
from agent.config import Secret
from agent.portal import (
    MAX_FRAME_SIZE,
    MAX_QUEUED_FRAMES,
    OTHER_EVENT,
    RECEIVED_EVENT_LABELS,
    SENT_EVENT_LABELS,
    PortalLink,
)
from dataplane.io.rng import SeededRng
from protocol.errors import TransientPortalError


class StuckConnection:
    """A WebSocket whose peer never reads (send blocks forever) and never writes (recv blocks forever)."""

    def __init__(self, frames: list[str] | None = None, block_sends: bool = True) -> None:
        self.sent: list[str] = []
        self.closed = False
        self._frames = list(frames or [])
        self._block_sends = block_sends

    async def send(self, frame: str) -> None:
        if self._block_sends:
            await asyncio.Event().wait()
        self.sent.append(frame)

    async def recv(self) -> str:
        if self._frames:
            return self._frames.pop(0)
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def close(self, code: int = 1000) -> None:
        self.closed = True


def make_link(write_timeout: float = 10.0) -> PortalLink:
    return PortalLink(
        api_url="wss://portal.example",
        firezone_id="5d4e8a9c-1c1f-4d7c-9a0b-3f3e2c1d0b9a",
        name="gw-test",
        public_key_b64="fiAjSBWDgQfD1CFJkTwOf4zg+1QhH0eTT+oLaVIMpH8=",
        token=Secret("t"),
        rng=SeededRng(0),
        wall_clock=time.time,
        write_timeout=write_timeout,
    )


async def test_a_portal_that_takes_no_frame_is_given_up_after_the_write_timeout() -> None:
    link = make_link(write_timeout=0.2)
    ws = StuckConnection()
    started = time.monotonic()
    failure = await asyncio.wait_for(link._serve(cast(ClientConnection, ws)), 5.0)
    assert isinstance(failure, TransientPortalError)
    assert "took no frame" in str(failure)
    assert 0.2 <= time.monotonic() - started < 2.0
    assert ws.closed


def _push(event: str) -> str:
    return json.dumps({"topic": "gateway", "event": event, "payload": {}, "ref": None})


async def test_metric_labels_come_from_a_fixed_set() -> None:
    join_ok = json.dumps({"topic": "gateway", "event": "phx_reply", "payload": {"status": "ok"}, "ref": 0})
    invented = [_push(f"invented_{i}") for i in range(200)]
    frames = [join_ok, _push("init"), _push("ice_candidates"), _push("x" * 1000), *invented]
    link = make_link()
    ws = StuckConnection(frames, block_sends=False)
    seen: list[Any] = []
    serving = asyncio.ensure_future(link._serve(cast(ClientConnection, ws)))
    link._handler = seen.append
    while len(seen) < len(frames):
        await asyncio.sleep(0.01)
    link.channel.push("no_relays", {}, 0.0)
    link.channel.push("made_up_by_a_handler", {}, 0.0)
    link.stop()
    await asyncio.wait_for(serving, 5.0)
    assert set(link.stats.received) <= RECEIVED_EVENT_LABELS
    assert link.stats.received == {"init": 1, "ice_candidates": 1, OTHER_EVENT: 201}
    assert set(link.stats.sent) <= SENT_EVENT_LABELS
    assert link.stats.sent["phx_join"] == 1


def test_frame_size_and_queue_are_bounded() -> None:
    # 16 MiB x 16 frames could sit in memory before; now 4 MiB x 4, still 3x an init with 10,000 authorizations.
    assert MAX_FRAME_SIZE == 4 * 1024 * 1024
    assert MAX_FRAME_SIZE * MAX_QUEUED_FRAMES <= 16 * 1024 * 1024
    assert portal_module.WRITE_TIMEOUT > 0
