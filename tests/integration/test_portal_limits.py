"""agent/portal.py against a loopback Phoenix stub: an oversized frame costs the connection, not the process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from agent.config import Secret
from agent.portal import MAX_FRAME_SIZE, PortalLink
from dataplane.io.rng import SeededRng

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


async def test_a_frame_over_the_limit_closes_the_connection_and_the_link_reconnects() -> None:
    connections = 0

    async def handler(ws: ServerConnection) -> None:
        nonlocal connections
        connections += 1
        with contextlib.suppress(ConnectionClosed):
            async for raw in ws:
                frame = json.loads(raw)
                reply = {
                    "topic": frame["topic"],
                    "event": "phx_reply",
                    "ref": frame["ref"],
                    "payload": {"status": "ok"},
                }
                await ws.send(json.dumps(reply))
                if frame["event"] == "phx_join" and connections == 1:
                    pad = "x" * MAX_FRAME_SIZE
                    await ws.send(
                        json.dumps({"topic": "gateway", "event": "init", "ref": None, "payload": {"pad": pad}})
                    )

    async with serve(handler, "127.0.0.1", 0, max_size=None) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        link = PortalLink(
            api_url=f"ws://127.0.0.1:{port}",
            firezone_id="5d4e8a9c-1c1f-4d7c-9a0b-3f3e2c1d0b9a",
            name="gw-test",
            public_key_b64="fiAjSBWDgQfD1CFJkTwOf4zg+1QhH0eTT+oLaVIMpH8=",
            token=Secret("t"),
            rng=SeededRng(0),
            wall_clock=time.time,
        )
        task = asyncio.ensure_future(link.run(lambda event: None))
        deadline = time.monotonic() + 20.0
        while not (connections >= 2 and link.joined):
            assert time.monotonic() < deadline, "no reconnect after the oversized frame"
            assert not task.done(), task.exception()
            await asyncio.sleep(0.05)
        assert link.stats.joins == 2
        assert link.stats.received["init"] == 0
        link.stop()
        await asyncio.wait_for(task, 5.0)
