"""The Node: peer connections (ICE agent + WireGuard tunnel each) and TURN relay allocations, sans-IO.

The counterpart of Firezone's snownet ``Node``, role-symmetric: a gateway node is ICE-controlled and WireGuard
responder, a client node ICE-controlling and WireGuard initiator. One UDP socket per address family carries STUN
(relay control and ICE checks), TURN ChannelData and WireGuard; :meth:`Node.handle_input` demultiplexes by the rules of
docs/protocol.md §4.4:

* from port 3478 of a known relay → that relay's :class:`~dataplane.turn.Allocation` (STUN for TURN, or ChannelData
  whose payload is a peer's datagram arriving on our relayed address; it is then demultiplexed again, below);
* otherwise a STUN message → the ICE agent of the connection named by USERNAME (requests) or the agent that owns the
  transaction (responses);
* otherwise WireGuard (first byte 1–4, three zero bytes) → the connection owning the receiver index (types 2–4; all
  tunnels draw their indices from one table, so an index names exactly one connection), or, for an initiation, the
  connection whose ICE agent has a pair from that local address to that source. A datagram that matches no
  connection, or more than one, is dropped and counted, never guessed.

Every one of these lookups, and :meth:`Node.poll_timeout`, is O(1) (a heap: O(log n)) in the number of connections:
agents register transactions and pairs in a shared :class:`~dataplane.ice.agent.AgentDirectory`. Handshake messages
pass a node-wide flood guard first (mac1; above 100 per second, cookie replies and a per-source limit), and what a
peer can make the node store is bounded (candidates, pairs, relays).

Roles (§4.2): the client initiates WireGuard as soon as ICE selected a pair; the gateway's tunnels are responder-only
and it never buffers. While ICE has lost consent on the selected pair (``IceDisconnected``) nothing is sent on it:
packets wait (client) or are dropped (gateway) until ICE selects a pair again.

Candidates all come from the relays (§4.3): the local socket address seen on relay traffic is the host candidate,
the BINDING answer the server-reflexive one and the ALLOCATE answer the relayed ones; each connection only uses the
relayed candidates of the one relay sampled for it. A connection's WireGuard tunnel is independent of its path, so
ICE moving between direct and relayed pairs (relay removed, roaming) never loses the session.
"""

from __future__ import annotations

import enum
import heapq
import logging
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from dataplane import stun, turn
from dataplane.base import Address, DropCounter, Rng, Transmit, WallClock
from dataplane.ice import agent as ice
from dataplane.ice.candidate import Candidate, CandidateKind
from dataplane.ice.timing import CLIENT_PROFILE, SERVER_PROFILE
from dataplane.turn import Allocation
from dataplane.wireguard import tunn as wg
from dataplane.wireguard.constants import MESSAGE_INITIATION_SIZE, MESSAGE_RESPONSE_SIZE, MESSAGE_TRANSPORT_MIN_SIZE
from dataplane.wireguard.cookie import CookieChecker
from dataplane.wireguard.crypto import load_private_key, public_key
from dataplane.wireguard.ratelimit import RateLimiter

logger = logging.getLogger(__name__)

RELAY_PORT = 3478
FIREZONE_REKEY_ATTEMPT_TIME = 20.0  # docs/protocol.md §4.2: ICE mode fails a desynced tunnel fast
MAX_PENDING_PACKETS = 64  # a client's IP packets held per connection until it has a path
RTT_INCLUSION_FACTOR = 2.0  # relays within 2× the best RTT (plus slack) are sampled evenly; slower ones are outliers
RTT_INCLUSION_SLACK = 0.010
# docs/protocol.md §4.2: more handshakes per second than this, over all connections, and the node is under load
# (boringtun's default, which Firezone uses).
HANDSHAKE_RATE_LIMIT = 100
MAX_RELAYS = 32  # the portal lists a handful; each relay costs an allocation and candidates on every connection
# A client connection whose pairs all stopped answering (ICE PathsUnanswered: e.g. both sides use the same relay and
# it died without a word) moves to another relay, at most once per this many seconds.
RELAY_SWITCH_HOLDOFF = 30.0
_STUN_REQUEST = stun.MessageClass.REQUEST  # read per datagram; an Enum class attribute costs a metaclass hook

ConnectionId = str
RelayId = str


@dataclass(slots=True)
class TransmitRun:
    """Datagrams from one local address (None = any socket of the family) to one destination, in order: a sealed
    batch leaves the Node as one of these instead of a :class:`Transmit` per datagram (see :meth:`Node.drain_transmits`)."""

    dst: Address
    payloads: list[bytes]
    src: Address | None = None


class NodeRole(enum.Enum):
    CLIENT = "client"  # ICE controlling, WireGuard initiator
    GATEWAY = "gateway"  # ICE controlled, WireGuard responder


class Path(enum.Enum):
    DIRECT = "direct"
    RELAYED = "relayed"


class DropReason(enum.Enum):
    EMPTY = "empty"
    UNKNOWN_RELAY_TRAFFIC = "unknown_relay_traffic"
    STUN_NO_CONNECTION = "stun_no_connection"
    # An answer to a check this node sent and stopped waiting for: a retransmitted check answered twice, or late.
    STUN_LATE_RESPONSE = "stun_late_response"
    WIREGUARD_NO_CONNECTION = "wireguard_no_connection"
    WIREGUARD_REJECTED = "wireguard_rejected"
    UNRECOGNISED = "unrecognised"
    NO_CONNECTION = "no_connection"
    PENDING_QUEUE_FULL = "pending_queue_full"
    CONNECTION_NOT_READY = "connection_not_ready"
    NO_PATH = "no_path"
    HANDSHAKE_BAD_LENGTH = "handshake_bad_length"
    HANDSHAKE_BAD_MAC1 = "handshake_bad_mac1"
    COOKIE_REQUIRED = "cookie_required"  # under load, without a valid mac2: answered with a cookie reply only
    HANDSHAKE_RATE_LIMITED = "handshake_rate_limited"
    TOO_MANY_CANDIDATES = "too_many_candidates"


@dataclass(frozen=True, slots=True)
class IceCredentials:
    username: str
    password: str


@dataclass(frozen=True, slots=True)
class RelayConfig:
    """One relay as the portal describes it (``init.relays`` / ``relays_presence.connected``, merged per id)."""

    id: RelayId
    addresses: tuple[Address, ...]
    username: str
    password: str
    realm: str = "firezone"


# -- events -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CandidateGathered:
    connection_id: ConnectionId
    candidate: Candidate


@dataclass(frozen=True, slots=True)
class CandidateInvalidated:
    connection_id: ConnectionId
    candidate: Candidate


@dataclass(frozen=True, slots=True)
class ConnectionEstablished:
    connection_id: ConnectionId
    path: Path
    local: Address
    remote: Address


@dataclass(frozen=True, slots=True)
class ConnectionPathChanged:
    connection_id: ConnectionId
    path: Path
    local: Address
    remote: Address


@dataclass(frozen=True, slots=True)
class ConnectionFailed:
    connection_id: ConnectionId
    reason: str


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    connection_id: ConnectionId


@dataclass(frozen=True, slots=True)
class NoRelays:
    """No relay with a measured RTT is available (for a new connection, or after losing one): ask for more."""


NodeEvent = (
    CandidateGathered
    | CandidateInvalidated
    | ConnectionEstablished
    | ConnectionPathChanged
    | ConnectionFailed
    | ConnectionClosed
    | NoRelays
)


@dataclass(frozen=True, slots=True)
class ConnectionInfo:
    """A read-only view for tests, metrics and the portal glue."""

    connection_id: ConnectionId
    relay_id: RelayId | None
    path: Path | None
    local: Address | None
    remote: Address | None
    established: bool
    handshakes: int  # WireGuard handshakes completed: a path change must not add one
    has_session: bool = False  # a WireGuard session exists: packets encapsulated now are sent, not dropped/queued
    rx_bytes: int = 0  # WireGuard datagram bytes received from / sent to the peer (status, metrics)
    tx_bytes: int = 0
    last_handshake_wall: float | None = None  # unix seconds of the last completed handshake


@dataclass(frozen=True, slots=True)
class RelayInfo:
    """A read-only view of one relay and its allocation, for status and metrics."""

    relay_id: RelayId
    server: Address
    state: str  # the allocation's state (turn.AllocationState value)
    rtt: float | None
    srflx: tuple[Address, ...]
    relayed: tuple[Address, ...]
    expires_at: float | None  # monotonic seconds, like ``now``


# -- internals --------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Relay:
    config: RelayConfig
    allocation: Allocation
    host: set[Address] = field(default_factory=set)  # our socket addresses seen on traffic with this relay
    srflx: set[Address] = field(default_factory=set)
    relayed: set[Address] = field(default_factory=set)
    # The last answer of ``candidates`` per include_relayed, with the addresses it was built from: every connection
    # asks (on creation, and all of them when a relay changes), and building candidates parses addresses.
    _cached: dict[bool, tuple[tuple[frozenset[Address], ...], list[tuple[Candidate, Address]]]] = field(
        default_factory=dict
    )
    # The allocation's deadline as last asked, in a 1-tuple (None: ask again). The node asks after every datagram and
    # timer; only input, encapsulate and handle_timeout move an allocation's timers, and each calls allocation_touched.
    _deadline_cache: tuple[float | None] | None = None
    # The relayed address per family (True: IPv6), the lowest when there are several; rebuilt when relayed changes.
    relayed_by_family: dict[bool, Address] = field(default_factory=dict)

    def deadline(self) -> float | None:
        cached = self._deadline_cache
        if cached is None:
            cached = self._deadline_cache = (_deadline(self.allocation.poll_timeout()),)
        return cached[0]

    def allocation_touched(self) -> None:
        self._deadline_cache = None

    def set_relayed(self, addresses: Iterable[Address]) -> None:
        self.relayed = set(addresses)
        self.relayed_by_family = {}
        for address in sorted(self.relayed):
            self.relayed_by_family.setdefault(":" in address[0], address)

    @property
    def rtt(self) -> float | None:
        return self.allocation.rtt

    def candidates(self, include_relayed: bool) -> list[tuple[Candidate, Address]]:
        """(candidate, base) pairs this relay contributes (host candidates are the node's, see ``Node._hosts``)."""
        key = (frozenset(self.host), frozenset(self.srflx), frozenset(self.relayed) if include_relayed else frozenset())
        cached = self._cached.get(include_relayed)
        if cached is not None and cached[0] == key:
            return cached[1]
        result = self._build_candidates(include_relayed)
        self._cached[include_relayed] = (key, result)
        return result

    def _build_candidates(self, include_relayed: bool) -> list[tuple[Candidate, Address]]:
        result: list[tuple[Candidate, Address]] = []
        server_ip = self.config.addresses[0][0] if self.config.addresses else None
        for mapped in sorted(self.srflx):
            base = next((h for h in sorted(self.host) if (":" in h[0]) == (":" in mapped[0])), None)
            if base is not None and mapped != base:
                # Every relay reports the same mapping: one candidate, whichever relay taught it, so losing one relay
                # never invalidates an address the others still vouch for (peers invalidate by address).
                result.append((Candidate.server_reflexive(mapped, base), base))
        if include_relayed:
            for relayed in sorted(self.relayed):
                base = next((h for h in sorted(self.host) if (":" in h[0]) == (":" in relayed[0])), relayed)
                result.append((Candidate.relayed(relayed, base, server_ip=server_ip), relayed))
        return result


@dataclass(eq=False)
class _Connection:
    id: ConnectionId
    remote_public_key: bytes
    preshared_key: bytes | None
    local_credentials: IceCredentials
    remote_credentials: IceCredentials
    agent: ice.IceAgent
    tunnel: wg.Tunn
    relay_id: RelayId | None
    announced: set[Candidate] = field(default_factory=set)
    remote_candidates: set[Candidate] = field(default_factory=set)
    selected: tuple[Candidate, Candidate] | None = None  # (local base, remote) as ICE selected them last
    # False from IceDisconnected until ICE selects a pair again: ``selected`` then names a pair without consent.
    path_usable: bool = False
    # (local, remote) of the last transport message that authenticated: the gateway answers there while ICE has not
    # selected a pair yet (the controlled side learns the nomination only once its own check on that pair succeeded).
    data_path: tuple[Address, Address] | None = None
    established: bool = False
    pending: deque[bytes] = field(default_factory=deque)
    handshakes: int = 0
    agent_deadline: float | None = None  # the ICE agent's next deadline when it was last asked
    # Whether agent_deadline is what the agent would answer now (it was asked after the last change to the agent),
    # so a timer wake need not ask again before handle_timeout.
    agent_deadline_exact: bool = False
    relay_switch_wanted: bool = False  # ICE found no pair answering: try another relay (after the event loop)
    relay_switched_at: float | None = None
    # The relay used before the last such switch: its relayed candidates stay (the pairs through it keep their
    # consent, and if the relay was fine after all they still work), so a connection has at most two relays' worth.
    previous_relay_id: RelayId | None = None

    @property
    def path(self) -> Path | None:
        if self.selected is None:
            return None
        local, remote = self.selected
        relayed = local.kind is CandidateKind.RELAYED or remote.kind is CandidateKind.RELAYED
        return Path.RELAYED if relayed else Path.DIRECT


class Node:
    """All peer connections and relay allocations of one gateway or client (see the module docstring)."""

    def __init__(
        self,
        role: NodeRole,
        private_key: bytes,
        *,
        rng: Rng,
        wall_clock: WallClock,
        rekey_attempt_time: float = FIREZONE_REKEY_ATTEMPT_TIME,
        handshake_rate_limit: int = HANDSHAKE_RATE_LIMIT,
    ) -> None:
        if len(private_key) != 32:
            raise ValueError("a WireGuard private key has 32 bytes")
        self.role = role
        self.private_key = private_key
        # Loaded once and shared by every tunnel: loading costs about two X25519 exchanges (OpenSSL derives the
        # public key), which was a tenth of the gateway's time when hundreds of connections came at once.
        self._loaded_private_key = load_private_key(private_key)
        self.public_key = public_key(self._loaded_private_key)
        self.drops = DropCounter()
        self._rng = rng
        self._wall_clock = wall_clock
        self._rekey_attempt_time = rekey_attempt_time
        self._connections: dict[ConnectionId, _Connection] = {}
        self._indices = wg.IndexTable(rng)  # receiver index → Tunn, shared so indices never collide
        self._by_tunnel: dict[int, _Connection] = {}  # id(Tunn) → connection
        # Per-packet lookups are O(1) in the number of connections (a datagram anyone can send must not cost a walk
        # over every connection): agents register their transactions and pairs in one shared directory, and the
        # node keeps its own maps by agent, by ufrag pair and by selected pair.
        self._agents = ice.AgentDirectory()
        self._by_agent: dict[ice.IceAgent, _Connection] = {}
        self._by_ufrags: dict[tuple[str, str], list[_Connection]] = {}
        self._by_selected: dict[tuple[Address, Address], _Connection] = {}
        # Each connection's next deadline, refreshed whenever the connection was touched, and a heap over them
        # (stale entries are skipped, and the heap is rebuilt when they pile up): the driver asks poll_timeout after
        # every datagram, so it must not walk every connection's pairs.
        self._deadline_of: dict[ConnectionId, float] = {}
        self._timer_heap: list[tuple[float, ConnectionId]] = []
        # Handshake flood protection shared by all connections (every tunnel answers to our one static key).
        self._cookie_checker = CookieChecker(self.public_key, rng)
        self.handshake_load = wg.HandshakeLoad(handshake_rate_limit)
        self._handshake_rate_limiter = RateLimiter()
        self._relays: dict[RelayId, _Relay] = {}
        self._relay_by_server: dict[Address, RelayId] = {}
        self._relay_by_relayed: dict[Address, RelayId] = {}
        # Relay records that are gone (removed, failed, or all of them after a network change): their candidates stay
        # announced until a live allocation reports replacements (an ICE agent left without pairs fails for good).
        self._retired: list[_Relay] = []
        self._hosts: set[Address] = set()  # our socket addresses, as seen on relay traffic
        self._retired_hosts: set[Address] = set()
        # Host candidates built from the addresses above (rebuilt when they change; see _wanted_candidates).
        self._host_candidates: tuple[frozenset[Address], dict[Candidate, Address]] = (frozenset(), {})
        self._transmits: deque[Transmit | TransmitRun] = deque()
        self._events: deque[NodeEvent] = deque()
        # Monotonic totals for metrics: handshakes, and the WireGuard bytes of connections already closed (the live
        # ones are read from their tunnels at scrape time, so the hot path counts nothing extra).
        self.handshakes_completed = 0
        self._closed_rx_bytes = 0
        self._closed_tx_bytes = 0

    # -- queries -----------------------------------------------------------------------------------------------

    @property
    def connections(self) -> Mapping[ConnectionId, ConnectionInfo]:
        return {cid: self._info(conn) for cid, conn in self._connections.items()}

    def connection(self, connection_id: ConnectionId) -> ConnectionInfo | None:
        conn = self._connections.get(connection_id)
        return None if conn is None else self._info(conn)

    @property
    def local_addresses(self) -> set[Address]:
        """Where this node can send from right now: its host sockets and the relayed addresses of live allocations."""
        return set(self._hosts) | set(self._relay_by_relayed)

    @property
    def relay_ids(self) -> list[RelayId]:
        return list(self._relays)

    def relay_rtt(self, relay_id: RelayId) -> float | None:
        relay = self._relays.get(relay_id)
        return None if relay is None else relay.rtt

    @property
    def relays(self) -> list[RelayInfo]:
        return [
            RelayInfo(
                relay_id,
                relay.allocation.server,
                relay.allocation.state.value,
                relay.rtt,
                tuple(sorted(relay.srflx)),
                tuple(sorted(relay.relayed)),
                relay.allocation.expires_at,
            )
            for relay_id, relay in self._relays.items()
        ]

    def wireguard_bytes(self) -> tuple[int, int]:
        """(received, sent) WireGuard datagram bytes since start, over all connections, closed ones included."""
        rx, tx = self._closed_rx_bytes, self._closed_tx_bytes
        for conn in self._connections.values():
            rx += conn.tunnel.rx_bytes
            tx += conn.tunnel.tx_bytes
        return rx, tx

    def _info(self, conn: _Connection) -> ConnectionInfo:
        return ConnectionInfo(
            conn.id,
            conn.relay_id,
            conn.path,
            None if conn.selected is None else conn.selected[0].address,
            None if conn.selected is None else conn.selected[1].address,
            conn.established,
            conn.handshakes,
            conn.tunnel.has_session,
            rx_bytes=conn.tunnel.rx_bytes,
            tx_bytes=conn.tunnel.tx_bytes,
            last_handshake_wall=conn.tunnel.last_handshake_wall,
        )

    # -- connections ---------------------------------------------------------------------------------------------

    def upsert_connection(
        self,
        connection_id: ConnectionId,
        *,
        remote_public_key: bytes,
        preshared_key: bytes | None,
        local_credentials: IceCredentials,
        remote_credentials: IceCredentials,
        now: float,
    ) -> bool:
        """Creates (or keeps, when nothing changed) the connection; False and a :class:`NoRelays` event if no relay.

        An identical existing connection is reused and all its local candidates are announced again; a different
        one is replaced (closed first).
        """
        existing = self._connections.get(connection_id)
        if existing is not None and (
            existing.remote_public_key == remote_public_key
            and existing.preshared_key == preshared_key
            and existing.local_credentials == local_credentials
            and existing.remote_credentials == remote_credentials
        ):
            for candidate in sorted(existing.announced, key=lambda c: -c.priority):
                self._events.append(CandidateGathered(connection_id, candidate))
            return True
        relay_id = self._sample_relay()
        if relay_id is None:
            self._events.append(NoRelays())
            return False
        if existing is not None:
            self._remove_connection(existing, now, event=ConnectionClosed(connection_id))
        agent = ice.IceAgent(
            controlling=self.role is NodeRole.CLIENT,
            local_ufrag=local_credentials.username,
            local_pwd=local_credentials.password,
            remote_ufrag=remote_credentials.username,
            remote_pwd=remote_credentials.password,
            rng=self._rng,
            timing=CLIENT_PROFILE if self.role is NodeRole.CLIENT else SERVER_PROFILE,
            directory=self._agents,
        )
        tunnel = wg.Tunn(
            self._loaded_private_key,
            remote_public_key,
            preshared_key,
            self._indices,
            self._rng,
            self._wall_clock,
            rekey_attempt_time=self._rekey_attempt_time,
            # §4.2: the gateway only answers the client's handshakes, never initiates (not even from its timers).
            responder_only=self.role is NodeRole.GATEWAY,
        )
        conn = _Connection(
            connection_id,
            remote_public_key,
            preshared_key,
            local_credentials,
            remote_credentials,
            agent,
            tunnel,
            relay_id,
        )
        self._connections[connection_id] = conn
        self._by_tunnel[id(tunnel)] = conn
        self._by_agent[agent] = conn
        self._by_ufrags.setdefault(self._ufrags(conn), []).append(conn)
        self._sync_local_candidates(conn, now)
        self._pump_connection(conn, now)
        return True

    def add_remote_candidate(self, connection_id: ConnectionId, candidate: Candidate | str, now: float) -> None:
        """Adds a trickled remote candidate (SDP strings are parsed; malformed ones are dropped and logged)."""
        conn = self._connections.get(connection_id)
        parsed = self._parse_candidate(candidate)
        if conn is None or parsed is None:
            if conn is None:
                logger.debug("candidate for unknown connection %s", connection_id)
            return
        if parsed in conn.remote_candidates:
            return
        if len(conn.remote_candidates) >= ice.MAX_REMOTE_CANDIDATES:
            self.drops.drop(DropReason.TOO_MANY_CANDIDATES)
            logger.debug("connection %s: candidate %s over the limit, dropped", connection_id, parsed)
            return
        conn.remote_candidates.add(parsed)
        conn.agent.add_remote_candidate(parsed, now)
        self._pump_connection(conn, now)

    def remove_remote_candidate(self, connection_id: ConnectionId, candidate: Candidate | str, now: float) -> None:
        conn = self._connections.get(connection_id)
        parsed = self._parse_candidate(candidate)
        if conn is None or parsed is None:
            return
        conn.remote_candidates.discard(parsed)
        conn.agent.invalidate_remote_candidate(parsed, now)
        self._pump_connection(conn, now)

    @staticmethod
    def _parse_candidate(candidate: Candidate | str) -> Candidate | None:
        if isinstance(candidate, Candidate):
            return candidate
        try:
            return Candidate.from_sdp(candidate)
        except ValueError:
            logger.debug("dropping malformed candidate %r", candidate)
            return None

    def close_connection(self, connection_id: ConnectionId, now: float) -> None:
        conn = self._connections.get(connection_id)
        if conn is None:
            return
        self._remove_connection(conn, now, event=ConnectionClosed(connection_id))

    @staticmethod
    def _ufrags(conn: _Connection) -> tuple[str, str]:
        return (conn.local_credentials.username, conn.remote_credentials.username)

    def _remove_connection(self, conn: _Connection, now: float, *, event: NodeEvent | None) -> None:
        del self._connections[conn.id]
        self._by_tunnel.pop(id(conn.tunnel), None)
        self._by_agent.pop(conn.agent, None)
        ufrags = self._ufrags(conn)
        same_ufrags = self._by_ufrags.get(ufrags, [])
        if conn in same_ufrags:
            same_ufrags.remove(conn)
            if not same_ufrags:
                del self._by_ufrags[ufrags]
        self._forget_selected(conn)
        self._deadline_of.pop(conn.id, None)
        self._closed_rx_bytes += conn.tunnel.rx_bytes
        self._closed_tx_bytes += conn.tunnel.tx_bytes
        conn.agent.close()
        conn.tunnel.close()
        if event is not None:
            self._events.append(event)

    # -- relays ----------------------------------------------------------------------------------------------------

    def update_relays(self, remove: Iterable[RelayId], add: Iterable[RelayConfig], now: float) -> None:
        """Removes relays (their candidates are invalidated, affected connections move to another relay) and
        adds or replaces others (same id with the same credentials and addresses = kept as is)."""
        removed: set[RelayId] = set()
        for relay_id in remove:
            if relay_id in self._relays:
                self._drop_relay(relay_id, now, graceful=True)
                removed.add(relay_id)
        replaced: set[RelayId] = set()
        for config in add:
            current = self._relays.get(config.id)
            if current is None and len(self._relays) >= MAX_RELAYS:
                logger.warning("ignoring relay %s: already %d relays", config.id, MAX_RELAYS)
                continue
            if current is not None:
                if current.config == config:
                    continue
                # Same relay, new credentials or addresses: a fresh allocation; connections keep the relay id and
                # get its new relayed candidates when it answers.
                self._drop_relay(config.id, now, graceful=True)
                replaced.add(config.id)
            self._add_relay(config, now)
        removed -= set(self._relays)  # removed and added again in one update: a replacement, not a loss
        if removed or replaced:
            self._migrate_connections(removed, now)

    def _add_relay(self, config: RelayConfig, now: float) -> None:
        allocation = Allocation(list(config.addresses), config.username, config.password, rng=self._rng, now=now)
        self._relays[config.id] = _Relay(config, allocation)
        for server in config.addresses:
            self._relay_by_server[server] = config.id
        self._pump_relay(config.id, now)

    def _drop_relay(self, relay_id: RelayId, now: float, *, graceful: bool) -> None:
        relay = self._relays.pop(relay_id)
        if graceful:
            relay.allocation.shutdown(now)
            self._drain_allocation_transmits(relay)
        for server in relay.config.addresses:
            if self._relay_by_server.get(server) == relay_id:
                del self._relay_by_server[server]
        for relayed in relay.relayed:
            self._relay_by_relayed.pop(relayed, None)
        # Its server-reflexive candidate describes our socket's NAT mapping, not the relay: keep announcing it until
        # a live relay reports a mapping (usually the very same candidate, so peers see no churn). Withdrawing it at
        # once would make the peer drop a working direct pair and fall back to whatever else still looks usable.
        self._retired = [r for r in self._retired if r.config.id != relay_id] + [relay]

    def _migrate_connections(self, removed: set[RelayId], now: float) -> None:
        """Connections that used a removed relay sample another one; then every connection's candidates are synced
        (replacements are added before the removed relay's candidates are invalidated)."""
        out_of_relays = False
        for conn in list(self._connections.values()):
            if conn.previous_relay_id in removed:
                conn.previous_relay_id = None
            if conn.relay_id in removed:
                conn.relay_id = self._sample_relay()
                out_of_relays |= conn.relay_id is None
        if out_of_relays or not any(r.rtt is not None for r in self._relays.values()):
            self._events.append(NoRelays())
        for conn in list(self._connections.values()):
            if conn.id in self._connections:
                self._sync_local_candidates(conn, now)

    def _sample_relay(self, exclude: RelayId | None = None) -> RelayId | None:
        measured = [
            (relay.rtt, relay_id)
            for relay_id, relay in self._relays.items()
            if relay.rtt is not None and relay_id != exclude
        ]
        if not measured:
            return None
        best = min(rtt for rtt, _ in measured)
        limit = best * RTT_INCLUSION_FACTOR + RTT_INCLUSION_SLACK
        eligible = sorted(relay_id for rtt, relay_id in measured if rtt <= limit)
        return eligible[self._rng.random_u32() % len(eligible)]

    # -- candidates ---------------------------------------------------------------------------------------------

    def _wanted_candidates(self, conn: _Connection) -> dict[Candidate, Address]:
        hosts = self._hosts | self._retired_hosts
        if self._host_candidates[0] != hosts:
            self._host_candidates = (
                frozenset(hosts),
                {Candidate.host(address): address for address in sorted(hosts)},
            )
        wanted = dict(self._host_candidates[1])
        used = (conn.relay_id, conn.previous_relay_id)
        for relay_id, relay in self._relays.items():
            for candidate, base in relay.candidates(include_relayed=relay_id in used):
                wanted.setdefault(candidate, base)
        for relay in self._retired:
            for candidate, base in relay.candidates(include_relayed=relay.config.id == conn.relay_id):
                wanted.setdefault(candidate, base)
        return wanted

    def handle_network_change(self, now: float) -> None:
        """Our addresses changed (roaming): every allocation starts over; connections keep their WireGuard sessions.

        The old candidates stay announced until the new allocations answer, then they are invalidated; ICE moves the
        connections to pairs built from the new candidates.
        """
        self._retired = list(self._relays.values())
        self._retired_hosts, self._hosts = self._hosts, set()
        for relay in self._retired:
            for relayed in relay.relayed:
                self._relay_by_relayed.pop(relayed, None)
        self._relays = {}
        for relay in self._retired:
            self._add_relay(relay.config, now)

    def _sync_local_candidates(self, conn: _Connection, now: float) -> None:
        wanted = self._wanted_candidates(conn)
        # New candidates first: an agent left without any pair, even for a moment, fails for good.
        for candidate in sorted(set(wanted) - conn.announced, key=lambda c: -c.priority):
            conn.announced.add(candidate)
            conn.agent.add_local_candidate(candidate, wanted[candidate], now)
            self._events.append(CandidateGathered(conn.id, candidate))
        for candidate in sorted(conn.announced - set(wanted), key=lambda c: -c.priority):
            conn.announced.discard(candidate)
            conn.agent.remove_local_candidate(candidate, now)
            self._events.append(CandidateInvalidated(conn.id, candidate))
        self._pump_connection(conn, now)

    # -- input ----------------------------------------------------------------------------------------------------

    def handle_input(self, data: bytes, src: Address, local: Address, now: float) -> tuple[ConnectionId, bytes] | None:
        """Feeds one received datagram; returns a decrypted IP packet and the connection it belongs to, if any."""
        if not data:
            self.drops.drop(DropReason.EMPTY)
            return None
        relay_id = self._relay_by_server.get(src) if src[1] == RELAY_PORT else None
        if relay_id is not None:
            return self._handle_relay_input(relay_id, data, src, local, now)
        return self._handle_peer_input(data, src, local, now)

    def handle_input_batch(
        self, datagrams: Sequence[tuple[bytes, Address, Address]], now: float
    ) -> list[tuple[ConnectionId, bytes]]:
        """:meth:`handle_input` for received datagrams (data, source, local address), in order; returns the
        decrypted IP packets with their connections, in order (:meth:`handle_input_runs`, one pair per packet)."""
        return [
            (connection_id, packet)
            for connection_id, packets in self.handle_input_runs(datagrams, now)
            for packet in packets
        ]

    def handle_input_runs(
        self, datagrams: Sequence[tuple[bytes, Address, Address]], now: float
    ) -> list[tuple[ConnectionId, list[bytes]]]:
        """:meth:`handle_input_batch` with the decrypted packets grouped: consecutive packets of one connection
        come as one (connection, packets) run, in order (no tuple per packet on the data path).

        Consecutive WireGuard transport messages with the same receiver index, source and local address (a burst
        from one peer) are decrypted as one run with one connection lookup and one round of connection
        bookkeeping; everything else takes :meth:`handle_input`. The outcome is the same as feeding the datagrams
        one by one (tests/unit/test_node_batch.py checks that).
        """
        runs: list[tuple[ConnectionId, list[bytes]]] = []
        count = len(datagrams)
        position = 0
        while position < count:
            data, src, local = datagrams[position]
            if not self._is_peer_transport(data, src):
                result = self.handle_input(data, src, local, now)
                if result is not None:
                    if runs and runs[-1][0] == result[0]:
                        runs[-1][1].append(result[1])
                    else:
                        runs.append((result[0], [result[1]]))
                position += 1
                continue
            # The run goes on while the type, the zero bytes and the receiver index (the first 8 bytes), the source and
            # the local address stay the same: with the same source, _is_peer_transport only has the size left to ask.
            header = data[:8]
            run = [data]
            end = position + 1
            while end < count:
                next_data, next_src, next_local = datagrams[end]
                if (
                    next_data[:8] != header
                    or len(next_data) < MESSAGE_TRANSPORT_MIN_SIZE
                    or next_src != src
                    or next_local != local
                ):
                    break
                run.append(next_data)
                end += 1
            self._handle_transport_run(int.from_bytes(header[4:8], "little"), run, src, local, now, runs)
            position = end
        return runs

    def _is_peer_transport(self, data: bytes, src: Address) -> bool:
        """A WireGuard transport message straight from a peer: at least the minimum transport size (so never a
        STUN message, whose length field would have to be zero) and not from a relay's server address."""
        return (
            len(data) >= MESSAGE_TRANSPORT_MIN_SIZE
            and data[0] == 4
            and data[1:4] == b"\x00\x00\x00"
            and not (src[1] == RELAY_PORT and src in self._relay_by_server)
        )

    def _handle_transport_run(
        self,
        index: int,
        messages: list[bytes],
        src: Address,
        local: Address,
        now: float,
        runs: list[tuple[ConnectionId, list[bytes]]],
    ) -> None:
        """:meth:`_handle_wireguard` for transport messages that all carry receiver index ``index``; the packets
        are added to ``runs`` (joined to the last run when it is the same connection's)."""
        tunnel = self._indices.get(index)
        conn = None if tunnel is None else self._by_tunnel.get(id(tunnel))
        if conn is None:
            self.drops.drop(DropReason.WIREGUARD_NO_CONNECTION, len(messages))
            return
        tunnel = conn.tunnel
        packets: list[bytes] = []
        # Message by message until one authenticated and the keepalive timer runs: that first message may confirm
        # a keypair, send a keep-key-fresh initiation or staged packets (each stops the keepalive timer), and a run
        # arming that timer would miss the "another keepalive" note a second data message leaves. After that the
        # rest of the run changes the tunnel exactly as the same messages one at a time would.
        timers = tunnel._timers
        start = 0
        total = len(messages)
        while start < total:
            authenticated = tunnel.receive_transport_run(index, messages[start : start + 1], now, packets)
            start += 1
            if authenticated and timers.send_keepalive is not None:
                break
        if start < total:
            tunnel.receive_transport_run(index, messages[start:], now, packets)
        if packets:
            conn.data_path = (local, src)  # authenticated and not a replay: the client is reachable there
        self._flush_tunnel(conn, now, reply_path=(local, src))
        if not packets:
            self._pump_connection(conn, now, agent_touched=False)
            return
        was_idle = conn.agent.idle
        conn.agent.note_activity(now)
        heard = self._note_received(conn, local, src, now)
        self._pump_connection(conn, now, agent_touched=was_idle or heard)
        connection_id = conn.id
        if runs and runs[-1][0] == connection_id:
            runs[-1][1].extend(packets)
        else:
            runs.append((connection_id, packets))

    def _handle_relay_input(
        self, relay_id: RelayId, data: bytes, src: Address, local: Address, now: float
    ) -> tuple[ConnectionId, bytes] | None:
        relay = self._relays[relay_id]
        result = relay.allocation.handle_input(data, src, now)
        relay.allocation_touched()
        if local not in relay.host and local[0] not in ("0.0.0.0", "::"):
            # The socket address our relay traffic arrives on is our host candidate (§4.3); it outlives the relay.
            relay.host.add(local)
            self._hosts.add(local)
            self._relay_candidates_changed(now)
        payload_from_peer = None
        if isinstance(result, turn.Decapsulated):
            relayed = self._relayed_address_for(relay, result.peer)
            if relayed is not None:
                payload_from_peer = (result.payload, result.peer, relayed)
        elif not result:
            self.drops.drop(DropReason.UNKNOWN_RELAY_TRAFFIC)
        self._pump_relay(relay_id, now)
        if payload_from_peer is None:
            return None
        payload, peer, relayed = payload_from_peer
        return self._handle_peer_input(payload, peer, relayed, now)

    @staticmethod
    def _relayed_address_for(relay: _Relay, peer: Address) -> Address | None:
        return relay.relayed_by_family.get(":" in peer[0])

    def _handle_peer_input(
        self, data: bytes, src: Address, local: Address, now: float
    ) -> tuple[ConnectionId, bytes] | None:
        if stun.is_stun(data):
            self._handle_stun(data, src, local, now)
            return None
        if len(data) >= 4 and 1 <= data[0] <= 4 and data[1:4] == b"\x00\x00\x00":
            return self._handle_wireguard(data, src, local, now)
        self.drops.drop(DropReason.UNRECOGNISED)
        return None

    def _handle_stun(self, data: bytes, src: Address, local: Address, now: float) -> None:
        message_class = (data[0] & 0x01) << 1 | (data[1] & 0x10) >> 4
        conn: _Connection | None
        decoded: stun.StunMessage | None = None
        if message_class == _STUN_REQUEST:
            conn, decoded = self._connection_for_request(data)
        else:
            # The transaction id (bytes 8-20 of the header) names the agent that sent the request.
            agent = self._agents.agent_for_transaction(data[8:20])
            conn = None if agent is None else self._by_agent.get(agent)
        if conn is not None and conn.agent.handle_stun(data, src, local, now, decoded):
            self._pump_connection(conn, now)
            return
        if message_class != _STUN_REQUEST and conn is None and self._agents.recently_finished(data[8:20]):
            self.drops.drop(DropReason.STUN_LATE_RESPONSE)
            return
        self.drops.drop(DropReason.STUN_NO_CONNECTION)

    def _connection_for_request(self, data: bytes) -> tuple[_Connection | None, stun.StunMessage | None]:
        """The connection a BINDING request's USERNAME names, and the decoded request (handed on to its agent)."""
        try:
            request = stun.decode(data)
            username = request.username()
        except stun.StunParseError:
            return None, None
        if username is None:
            return None, request
        local_ufrag, _, remote_ufrag = username.partition(":")
        matches = self._by_ufrags.get((local_ufrag, remote_ufrag))
        return (matches[0] if matches else None), request

    def _handle_wireguard(
        self, data: bytes, src: Address, local: Address, now: float
    ) -> tuple[ConnectionId, bytes] | None:
        kind = data[0]
        conn: _Connection | None
        if kind == 1:
            conn = self._connection_by_source(src, local)
        else:
            offset = 8 if kind == 2 else 4
            if len(data) < offset + 4:
                self.drops.drop(DropReason.WIREGUARD_NO_CONNECTION)
                return None
            tunnel = self._indices.get(int.from_bytes(data[offset : offset + 4], "little"))
            conn = None if tunnel is None else self._by_tunnel.get(id(tunnel))
        if conn is None:
            self.drops.drop(DropReason.WIREGUARD_NO_CONNECTION)
            return None
        if kind <= 2 and not self._admit_handshake(data, src, local, now):
            return None
        packet = conn.tunnel.decapsulate(data, now)
        if kind == 4 and packet:
            conn.data_path = (local, src)  # authenticated and not a replay: the client is reachable there
        # A handshake response goes back where the initiation came from, even if ICE has not selected that pair yet
        # (the controlled side learns the nomination a moment after the initiator may already send).
        self._flush_tunnel(conn, now, reply_path=(local, src))
        if not packet:  # handshake, keepalive or dropped (the tunnel counted why)
            self._pump_connection(conn, now, agent_touched=False)
            return None
        was_idle = conn.agent.idle
        conn.agent.note_activity(now)
        heard = self._note_received(conn, local, src, now)
        self._pump_connection(conn, now, agent_touched=was_idle or heard)
        return conn.id, packet

    @staticmethod
    def _note_received(conn: _Connection, local: Address, src: Address, now: float) -> bool:
        """Authenticated data arrived: if on the selected pair, ICE learns that the pair works (which ends its
        dead-path probing). True when the agent must be pumped and asked for its deadline again."""
        selected = conn.selected
        if selected is None or selected[0].address != local or selected[1].address != src:
            return False
        return conn.agent.note_data_received(now)

    def _admit_handshake(self, data: bytes, src: Address, local: Address, now: float) -> bool:
        """Whether an initiation or response may go on to the (costly) Noise handshake: its mac1 must be valid,
        and under load it needs a valid mac2 (else it gets a cookie reply) and passes a per-endpoint rate limit."""
        if len(data) != (MESSAGE_INITIATION_SIZE if data[0] == 1 else MESSAGE_RESPONSE_SIZE):
            self.drops.drop(DropReason.HANDSHAKE_BAD_LENGTH)
            return False
        checker = self._cookie_checker
        if not checker.check_mac1(data):
            self.drops.drop(DropReason.HANDSHAKE_BAD_MAC1)
            return False
        load = self.handshake_load
        load.count(now)
        if not load.under_load(now):
            return True
        if not checker.check_mac2(data, src, now):
            self._send_from(local, src, checker.create_reply(data, src, now), now)
            self.drops.drop(DropReason.COOKIE_REQUIRED)
            return False
        if not self._handshake_rate_limiter.allow(src[0], now, src[1]):  # per endpoint: NATed clients share an IP
            self.drops.drop(DropReason.HANDSHAKE_RATE_LIMITED)
            return False
        return True

    def _connection_by_source(self, src: Address, local: Address) -> _Connection | None:
        """The connection whose ICE agent talks to ``src`` from ``local``: selected pair first, then any pair."""
        selected = self._by_selected.get((local, src))
        if selected is not None:
            return selected
        agents = self._agents.agents_with_pair(local, src)
        # Two connections with a pair to the same remote endpoint would make the source ambiguous: drop instead.
        return self._by_agent.get(agents[0]) if len(agents) == 1 else None

    def _forget_selected(self, conn: _Connection) -> None:
        if conn.selected is not None:
            key = (conn.selected[0].address, conn.selected[1].address)
            if self._by_selected.get(key) is conn:
                del self._by_selected[key]

    # -- output -----------------------------------------------------------------------------------------------------

    def has_session(self, connection_id: ConnectionId) -> bool:
        """Whether the connection has a WireGuard session, e.g. to send a last packet before closing it."""
        conn = self._connections.get(connection_id)
        return conn is not None and conn.tunnel.has_session

    def encapsulate(self, connection_id: ConnectionId, packet: bytes, now: float) -> None:
        """Encrypts an IP packet for the connection; the datagram(s) come out of :meth:`poll_transmit`.

        A client's packets wait in a short queue until the connection has a path (oldest dropped when full). A
        gateway never buffers (docs/protocol.md §3.3): until the client's handshake gave it a session, packets for
        that client are dropped and counted.
        """
        self.encapsulate_batch(connection_id, (packet,), now)

    def encapsulate_batch(self, connection_id: ConnectionId, packets: Sequence[bytes], now: float) -> None:
        """:meth:`encapsulate` for several packets of one connection, in order, with one tunnel call."""
        if not packets:
            return
        conn = self._connections.get(connection_id)
        if conn is None:
            self.drops.drop(DropReason.NO_CONNECTION, len(packets))
            return
        if not self._can_send(conn):
            if self.role is NodeRole.GATEWAY:
                self.drops.drop(DropReason.CONNECTION_NOT_READY, len(packets))
                return
            pending = conn.pending
            for packet in packets:
                if len(pending) >= MAX_PENDING_PACKETS:
                    pending.popleft()
                    self.drops.drop(DropReason.PENDING_QUEUE_FULL)
                pending.append(packet)
            return
        was_idle = conn.agent.idle
        conn.agent.note_activity(now)
        # Arms the controlling agent's dead-path detection (a client sends on its selected pair only; the gateway's
        # controlled agent ignores this).
        if conn.agent.note_data_sent(now):
            # The probe deadline it armed lies at least suspect_after ahead: waking then costs no walk over the pairs
            # now (at worst the wake-up is early and finds nothing due).
            armed_at = now + conn.agent.timing.suspect_after
            if conn.agent_deadline is None or armed_at < conn.agent_deadline:
                conn.agent_deadline = armed_at
            conn.agent_deadline_exact = False
        conn.tunnel.encapsulate_batch(packets, now)
        self._flush_tunnel(conn, now)
        self._refresh_deadline(conn, agent_touched=was_idle)

    def poll_transmit(self) -> Transmit | None:
        """The next datagram to send, one at a time (a :class:`TransmitRun` is handed out datagram by datagram)."""
        transmits = self._transmits
        if not transmits:
            return None
        head = transmits.popleft()
        if isinstance(head, Transmit):
            return head
        dst, src = head.dst, head.src
        transmits.extendleft([Transmit(dst, payload, src) for payload in reversed(head.payloads)])
        return self.poll_transmit()

    def drain_transmits(self) -> list[Transmit | TransmitRun]:
        """Everything :meth:`poll_transmit` would hand out, in order, with sealed batches kept as runs: the data path's
        drivers send a run as GSO batches without a Transmit per datagram."""
        out = list(self._transmits)
        self._transmits.clear()
        return out

    def poll_event(self) -> NodeEvent | None:
        return self._events.popleft() if self._events else None

    def poll_timeout(self) -> float | None:
        """The earliest deadline of every allocation, ICE agent and tunnel (may lie in the past: call now).

        O(relays + log connections): connection deadlines come from the timer heap."""
        earliest = self._earliest_connection_deadline()
        for relay in self._relays.values():
            deadline = relay.deadline()
            if deadline is not None and (earliest is None or deadline < earliest):
                earliest = deadline
        return earliest

    def handle_timeout(self, now: float) -> None:
        for relay_id in list(self._relays):
            relay = self._relays.get(relay_id)
            if relay is None:
                continue
            deadline = relay.deadline()
            if deadline is not None and deadline <= now:
                relay.allocation.handle_timeout(now)
                relay.allocation_touched()
            self._pump_relay(relay_id, now)
        for connection_id in self._pop_due_connections(now):
            conn = self._connections.get(connection_id)
            if conn is None:
                continue
            # The filed agent deadline is never later than the agent's own (see _refresh_deadline): when it lies
            # ahead, the tunnel's timer is what is due and the agent's pairs need no walk; when it is exact, it is
            # the agent's own and needs no asking either.
            filed = conn.agent_deadline
            if filed is None or filed > now:
                deadline = None
            elif conn.agent_deadline_exact:
                deadline = filed
            else:
                deadline = _deadline(conn.agent.poll_timeout())
            if deadline is not None and deadline <= now:
                conn.agent.handle_timeout(now)
            deadline = _deadline(conn.tunnel.poll_timeout())
            if deadline is not None and deadline <= now:
                conn.tunnel.handle_timeout(now)
            self._pump_connection(conn, now)  # also files its next deadline

    # -- connection timers ------------------------------------------------------------------------------------------

    def _refresh_deadline(self, conn: _Connection, *, agent_touched: bool = True) -> None:
        """Files the connection's next deadline. ``agent_touched=False`` (the data path, where only the tunnel and
        the agent's activity time changed) reuses the agent's last deadline: at worst it is early, which costs one
        spurious wake-up, never a missed timer -- and it saves a walk over the agent's pairs per packet."""
        if conn.id not in self._connections:
            return
        if agent_touched:
            conn.agent_deadline = _deadline(conn.agent.poll_timeout())
        conn.agent_deadline_exact = agent_touched
        agent_deadline = conn.agent_deadline
        tunnel_deadline = conn.tunnel.poll_timeout()
        if agent_deadline is None or (tunnel_deadline is not None and tunnel_deadline < agent_deadline):
            agent_deadline = tunnel_deadline
        if agent_deadline is None:
            self._deadline_of.pop(conn.id, None)
            return
        if self._deadline_of.get(conn.id) == agent_deadline:
            return
        self._deadline_of[conn.id] = agent_deadline
        heap = self._timer_heap
        heapq.heappush(heap, (agent_deadline, conn.id))
        if len(heap) > 2 * len(self._deadline_of) + 64:
            self._timer_heap = [(deadline, cid) for cid, deadline in self._deadline_of.items()]
            heapq.heapify(self._timer_heap)

    def _earliest_connection_deadline(self) -> float | None:
        heap = self._timer_heap
        while heap:
            deadline, connection_id = heap[0]
            if self._deadline_of.get(connection_id) == deadline:
                return deadline
            heapq.heappop(heap)  # stale: the connection's deadline moved or it is gone
        return None

    def _pop_due_connections(self, now: float) -> list[ConnectionId]:
        due: list[ConnectionId] = []
        heap = self._timer_heap
        while heap and heap[0][0] <= now:
            deadline, connection_id = heapq.heappop(heap)
            if self._deadline_of.get(connection_id) == deadline:
                del self._deadline_of[connection_id]
                due.append(connection_id)
        return due

    # -- plumbing -------------------------------------------------------------------------------------------------

    def _pump_relay(self, relay_id: RelayId, now: float) -> None:
        relay = self._relays.get(relay_id)
        if relay is None:
            return
        self._drain_allocation_transmits(relay)
        changed = False
        while (event := relay.allocation.poll_event()) is not None:
            if isinstance(event, turn.BindingSucceeded):
                self._retired = []  # a live relay vouches for our mapping now
                if relay.relayed and relay.srflx and event.srflx not in relay.srflx:
                    # Our NAT mapping towards the relay changed (it expired, or the NAT rebooted): the relay keys the
                    # allocation by the old 5-tuple, so it is lost. Start over on this relay.
                    logger.info("relay %s: mapped address changed to %s; allocating again", relay_id, event.srflx)
                    self._drop_relay(relay_id, now, graceful=False)
                    self._add_relay(relay.config, now)
                    self._relays[relay_id].allocation.rtt = event.rtt  # it just answered: still measured
                    self._relay_candidates_changed(now)
                    return
                # One NAT mapping per socket and relay: a new answer replaces the old srflx address.
                changed |= relay.srflx != {event.srflx}
                relay.srflx = {event.srflx}
            elif isinstance(event, turn.AllocationSucceeded):
                for address in relay.relayed:
                    self._relay_by_relayed.pop(address, None)
                relay.set_relayed(event.relay_addresses)
                for address in relay.relayed:
                    self._relay_by_relayed[address] = relay_id
                self._retired = []  # replacements exist now
                self._retired_hosts = set()
                changed = True
            elif isinstance(event, turn.AllocationExpired):
                # The allocation is gone (relay stopped answering, refresh failed, lifetime ran out): its relayed
                # candidates are invalidated and the relay is asked for a fresh one.
                logger.info("relay %s: allocation expired (%s); allocating again", relay_id, event.reason)
                self._drop_relay(relay_id, now, graceful=False)
                self._add_relay(relay.config, now)
                if not event.unanswered:
                    # The relay answered (e.g. 437 after it restarted): only the allocation is being made again, so
                    # it keeps its measured RTT and new connections may still sample it, with host and srflx
                    # candidates now and relayed ones once the allocation succeeds (docs/protocol.md §4.5), instead
                    # of being refused `no_relays` meanwhile. A relay that stopped answering loses it.
                    self._relays[relay_id].allocation.rtt = relay.rtt
                self._relay_candidates_changed(now)
                return
            elif isinstance(event, turn.AllocationFailed):
                logger.warning("relay %s failed: %s", relay_id, event.reason)
                self._drop_relay(relay_id, now, graceful=False)
                self._migrate_connections({relay_id}, now)
                return
        if changed:
            if relay.rtt is not None:
                # Connections that lost their relay while none was measured get this one now.
                for conn in self._connections.values():
                    if conn.relay_id is None:
                        conn.relay_id = self._sample_relay()
            self._relay_candidates_changed(now)

    def _drain_allocation_transmits(self, relay: _Relay) -> None:
        while (transmit := relay.allocation.poll_transmit()) is not None:
            self._transmits.append(transmit)

    def _relay_candidates_changed(self, now: float) -> None:
        for conn in list(self._connections.values()):
            self._sync_local_candidates(conn, now)

    def _pump_connection(self, conn: _Connection, now: float, *, agent_touched: bool = True) -> None:
        """Moves the connection's output and events along, then files its next deadline."""
        self._pump_connection_output(conn, now)
        self._refresh_deadline(conn, agent_touched=agent_touched)

    def _pump_connection_output(self, conn: _Connection, now: float) -> None:
        if conn.id not in self._connections:
            return
        relayed = self._relay_by_relayed
        while (transmit := conn.agent.poll_transmit()) is not None:
            if transmit.src is None or transmit.src not in relayed:
                self._transmits.append(transmit)  # from a host socket: what _send_from would build, as is
            else:
                self._send_from(transmit.src, transmit.dst, transmit.payload, now)
        while (event := conn.agent.poll_event()) is not None:
            self._on_ice_event(conn, event, now)
            if conn.id not in self._connections:
                return
        if conn.relay_switch_wanted:
            conn.relay_switch_wanted = False
            self._switch_relay(conn, now)
        while (tunnel_event := conn.tunnel.poll_event()) is not None:
            if isinstance(tunnel_event, wg.HandshakeCompleted):
                conn.handshakes += 1
                self.handshakes_completed += 1
            elif isinstance(tunnel_event, wg.HandshakeGaveUp):
                self._remove_connection(conn, now, event=ConnectionFailed(conn.id, "wireguard handshake gave up"))
                return
        if conn.pending and self._can_send(conn):
            while conn.pending:
                conn.tunnel.encapsulate(conn.pending.popleft(), now)
        self._flush_tunnel(conn, now)

    def _can_send(self, conn: _Connection) -> bool:
        """Whether packets may go into the tunnel now. The gateway never starts a handshake (§4.2: it only answers
        and sends in response to client traffic; its Tunn is responder-only), so it sends only once the client's
        handshake gave it a session; otherwise both sides would initiate at once and drop each other's handshake."""
        if self.role is NodeRole.GATEWAY:
            return conn.tunnel.has_session and (
                (conn.selected is not None and conn.path_usable) or conn.data_path is not None
            )
        return conn.selected is not None and conn.path_usable

    def _on_ice_event(self, conn: _Connection, event: ice.IceEvent, now: float) -> None:
        if isinstance(event, ice.SelectedPairChanged):
            first = conn.selected is None and not conn.established
            self._forget_selected(conn)
            conn.selected = (event.local, event.remote)
            self._by_selected[(event.local.address, event.remote.address)] = conn
            conn.path_usable = True
            path = conn.path
            assert path is not None
            local, remote = event.local.address, event.remote.address
            if first:
                conn.established = True
                self._events.append(ConnectionEstablished(conn.id, path, local, remote))
                if self.role is NodeRole.CLIENT:
                    # The initiator handshakes as soon as ICE nominated (§4.2); a keepalive starts it.
                    conn.tunnel.send_keepalive(now)
            else:
                self._events.append(ConnectionPathChanged(conn.id, path, local, remote))
        elif isinstance(event, ice.PathsUnanswered):
            held_off = conn.relay_switched_at is not None and now < conn.relay_switched_at + RELAY_SWITCH_HOLDOFF
            conn.relay_switch_wanted = not held_off
        elif isinstance(event, ice.IceFailed):
            self._remove_connection(conn, now, event=ConnectionFailed(conn.id, f"ICE failed: {event.reason}"))
        elif isinstance(event, ice.IceDisconnected):
            # ICE keeps checking and either selects a pair again or fails; data waits for that. Sending on the
            # pair that lost consent would reach nobody (RFC 7675 §5.1 forbids it anyway) and, worse, would make the
            # tunnel count "data sent, nothing received" and start a handshake whose give-up clock
            # (rekey_attempt_time) runs out while there is no path at all.
            logger.debug("connection %s disconnected: %s", conn.id, event.reason)
            conn.path_usable = False

    def _switch_relay(self, conn: _Connection, now: float) -> None:
        """No pair answers any more. If our relay died silently (the peer may even use the same one, so that no
        path is left at all), another relay's candidates give ICE new pairs at once instead of after the relay's
        allocation times out. The old relay's candidates stay: withdrawing them would remove the selected pair
        before its consent ran out. The WireGuard session is untouched."""
        other = self._sample_relay(exclude=conn.relay_id)
        if other is None:
            return
        logger.debug(
            "connection %s: no pair answers; relayed candidates from %s instead of %s", conn.id, other, conn.relay_id
        )
        conn.previous_relay_id, conn.relay_id = conn.relay_id, other
        conn.relay_switched_at = now
        self._sync_local_candidates(conn, now)

    def _flush_tunnel(self, conn: _Connection, now: float, reply_path: tuple[Address, Address] | None = None) -> None:
        datagrams = conn.tunnel.drain_transmits()
        if not datagrams:
            return
        if conn.selected is not None and conn.path_usable:
            local, remote = conn.selected[0].address, conn.selected[1].address
        elif reply_path is not None:
            local, remote = reply_path
        elif self.role is NodeRole.GATEWAY and conn.data_path is not None:
            local, remote = conn.data_path
        else:
            self.drops.drop(DropReason.NO_PATH)
            return
        if local in self._relay_by_relayed:
            for datagram in datagrams:
                self._send_from(local, remote, datagram, now)
            return
        # From a host socket: one run (what _send_from would queue datagram by datagram), joined to the previous run
        # when that goes the same way, so that a burst sealed in several calls still leaves as full GSO batches.
        transmits = self._transmits
        if transmits:
            last = transmits[-1]
            if type(last) is TransmitRun and last.dst == remote and last.src == local:
                last.payloads += datagrams
                return
        transmits.append(TransmitRun(remote, datagrams, local))

    def _send_from(self, local: Address | None, remote: Address, payload: bytes, now: float) -> None:
        relay_id = self._relay_by_relayed.get(local) if local is not None else None
        if relay_id is None:
            self._transmits.append(Transmit(remote, payload, local))
            return
        relay = self._relays[relay_id]
        transmit = relay.allocation.encapsulate(remote, payload, now)
        relay.allocation_touched()
        if transmit is not None:
            self._transmits.append(transmit)
        self._drain_allocation_transmits(relay)


def _deadline(timeout: float | tuple[float, str] | None) -> float | None:
    """Sub-machines answer ``poll_timeout`` with a deadline or (deadline, reason) (design.md §3)."""
    if isinstance(timeout, tuple):
        return timeout[0]
    return timeout
