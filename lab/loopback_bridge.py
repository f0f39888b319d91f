"""A gateway under test gets a network namespace of its own, with the test's loopback services bridged into it.

The gateway creates ``tun-firezone``, routes the tunnel ranges and applies its host setup wherever it runs: a test
must never let it do that to the machine's own namespace. :class:`IsolatedNetns` makes a fresh namespace (only ``lo``,
up) and bridges chosen TCP ports of the test process's ``127.0.0.1`` into it: a listening socket created inside the
namespace on ``127.0.0.1:port`` whose connections are piped to ``127.0.0.1:port`` outside. The gateway keeps the URL
``ws://127.0.0.1:port`` it would use anyway, a portal that stops or restarts looks exactly as it would on loopback (a
refused or dropped connection), and nothing is routed anywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

from dataplane.io.netlink import run_in_netns
from lab.netns import remove_stale_tun_locks, run, unique_suffix

_CHUNK = 65536


class IsolatedNetns:
    """``async with IsolatedNetns(ports=[...]) as ns:`` then run the process with ``ip netns exec ns.name``."""

    def __init__(self, *, ports: list[int] | tuple[int, ...] = (), prefix: str = "fzgw") -> None:
        self.name = f"{prefix}-{unique_suffix()}"
        self._ports = list(dict.fromkeys(ports))
        self._servers: list[asyncio.Server] = []
        self._pipes: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> IsolatedNetns:
        run(["ip", "netns", "add", self.name])
        try:
            run(["ip", "-n", self.name, "link", "set", "lo", "up"])
            for port in self._ports:
                await self.bridge(port)
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def bridge(self, port: int) -> None:
        """Connections to 127.0.0.1:port inside the namespace reach 127.0.0.1:port of the test process."""

        def listen() -> socket.socket:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))
            sock.listen(64)
            sock.setblocking(False)
            return sock

        listener = run_in_netns(self.name, listen)

        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            self._pipes.add(task)
            try:
                await _splice(reader, writer, port)
            finally:
                self._pipes.discard(task)

        self._servers.append(await asyncio.start_server(on_connect, sock=listener))

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        for task in list(self._pipes):
            task.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)
        for server in self._servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        self._servers.clear()
        remove_stale_tun_locks(self.name)
        run(["ip", "netns", "del", self.name], check=False)

    def exec_argv(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]


async def _splice(inner_reader: asyncio.StreamReader, inner_writer: asyncio.StreamWriter, port: int) -> None:
    try:
        outer_reader, outer_writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        inner_writer.transport.abort()  # as a refused connection would look on loopback
        return

    async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while chunk := await reader.read(_CHUNK):
                writer.write(chunk)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            with contextlib.suppress(OSError, RuntimeError):
                if writer.can_write_eof():
                    writer.write_eof()

    try:
        await asyncio.gather(pump(inner_reader, outer_writer), pump(outer_reader, inner_writer))
    finally:
        for writer in (inner_writer, outer_writer):
            writer.close()


@contextlib.asynccontextmanager
async def isolated_netns(*ports: int) -> AsyncIterator[IsolatedNetns]:
    async with IsolatedNetns(ports=list(ports)) as ns:
        yield ns
