"""agent/dial.py pieces that need no network: literal hosts, address merging, the SO_MARK policy."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import struct
from typing import Any

import pytest

from agent.dial import (
    DialError,
    DialTarget,
    SocketMarker,
    SocketMarkError,
    literal_target,
    merge_targets,
    resolve_targets,
)

SO_MARK = 36


class FakeSocket:
    """Records setsockopt calls; raises ``error`` for SO_MARK when given."""

    def __init__(self, error: OSError | None = None) -> None:
        self.error = error
        self.options: list[tuple[int, int, Any]] = []

    def setsockopt(self, level: int, option: int, value: Any) -> None:
        if option == SO_MARK and self.error is not None:
            raise self.error
        self.options.append((level, option, value))


def v4(host: str, port: int = 443) -> DialTarget:
    return DialTarget(socket.AF_INET, (host, port))


def v6(host: str, port: int = 443) -> DialTarget:
    return DialTarget(socket.AF_INET6, (host, port, 0, 0))


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("192.0.2.7", v4("192.0.2.7")),
        ("2001:db8::1", v6("2001:db8::1")),
        ("[2001:db8::1]", v6("2001:db8::1")),
        ("api.firezone.dev", None),
        ("localhost", None),
        ("1.2.3", None),
    ],
)
def test_literal_target(host: str, expected: DialTarget | None) -> None:
    assert literal_target(host, 443) == expected


def test_literal_host_is_added_after_the_resolver_answers() -> None:
    resolved = [v4("198.51.100.1"), v6("2001:db8::9")]
    assert merge_targets(resolved, v4("192.0.2.7")) == [*resolved, v4("192.0.2.7")]


def test_literal_host_is_not_dialled_twice() -> None:
    assert merge_targets([v4("192.0.2.7"), v4("192.0.2.7")], v4("192.0.2.7")) == [v4("192.0.2.7")]
    assert merge_targets([], v6("2001:db8::1")) == [v6("2001:db8::1")]


def test_target_text_brackets_ipv6() -> None:
    assert str(v4("192.0.2.7", 8443)) == "192.0.2.7:8443"
    assert str(v6("2001:db8::1", 8443)) == "[2001:db8::1]:8443"


def test_mark_is_the_firezone_fwmark_packed_unsigned() -> None:
    sock = FakeSocket()
    assert SocketMarker().apply(sock)  # type: ignore[arg-type]
    assert sock.options == [(socket.SOL_SOCKET, SO_MARK, struct.pack("=I", 0xFD002021))]


def test_mark_not_permitted_warns_once_and_continues(caplog: pytest.LogCaptureFixture) -> None:
    marker = SocketMarker()
    caplog.set_level(logging.WARNING, logger="agent.dial")
    for _ in range(3):
        assert marker.apply(FakeSocket(PermissionError(errno.EPERM, "Operation not permitted"))) is False  # type: ignore[arg-type]
    warnings = [r for r in caplog.records if r.name == "agent.dial"]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert "0xfd002021" in warnings[0].getMessage()
    assert marker.warned_not_permitted


@pytest.mark.parametrize("code", [errno.EINVAL, errno.ENOPROTOOPT, errno.EBADF])
def test_other_mark_failures_are_fatal(code: int) -> None:
    with pytest.raises(SocketMarkError) as caught:
        SocketMarker().apply(FakeSocket(OSError(code, "boom")))  # type: ignore[arg-type]
    assert caught.value.errno == code
    assert "SO_MARK 0xfd002021" in str(caught.value)


async def test_resolution_failure_still_dials_a_literal_host(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    async def failing_getaddrinfo(host: str, port: int, **kwargs: Any) -> list[Any]:
        calls.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", failing_getaddrinfo)
    assert await resolve_targets("192.0.2.7", 443) == [v4("192.0.2.7")]
    assert await resolve_targets("[2001:db8::1]", 443) == [v6("2001:db8::1")]
    with pytest.raises(DialError, match="cannot resolve portal.invalid"):
        await resolve_targets("portal.invalid", 443)
    assert calls == ["192.0.2.7", "2001:db8::1", "portal.invalid"]


async def test_every_call_resolves_again(monkeypatch: pytest.MonkeyPatch) -> None:
    answers = iter([["198.51.100.1"], ["198.51.100.2", "198.51.100.3"]])

    async def rotating_getaddrinfo(host: str, port: int, **kwargs: Any) -> list[Any]:
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in next(answers)]

    monkeypatch.setattr(asyncio.get_running_loop(), "getaddrinfo", rotating_getaddrinfo)
    assert await resolve_targets("portal.example", 443) == [v4("198.51.100.1")]
    assert await resolve_targets("portal.example", 443) == [v4("198.51.100.2"), v4("198.51.100.3")]
