"""A sans-IO ICE agent (RFC 8445) with consent freshness (RFC 7675), as Firezone's connections need it.

One agent = one data stream, one component, UDP only. The driver (``dataplane/node.py``) feeds it candidates, received
STUN binding messages and time, and pulls datagrams, events and the next deadline.

Decisions worth knowing:

* Checks: every pair starts Waiting (no frozen state: one component, few pairs). One new check per ``Ta`` (50 ms),
  triggered checks first, then the highest-priority Waiting pair. Retransmits follow the timing profile's ladder
  (:mod:`dataplane.ice.timing`) through :class:`dataplane.stun.Transaction`.
* Nomination (controlling side): *regular* nomination. As soon as a pair succeeds it is nominated with a separate
  check carrying USE-CANDIDATE (no waiting for better pairs, so setup is one round trip longer than aggressive
  nomination but never nominates a pair the peer cannot reach); when a higher-priority pair succeeds later, it is
  nominated too and becomes the selected pair (re-nomination, as str0m/Firezone do). The controlled side accepts
  nominations (RFC 8445 §7.3.1.5: on a succeeded pair at once, otherwise when its triggered check succeeds) and
  uses the working pair the peer nominated *last*: pair priorities are not comparable across the two sides (a
  server-reflexive candidate is paired as its base, so each side ranks relayed pairs differently), so only the
  controlling side's latest choice says which pair it uses. Retransmitted nominations can arrive out of order, so
  the controlling side re-asserts its choice: consent checks on its selected pair carry USE-CANDIDATE, and a stale
  nomination is corrected within one consent interval. On the controlled side a nomination outlives a consent loss
  or a failed check, so once that pair works again the controlled side returns to it even if the controlling side
  never left it. This also works with aggressive nominators (aioice).
* Consent (RFC 7675) runs on every succeeded pair, so a fallback is always fresh: a binding request every
  ``consent_interval`` × U(0.8, 1.2) (not retransmitted); ``consent_timeout`` after its last response a pair loses
  consent. A non-selected pair then simply fails; for the selected pair the agent falls back to the best other
  working pair (:class:`SelectedPairChanged`, the controlling side nominates it), or reports
  :class:`IceDisconnected` and re-checks every pair with the full ladder, so a short outage heals.
  :class:`IceFailed` once every pair has failed (or none is left); Failed is terminal. The node's "2 s grace before
  acting on a disconnect" and "10 s for a first remote candidate" rules stay in the node.
* Dead paths (controlling side): RFC 7675's 30 s say when a peer must *stop* sending, not when it may move. The
  driver reports data sent and authenticated data received on the selected pair (:meth:`IceAgent.note_data_sent`,
  :meth:`IceAgent.note_data_received`); once the selected pair has been silent for ``suspect_after`` (1 s) after
  something was sent on it (data or a consent check), every succeeded pair is probed with a fast ladder (given up
  after 1 s). If the selected pair stays silent while another answers, earlier nominations are void and the best
  answering pair is nominated (the controlled side follows the latest nomination, so a pair we return to is nominated
  afresh); if none answers, :class:`PathsUnanswered` lets the driver offer other candidates. Rounds repeat while the
  silence lasts, backing off to ``consent_interval``. The controlled side never probes.
* Idle: after ``idle_after`` seconds without :meth:`IceAgent.note_activity` new checks use the idle ladder
  (Firezone's idle profile); activity switches back. Consent timing is not affected by idleness.
* Garbage never raises: unparsable or unauthenticated messages are counted in :attr:`IceAgent.drops`.
"""

from __future__ import annotations

import enum
import logging
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from dataplane import stun
from dataplane.base import Address, DropCounter, Rng, Transmit
from dataplane.ice.candidate import (
    MAX_LOCAL_PREFERENCE,
    Candidate,
    CandidateKind,
    compute_foundation,
    compute_priority,
    is_ipv4,
)
from dataplane.ice.timing import CLIENT_PROFILE, SERVER_PROFILE, IceTimingProfile, StunTiming

logger = logging.getLogger(__name__)

MAX_PAIRS = 100  # RFC 8445 §6.1.2.5 recommended check list limit
# Bounds on what the peer can make an agent store (and so on the work its candidates cause). A Firezone peer signals
# a handful of candidates (host per interface and family, srflx, two relayed); each kind of remote input has its own
# budget so that learned or synthesized candidates never crowd out signalled ones.
MAX_REMOTE_CANDIDATES = 64  # signalled by the peer
MAX_PEER_REFLEXIVE_CANDIDATES = 16  # remote ones learned from the sources of checks
MAX_OPTIMISTIC_CANDIDATES = 16  # synthesized srflx IP × host port
MAX_LEARNED_LOCAL_CANDIDATES = 16  # our own, learned from XOR-MAPPED-ADDRESS in responses
_ROLE_CONFLICT = 487


class DropReason(enum.Enum):
    MALFORMED = "malformed"
    BAD_INTEGRITY = "bad_integrity"
    MISSING_PRIORITY = "missing_priority"
    UNKNOWN_ATTRIBUTE = "unknown_attribute"
    ASYMMETRIC_RESPONSE = "asymmetric_response"
    AGENT_FAILED = "agent_failed"
    TOO_MANY_PAIRS = "too_many_pairs"
    TOO_MANY_CANDIDATES = "too_many_candidates"


class IceState(enum.Enum):
    NEW = "new"
    CHECKING = "checking"
    CONNECTED = "connected"
    DISCONNECTED = "disconnected"
    FAILED = "failed"


class PairState(enum.Enum):
    WAITING = "waiting"
    IN_PROGRESS = "in-progress"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


# For the loops over pairs that run on every datagram and timer: reading a member off an Enum class goes through the
# metaclass's __getattr__ hook (Python 3.11), several times the cost of a global.
_WAITING = PairState.WAITING
_SUCCEEDED = PairState.SUCCEEDED
_FAILED = PairState.FAILED
_AGENT_FAILED = IceState.FAILED
_RETRANSMIT = stun.TransactionStep.RETRANSMIT
_GAVE_UP = stun.TransactionStep.GAVE_UP


# ---- events ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IceConnected:
    """A pair was selected (first time, or again after :class:`IceDisconnected`)."""

    local: Candidate
    remote: Candidate


@dataclass(frozen=True, slots=True)
class SelectedPairChanged:
    """Data must now go from ``local`` (its address is :attr:`Transmit.src`: host socket or relay) to ``remote``."""

    local: Candidate
    remote: Candidate


@dataclass(frozen=True, slots=True)
class IceDisconnected:
    """The selected pair lost consent (or a candidate) and no other pair is known to work; checks continue."""

    reason: str


@dataclass(frozen=True, slots=True)
class PathsUnanswered:
    """Controlling side: the selected pair and every other succeeded pair left a probe round unanswered. Consent
    still runs (the 30 s rule decides when to stop sending); the driver may offer other candidates meanwhile (e.g.
    another relay's)."""


@dataclass(frozen=True, slots=True)
class IceFailed:
    """Every pair failed; the agent stays failed."""

    reason: str


@dataclass(frozen=True, slots=True)
class RoleChanged:
    """A role conflict (RFC 8445 §7.3.1.1, §7.2.5.1) switched this agent's role."""

    controlling: bool


@dataclass(frozen=True, slots=True)
class PeerReflexiveCandidateLearned:
    """A candidate discovered from a check: ``local`` = from XOR-MAPPED-ADDRESS, else from a request's source."""

    candidate: Candidate
    local: bool


IceEvent = (
    IceConnected
    | SelectedPairChanged
    | IceDisconnected
    | IceFailed
    | RoleChanged
    | PeerReflexiveCandidateLearned
    | PathsUnanswered
)


# ---- check list ------------------------------------------------------------------------------------------------


class _Purpose(enum.Enum):
    CHECK = "check"
    NOMINATION = "nomination"
    CONSENT = "consent"
    PROBE = "probe"  # a fast check of a succeeded pair while the selected pair is silent (controlling side)


_RETRANSMIT_REASONS = {purpose: f"{purpose.value} retransmit" for purpose in _Purpose}


@dataclass(eq=False, slots=True)
class _Outstanding:
    transaction: stun.Transaction
    pair: CandidatePair
    purpose: _Purpose
    sent_controlling: bool
    retransmit_reason: str  # poll_timeout's reason when this transaction's retransmit is the earliest deadline


@dataclass(eq=False, slots=True)
class CandidatePair:
    """One entry of the check list. ``local`` is a base: a host candidate or a relayed candidate."""

    local: Candidate
    remote: Candidate
    priority: int
    state: PairState = PairState.WAITING
    nominated: bool = False
    nominated_at: float = 0.0  # controlled side: when the peer's USE-CANDIDATE for this pair last arrived
    remote_nominated: bool = False
    last_response_at: float | None = None
    next_consent_at: float | None = None
    # A probe went unanswered and nothing was heard on the pair since: not chosen while a responsive pair exists
    # (consent, and so the 30 s rule, is unaffected).
    unresponsive: bool = False
    outstanding: list[_Outstanding] = field(default_factory=list)

    @property
    def key(self) -> tuple[Address, Address]:
        return (self.local.address, self.remote.address)

    def __repr__(self) -> str:
        return (
            f"CandidatePair({self.local.kind.value} {self.local.address} -> {self.remote.kind.value} "
            f"{self.remote.address}, {self.state.value}{', nominated' if self.nominated else ''})"
        )


def pair_priority(controlling_priority: int, controlled_priority: int) -> int:
    """RFC 8445 §6.1.2.3: ``2^32*MIN(G,D) + 2*MAX(G,D) + (G>D?1:0)``."""
    g, d = controlling_priority, controlled_priority
    return (min(g, d) << 32) + 2 * max(g, d) + (1 if g > d else 0)


def _same_family(a: Address, b: Address) -> bool:
    return is_ipv4(a) == is_ipv4(b)


# Finished transaction ids a node remembers to tell a late duplicate answer from foreign STUN (a few seconds' worth of
# checks at 1,000 connections).
FINISHED_TRANSACTIONS_KEPT = 4096


# ---- the directory shared by a node's agents ---------------------------------------------------------------------


class AgentDirectory:
    """Which agent owns a STUN transaction and which agents hold a pair: shared by all agents of one node.

    The node demultiplexes every received datagram; walking its agents for that would cost O(connections) per packet
    (and an attacker picks the packets). Agents keep this directory up to date as they send checks and add or remove
    pairs, so each lookup is one dict access.
    """

    __slots__ = ("_finished", "_pairs", "_transactions")

    def __init__(self) -> None:
        self._transactions: dict[bytes, IceAgent] = {}
        self._pairs: dict[tuple[Address, Address], list[IceAgent]] = {}
        # Transactions no agent waits for any more (answered, given up, pair gone), newest last: a retransmitted
        # check can be answered twice, and the second answer is then expected, not foreign traffic. An OrderedDict:
        # a plain dict's oldest key, once many were deleted from the front, takes a scan over the holes to find.
        self._finished: OrderedDict[bytes, None] = OrderedDict()

    def agent_for_transaction(self, transaction_id: bytes) -> IceAgent | None:
        return self._transactions.get(transaction_id)

    def recently_finished(self, transaction_id: bytes) -> bool:
        """Whether an agent of this node sent ``transaction_id`` and stopped waiting for it (one of the last
        ``FINISHED_TRANSACTIONS_KEPT``)."""
        return transaction_id in self._finished

    def agents_with_pair(self, local: Address, remote: Address) -> list[IceAgent]:
        """The agents whose check list holds ``local`` → ``remote`` (usually zero or one); do not modify."""
        return self._pairs.get((local, remote), _NO_AGENTS)

    def __len__(self) -> int:
        """Entries held (transactions + pair keys): bounded by the agents' own limits."""
        return len(self._transactions) + len(self._pairs)

    def _add_transaction(self, transaction_id: bytes, agent: IceAgent) -> None:
        self._transactions[transaction_id] = agent

    def _remove_transaction(self, transaction_id: bytes, agent: IceAgent) -> None:
        if self._transactions.get(transaction_id) is agent:
            del self._transactions[transaction_id]
            finished = self._finished
            finished[transaction_id] = None
            if len(finished) > FINISHED_TRANSACTIONS_KEPT:
                finished.popitem(last=False)

    def _add_pair(self, key: tuple[Address, Address], agent: IceAgent) -> None:
        agents = self._pairs.get(key)
        if agents is None:
            self._pairs[key] = [agent]
        elif agent not in agents:
            agents.append(agent)

    def _remove_pair(self, key: tuple[Address, Address], agent: IceAgent) -> None:
        agents = self._pairs.get(key)
        if agents is not None and agent in agents:
            agents.remove(agent)
            if not agents:
                del self._pairs[key]


_NO_AGENTS: list[IceAgent] = []


# ---- the agent -------------------------------------------------------------------------------------------------


class IceAgent:
    """One ICE session. Gateway: ``controlling=False`` (server profile); lab client: ``controlling=True``."""

    def __init__(
        self,
        controlling: bool,
        local_ufrag: str,
        local_pwd: str,
        remote_ufrag: str,
        remote_pwd: str,
        rng: Rng,
        *,
        timing: IceTimingProfile | None = None,
        optimistic_candidates: bool = True,
        directory: AgentDirectory | None = None,
    ) -> None:
        if not (local_ufrag and local_pwd and remote_ufrag and remote_pwd):
            raise ValueError("ICE credentials must not be empty")
        self.controlling = controlling
        self.local_ufrag = local_ufrag
        self.local_pwd = local_pwd
        self.remote_ufrag = remote_ufrag
        self.remote_pwd = remote_pwd
        self.timing = timing if timing is not None else (CLIENT_PROFILE if controlling else SERVER_PROFILE)
        self.optimistic_candidates = optimistic_candidates
        self.tie_breaker = rng.random_u64()
        self.drops = DropCounter()
        self.state = IceState.NEW
        self.idle = False

        self._rng = rng
        # Private when not given: the agent's bookkeeping is the same either way.
        self._directory = directory if directory is not None else AgentDirectory()
        self._local_key = stun.short_term_key(local_pwd)
        self._remote_key = stun.short_term_key(remote_pwd)
        self._expected_username = f"{local_ufrag}:{remote_ufrag}"
        self._outgoing_username = f"{remote_ufrag}:{local_ufrag}"

        self._local_candidates: dict[Address, tuple[Candidate, Address]] = {}
        self._bases: dict[Address, Candidate] = {}
        self._remote_candidates: dict[Address, Candidate] = {}
        self._optimistic_sources: dict[Address, tuple[Address, Address]] = {}  # synthesized -> (host, srflx)
        self._peer_reflexive: set[Address] = set()  # remote candidates learned from checks, not (yet) signalled
        self._learned_local: set[Address] = set()  # our peer-reflexive candidates learned from responses
        self._pairs: dict[tuple[Address, Address], CandidatePair] = {}
        self._had_pairs = False
        self._triggered: deque[CandidatePair] = deque()
        self._outstanding: dict[bytes, _Outstanding] = {}
        self._selected: CandidatePair | None = None
        self._next_check_at: float | None = None
        self._last_now: float | None = None
        self._last_activity: float | None = None
        # Controlling side's dead-path detection (see IceTimingProfile.suspect_after): when something was first sent
        # on the selected pair without anything heard on it since, and when the next probe round may start.
        self._silent_since: float | None = None
        self._probe_hold_until = 0.0
        self._probe_backoff = self.timing.suspect_after
        # One transmission per consent check; the next check comes on its own schedule (RFC 7675 §5.1).
        self._consent_policy = stun.RetransmitPolicy(initial_rto=self.timing.consent_timeout, max_transmissions=1)

        self._transmits: deque[Transmit] = deque()
        self._events: deque[IceEvent] = deque()

    # ---- inspection ----------------------------------------------------------------------------------------------

    @property
    def selected_pair(self) -> tuple[Candidate, Candidate] | None:
        """(local base, remote) of the pair data should use, or None."""
        if self._selected is None:
            return None
        return (self._selected.local, self._selected.remote)

    @property
    def local_candidates(self) -> list[Candidate]:
        """Every local candidate, highest priority first (the order to announce them in)."""
        return sorted((c for c, _ in self._local_candidates.values()), key=lambda c: -c.priority)

    @property
    def remote_candidates(self) -> list[Candidate]:
        return sorted(self._remote_candidates.values(), key=lambda c: -c.priority)

    @property
    def pairs(self) -> list[CandidatePair]:
        """The check list, highest pair priority first."""
        return sorted(self._pairs.values(), key=lambda p: -p.priority)

    def has_pair(self, local: Address, remote: Address) -> bool:
        """O(1): does the check list hold the pair ``local`` → ``remote`` (for demultiplexing in the node)?"""
        return (local, remote) in self._pairs

    @property
    def failed(self) -> bool:
        return self.state is IceState.FAILED

    @property
    def current_timing(self) -> StunTiming:
        return self.timing.idle if self.idle else self.timing.active

    # ---- candidates ----------------------------------------------------------------------------------------------

    def add_local_candidate(self, candidate: Candidate, base: Address, now: float) -> None:
        """Adds a local candidate. Host and relayed candidates are their own base and get pairs; server-reflexive
        ones (base = the host socket) are only remembered for announcing, as RFC 8445 §6.1.2.4 prunes their pairs."""
        self._tick(now)
        if self.state is IceState.FAILED:
            return
        if candidate.kind in (CandidateKind.HOST, CandidateKind.RELAYED):
            self._local_candidates[candidate.address] = (candidate, candidate.address)
            if candidate.address in self._bases:
                return
            self._bases[candidate.address] = candidate
            for remote in list(self._remote_candidates.values()):
                self._add_pair(candidate, remote)
        else:
            self._local_candidates.setdefault(candidate.address, (candidate, base))

    def remove_local_candidate(self, candidate: Candidate, now: float) -> None:
        self._tick(now)
        self._local_candidates.pop(candidate.address, None)
        if self._bases.pop(candidate.address, None) is None:
            return
        for address, (_, base) in list(self._local_candidates.items()):
            if base == candidate.address:
                del self._local_candidates[address]  # reflexive candidates learned through this base
                self._learned_local.discard(address)
        for pair in [p for p in self._pairs.values() if p.local.address == candidate.address]:
            self._remove_pair(pair, now, "local candidate removed")
        self._check_failed(now)

    def add_remote_candidate(self, candidate: Candidate, now: float) -> None:
        self._tick(now)
        if self.state is IceState.FAILED or candidate.component != 1:
            return
        existing = self._remote_candidates.get(candidate.address)
        if existing is not None:
            learned = existing.kind is CandidateKind.PEER_REFLEXIVE or candidate.address in self._optimistic_sources
            if learned and candidate.kind is not CandidateKind.PEER_REFLEXIVE:
                # The signalled candidate replaces what we learned or synthesized (RFC 8445 §7.3.1.3).
                self._optimistic_sources.pop(candidate.address, None)
                self._peer_reflexive.discard(candidate.address)
                self._replace_remote(candidate)
            return
        signalled = len(self._remote_candidates) - len(self._peer_reflexive) - len(self._optimistic_sources)
        if signalled >= MAX_REMOTE_CANDIDATES:
            self.drops.drop(DropReason.TOO_MANY_CANDIDATES)
            return
        self._remote_candidates[candidate.address] = candidate
        for base in list(self._bases.values()):
            self._add_pair(base, candidate)
        if self.optimistic_candidates:
            self._synthesize_optimistic(candidate)

    def invalidate_remote_candidate(self, candidate: Candidate, now: float) -> None:
        """Forgets a remote candidate and its pairs (and optimistic candidates derived from it)."""
        self._tick(now)
        doomed = {candidate.address}
        doomed.update(
            synthesized
            for synthesized, sources in self._optimistic_sources.items()
            if candidate.address in sources and synthesized in self._remote_candidates
        )
        for address in doomed:
            self._optimistic_sources.pop(address, None)
            self._peer_reflexive.discard(address)
            if self._remote_candidates.pop(address, None) is None:
                continue
            for pair in [p for p in self._pairs.values() if p.remote.address == address]:
                self._remove_pair(pair, now, "remote candidate invalidated")
        self._check_failed(now)

    def note_activity(self, now: float) -> None:
        """The connection carried data: stay on (or return to) the active timing profile."""
        self._tick(now)
        self._last_activity = now
        self.idle = False

    def note_data_sent(self, now: float) -> bool:
        """Data went out on the selected pair. Returns True when that armed the silence clock: the controlling side
        starts probing if nothing is heard on the pair within ``timing.suspect_after`` (a deadline no earlier than
        ``now + timing.suspect_after``)."""
        if not self.controlling or self._selected is None or self._silent_since is not None:
            return False
        self._silent_since = now
        return True

    def note_data_received(self, now: float) -> bool:
        """Authenticated data (decrypted, not a replay) arrived on the selected pair: the pair works. Returns True
        when that may have queued a transmit or armed a timer (a pair back from silence is nominated again); a
        stopped silence clock alone only moves the next deadline later, which a caller may learn lazily."""
        selected = self._selected
        if selected is None or (self._silent_since is None and not selected.unresponsive):
            return False
        was_unresponsive = selected.unresponsive
        self._heard_on_selected(selected, now)
        return was_unresponsive

    # ---- input ---------------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Withdraws this agent's transactions and pairs from the shared directory (the agent is being discarded)."""
        for transaction_id in self._outstanding:
            self._directory._remove_transaction(transaction_id, self)
        for key in self._pairs:
            self._directory._remove_pair(key, self)
        self._outstanding.clear()

    def handle_stun(
        self, data: bytes, src: Address, local: Address, now: float, decoded: stun.StunMessage | None = None
    ) -> bool:
        """Handles a STUN message received on ``local`` (host socket or relay address) from ``src``.

        Returns True when the message belonged to this agent (even if it was then dropped), False when it is not
        ours (another transaction, another agent's username, not a binding message) so the caller can route it on.
        ``decoded``: ``stun.decode(data)`` when the caller already has it (the Node decodes a request to find the
        agent by its USERNAME), so it is not decoded twice.
        """
        self._tick(now)
        try:
            if decoded is None:
                if not stun.is_stun(data):
                    return False
                decoded = stun.decode(data)
            message = decoded  # decoded from data, so data passed is_stun's shape checks too
            if message.method != stun.Method.BINDING:
                return False
            if message.is_request:
                return self._on_request(data, message, src, local, now)
            if message.is_response:
                return self._on_response(data, message, src, local, now)
            return False
        except stun.StunParseError as exc:
            logger.debug("dropping malformed STUN from %s: %s", src, exc)
            self.drops.drop(DropReason.MALFORMED)
            return False

    def _on_request(self, data: bytes, request: stun.StunMessage, src: Address, local: Address, now: float) -> bool:
        if request.username() != self._expected_username:
            return False
        if not stun.check_integrity(data, self._local_key):
            self.drops.drop(DropReason.BAD_INTEGRITY)
            return True
        if self.state is IceState.FAILED:
            self.drops.drop(DropReason.AGENT_FAILED)
            return True
        rejection = stun.unknown_attribute_response(request)
        if rejection is not None:
            self.drops.drop(DropReason.UNKNOWN_ATTRIBUTE)
            self._respond(rejection, src, local)
            return True
        priority = request.priority()
        if priority is None:
            self.drops.drop(DropReason.MISSING_PRIORITY)
            self._respond(request.error_response(stun.ErrorCode.BAD_REQUEST, "Bad Request"), src, local)
            return True

        # RFC 8445 §7.3.1.1
        their_controlling = request.ice_controlling()
        their_controlled = request.ice_controlled()
        if self.controlling and their_controlling is not None:
            if self.tie_breaker >= their_controlling:
                self._respond(request.error_response(_ROLE_CONFLICT, "Role Conflict"), src, local)
                return True
            self._switch_role(False)
        elif not self.controlling and their_controlled is not None:
            if self.tie_breaker >= their_controlled:
                self._switch_role(True)
            else:
                self._respond(request.error_response(_ROLE_CONFLICT, "Role Conflict"), src, local)
                return True

        self._respond(request.success_response().add_xor_address(stun.Attr.XOR_MAPPED_ADDRESS, src), src, local)

        base = self._bases.get(local)
        if base is None or not _same_family(local, src):
            logger.debug("check from %s on %s, which is not a local base; answered only", src, local)
            return True
        remote = self._remote_candidates.get(src)
        pair = self._pairs.get((local, src))
        if pair is None and len(self._pairs) >= MAX_PAIRS:
            # Checked before storing anything: a candidate without a pair would be kept for nothing.
            self.drops.drop(DropReason.TOO_MANY_PAIRS)
            return True
        if remote is None:
            if len(self._peer_reflexive) >= MAX_PEER_REFLEXIVE_CANDIDATES:
                self.drops.drop(DropReason.TOO_MANY_CANDIDATES)
                return True
            remote = Candidate(
                foundation=compute_foundation(CandidateKind.PEER_REFLEXIVE, src[0]),
                component=1,
                transport="udp",
                priority=priority,
                address=src,
                kind=CandidateKind.PEER_REFLEXIVE,
            )
            self._remote_candidates[src] = remote
            self._peer_reflexive.add(src)
            self._events.append(PeerReflexiveCandidateLearned(remote, local=False))
        pair = pair or self._add_pair(base, remote)
        if pair is None:
            return True
        nominate = request.use_candidate() and not self.controlling
        if nominate:
            pair.remote_nominated = True
            pair.nominated_at = now
        if pair.state is PairState.SUCCEEDED:
            if nominate:
                self._on_nominated(pair, now)
        elif pair.state is not PairState.IN_PROGRESS:
            self._trigger(pair)
        return True

    def _on_response(self, data: bytes, response: stun.StunMessage, src: Address, local: Address, now: float) -> bool:
        outstanding = self._outstanding.get(response.transaction_id)
        if outstanding is None:
            return False
        if not stun.check_integrity(data, self._remote_key):
            self.drops.drop(DropReason.BAD_INTEGRITY)
            return True
        self._finish(outstanding, now)
        pair = outstanding.pair
        if self._pairs.get(pair.key) is not pair or self.state is IceState.FAILED:
            return True

        if response.message_class == stun.MessageClass.ERROR:
            error = response.error_code()
            role_conflict = error is not None and error[0] == _ROLE_CONFLICT
            if role_conflict and outstanding.purpose in (_Purpose.CONSENT, _Purpose.PROBE):
                return True  # the next check or the peer's own request settles the roles
            if role_conflict:
                if outstanding.sent_controlling == self.controlling:
                    self._switch_role(not self.controlling)
                if pair.state is PairState.SUCCEEDED:
                    self._update_selection(now)  # a nomination refused: whoever controls now nominates
                else:
                    pair.state = PairState.WAITING
                    self._trigger(pair)
            else:
                logger.debug("check on %r answered with error %s", pair, error)
                self._fail_pair(pair, now, f"error response {error}")
            return True

        if src != pair.remote.address or local != pair.local.address:
            self.drops.drop(DropReason.ASYMMETRIC_RESPONSE)
            self._fail_pair(pair, now, "response from an unexpected address")
            return True

        mapped = response.xor_address(stun.Attr.XOR_MAPPED_ADDRESS)
        if (
            mapped is not None
            and pair.local.kind is CandidateKind.HOST
            and mapped not in self._local_candidates
            and _same_family(mapped, pair.local.address)
        ):
            if len(self._learned_local) >= MAX_LEARNED_LOCAL_CANDIDATES:
                self.drops.drop(DropReason.TOO_MANY_CANDIDATES)
            else:
                self._learn_local(mapped, pair)

        if pair.state is not PairState.SUCCEEDED:
            pair.state = PairState.SUCCEEDED
            pair.next_consent_at = now + self._consent_interval()
        pair.last_response_at = now
        if pair is self._selected:
            self._heard_on_selected(pair, now)
        pair.unresponsive = False
        nominated_by_peer = outstanding.purpose is _Purpose.CHECK and pair.remote_nominated and not self.controlling
        if outstanding.purpose is _Purpose.NOMINATION or nominated_by_peer:
            pair.remote_nominated = False
            self._on_nominated(pair, now)
        else:
            self._update_selection(now)
        return True

    def _learn_local(self, mapped: Address, pair: CandidatePair) -> None:
        learned = Candidate.peer_reflexive(mapped, pair.local.address, priority=self._prflx_priority(pair.local))
        self._local_candidates[mapped] = (learned, pair.local.address)
        self._learned_local.add(mapped)
        self._events.append(PeerReflexiveCandidateLearned(learned, local=True))

    # ---- timers --------------------------------------------------------------------------------------------------

    def handle_timeout(self, now: float) -> None:
        self._tick(now)
        if self.state is _AGENT_FAILED:
            return
        if not self.idle and self._last_activity is not None and now >= self._last_activity + self.timing.idle_after:
            self.idle = True

        unanswered_probes: list[CandidatePair] = []
        for outstanding in list(self._outstanding.values()):
            step = outstanding.transaction.handle_timeout(now)
            if step is _RETRANSMIT:
                transaction = outstanding.transaction
                self._transmits.append(
                    Transmit(transaction.destination, transaction.payload, outstanding.pair.local.address)
                )
            elif step is _GAVE_UP:
                self._finish(outstanding, now)
                current = self._pairs.get(outstanding.pair.key) is outstanding.pair
                if outstanding.purpose is _Purpose.PROBE:
                    if current:
                        unanswered_probes.append(outstanding.pair)
                elif outstanding.purpose is not _Purpose.CONSENT and current:
                    self._fail_pair(outstanding.pair, now, "no response")
                if self.failed:
                    return
        if unanswered_probes:
            # A round's probes all give up together: mark every silent pair before choosing among the others.
            self._probes_unanswered(unanswered_probes, now)

        for pair in [p for p in self._pairs.values() if p.state is _SUCCEEDED]:
            if pair.state is not _SUCCEEDED or self._pairs.get(pair.key) is not pair:
                continue  # changed by an earlier iteration
            assert pair.last_response_at is not None and pair.next_consent_at is not None
            if now >= pair.last_response_at + self.timing.consent_timeout:
                self._consent_lost(pair, now)
            elif now >= pair.next_consent_at:
                self._send_request(pair, _Purpose.CONSENT, now)
                pair.next_consent_at = now + self._consent_interval()

        probe_at = self._probe_due_at()
        if probe_at is not None and now >= probe_at:
            self._start_probe_round(now)

        if self._next_check_at is None or now >= self._next_check_at:
            next_pair = self._next_pair_to_check()
            if next_pair is not None:
                self._send_request(next_pair, _Purpose.CHECK, now)
                self._next_check_at = now + self.timing.pacing_interval
        self._check_failed(now)

    def poll_timeout(self) -> tuple[float, str] | None:
        """(deadline, reason) of the earliest timer, or None; a deadline may lie in the past (then call now)."""
        if self.state is _AGENT_FAILED:
            return None
        # The node asks after every datagram of this connection: one pass over the transactions and one over the
        # pairs, no (deadline, reason) tuple per item. On ties the earlier kind wins: retransmit, connectivity check,
        # consent expiry/check, path probe, idle.
        best: float | None = None
        reason = ""
        earliest: _Outstanding | None = None
        for outstanding in self._outstanding.values():
            deadline = outstanding.transaction.poll_timeout()
            if deadline is not None and (best is None or deadline < best):
                best, earliest = deadline, outstanding
        if earliest is not None:
            reason = earliest.retransmit_reason
        checks_to_start = bool(self._triggered)
        consent: float | None = None
        consent_reason = ""
        consent_timeout = self.timing.consent_timeout
        for pair in self._pairs.values():
            state = pair.state
            if state is _WAITING:
                checks_to_start = True
            elif state is _SUCCEEDED and pair.last_response_at is not None:
                expiry = pair.last_response_at + consent_timeout
                if consent is None or expiry < consent:
                    consent, consent_reason = expiry, "consent expiry"
                check = pair.next_consent_at
                if check is not None and check < consent:
                    consent, consent_reason = check, "consent check"
        if checks_to_start:
            start = self._next_check_at if self._next_check_at is not None else self._last_now
            start = start if start is not None else 0.0
            if best is None or start < best:
                best, reason = start, "connectivity check"
        if consent is not None and (best is None or consent < best):
            best, reason = consent, consent_reason
        probe_at = self._probe_due_at()
        if probe_at is not None and (best is None or probe_at < best):
            best, reason = probe_at, "path probe"
        if not self.idle and self._last_activity is not None:
            idle_at = self._last_activity + self.timing.idle_after
            if best is None or idle_at < best:
                best, reason = idle_at, "idle"
        return None if best is None else (best, reason)

    # ---- output --------------------------------------------------------------------------------------------------

    def poll_transmit(self) -> Transmit | None:
        return self._transmits.popleft() if self._transmits else None

    def poll_event(self) -> IceEvent | None:
        return self._events.popleft() if self._events else None

    # ---- internals -----------------------------------------------------------------------------------------------

    def _tick(self, now: float) -> None:
        self._last_now = now
        if self._last_activity is None:
            self._last_activity = now

    def _respond(self, response: stun.StunMessage, dst: Address, local: Address) -> None:
        payload = stun.encode(response, integrity_key=self._local_key, fingerprint=True)
        self._transmits.append(Transmit(dst, payload, local))

    def _consent_interval(self) -> float:
        return self.timing.consent_interval * self._rng.uniform(0.8, 1.2)

    def _prflx_priority(self, local: Candidate) -> int:
        return compute_priority(CandidateKind.PEER_REFLEXIVE, (local.priority >> 8) & MAX_LOCAL_PREFERENCE)

    def _compute_pair_priority(self, local: Candidate, remote: Candidate) -> int:
        if self.controlling:
            return pair_priority(local.priority, remote.priority)
        return pair_priority(remote.priority, local.priority)

    def _add_pair(self, local: Candidate, remote: Candidate) -> CandidatePair | None:
        if not _same_family(local.address, remote.address):
            return None
        key = (local.address, remote.address)
        if key in self._pairs:
            return self._pairs[key]
        if len(self._pairs) >= MAX_PAIRS:
            self.drops.drop(DropReason.TOO_MANY_PAIRS)
            return None
        pair = CandidatePair(local, remote, self._compute_pair_priority(local, remote))
        self._pairs[key] = pair
        self._directory._add_pair(key, self)
        self._had_pairs = True
        if self.state is IceState.NEW:
            self.state = IceState.CHECKING
        return pair

    def _replace_remote(self, candidate: Candidate) -> None:
        self._remote_candidates[candidate.address] = candidate
        for pair in self._pairs.values():
            if pair.remote.address == candidate.address:
                pair.remote = candidate
                pair.priority = self._compute_pair_priority(pair.local, candidate)

    def _synthesize_optimistic(self, candidate: Candidate) -> None:
        """Firezone's optimistic candidate: a NAT that keeps ports gives srflx IP × host port (§4.3)."""
        if not is_ipv4(candidate.address):
            return
        # Only signalled candidates are sources: synthesizing from synthesized ones would multiply them.
        remotes = [c for c in self._remote_candidates.values() if c.address not in self._optimistic_sources]
        if candidate.kind is CandidateKind.SERVER_REFLEXIVE:
            combos = [
                (host, candidate) for host in remotes if host.kind is CandidateKind.HOST and is_ipv4(host.address)
            ]
        elif candidate.kind is CandidateKind.HOST:
            combos = [
                (candidate, srflx)
                for srflx in remotes
                if srflx.kind is CandidateKind.SERVER_REFLEXIVE and is_ipv4(srflx.address)
            ]
        else:
            return
        for host, srflx in combos:
            address = (srflx.address[0], host.address[1])
            if address in self._remote_candidates:
                continue
            if len(self._optimistic_sources) >= MAX_OPTIMISTIC_CANDIDATES:
                self.drops.drop(DropReason.TOO_MANY_CANDIDATES)
                return
            local_preference = max(((srflx.priority >> 8) & MAX_LOCAL_PREFERENCE) - 1, 0)
            optimistic = Candidate(
                foundation=compute_foundation(CandidateKind.SERVER_REFLEXIVE, host.address[0], "optimistic"),
                component=1,
                transport="udp",
                priority=compute_priority(CandidateKind.SERVER_REFLEXIVE, local_preference),
                address=address,
                kind=CandidateKind.SERVER_REFLEXIVE,
                related=host.address,
            )
            self._remote_candidates[address] = optimistic
            self._optimistic_sources[address] = (host.address, srflx.address)
            for base in list(self._bases.values()):
                self._add_pair(base, optimistic)

    def _trigger(self, pair: CandidatePair) -> None:
        if pair.state is PairState.FAILED:
            pair.state = PairState.WAITING
        if pair not in self._triggered:
            self._triggered.append(pair)

    def _next_pair_to_check(self) -> CandidatePair | None:
        while self._triggered:
            pair = self._triggered.popleft()
            if self._pairs.get(pair.key) is pair and pair.state is PairState.WAITING:
                return pair
        waiting = [p for p in self._pairs.values() if p.state is _WAITING]
        return max(waiting, key=lambda p: p.priority) if waiting else None

    def _send_request(self, pair: CandidatePair, purpose: _Purpose, now: float) -> None:
        transaction_id = self._rng.random_bytes(stun.TRANSACTION_ID_LENGTH)
        request = stun.StunMessage.request(stun.Method.BINDING, transaction_id)
        request.add_username(self._outgoing_username)
        request.add_priority(self._prflx_priority(pair.local))
        if self.controlling:
            request.add_ice_controlling(self.tie_breaker)
            reasserts = purpose is _Purpose.CONSENT and pair is self._selected and pair.nominated
            if purpose is _Purpose.NOMINATION or reasserts:
                request.add_use_candidate()
        else:
            request.add_ice_controlled(self.tie_breaker)
        payload = stun.encode(request, integrity_key=self._remote_key, fingerprint=True)
        if purpose is _Purpose.CONSENT:
            policy = self._consent_policy
            if pair is self._selected and self.controlling and self._silent_since is None:
                self._silent_since = now  # an unanswered consent check on the selected pair is reason to probe
        elif purpose is _Purpose.PROBE:
            policy = self.timing.probe_policy
        else:
            policy = self.current_timing.retransmit_policy
            if purpose is _Purpose.CHECK:
                pair.state = PairState.IN_PROGRESS
        transaction = stun.Transaction(transaction_id, payload, pair.remote.address, policy, now)
        outstanding = _Outstanding(transaction, pair, purpose, self.controlling, _RETRANSMIT_REASONS[purpose])
        self._outstanding[transaction_id] = outstanding
        self._directory._add_transaction(transaction_id, self)
        pair.outstanding.append(outstanding)
        self._transmits.append(Transmit(pair.remote.address, payload, pair.local.address))

    def _finish(self, outstanding: _Outstanding, now: float) -> None:
        if not outstanding.transaction.finished:
            outstanding.transaction.complete(now)
        transaction_id = outstanding.transaction.transaction_id
        self._outstanding.pop(transaction_id, None)
        self._directory._remove_transaction(transaction_id, self)
        if outstanding in outstanding.pair.outstanding:
            outstanding.pair.outstanding.remove(outstanding)

    def _cancel_outstanding(self, pair: CandidatePair, now: float) -> None:
        for outstanding in list(pair.outstanding):
            self._finish(outstanding, now)

    def _switch_role(self, controlling: bool) -> None:
        self.controlling = controlling
        for pair in self._pairs.values():
            pair.priority = self._compute_pair_priority(pair.local, pair.remote)
        self._events.append(RoleChanged(controlling))

    def _fail_pair(self, pair: CandidatePair, now: float, reason: str) -> None:
        logger.debug("pair %r failed: %s", pair, reason)
        self._cancel_outstanding(pair, now)
        pair.state = PairState.FAILED
        if self.controlling:
            pair.nominated = False  # re-nominated if it works again; the peer's nominations are its own to revoke
        if pair is self._selected:
            self._lose_selected(now, reason)
        else:
            self._update_selection(now)
        self._check_failed(now)

    def _remove_pair(self, pair: CandidatePair, now: float, reason: str) -> None:
        self._cancel_outstanding(pair, now)
        del self._pairs[pair.key]
        self._directory._remove_pair(pair.key, self)
        if pair is self._selected:
            self._lose_selected(now, reason)

    def _consent_lost(self, pair: CandidatePair, now: float) -> None:
        logger.debug("consent lost on %r", pair)
        self._cancel_outstanding(pair, now)
        if self.controlling:
            pair.nominated = False
        pair.remote_nominated = False
        if pair is self._selected:
            pair.state = PairState.WAITING  # re-checked with the full ladder: a transient outage may heal
            self._lose_selected(now, "consent expired")
        else:
            pair.state = PairState.FAILED
            self._check_failed(now)

    def _usable(self, pair: CandidatePair, now: float) -> bool:
        return (
            pair.state is _SUCCEEDED
            and pair.last_response_at is not None
            and now < pair.last_response_at + self.timing.consent_timeout
        )

    def _lose_selected(self, now: float, reason: str) -> None:
        self._selected = None
        self._update_selection(now)
        if self._selected is None:
            # Fall back to any pair known to work rather than go dark; the controlling side nominates it next.
            usable = [p for p in self._pairs.values() if self._usable(p, now)]
            if usable:
                self._select(max(usable, key=lambda p: (not p.unresponsive, p.priority)), now)
                self._update_selection(now)
        if self._selected is None and self.state is IceState.CONNECTED:
            self.state = IceState.DISCONNECTED
            self._events.append(IceDisconnected(reason))
            for pair in self._pairs.values():
                if pair.state in (PairState.SUCCEEDED, PairState.FAILED):
                    pair.state = PairState.WAITING

    def _on_nominated(self, pair: CandidatePair, now: float) -> None:
        pair.nominated = True
        self._update_selection(now)

    def _update_selection(self, now: float) -> None:
        """Selects the best nominated working pair -- controlling side: the highest-priority one; controlled side: the
        one the peer nominated last -- in place of no selection, a fallback that was never nominated, or a worse
        nominated pair. The controlling side then nominates upgrades."""
        usable = [p for p in self._pairs.values() if self._usable(p, now)]
        nominated = [p for p in usable if p.nominated]
        if nominated:
            rank = self._nomination_rank
            best_nominated = max(nominated, key=rank)
            current = self._selected
            if (
                current is None
                or not current.nominated
                or not self._usable(current, now)
                or rank(best_nominated) > rank(current)
            ):
                self._select(best_nominated, now)
        if not self.controlling:
            return
        responsive = [p for p in usable if not p.unresponsive]
        if not responsive:
            return
        best = max(responsive, key=lambda p: p.priority)
        if best.nominated or any(o.purpose is _Purpose.NOMINATION for o in best.outstanding):
            return
        selected = self._selected
        # Nominate the best responsive pair in place of none, of a fallback the peer was never told about, of a
        # selected pair that stopped answering, or of a worse one.
        if selected is None or not selected.nominated or selected.unresponsive or best.priority > selected.priority:
            self._send_request(best, _Purpose.NOMINATION, now)

    def _nomination_rank(self, pair: CandidatePair) -> tuple[float, int]:
        if self.controlling:
            return (0.0 if pair.unresponsive else 1.0, pair.priority)
        return (pair.nominated_at, pair.priority)

    # ---- dead-path detection (controlling side) -------------------------------------------------------------------

    def _probe_due_at(self) -> float | None:
        if self._silent_since is None or self._selected is None:
            return None
        return max(self._silent_since + self.timing.suspect_after, self._probe_hold_until)

    def _start_probe_round(self, now: float) -> None:
        """The selected pair has been silent too long: check it and every other succeeded pair fast."""
        logger.debug("selected pair %r silent since %.3f: probing every succeeded pair", self._selected, now)
        for pair in list(self._pairs.values()):
            if pair.state is PairState.SUCCEEDED and not any(o.purpose is _Purpose.PROBE for o in pair.outstanding):
                self._send_request(pair, _Purpose.PROBE, now)
        self._probe_hold_until = now + self.timing.probe_timeout + self._probe_backoff
        self._probe_backoff = min(self._probe_backoff * 2, self.timing.consent_interval)

    def _probes_unanswered(self, pairs: list[CandidatePair], now: float) -> None:
        for pair in pairs:
            pair.unresponsive = True
        selected = self._selected
        if selected is None or selected not in pairs:
            return
        logger.debug("selected pair %r did not answer its probe; nominating a pair that does", selected)
        # Every earlier nomination is void: the peer uses the pair nominated last, so a pair we return to (even this
        # one, once it answers again) is nominated afresh.
        for other in self._pairs.values():
            other.nominated = False
        self._update_selection(now)
        if not any(self._usable(p, now) and not p.unresponsive for p in self._pairs.values()):
            self._events.append(PathsUnanswered())

    def _heard_on_selected(self, pair: CandidatePair, now: float) -> None:
        self._silent_since = None
        self._probe_hold_until = 0.0
        self._probe_backoff = self.timing.suspect_after
        if pair.unresponsive:
            pair.unresponsive = False
            self._update_selection(now)

    def _select(self, pair: CandidatePair, now: float) -> None:
        if pair is self._selected:
            return
        self._selected = pair
        self._silent_since = None
        self._probe_hold_until = 0.0
        self._probe_backoff = self.timing.suspect_after
        pair.next_consent_at = now + self._consent_interval()
        self._events.append(SelectedPairChanged(pair.local, pair.remote))
        if self.state is not IceState.CONNECTED:
            self.state = IceState.CONNECTED
            self._events.append(IceConnected(pair.local, pair.remote))

    def _check_failed(self, now: float) -> None:
        if self.state is IceState.FAILED or not self._had_pairs or self._selected is not None:
            return
        if all(p.state is _FAILED for p in self._pairs.values()):
            self.state = IceState.FAILED
            for outstanding in list(self._outstanding.values()):
                self._finish(outstanding, now)
            self._triggered.clear()
            self._events.append(IceFailed("all candidate pairs failed" if self._pairs else "no candidate pairs left"))
