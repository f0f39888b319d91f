"""A WireGuard device (sans-IO): many peers, cryptokey routing, cookies under load, roaming.

Datagrams come in through :meth:`Device.receive_datagrams`, IP packets from the TUN through :meth:`Device.send_packets`;
the driver then drains datagrams for the UDP socket (:meth:`drain_transmits`, or as runs to one destination with
:meth:`drain_datagram_runs`) and decrypted packets for the TUN (:meth:`drain_packets`), and re-arms its timer to
:meth:`poll_timeout`.

Under load (cookie replies instead of handshakes): the device counts handshake messages (initiations and responses)
whose mac1 is valid in one-second buckets (a bucket starts at the first message after the previous one ended); when
a bucket holds more than ``under_load_threshold`` of them the device is under load, and stays so until one second
after the last message that exceeded the threshold (wireguard-go's 1 s hysteresis). wireguard-go instead looks at the
depth of its handshake queue (>= 512); a sans-IO machine has no queue, so the rate stands in for it. Under load, a
handshake message without a valid mac2 gets a cookie reply and nothing else; one with a valid mac2 still passes the
per-source rate limiter (20/s, burst 5) before any Curve25519 work. ``force_under_load`` pins the state on.
"""

from __future__ import annotations

import heapq
import ipaddress
import itertools
import logging
import struct
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from dataplane.base import Address, DropCounter, Rng, Transmit, WallClock
from dataplane.native import destination_runs, open_batch

from . import noise
from .allowedips import AllowedIps, Network
from .constants import (
    DEFAULT_MTU,
    KEY_SIZE,
    MAX_PEERS,
    MESSAGE_COOKIE_REPLY,
    MESSAGE_COOKIE_REPLY_SIZE,
    MESSAGE_INITIATION,
    MESSAGE_INITIATION_SIZE,
    MESSAGE_RESPONSE,
    MESSAGE_RESPONSE_SIZE,
    MESSAGE_TRANSPORT,
    MESSAGE_TRANSPORT_MIN_SIZE,
    REKEY_ATTEMPT_TIME,
    UNDER_LOAD_AFTER_TIME,
    UNDER_LOAD_HANDSHAKES_PER_SECOND,
)
from .cookie import CookieChecker
from .crypto import load_private_key, public_key
from .ratelimit import RateLimiter
from .session import Keypair
from .tunn import DropReason, IndexTable, SealReservation, Tunn, TunnEvent

__all__ = ["Device", "DropReason", "Peer", "ReceivedRun", "SealJob"]

# Drops outside the transport fast path, one record each: a separate logger so floods stay quiet unless asked for.
_drop_log = logging.getLogger("dataplane.wireguard.drops")

_TYPE_AND_INDEX = struct.Struct("<II")  # message type (with its 3 reserved bytes) and the receiver index


@dataclass(frozen=True, slots=True)
class ReceivedRun:
    """Datagrams grouped by :meth:`Device.open_datagrams`: a transport run (``index`` >= 0: messages with that
    receiver index from ``source``, decrypted with ``keypair`` when it was known) or one other datagram (index -1)."""

    index: int
    source: Address
    messages: list[bytes]
    keypair: Keypair | None
    plaintexts: list[bytes | None] | None


@dataclass(frozen=True, slots=True)
class SealJob:
    """Packets for one peer with their counters claimed (:meth:`Device.prepare_send`): seal, send to ``destination``."""

    destination: Address
    reservation: SealReservation

    def seal(self) -> list[bytes]:
        return self.reservation.seal()


class Peer:
    """One configured peer. ``endpoint`` follows the source of the last authenticated datagram from it."""

    __slots__ = ("allowed_ips", "endpoint", "public_key", "scheduled", "tunn")

    def __init__(self, public_key: bytes, tunn: Tunn) -> None:
        self.public_key = public_key
        self.tunn = tunn  # read-only for callers; a plain attribute because the hot path reads it per batch
        self.scheduled: float | None = None  # the deadline the device's timer heap holds for this peer
        self.endpoint: Address | None = None
        self.allowed_ips: list[Network] = []

    @property
    def preshared_key(self) -> bytes | None:
        return self.tunn.preshared_key

    @property
    def persistent_keepalive(self) -> int:
        return self.tunn.persistent_keepalive

    @property
    def last_handshake_wall(self) -> float | None:
        return self.tunn.last_handshake_wall

    @property
    def rx_bytes(self) -> int:
        return self.tunn.rx_bytes

    @property
    def tx_bytes(self) -> int:
        return self.tunn.tx_bytes

    def __repr__(self) -> str:
        return f"Peer({self.public_key.hex()[:16]}…, endpoint={self.endpoint}, allowed_ips={self.allowed_ips})"


class Device:
    def __init__(
        self,
        *,
        rng: Rng,
        wall_clock: WallClock,
        private_key: bytes | None = None,
        rekey_attempt_time: float = REKEY_ATTEMPT_TIME,
        under_load_threshold: int = UNDER_LOAD_HANDSHAKES_PER_SECOND,
        mtu: int | None = DEFAULT_MTU,
    ) -> None:
        self._rng = rng
        self._wall_clock = wall_clock
        self.rekey_attempt_time = rekey_attempt_time
        self.under_load_threshold = under_load_threshold
        self.force_under_load = False
        self._mtu = mtu
        self.drops = DropCounter()
        self._indices = IndexTable(rng)
        self._peers: dict[bytes, Peer] = {}
        self._routes: AllowedIps[Peer] = AllowedIps()
        self._rate_limiter = RateLimiter()
        self._checker: CookieChecker | None = None
        self.private_key: bytes | None = None
        self.public_key: bytes | None = None
        self._load_bucket_start = 0.0
        self._load_bucket_count = 0
        self._under_load_until: float | None = None
        # Outgoing datagrams as runs to one destination, in order (a peer's messages of one collect are one run).
        self._transmits: list[tuple[Address, list[bytes]]] = []
        self._packets: list[bytes] = []
        self._events: deque[tuple[bytes, TunnEvent]] = deque()
        self._timer_heap: list[tuple[float, int, Peer]] = []
        self._timer_sequence = itertools.count()
        self.set_private_key(private_key, 0.0)

    # --- configuration ---

    @property
    def peers(self) -> Mapping[bytes, Peer]:
        return self._peers

    @property
    def mtu(self) -> int | None:
        """The TUN MTU: padding never grows a packet beyond it (None: always pad to 16 bytes)."""
        return self._mtu

    @mtu.setter
    def mtu(self, mtu: int | None) -> None:
        self._mtu = mtu
        for peer in self._peers.values():
            peer.tunn.mtu = mtu

    def set_private_key(self, key: bytes | None, now: float) -> None:
        if key is not None and len(key) != KEY_SIZE:
            raise ValueError("private key must be 32 bytes")
        if key == self.private_key and key is not None:
            return
        self.private_key = key
        # Loaded once: every Tunn and every initiation we consume reuse it (loading costs two exchanges).
        self._static_key = load_private_key(key) if key is not None else None
        self.public_key = public_key(self._static_key) if self._static_key is not None else None
        self._checker = CookieChecker(self.public_key, self._rng) if self.public_key is not None else None
        # wireguard-go: a peer whose public key is our own would be a loop; it is removed.
        if self.public_key is not None and self.public_key in self._peers:
            self.remove_peer(self.public_key, now)
        for peer in self._peers.values():
            peer.tunn.set_static_private(self._static_key, now)
            self._collect(peer)

    def upsert_peer(
        self,
        public_key: bytes,
        now: float,
        *,
        preshared_key: bytes | None = None,
        endpoint: Address | None = None,
        persistent_keepalive: int | None = None,
        allowed_ips: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network] = (),
        replace_allowed_ips: bool = False,
    ) -> Peer:
        """Create or update a peer; None arguments leave the current value unchanged."""
        if len(public_key) != KEY_SIZE:
            raise ValueError("public key must be 32 bytes")
        peer = self._peers.get(public_key)
        if peer is None:
            if len(self._peers) >= MAX_PEERS:
                raise ValueError("too many peers")
            if public_key == self.public_key:
                raise ValueError("a peer cannot have the device's own public key")
            tunn = Tunn(
                self._static_key,
                public_key,
                None,
                self._indices,
                self._rng,
                self._wall_clock,
                rekey_attempt_time=self.rekey_attempt_time,
                drops=self.drops,
                mtu=self._mtu,
            )
            peer = Peer(public_key, tunn)
            self._peers[public_key] = peer
        if preshared_key is not None:
            peer.tunn.set_preshared_key(None if preshared_key == bytes(KEY_SIZE) else preshared_key)
        if endpoint is not None:
            peer.endpoint = endpoint
        if replace_allowed_ips:
            for network in peer.allowed_ips:
                if self._routes.get_exact(network) is peer:
                    self._routes.remove(network)
            peer.allowed_ips = []
        for network in allowed_ips:
            self._add_allowed_ip(peer, network)
        if persistent_keepalive is not None:
            peer.tunn.set_persistent_keepalive(persistent_keepalive, now)
            self._collect(peer)
        return peer

    def _add_allowed_ip(self, peer: Peer, network: Network) -> None:
        network = ipaddress.ip_network(network, strict=False)
        previous = self._routes.get_exact(network)
        if previous is peer:
            return
        if previous is not None:
            previous.allowed_ips = [n for n in previous.allowed_ips if n != network]
        self._routes.insert(network, peer)
        peer.allowed_ips.append(network)

    def remove_peer(self, public_key: bytes, now: float) -> None:
        peer = self._peers.pop(public_key, None)
        if peer is None:
            return
        for network in peer.allowed_ips:
            if self._routes.get_exact(network) is peer:
                self._routes.remove(network)
        peer.allowed_ips = []
        peer.tunn.close()
        peer.scheduled = None

    def remove_all_peers(self, now: float) -> None:
        for key in list(self._peers):
            self.remove_peer(key, now)

    # --- load ---

    def is_under_load(self, now: float) -> bool:
        if self.force_under_load:
            return True
        return self._under_load_until is not None and now < self._under_load_until

    def _count_handshake_message(self, now: float) -> None:
        if now - self._load_bucket_start >= 1.0 or now < self._load_bucket_start:
            self._load_bucket_start = now
            self._load_bucket_count = 0
        self._load_bucket_count += 1
        if self._load_bucket_count > self.under_load_threshold:
            self._under_load_until = now + UNDER_LOAD_AFTER_TIME

    # --- receive path ---

    def _drop(self, source: Address, reason: DropReason) -> None:
        self.drops.drop(reason)
        if _drop_log.isEnabledFor(logging.DEBUG):
            _drop_log.debug("dropped a datagram from %s: %s", source, reason.value)

    def receive_datagrams(self, datagrams: Sequence[tuple[bytes, Address]], now: float) -> None:
        """Process datagrams from the UDP socket; every one is either used or dropped and counted.

        Consecutive transport messages with the same receiver index from the same source are decrypted as one run.
        """
        self.receive_opened(self.open_datagrams(datagrams), now)

    def open_datagrams(self, datagrams: Sequence[tuple[bytes, Address]]) -> list[ReceivedRun]:
        """The first half of :meth:`receive_datagrams`: groups the datagrams into runs and authenticates and decrypts
        each transport run with the keypair its receiver index names (``dataplane.native.open_batch``, GIL released).

        It changes no state (it only looks keypairs up), so a threaded driver may call it outside the lock that
        guards the device; :meth:`receive_opened` then does the rest, and decrypts again any run whose keypair
        changed in between.
        """
        runs: list[ReceivedRun] = []
        run: list[bytes] = []
        run_index = -1
        run_source: Address = ("", 0)  # meaningful while ``run`` is not empty
        unpack_header = _TYPE_AND_INDEX.unpack_from
        minimum = MESSAGE_TRANSPORT_MIN_SIZE
        for data, source in datagrams:
            if len(data) >= minimum:
                kind, index = unpack_header(data)
                if kind == MESSAGE_TRANSPORT:
                    if index == run_index and (source is run_source or source == run_source):
                        run.append(data)
                        continue
                    if run:
                        runs.append(self._open_run(run_index, run, run_source))
                    run = [data]
                    run_index = index
                    run_source = source
                    continue
            if run:
                runs.append(self._open_run(run_index, run, run_source))
                run = []
                run_index = -1
            runs.append(ReceivedRun(-1, source, [data], None, None))
        if run:
            runs.append(self._open_run(run_index, run, run_source))
        return runs

    def _open_run(self, index: int, messages: list[bytes], source: Address) -> ReceivedRun:
        tunn = self._indices.entries.get(index)
        keypair = tunn.keypair_for_index(index) if tunn is not None else None
        if keypair is None:
            return ReceivedRun(index, source, messages, None, None)
        return ReceivedRun(index, source, messages, keypair, open_batch(keypair.receive_key, messages))

    def receive_opened(self, runs: Sequence[ReceivedRun], now: float) -> None:
        """The second half of :meth:`receive_datagrams`, for what :meth:`open_datagrams` returned."""
        touched: set[Peer] = set()
        for run in runs:
            if run.index < 0:
                self._receive_other(run.messages[0], run.source, now, touched)
            else:
                self._receive_run(run, now, touched)
        for peer in touched:
            self._collect(peer)

    def _receive_run(self, run: ReceivedRun, now: float, touched: set[Peer]) -> None:
        index = run.index
        messages = run.messages
        source = run.source
        tunn = self._indices.entries.get(index)
        if tunn is None:
            drops = self.drops
            for _ in messages:
                drops.drop(DropReason.UNKNOWN_INDEX)
            return
        peer = self._peers.get(tunn.peer_public)
        if peer is None:
            return
        opened = (run.keypair, run.plaintexts) if run.keypair is not None and run.plaintexts is not None else None
        # Cryptokey routing inside the run: the inner source must be one of this peer's allowed IPs.
        if tunn.receive_transport_run(index, messages, now, self._packets, self._routes.lookup, peer, opened=opened):
            peer.endpoint = source
            touched.add(peer)

    def _receive_other(self, data: bytes, source: Address, now: float, touched: set[Peer]) -> None:
        size = len(data)
        if size < 4:
            self._drop(source, DropReason.BAD_LENGTH)
            return
        kind = int.from_bytes(data[:4], "little")
        if kind == MESSAGE_INITIATION or kind == MESSAGE_RESPONSE:
            expected = MESSAGE_INITIATION_SIZE if kind == MESSAGE_INITIATION else MESSAGE_RESPONSE_SIZE
            if size != expected:
                self._drop(source, DropReason.BAD_LENGTH)
                return
            self._receive_handshake(kind, data, source, now, touched)
        elif kind == MESSAGE_COOKIE_REPLY:
            if size != MESSAGE_COOKIE_REPLY_SIZE:
                self._drop(source, DropReason.BAD_LENGTH)
                return
            tunn = self._indices.get(int.from_bytes(data[4:8], "little"))
            if tunn is None:
                self._drop(source, DropReason.UNKNOWN_INDEX)
                return
            tunn.receive_cookie_reply(data, now)
        elif kind == MESSAGE_TRANSPORT:
            self._drop(source, DropReason.BAD_LENGTH)
        else:
            self._drop(source, DropReason.BAD_TYPE)

    def _receive_handshake(self, kind: int, data: bytes, source: Address, now: float, touched: set[Peer]) -> None:
        checker = self._checker
        if checker is None or self._static_key is None or self.public_key is None:
            self._drop(source, DropReason.NO_PRIVATE_KEY)
            return
        if not checker.check_mac1(data):
            self._drop(source, DropReason.BAD_MAC1)
            return
        self._count_handshake_message(now)
        if self.is_under_load(now):
            if not checker.check_mac2(data, source, now):
                self._transmits.append((source, [checker.create_reply(data, source, now)]))
                self._drop(source, DropReason.COOKIE_REQUIRED)
                return
            if not self._rate_limiter.allow(source[0], now):
                self._drop(source, DropReason.RATE_LIMITED)
                return
        if kind == MESSAGE_INITIATION:
            consumed = noise.consume_initiation(
                static_private=self._static_key, static_public=self.public_key, message=data
            )
            if consumed is None:
                self._drop(source, DropReason.HANDSHAKE_FAILED)
                return
            peer = self._peers.get(consumed.remote_static)
            if peer is None:
                self._drop(source, DropReason.UNKNOWN_PEER)
                return
            if peer.tunn.receive_initiation(consumed, len(data), now):
                peer.endpoint = source
            touched.add(peer)
            return
        tunn = self._indices.get(int.from_bytes(data[8:12], "little"))
        if tunn is None:
            self._drop(source, DropReason.UNKNOWN_INDEX)
            return
        peer = self._peers.get(tunn.peer_public)
        if peer is not None:
            if tunn.receive_response(data, now):
                peer.endpoint = source
            touched.add(peer)

    # --- send path ---

    def send_packets(self, packets: Sequence[bytes], now: float) -> None:
        """Encrypt IP packets from the TUN for the peer whose allowed-ips hold each destination."""
        for peer, batch in self._route_packets(packets).items():
            peer.tunn.encapsulate_batch(batch, now)
            self._collect(peer)

    def prepare_send(self, packets: Sequence[bytes], now: float) -> list[SealJob]:
        """:meth:`send_packets` for threaded drivers: routes the packets and claims their counters, but leaves the
        sealing (a pure function, :meth:`SealJob.seal`) and the sending to the caller, to do outside its lock.

        Every packet either becomes part of a returned job (sealed for ``job.destination``), or goes the way
        ``send_packets`` takes it (staged for a handshake, dropped and counted), with its output in
        :meth:`drain_datagram_runs`. The jobs seal to the very messages ``send_packets`` would have queued.
        """
        jobs: list[SealJob] = []
        for peer, batch in self._route_packets(packets).items():
            endpoint = peer.endpoint
            reservation = peer.tunn.reserve_send(batch, now) if endpoint is not None else None
            if reservation is None:
                peer.tunn.encapsulate_batch(batch, now)
            else:
                assert endpoint is not None
                jobs.append(SealJob(endpoint, reservation))
            self._collect(peer)
        return jobs

    def _route_packets(self, packets: Sequence[bytes]) -> dict[Peer, list[bytes]]:
        """Groups IP packets by the peer whose allowed-ips hold their destination (order kept within a peer)."""
        lookup = self._routes.lookup
        batches: dict[Peer, list[bytes]] = {}
        drops = self.drops
        start = 0
        for end, destination in destination_runs(packets):
            peer = lookup(destination) if destination is not None else None
            if peer is None:
                drops.drop(
                    DropReason.NO_ROUTE if destination is not None else DropReason.INVALID_INNER_PACKET, end - start
                )
            else:
                batch = batches.get(peer)
                if batch is None:
                    batches[peer] = batch = []
                batch += packets[start:end] if start or end < len(packets) else packets
            start = end
        return batches

    # --- timers ---
    # Deadlines live in a heap with lazy deletion: an entry is current while it equals its peer's ``scheduled``
    # deadline, so poll_timeout and handle_timeout cost O(log n) instead of a walk over every peer.

    def _schedule(self, peer: Peer) -> None:
        deadline = peer.tunn.poll_timeout()
        if deadline == peer.scheduled:
            return
        peer.scheduled = deadline
        if deadline is None:
            return
        heap = self._timer_heap
        heapq.heappush(heap, (deadline, next(self._timer_sequence), peer))
        if len(heap) > 2 * len(self._peers) + 1024:
            self._timer_heap = [entry for entry in heap if self._is_current(entry)]
            heapq.heapify(self._timer_heap)

    def _is_current(self, entry: tuple[float, int, Peer]) -> bool:
        deadline, _, peer = entry
        return peer.scheduled == deadline and self._peers.get(peer.public_key) is peer

    def handle_timeout(self, now: float) -> None:
        heap = self._timer_heap
        due: list[Peer] = []
        while heap and heap[0][0] <= now:
            entry = heapq.heappop(heap)
            if self._is_current(entry):
                entry[2].scheduled = None
                due.append(entry[2])
        for peer in due:
            peer.tunn.handle_timeout(now)
            self._collect(peer)

    def poll_timeout(self) -> float | None:
        heap = self._timer_heap
        while heap and not self._is_current(heap[0]):
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    # --- output ---

    def _collect(self, peer: Peer) -> None:
        """Move a peer's events and datagrams out after anything touched it, and re-arm its deadline."""
        tunn = peer.tunn
        if tunn.has_events:
            while (event := tunn.poll_event()) is not None:
                self._events.append((peer.public_key, event))
        messages = tunn.drain_transmits()
        if messages:
            endpoint = peer.endpoint
            if endpoint is None:
                for _ in messages:
                    self.drops.drop(DropReason.NO_ENDPOINT)
            else:
                transmits = self._transmits
                if transmits and transmits[-1][0] is endpoint:
                    transmits[-1][1].extend(messages)
                else:
                    transmits.append((endpoint, messages))
        self._schedule(peer)

    def drain_transmits(self) -> list[Transmit]:
        out = [Transmit(destination, payload) for destination, payloads in self._transmits for payload in payloads]
        self._transmits = []
        return out

    def drain_datagrams(self) -> list[tuple[Address, bytes]]:
        """(destination, payload) in order, without a Transmit object per datagram."""
        out = [(destination, payload) for destination, payloads in self._transmits for payload in payloads]
        self._transmits = []
        return out

    def drain_datagram_runs(self) -> list[tuple[Address, list[bytes]]]:
        """The fast path for drivers: runs of datagrams to one destination, in order (one GSO send per run)."""
        out = self._transmits
        self._transmits = []
        return out

    def drain_packets(self) -> list[bytes]:
        out = self._packets
        self._packets = []
        return out

    def poll_event(self) -> tuple[bytes, TunnEvent] | None:
        """(peer public key, event) for handshakes completed, given up and keys zeroed."""
        return self._events.popleft() if self._events else None

    def __iter__(self) -> Iterator[Peer]:
        return iter(self._peers.values())
