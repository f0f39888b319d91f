"""The portal link reads the frames a socket has already received in one event-loop turn, losing none.

A loopback WebSocket server sends more frames at once than one turn takes (:data:`agent.portal.MAX_FRAMES_PER_TURN`);
the client takes them turn by turn with :func:`agent.portal.receive_burst`, as ``PortalLink._serve`` does."""

from __future__ import annotations

import asyncio

from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

from agent.portal import MAX_FRAMES_PER_TURN, receive_burst

FRAMES = 3 * MAX_FRAMES_PER_TURN + 7


async def test_every_frame_arrives_once_in_order_and_a_turn_takes_at_most_the_limit() -> None:
    sent = [f'{{"n":{i}}}' for i in range(FRAMES)]
    all_sent = asyncio.Event()

    async def send_all(ws: ServerConnection) -> None:
        for text in sent:
            await ws.send(text)
        all_sent.set()
        await ws.wait_closed()

    async with serve(send_all, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        async with connect(f"ws://127.0.0.1:{port}", max_queue=None) as ws:
            await all_sent.wait()
            await asyncio.sleep(0.2)  # every frame is in the client's buffer now
            received: list[str | bytes] = []
            turns: list[int] = []
            while len(received) < FRAMES:
                first = await asyncio.wait_for(ws.recv(), 5)
                turns.append(await receive_burst(ws, first, received.append))
    assert received == sent
    assert max(turns) == MAX_FRAMES_PER_TURN
    assert len(turns) < FRAMES  # frames already there were taken together, not one per turn
