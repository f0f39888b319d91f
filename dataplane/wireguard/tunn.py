"""One WireGuard peer: its handshake, keypairs (current/previous/next), staged packets and timers (sans-IO).

:class:`Tunn` is what :class:`dataplane.wireguard.device.Device` composes per peer and what ``dataplane/node.py`` uses
per client connection. It never sees addresses: the caller routes datagrams to it and sends what it drains.

Handshake retries: an initiation is retried every Rekey-Timeout + jitter; the first retry that finds the current run of
attempts older than ``rekey_attempt_time`` gives up instead (staged packets are dropped, :class:`HandshakeGaveUp`).
Unlike wireguard-go, new outgoing packets do not restart that clock, so a peer that never answers is given up on even
while traffic keeps arriving (boringtun/Firezone behaviour).
"""

from __future__ import annotations

import enum
import logging
import struct
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from dataplane.base import DropCounter, Rng, WallClock
from dataplane.native import accept_transport_run, open_batch, seal_batch, sealed_size

from . import noise
from .constants import (
    DEFAULT_MTU,
    HANDSHAKE_INITIATION_RATE,
    KEEPALIVE_TIMEOUT,
    KEY_SIZE,
    MAX_STAGED_PACKETS,
    MESSAGE_COOKIE_REPLY,
    MESSAGE_COOKIE_REPLY_SIZE,
    MESSAGE_INITIATION,
    MESSAGE_INITIATION_SIZE,
    MESSAGE_RESPONSE,
    MESSAGE_RESPONSE_SIZE,
    MESSAGE_TRANSPORT,
    MESSAGE_TRANSPORT_MIN_SIZE,
    REJECT_AFTER_MESSAGES,
    REJECT_AFTER_TIME,
    REKEY_AFTER_MESSAGES,
    REKEY_AFTER_TIME,
    REKEY_ATTEMPT_TIME,
    REKEY_ON_RECEIVE_AGE,
    REKEY_TIMEOUT,
    UNDER_LOAD_AFTER_TIME,
    UNDER_LOAD_QUEUE_FRACTION,
)
from .cookie import CookieChecker, CookieGenerator
from .crypto import PrivateKey, dh, load_private_key, public_key, tai64n
from .session import Keypair
from .timers import PeerTimers


class DropReason(enum.Enum):
    BAD_TYPE = "bad_type"
    BAD_LENGTH = "bad_length"
    BAD_MAC1 = "bad_mac1"
    UNKNOWN_INDEX = "unknown_index"
    REPLAY = "replay"
    DECRYPTION_FAILED = "decryption_failed"
    COOKIE_REQUIRED = "cookie_required"
    RATE_LIMITED = "rate_limited"
    ALLOWED_IPS_MISMATCH = "allowed_ips_mismatch"
    HANDSHAKE_FAILED = "handshake_failed"
    UNKNOWN_PEER = "unknown_peer"
    STALE_TIMESTAMP = "stale_timestamp"
    INITIATION_FLOOD = "initiation_flood"
    UNEXPECTED_RESPONSE = "unexpected_response"
    BAD_COOKIE_REPLY = "bad_cookie_reply"
    KEYS_EXPIRED = "keys_expired"
    INVALID_INNER_PACKET = "invalid_inner_packet"
    NO_PRIVATE_KEY = "no_private_key"
    NO_ROUTE = "no_route"
    NO_ENDPOINT = "no_endpoint"
    STAGED_OVERFLOW = "staged_overflow"
    HANDSHAKE_GAVE_UP = "handshake_gave_up"
    NO_SESSION = "no_session"


@dataclass(frozen=True, slots=True)
class HandshakeCompleted:
    public_key: bytes
    is_initiator: bool


@dataclass(frozen=True, slots=True)
class HandshakeGaveUp:
    public_key: bytes
    dropped_packets: int


@dataclass(frozen=True, slots=True)
class KeysZeroed:
    public_key: bytes


TunnEvent = HandshakeCompleted | HandshakeGaveUp | KeysZeroed


class IndexAllocator(Protocol):
    """Hands out the 32-bit receiver indices that route incoming messages to a :class:`Tunn`."""

    def allocate(self, owner: Tunn) -> int: ...

    def release(self, index: int) -> None: ...


class IndexTable:
    """Random, collision-checked 32-bit indices (an :class:`IndexAllocator`) and the lookup the receiver needs."""

    def __init__(self, rng: Rng) -> None:
        self._rng = rng
        self.entries: dict[int, Tunn] = {}

    def allocate(self, owner: Tunn) -> int:
        entries = self.entries
        while True:
            index = self._rng.random_u32()
            if index not in entries:
                entries[index] = owner
                return index

    def release(self, index: int) -> None:
        self.entries.pop(index, None)

    def get(self, index: int) -> Tunn | None:
        return self.entries.get(index)

    def __len__(self) -> int:
        return len(self.entries)


class HandshakeLoad:
    """Whether handshake messages arrive too fast: the "under load" state of Device, for a caller of many Tunns.

    mac1-valid handshake messages are counted in one-second buckets (a bucket starts at the first message after the
    previous one ended); a bucket holding more than ``threshold`` of them is a burst, which lasts until
    ``UNDER_LOAD_AFTER_TIME`` after the last message over the threshold. A burst alone is Firezone's "under load".

    A driver that can see its receive queue sets ``needs_backlog`` and reports the queue with :meth:`note_backlog`:
    then a burst is under load only while the queue is also backed up (at least 1/8 full within the last
    ``UNDER_LOAD_AFTER_TIME``), as in wireguard-go. A thousand clients
    arriving at once (a restart, a portal reconnect) are then served at once while the node keeps up, instead of
    waiting a 5 s handshake retry for their cookies; a flood it cannot keep up with still gets cookies.

    Under load the caller answers a message without a valid mac2 with a cookie reply only, and sends one with a valid
    mac2 through a per-source rate limiter before any Curve25519 work.
    """

    __slots__ = ("_backlogged_until", "_bucket_count", "_bucket_start", "_until", "force", "needs_backlog", "threshold")

    def __init__(self, threshold: int) -> None:
        self.threshold = threshold
        self.force = False  # pins the state on (tests, operators)
        self.needs_backlog = False
        self._bucket_start = 0.0
        self._bucket_count = 0
        self._until: float | None = None
        self._backlogged_until: float | None = None

    def count(self, now: float) -> None:
        if now - self._bucket_start >= 1.0 or now < self._bucket_start:
            self._bucket_start = now
            self._bucket_count = 0
        self._bucket_count += 1
        if self._bucket_count > self.threshold:
            self._until = now + UNDER_LOAD_AFTER_TIME

    def note_backlog(self, queued_bytes: int, capacity_bytes: int, now: float) -> None:
        """The receive queue holds ``queued_bytes`` of ``capacity_bytes`` (both as the kernel accounts them)."""
        if capacity_bytes > 0 and queued_bytes * UNDER_LOAD_QUEUE_FRACTION >= capacity_bytes:
            self._backlogged_until = now + UNDER_LOAD_AFTER_TIME

    def under_load(self, now: float) -> bool:
        if self.force:
            return True
        if self._until is None or now >= self._until:
            return False
        if not self.needs_backlog:
            return True
        return self._backlogged_until is not None and now < self._backlogged_until


_log = logging.getLogger(__name__)
_RECEIVER_INDEX = struct.Struct("<4xI")


@dataclass(frozen=True, slots=True)
class SealReservation:
    """Packets whose counters were claimed by :meth:`Tunn.reserve_send`: sealing them is a pure function."""

    key: bytes
    receiver_index: int
    first_counter: int
    packets: Sequence[bytes]
    mtu: int | None

    def seal(self) -> list[bytes]:
        """The transport messages, in order (releases the GIL with the C extension)."""
        return seal_batch(self.key, self.receiver_index, self.first_counter, self.packets, self.mtu)


class Tunn:
    def __init__(
        self,
        static_private: PrivateKey | None,
        peer_public: bytes,
        preshared_key: bytes | None,
        index_allocator: IndexAllocator,
        rng: Rng,
        wall_clock: WallClock,
        *,
        rekey_attempt_time: float = REKEY_ATTEMPT_TIME,
        persistent_keepalive: int | None = None,
        drops: DropCounter | None = None,
        mtu: int | None = DEFAULT_MTU,
        replay_limit: int = REJECT_AFTER_MESSAGES,
        responder_only: bool = False,
    ) -> None:
        if len(peer_public) != KEY_SIZE:
            raise ValueError("peer public key must be 32 bytes")
        if preshared_key is not None and len(preshared_key) != KEY_SIZE:
            raise ValueError("preshared key must be 32 bytes")
        self.peer_public = peer_public
        self.preshared_key = preshared_key
        self.rekey_attempt_time = rekey_attempt_time
        # A Firezone gateway never initiates (docs/protocol.md §4.2): the client initiates and rekeys, and traffic
        # for a peer without a session is dropped, not staged, because the gateway never buffers.
        self.responder_only = responder_only
        self.mtu = mtu
        self.drops = drops if drops is not None else DropCounter()
        self._indices = index_allocator
        self._rng = rng
        self._wall_clock = wall_clock
        self._replay_limit = replay_limit
        self._cookies = CookieGenerator(peer_public)
        self._timers = PeerTimers(rng)
        self._timers.persistent_keepalive_interval = persistent_keepalive or 0
        self._static_private: X25519PrivateKey | None = None
        self._static_public: bytes | None = None
        self._static_static: bytes | None = None
        self._checker: CookieChecker | None = None
        # Initiator side of a handshake in flight.
        self._initiator_state: noise.InitiatorState | None = None
        self._handshake_index: int | None = None
        self._last_sent_handshake: float | None = None
        # Responder side: replay and flood protection for initiations.
        self._last_timestamp = b""
        self._last_initiation_consumed: float | None = None
        self._current: Keypair | None = None
        self._previous: Keypair | None = None
        self._next: Keypair | None = None
        self._keypairs_by_index: dict[int, Keypair] = {}
        self._sent_last_minute_handshake = False
        self._staged: deque[bytes] = deque()
        self._transmits: list[bytes] = []
        self._events: deque[TunnEvent] = deque()
        self.rx_bytes = 0
        self.tx_bytes = 0
        self.last_handshake_wall: float | None = None
        self.set_static_private(static_private)

    # --- configuration ---

    @property
    def persistent_keepalive(self) -> int:
        return self._timers.persistent_keepalive_interval

    def set_static_private(self, static_private: PrivateKey | None, now: float | None = None) -> None:
        """Change our static key: every handshake and session with the old key is forgotten."""
        if isinstance(static_private, bytes) and len(static_private) != KEY_SIZE:
            raise ValueError("private key must be 32 bytes")
        if static_private is None:
            self._static_private = None
            self._static_public = None
            self._static_static = None
            self._checker = None
        else:
            self._static_private = load_private_key(static_private)
            self._static_public = public_key(self._static_private)
            self._static_static = dh(self._static_private, self.peer_public)
            self._checker = CookieChecker(self._static_public, self._rng)
        self._clear_handshake()
        for keypair in (self._current, self._previous, self._next):
            if keypair is not None:
                self._drop_keypair(keypair)
        self._current = self._previous = self._next = None

    def set_preshared_key(self, preshared_key: bytes | None) -> None:
        if preshared_key is not None and len(preshared_key) != KEY_SIZE:
            raise ValueError("preshared key must be 32 bytes")
        self.preshared_key = preshared_key

    def set_persistent_keepalive(self, interval: int | None, now: float) -> None:
        """Set the interval (0/None = off); turning it on sends a keepalive at once, as wireguard-go does."""
        interval = interval or 0
        if interval < 0 or interval > 65535:
            raise ValueError("persistent keepalive must be 0..65535 seconds")
        was_off = self._timers.persistent_keepalive_interval == 0
        self._timers.persistent_keepalive_interval = interval
        if interval == 0:
            self._timers.persistent_keepalive = None
        elif was_off:
            self.send_keepalive(now)

    def close(self) -> None:
        """Release every receiver index (the peer is being removed)."""
        self.set_static_private(None)
        self._staged.clear()
        self._timers.stop_all()

    # --- state for callers ---

    @property
    def has_session(self) -> bool:
        return self._current is not None

    def keypair_for_index(self, index: int) -> Keypair | None:
        return self._keypairs_by_index.get(index)

    def owns_index(self, index: int) -> bool:
        return index == self._handshake_index or index in self._keypairs_by_index

    def poll_timeout(self) -> float | None:
        # PeerTimers.next_deadline, inline: the device re-arms every peer it touched after each batch.
        timers = self._timers
        deadline: float | None = None
        for candidate in (
            timers.retransmit_handshake,
            timers.send_keepalive,
            timers.new_handshake,
            timers.zero_key_material,
            timers.persistent_keepalive,
        ):
            if candidate is not None and (deadline is None or candidate < deadline):
                deadline = candidate
        return deadline

    def drain_transmits(self) -> list[bytes]:
        out = self._transmits
        self._transmits = []
        return out

    @property
    def has_transmits(self) -> bool:
        return bool(self._transmits)

    @property
    def has_events(self) -> bool:
        return bool(self._events)

    def poll_event(self) -> TunnEvent | None:
        return self._events.popleft() if self._events else None

    # --- send path ---

    def encapsulate(self, packet: bytes, now: float) -> None:
        """Encrypt one IP packet for the peer (or stage it and start a handshake); output via drain_transmits."""
        self.encapsulate_batch((packet,), now)

    def encapsulate_batch(self, packets: Sequence[bytes], now: float) -> None:
        keypair = self._current
        if (
            self._staged
            or keypair is None
            or now - keypair.created >= REJECT_AFTER_TIME
            or keypair.send_counter + len(packets) >= REJECT_AFTER_MESSAGES
        ):
            self._stage(packets)
            self._send_staged(now)
            return
        self._seal(keypair, packets, now)

    def send_keepalive(self, now: float) -> None:
        if not self._staged:
            self._staged.append(b"")
        self._send_staged(now)

    def _stage(self, packets: Sequence[bytes]) -> None:
        staged = self._staged
        staged.extend(packets)
        overflow = len(staged) - MAX_STAGED_PACKETS
        for _ in range(overflow):
            staged.popleft()
            self.drops.drop(DropReason.STAGED_OVERFLOW)

    def _usable_keypair(self, now: float) -> Keypair | None:
        keypair = self._current
        if (
            keypair is None
            or now - keypair.created >= REJECT_AFTER_TIME
            or keypair.send_counter + len(self._staged) >= REJECT_AFTER_MESSAGES
        ):
            return None
        return keypair

    def _send_staged(self, now: float) -> None:
        if not self._staged:
            return
        keypair = self._usable_keypair(now)
        if keypair is None:
            if self.responder_only:
                for packet in self._staged:
                    if packet:  # staged keepalives are not the caller's packets
                        self.drops.drop(DropReason.NO_SESSION)
                self._staged.clear()
                return
            self._send_handshake_initiation(False, now)
            return
        packets = list(self._staged)
        self._staged.clear()
        self._seal(keypair, packets, now)

    def _seal(self, keypair: Keypair, packets: Sequence[bytes], now: float) -> None:
        counter = keypair.send_counter
        messages = seal_batch(keypair.send_key, keypair.remote_index, counter, packets, self.mtu)
        self._transmits.extend(messages)
        self._sent(keypair, counter + len(messages), sum(map(len, messages)), len(packets), now)

    def reserve_send(self, packets: Sequence[bytes], now: float) -> SealReservation | None:
        """The fast send path split for threaded drivers: claims counters for ``packets`` (non-empty IP packets) and
        does all bookkeeping of sending them now; the caller seals them outside any lock with
        :meth:`SealReservation.seal` (``dataplane.native.seal_batch``, GIL released) and sends the messages itself.

        None when the packets cannot be sealed at once (no usable session, or packets already staged): the caller
        uses :meth:`encapsulate_batch` instead, which stages them and starts a handshake. Both give the same bytes.
        """
        keypair = self._current
        count = len(packets)
        if (
            self._staged
            or keypair is None
            or now - keypair.created >= REJECT_AFTER_TIME
            or keypair.send_counter + count >= REJECT_AFTER_MESSAGES
        ):
            return None
        counter = keypair.send_counter
        mtu = self.mtu
        self._sent(keypair, counter + count, sealed_size(packets, mtu), count, now)
        return SealReservation(keypair.send_key, keypair.remote_index, counter, packets, mtu)

    def _sent(self, keypair: Keypair, counter: int, sent: int, count: int, now: float) -> None:
        """Bookkeeping after ``count`` transport messages of ``sent`` bytes were sealed; ``counter`` is the next one."""
        keypair.send_counter = counter
        self.tx_bytes += sent
        timers = self._timers
        if timers.persistent_keepalive_interval:
            timers.persistent_keepalive = now + timers.persistent_keepalive_interval
        timers.send_keepalive = None
        if sent > MESSAGE_TRANSPORT_MIN_SIZE * count:  # not only keepalives (32-byte messages)
            timers.data_sent(now)
        # keep-key-fresh on send: either side rekeys after Rekey-After-Messages, the initiator after Rekey-After-Time.
        if counter > REKEY_AFTER_MESSAGES or (keypair.is_initiator and now - keypair.created >= REKEY_AFTER_TIME):
            self._send_handshake_initiation(False, now)

    def _send_handshake_initiation(self, is_retry: bool, now: float) -> None:
        if self.responder_only or self._static_private is None or self._static_static is None:
            return
        if not is_retry and self._initiator_state is not None and self._timers.retransmit_handshake is not None:
            return  # a run of attempts is already in flight; its retransmit timer keeps it going
        if self._last_sent_handshake is not None and now - self._last_sent_handshake < REKEY_TIMEOUT:
            return
        self._last_sent_handshake = now
        self._clear_handshake()
        index = self._indices.allocate(self)
        created = noise.create_initiation(
            static_private=self._static_private,
            remote_static=self.peer_public,
            ephemeral_private=self._rng.random_bytes(KEY_SIZE),
            sender_index=index,
            timestamp=tai64n(self._wall_clock()),
            static_static=self._static_static,
        )
        if created is None:
            self._indices.release(index)
            return
        body, state = created
        self._initiator_state = state
        self._handshake_index = index
        message = self._cookies.add_macs(body, now)
        self._transmits.append(message)
        self.tx_bytes += len(message)
        timers = self._timers
        timers.any_authenticated_packet_traversal(now)
        timers.any_authenticated_packet_sent(now)
        timers.handshake_initiated(now)

    # --- receive path ---

    def decapsulate(self, datagram: bytes, now: float) -> bytes | None:
        """Process one datagram from the peer: the decrypted IP packet, or None (handshake, keepalive or dropped)."""
        size = len(datagram)
        if size < 4:
            self.drops.drop(DropReason.BAD_LENGTH)
            return None
        kind = int.from_bytes(datagram[:4], "little")
        if kind == MESSAGE_TRANSPORT:
            if size < MESSAGE_TRANSPORT_MIN_SIZE:
                self.drops.drop(DropReason.BAD_LENGTH)
                return None
            return self.receive_transport(datagram, now) or None
        if kind == MESSAGE_INITIATION:
            if size != MESSAGE_INITIATION_SIZE:
                self.drops.drop(DropReason.BAD_LENGTH)
            elif self._checker is None or self._static_private is None or self._static_public is None:
                self.drops.drop(DropReason.NO_PRIVATE_KEY)
            elif not self._checker.check_mac1(datagram):
                self.drops.drop(DropReason.BAD_MAC1)
            else:
                consumed = noise.consume_initiation(
                    static_private=self._static_private, static_public=self._static_public, message=datagram
                )
                if consumed is None:
                    self.drops.drop(DropReason.HANDSHAKE_FAILED)
                elif consumed.remote_static != self.peer_public:
                    self.drops.drop(DropReason.UNKNOWN_PEER)
                else:
                    self.receive_initiation(consumed, size, now)
            return None
        if kind == MESSAGE_RESPONSE:
            if size != MESSAGE_RESPONSE_SIZE:
                self.drops.drop(DropReason.BAD_LENGTH)
            elif self._checker is None:
                self.drops.drop(DropReason.NO_PRIVATE_KEY)
            elif not self._checker.check_mac1(datagram):
                self.drops.drop(DropReason.BAD_MAC1)
            else:
                self.receive_response(datagram, now)
            return None
        if kind == MESSAGE_COOKIE_REPLY:
            if size != MESSAGE_COOKIE_REPLY_SIZE:
                self.drops.drop(DropReason.BAD_LENGTH)
            elif not self.owns_index(int.from_bytes(datagram[4:8], "little")):
                self.drops.drop(DropReason.UNKNOWN_INDEX)
            else:
                self.receive_cookie_reply(datagram, now)
            return None
        self.drops.drop(DropReason.BAD_TYPE)
        return None

    def receive_transport(self, message: bytes, now: float) -> bytes | None:
        """Decrypt one transport message (length >= 32 checked by the caller).

        Returns the inner IP packet without padding, ``b""`` for a keepalive or an authenticated packet dropped for
        its content, and None when the message did not authenticate (dropped and counted).
        """
        out: list[bytes] = []
        authenticated = self.receive_transport_batch((message,), now, out)
        if not authenticated:
            return None
        return out[0] if out else b""

    def receive_transport_batch(self, messages: Sequence[bytes], now: float, out: list[bytes]) -> int:
        """Decrypt transport messages (each >= 32 bytes) in order, appending inner IP packets to ``out``.

        Returns how many messages authenticated. Timers are updated once for the whole batch, which gives the same
        deadlines as per-message updates because every message carries the same ``now``.
        """
        authenticated = 0
        start = 0
        count = len(messages)
        unpack_index = _RECEIVER_INDEX.unpack_from
        while start < count:
            index = unpack_index(messages[start])[0]
            end = start + 1
            while end < count and unpack_index(messages[end])[0] == index:
                end += 1
            run = messages[start:end] if start or end < count else messages
            authenticated += self.receive_transport_run(index, run, now, out)
            start = end
        return authenticated

    def receive_transport_run(
        self,
        index: int,
        messages: Sequence[bytes],
        now: float,
        out: list[bytes],
        source_owner: Callable[[bytes], object] | None = None,
        owner: object = None,
        *,
        opened: tuple[Keypair, Sequence[bytes | None]] | None = None,
    ) -> int:
        """:meth:`receive_transport_batch` for messages that all carry receiver index ``index``: the hot path.

        ``source_owner``: cryptokey routing for the caller: an inner packet whose source address (packed)
        ``source_owner`` does not map to ``owner`` is dropped (``ALLOWED_IPS_MISMATCH``).
        ``opened``: (keypair, ``open_batch`` result) computed earlier, e.g. outside the caller's lock; used only when
        that keypair is still the one ``index`` names, else the messages are decrypted again here.
        """
        drops = self.drops
        keypair = self._keypairs_by_index.get(index)
        if keypair is None or now - keypair.created >= REJECT_AFTER_TIME:
            reason = DropReason.UNKNOWN_INDEX if keypair is None else DropReason.KEYS_EXPIRED
            for _ in messages:
                drops.drop(reason)
            return 0
        if opened is not None and opened[0] is keypair:
            plaintexts = opened[1]
        else:
            plaintexts = open_batch(keypair.receive_key, messages)
        replay = keypair.replay
        # Replay check after authentication, as wireguard-go; then the inner packet's header checks.
        packets, sources, replay.last, failed, replayed, rejected_bytes, invalid, keepalives = accept_transport_run(
            messages, plaintexts, replay.ring, replay.last, replay.limit
        )
        if failed:
            drops.drop(DropReason.DECRYPTION_FAILED, failed)
        if replayed:
            drops.drop(DropReason.REPLAY, replayed)
        if invalid:
            drops.drop(DropReason.INVALID_INNER_PACKET, invalid)
        authenticated = len(messages) - failed - replayed
        if authenticated and keypair is self._next:
            self._confirm_next(now)
        if source_owner is None:
            out += packets
        else:
            start = 0
            for end, source in sources:
                if source_owner(source) is owner:
                    out += packets[start:end] if start or end < len(packets) else packets
                else:
                    drops.drop(DropReason.ALLOWED_IPS_MISMATCH, end - start)
                start = end
        received_bytes = sum(map(len, messages)) - rejected_bytes
        data_messages = authenticated - keepalives
        if not authenticated:
            return 0
        self.rx_bytes += received_bytes
        # keep-key-fresh on receive looks at the current keypair, whichever keypair this batch arrived on.
        current = self._current
        if (
            current is not None
            and current.is_initiator
            and now - current.created >= REKEY_ON_RECEIVE_AGE
            and not self._sent_last_minute_handshake
        ):
            self._sent_last_minute_handshake = True
            self._send_handshake_initiation(False, now)
        timers = self._timers
        if timers.persistent_keepalive_interval:
            timers.persistent_keepalive = now + timers.persistent_keepalive_interval
        timers.new_handshake = None
        if data_messages:
            # As data_received once per message: the first arms the passive keepalive, any further one asks for another.
            if timers.send_keepalive is None:
                timers.send_keepalive = now + KEEPALIVE_TIMEOUT
                if data_messages > 1:
                    timers.need_another_keepalive = True
            else:
                timers.need_another_keepalive = True
        return authenticated

    def receive_initiation(self, initiation: noise.ConsumedInitiation, size: int, now: float) -> bool:
        """Answer an authenticated initiation from this peer; False when it is a replay, a flood or fails."""
        if initiation.timestamp <= self._last_timestamp:
            self.drops.drop(DropReason.STALE_TIMESTAMP)
            return False
        if (
            self._last_initiation_consumed is not None
            and now - self._last_initiation_consumed <= HANDSHAKE_INITIATION_RATE
        ):
            self.drops.drop(DropReason.INITIATION_FLOOD)
            return False
        self._last_timestamp = initiation.timestamp
        self._last_initiation_consumed = now
        self.rx_bytes += size
        timers = self._timers
        timers.any_authenticated_packet_traversal(now)
        timers.any_authenticated_packet_received(now)
        # Answering replaces any initiation of ours in flight (its response could no longer be consumed).
        self._clear_handshake()
        index = self._indices.allocate(self)
        created = noise.create_response(
            initiation,
            ephemeral_private=self._rng.random_bytes(KEY_SIZE),
            sender_index=index,
            preshared_key=self.preshared_key,
        )
        if created is None:
            self._indices.release(index)
            self.drops.drop(DropReason.HANDSHAKE_FAILED)
            return False
        body, keys = created
        keypair = Keypair(keys, now, replay_limit=self._replay_limit)
        if self._next is not None:
            self._drop_keypair(self._next)
        if self._previous is not None:
            self._drop_keypair(self._previous)
            self._previous = None
        self._next = keypair
        self._keypairs_by_index[index] = keypair
        message = self._cookies.add_macs(body, now)
        self._transmits.append(message)
        self.tx_bytes += len(message)
        timers.session_derived(now)
        timers.any_authenticated_packet_traversal(now)
        timers.any_authenticated_packet_sent(now)
        return True

    def receive_response(self, message: bytes, now: float) -> bool:
        """Complete our handshake from a response (mac1 checked by the caller)."""
        state = self._initiator_state
        if (
            state is None
            or self._static_private is None
            or int.from_bytes(message[8:12], "little") != state.sender_index
        ):
            self.drops.drop(DropReason.UNEXPECTED_RESPONSE)
            return False
        keys = noise.consume_response(
            state, static_private=self._static_private, preshared_key=self.preshared_key, message=message
        )
        if keys is None:
            self.drops.drop(DropReason.HANDSHAKE_FAILED)
            return False
        # The handshake's index now names the keypair.
        self._initiator_state = None
        self._handshake_index = None
        keypair = Keypair(keys, now, replay_limit=self._replay_limit)
        if self._next is not None:
            if self._current is not None:
                self._drop_keypair(self._current)
            if self._previous is not None:
                self._drop_keypair(self._previous)
            self._previous = self._next
            self._next = None
        else:
            if self._previous is not None:
                self._drop_keypair(self._previous)
            self._previous = self._current
        self._current = keypair
        self._keypairs_by_index[keys.local_index] = keypair
        self.rx_bytes += len(message)
        timers = self._timers
        timers.any_authenticated_packet_traversal(now)
        timers.any_authenticated_packet_received(now)
        timers.session_derived(now)
        self._handshake_complete(True, now)
        self.send_keepalive(now)
        return True

    def receive_cookie_reply(self, message: bytes, now: float) -> bool:
        if not self._cookies.consume_reply(message, now):
            self.drops.drop(DropReason.BAD_COOKIE_REPLY)
            return False
        return True

    def _confirm_next(self, now: float) -> None:
        """The initiator used the keypair our response created: it becomes current."""
        if self._previous is not None:
            self._drop_keypair(self._previous)
        self._previous = self._current
        self._current = self._next
        self._next = None
        self._handshake_complete(False, now)
        self._send_staged(now)

    def _handshake_complete(self, is_initiator: bool, now: float) -> None:
        self._timers.handshake_complete(now)
        self._sent_last_minute_handshake = False
        self.last_handshake_wall = self._wall_clock()
        self._events.append(HandshakeCompleted(self.peer_public, is_initiator))
        _log.debug(
            "handshake with %s completed (%s)",
            self.peer_public.hex()[:16],
            "initiator" if is_initiator else "responder",
        )

    # --- timers ---

    def handle_timeout(self, now: float) -> None:
        timers = self._timers
        deadline = timers.retransmit_handshake
        if deadline is not None and now >= deadline:
            timers.retransmit_handshake = None
            started = timers.handshake_started
            if started is not None and now - started >= self.rekey_attempt_time:
                self._give_up(now)
            else:
                self._send_handshake_initiation(True, now)
        deadline = timers.send_keepalive
        if deadline is not None and now >= deadline:
            timers.send_keepalive = None
            self.send_keepalive(now)
            if timers.need_another_keepalive:
                timers.need_another_keepalive = False
                timers.send_keepalive = now + KEEPALIVE_TIMEOUT
        deadline = timers.new_handshake
        if deadline is not None and now >= deadline:
            timers.new_handshake = None
            self._send_handshake_initiation(False, now)
        deadline = timers.persistent_keepalive
        if deadline is not None and now >= deadline:
            timers.persistent_keepalive = None
            if timers.persistent_keepalive_interval:
                self.send_keepalive(now)
        deadline = timers.zero_key_material
        if deadline is not None and now >= deadline:
            timers.zero_key_material = None
            self._zero_keys()

    def _give_up(self, now: float) -> None:
        timers = self._timers
        timers.handshake_started = None
        timers.send_keepalive = None
        dropped = sum(1 for packet in self._staged if packet)  # staged keepalives are not the caller's packets
        for _ in range(len(self._staged)):
            self.drops.drop(DropReason.HANDSHAKE_GAVE_UP)
        self._staged.clear()
        self._clear_handshake()
        if timers.zero_key_material is None:
            timers.session_derived(now)
        self._events.append(HandshakeGaveUp(self.peer_public, dropped))
        _log.debug("handshake with %s gave up after %.0f s", self.peer_public.hex()[:16], self.rekey_attempt_time)

    def _zero_keys(self) -> None:
        for keypair in (self._current, self._previous, self._next):
            if keypair is not None:
                self._drop_keypair(keypair)
        self._current = self._previous = self._next = None
        self._clear_handshake()
        self._staged.clear()
        self._events.append(KeysZeroed(self.peer_public))
        _log.debug("keys for %s zeroed", self.peer_public.hex()[:16])

    def _clear_handshake(self) -> None:
        if self._handshake_index is not None:
            self._indices.release(self._handshake_index)
        self._handshake_index = None
        self._initiator_state = None

    def _drop_keypair(self, keypair: Keypair) -> None:
        if self._keypairs_by_index.pop(keypair.local_index, None) is not None:
            self._indices.release(keypair.local_index)
