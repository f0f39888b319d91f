"""TURN client (RFC 8656 subset Firezone relays speak) and the ChannelData codec, sans-IO.

One :class:`Allocation` per relay. It learns the server-reflexive address with unauthenticated BINDINGs (kept alive
every 25 s), allocates a UDP relay address (dual-stack when asked) with the long-term credential dance
(401 → REALM/NONCE, 438 → fresh NONCE), refreshes at half the lifetime, binds channels 0x4000–0x4FFF to peers
(10-minute lifetime, refreshed at 5 minutes only when data came in, a number never moves to another peer within
5 minutes of expiring) and frames data as ChannelData both ways. Every response to an authenticated request must carry
a valid MESSAGE-INTEGRITY, otherwise it is dropped and counted. Requests time out after 1 s and give up after 8 s.

Feed it with :meth:`Allocation.handle_input` and :meth:`Allocation.handle_timeout`; pull datagrams with
:meth:`Allocation.poll_transmit`, events with :meth:`Allocation.poll_event`, and the next wake-up with
:meth:`Allocation.poll_timeout`.
"""

from __future__ import annotations

import enum
import heapq
import logging
import struct
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

from dataplane import stun
from dataplane.base import Address, DropCounter, Rng, Transmit
from dataplane.stun import (
    TURN_POLICY,
    Attr,
    ErrorCode,
    MessageClass,
    Method,
    RetransmitPolicy,
    StunMessage,
    StunParseError,
    Transaction,
    TransactionStep,
)

logger = logging.getLogger(__name__)

SOFTWARE = "snownet"
DEFAULT_REALM = "firezone"
CHANNEL_NUMBER_FIRST = 0x4000
CHANNEL_NUMBER_LAST = 0x4FFF
CHANNEL_NUMBER_PARSE_LAST = 0x7FFF  # RFC 5766 allowed numbers up to 0x7FFF; accept them when parsing
CHANNEL_DATA_HEADER_LENGTH = 4
CHANNEL_LIFETIME = 600.0
CHANNEL_REFRESH_AFTER = 300.0
CHANNEL_REBIND_TIMEOUT = 300.0
BINDING_INTERVAL = 25.0
DEFAULT_ALLOCATION_LIFETIME = 600
MAX_STALE_NONCE_RETRIES = 3
# Error responses that servers send without MESSAGE-INTEGRITY because they cannot (yet) compute it.
UNAUTHENTICATED_ERROR_CODES = frozenset(
    {ErrorCode.BAD_REQUEST, ErrorCode.UNAUTHENTICATED, ErrorCode.UNKNOWN_ATTRIBUTE, ErrorCode.STALE_NONCE}
)


# --- ChannelData --------------------------------------------------------------------------------------------------


class ChannelDataParseError(ValueError):
    """Not a well-formed ChannelData message (the only exception :func:`decode_channel_data` raises)."""


def is_channel_data(data: bytes) -> bool:
    """Demultiplexing check: the first two bits are 01 (channel numbers 0x4000–0x7FFF)."""
    return len(data) >= CHANNEL_DATA_HEADER_LENGTH and 0x40 <= data[0] <= 0x7F


def encode_channel_data(number: int, payload: bytes) -> bytes:
    if not CHANNEL_NUMBER_FIRST <= number <= CHANNEL_NUMBER_PARSE_LAST:
        raise ValueError(f"channel number 0x{number:x} outside 0x4000..0x7fff")
    if len(payload) > 0xFFFF:
        raise ValueError("ChannelData payload longer than 65535 bytes")
    return struct.pack("!HH", number, len(payload)) + payload


def decode_channel_data(data: bytes) -> tuple[int, bytes]:
    """(channel number, payload). Over UDP the length must match exactly: no padding, nothing trailing."""
    if len(data) < CHANNEL_DATA_HEADER_LENGTH:
        raise ChannelDataParseError("shorter than a ChannelData header")
    number, length = struct.unpack_from("!HH", data)
    if not CHANNEL_NUMBER_FIRST <= number <= CHANNEL_NUMBER_PARSE_LAST:
        raise ChannelDataParseError(f"channel number 0x{number:04x} outside 0x4000..0x7fff")
    if length != len(data) - CHANNEL_DATA_HEADER_LENGTH:
        raise ChannelDataParseError(f"length field {length} but {len(data) - CHANNEL_DATA_HEADER_LENGTH} bytes follow")
    return number, bytes(data[CHANNEL_DATA_HEADER_LENGTH:])


# --- events -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BindingSucceeded:
    """The relay told us our server-reflexive address (first time, or it changed)."""

    server: Address
    srflx: Address
    rtt: float


@dataclass(frozen=True, slots=True)
class AllocationSucceeded:
    server: Address
    relay_addresses: tuple[Address, ...]
    srflx: Address | None
    lifetime: int


@dataclass(frozen=True, slots=True)
class AllocationRefreshed:
    server: Address
    lifetime: int


@dataclass(frozen=True, slots=True)
class AllocationFailed:
    """No allocation could be made (unreachable relay, wrong credentials, error response)."""

    server: Address
    reason: str
    error_code: int | None = None


@dataclass(frozen=True, slots=True)
class AllocationExpired:
    """An allocation we had is gone: its relay candidates must be invalidated."""

    server: Address
    relay_addresses: tuple[Address, ...]
    reason: str
    # True when the relay stopped answering (a request gave up); False when it answered (an error such as 437 after
    # it restarted) or the lifetime ran out: then its measured round-trip time still describes it.
    unanswered: bool = False


@dataclass(frozen=True, slots=True)
class AllocationDeleted:
    """``shutdown`` finished (the relay confirmed LIFETIME 0, or gave up trying)."""

    server: Address


@dataclass(frozen=True, slots=True)
class ChannelBound:
    peer: Address
    number: int


@dataclass(frozen=True, slots=True)
class ChannelBindFailed:
    peer: Address
    number: int
    reason: str
    error_code: int | None = None


@dataclass(frozen=True, slots=True)
class ChannelExpired:
    peer: Address
    number: int


TurnEvent = (
    BindingSucceeded
    | AllocationSucceeded
    | AllocationRefreshed
    | AllocationFailed
    | AllocationExpired
    | AllocationDeleted
    | ChannelBound
    | ChannelBindFailed
    | ChannelExpired
)


@dataclass(frozen=True, slots=True)
class Decapsulated:
    """Relayed data received from ``peer`` (ChannelData or a Data indication)."""

    peer: Address
    payload: bytes


class DropReason(enum.Enum):
    MALFORMED_STUN = "turn_malformed_stun"
    MALFORMED_CHANNEL_DATA = "turn_malformed_channel_data"
    UNEXPECTED_MESSAGE = "turn_unexpected_message"
    UNKNOWN_TRANSACTION = "turn_unknown_transaction"
    BAD_INTEGRITY = "turn_bad_integrity"
    MALFORMED_RESPONSE = "turn_malformed_response"
    UNKNOWN_CHANNEL = "turn_unknown_channel"
    NOT_ALLOCATED = "turn_not_allocated"


class AllocationState(enum.Enum):
    ALLOCATING = "allocating"
    ALLOCATED = "allocated"
    FAILED = "failed"
    EXPIRED = "expired"
    DELETING = "deleting"
    DELETED = "deleted"


class _Kind(enum.Enum):
    BINDING = "binding"
    ALLOCATE = "allocate"
    REFRESH = "refresh"
    CHANNEL_BIND = "channel-bind"
    DELETE = "delete"
    DELETE_STALE = "delete-stale"  # LIFETIME 0 for an allocation the relay still holds for our 5-tuple (after a 437)


@dataclass(slots=True)
class _Request:
    kind: _Kind
    message: StunMessage  # without USERNAME/REALM/NONCE: re-signed on every (re)send with the current nonce
    transaction: Transaction
    authenticated: bool
    stale_nonce_retries: int = 0
    channel: int | None = None
    order: int = 0  # creation order: due requests are handled in it, as a walk over ``_requests`` would


@dataclass(slots=True)
class _Channel:
    number: int
    peer: Address
    bound: bool = False
    bound_at: float | None = None
    received_since_bind: bool = False
    pending: bool = False
    order: int = 0  # creation order: due channels are handled in it, as a walk over the channels would

    def expires_at(self) -> float | None:
        return None if self.bound_at is None else self.bound_at + CHANNEL_LIFETIME

    def refresh_at(self) -> float | None:
        return None if self.bound_at is None else self.bound_at + CHANNEL_REFRESH_AFTER


def _is_address(value: object) -> bool:
    return isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str)


class Allocation:
    """One TURN allocation on one relay (reachable at one or more server addresses: IPv4 and/or IPv6).

    The first server address that answers a BINDING becomes :attr:`server` and carries the ALLOCATE. Relay and
    server-reflexive addresses are exposed as :attr:`relay_addresses` and :attr:`srflx` for the ICE agent.
    """

    def __init__(
        self,
        server: Address | Sequence[Address],
        username: str,
        password: str,
        *,
        rng: Rng,
        realm: str | None = None,
        software: str | None = SOFTWARE,
        request_ipv6: bool = True,
        lifetime: int = DEFAULT_ALLOCATION_LIFETIME,
        policy: RetransmitPolicy = TURN_POLICY,
        local: Address | None = None,
        now: float,
    ) -> None:
        servers = [cast(Address, server)] if _is_address(server) else list(cast(Sequence[Address], server))
        if not servers:
            raise ValueError("an allocation needs at least one server address")
        self.servers: list[Address] = [(str(host), int(port)) for host, port in servers]
        self.server: Address = self.servers[0]
        self._server_chosen = len(self.servers) == 1
        self.username = username
        self.password = password
        self._rng = rng
        self._software = software
        self._request_ipv6 = request_ipv6
        self._requested_lifetime = lifetime
        self._policy = policy
        self._local = local
        self.realm: str | None = realm
        self.nonce: str | None = None
        self._key: bytes | None = None
        self._stale_deletion_tried = False
        self.state = AllocationState.ALLOCATING
        self.srflx: Address | None = None
        self.relay_addresses: tuple[Address, ...] = ()
        self.lifetime: int | None = None
        self.expires_at: float | None = None
        self._refresh_at: float | None = None
        self._next_binding_at: float | None = None
        self.rtt: float | None = None
        self.drops = DropCounter()
        self._requests: dict[bytes, _Request] = {}
        self._channels_by_number: dict[int, _Channel] = {}
        self._channels_by_peer: dict[Address, _Channel] = {}
        self._cooldown: dict[int, tuple[Address, float]] = {}  # number → (peer it was bound to, reusable-by-others-at)
        # Every channel number below this one is in _channels_by_number: the search for a free number starts here
        # instead of walking all the channels a gateway holds (one per client).
        self._unbound_from = CHANNEL_NUMBER_FIRST
        # Deadline heaps, so that poll_timeout and handle_timeout cost O(log n) per due item, not a walk over every
        # request and channel (a gateway's allocation holds a channel per client). Entries are never removed in
        # place: a stale one (request answered, channel rebound or gone) is skipped when it surfaces.
        self._request_heap: list[tuple[float, int, bytes]] = []  # (retransmit deadline, order, transaction id)
        # (deadline, order, number, bound_at, is the expiry rather than the refresh)
        self._channel_heap: list[tuple[float, int, int, float, bool]] = []
        self._created = 0
        self._transmits: deque[Transmit] = deque()
        self._events: deque[TurnEvent] = deque()
        for address in self.servers:
            self._send_binding(address, now)

    # --- public queries -------------------------------------------------------------------------------------------

    @property
    def is_allocated(self) -> bool:
        return self.state is AllocationState.ALLOCATED

    @property
    def ipv4_relay(self) -> Address | None:
        return next((a for a in self.relay_addresses if ":" not in a[0]), None)

    @property
    def ipv6_relay(self) -> Address | None:
        return next((a for a in self.relay_addresses if ":" in a[0]), None)

    def channel_for(self, peer: Address) -> int | None:
        """The bound channel number for ``peer`` (None while unbound or pending)."""
        channel = self._channels_by_peer.get(peer)
        return channel.number if channel is not None and channel.bound else None

    def has_channel(self, peer: Address) -> bool:
        return self.channel_for(peer) is not None

    def owns(self, src: Address) -> bool:
        """True when ``src`` is one of this relay's server addresses (the Node's demultiplexing question)."""
        return src in self.servers

    # --- sans-IO interface ----------------------------------------------------------------------------------------

    def handle_input(self, data: bytes, src: Address, now: float) -> bool | Decapsulated:
        """Feeds one datagram. False: not from this relay; True: consumed (or dropped and counted);
        :class:`Decapsulated`: relayed data from a peer."""
        src = (src[0], src[1])  # tolerate 4-tuple IPv6 socket addresses
        if src not in self.servers:
            return False
        if is_channel_data(data):
            return self._handle_channel_data(data, now)
        try:
            message = stun.decode(data)
        except StunParseError as exc:
            self._drop(DropReason.MALFORMED_STUN, str(exc))
            return True
        if message.message_class == MessageClass.INDICATION and message.method == Method.DATA:
            return self._handle_data_indication(message, now)
        if not message.is_response:
            self._drop(DropReason.UNEXPECTED_MESSAGE, f"class {message.message_class} method {message.method}")
            return True
        request = self._requests.get(message.transaction_id)
        if request is None or message.method != request.message.method:
            self._drop(DropReason.UNKNOWN_TRANSACTION, "no request with that transaction id")
            return True
        if not self._response_is_authentic(request, message, data):
            return True
        del self._requests[message.transaction_id]
        rtt = request.transaction.complete(now)
        if message.message_class == MessageClass.SUCCESS:
            self._on_success(request, message, src, rtt, now)
        else:
            self._on_error(request, message, now)
        return True

    def encapsulate(self, peer: Address, payload: bytes, now: float) -> Transmit | None:
        """ChannelData towards ``peer`` through the relay, or None (a CHANNEL-BIND is started if none exists yet)."""
        if self.state is not AllocationState.ALLOCATED:
            return None
        channel = self._channels_by_peer.get(peer)
        if channel is None or not channel.bound:
            if channel is None:
                self.bind_channel(peer, now)
            return None
        return Transmit(dst=self.server, payload=encode_channel_data(channel.number, payload), src=self._local)

    def bind_channel(self, peer: Address, now: float) -> int | None:
        """Starts binding a channel to ``peer`` (no-op when bound or pending); returns its number, None if none free."""
        peer = (str(peer[0]), int(peer[1]))
        if self.state is not AllocationState.ALLOCATED:
            raise RuntimeError(f"cannot bind a channel in state {self.state.value}")
        existing = self._channels_by_peer.get(peer)
        if existing is not None:
            return existing.number
        number = self._free_channel_number(peer, now)
        if number is None:
            logger.debug("turn %s: no free channel number for %s", self.server, peer)
            return None
        channel = _Channel(number=number, peer=peer, order=self._next_order())
        self._channels_by_number[number] = channel
        while self._unbound_from in self._channels_by_number:
            self._unbound_from += 1
        self._channels_by_peer[peer] = channel
        # A held number stays held while the same peer binds it again: if the relay refuses that bind, no new binding
        # exists and the old one's hold still runs (RFC 8656 §12); a bound number is never handed out anyway.
        self._send_channel_bind(channel, now)
        return number

    def refresh(self, now: float) -> None:
        """Refreshes the allocation now (e.g. after a network change) instead of at half its lifetime."""
        if self.state is AllocationState.ALLOCATED and not self._pending(_Kind.REFRESH):
            self._send_refresh(now)

    def update_credentials(self, username: str, password: str, now: float) -> None:
        """New credentials from the portal: used for every request from now on."""
        self.username = username
        self.password = password
        if self.realm is not None:
            self._key = stun.long_term_key(username, self.realm, password)

    def shutdown(self, now: float) -> None:
        """Deletes the allocation (REFRESH with LIFETIME 0); :class:`AllocationDeleted` follows."""
        if self.state in (AllocationState.DELETING, AllocationState.DELETED):
            return
        was_allocated = self.state is AllocationState.ALLOCATED
        self._requests.clear()
        self._channels_by_number.clear()
        self._channels_by_peer.clear()
        self._unbound_from = CHANNEL_NUMBER_FIRST
        self._refresh_at = self._next_binding_at = None
        if was_allocated and self._key is not None:
            self.state = AllocationState.DELETING
            message = StunMessage.request(Method.REFRESH, self._new_transaction_id()).add_lifetime(0)
            self._send_request(_Kind.DELETE, message, now, authenticated=True)
        else:
            self.state = AllocationState.DELETED
            self._events.append(AllocationDeleted(self.server))

    def handle_timeout(self, now: float) -> None:
        for tid, request in self._due_requests(now):
            if self._requests.get(tid) is not request:
                continue  # an earlier give-up in this loop ended the allocation
            step = request.transaction.handle_timeout(now)
            if step is TransactionStep.RETRANSMIT:
                self._queue(request.transaction.destination, request.transaction.payload)
                self._file_request(tid, request)
            elif step is TransactionStep.GAVE_UP:
                del self._requests[tid]
                self._on_give_up(request, now)
        if self.state is AllocationState.ALLOCATED:
            if self.expires_at is not None and now >= self.expires_at:
                self._expire("lifetime ran out", now)
                return
            if self._refresh_at is not None and now >= self._refresh_at:
                self._refresh_at = None
                if not self._pending(_Kind.REFRESH):
                    self._send_refresh(now)
            self._channel_timers(now)
        if self._next_binding_at is not None and now >= self._next_binding_at:
            self._next_binding_at = None
            self._send_binding(self.server, now)

    def poll_timeout(self) -> float | None:
        deadlines: list[float] = []
        request_deadline = self._earliest_request_deadline()
        if request_deadline is not None:
            deadlines.append(request_deadline)
        if self.state is AllocationState.ALLOCATED:
            deadlines += [d for d in (self.expires_at, self._refresh_at) if d is not None]
            channel_deadline = self._earliest_channel_deadline()
            if channel_deadline is not None:
                deadlines.append(channel_deadline)
        if self._next_binding_at is not None:
            deadlines.append(self._next_binding_at)
        return min(deadlines) if deadlines else None

    # --- timer heaps ----------------------------------------------------------------------------------------------

    def _next_order(self) -> int:
        self._created += 1
        return self._created

    def _file_request(self, tid: bytes, request: _Request) -> None:
        deadline = request.transaction.poll_timeout()
        if deadline is not None:
            heapq.heappush(self._request_heap, (deadline, request.order, tid))
            if len(self._request_heap) > 2 * len(self._requests) + 64:
                self._request_heap = [
                    (d, r.order, t)
                    for t, r in self._requests.items()
                    if (d := r.transaction.poll_timeout()) is not None
                ]
                heapq.heapify(self._request_heap)

    def _request_entry_live(self, deadline: float, tid: bytes) -> bool:
        request = self._requests.get(tid)
        return request is not None and request.transaction.poll_timeout() == deadline

    def _earliest_request_deadline(self) -> float | None:
        heap = self._request_heap
        while heap:
            deadline, _, tid = heap[0]
            if self._request_entry_live(deadline, tid):
                return deadline
            heapq.heappop(heap)
        return None

    def _due_requests(self, now: float) -> list[tuple[bytes, _Request]]:
        due: list[tuple[int, bytes, _Request]] = []
        heap = self._request_heap
        while heap and heap[0][0] <= now:
            deadline, order, tid = heapq.heappop(heap)
            if self._request_entry_live(deadline, tid):
                due.append((order, tid, self._requests[tid]))
        due.sort(key=lambda item: item[0])
        return [(tid, request) for _, tid, request in due]

    def _file_channel(self, channel: _Channel, *, expiry: bool = True) -> None:
        """Files the channel's refresh deadline (and its expiry, unless only the refresh became relevant)."""
        bound_at = channel.bound_at
        if bound_at is None:
            return
        heap = self._channel_heap
        if expiry:
            heapq.heappush(heap, (bound_at + CHANNEL_LIFETIME, channel.order, channel.number, bound_at, True))
        heapq.heappush(heap, (bound_at + CHANNEL_REFRESH_AFTER, channel.order, channel.number, bound_at, False))
        if len(heap) > 4 * len(self._channels_by_number) + 64:
            self._channel_heap = []
            for other in self._channels_by_number.values():
                if other.bound_at is not None:
                    self._file_channel(other)

    def _channel_entry_live(self, number: int, bound_at: float, is_expiry: bool) -> _Channel | None:
        """The channel the entry still speaks for: its expiry, or its refresh while one is wanted."""
        channel = self._channels_by_number.get(number)
        if channel is None or not channel.bound or channel.bound_at != bound_at:
            return None
        if is_expiry:
            return channel
        if channel.received_since_bind and not channel.pending:
            return channel
        return None  # no refresh wanted now: filed again when the channel next receives data

    def _earliest_channel_deadline(self) -> float | None:
        heap = self._channel_heap
        while heap:
            deadline, _, number, bound_at, is_expiry = heap[0]
            if self._channel_entry_live(number, bound_at, is_expiry) is not None:
                return deadline
            heapq.heappop(heap)
        return None

    def poll_transmit(self) -> Transmit | None:
        return self._transmits.popleft() if self._transmits else None

    def poll_event(self) -> TurnEvent | None:
        return self._events.popleft() if self._events else None

    # --- requests -------------------------------------------------------------------------------------------------

    def _new_transaction_id(self) -> bytes:
        return self._rng.random_bytes(stun.TRANSACTION_ID_LENGTH)

    def _queue(self, dst: Address, payload: bytes) -> None:
        self._transmits.append(Transmit(dst=dst, payload=payload, src=self._local))

    def _pending(self, kind: _Kind) -> bool:
        return any(r.kind is kind for r in self._requests.values())

    def _sign(self, message: StunMessage, authenticated: bool) -> bytes:
        wire = StunMessage(message.method, message.message_class, message.transaction_id, list(message.attributes))
        if self._software:
            wire.add_software(self._software)
        if not authenticated:
            return stun.encode(wire)
        assert self.realm is not None and self.nonce is not None and self._key is not None
        wire.add_username(self.username).add_realm(self.realm).add_nonce(self.nonce)
        return stun.encode(wire, integrity_key=self._key)

    def _send_request(
        self,
        kind: _Kind,
        message: StunMessage,
        now: float,
        *,
        authenticated: bool,
        destination: Address | None = None,
        channel: int | None = None,
        stale_nonce_retries: int = 0,
    ) -> None:
        authenticated = authenticated and self._key is not None and self.nonce is not None
        payload = self._sign(message, authenticated)
        dst = destination or self.server
        transaction = Transaction(message.transaction_id, payload, dst, self._policy, now)
        request = _Request(kind, message, transaction, authenticated, stale_nonce_retries, channel, self._next_order())
        self._requests[message.transaction_id] = request
        self._file_request(message.transaction_id, request)
        self._queue(dst, payload)

    def _resend_with_new_transaction(self, request: _Request, now: float, *, stale_nonce_retries: int) -> None:
        old = request.message
        message = StunMessage(old.method, old.message_class, self._new_transaction_id(), list(old.attributes))
        self._send_request(
            request.kind,
            message,
            now,
            authenticated=True,
            channel=request.channel,
            stale_nonce_retries=stale_nonce_retries,
        )

    def _send_binding(self, destination: Address, now: float) -> None:
        message = StunMessage.request(Method.BINDING, self._new_transaction_id())
        self._send_request(_Kind.BINDING, message, now, authenticated=False, destination=destination)

    def _send_allocate(self, now: float) -> None:
        message = StunMessage.request(Method.ALLOCATE, self._new_transaction_id()).add_requested_transport()
        if self._request_ipv6:
            message.add_additional_address_family(stun.FAMILY_IPV6)
        message.add_lifetime(self._requested_lifetime)
        self._send_request(_Kind.ALLOCATE, message, now, authenticated=True)

    def _send_refresh(self, now: float) -> None:
        message = StunMessage.request(Method.REFRESH, self._new_transaction_id()).add_lifetime(self._requested_lifetime)
        self._send_request(_Kind.REFRESH, message, now, authenticated=True)

    def _send_channel_bind(self, channel: _Channel, now: float) -> None:
        message = (
            StunMessage.request(Method.CHANNEL_BIND, self._new_transaction_id())
            .add_channel_number(channel.number)
            .add_xor_address(Attr.XOR_PEER_ADDRESS, channel.peer)
        )
        channel.pending = True
        self._send_request(_Kind.CHANNEL_BIND, message, now, authenticated=True, channel=channel.number)

    # --- responses ------------------------------------------------------------------------------------------------

    def _response_is_authentic(self, request: _Request, message: StunMessage, data: bytes) -> bool:
        if not request.authenticated:
            return True
        assert self._key is not None
        if stun.check_integrity(data, self._key):
            return True
        error = message.error_code() if message.message_class == MessageClass.ERROR else None
        if error is not None and error[0] in UNAUTHENTICATED_ERROR_CODES and not stun.has_integrity(data):
            return True
        self._drop(DropReason.BAD_INTEGRITY, f"{request.kind.value} response")
        return False

    def _on_success(self, request: _Request, message: StunMessage, src: Address, rtt: float, now: float) -> None:
        kind = request.kind
        if kind is _Kind.BINDING:
            self._on_binding_success(message, src, rtt, now)
        elif kind is _Kind.ALLOCATE:
            self._on_allocate_success(message, rtt, now)
        elif kind is _Kind.REFRESH:
            lifetime = message.lifetime()
            if lifetime is None:
                self._drop(DropReason.MALFORMED_RESPONSE, "REFRESH success without LIFETIME")
                lifetime = self.lifetime or DEFAULT_ALLOCATION_LIFETIME
            self._set_lifetime(lifetime, now)
            self._events.append(AllocationRefreshed(self.server, lifetime))
        elif kind is _Kind.CHANNEL_BIND:
            self._on_channel_bound(request, now)
        elif kind is _Kind.DELETE:
            self._finish_delete()
        elif kind is _Kind.DELETE_STALE:
            logger.debug("turn %s: stale allocation deleted; allocating again", self.server)
            self._send_allocate(now)

    def _on_binding_success(self, message: StunMessage, src: Address, rtt: float, now: float) -> None:
        if not self._server_chosen:
            self._server_chosen = True
            self.server = src
            # The other addresses of this relay lose the race: stop asking them.
            for tid, other in list(self._requests.items()):
                if other.kind is _Kind.BINDING and other.transaction.destination != src:
                    del self._requests[tid]
        elif src != self.server:
            return
        self.rtt = rtt
        mapped = message.xor_address(Attr.XOR_MAPPED_ADDRESS) or message.address(Attr.MAPPED_ADDRESS)
        if mapped is None:
            self._drop(DropReason.MALFORMED_RESPONSE, "BINDING success without a mapped address")
        elif mapped != self.srflx:
            self.srflx = mapped
            self._events.append(BindingSucceeded(self.server, mapped, rtt))
        if self.state in (AllocationState.ALLOCATING, AllocationState.ALLOCATED):
            self._next_binding_at = now + BINDING_INTERVAL
        if (
            self.state is AllocationState.ALLOCATING
            and not self._pending(_Kind.ALLOCATE)
            and not self._pending(_Kind.DELETE_STALE)
        ):
            self._send_allocate(now)

    def _on_allocate_success(self, message: StunMessage, rtt: float, now: float) -> None:
        relays = tuple(message.xor_addresses(Attr.XOR_RELAYED_ADDRESS))
        lifetime = message.lifetime()
        if not relays or lifetime is None:
            self._fail("ALLOCATE success without XOR-RELAYED-ADDRESS or LIFETIME", None)
            return
        self.rtt = rtt
        mapped = message.xor_address(Attr.XOR_MAPPED_ADDRESS)
        if mapped is not None and mapped != self.srflx:
            self.srflx = mapped
            self._events.append(BindingSucceeded(self.server, mapped, rtt))
        self.relay_addresses = relays
        self.state = AllocationState.ALLOCATED
        self._set_lifetime(lifetime, now)
        self._events.append(AllocationSucceeded(self.server, relays, self.srflx, lifetime))

    def _set_lifetime(self, lifetime: int, now: float) -> None:
        self.lifetime = lifetime
        self.expires_at = now + lifetime
        self._refresh_at = now + lifetime / 2

    def _on_error(self, request: _Request, message: StunMessage, now: float) -> None:
        error = message.error_code()
        code, reason = error if error is not None else (0, "error response without ERROR-CODE")
        if code in (ErrorCode.UNAUTHENTICATED, ErrorCode.STALE_NONCE) and request.kind is not _Kind.BINDING:
            if self._take_nonce(message) and self._retry_after_auth_challenge(request, code, now):
                return
        if (
            request.kind is _Kind.ALLOCATE
            and code == ErrorCode.ADDRESS_FAMILY_NOT_SUPPORTED
            and self._request_ipv6
            and request.message.has(Attr.ADDITIONAL_ADDRESS_FAMILY)
        ):
            # The relay is not dual-stack: settle for its default family.
            self._request_ipv6 = False
            self._send_allocate(now)
            return
        if request.kind is _Kind.ALLOCATE and code == ErrorCode.ALLOCATION_MISMATCH and not self._stale_deletion_tried:
            # The relay still holds an allocation for this 5-tuple: we gave up on it (an outage outlasted the
            # keepalive give-up) while the relay kept it. Without deleting it, every ALLOCATE gets 437 until its
            # lifetime runs out; delete it (REFRESH, LIFETIME 0, same credentials) and allocate once more. coturn
            # answers 437 even before authentication: the deletion then goes through the 401 dance itself.
            self._stale_deletion_tried = True
            message = StunMessage.request(Method.REFRESH, self._new_transaction_id()).add_lifetime(0)
            self._send_request(_Kind.DELETE_STALE, message, now, authenticated=True)
            return
        self._on_request_failed(request, f"{code} {reason}".strip(), code or None, now)

    def _take_nonce(self, message: StunMessage) -> bool:
        nonce = message.nonce()
        realm = message.realm() or self.realm
        if nonce is None or realm is None:
            self._drop(DropReason.MALFORMED_RESPONSE, "challenge without NONCE/REALM")
            return False
        self.nonce = nonce
        if realm != self.realm or self._key is None:
            self.realm = realm
            self._key = stun.long_term_key(self.username, realm, self.password)
        return True

    def _retry_after_auth_challenge(self, request: _Request, code: int, now: float) -> bool:
        if code == ErrorCode.UNAUTHENTICATED:
            if request.authenticated:
                return False  # our credentials were refused
            self._resend_with_new_transaction(request, now, stale_nonce_retries=request.stale_nonce_retries)
            return True
        if request.stale_nonce_retries >= MAX_STALE_NONCE_RETRIES:
            return False
        self._resend_with_new_transaction(request, now, stale_nonce_retries=request.stale_nonce_retries + 1)
        return True

    def _on_give_up(self, request: _Request, now: float) -> None:
        if request.kind is _Kind.BINDING:
            self._on_binding_failed(request, "relay did not answer BINDING", now, unanswered=True)
        else:
            self._on_request_failed(request, f"{request.kind.value} timed out", None, now, unanswered=True)

    def _on_binding_failed(self, request: _Request, reason: str, now: float, *, unanswered: bool = False) -> None:
        if self._server_chosen and request.transaction.destination != self.server:
            return
        if not self._server_chosen and self._pending(_Kind.BINDING):
            return  # another address of the relay may still answer
        if self.state is AllocationState.ALLOCATING and not self._pending(_Kind.ALLOCATE):
            self._fail(reason, None)
        elif self.state is AllocationState.ALLOCATED:
            self._expire(reason, now, unanswered=unanswered)

    def _on_request_failed(
        self, request: _Request, reason: str, code: int | None, now: float, *, unanswered: bool = False
    ) -> None:
        kind = request.kind
        logger.debug("turn %s: %s failed: %s", self.server, kind.value, reason)
        if kind is _Kind.BINDING:
            self._on_binding_failed(request, f"BINDING failed: {reason}", now)
        elif kind is _Kind.ALLOCATE:
            if self.state is AllocationState.ALLOCATING:
                self._fail(reason, code)
        elif kind is _Kind.REFRESH:
            if self.state is AllocationState.ALLOCATED:
                self._expire(f"REFRESH failed: {reason}", now, unanswered=unanswered)
        elif kind is _Kind.CHANNEL_BIND:
            self._on_channel_bind_failed(request, reason, code, now)
        elif kind is _Kind.DELETE:
            self._finish_delete()
        elif kind is _Kind.DELETE_STALE and self.state is AllocationState.ALLOCATING:
            if code == ErrorCode.ALLOCATION_MISMATCH:
                self._send_allocate(now)  # nothing left to delete: it expired in the meantime
            else:
                self._fail(f"stale allocation could not be deleted: {reason}", code)

    def _fail(self, reason: str, code: int | None) -> None:
        self.state = AllocationState.FAILED
        self._stop_everything()
        self._events.append(AllocationFailed(self.server, reason, code))

    def _expire(self, reason: str, now: float, *, unanswered: bool = False) -> None:
        relays = self.relay_addresses
        self.state = AllocationState.EXPIRED
        self._stop_everything()
        self._events.append(AllocationExpired(self.server, relays, reason, unanswered))

    def _stop_everything(self) -> None:
        self._requests.clear()
        self._request_heap.clear()
        self._channel_heap.clear()
        self._channels_by_number.clear()
        self._channels_by_peer.clear()
        self._unbound_from = CHANNEL_NUMBER_FIRST
        self._cooldown.clear()
        self.relay_addresses = ()
        self.expires_at = self._refresh_at = self._next_binding_at = None

    def _finish_delete(self) -> None:
        self.state = AllocationState.DELETED
        self._stop_everything()
        self._events.append(AllocationDeleted(self.server))

    # --- channels -------------------------------------------------------------------------------------------------

    def _free_channel_number(self, peer: Address, now: float) -> int | None:
        for number, (previous_peer, _) in self._cooldown.items():
            if previous_peer == peer and number not in self._channels_by_number:
                return number
        for number in range(self._unbound_from, CHANNEL_NUMBER_LAST + 1):
            if number in self._channels_by_number:
                continue
            cooldown = self._cooldown.get(number)
            if cooldown is not None and now < cooldown[1]:
                continue
            return number
        return None

    def _on_channel_bound(self, request: _Request, now: float) -> None:
        channel = self._channels_by_number.get(request.channel or -1)
        if channel is None:
            return
        first = not channel.bound
        channel.bound = True
        channel.pending = False
        channel.bound_at = now
        channel.received_since_bind = False
        self._file_channel(channel)
        if first:
            self._events.append(ChannelBound(channel.peer, channel.number))

    def _on_channel_bind_failed(self, request: _Request, reason: str, code: int | None, now: float) -> None:
        channel = self._channels_by_number.get(request.channel or -1)
        if channel is None:
            return
        if channel.bound:
            # A failed refresh: the existing binding keeps running until it expires; no retry storm.
            channel.pending = False
            channel.received_since_bind = False
            return
        self._remove_channel(channel, now, reusable_now=code is not None)
        self._events.append(ChannelBindFailed(channel.peer, channel.number, reason, code))

    def _remove_channel(self, channel: _Channel, now: float, *, reusable_now: bool = False) -> None:
        self._channels_by_number.pop(channel.number, None)
        self._unbound_from = min(self._unbound_from, channel.number)
        self._channels_by_peer.pop(channel.peer, None)
        if not reusable_now:
            # Re-inserted at the end: the dict stays ordered by reusable-at, so expired entries leave from the front.
            self._cooldown.pop(channel.number, None)
            self._cooldown[channel.number] = (channel.peer, now + CHANNEL_REBIND_TIMEOUT)

    def _channel_timers(self, now: float) -> None:
        cooldown = self._cooldown
        while cooldown:
            number, (_, reusable) = next(iter(cooldown.items()))
            if now < reusable:
                break
            del cooldown[number]
        due: dict[int, _Channel] = {}
        heap = self._channel_heap
        while heap and heap[0][0] <= now:
            _, _, number, bound_at, is_expiry = heapq.heappop(heap)
            channel = self._channel_entry_live(number, bound_at, is_expiry)
            if channel is not None:
                due[channel.order] = channel
        for _, channel in sorted(due.items()):
            expires_at = channel.expires_at()
            refresh_at = channel.refresh_at()
            if expires_at is not None and now >= expires_at:
                self._remove_channel(channel, now)
                self._events.append(ChannelExpired(channel.peer, channel.number))
            elif refresh_at is not None and now >= refresh_at and channel.received_since_bind and not channel.pending:
                self._send_channel_bind(channel, now)

    def _note_channel_received(self, channel: _Channel) -> None:
        if not channel.received_since_bind:
            channel.received_since_bind = True
            self._file_channel(channel, expiry=False)  # its refresh is wanted from now on

    def _handle_channel_data(self, data: bytes, now: float) -> bool | Decapsulated:
        try:
            number, payload = decode_channel_data(data)
        except ChannelDataParseError as exc:
            self._drop(DropReason.MALFORMED_CHANNEL_DATA, str(exc))
            return True
        channel = self._channels_by_number.get(number)
        if channel is None or self.state is not AllocationState.ALLOCATED:
            self._drop(DropReason.UNKNOWN_CHANNEL, f"channel 0x{number:04x}")
            return True
        self._note_channel_received(channel)
        return Decapsulated(channel.peer, payload)

    def _handle_data_indication(self, message: StunMessage, now: float) -> bool | Decapsulated:
        peer = message.xor_address(Attr.XOR_PEER_ADDRESS)
        payload = message.data()
        if self.state is not AllocationState.ALLOCATED:
            self._drop(DropReason.NOT_ALLOCATED, "Data indication")
            return True
        if peer is None or payload is None:
            self._drop(DropReason.MALFORMED_RESPONSE, "Data indication without XOR-PEER-ADDRESS or DATA")
            return True
        channel = self._channels_by_peer.get(peer)
        if channel is not None:
            self._note_channel_received(channel)
        return Decapsulated(peer, payload)

    def _drop(self, reason: DropReason, detail: str) -> None:
        self.drops.drop(reason)
        logger.debug("turn %s: dropped (%s): %s", self.server, reason.value, detail)
