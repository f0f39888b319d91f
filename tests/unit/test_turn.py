"""TURN client timelines on a fake clock against a scripted in-memory relay."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from dataplane import stun, turn
from dataplane.base import Address, Transmit
from dataplane.io.rng import SeededRng
from dataplane.stun import Attr, ErrorCode, MessageClass, Method, StunMessage
from dataplane.turn import (
    AllocationDeleted,
    AllocationExpired,
    AllocationFailed,
    AllocationRefreshed,
    AllocationState,
    AllocationSucceeded,
    BindingSucceeded,
    ChannelBindFailed,
    ChannelBound,
    ChannelExpired,
    Decapsulated,
    DropReason,
)

SERVER: Address = ("198.51.100.7", 3478)
SERVER_V6: Address = ("2001:db8::7", 3478)
SRFLX: Address = ("203.0.113.20", 40000)
RELAY: Address = ("198.51.100.7", 50000)
RELAY_V6: Address = ("2001:db8::7", 50000)
PEER: Address = ("192.0.2.50", 6000)
OTHER_PEER: Address = ("192.0.2.51", 6001)
USERNAME = "2145916800:salt"
PASSWORD = "pass"
REALM = "firezone"


@dataclass
class FakeRelay:
    """Answers the requests the client sends, the way a long-term-credential TURN server would."""

    password: str = PASSWORD
    nonce: str = "nonce-1"
    lifetime: int = 600
    dual_stack: bool = True
    holds_stale_allocation: bool = False  # an allocation for our 5-tuple survives from before: ALLOCATE gets 437
    deletion_ignored: bool = False  # LIFETIME 0 is acknowledged but the stale allocation stays
    requests: list[StunMessage] = field(default_factory=list)

    def key(self) -> bytes:
        return stun.long_term_key(USERNAME, REALM, self.password)

    def answer(self, transmit: Transmit) -> bytes:
        request = stun.decode(transmit.payload)
        self.requests.append(request)
        if request.method == Method.BINDING:
            return stun.encode(request.success_response().add_xor_address(Attr.XOR_MAPPED_ADDRESS, SRFLX))
        if request.nonce() is None:
            return self.challenge(request, ErrorCode.UNAUTHENTICATED)
        if request.nonce() != self.nonce:
            return self.challenge(request, ErrorCode.STALE_NONCE)
        if not stun.check_integrity(transmit.payload, self.key()):
            return self.challenge(request, ErrorCode.UNAUTHENTICATED)
        response = request.success_response()
        if request.method == Method.ALLOCATE and self.holds_stale_allocation:
            mismatch = request.error_response(ErrorCode.ALLOCATION_MISMATCH, "Allocation Mismatch")
            return stun.encode(mismatch, integrity_key=self.key())
        if request.method == Method.ALLOCATE:
            response.add_xor_address(Attr.XOR_RELAYED_ADDRESS, RELAY)
            if self.dual_stack and request.additional_address_family() == stun.FAMILY_IPV6:
                response.add_xor_address(Attr.XOR_RELAYED_ADDRESS, RELAY_V6)
            response.add_xor_address(Attr.XOR_MAPPED_ADDRESS, SRFLX).add_lifetime(self.lifetime)
        elif request.method == Method.REFRESH:
            requested = request.lifetime()
            if requested == 0 and not self.deletion_ignored:
                self.holds_stale_allocation = False
            response.add_lifetime(self.lifetime if requested is None else min(requested, self.lifetime))
        return stun.encode(response, integrity_key=self.key())

    def challenge(self, request: StunMessage, code: int) -> bytes:
        reason = "Unauthorized" if code == ErrorCode.UNAUTHENTICATED else "Stale Nonce"
        return stun.encode(request.error_response(code, reason).add_realm(REALM).add_nonce(self.nonce))


def transmits(alloc: turn.Allocation) -> list[Transmit]:
    out = []
    while (t := alloc.poll_transmit()) is not None:
        out.append(t)
    return out


def events(alloc: turn.Allocation) -> list[turn.TurnEvent]:
    out = []
    while (e := alloc.poll_event()) is not None:
        out.append(e)
    return out


def exchange(alloc: turn.Allocation, relay: FakeRelay, now: float) -> list[StunMessage]:
    """Delivers every pending transmit to the relay and its answers back, until quiet; returns the requests."""
    seen = []
    while pending := transmits(alloc):
        for transmit in pending:
            seen.append(stun.decode(transmit.payload))
            assert alloc.handle_input(relay.answer(transmit), transmit.dst, now) is True
    return seen


def allocated(now: float = 0.0, **kwargs: object) -> tuple[turn.Allocation, FakeRelay]:
    relay = FakeRelay()
    alloc = turn.Allocation(SERVER, USERNAME, PASSWORD, rng=SeededRng(1), now=now, **kwargs)  # type: ignore[arg-type]
    exchange(alloc, relay, now)
    assert alloc.state is AllocationState.ALLOCATED
    return alloc, relay


def advance(alloc: turn.Allocation, until: float) -> list[tuple[float, Transmit]]:
    """Fires every timer up to ``until`` at its exact deadline, without answering; returns (time, transmit)."""
    sent: list[tuple[float, Transmit]] = []
    while (deadline := alloc.poll_timeout()) is not None and deadline <= until:
        alloc.handle_timeout(deadline)
        sent.extend((deadline, t) for t in transmits(alloc))
    return sent


def methods(sent: list[tuple[float, Transmit]]) -> list[tuple[float, int]]:
    return [(t, stun.decode(tr.payload).method) for t, tr in sent]


def test_binding_then_401_dance_then_allocation() -> None:
    relay = FakeRelay()
    alloc = turn.Allocation(SERVER, USERNAME, PASSWORD, rng=SeededRng(1), now=0.0)
    requests = exchange(alloc, relay, 0.0)
    assert [r.method for r in requests] == [Method.BINDING, Method.ALLOCATE, Method.ALLOCATE]
    binding, first, second = requests
    assert binding.username() is None and first.username() is None
    assert first.requested_transport() == stun.TRANSPORT_UDP
    assert first.additional_address_family() == stun.FAMILY_IPV6
    assert second.username() == USERNAME and second.realm() == REALM and second.nonce() == relay.nonce
    assert second.software() == "snownet"
    assert second.transaction_id != first.transaction_id
    assert events(alloc) == [
        BindingSucceeded(SERVER, SRFLX, 0.0),
        AllocationSucceeded(SERVER, (RELAY, RELAY_V6), SRFLX, 600),
    ]
    assert alloc.srflx == SRFLX
    assert alloc.relay_addresses == (RELAY, RELAY_V6)
    assert alloc.ipv4_relay == RELAY and alloc.ipv6_relay == RELAY_V6


def test_authenticated_requests_carry_valid_integrity() -> None:
    alloc, relay = allocated()
    alloc.refresh(1.0)
    (transmit,) = transmits(alloc)
    assert stun.check_integrity(transmit.payload, relay.key())
    assert stun.has_fingerprint(transmit.payload)


def test_without_ipv6_request_no_additional_family() -> None:
    relay = FakeRelay()
    alloc = turn.Allocation(SERVER, USERNAME, PASSWORD, rng=SeededRng(1), now=0.0, request_ipv6=False)
    requests = exchange(alloc, relay, 0.0)
    assert all(r.additional_address_family() is None for r in requests)
    assert alloc.relay_addresses == (RELAY,)


def test_address_family_not_supported_falls_back_to_single_stack() -> None:
    relay = FakeRelay()
    alloc = turn.Allocation(SERVER, USERNAME, PASSWORD, rng=SeededRng(1), now=0.0)
    transmits_ = transmits(alloc)
    alloc.handle_input(relay.answer(transmits_[0]), SERVER, 0.0)
    (unauth,) = transmits(alloc)
    alloc.handle_input(relay.answer(unauth), SERVER, 0.0)
    (auth,) = transmits(alloc)
    request = stun.decode(auth.payload)
    error = request.error_response(ErrorCode.ADDRESS_FAMILY_NOT_SUPPORTED, "Address Family not Supported")
    alloc.handle_input(stun.encode(error, integrity_key=relay.key()), SERVER, 0.0)
    (retry,) = transmits(alloc)
    assert stun.decode(retry.payload).additional_address_family() is None
    alloc.handle_input(relay.answer(retry), SERVER, 0.0)
    assert alloc.relay_addresses == (RELAY,)


def test_wrong_password_fails_cleanly() -> None:
    relay = FakeRelay(password="the-real-one")
    alloc = turn.Allocation(SERVER, USERNAME, "wrong", rng=SeededRng(1), now=0.0)
    exchange(alloc, relay, 0.0)
    evs = events(alloc)
    assert evs[-1] == AllocationFailed(SERVER, "401 Unauthorized", 401)
    assert alloc.state is AllocationState.FAILED
    assert alloc.poll_timeout() is None
    assert alloc.relay_addresses == ()


def test_request_retransmits_after_1s_doubling_and_gives_up_at_8s() -> None:
    relay = FakeRelay()
    alloc = turn.Allocation(SERVER, USERNAME, PASSWORD, rng=SeededRng(1), now=100.0)
    (binding,) = transmits(alloc)
    alloc.handle_input(relay.answer(binding), SERVER, 100.0)
    (allocate,) = transmits(alloc)  # the relay goes silent from here on
    sent = advance(alloc, 100.0 + 8.0)
    allocates = [t for t, tr in sent if tr.payload == allocate.payload]
    assert allocates == [101.0, 103.0, 107.0]
    assert events(alloc)[-1] == AllocationFailed(SERVER, "allocate timed out", None)
    assert alloc.state is AllocationState.FAILED


def test_unreachable_relay_fails_after_8s_of_binding() -> None:
    alloc = turn.Allocation(SERVER, USERNAME, PASSWORD, rng=SeededRng(1), now=0.0)
    transmits(alloc)
    sent = advance(alloc, 20.0)
    assert [t for t, _ in sent] == [1.0, 3.0, 7.0]
    assert events(alloc) == [AllocationFailed(SERVER, "relay did not answer BINDING", None)]


def test_binding_keepalive_every_25s() -> None:
    alloc, _ = allocated()
    sent = advance(alloc, 80.0)
    bindings = [t for t, m in methods(sent) if m == Method.BINDING]
    # Unanswered keepalives retransmit (1 s, 3 s, ...) but the next keepalive only follows an answer.
    assert bindings[0] == 25.0


def test_binding_keepalive_answered_repeats_and_reports_changed_srflx() -> None:
    alloc, relay = allocated()
    events(alloc)
    times = []
    for _ in range(3):
        deadline = alloc.poll_timeout()
        assert deadline is not None
        alloc.handle_timeout(deadline)
        times.append(deadline)
        exchange(alloc, relay, deadline)
    assert times == [25.0, 50.0, 75.0]
    assert events(alloc) == []
    deadline = alloc.poll_timeout()
    assert deadline == 100.0
    alloc.handle_timeout(deadline)
    (binding,) = transmits(alloc)
    request = stun.decode(binding.payload)
    moved = ("203.0.113.20", 40001)
    alloc.handle_input(
        stun.encode(request.success_response().add_xor_address(Attr.XOR_MAPPED_ADDRESS, moved)), SERVER, 100.0
    )
    assert events(alloc) == [BindingSucceeded(SERVER, moved, 0.0)]


def test_refresh_at_half_lifetime() -> None:
    relay = FakeRelay(lifetime=120)
    alloc = turn.Allocation(SERVER, USERNAME, PASSWORD, rng=SeededRng(1), now=10.0)
    exchange(alloc, relay, 10.0)
    events(alloc)
    refreshes: list[tuple[float, int | None]] = []
    now = 10.0
    while len(refreshes) < 2:
        deadline = alloc.poll_timeout()
        assert deadline is not None
        now = deadline
        alloc.handle_timeout(now)
        for request in exchange(alloc, relay, now):
            if request.method == Method.REFRESH:
                refreshes.append((now, request.lifetime()))
    assert refreshes == [(70.0, 600), (130.0, 600)]
    assert AllocationRefreshed(SERVER, 120) in events(alloc)
    assert alloc.expires_at == 250.0


def test_stale_nonce_is_retried_with_the_new_nonce() -> None:
    alloc, relay = allocated()
    relay.nonce = "nonce-2"
    alloc.refresh(5.0)
    requests = exchange(alloc, relay, 5.0)
    assert [(r.method, r.nonce()) for r in requests] == [(Method.REFRESH, "nonce-1"), (Method.REFRESH, "nonce-2")]
    assert requests[0].transaction_id != requests[1].transaction_id
    assert events(alloc)[-1] == AllocationRefreshed(SERVER, 600)
    assert alloc.nonce == "nonce-2"


def test_stale_nonce_loop_gives_up() -> None:
    alloc, relay = allocated()
    events(alloc)
    alloc.refresh(5.0)
    for round_ in range(turn.MAX_STALE_NONCE_RETRIES + 1):
        (transmit,) = transmits(alloc)
        relay.nonce = f"rotating-{round_}"
        alloc.handle_input(relay.answer(transmit), SERVER, 5.0)
    assert transmits(alloc) == []
    (expired,) = events(alloc)
    assert isinstance(expired, AllocationExpired) and "438" in expired.reason and not expired.unanswered
    assert expired.relay_addresses == (RELAY, RELAY_V6)


def test_refresh_timeout_expires_the_allocation_8s_later() -> None:
    alloc, _ = allocated()
    events(alloc)
    alloc.refresh(10.0)
    transmits(alloc)
    advance(alloc, 18.0)
    evs = [e for e in events(alloc) if isinstance(e, AllocationExpired)]
    assert evs == [AllocationExpired(SERVER, (RELAY, RELAY_V6), "REFRESH failed: refresh timed out", unanswered=True)]
    assert alloc.state is AllocationState.EXPIRED


def test_response_with_bad_integrity_is_dropped_and_counted() -> None:
    alloc, relay = allocated()
    events(alloc)
    alloc.refresh(1.0)
    (transmit,) = transmits(alloc)
    request = stun.decode(transmit.payload)
    forged = stun.encode(request.success_response().add_lifetime(600), integrity_key=b"not the key")
    assert alloc.handle_input(forged, SERVER, 1.1) is True
    unsigned = stun.encode(request.success_response().add_lifetime(600))
    assert alloc.handle_input(unsigned, SERVER, 1.2) is True
    assert alloc.drops[DropReason.BAD_INTEGRITY] == 2
    assert events(alloc) == []
    # The transaction is still alive: the genuine answer is accepted.
    assert alloc.handle_input(relay.answer(transmit), SERVER, 1.3) is True
    assert events(alloc) == [AllocationRefreshed(SERVER, 600)]


def test_unsigned_error_other_than_challenge_is_dropped() -> None:
    alloc, _ = allocated()
    events(alloc)
    alloc.refresh(1.0)
    (transmit,) = transmits(alloc)
    request = stun.decode(transmit.payload)
    spoofed = stun.encode(request.error_response(ErrorCode.ALLOCATION_MISMATCH, "Allocation Mismatch"))
    alloc.handle_input(spoofed, SERVER, 1.1)
    assert alloc.drops[DropReason.BAD_INTEGRITY] == 1
    assert alloc.state is AllocationState.ALLOCATED


def test_garbage_and_strangers() -> None:
    alloc, _ = allocated()
    assert alloc.handle_input(b"\x00\x01\x00\x00", ("192.0.2.99", 3478), 1.0) is False
    assert alloc.handle_input(b"\x00\x01\x00\x04garbage", SERVER, 1.0) is True
    assert alloc.handle_input(b"\x40\x00\x00\x09abc", SERVER, 1.0) is True
    assert alloc.handle_input(b"\x40\x00\x00\x03abc", SERVER, 1.0) is True  # unknown channel
    unknown = stun.encode(StunMessage(Method.REFRESH, MessageClass.SUCCESS, bytes(12)))
    assert alloc.handle_input(unknown, SERVER, 1.0) is True
    request = stun.encode(StunMessage.request(Method.BINDING, bytes(12)))
    assert alloc.handle_input(request, SERVER, 1.0) is True
    assert alloc.drops[DropReason.MALFORMED_STUN] == 1
    assert alloc.drops[DropReason.MALFORMED_CHANNEL_DATA] == 1
    assert alloc.drops[DropReason.UNKNOWN_CHANNEL] == 1
    assert alloc.drops[DropReason.UNKNOWN_TRANSACTION] == 1
    assert alloc.drops[DropReason.UNEXPECTED_MESSAGE] == 1


def bound(alloc: turn.Allocation, relay: FakeRelay, peer: Address, now: float) -> int:
    number = alloc.bind_channel(peer, now)
    assert number is not None
    requests = exchange(alloc, relay, now)
    assert [r.method for r in requests] == [Method.CHANNEL_BIND]
    assert requests[0].channel_number() == number
    assert requests[0].xor_address(Attr.XOR_PEER_ADDRESS) == peer
    assert ChannelBound(peer, number) in events(alloc)
    return number


def test_channel_bind_and_channel_data_both_ways() -> None:
    alloc, relay = allocated()
    events(alloc)
    assert alloc.encapsulate(PEER, b"early", 1.0) is None  # starts the binding
    requests = exchange(alloc, relay, 1.0)
    assert [r.method for r in requests] == [Method.CHANNEL_BIND]
    assert events(alloc) == [ChannelBound(PEER, 0x4000)]
    transmit = alloc.encapsulate(PEER, b"hello", 1.5)
    assert transmit == Transmit(dst=SERVER, payload=b"\x40\x00\x00\x05hello")
    inbound = alloc.handle_input(turn.encode_channel_data(0x4000, b"world"), SERVER, 2.0)
    assert inbound == Decapsulated(PEER, b"world")
    assert alloc.channel_for(PEER) == 0x4000
    assert bound(alloc, relay, OTHER_PEER, 2.0) == 0x4001


def test_channel_refreshed_at_5_minutes_only_when_data_was_received() -> None:
    alloc, relay = allocated(request_ipv6=False)
    bound(alloc, relay, PEER, 0.0)
    bound(alloc, relay, OTHER_PEER, 0.0)
    alloc.handle_input(turn.encode_channel_data(0x4000, b"x"), SERVER, 100.0)  # only PEER's channel is used
    now = 0.0
    channel_binds = []
    while now < 700.0:
        deadline = alloc.poll_timeout()
        assert deadline is not None
        now = deadline
        alloc.handle_timeout(now)
        for request in exchange(alloc, relay, now):
            if request.method == Method.CHANNEL_BIND:
                channel_binds.append((now, request.channel_number()))
    assert channel_binds == [(300.0, 0x4000)]
    evs = events(alloc)
    assert ChannelExpired(OTHER_PEER, 0x4001) in evs
    assert ChannelExpired(PEER, 0x4000) not in evs  # refreshed at 300: lives until 900
    assert alloc.has_channel(PEER)
    assert not alloc.has_channel(OTHER_PEER)


def test_no_rebinding_a_number_to_another_peer_within_5_minutes() -> None:
    alloc, relay = allocated(request_ipv6=False)
    assert bound(alloc, relay, PEER, 0.0) == 0x4000
    keep_alive(alloc, relay, until=601.0)
    assert not alloc.has_channel(PEER)
    assert bound(alloc, relay, OTHER_PEER, 601.0) == 0x4001  # 0x4000 still reserved for PEER
    assert bound(alloc, relay, PEER, 602.0) == 0x4000  # the same peer may have it back
    third: Address = ("192.0.2.52", 6002)
    keep_alive(alloc, relay, until=1300.0)
    # Both channels expired at 1201/1202 without use; 0x4000 freed for others at 1202 + 300.
    assert bound(alloc, relay, third, 1300.0) == 0x4002
    keep_alive(alloc, relay, until=1503.0)
    fourth: Address = ("192.0.2.53", 6003)
    assert bound(alloc, relay, fourth, 1503.0) == 0x4000


def keep_alive(alloc: turn.Allocation, relay: FakeRelay, until: float) -> None:
    while (deadline := alloc.poll_timeout()) is not None and deadline <= until:
        alloc.handle_timeout(deadline)
        exchange(alloc, relay, deadline)
    events(alloc)


def test_channel_bind_error_reports_failure_and_frees_the_number() -> None:
    alloc, relay = allocated()
    events(alloc)
    alloc.bind_channel(PEER, 1.0)
    (transmit,) = transmits(alloc)
    request = stun.decode(transmit.payload)
    error = stun.encode(request.error_response(ErrorCode.FORBIDDEN, "Forbidden"), integrity_key=relay.key())
    alloc.handle_input(error, SERVER, 1.0)
    assert events(alloc) == [ChannelBindFailed(PEER, 0x4000, "403 Forbidden", 403)]
    assert bound(alloc, relay, OTHER_PEER, 2.0) == 0x4000


def test_shutdown_deletes_with_lifetime_zero() -> None:
    alloc, relay = allocated()
    events(alloc)
    alloc.shutdown(3.0)
    requests = exchange(alloc, relay, 3.0)
    assert [(r.method, r.lifetime()) for r in requests] == [(Method.REFRESH, 0)]
    assert events(alloc) == [AllocationDeleted(SERVER)]
    assert alloc.state is AllocationState.DELETED
    assert alloc.poll_timeout() is None
    assert alloc.encapsulate(PEER, b"x", 4.0) is None


def test_shutdown_gives_up_after_8s_when_relay_is_gone() -> None:
    alloc, _ = allocated()
    events(alloc)
    alloc.shutdown(3.0)
    transmits(alloc)
    advance(alloc, 20.0)
    assert events(alloc) == [AllocationDeleted(SERVER)]


def test_first_server_address_to_answer_is_chosen() -> None:
    relay = FakeRelay()
    alloc = turn.Allocation([SERVER, SERVER_V6], USERNAME, PASSWORD, rng=SeededRng(1), now=0.0)
    v4, v6 = transmits(alloc)
    assert (v4.dst, v6.dst) == (SERVER, SERVER_V6)
    alloc.handle_input(relay.answer(v6), SERVER_V6, 0.1)
    assert alloc.server == SERVER_V6
    (allocate,) = transmits(alloc)
    assert allocate.dst == SERVER_V6
    late = relay.answer(v4)
    assert alloc.handle_input(late, SERVER, 0.2) is True
    assert alloc.drops[DropReason.UNKNOWN_TRANSACTION] == 1


def test_lifetime_expiry_without_refresh_answer_is_reported() -> None:
    relay = FakeRelay(lifetime=20)
    alloc = turn.Allocation(SERVER, USERNAME, PASSWORD, rng=SeededRng(1), now=0.0)
    exchange(alloc, relay, 0.0)
    events(alloc)
    advance(alloc, 25.0)  # refresh at 10 never answered; gives up at 18
    evs = events(alloc)
    assert any(isinstance(e, AllocationExpired) for e in evs)


@pytest.mark.parametrize("number", [0x4000, 0x4FFF, 0x7FFF])
def test_channel_data_codec_round_trip(number: int) -> None:
    assert turn.decode_channel_data(turn.encode_channel_data(number, b"abc")) == (number, b"abc")
    assert turn.is_channel_data(turn.encode_channel_data(number, b""))


@pytest.mark.parametrize(
    "data",
    [b"", b"\x40\x00\x00", b"\x3f\xff\x00\x00", b"\x80\x00\x00\x00", b"\x40\x00\x00\x02a", b"\x40\x00\x00\x01ab"],
)
def test_channel_data_parser_rejects(data: bytes) -> None:
    with pytest.raises(turn.ChannelDataParseError):
        turn.decode_channel_data(data)


def test_channel_data_encoder_rejects_misuse() -> None:
    with pytest.raises(ValueError):
        turn.encode_channel_data(0x3FFF, b"")
    with pytest.raises(ValueError):
        turn.encode_channel_data(0x4000, bytes(70000))


def test_bind_channel_before_allocation_is_misuse() -> None:
    alloc = turn.Allocation(SERVER, USERNAME, PASSWORD, rng=SeededRng(1), now=0.0)
    with pytest.raises(RuntimeError):
        alloc.bind_channel(PEER, 0.0)


def test_binding_error_before_allocation_fails_it() -> None:
    alloc = turn.Allocation(SERVER, USERNAME, PASSWORD, rng=SeededRng(1), now=0.0)
    (binding,) = transmits(alloc)
    request = stun.decode(binding.payload)
    alloc.handle_input(stun.encode(request.error_response(ErrorCode.BAD_REQUEST, "Bad Request")), SERVER, 0.1)
    assert events(alloc) == [AllocationFailed(SERVER, "BINDING failed: 400 Bad Request", None)]


def test_keepalive_binding_lost_expires_the_allocation() -> None:
    alloc, _ = allocated()
    events(alloc)
    advance(alloc, 40.0)  # keepalive at 25, retransmits at 26, 28, 32, gives up at 33
    assert events(alloc) == [
        AllocationExpired(SERVER, (RELAY, RELAY_V6), "relay did not answer BINDING", unanswered=True)
    ]


def test_allocation_mismatch_deletes_the_stale_allocation_then_allocates_once_more() -> None:
    relay = FakeRelay(holds_stale_allocation=True)
    alloc = turn.Allocation(SERVER, USERNAME, PASSWORD, rng=SeededRng(1), now=0.0)
    requests = exchange(alloc, relay, 0.0)
    assert [(r.method, r.lifetime()) for r in requests] == [
        (Method.BINDING, None),
        (Method.ALLOCATE, 600),  # unauthenticated: 401
        (Method.ALLOCATE, 600),  # 437: the relay still holds our old allocation
        (Method.REFRESH, 0),
        (Method.ALLOCATE, 600),
    ]
    deletion = requests[3]
    assert deletion.username() == USERNAME and deletion.nonce() == relay.nonce
    assert len({r.transaction_id for r in requests}) == len(requests)
    assert alloc.state is AllocationState.ALLOCATED
    assert events(alloc)[-1] == AllocationSucceeded(SERVER, (RELAY, RELAY_V6), SRFLX, 600)


def test_allocation_mismatch_recovery_is_tried_only_once() -> None:
    relay = FakeRelay(holds_stale_allocation=True, deletion_ignored=True)
    alloc = turn.Allocation(SERVER, USERNAME, PASSWORD, rng=SeededRng(1), now=0.0)
    requests = exchange(alloc, relay, 0.0)
    assert [r.method for r in requests][-3:] == [Method.ALLOCATE, Method.REFRESH, Method.ALLOCATE]
    assert events(alloc)[-1] == AllocationFailed(SERVER, "437 Allocation Mismatch", 437)
    assert alloc.state is AllocationState.FAILED
    assert alloc.poll_timeout() is None


def test_allocation_mismatch_deletion_answered_437_means_it_is_already_gone() -> None:
    relay = FakeRelay(holds_stale_allocation=True)
    alloc = turn.Allocation(SERVER, USERNAME, PASSWORD, rng=SeededRng(1), now=0.0)
    for _ in range(3):  # BINDING, unauthenticated ALLOCATE, authenticated ALLOCATE (437)
        (transmit,) = transmits(alloc)
        alloc.handle_input(relay.answer(transmit), SERVER, 0.0)
    (deletion,) = transmits(alloc)
    request = stun.decode(deletion.payload)
    assert (request.method, request.lifetime()) == (Method.REFRESH, 0)
    relay.holds_stale_allocation = False  # its lifetime ran out just now
    gone = request.error_response(ErrorCode.ALLOCATION_MISMATCH, "Allocation Mismatch")
    alloc.handle_input(stun.encode(gone, integrity_key=relay.key()), SERVER, 0.1)
    exchange(alloc, relay, 0.1)
    assert alloc.state is AllocationState.ALLOCATED


def test_allocation_mismatch_deletion_unanswered_fails_after_8s() -> None:
    relay = FakeRelay(holds_stale_allocation=True)
    alloc = turn.Allocation(SERVER, USERNAME, PASSWORD, rng=SeededRng(1), now=0.0)
    for _ in range(3):
        (transmit,) = transmits(alloc)
        alloc.handle_input(relay.answer(transmit), SERVER, 0.0)
    (deletion,) = transmits(alloc)
    assert stun.decode(deletion.payload).lifetime() == 0
    sent = advance(alloc, 8.5)
    assert [t for t, transmit in sent if stun.decode(transmit.payload).method == Method.REFRESH] == [1.0, 3.0, 7.0]
    failure = events(alloc)[-1]
    assert isinstance(failure, AllocationFailed) and "stale allocation" in failure.reason
    assert alloc.state is AllocationState.FAILED


def test_allocation_mismatch_before_authentication_deletes_through_the_401_dance() -> None:
    """coturn answers 437 to the very first, unauthenticated ALLOCATE: the deletion then learns the nonce itself."""
    relay = FakeRelay(holds_stale_allocation=True)
    alloc = turn.Allocation(SERVER, USERNAME, PASSWORD, rng=SeededRng(1), now=0.0)
    (binding,) = transmits(alloc)
    alloc.handle_input(relay.answer(binding), SERVER, 0.0)
    (unauthenticated,) = transmits(alloc)
    request = stun.decode(unauthenticated.payload)
    mismatch = request.error_response(ErrorCode.ALLOCATION_MISMATCH, "Mismatched allocation")
    alloc.handle_input(stun.encode(mismatch), SERVER, 0.0)
    requests = exchange(alloc, relay, 0.0)
    assert [(r.method, r.lifetime(), r.nonce() is not None) for r in requests] == [
        (Method.REFRESH, 0, False),
        (Method.REFRESH, 0, True),
        (Method.ALLOCATE, 600, True),
    ]
    assert alloc.state is AllocationState.ALLOCATED
