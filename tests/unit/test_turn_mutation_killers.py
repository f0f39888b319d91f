"""TURN client rules that the mutation run showed were unpinned (``make mutate``, issue 11).

RFC 8656 §12 ChannelData (16-bit unsigned number and length, payload up to 65535 bytes), §7.2/§9 REFRESH (one at a
time, LIFETIME 0 deletes, only an allocation we hold), long-term credentials (RFC 8489 §9.2: key = MD5(user:realm:pass),
new credentials sign every later request), a dual-stack relay's addresses racing for the BINDING, and a failed channel
refresh that leaves the binding running. The in-memory relay answers the way a long-term-credential TURN server does.
"""

from __future__ import annotations

import logging

import pytest

from dataplane import stun, turn
from dataplane.base import Address, Transmit
from dataplane.io.rng import SeededRng
from dataplane.stun import Attr, ErrorCode, Method, StunMessage
from dataplane.turn import (
    AllocationDeleted,
    AllocationFailed,
    AllocationState,
    ChannelBindFailed,
    ChannelBound,
    ChannelExpired,
    Decapsulated,
)
from tests.unit.test_turn import OTHER_PEER, events, transmits

SERVER: Address = ("198.51.100.7", 3478)
SERVER_V6: Address = ("2001:db8::7", 3478)
SRFLX: Address = ("203.0.113.20", 40000)
RELAY: Address = ("198.51.100.7", 50000)
PEER: Address = ("192.0.2.50", 6000)
LOCAL: Address = ("10.0.0.2", 5555)
REALM = "firezone"


class Relay:
    """A long-term-credential TURN server for one user (RFC 8656 §5 / RFC 8489 §9.2)."""

    def __init__(self, username: str = "u1", password: str = "p1", nonce: str = "n1") -> None:
        self.username = username
        self.password = password
        self.nonce = nonce

    def key(self) -> bytes:
        return stun.long_term_key(self.username, REALM, self.password)

    def answer(self, transmit: Transmit) -> bytes:
        request = stun.decode(transmit.payload)
        if request.method == Method.BINDING:
            return stun.encode(request.success_response().add_xor_address(Attr.XOR_MAPPED_ADDRESS, SRFLX))
        if request.nonce() is None or request.username() != self.username:
            return self.challenge(request)
        if not stun.check_integrity(transmit.payload, self.key()):
            return self.challenge(request)
        response = request.success_response()
        if request.method == Method.ALLOCATE:
            response.add_xor_address(Attr.XOR_RELAYED_ADDRESS, RELAY).add_lifetime(600)
        elif request.method == Method.REFRESH:
            response.add_lifetime(request.lifetime() or 0)
        return stun.encode(response, integrity_key=self.key())

    def challenge(self, request: StunMessage) -> bytes:
        error = request.error_response(ErrorCode.UNAUTHENTICATED, "Unauthorized").add_realm(REALM).add_nonce(self.nonce)
        return stun.encode(error)

    def error(self, transmit: Transmit, code: int, reason: str) -> bytes:
        request = stun.decode(transmit.payload)
        return stun.encode(request.error_response(code, reason), integrity_key=self.key())


def _exchange(alloc: turn.Allocation, relay: Relay, now: float) -> list[Transmit]:
    seen = []
    while pending := transmits(alloc):
        for transmit in pending:
            seen.append(transmit)
            alloc.handle_input(relay.answer(transmit), transmit.dst, now)
    return seen


def _allocated(relay: Relay | None = None, **kwargs: object) -> tuple[turn.Allocation, Relay]:
    relay = relay or Relay()
    alloc = turn.Allocation(SERVER, relay.username, relay.password, rng=SeededRng(7), now=0.0, **kwargs)  # type: ignore[arg-type]
    _exchange(alloc, relay, 0.0)
    assert alloc.state is AllocationState.ALLOCATED
    events(alloc)
    return alloc, relay


def _run_until(alloc: turn.Allocation, until: float, relay: Relay | None = None) -> None:
    while (deadline := alloc.poll_timeout()) is not None and deadline <= until:
        alloc.handle_timeout(deadline)
        if relay is None:
            transmits(alloc)
        else:
            _exchange(alloc, relay, deadline)


# ---- RFC 8656 §12 ChannelData ---------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 0x7FFF, 0x8000, 0xFFFF])
def test_channel_data_lengths_are_16_bit_unsigned(size: int) -> None:
    encoded = turn.encode_channel_data(0x4FFF, bytes(size))
    assert encoded[:4] == bytes([0x4F, 0xFF, size >> 8, size & 0xFF])
    assert turn.decode_channel_data(encoded) == (0x4FFF, bytes(size))


def test_channel_data_encoder_refuses_with_a_reason() -> None:
    with pytest.raises(ValueError) as info:
        turn.encode_channel_data(0x4000, bytes(0x10000))
    assert str(info.value) == "ChannelData payload longer than 65535 bytes"
    with pytest.raises(ValueError) as info:
        turn.encode_channel_data(0x3FFF, b"")
    assert str(info.value) == "channel number 0x3fff outside 0x4000..0x7fff"


# ---- demultiplexing and the local socket ----------------------------------------------------------------------


def test_owns_exactly_the_relay_server_addresses() -> None:
    alloc = turn.Allocation([SERVER, SERVER_V6], "u", "p", rng=SeededRng(1), now=0.0)
    assert alloc.owns(SERVER) and alloc.owns(SERVER_V6)
    assert not alloc.owns(("198.51.100.7", 3479))
    assert not alloc.owns(PEER)


def test_channel_data_leaves_from_the_allocation_local_socket() -> None:
    alloc, relay = _allocated(local=LOCAL)
    alloc.bind_channel(PEER, 1.0)
    _exchange(alloc, relay, 1.0)
    assert events(alloc) == [ChannelBound(PEER, 0x4000)]
    assert alloc.encapsulate(PEER, b"hi", 1.0) == Transmit(dst=SERVER, payload=b"\x40\x00\x00\x02hi", src=LOCAL)


# ---- REFRESH ----------------------------------------------------------------------------------------------------


def test_refresh_sends_one_request_at_a_time() -> None:
    alloc, _ = _allocated()
    alloc.refresh(1.0)
    alloc.refresh(1.5)
    (refresh,) = transmits(alloc)
    assert stun.decode(refresh.payload).method == Method.REFRESH


def test_refresh_of_an_allocation_we_do_not_hold_sends_nothing() -> None:
    relay = Relay()
    alloc = turn.Allocation(SERVER, "u1", "wrong", rng=SeededRng(7), now=0.0)
    _exchange(alloc, relay, 0.0)
    assert alloc.state is AllocationState.FAILED
    alloc.refresh(1.0)
    assert transmits(alloc) == []


# ---- credentials --------------------------------------------------------------------------------------------------


def test_new_credentials_sign_every_later_request() -> None:
    alloc, relay = _allocated()
    alloc.update_credentials("u2", "p2", 10.0)
    assert (alloc.username, alloc.password) == ("u2", "p2")
    alloc.refresh(10.0)
    (refresh,) = transmits(alloc)
    request = stun.decode(refresh.payload)
    assert request.username() == "u2"
    assert stun.check_integrity(refresh.payload, stun.long_term_key("u2", REALM, "p2"))
    assert not stun.check_integrity(refresh.payload, relay.key())


def test_credentials_updated_before_the_first_challenge_are_the_ones_used() -> None:
    relay = Relay(username="u2", password="p2")
    alloc = turn.Allocation(SERVER, "u1", "p1", rng=SeededRng(7), now=0.0)
    alloc.update_credentials("u2", "p2", 0.0)
    _exchange(alloc, relay, 0.0)
    assert alloc.state is AllocationState.ALLOCATED


# ---- shutdown -----------------------------------------------------------------------------------------------------


def test_shutdown_deletes_an_allocation_we_hold() -> None:
    alloc, relay = _allocated()
    alloc.shutdown(1.0)
    assert alloc.state is AllocationState.DELETING
    (delete,) = transmits(alloc)
    assert stun.decode(delete.payload).lifetime() == 0
    alloc.handle_input(relay.answer(delete), SERVER, 1.0)
    assert events(alloc) == [AllocationDeleted(SERVER)]


@pytest.mark.parametrize("password", ["wrong", None])
def test_shutdown_without_an_allocation_finishes_at_once(password: str | None) -> None:
    relay = Relay()
    alloc = turn.Allocation(SERVER, "u1", password or "p1", rng=SeededRng(7), now=0.0)
    if password is not None:
        _exchange(alloc, relay, 0.0)  # refused: the key is known, but there is nothing to delete
        assert alloc.state is AllocationState.FAILED
        events(alloc)
    transmits(alloc)
    alloc.shutdown(1.0)
    assert alloc.state is AllocationState.DELETED
    assert events(alloc) == [AllocationDeleted(SERVER)]
    assert transmits(alloc) == []


# ---- a relay reachable at two addresses ---------------------------------------------------------------------------


def test_an_error_from_one_address_waits_for_the_other() -> None:
    relay = Relay()
    alloc = turn.Allocation([SERVER, SERVER_V6], "u1", "p1", rng=SeededRng(7), now=0.0)
    v4, v6 = transmits(alloc)
    alloc.handle_input(relay.error(v6, ErrorCode.SERVER_ERROR, "Server Error"), SERVER_V6, 0.1)
    assert events(alloc) == []
    assert alloc.state is AllocationState.ALLOCATING
    alloc.handle_input(relay.answer(v4), SERVER, 0.2)
    _exchange(alloc, relay, 0.2)
    assert alloc.is_allocated
    assert alloc.server == SERVER


def test_a_relay_silent_at_every_address_fails() -> None:
    alloc = turn.Allocation([SERVER, SERVER_V6], "u1", "p1", rng=SeededRng(7), now=0.0)
    _run_until(alloc, 60.0)
    assert events(alloc) == [AllocationFailed(SERVER, "relay did not answer BINDING")]
    assert alloc.state is AllocationState.FAILED


# ---- failures are logged and reported with their code ---------------------------------------------------------------


def test_failed_requests_are_logged_with_relay_kind_and_reason(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="dataplane.turn")
    alloc, relay = _allocated()
    alloc.bind_channel(PEER, 1.0)
    (bind,) = transmits(alloc)
    alloc.handle_input(relay.error(bind, ErrorCode.FORBIDDEN, "Forbidden"), SERVER, 1.0)
    assert events(alloc) == [ChannelBindFailed(PEER, 0x4000, "403 Forbidden", 403)]
    lines = [r.getMessage() for r in caplog.records if r.name == "dataplane.turn"]
    assert "turn ('198.51.100.7', 3478): channel-bind failed: 403 Forbidden" in lines


def test_a_stale_allocation_that_cannot_be_deleted_fails_with_the_error_code() -> None:
    relay = Relay()
    alloc = turn.Allocation(SERVER, "u1", "p1", rng=SeededRng(7), now=0.0)
    pending = transmits(alloc)
    while pending:
        transmit = pending.pop(0)
        request = stun.decode(transmit.payload)
        if request.method == Method.ALLOCATE and request.nonce() is not None:
            answer = relay.error(transmit, ErrorCode.ALLOCATION_MISMATCH, "Allocation Mismatch")
        elif request.method == Method.REFRESH and request.nonce() is not None:
            answer = relay.error(transmit, ErrorCode.SERVER_ERROR, "Server Error")
        else:
            answer = relay.answer(transmit)
        alloc.handle_input(answer, SERVER, 0.0)
        pending += transmits(alloc)
    assert events(alloc)[-1] == AllocationFailed(
        SERVER, "stale allocation could not be deleted: 500 Server Error", ErrorCode.SERVER_ERROR
    )


# ---- a failed channel refresh ---------------------------------------------------------------------------------------


def test_a_failed_channel_refresh_keeps_the_binding_and_new_data_asks_again() -> None:
    alloc, relay = _allocated()
    alloc.bind_channel(PEER, 0.0)
    _exchange(alloc, relay, 0.0)
    assert events(alloc) == [ChannelBound(PEER, 0x4000)]
    assert alloc.handle_input(turn.encode_channel_data(0x4000, b"a"), SERVER, 10.0) == Decapsulated(PEER, b"a")
    refreshes: list[float] = []
    now = 0.0
    while (deadline := alloc.poll_timeout()) is not None and deadline <= 590.0:
        now = deadline
        alloc.handle_timeout(now)
        for transmit in transmits(alloc):
            request = stun.decode(transmit.payload)
            if request.method == Method.CHANNEL_BIND:
                refreshes.append(now)
                alloc.handle_input(relay.error(transmit, ErrorCode.FORBIDDEN, "Forbidden"), SERVER, now)
            else:
                alloc.handle_input(relay.answer(transmit), SERVER, now)
        if refreshes == [300.0]:
            # Data after the failed refresh: the binding still carries it, and a refresh is wanted again.
            assert alloc.handle_input(turn.encode_channel_data(0x4000, b"b"), SERVER, 310.0) == Decapsulated(PEER, b"b")
            refreshes.append(-1.0)
    assert refreshes[:2] == [300.0, -1.0]
    assert len(refreshes) == 3 and 300.0 <= refreshes[2] < 600.0  # once more, not a storm
    assert alloc.has_channel(PEER)
    assert ChannelExpired(PEER, 0x4000) not in events(alloc)


# ---- RFC 8656 §11.6 Data indications ------------------------------------------------------------------------------


def _data_indication(peer: Address | None, data: bytes | None) -> bytes:
    message = StunMessage.indication(Method.DATA, bytes(range(12)))
    if peer is not None:
        message.add_xor_address(Attr.XOR_PEER_ADDRESS, peer)
    if data is not None:
        message.add_data(data)
    return stun.encode(message)


def test_a_data_indication_delivers_the_peer_data() -> None:
    alloc, _ = _allocated()
    assert alloc.handle_input(_data_indication(PEER, b"payload"), SERVER, 1.0) == Decapsulated(PEER, b"payload")
    assert alloc.drops.total() == 0


@pytest.mark.parametrize(("peer", "data"), [(None, b"x"), (PEER, None), (None, None)])
def test_a_data_indication_without_peer_or_data_is_dropped(
    caplog: pytest.LogCaptureFixture, peer: Address | None, data: bytes | None
) -> None:
    caplog.set_level(logging.DEBUG, logger="dataplane.turn")
    alloc, _ = _allocated()
    assert alloc.handle_input(_data_indication(peer, data), SERVER, 1.0) is True
    assert alloc.drops[turn.DropReason.MALFORMED_RESPONSE] == 1
    lines = [r.getMessage() for r in caplog.records if r.name == "dataplane.turn"]
    expected = "dropped (turn_malformed_response): Data indication without XOR-PEER-ADDRESS or DATA"
    assert f"turn ('198.51.100.7', 3478): {expected}" in lines


def test_a_data_indication_before_the_allocation_is_dropped(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="dataplane.turn")
    alloc = turn.Allocation(SERVER, "u1", "p1", rng=SeededRng(7), now=0.0)
    assert alloc.handle_input(_data_indication(PEER, b"x"), SERVER, 0.5) is True
    assert alloc.drops[turn.DropReason.NOT_ALLOCATED] == 1
    lines = [r.getMessage() for r in caplog.records if r.name == "dataplane.turn"]
    assert "turn ('198.51.100.7', 3478): dropped (turn_not_allocated): Data indication" in lines


def test_data_indications_keep_a_channel_refreshed() -> None:
    alloc, relay = _allocated()
    alloc.bind_channel(PEER, 0.0)
    _exchange(alloc, relay, 0.0)
    events(alloc)
    assert alloc.handle_input(_data_indication(PEER, b"x"), SERVER, 10.0) == Decapsulated(PEER, b"x")
    binds = []
    while (deadline := alloc.poll_timeout()) is not None and deadline <= 700.0:
        alloc.handle_timeout(deadline)
        binds += [
            deadline for t in _exchange(alloc, relay, deadline) if stun.decode(t.payload).method == Method.CHANNEL_BIND
        ]
    assert binds == [300.0]
    assert alloc.has_channel(PEER)


# ---- wake-ups: poll_timeout names only deadlines where something is due ----------------------------------------------


def _wakeups(alloc: turn.Allocation, relay: Relay, until: float) -> list[float]:
    """Drives the allocation from deadline to deadline (the relay answers everything); the deadlines it asked for."""
    seen = []
    while (deadline := alloc.poll_timeout()) is not None and deadline <= until:
        seen.append(deadline)
        alloc.handle_timeout(deadline)
        _exchange(alloc, relay, deadline)
    return seen


def test_channel_deadlines_wake_the_driver_only_when_a_refresh_or_expiry_is_due() -> None:
    # RFC 8656 §12: a channel lives 10 minutes; it is refreshed (here at 5 minutes) only when it is in use. Keepalive
    # BINDINGs fall on multiples of 25 s and the allocation refreshes at 300 and 600, so 340/370/640/670 are channels'.
    alloc, relay = _allocated()
    _run_until(alloc, 40.0, relay)
    alloc.bind_channel(PEER, 40.0)
    _exchange(alloc, relay, 40.0)
    alloc.handle_input(turn.encode_channel_data(0x4000, b"in use"), SERVER, 50.0)
    _run_until(alloc, 70.0, relay)
    alloc.bind_channel(OTHER_PEER, 70.0)
    _exchange(alloc, relay, 70.0)
    assert events(alloc) == [ChannelBound(PEER, 0x4000), ChannelBound(OTHER_PEER, 0x4001)]
    wakeups = _wakeups(alloc, relay, 950.0)
    assert 340.0 in wakeups  # PEER's refresh (it carried data): rebound at 340, lives until 940
    assert 370.0 not in wakeups  # OTHER_PEER carried nothing: no refresh wanted, nothing to wake up for
    assert 640.0 not in wakeups  # PEER's expiry before the refresh no longer applies
    assert 670.0 in wakeups and 940.0 in wakeups  # the two expiries
    expired = [e for e in events(alloc) if isinstance(e, ChannelExpired)]
    assert expired == [ChannelExpired(OTHER_PEER, 0x4001), ChannelExpired(PEER, 0x4000)]


def test_after_the_five_minute_hold_a_number_is_free_again_and_the_lowest_is_handed_out() -> None:
    # RFC 8656 §12: a number may not go to another peer within 5 minutes of its binding expiring; from then on it is
    # free, and the hold that reserved it for its previous peer is over too.
    alloc, relay = _allocated()
    alloc.bind_channel(PEER, 0.0)
    alloc.bind_channel(OTHER_PEER, 0.0)
    _exchange(alloc, relay, 0.0)
    assert events(alloc) == [ChannelBound(PEER, 0x4000), ChannelBound(OTHER_PEER, 0x4001)]
    _run_until(alloc, 900.0, relay)  # both expire unused at 600; 900 (a keepalive) is exactly 5 minutes later
    expired = [e for e in events(alloc) if isinstance(e, ChannelExpired)]
    assert expired == [ChannelExpired(PEER, 0x4000), ChannelExpired(OTHER_PEER, 0x4001)]
    assert alloc.bind_channel(OTHER_PEER, 900.0) == 0x4000


# ---- a keepalive BINDING failing while the ALLOCATE is still in flight -------------------------------------------


def test_a_failed_keepalive_binding_leaves_a_pending_allocate_to_decide() -> None:
    relay = Relay()
    patient = stun.RetransmitPolicy(initial_rto=10.0, max_rto=10.0, backoff=1.0, max_elapsed=60.0)
    alloc = turn.Allocation(SERVER, relay.username, relay.password, rng=SeededRng(7), now=0.0, policy=patient)
    (binding,) = transmits(alloc)
    alloc.handle_input(relay.answer(binding), SERVER, 0.0)
    (allocate,) = transmits(alloc)  # the ALLOCATE goes unanswered for now
    assert stun.decode(allocate.payload).method == Method.ALLOCATE
    alloc.handle_timeout(25.0)
    keepalive = next(t for t in transmits(alloc) if stun.decode(t.payload).method == Method.BINDING)
    error = stun.decode(keepalive.payload).error_response(ErrorCode.SERVER_ERROR, "Server Error")
    alloc.handle_input(stun.encode(error), SERVER, 25.0)
    assert alloc.state is AllocationState.ALLOCATING  # the ALLOCATE in flight decides, not the keepalive
    assert not [e for e in events(alloc) if isinstance(e, AllocationFailed)]
    alloc.handle_input(relay.answer(allocate), SERVER, 26.0)  # the 401 challenge
    _exchange(alloc, relay, 26.0)
    assert alloc.is_allocated


def test_malformed_channel_data_is_dropped_and_logged_with_what_is_wrong(caplog: pytest.LogCaptureFixture) -> None:
    # RFC 8656 §12.5: over UDP the length field counts exactly the bytes that follow
    caplog.set_level(logging.DEBUG, logger="dataplane.turn")
    alloc, _ = _allocated()
    assert alloc.handle_input(b"\x40\x00\x00\x0aabc", SERVER, 1.0) is True
    assert alloc.drops[turn.DropReason.MALFORMED_CHANNEL_DATA] == 1
    lines = [r.getMessage() for r in caplog.records if r.name == "dataplane.turn"]
    expected = "dropped (turn_malformed_channel_data): length field 10 but 3 bytes follow"
    assert f"turn ('198.51.100.7', 3478): {expected}" in lines


def test_channel_data_on_a_number_we_did_not_bind_is_dropped_and_logged_with_the_number(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="dataplane.turn")
    alloc, _ = _allocated()
    assert alloc.handle_input(turn.encode_channel_data(0x4001, b"x"), SERVER, 1.0) is True
    assert alloc.drops[turn.DropReason.UNKNOWN_CHANNEL] == 1
    lines = [r.getMessage() for r in caplog.records if r.name == "dataplane.turn"]
    assert "turn ('198.51.100.7', 3478): dropped (turn_unknown_channel): channel 0x4001" in lines


# ---- RFC 8656 §12 channel numbers -----------------------------------------------------------------------------------


def test_a_peer_is_bound_to_one_channel_whatever_the_calls() -> None:
    alloc, relay = _allocated()
    assert alloc.bind_channel(PEER, 1.0) == 0x4000
    assert alloc.bind_channel(PEER, 1.5) == 0x4000  # pending: no second number, no second request
    assert [stun.decode(t.payload).method for t in transmits(alloc)] == [Method.CHANNEL_BIND]
    alloc.bind_channel(OTHER_PEER, 2.0)
    _exchange(alloc, relay, 2.0)
    assert alloc.bind_channel(PEER, 3.0) == 0x4000  # bound
    assert transmits(alloc) == []


def test_binding_a_channel_before_the_allocation_names_the_state() -> None:
    alloc = turn.Allocation(SERVER, "u1", "p1", rng=SeededRng(7), now=0.0)
    with pytest.raises(RuntimeError) as info:
        alloc.bind_channel(PEER, 0.0)
    assert str(info.value) == "cannot bind a channel in state allocating"


def test_numbers_run_from_0x4000_to_0x4fff_and_then_none_is_free(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="dataplane.turn")
    alloc, _ = _allocated()
    numbers = [alloc.bind_channel((f"10.1.{i >> 8}.{i & 0xFF}", 9000), 1.0) for i in range(0x1000)]
    assert numbers == list(range(0x4000, 0x5000))
    assert alloc.bind_channel(PEER, 1.0) is None
    lines = [r.getMessage() for r in caplog.records if r.name == "dataplane.turn"]
    assert lines[-1] == "turn ('198.51.100.7', 3478): no free channel number for ('192.0.2.50', 6000)"


def test_a_new_peer_gets_the_next_number_past_held_and_bound_ones() -> None:
    alloc, relay = _allocated()
    third: Address = ("192.0.2.52", 6002)
    alloc.bind_channel(PEER, 0.0)
    alloc.bind_channel(OTHER_PEER, 0.0)
    _exchange(alloc, relay, 0.0)
    alloc.handle_input(turn.encode_channel_data(0x4001, b"in use"), SERVER, 10.0)  # OTHER_PEER's stays (refreshed)
    _run_until(alloc, 610.0, relay)
    assert not alloc.has_channel(PEER) and alloc.has_channel(OTHER_PEER)
    assert alloc.bind_channel(third, 610.0) == 0x4002  # 0x4000 held for PEER until 900, 0x4001 bound


def test_a_held_number_goes_to_another_peer_exactly_five_minutes_after_expiry() -> None:
    alloc, relay = _allocated()
    alloc.bind_channel(PEER, 0.0)
    _exchange(alloc, relay, 0.0)
    _run_until(alloc, 899.0, relay)  # expired unused at 600
    assert not alloc.has_channel(PEER)
    assert alloc.bind_channel(OTHER_PEER, 900.0) == 0x4000


def test_a_refused_rebind_by_the_same_peer_keeps_the_numbers_hold() -> None:
    # RFC 8656 §12: a number is held for 5 minutes after its binding expired; a rebind the relay refuses creates no
    # binding, so the number must not go to another peer before the old hold ends (600 + 300 s).
    alloc, relay = _allocated()
    alloc.bind_channel(PEER, 0.0)
    _exchange(alloc, relay, 0.0)
    _run_until(alloc, 650.0, relay)  # expired unused at 600
    assert not alloc.has_channel(PEER)
    assert alloc.bind_channel(PEER, 700.0) == 0x4000  # the same peer may have its number back at once
    (bind,) = [t for t in transmits(alloc) if stun.decode(t.payload).method == Method.CHANNEL_BIND]
    alloc.handle_input(relay.error(bind, ErrorCode.FORBIDDEN, "Forbidden"), SERVER, 700.0)
    assert events(alloc)[-1] == ChannelBindFailed(PEER, 0x4000, "403 Forbidden", 403)
    assert alloc.bind_channel(OTHER_PEER, 700.0) == 0x4001
    _run_until(alloc, 900.0, relay)
    assert alloc.bind_channel(("192.0.2.52", 6002), 900.0) == 0x4000  # the hold has ended


def test_a_retransmission_repeats_the_request_to_the_address_it_was_sent_to() -> None:
    # RFC 8489 §6.2.1: a retransmission is the same request (same transaction ID and bytes) to the same destination
    alloc = turn.Allocation([SERVER, SERVER_V6], "u1", "p1", rng=SeededRng(7), now=0.0, local=LOCAL)
    first = transmits(alloc)
    assert [t.dst for t in first] == [SERVER, SERVER_V6]
    alloc.handle_timeout(1.0)
    assert transmits(alloc) == first


def test_an_allocation_whose_refresh_is_still_unanswered_expires_exactly_at_its_lifetime() -> None:
    # RFC 8656 §7.2 / §9: the allocation lives LIFETIME seconds unless refreshed; a REFRESH still in flight then
    # does not keep it alive
    relay = Relay()
    patient = stun.RetransmitPolicy(initial_rto=100.0, max_rto=100.0, backoff=1.0, max_elapsed=1000.0)
    alloc = turn.Allocation(SERVER, relay.username, relay.password, rng=SeededRng(7), now=0.0, policy=patient)
    _exchange(alloc, relay, 0.0)
    assert alloc.is_allocated  # LIFETIME 600
    events(alloc)
    while (deadline := alloc.poll_timeout()) is not None and deadline < 600.0:
        alloc.handle_timeout(deadline)
        for transmit in transmits(alloc):
            if stun.decode(transmit.payload).method != Method.REFRESH:  # the relay never answers the REFRESH
                alloc.handle_input(relay.answer(transmit), SERVER, deadline)
    assert alloc.is_allocated and alloc.poll_timeout() == 600.0
    alloc.handle_timeout(600.0)
    assert [e for e in events(alloc) if isinstance(e, turn.AllocationExpired)] == [
        turn.AllocationExpired(SERVER, (RELAY,), "lifetime ran out")
    ]


# ---- second half of the mutation run (issue 11): responses the relay may get wrong, and what is reported ------------


def _first_allocate(alloc: turn.Allocation, relay: Relay, now: float) -> Transmit:
    """Answers the BINDING and the 401 challenge; returns the authenticated ALLOCATE, left unanswered."""
    pending = transmits(alloc)
    while pending:
        transmit = pending.pop(0)
        request = stun.decode(transmit.payload)
        if request.method == Method.ALLOCATE and request.nonce() is not None:
            return transmit
        alloc.handle_input(relay.answer(transmit), transmit.dst, now)
        pending += transmits(alloc)
    raise AssertionError("no authenticated ALLOCATE was sent")


def test_a_truncated_channel_data_is_refused_as_shorter_than_its_header() -> None:
    with pytest.raises(turn.ChannelDataParseError) as info:
        turn.decode_channel_data(b"\x40\x00\x00")
    assert str(info.value) == "shorter than a ChannelData header"


@pytest.mark.parametrize(("first", "expected"), [(0x3F, False), (0x40, True), (0x7F, True), (0x80, False)])
def test_only_first_bytes_0x40_to_0x7f_demultiplex_as_channel_data(first: int, expected: bool) -> None:
    # RFC 8656 §12 / RFC 7983: ChannelData starts with the bits 01 (numbers 0x4000-0x7FFF); 0x80-0xBF is RTP/RTCP
    assert turn.is_channel_data(bytes([first, 0, 0, 0])) is expected


def test_nothing_is_known_about_the_relay_before_it_answers() -> None:
    alloc = turn.Allocation(SERVER, "u1", "p1", rng=SeededRng(7), now=0.0)
    assert alloc.srflx is None
    assert alloc.relay_addresses == ()
    assert alloc.ipv4_relay is None and alloc.ipv6_relay is None
    assert alloc.rtt is None and alloc.lifetime is None and alloc.expires_at is None


@pytest.mark.parametrize("missing", ["relayed address", "lifetime"])
def test_an_allocate_success_without_relayed_address_or_lifetime_fails_the_allocation(missing: str) -> None:
    # RFC 8656 §7.3: the success response carries XOR-RELAYED-ADDRESS and LIFETIME; without them there is nothing to use
    relay = Relay()
    alloc = turn.Allocation(SERVER, "u1", "p1", rng=SeededRng(7), now=0.0)
    allocate = _first_allocate(alloc, relay, 0.0)
    response = stun.decode(allocate.payload).success_response()
    if missing == "lifetime":
        response.add_xor_address(Attr.XOR_RELAYED_ADDRESS, RELAY)
    else:
        response.add_lifetime(600)
    alloc.handle_input(stun.encode(response, integrity_key=relay.key()), SERVER, 0.1)
    assert alloc.state is AllocationState.FAILED
    assert events(alloc)[-1] == AllocationFailed(
        SERVER, "ALLOCATE success without XOR-RELAYED-ADDRESS or LIFETIME", None
    )


def test_the_round_trip_time_is_measured_on_the_allocate_too() -> None:
    relay = Relay()
    alloc = turn.Allocation(SERVER, "u1", "p1", rng=SeededRng(7), now=0.0)
    (binding,) = transmits(alloc)
    alloc.handle_input(relay.answer(binding), SERVER, 0.1)
    assert alloc.rtt == pytest.approx(0.1)
    (unauthenticated,) = transmits(alloc)
    alloc.handle_input(relay.answer(unauthenticated), SERVER, 0.2)  # the 401 challenge
    (allocate,) = transmits(alloc)
    alloc.handle_input(relay.answer(allocate), SERVER, 0.5)
    assert alloc.is_allocated
    assert alloc.rtt == pytest.approx(0.3)


def test_the_allocate_response_mapped_address_is_the_server_reflexive_address() -> None:
    # RFC 8656 §7.3: the ALLOCATE success carries XOR-MAPPED-ADDRESS, the client's address as the relay saw it
    relay = Relay()
    alloc = turn.Allocation(SERVER, "u1", "p1", rng=SeededRng(7), now=0.0)
    allocate = _first_allocate(alloc, relay, 0.0)
    assert events(alloc) == [turn.BindingSucceeded(SERVER, SRFLX, 0.0)]
    moved: Address = ("203.0.113.21", 40001)
    response = stun.decode(allocate.payload).success_response()
    response.add_xor_address(Attr.XOR_RELAYED_ADDRESS, RELAY).add_xor_address(Attr.XOR_MAPPED_ADDRESS, moved)
    alloc.handle_input(stun.encode(response.add_lifetime(600), integrity_key=relay.key()), SERVER, 0.25)
    assert alloc.srflx == moved
    assert events(alloc) == [
        turn.BindingSucceeded(SERVER, moved, 0.25),
        turn.AllocationSucceeded(SERVER, (RELAY,), moved, 600),
    ]


def test_an_error_response_without_error_code_fails_the_allocation_saying_so() -> None:
    relay = Relay()
    alloc = turn.Allocation(SERVER, "u1", "p1", rng=SeededRng(7), now=0.0)
    allocate = _first_allocate(alloc, relay, 0.0)
    request = stun.decode(allocate.payload)
    bare_error = StunMessage(request.method, stun.MessageClass.ERROR, request.transaction_id, [])
    alloc.handle_input(stun.encode(bare_error, integrity_key=relay.key()), SERVER, 0.1)
    assert events(alloc)[-1] == AllocationFailed(SERVER, "0 error response without ERROR-CODE", None)


def test_a_refresh_success_without_lifetime_is_counted_and_keeps_the_current_lifetime(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="dataplane.turn")
    relay = Relay()
    alloc = turn.Allocation(SERVER, "u1", "p1", rng=SeededRng(7), now=0.0, lifetime=1200)
    allocate = _first_allocate(alloc, relay, 0.0)
    response = stun.decode(allocate.payload).success_response().add_xor_address(Attr.XOR_RELAYED_ADDRESS, RELAY)
    alloc.handle_input(stun.encode(response.add_lifetime(1200), integrity_key=relay.key()), SERVER, 0.0)
    assert alloc.lifetime == 1200
    events(alloc)
    alloc.refresh(100.0)
    (refresh,) = transmits(alloc)
    bare = stun.decode(refresh.payload).success_response()  # no LIFETIME
    alloc.handle_input(stun.encode(bare, integrity_key=relay.key()), SERVER, 100.0)
    assert events(alloc) == [turn.AllocationRefreshed(SERVER, 1200)]
    assert alloc.expires_at == 1300.0
    assert alloc.drops[turn.DropReason.MALFORMED_RESPONSE] == 1
    lines = [r.getMessage() for r in caplog.records if r.name == "dataplane.turn"]
    assert "turn ('198.51.100.7', 3478): dropped (turn_malformed_response): REFRESH success without LIFETIME" in lines


def test_a_stale_allocation_is_deleted_with_a_signed_lifetime_zero_refresh_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="dataplane.turn")
    relay = Relay()
    alloc = turn.Allocation(SERVER, "u1", "p1", rng=SeededRng(7), now=0.0)
    allocate = _first_allocate(alloc, relay, 0.0)
    alloc.handle_input(relay.error(allocate, ErrorCode.ALLOCATION_MISMATCH, "Allocation Mismatch"), SERVER, 0.0)
    (deletion,) = transmits(alloc)  # signed at once: the key and nonce are known, no second 401 round trip
    request = stun.decode(deletion.payload)
    assert (request.method, request.lifetime(), request.nonce()) == (Method.REFRESH, 0, relay.nonce)
    assert stun.check_integrity(deletion.payload, relay.key())
    alloc.handle_input(relay.answer(deletion), SERVER, 0.0)
    _exchange(alloc, relay, 0.0)  # then the ALLOCATE succeeds
    assert alloc.is_allocated
    lines = [r.getMessage() for r in caplog.records if r.name == "dataplane.turn"]
    assert "turn ('198.51.100.7', 3478): stale allocation deleted; allocating again" in lines


@pytest.mark.parametrize("missing", ["nonce", "realm"])
def test_a_challenge_without_nonce_or_realm_is_malformed_and_fails_the_allocation(
    caplog: pytest.LogCaptureFixture, missing: str
) -> None:
    # RFC 8489 §9.2.4: a 401 carries REALM and NONCE; without them the client cannot compute a key to retry with
    caplog.set_level(logging.DEBUG, logger="dataplane.turn")
    alloc = turn.Allocation(SERVER, "u1", "p1", rng=SeededRng(7), now=0.0)
    (binding,) = transmits(alloc)
    alloc.handle_input(Relay().answer(binding), SERVER, 0.0)
    (allocate,) = transmits(alloc)
    challenge = stun.decode(allocate.payload).error_response(ErrorCode.UNAUTHENTICATED, "Unauthorized")
    if missing == "nonce":
        challenge.add_realm(REALM)
    else:
        challenge.add_nonce("n1")
    alloc.handle_input(stun.encode(challenge), SERVER, 0.1)
    assert events(alloc)[-1] == AllocationFailed(SERVER, "401 Unauthorized", ErrorCode.UNAUTHENTICATED)
    assert transmits(alloc) == []
    assert alloc.drops[turn.DropReason.MALFORMED_RESPONSE] == 1
    lines = [r.getMessage() for r in caplog.records if r.name == "dataplane.turn"]
    assert "turn ('198.51.100.7', 3478): dropped (turn_malformed_response): challenge without NONCE/REALM" in lines


def test_a_response_to_a_request_we_did_not_send_is_dropped_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="dataplane.turn")
    alloc, relay = _allocated()
    stranger = StunMessage.request(Method.BINDING, bytes(range(12))).success_response()
    assert alloc.handle_input(stun.encode(stranger.add_xor_address(Attr.XOR_MAPPED_ADDRESS, SRFLX)), SERVER, 1.0)
    assert alloc.drops[turn.DropReason.UNKNOWN_TRANSACTION] == 1
    lines = [r.getMessage() for r in caplog.records if r.name == "dataplane.turn"]
    expected = "dropped (turn_unknown_transaction): no request with that transaction id"
    assert f"turn ('198.51.100.7', 3478): {expected}" in lines


def test_a_refresh_already_in_flight_is_not_doubled_at_half_the_lifetime() -> None:
    # RFC 8656 §7: one REFRESH at a time; the half-lifetime deadline finds the one sent early still unanswered
    relay = Relay()
    patient = stun.RetransmitPolicy(initial_rto=100.0, max_rto=100.0, backoff=1.0, max_elapsed=1000.0)
    alloc = turn.Allocation(SERVER, "u1", "p1", rng=SeededRng(7), now=0.0, policy=patient)
    _exchange(alloc, relay, 0.0)
    assert alloc.is_allocated  # LIFETIME 600: refreshed at 300
    alloc.refresh(290.0)
    (early,) = transmits(alloc)
    alloc.handle_timeout(300.0)
    assert [t for t in transmits(alloc) if stun.decode(t.payload).method == Method.REFRESH] == []
    alloc.handle_input(relay.answer(early), SERVER, 301.0)
    assert alloc.expires_at == 901.0


def test_a_channel_bind_retried_after_a_stale_nonce_still_binds_its_channel() -> None:
    # RFC 8489 §9.2.5: a 438 is answered by repeating the request (new transaction) with the new NONCE; the repeated
    # CHANNEL-BIND binds the same number to the same peer
    alloc, relay = _allocated()
    assert alloc.bind_channel(PEER, 1.0) == 0x4000
    (bind,) = transmits(alloc)
    request = stun.decode(bind.payload)
    stale = request.error_response(ErrorCode.STALE_NONCE, "Stale Nonce").add_realm(REALM).add_nonce("n2")
    alloc.handle_input(stun.encode(stale), SERVER, 1.0)
    (retry,) = transmits(alloc)
    retried = stun.decode(retry.payload)
    assert retried.nonce() == "n2" and retried.transaction_id != request.transaction_id
    assert (retried.channel_number(), retried.xor_address(Attr.XOR_PEER_ADDRESS)) == (0x4000, PEER)
    alloc.handle_input(relay.answer(retry), SERVER, 1.1)
    assert events(alloc) == [ChannelBound(PEER, 0x4000)]
    assert alloc.channel_for(PEER) == 0x4000


@pytest.mark.parametrize("datagram", [b"", b"\x40", b"\x40\x00\x00"])
def test_a_datagram_shorter_than_any_header_is_dropped_as_malformed_stun(datagram: bytes) -> None:
    alloc, _ = _allocated()
    assert alloc.handle_input(datagram, SERVER, 1.0) is True
    assert alloc.drops[turn.DropReason.MALFORMED_STUN] == 1
    assert alloc.drops.total() == 1


def test_an_empty_channel_data_message_delivers_an_empty_payload() -> None:
    # RFC 8656 §12.4: the length field may be 0
    alloc, relay = _allocated()
    alloc.bind_channel(PEER, 1.0)
    _exchange(alloc, relay, 1.0)
    assert turn.decode_channel_data(b"\x40\x00\x00\x00") == (0x4000, b"")
    assert alloc.handle_input(b"\x40\x00\x00\x00", SERVER, 2.0) == Decapsulated(PEER, b"")


def test_channel_numbers_up_to_0x7fff_parse_and_a_refusal_names_the_number() -> None:
    # RFC 5766 allowed 0x4000-0x7FFF; RFC 8656 narrowed what a client binds, a parser still accepts the old range
    assert turn.decode_channel_data(b"\x7f\xff\x00\x01x") == (0x7FFF, b"x")
    with pytest.raises(turn.ChannelDataParseError) as info:
        turn.decode_channel_data(b"\x80\x00\x00\x00")
    assert str(info.value) == "channel number 0x8000 outside 0x4000..0x7fff"


def test_relay_addresses_may_come_as_a_tuple_but_not_as_nothing() -> None:
    alloc = turn.Allocation((SERVER, SERVER_V6), "u1", "p1", rng=SeededRng(7), now=0.0)
    assert alloc.servers == [SERVER, SERVER_V6]
    assert [t.dst for t in transmits(alloc)] == [SERVER, SERVER_V6]
    with pytest.raises(ValueError) as info:
        turn.Allocation([], "u1", "p1", rng=SeededRng(7), now=0.0)
    assert str(info.value) == "an allocation needs at least one server address"


@pytest.mark.parametrize("challenge_realm", [REALM, None])
def test_a_configured_realm_signs_requests_when_the_challenge_names_the_same_or_none(
    challenge_realm: str | None,
) -> None:
    relay = Relay()
    alloc = turn.Allocation(SERVER, "u1", "p1", rng=SeededRng(7), now=0.0, realm=REALM)
    (binding,) = transmits(alloc)
    alloc.handle_input(relay.answer(binding), SERVER, 0.0)
    (allocate,) = transmits(alloc)
    challenge = stun.decode(allocate.payload).error_response(ErrorCode.UNAUTHENTICATED, "Unauthorized")
    if challenge_realm is not None:
        challenge.add_realm(challenge_realm)
    alloc.handle_input(stun.encode(challenge.add_nonce(relay.nonce)), SERVER, 0.0)
    (signed,) = transmits(alloc)
    assert stun.decode(signed.payload).realm() == REALM
    assert stun.check_integrity(signed.payload, relay.key())
    alloc.handle_input(relay.answer(signed), SERVER, 0.0)
    assert alloc.is_allocated


def test_the_first_allocate_carries_no_credentials_until_a_nonce_is_known() -> None:
    # RFC 8489 §9.2.3: without a NONCE from the server the first request goes out without USERNAME/NONCE/integrity,
    # even when the realm (and so the key) is known beforehand
    relay = Relay()
    alloc = turn.Allocation(SERVER, "u1", "p1", rng=SeededRng(7), now=0.0, realm=REALM)
    alloc.update_credentials("u1", "p1", 0.0)
    (binding,) = transmits(alloc)
    alloc.handle_input(relay.answer(binding), SERVER, 0.0)
    (allocate,) = transmits(alloc)
    request = stun.decode(allocate.payload)
    assert (request.username(), request.nonce(), request.has(Attr.MESSAGE_INTEGRITY)) == (None, None, False)


def test_a_response_with_bad_integrity_is_dropped_and_logged_with_the_request_kind(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="dataplane.turn")
    alloc, _ = _allocated()
    alloc.refresh(1.0)
    (refresh,) = transmits(alloc)
    forged = stun.encode(stun.decode(refresh.payload).success_response().add_lifetime(600), integrity_key=b"forged")
    assert alloc.handle_input(forged, SERVER, 1.1) is True
    assert alloc.drops[turn.DropReason.BAD_INTEGRITY] == 1
    lines = [r.getMessage() for r in caplog.records if r.name == "dataplane.turn"]
    assert "turn ('198.51.100.7', 3478): dropped (turn_bad_integrity): refresh response" in lines


def test_a_binding_success_with_only_a_plain_mapped_address_tells_the_srflx() -> None:
    # RFC 8489 §14.1: MAPPED-ADDRESS is still understood (servers speaking RFC 3489 send only it)
    alloc = turn.Allocation(SERVER, "u1", "p1", rng=SeededRng(7), now=0.0)
    (binding,) = transmits(alloc)
    response = stun.decode(binding.payload).success_response().add_address(Attr.MAPPED_ADDRESS, SRFLX)
    alloc.handle_input(stun.encode(response), SERVER, 0.1)
    assert alloc.srflx == SRFLX
    assert events(alloc) == [turn.BindingSucceeded(SERVER, SRFLX, 0.1)]


def test_a_binding_success_without_any_mapped_address_is_counted_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="dataplane.turn")
    alloc = turn.Allocation(SERVER, "u1", "p1", rng=SeededRng(7), now=0.0)
    (binding,) = transmits(alloc)
    alloc.handle_input(stun.encode(stun.decode(binding.payload).success_response()), SERVER, 0.1)
    assert alloc.srflx is None
    assert alloc.drops[turn.DropReason.MALFORMED_RESPONSE] == 1
    lines = [r.getMessage() for r in caplog.records if r.name == "dataplane.turn"]
    expected = "dropped (turn_malformed_response): BINDING success without a mapped address"
    assert f"turn ('198.51.100.7', 3478): {expected}" in lines


def test_malformed_and_unexpected_stun_is_dropped_and_logged_with_what_it_was(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="dataplane.turn")
    alloc, _ = _allocated()
    assert alloc.handle_input(b"\x00\x01\x00", SERVER, 1.0) is True
    assert alloc.handle_input(stun.encode(StunMessage.request(Method.BINDING, bytes(12))), SERVER, 1.0) is True
    assert alloc.drops[turn.DropReason.MALFORMED_STUN] == 1
    assert alloc.drops[turn.DropReason.UNEXPECTED_MESSAGE] == 1
    lines = [r.getMessage() for r in caplog.records if r.name == "dataplane.turn"]
    assert "turn ('198.51.100.7', 3478): dropped (turn_malformed_stun): shorter than a STUN header" in lines
    assert "turn ('198.51.100.7', 3478): dropped (turn_unexpected_message): class 0 method 1" in lines


def test_a_request_after_a_burst_of_answered_ones_is_still_retransmitted() -> None:
    # a gateway binds a channel per client: answered requests must not cost the next one its retransmission timer
    alloc, relay = _allocated()
    for i in range(100):
        alloc.bind_channel((f"10.2.0.{i}", 9000), 1.0)
    _exchange(alloc, relay, 1.0)
    assert alloc.bind_channel(PEER, 1.0) == 0x4064
    (bind,) = transmits(alloc)
    assert alloc.poll_timeout() == 2.0
    alloc.handle_timeout(2.0)
    assert transmits(alloc) == [bind]


def test_every_request_leaves_from_the_allocation_local_socket() -> None:
    relay = Relay()
    alloc = turn.Allocation(SERVER, "u1", "p1", rng=SeededRng(7), now=0.0, local=LOCAL)
    sent = _exchange(alloc, relay, 0.0)
    alloc.bind_channel(PEER, 1.0)
    sent += _exchange(alloc, relay, 1.0)
    assert [stun.decode(t.payload).method for t in sent] == [
        Method.BINDING,
        Method.ALLOCATE,
        Method.ALLOCATE,
        Method.CHANNEL_BIND,
    ]
    assert {t.src for t in sent} == {LOCAL}


def test_an_unsigned_success_carrying_an_error_code_is_not_taken_as_authentic() -> None:
    # only an error response with a challenge code may come without MESSAGE-INTEGRITY (RFC 8489 §9.2.5)
    alloc, _ = _allocated()
    alloc.refresh(1.0)
    (refresh,) = transmits(alloc)
    forged = stun.decode(refresh.payload).success_response().add_lifetime(0)
    forged.add_error_code(ErrorCode.UNAUTHENTICATED, "Unauthorized")
    assert alloc.handle_input(stun.encode(forged), SERVER, 1.1) is True
    assert alloc.drops[turn.DropReason.BAD_INTEGRITY] == 1
    assert events(alloc) == []
    assert alloc.expires_at == 600.0


def test_an_indication_other_than_data_is_dropped_as_unexpected() -> None:
    alloc, _ = _allocated()
    keepalive = StunMessage.indication(Method.BINDING, bytes(range(12)))
    assert alloc.handle_input(stun.encode(keepalive), SERVER, 1.0) is True
    assert alloc.drops[turn.DropReason.UNEXPECTED_MESSAGE] == 1
    assert alloc.drops.total() == 1


def test_the_lifetime_the_relay_grants_on_refresh_is_the_one_kept() -> None:
    # RFC 8656 §7.3/§9: the server may grant less than asked; the granted LIFETIME rules the next refresh and expiry
    alloc, relay = _allocated()
    alloc.refresh(100.0)
    (refresh,) = transmits(alloc)
    granted = stun.decode(refresh.payload).success_response().add_lifetime(300)
    alloc.handle_input(stun.encode(granted, integrity_key=relay.key()), SERVER, 100.0)
    assert events(alloc) == [turn.AllocationRefreshed(SERVER, 300)]
    assert (alloc.lifetime, alloc.expires_at) == (300, 400.0)
    assert alloc.drops.total() == 0


def _patient_allocation() -> tuple[turn.Allocation, Relay, Transmit]:
    """An allocation whose first signed ALLOCATE is in flight; retransmissions only every 100 s."""
    relay = Relay()
    patient = stun.RetransmitPolicy(initial_rto=100.0, max_rto=100.0, backoff=1.0, max_elapsed=1000.0)
    alloc = turn.Allocation(SERVER, "u1", "p1", rng=SeededRng(7), now=0.0, policy=patient)
    return alloc, relay, _first_allocate(alloc, relay, 0.0)


def _answer_keepalive(alloc: turn.Allocation, relay: Relay, now: float) -> list[Transmit]:
    """Fires the 25 s keepalive, answers it; returns whatever else was sent."""
    alloc.handle_timeout(now)
    others = []
    for transmit in transmits(alloc):
        if stun.decode(transmit.payload).method == Method.BINDING:
            alloc.handle_input(relay.answer(transmit), SERVER, now)
        else:
            others.append(transmit)
    return others + transmits(alloc)


def test_a_keepalive_answered_while_the_allocate_is_in_flight_sends_no_second_allocate() -> None:
    alloc, relay, allocate = _patient_allocation()
    assert _answer_keepalive(alloc, relay, 25.0) == []
    alloc.handle_input(relay.answer(allocate), SERVER, 26.0)
    assert alloc.is_allocated


def test_a_keepalive_answered_while_a_stale_allocation_is_being_deleted_waits_for_the_deletion() -> None:
    alloc, relay, allocate = _patient_allocation()
    alloc.handle_input(relay.error(allocate, ErrorCode.ALLOCATION_MISMATCH, "Allocation Mismatch"), SERVER, 0.0)
    (deletion,) = transmits(alloc)
    assert stun.decode(deletion.payload).lifetime() == 0
    assert _answer_keepalive(alloc, relay, 25.0) == []  # no ALLOCATE before the relay confirmed the deletion
    alloc.handle_input(relay.answer(deletion), SERVER, 26.0)
    (again,) = transmits(alloc)
    assert stun.decode(again.payload).method == Method.ALLOCATE


def test_an_error_that_is_no_challenge_is_neither_retried_nor_counted_as_a_malformed_one() -> None:
    alloc, relay = _allocated()
    alloc.bind_channel(PEER, 1.0)
    (bind,) = transmits(alloc)
    refused = stun.decode(bind.payload).error_response(ErrorCode.FORBIDDEN, "Forbidden").add_nonce("n2")
    alloc.handle_input(stun.encode(refused, integrity_key=relay.key()), SERVER, 1.0)
    assert events(alloc) == [ChannelBindFailed(PEER, 0x4000, "403 Forbidden", 403)]
    assert transmits(alloc) == []
    assert alloc.drops.total() == 0


def test_refused_credentials_fail_at_the_first_401_to_a_signed_request() -> None:
    # RFC 8489 §9.2.5: a 401 to a request that carried credentials means they are wrong: retrying cannot help
    relay = Relay()
    alloc = turn.Allocation(SERVER, "u1", "wrong", rng=SeededRng(7), now=0.0)
    sent = _exchange(alloc, relay, 0.0)
    assert [stun.decode(t.payload).method for t in sent] == [Method.BINDING, Method.ALLOCATE, Method.ALLOCATE]
    assert events(alloc)[-1] == AllocationFailed(SERVER, "401 Unauthorized", ErrorCode.UNAUTHENTICATED)


def test_a_stale_nonce_right_after_the_401_dance_is_retried_with_the_fresh_nonce() -> None:
    # RFC 8489 §9.2.5: the nonce may expire between the challenge and the signed request: 438, retry, succeed
    relay = Relay()
    alloc = turn.Allocation(SERVER, "u1", "p1", rng=SeededRng(7), now=0.0)
    allocate = _first_allocate(alloc, relay, 0.0)
    stale = stun.decode(allocate.payload).error_response(ErrorCode.STALE_NONCE, "Stale Nonce")
    alloc.handle_input(stun.encode(stale.add_realm(REALM).add_nonce("n2")), SERVER, 0.1)
    (retry,) = transmits(alloc)
    assert stun.decode(retry.payload).nonce() == "n2"
    alloc.handle_input(relay.answer(retry), SERVER, 0.2)
    assert alloc.is_allocated


def test_the_realm_named_by_the_challenge_replaces_a_configured_one_in_the_key() -> None:
    # RFC 8489 §9.2.2: the key is MD5(username ":" realm ":" password) with the realm the server sent
    relay = Relay()
    alloc = turn.Allocation(SERVER, "u1", "p1", rng=SeededRng(7), now=0.0, realm="elsewhere")
    alloc.update_credentials("u1", "p1", 0.0)  # a key for the configured realm exists already
    (binding,) = transmits(alloc)
    alloc.handle_input(relay.answer(binding), SERVER, 0.0)
    (allocate,) = transmits(alloc)
    alloc.handle_input(relay.answer(allocate), SERVER, 0.0)  # 401 naming REALM "firezone"
    (signed,) = transmits(alloc)
    assert stun.decode(signed.payload).realm() == REALM
    assert stun.check_integrity(signed.payload, relay.key())
    alloc.handle_input(relay.answer(signed), SERVER, 0.0)
    assert alloc.is_allocated
