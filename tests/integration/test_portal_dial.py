"""agent/dial.py with real TCP sockets on loopback: concurrent dialling, first connect wins, timeouts, SO_MARK."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from agent.dial import DialError, DialTarget, SocketMarker, SocketMarkError, dial_first

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

SO_MARK = 36
FIREZONE_MARK = 0xFD002021


@contextlib.contextmanager
def listening(host: str = "127.0.0.1") -> Iterator[DialTarget]:
    with socket.socket() as server:
        server.bind((host, 0))
        server.listen(8)
        yield DialTarget(socket.AF_INET, server.getsockname())


@contextlib.contextmanager
def refusing(host: str = "127.0.0.1") -> Iterator[DialTarget]:
    with socket.socket() as bound:
        bound.bind((host, 0))  # bound, not listening: connects are refused
        yield DialTarget(socket.AF_INET, bound.getsockname())


@contextlib.contextmanager
def hanging(host: str = "127.0.0.1") -> Iterator[DialTarget]:
    """A loopback port whose SYNs go unanswered: backlog 0 with its one accept-queue slot already taken."""
    with socket.socket() as server, socket.socket() as filler:
        server.bind((host, 0))
        server.listen(0)
        filler.connect(server.getsockname())
        yield DialTarget(socket.AF_INET, server.getsockname())


async def test_first_successful_connect_wins_over_refused_addresses() -> None:
    with refusing() as refused, listening("127.0.0.2") as good:
        sock = await dial_first([refused, good], SocketMarker())
        with sock:
            assert sock.getpeername() == good.address
            assert sock.getblocking() is False


async def test_addresses_are_dialled_concurrently() -> None:
    # The hanging address comes first and would block for a minute if addresses were tried one after the other.
    with hanging() as stuck, listening("127.0.0.2") as good:
        sock = await asyncio.wait_for(dial_first([stuck, good], SocketMarker(), tcp_timeout=60.0), 10.0)
        with sock:
            assert sock.getpeername() == good.address


async def test_tcp_connect_timeout_per_address() -> None:
    with hanging() as stuck:
        with pytest.raises(DialError) as caught:
            await asyncio.wait_for(dial_first([stuck], SocketMarker(), tcp_timeout=0.3), 10.0)
    assert f"{stuck}: timed out" in str(caught.value)


async def test_all_addresses_failing_lists_each_failure() -> None:
    with refusing() as first, refusing("127.0.0.2") as second:
        with pytest.raises(DialError) as caught:
            await dial_first([first, second], SocketMarker())
    assert str(first) in str(caught.value) and str(second) in str(caught.value)


async def test_no_addresses_is_an_error() -> None:
    with pytest.raises(DialError):
        await dial_first([], SocketMarker())


@pytest.mark.skipif(os.geteuid() != 0, reason="SO_MARK needs CAP_NET_ADMIN")
async def test_connected_socket_carries_the_firezone_mark() -> None:
    with listening() as good:
        sock = await dial_first([good], SocketMarker())
        with sock:
            assert sock.getsockopt(socket.SOL_SOCKET, SO_MARK) & 0xFFFFFFFF == FIREZONE_MARK


def _mark_failing_with(monkeypatch: pytest.MonkeyPatch, error: OSError) -> None:
    original = socket.socket.setsockopt

    def setsockopt(self: socket.socket, level: int, option: int, *value: Any) -> None:
        if level == socket.SOL_SOCKET and option == SO_MARK:
            raise error
        original(self, level, option, *value)

    monkeypatch.setattr(socket.socket, "setsockopt", setsockopt)


async def test_unprivileged_mark_failure_warns_once_and_still_connects(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _mark_failing_with(monkeypatch, PermissionError(errno.EPERM, "Operation not permitted"))
    caplog.set_level(logging.WARNING, logger="agent.dial")
    marker = SocketMarker()
    with listening() as good, listening("127.0.0.2") as other:
        for _ in range(2):
            sock = await dial_first([good, other], marker)
            sock.close()
    assert len([r for r in caplog.records if "SO_MARK" in r.getMessage()]) == 1


async def test_other_mark_failures_abort_the_dial(monkeypatch: pytest.MonkeyPatch) -> None:
    _mark_failing_with(monkeypatch, OSError(errno.EINVAL, "Invalid argument"))
    with listening() as good:
        with pytest.raises(SocketMarkError):
            await dial_first([good], SocketMarker())
