"""The TURN allocation's timers cost O(log n) per due item, not a walk over every request and channel.

A gateway's allocation holds a channel (and, while they bind, a request) per client; it is asked for its deadline
after every input batch. Work is counted (transaction and channel deadline look-ups), never timed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from dataplane import stun, turn
from dataplane.base import Address
from dataplane.stun import Method
from dataplane.turn import AllocationState, ChannelBindFailed, ChannelExpired
from tests.unit.test_turn import SERVER, FakeRelay, advance, allocated, events, exchange, keep_alive, transmits


def peer(i: int) -> Address:
    return (f"192.0.2.{i % 250 + 1}", 10000 + i)


@contextmanager
def counted_lookups(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Counts Transaction.poll_timeout / handle_timeout and channel deadline computations."""
    calls = [0]

    def wrap(owner: type, name: str) -> None:
        original = getattr(owner, name)

        def counting(self: object) -> object:
            calls[0] += 1
            return original(self)

        def counting_now(self: object, now: float) -> object:
            calls[0] += 1
            return original(self, now)

        monkeypatch.setattr(owner, name, counting_now if name == "handle_timeout" else counting)

    wrap(stun.Transaction, "poll_timeout")
    wrap(stun.Transaction, "handle_timeout")
    wrap(turn._Channel, "expires_at")
    wrap(turn._Channel, "refresh_at")
    yield calls


def with_channels(count: int, *, answered: bool) -> tuple[turn.Allocation, FakeRelay]:
    alloc, relay = allocated(request_ipv6=False)
    for i in range(count):
        assert alloc.bind_channel(peer(i), 1.0) is not None
    if answered:
        exchange(alloc, relay, 1.0)
    else:
        transmits(alloc)
    events(alloc)
    return alloc, relay


@pytest.mark.parametrize("answered", [False, True], ids=["binding", "bound"])
def test_poll_and_handle_timeout_work_does_not_grow_with_channels(
    monkeypatch: pytest.MonkeyPatch, answered: bool
) -> None:
    work = []
    for count in (10, 400):
        alloc, _ = with_channels(count, answered=answered)
        with counted_lookups(monkeypatch) as calls:
            for _ in range(50):
                alloc.poll_timeout()
                alloc.handle_timeout(1.2)  # nothing is due yet (first retransmit at 2.0)
        monkeypatch.undo()
        work.append(calls[0])
    small, large = work
    assert large <= small + 10, work  # a walk over the channels would cost 40x as much


def test_due_channel_binds_are_retransmitted_and_given_up_in_creation_order() -> None:
    alloc, _ = with_channels(300, answered=False)
    retransmitted = []
    alloc.handle_timeout(2.0)  # one second after the CHANNEL-BINDs: every one is due once
    for transmit in transmits(alloc):
        message = stun.decode(transmit.payload)
        assert message.method == Method.CHANNEL_BIND
        retransmitted.append(message.channel_number())
    assert retransmitted == list(range(0x4000, 0x4000 + 300))
    advance(alloc, until=9.5)  # never answered: each bind gives up 8 s after it was sent
    assert alloc.state is AllocationState.ALLOCATED
    failed = [e for e in events(alloc) if isinstance(e, ChannelBindFailed)]
    assert [e.number for e in failed] == list(range(0x4000, 0x4000 + 300))
    assert not any(alloc.has_channel(peer(i)) for i in range(300))


def test_many_channels_refresh_only_when_used_and_expire_in_creation_order() -> None:
    alloc, relay = with_channels(200, answered=True)
    used = set(range(0, 200, 3))
    for i in sorted(used):
        number = alloc.channel_for(peer(i))
        assert number is not None
        assert alloc.handle_input(turn.encode_channel_data(number, b"x"), SERVER, 50.0)
    refreshed: list[int] = []
    now = 1.0
    while (deadline := alloc.poll_timeout()) is not None and deadline <= 650.0:
        now = deadline
        alloc.handle_timeout(now)
        for request in exchange(alloc, relay, now):
            if request.method == Method.CHANNEL_BIND:
                refreshed.append(request.channel_number() or 0)
                assert now == 301.0  # at bound_at + 5 min exactly
    assert refreshed == [0x4000 + i for i in sorted(used)]
    expired = [e for e in events(alloc) if isinstance(e, ChannelExpired)]
    assert [e.peer for e in expired] == [peer(i) for i in range(200) if i not in used]
    assert all(alloc.has_channel(peer(i)) for i in used)


def test_data_after_the_refresh_time_refreshes_at_once() -> None:
    alloc, relay = with_channels(1, answered=True)
    keep_alive(alloc, relay, until=400.0)  # unused: no refresh at 301
    number = alloc.channel_for(peer(0))
    assert number is not None
    alloc.handle_input(turn.encode_channel_data(number, b"x"), SERVER, 400.0)
    assert alloc.poll_timeout() == 301.0  # overdue: the refresh is wanted now
    alloc.handle_timeout(400.0)
    assert [stun.decode(t.payload).channel_number() for t in transmits(alloc)] == [number]


def test_timer_heaps_stay_bounded_by_live_items() -> None:
    alloc, relay = with_channels(50, answered=True)
    for round_ in range(40):  # every channel receives data, so each refresh re-files its entries
        now = 2.0 + round_
        for i in range(50):
            number = alloc.channel_for(peer(i))
            assert number is not None
            alloc.handle_input(turn.encode_channel_data(number, b"x"), SERVER, now)
        alloc.poll_timeout()
    assert len(alloc._channel_heap) <= 4 * 50 + 64
    assert len(alloc._request_heap) <= 2 * len(alloc._requests) + 64


def test_channel_numbers_go_lowest_free_first_and_a_freed_number_is_reused_before_new_ones() -> None:
    # The search starts above the numbers known to be taken; a number freed below that mark must still come first.
    alloc, relay = allocated(request_ipv6=False)
    events(alloc)
    numbers = [alloc.bind_channel(peer(i), 1.0) for i in range(5)]
    assert numbers == [0x4000 + i for i in range(5)]
    binds = {stun.decode(t.payload).channel_number(): stun.decode(t.payload) for t in transmits(alloc)}
    error = binds[0x4002].error_response(stun.ErrorCode.FORBIDDEN, "Forbidden")
    alloc.handle_input(stun.encode(error, integrity_key=relay.key()), SERVER, 1.1)
    assert [e for e in events(alloc) if isinstance(e, ChannelBindFailed)] == [
        ChannelBindFailed(peer(2), 0x4002, "403 Forbidden", 403)
    ]
    assert alloc.bind_channel(peer(10), 1.2) == 0x4002
    assert alloc.bind_channel(peer(11), 1.2) == 0x4005
