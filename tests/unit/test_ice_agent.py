"""Two ICE agents wired in memory with a fake clock (design.md §6 tier 1)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import pytest

from dataplane import stun
from dataplane.base import Address, Transmit
from dataplane.ice import (
    CLIENT_PROFILE,
    SERVER_PROFILE,
    AgentDirectory,
    Candidate,
    CandidateKind,
    DropReason,
    IceAgent,
    IceConnected,
    IceDisconnected,
    IceEvent,
    IceFailed,
    IceState,
    PairState,
    PeerReflexiveCandidateLearned,
    RoleChanged,
    SelectedPairChanged,
    pair_priority,
)
from dataplane.ice.agent import (
    MAX_LEARNED_LOCAL_CANDIDATES,
    MAX_OPTIMISTIC_CANDIDATES,
    MAX_PAIRS,
    MAX_PEER_REFLEXIVE_CANDIDATES,
    MAX_REMOTE_CANDIDATES,
    PathsUnanswered,
)
from dataplane.ice.timing import CLIENT_ACTIVE_TIMING, SERVER_ACTIVE_TIMING, StunTiming
from dataplane.io.rng import SeededRng

E = TypeVar("E")

A_HOST: Address = ("10.0.0.1", 1000)
B_HOST: Address = ("10.0.0.2", 2000)
B_RELAY: Address = ("198.51.100.1", 3000)
A_PUBLIC: Address = ("203.0.113.5", 40000)


def make_pair(a_controlling: bool = True, b_controlling: bool = False, seed: int = 1) -> tuple[IceAgent, IceAgent]:
    a = IceAgent(a_controlling, "aufr", "a-password-0123456789a", "bufr", "b-password-0123456789b", SeededRng(seed))
    b = IceAgent(b_controlling, "bufr", "b-password-0123456789b", "aufr", "a-password-0123456789a", SeededRng(seed + 1))
    return a, b


class Wire:
    """Delivers transmits instantly between agents; optional source NAT and a drop filter."""

    def __init__(self, a: IceAgent, b: IceAgent) -> None:
        self.agents = {"a": a, "b": b}
        self.owner: dict[Address, str] = {}
        self.nat: dict[Address, Address] = {}  # private source -> public source
        self.drop: Callable[[str, Transmit], bool] = lambda sender, t: False
        self.now = 0.0
        self.events: dict[str, list[tuple[float, IceEvent]]] = {"a": [], "b": []}
        self.sent: dict[str, list[tuple[float, Transmit]]] = {"a": [], "b": []}

    def own(self, name: str, *addresses: Address) -> None:
        for address in addresses:
            self.owner[address] = name

    def _deliver(self) -> None:
        moved = True
        while moved:
            moved = False
            for name, agent in self.agents.items():
                while (transmit := agent.poll_transmit()) is not None:
                    moved = True
                    self.sent[name].append((self.now, transmit))
                    if self.drop(name, transmit):
                        continue
                    assert transmit.src is not None
                    source = self.nat.get(transmit.src, transmit.src)
                    reverse = {public: private for private, public in self.nat.items()}
                    destination = reverse.get(transmit.dst, transmit.dst)
                    receiver = self.owner.get(destination)
                    if receiver is None or receiver == name:
                        continue
                    consumed = self.agents[receiver].handle_stun(transmit.payload, source, destination, self.now)
                    assert consumed
                while (event := agent.poll_event()) is not None:
                    self.events[name].append((self.now, event))

    def run(self, until: float) -> None:
        self._deliver()
        while True:
            deadlines = [d for agent in self.agents.values() if (d := agent.poll_timeout()) is not None]
            if not deadlines:
                self.now = until
                return
            deadline = min(deadlines)[0]
            if deadline > until:
                self.now = until
                return
            self.now = max(self.now, deadline)
            for agent in self.agents.values():
                timeout = agent.poll_timeout()
                if timeout is not None and timeout[0] <= self.now:
                    agent.handle_timeout(self.now)
            self._deliver()

    def kinds(self, name: str, kind: type[E]) -> list[tuple[float, E]]:
        return [(t, e) for t, e in self.events[name] if isinstance(e, kind)]


def host_setup(**kwargs: bool) -> tuple[IceAgent, IceAgent, Wire]:
    a, b = make_pair(**kwargs)
    wire = Wire(a, b)
    wire.own("a", A_HOST)
    wire.own("b", B_HOST)
    a_host, b_host = Candidate.host(A_HOST), Candidate.host(B_HOST)
    a.add_local_candidate(a_host, A_HOST, 0.0)
    b.add_local_candidate(b_host, B_HOST, 0.0)
    a.add_remote_candidate(b_host, 0.0)
    b.add_remote_candidate(a_host, 0.0)
    return a, b, wire


# ---- pairs -------------------------------------------------------------------------------------------------------


def test_pair_priority_formula() -> None:
    assert pair_priority(10, 20) == (10 << 32) + 40
    assert pair_priority(20, 10) == (10 << 32) + 40 + 1
    assert pair_priority(7, 7) == (7 << 32) + 14


def test_check_list_is_ordered_by_pair_priority_and_pairs_only_same_family() -> None:
    agent, _ = make_pair()
    agent.add_local_candidate(Candidate.host(A_HOST), A_HOST, 0.0)
    agent.add_local_candidate(Candidate.relayed(("198.51.100.9", 4000), A_HOST), A_HOST, 0.0)
    agent.add_local_candidate(Candidate.host(("2001:db8::1", 1000)), ("2001:db8::1", 1000), 0.0)
    agent.add_local_candidate(Candidate.server_reflexive(A_PUBLIC, A_HOST), A_HOST, 0.0)
    agent.add_remote_candidate(Candidate.host(B_HOST), 0.0)
    agent.add_remote_candidate(Candidate.relayed(B_RELAY, B_HOST), 0.0)
    agent.add_remote_candidate(Candidate.host(("2001:db8::2", 2000)), 0.0)
    pairs = agent.pairs
    # v4: 2 bases x 2 remotes, v6: 1 x 1; the srflx local candidate is pruned to its host base.
    assert len(pairs) == 5
    assert [p.priority for p in pairs] == sorted((p.priority for p in pairs), reverse=True)
    assert pairs[0].local.address == ("2001:db8::1", 1000)
    assert pairs[1].key == (A_HOST, B_HOST)
    assert agent.has_pair(A_HOST, B_HOST) and not agent.has_pair(B_HOST, A_HOST)
    assert pairs[-1].key == (("198.51.100.9", 4000), B_RELAY)
    assert all((":" in p.local.address[0]) == (":" in p.remote.address[0]) for p in pairs)
    assert [c.kind for c in agent.local_candidates][:2] == [CandidateKind.HOST, CandidateKind.HOST]


def test_checks_are_paced_by_ta() -> None:
    agent, _ = make_pair()
    agent.add_local_candidate(Candidate.host(A_HOST), A_HOST, 0.0)
    for port in range(5):
        agent.add_remote_candidate(Candidate.host(("10.0.0.2", 2000 + port)), 0.0)
    now = 0.0
    send_times: list[float] = []
    while now < 0.5:
        timeout = agent.poll_timeout()
        assert timeout is not None
        now = max(now, timeout[0])
        agent.handle_timeout(now)
        while agent.poll_transmit() is not None:
            if now not in send_times:
                send_times.append(now)
    first_five = send_times[:5]
    assert first_five == pytest.approx([0.0, 0.05, 0.1, 0.15, 0.2])


# ---- connectivity ------------------------------------------------------------------------------------------------


def test_host_only_connects_and_nominates() -> None:
    a, b, wire = host_setup()
    wire.run(1.0)
    for agent in (a, b):
        assert agent.state is IceState.CONNECTED
        selected = agent.selected_pair
        assert selected is not None
        assert selected[0].address == (A_HOST if agent is a else B_HOST)
        assert selected[1].address == (B_HOST if agent is a else A_HOST)
    assert len(wire.kinds("a", IceConnected)) == 1
    assert len(wire.kinds("b", IceConnected)) == 1
    (b_pair,) = b.pairs
    assert b_pair.nominated
    connected_at = wire.kinds("b", IceConnected)[0][0]
    assert connected_at < 0.2
    # The controlling side sent exactly one nominating request (USE-CANDIDATE), with the right credentials.
    nominations = []
    for _, transmit in wire.sent["a"]:
        message = stun.decode(transmit.payload)
        if message.is_request:
            assert message.username() == "bufr:aufr"
            assert stun.check_integrity(transmit.payload, stun.short_term_key("b-password-0123456789b"))
            assert stun.has_fingerprint(transmit.payload)
            assert message.priority() is not None
            assert message.ice_controlling() == a.tie_breaker
            if message.use_candidate():
                nominations.append(message)
    assert len(nominations) == 1
    for _, transmit in wire.sent["b"]:
        message = stun.decode(transmit.payload)
        if message.is_request:
            assert message.ice_controlled() == b.tie_breaker and not message.use_candidate()
        elif message.is_response:
            assert message.xor_address(stun.Attr.XOR_MAPPED_ADDRESS) == A_HOST
            assert stun.check_integrity(transmit.payload, stun.short_term_key("b-password-0123456789b"))
        assert transmit.src == B_HOST


def test_connection_stays_up_with_consent_checks() -> None:
    a, b, wire = host_setup()
    wire.run(120.0)
    assert a.state is IceState.CONNECTED and b.state is IceState.CONNECTED
    assert not wire.kinds("a", IceDisconnected) and not wire.kinds("b", IceDisconnected)
    requests_after_setup = [t for t, tr in wire.sent["b"] if t > 1.0 and stun.decode(tr.payload).is_request]
    # ~one consent check every 5 s (randomized 4..6 s) over ~119 s.
    assert 19 <= len(requests_after_setup) <= 30
    gaps = [b2 - b1 for b1, b2 in zip(requests_after_setup, requests_after_setup[1:], strict=False)]
    assert all(4.0 - 1e-9 <= gap <= 6.0 + 1e-9 for gap in gaps)


@pytest.mark.parametrize("both_controlling", [True, False])
def test_role_conflict_is_resolved_by_tie_breaker(both_controlling: bool) -> None:
    a, b, wire = host_setup(a_controlling=both_controlling, b_controlling=both_controlling)
    wire.run(2.0)
    assert a.controlling != b.controlling
    winner, loser = (a, b) if a.tie_breaker > b.tie_breaker else (b, a)
    assert winner.controlling is True
    changed = wire.kinds("a" if loser is a else "b", RoleChanged) + wire.kinds("a" if winner is a else "b", RoleChanged)
    assert changed, "someone must have switched role"
    assert a.state is IceState.CONNECTED and b.state is IceState.CONNECTED
    assert a.selected_pair is not None and b.selected_pair is not None


def test_role_conflict_487_when_our_tie_breaker_wins() -> None:
    a, b, wire = host_setup(a_controlling=True, b_controlling=True)
    # Force A to win and let only B check first: A must answer 487, B must switch to controlled.
    a.tie_breaker, b.tie_breaker = 2**64 - 1, 1
    a.handle_timeout(0.0)
    while a.poll_transmit() is not None:
        pass  # A's own first check is lost
    b.handle_timeout(0.0)
    request = b.poll_transmit()
    assert request is not None
    assert a.handle_stun(request.payload, B_HOST, A_HOST, 0.0)
    reply = a.poll_transmit()
    assert reply is not None
    message = stun.decode(reply.payload)
    assert message.message_class == stun.MessageClass.ERROR and message.error_code() == (487, "Role Conflict")
    assert b.handle_stun(reply.payload, A_HOST, B_HOST, 0.01)
    assert b.controlling is False and a.controlling is True
    assert isinstance(b.poll_event(), RoleChanged)


def test_peer_reflexive_candidates_are_learned_both_ways() -> None:
    a, b = make_pair()
    wire = Wire(a, b)
    wire.own("a", A_HOST)
    wire.own("b", B_HOST)
    wire.nat[A_HOST] = A_PUBLIC
    a.add_local_candidate(Candidate.host(A_HOST), A_HOST, 0.0)
    b.add_local_candidate(Candidate.host(B_HOST), B_HOST, 0.0)
    a.add_remote_candidate(Candidate.host(B_HOST), 0.0)  # B never hears of A's candidates
    wire.run(2.0)
    learned_by_b = [e for _, e in wire.kinds("b", PeerReflexiveCandidateLearned)]
    learned_by_a = [e for _, e in wire.kinds("a", PeerReflexiveCandidateLearned)]
    assert [(e.candidate.address, e.local) for e in learned_by_b] == [(A_PUBLIC, False)]
    assert [(e.candidate.address, e.local) for e in learned_by_a] == [(A_PUBLIC, True)]
    assert learned_by_b[0].candidate.kind is CandidateKind.PEER_REFLEXIVE
    assert learned_by_a[0].candidate.related == A_HOST
    assert A_PUBLIC in [c.address for c in a.local_candidates]
    assert b.selected_pair is not None and b.selected_pair[1].address == A_PUBLIC
    assert a.selected_pair is not None and a.selected_pair[0].address == A_HOST
    # A later signalled srflx candidate for the same address replaces the peer-reflexive one.
    b.add_remote_candidate(Candidate.server_reflexive(A_PUBLIC, A_HOST), 2.0)
    assert [c.kind for c in b.remote_candidates] == [CandidateKind.SERVER_REFLEXIVE]
    assert b.pairs[0].state is PairState.SUCCEEDED


def test_consent_lost_after_30_seconds_then_failed() -> None:
    a, b, wire = host_setup()
    wire.run(10.0)
    last_response = max(t for t, tr in wire.sent["b"] if stun.decode(tr.payload).is_response)
    last_response_a = max(t for t, tr in wire.sent["a"] if stun.decode(tr.payload).is_response)
    wire.drop = lambda sender, t: True
    wire.run(200.0)
    (disconnect_a,) = wire.kinds("a", IceDisconnected)
    (disconnect_b,) = wire.kinds("b", IceDisconnected)
    # A's last success is the last response B sent it, and vice versa.
    assert disconnect_a[0] == pytest.approx(last_response + 30.0)
    assert disconnect_b[0] == pytest.approx(last_response_a + 30.0)
    assert disconnect_a[1].reason == "consent expired"
    assert a.selected_pair is None and b.selected_pair is None
    # No data flowed for 20 s, so the re-checks run on the idle ladders: the client gives up 100 s later, the
    # gateway keeps trying (1000 s).
    assert a.idle and b.idle
    (failed_a,) = wire.kinds("a", IceFailed)
    assert failed_a[0] == pytest.approx(disconnect_a[0] + CLIENT_PROFILE.idle.timeout, abs=0.06)
    assert a.state is IceState.FAILED and b.state is IceState.DISCONNECTED
    assert a.poll_timeout() is None


def test_consent_recovers_when_the_outage_is_short() -> None:
    a, b, wire = host_setup()
    wire.run(10.0)
    wire.drop = lambda sender, t: True
    wire.run(45.0)
    assert wire.kinds("a", IceDisconnected)
    wire.drop = lambda sender, t: False
    wire.run(70.0)  # idle connection: the re-checks come every 25 s
    assert a.state is IceState.CONNECTED and b.state is IceState.CONNECTED
    assert len(wire.kinds("a", IceConnected)) == 2


def test_selected_pair_moves_when_a_better_pair_succeeds() -> None:
    a, b = make_pair()
    wire = Wire(a, b)
    wire.own("a", A_HOST)
    wire.own("b", B_HOST, B_RELAY)
    b_host = Candidate.host(B_HOST)
    b_relay = Candidate.relayed(B_RELAY, B_HOST)
    a.add_local_candidate(Candidate.host(A_HOST), A_HOST, 0.0)
    b.add_local_candidate(b_host, B_HOST, 0.0)
    b.add_local_candidate(b_relay, B_HOST, 0.0)
    b.add_remote_candidate(Candidate.host(A_HOST), 0.0)
    a.add_remote_candidate(b_relay, 0.0)
    # Until A hears of B's host candidate, B's direct checks are lost (think: firewall opens later).
    wire.drop = lambda sender, t: sender == "b" and t.src == B_HOST and stun.decode(t.payload).is_request
    wire.run(3.0)
    assert a.selected_pair == (Candidate.host(A_HOST), b_relay)
    assert b.selected_pair is not None and b.selected_pair[0] == b_relay
    wire.drop = lambda sender, t: False
    a.add_remote_candidate(b_host, 3.0)
    wire.run(6.0)
    assert a.selected_pair is not None and a.selected_pair[1] == b_host
    assert b.selected_pair is not None and b.selected_pair[0] == b_host
    moves = [e for _, e in wire.kinds("b", SelectedPairChanged)]
    assert [m.local.kind for m in moves] == [CandidateKind.RELAYED, CandidateKind.HOST]
    assert len(wire.kinds("b", IceConnected)) == 1
    # Data for a relayed pair leaves from the relay address: the driver sends it through that allocation.
    relayed_transmits = [t for _, t in wire.sent["b"] if t.dst == A_HOST and t.src == B_RELAY]
    assert relayed_transmits
    # Both pairs stay nominated and alive (consent keeps running on both), but nobody flips back.
    wire.run(90.0)
    assert [m.local.kind for _, m in wire.kinds("b", SelectedPairChanged)] == [
        CandidateKind.RELAYED,
        CandidateKind.HOST,
    ]
    assert len(wire.kinds("a", SelectedPairChanged)) == 2
    assert all(p.state is PairState.SUCCEEDED for p in a.pairs + b.pairs)


def test_invalidating_the_selected_remote_candidate_moves_to_another_pair() -> None:
    a, b, wire, b_host, b_relay = _direct_and_relay_wired()
    wire.run(40.0)
    assert a.selected_pair is not None and a.selected_pair[1] == b_host
    a.invalidate_remote_candidate(b_host, 40.0)
    b.remove_local_candidate(b_host, 40.0)
    wire.run(42.0)
    assert a.selected_pair is not None and a.selected_pair[1] == b_relay
    assert b.selected_pair is not None and b.selected_pair[0] == b_relay
    assert not wire.kinds("a", IceDisconnected)
    assert not wire.kinds("b", IceDisconnected)
    # Invalidating the last remote candidate fails the agent.
    a.invalidate_remote_candidate(b_relay, 42.0)
    wire.run(43.0)
    assert a.state is IceState.FAILED
    assert [type(e) for _, e in wire.events["a"][-2:]] == [IceDisconnected, IceFailed]


def test_optimistic_srflx_candidate_is_synthesized_and_invalidated_with_its_source() -> None:
    agent, _ = make_pair()
    host = Candidate.host(("192.168.1.10", 51000))
    srflx = Candidate.server_reflexive(("203.0.113.9", 61000), ("192.168.1.10", 51000))
    agent.add_remote_candidate(srflx, 0.0)
    agent.add_remote_candidate(host, 0.0)
    optimistic = [c for c in agent.remote_candidates if c.address == ("203.0.113.9", 51000)]
    assert len(optimistic) == 1
    assert optimistic[0].kind is CandidateKind.SERVER_REFLEXIVE
    assert optimistic[0].related == host.address
    assert optimistic[0].priority < srflx.priority
    agent.invalidate_remote_candidate(srflx, 1.0)
    assert {c.address for c in agent.remote_candidates} == {host.address}
    v6_only, _ = make_pair()
    v6_only.add_remote_candidate(Candidate.host(("2001:db8::1", 5)), 0.0)
    v6_only.add_remote_candidate(Candidate.server_reflexive(("2001:db8::2", 6), ("2001:db8::1", 5)), 0.0)
    assert len(v6_only.remote_candidates) == 2


# ---- timing ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("timing", "timeout"),
    [
        (SERVER_ACTIVE_TIMING, 615.5),
        (SERVER_PROFILE.idle, 1000.0),
        (CLIENT_ACTIVE_TIMING, 16.5),
        (CLIENT_PROFILE.idle, 100.0),
    ],
)
def test_timing_profiles_match_firezone_figures(timing: StunTiming, timeout: float) -> None:
    assert timing.timeout == pytest.approx(timeout)


@pytest.mark.parametrize(
    ("controlling", "expected_offsets", "gives_up_at"),
    [
        (True, [0.0, 0.25, 0.75, 1.75, 3.25, 4.75, 6.25, 7.75, 9.25, 10.75, 12.25, 13.75, 15.25], 16.5),
        (False, [0.0, 0.25, 0.75, 1.75, 3.75, 7.75, 15.75, 30.75] + [30.75 + 15 * k for k in range(1, 39)], 615.5),
    ],
)
def test_unanswered_check_follows_the_retransmit_ladder(
    controlling: bool, expected_offsets: list[float], gives_up_at: float
) -> None:
    agent, _ = make_pair(a_controlling=controlling)
    agent.add_local_candidate(Candidate.host(A_HOST), A_HOST, 0.0)
    agent.add_remote_candidate(Candidate.host(B_HOST), 0.0)
    now = 0.0
    sends: list[float] = []
    while (timeout := agent.poll_timeout()) is not None:
        now = max(now, timeout[0])
        agent.handle_timeout(now)
        while (transmit := agent.poll_transmit()) is not None:
            assert stun.decode(transmit.payload).is_request
            sends.append(now)
        if now > 2000:
            break
    assert sends == pytest.approx(expected_offsets)
    assert agent.state is IceState.FAILED
    event = agent.poll_event()
    assert isinstance(event, IceFailed)
    assert now == pytest.approx(gives_up_at)


def test_idle_after_20_seconds_without_activity_switches_ladder() -> None:
    a, b, wire = host_setup()
    wire.run(10.0)
    a.note_activity(10.0)
    b.note_activity(10.0)
    wire.run(29.9)
    assert not a.idle and a.current_timing == CLIENT_PROFILE.active
    wire.run(30.1)
    assert a.idle and a.current_timing == CLIENT_PROFILE.idle
    assert b.idle and b.current_timing == SERVER_PROFILE.idle
    a.note_activity(31.0)
    assert not a.idle


# ---- robustness --------------------------------------------------------------------------------------------------


def _check_from_a(b: IceAgent, *, password: str = "b-password-0123456789b", username: str = "bufr:aufr") -> bytes:
    request = stun.StunMessage.request(stun.Method.BINDING, b"\x01" * 12)
    request.add_username(username).add_priority(12345).add_ice_controlling(5)
    return stun.encode(request, integrity_key=stun.short_term_key(password))


def test_bad_integrity_is_dropped_and_counted() -> None:
    _, b, _ = host_setup()
    assert b.handle_stun(_check_from_a(b, password="wrong"), A_HOST, B_HOST, 0.0)
    assert b.drops[DropReason.BAD_INTEGRITY] == 1
    assert b.poll_transmit() is None


def test_someone_elses_username_is_not_consumed() -> None:
    _, b, _ = host_setup()
    assert not b.handle_stun(_check_from_a(b, username="zzzz:aufr"), A_HOST, B_HOST, 0.0)
    assert not b.handle_stun(b"\x00\x01garbage", A_HOST, B_HOST, 0.0)
    assert b.poll_transmit() is None


def test_unknown_comprehension_required_attribute_gets_420() -> None:
    _, b, _ = host_setup()
    request = stun.StunMessage.request(stun.Method.BINDING, b"\x02" * 12)
    request.add_username("bufr:aufr").add_priority(1).add_ice_controlling(5).add(0x7777, b"abcd")
    payload = stun.encode(request, integrity_key=stun.short_term_key("b-password-0123456789b"))
    assert b.handle_stun(payload, A_HOST, B_HOST, 0.0)
    reply = b.poll_transmit()
    assert reply is not None
    assert stun.decode(reply.payload).error_code() == (420, "Unknown Attribute")


def test_response_from_wrong_address_fails_the_pair() -> None:
    a, _, _ = host_setup()
    a.handle_timeout(0.0)
    check = a.poll_transmit()
    assert check is not None
    request = stun.decode(check.payload)
    response = request.success_response().add_xor_address(stun.Attr.XOR_MAPPED_ADDRESS, A_HOST)
    payload = stun.encode(response, integrity_key=stun.short_term_key("b-password-0123456789b"))
    assert a.handle_stun(payload, ("10.9.9.9", 2000), A_HOST, 0.01)
    assert a.drops[DropReason.ASYMMETRIC_RESPONSE] == 1
    assert a.state is IceState.FAILED


def test_constructor_rejects_empty_credentials() -> None:
    with pytest.raises(ValueError):
        IceAgent(False, "", "x", "y", "z", SeededRng(0))


def test_removing_the_selected_local_candidate_moves_to_the_other_base() -> None:
    a, b = make_pair()
    wire = Wire(a, b)
    a_relay: Address = ("198.51.100.2", 3001)
    wire.own("a", A_HOST, a_relay)
    wire.own("b", B_HOST)
    a_host_candidate = Candidate.host(A_HOST)
    a_relay_candidate = Candidate.relayed(a_relay, A_HOST)
    for candidate in (a_host_candidate, a_relay_candidate):
        a.add_local_candidate(candidate, A_HOST, 0.0)
        b.add_remote_candidate(candidate, 0.0)
    b.add_local_candidate(Candidate.host(B_HOST), B_HOST, 0.0)
    a.add_remote_candidate(Candidate.host(B_HOST), 0.0)
    wire.run(5.0)
    assert a.selected_pair is not None and a.selected_pair[0] == a_host_candidate
    a.remove_local_candidate(a_host_candidate, 5.0)
    b.invalidate_remote_candidate(a_host_candidate, 5.0)
    wire.run(8.0)
    assert a.selected_pair is not None and a.selected_pair[0] == a_relay_candidate
    assert b.selected_pair is not None and b.selected_pair[1] == a_relay_candidate
    assert a_host_candidate not in a.local_candidates
    assert a.state is IceState.CONNECTED and b.state is IceState.CONNECTED


def test_ipv6_host_candidates_connect() -> None:
    a, b = make_pair()
    wire = Wire(a, b)
    a6: Address = ("2001:db8::1", 1000)
    b6: Address = ("2001:db8::2", 2000)
    wire.own("a", a6, A_HOST)
    wire.own("b", b6)
    a.add_local_candidate(Candidate.host(a6), a6, 0.0)
    a.add_local_candidate(Candidate.host(A_HOST), A_HOST, 0.0)  # no IPv4 peer: never paired
    b.add_local_candidate(Candidate.host(b6), b6, 0.0)
    a.add_remote_candidate(Candidate.host(b6), 0.0)
    b.add_remote_candidate(Candidate.host(a6), 0.0)
    wire.run(1.0)
    assert len(a.pairs) == 1
    assert a.selected_pair is not None and a.selected_pair[1].address == b6
    assert b.selected_pair is not None and b.selected_pair[1].address == a6


def test_failed_is_terminal() -> None:
    a, b = make_pair()
    a.add_local_candidate(Candidate.host(A_HOST), A_HOST, 0.0)
    a.add_remote_candidate(Candidate.host(B_HOST), 0.0)
    a.invalidate_remote_candidate(Candidate.host(B_HOST), 0.0)
    assert a.state is IceState.FAILED
    assert isinstance(a.poll_event(), IceFailed)
    a.add_remote_candidate(Candidate.host(("10.0.0.3", 3000)), 1.0)
    assert a.pairs == [] and a.poll_timeout() is None
    request = stun.StunMessage.request(stun.Method.BINDING, b"\x03" * 12)
    request.add_username("aufr:bufr").add_priority(1).add_ice_controlled(5)
    payload = stun.encode(request, integrity_key=stun.short_term_key("a-password-0123456789a"))
    assert a.handle_stun(payload, B_HOST, A_HOST, 1.0)
    assert a.drops[DropReason.AGENT_FAILED] == 1
    assert a.poll_transmit() is None


def test_controlled_side_accepts_nomination_on_a_pair_that_already_succeeded() -> None:
    _, b, _ = host_setup()
    b.handle_timeout(0.0)
    check = b.poll_transmit()
    assert check is not None
    response = stun.decode(check.payload).success_response()
    response.add_xor_address(stun.Attr.XOR_MAPPED_ADDRESS, B_HOST)
    payload = stun.encode(response, integrity_key=stun.short_term_key("a-password-0123456789a"))
    assert b.handle_stun(payload, A_HOST, B_HOST, 0.01)
    assert b.pairs[0].state is PairState.SUCCEEDED
    assert b.selected_pair is None  # succeeded, but not nominated yet
    nomination = stun.StunMessage.request(stun.Method.BINDING, b"\x04" * 12)
    nomination.add_username("bufr:aufr").add_priority(1).add_ice_controlling(5).add_use_candidate()
    data = stun.encode(nomination, integrity_key=stun.short_term_key("b-password-0123456789b"))
    assert b.handle_stun(data, A_HOST, B_HOST, 0.02)
    assert b.selected_pair is not None and b.selected_pair[1].address == A_HOST
    events = []
    while (event := b.poll_event()) is not None:
        events.append(type(event))
    assert events == [SelectedPairChanged, IceConnected]


def test_direct_path_dies_and_traffic_moves_to_the_relay_without_disconnecting() -> None:
    a, b, wire, b_host, b_relay = _direct_and_relay_setup()
    direct = {A_HOST, B_HOST}
    wire.drop = lambda sender, t: t.src in direct and t.dst in direct
    wire.run(80.0)
    assert a.selected_pair is not None and a.selected_pair[1] == b_relay
    assert b.selected_pair is not None and b.selected_pair[0] == b_relay
    assert not wire.kinds("a", IceDisconnected) and not wire.kinds("b", IceDisconnected)
    assert a.state is IceState.CONNECTED and b.state is IceState.CONNECTED
    (move_a,) = [t for t, e in wire.kinds("a", SelectedPairChanged) if e.remote == b_relay]
    (move_b,) = [t for t, e in wire.kinds("b", SelectedPairChanged) if e.local == b_relay]
    # No data flows: the next consent check on the direct pair goes unanswered (within 5 s × 1.2), a second of
    # silence starts a probe round, the probes give up after a second and the relay pair, which answered, is
    # nominated -- long before consent on the direct pair runs out (30 s).
    assert 20.0 + 2.0 <= move_a <= 20.0 + 6.0 + 1.0 + 1.0 + 0.1
    assert move_a <= move_b <= move_a + 0.1  # b follows the new nomination at once


def _direct_and_relay_wired() -> tuple[IceAgent, IceAgent, Wire, Candidate, Candidate]:
    """a (controlling, host only) and b (controlled, host + relay), candidates exchanged, nothing run yet."""
    a, b = make_pair()
    wire = Wire(a, b)
    wire.own("a", A_HOST)
    wire.own("b", B_HOST, B_RELAY)
    b_host, b_relay = Candidate.host(B_HOST), Candidate.relayed(B_RELAY, B_HOST)
    a.add_local_candidate(Candidate.host(A_HOST), A_HOST, 0.0)
    b.add_local_candidate(b_host, B_HOST, 0.0)
    b.add_local_candidate(b_relay, B_HOST, 0.0)
    b.add_remote_candidate(Candidate.host(A_HOST), 0.0)
    a.add_remote_candidate(b_host, 0.0)
    a.add_remote_candidate(b_relay, 0.0)
    return a, b, wire, b_host, b_relay


def _direct_and_relay_setup() -> tuple[IceAgent, IceAgent, Wire, Candidate, Candidate]:
    a, b, wire, b_host, b_relay = _direct_and_relay_wired()
    wire.run(20.0)
    assert a.selected_pair is not None and a.selected_pair[1] == b_host
    assert b.selected_pair is not None and b.selected_pair[0] == b_host
    assert all(p.state is PairState.SUCCEEDED for p in b.pairs)
    return a, b, wire, b_host, b_relay


def test_a_stale_nomination_arriving_late_is_corrected_by_the_next_consent_check() -> None:
    """A retransmitted USE-CANDIDATE for the relayed pair arrives after the direct pair's nomination: the controlled
    side follows it, but the controlling side's consent checks on its selected pair re-assert the nomination."""
    a, b, wire, b_host, b_relay = _direct_and_relay_setup()
    consent_reassertions = [
        t
        for _, t in wire.sent["a"]
        if t.dst == B_HOST and stun.decode(t.payload).use_candidate() and stun.decode(t.payload).is_request
    ]
    assert len(consent_reassertions) >= 2  # the nomination, then consent checks that carry USE-CANDIDATE
    late = stun.StunMessage.request(stun.Method.BINDING, b"\x07" * 12)
    late.add_username("bufr:aufr").add_priority(1).add_ice_controlling(5).add_use_candidate()
    data = stun.encode(late, integrity_key=stun.short_term_key("b-password-0123456789b"))
    wire.drop = lambda sender, t: t.payload[8:20] == late.transaction_id  # a never sent it: keep b's answer from a
    assert b.handle_stun(data, A_HOST, B_RELAY, wire.now)
    assert b.selected_pair is not None and b.selected_pair[0] == b_relay
    stale_at = wire.now
    wire.run(wire.now + 7.0)
    assert a.selected_pair is not None and a.selected_pair[1] == b_host
    assert b.selected_pair is not None and b.selected_pair[0] == b_host
    (back,) = [t for t, e in wire.kinds("b", SelectedPairChanged) if t > stale_at]
    assert back - stale_at <= 5.0 * 1.2 + 0.01  # one consent interval


def test_controlled_side_returns_to_the_nominated_pair_after_losing_consent_on_it_alone() -> None:
    """Only the controlled side's consent checks on the direct pair go unanswered for a while: it falls back to the
    relay, and once the direct pair answers again it goes back there, where the controlling side never left."""
    a, b, wire, b_host, b_relay = _direct_and_relay_setup()

    def answers_to_b_on_the_direct_path(sender: str, t: Transmit) -> bool:
        message = stun.decode(t.payload)
        return sender == "a" and t.dst == B_HOST and message.message_class == stun.MessageClass.SUCCESS

    wire.drop = answers_to_b_on_the_direct_path
    wire.run(60.0)
    assert b.selected_pair is not None and b.selected_pair[0] == b_relay  # consent on the direct pair ran out
    assert a.selected_pair is not None and a.selected_pair[1] == b_host
    wire.drop = lambda sender, t: False
    wire.run(120.0)
    assert a.selected_pair is not None and a.selected_pair[1] == b_host
    assert b.selected_pair is not None and b.selected_pair[0] == b_host
    assert not wire.kinds("b", IceDisconnected)


# ---- the directory shared by a node's agents ----------------------------------------------------------------------


def test_a_shared_directory_tracks_every_pair_and_outstanding_transaction() -> None:
    directory = AgentDirectory()
    a = IceAgent(True, "aufr", "a-password-0123456789a", "bufr", "b-password-0123456789b", SeededRng(1))
    b = IceAgent(
        False, "bufr", "b-password-0123456789b", "aufr", "a-password-0123456789a", SeededRng(2), directory=directory
    )
    wire = Wire(a, b)
    wire.own("a", A_HOST)
    wire.own("b", B_HOST, B_RELAY)
    b.add_local_candidate(Candidate.host(B_HOST), B_HOST, 0.0)
    b.add_local_candidate(Candidate.relayed(B_RELAY, B_HOST), B_RELAY, 0.0)
    b.add_remote_candidate(Candidate.host(A_HOST), 0.0)
    a.add_local_candidate(Candidate.host(A_HOST), A_HOST, 0.0)
    a.add_remote_candidate(Candidate.host(B_HOST), 0.0)
    assert directory.agents_with_pair(B_HOST, A_HOST) == [b]
    assert directory.agents_with_pair(B_RELAY, A_HOST) == [b]
    assert directory.agents_with_pair(A_HOST, B_HOST) == []  # a has its own, private directory
    b.handle_timeout(0.0)
    sent = [stun.decode(t.payload).transaction_id for t in iter(b.poll_transmit, None)]
    assert sent and all(directory.agent_for_transaction(tid) is b for tid in sent)
    wire.run(5.0)  # answered or given up: finished transactions leave the directory
    assert all(directory.agent_for_transaction(tid) is None for tid in sent)
    b.remove_local_candidate(Candidate.relayed(B_RELAY, B_HOST), 5.0)
    assert directory.agents_with_pair(B_RELAY, A_HOST) == []
    b.close()
    assert len(directory) == 0


# ---- bounds on what the peer can make an agent store -----------------------------------------------------------


def _flooded_agent() -> IceAgent:
    a, _ = make_pair()
    a.add_local_candidate(Candidate.host(A_HOST), A_HOST, 0.0)
    return a


def test_300_host_and_300_srflx_remote_candidates_stay_within_the_bounds_quickly() -> None:
    agent = _flooded_agent()
    started = time.process_time()
    for index in range(300):
        agent.add_remote_candidate(Candidate.host((f"10.1.{index // 250}.{index % 250 + 1}", 5000 + index)), 0.0)
        srflx = Candidate.server_reflexive((f"203.0.{index // 250}.{index % 250 + 1}", 6000 + index), B_HOST)
        agent.add_remote_candidate(srflx, 0.0)
    elapsed = time.process_time() - started
    remotes = agent.remote_candidates
    optimistic = [c for c in remotes if c.related is not None and c.related[0].startswith("10.1.")]
    assert len(remotes) - len(optimistic) == MAX_REMOTE_CANDIDATES
    assert len(optimistic) <= MAX_OPTIMISTIC_CANDIDATES
    assert len(agent.pairs) <= MAX_PAIRS
    assert agent.drops[DropReason.TOO_MANY_CANDIDATES] > 0
    assert elapsed < 2.0, elapsed  # unbounded, this was 90,600 optimistic candidates and half a minute of CPU


def test_peer_reflexive_remote_candidates_are_bounded() -> None:
    a, b, wire = host_setup()
    wire.run(1.0)
    template = next(t for _, t in wire.sent["a"] if stun.decode(t.payload).is_request)
    learned: list[PeerReflexiveCandidateLearned] = []
    for port in range(40):  # authenticated checks from 40 new sources (the peer's NAT hands out new ports)
        b.handle_stun(template.payload, ("203.0.113.9", 20000 + port), B_HOST, 1.0)
        learned.extend(e for e in iter(b.poll_event, None) if isinstance(e, PeerReflexiveCandidateLearned))
    assert len(learned) == MAX_PEER_REFLEXIVE_CANDIDATES
    assert len(b.remote_candidates) == 1 + MAX_PEER_REFLEXIVE_CANDIDATES
    assert b.drops[DropReason.TOO_MANY_CANDIDATES] == 40 - MAX_PEER_REFLEXIVE_CANDIDATES


def test_no_peer_reflexive_candidate_is_stored_once_the_check_list_is_full() -> None:
    a, b, wire = host_setup()
    b.add_local_candidate(Candidate.relayed(B_RELAY, B_HOST), B_RELAY, 0.0)
    for index in range(MAX_PAIRS // 2 - 1):  # fill b's check list: two bases × 50 signalled candidates
        b.add_remote_candidate(Candidate.host((f"10.2.0.{index + 1}", 7000)), 0.0)
    assert len(b.pairs) == MAX_PAIRS
    before = len(b.remote_candidates)
    wire.run(0.2)
    template = next(t for _, t in wire.sent["a"] if stun.decode(t.payload).is_request)
    b.handle_stun(template.payload, ("203.0.113.9", 30000), B_HOST, 0.2)
    assert len(b.remote_candidates) == before
    assert b.drops[DropReason.TOO_MANY_PAIRS] >= 1


def test_local_candidates_learned_from_responses_are_bounded() -> None:
    agent = _flooded_agent()
    peer_key = stun.short_term_key("b-password-0123456789b")
    for index in range(40):
        agent.add_remote_candidate(Candidate.host((f"10.3.0.{index + 1}", 8000)), 0.0)
    learned = 0
    now = 0.0
    for _ in range(100):  # answer every check, each with a different mapped address
        now += 0.05
        agent.handle_timeout(now)
        while (transmit := agent.poll_transmit()) is not None:
            request = stun.decode(transmit.payload)
            if not request.is_request:
                continue
            mapped = ("198.18.0.1", 10000 + learned + agent.drops[DropReason.TOO_MANY_CANDIDATES])
            response = request.success_response().add_xor_address(stun.Attr.XOR_MAPPED_ADDRESS, mapped)
            agent.handle_stun(
                stun.encode(response, integrity_key=peer_key, fingerprint=True), transmit.dst, A_HOST, now
            )
            learned += sum(1 for e in iter(agent.poll_event, None) if isinstance(e, PeerReflexiveCandidateLearned))
    assert learned == MAX_LEARNED_LOCAL_CANDIDATES
    assert agent.drops[DropReason.TOO_MANY_CANDIDATES] > 0


# ---- dead-path detection (controlling side) ---------------------------------------------------------------------


def _send_data(wire: Wire, agent: IceAgent, until: float, every: float = 0.05) -> None:
    """``agent`` sends data on its selected pair every ``every`` seconds (nothing comes back) until ``until``."""
    while wire.now < until:
        agent.note_data_sent(wire.now)
        wire.run(min(wire.now + every, until))


def test_data_without_answer_moves_the_controlling_side_within_seconds() -> None:
    a, b, wire, b_host, b_relay = _direct_and_relay_setup()
    direct = {A_HOST, B_HOST}
    wire.drop = lambda sender, t: t.src in direct and t.dst in direct
    _send_data(wire, a, 30.0)
    (move_a,) = [t for t, e in wire.kinds("a", SelectedPairChanged) if e.remote == b_relay]
    (move_b,) = [t for t, e in wire.kinds("b", SelectedPairChanged) if e.local == b_relay]
    # 1 s of silence after the first unanswered data, a 1 s probe round, then one nomination round trip.
    assert 20.0 + 2.0 <= move_a <= 20.0 + 2.0 + 0.1
    assert move_a <= move_b <= move_a + 0.1
    assert not wire.kinds("a", IceDisconnected) and not wire.kinds("b", IceDisconnected)
    direct_pair = next(p for p in a.pairs if p.remote.address == B_HOST)
    assert direct_pair.unresponsive and not direct_pair.nominated
    assert direct_pair.state is PairState.SUCCEEDED  # consent on it has not run out: the 30 s rule is unchanged


def test_data_answered_on_the_selected_pair_never_starts_a_probe() -> None:
    a, b, wire, b_host, _ = _direct_and_relay_setup()
    sent_before = len(wire.sent["a"])
    assert a.note_data_sent(wire.now)  # arms the silence clock
    assert not a.note_data_sent(wire.now)  # already running
    assert a.poll_timeout() == (wire.now + 1.0, "path probe")
    for _ in range(200):
        a.note_data_sent(wire.now)
        wire.run(wire.now + 0.025)
        assert not a.note_data_received(wire.now)  # stops the clock; nothing to send
        timeout = a.poll_timeout()
        assert timeout is not None and timeout[1] != "path probe"
        wire.run(wire.now + 0.025)
    assert a.selected_pair is not None and a.selected_pair[1] == b_host
    probes = [t for _, t in wire.sent["a"][sent_before:] if stun.decode(t.payload).is_request and t.dst != B_HOST]
    assert len(probes) <= 10.0 / 4.0 + 1  # the relay pair's consent checks only (10 s, one per 4-6 s): no probes
    assert len(wire.kinds("a", SelectedPairChanged)) == 1


def test_a_selected_pair_that_answers_its_probe_is_kept_and_probes_back_off() -> None:
    """One-way traffic (nothing comes back as data) on a working pair: probes confirm the pair; no move, and the
    rounds thin out while the silence lasts."""
    a, b, wire, b_host, _ = _direct_and_relay_setup()
    changes = len(wire.kinds("a", SelectedPairChanged))
    start = wire.now
    _send_data(wire, a, start + 40.0)
    assert a.selected_pair is not None and a.selected_pair[1] == b_host
    assert len(wire.kinds("a", SelectedPairChanged)) == changes
    assert not any(p.unresponsive for p in a.pairs)
    probe_rounds = [
        t
        for t, transmit in wire.sent["a"]
        if t > start and transmit.dst == B_HOST and stun.decode(transmit.payload).is_request
    ]
    # At most one check on the selected pair per second of data (a round per silence), never the fast ladder's five.
    assert len(probe_rounds) <= 40 + 8


def test_no_pair_answering_reports_paths_unanswered_and_keeps_the_selected_pair() -> None:
    a, b, wire, b_host, _ = _direct_and_relay_setup()
    wire.drop = lambda sender, t: True  # b is gone
    _send_data(wire, a, 25.0)
    unanswered = wire.kinds("a", PathsUnanswered)
    assert unanswered and 22.0 <= unanswered[0][0] <= 22.1
    assert a.selected_pair is not None and a.selected_pair[1] == b_host  # still sending until consent runs out
    wire.run(60.0)
    (disconnected_at, _) = wire.kinds("a", IceDisconnected)[0]
    assert 20.0 + 30.0 - 6.0 <= disconnected_at <= 20.0 + 30.0 + 0.1  # RFC 7675's rule is unchanged


def test_a_pair_that_answers_again_is_nominated_afresh_before_it_is_used() -> None:
    """The direct pair goes silent and the relay pair takes over; when the direct pair answers again the controlling
    side nominates it again (the controlled side follows the latest nomination), and both sides return to it."""
    a, b, wire, b_host, b_relay = _direct_and_relay_setup()
    direct = {A_HOST, B_HOST}
    wire.drop = lambda sender, t: t.src in direct and t.dst in direct
    _send_data(wire, a, 25.0)
    assert a.selected_pair is not None and a.selected_pair[1] == b_relay
    wire.drop = lambda sender, t: False
    wire.run(40.0)
    assert a.selected_pair is not None and a.selected_pair[1] == b_host
    assert b.selected_pair is not None and b.selected_pair[0] == b_host
    back_a = [t for t, e in wire.kinds("a", SelectedPairChanged) if e.remote == b_host][-1]
    back_b = [t for t, e in wire.kinds("b", SelectedPairChanged) if e.local == b_host][-1]
    assert back_a <= back_b + 0.1 and back_b <= back_a + 0.1


def test_the_controlled_side_does_not_probe() -> None:
    a, b, wire, _, _ = _direct_and_relay_setup()
    assert not b.note_data_sent(wire.now)
    direct = {A_HOST, B_HOST}
    wire.drop = lambda sender, t: t.src in direct and t.dst in direct
    for _ in range(100):
        b.note_data_sent(wire.now)
        wire.run(wire.now + 0.05)
    assert not wire.kinds("b", PathsUnanswered)
    assert not any(p.unresponsive for p in b.pairs)
