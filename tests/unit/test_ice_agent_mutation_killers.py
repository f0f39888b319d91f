"""Spec checks of the sans-IO ICE agent that mutation testing showed missing (issue 11).

RFC 8445 (pair states, triggered checks, role conflicts), RFC 7675 consent, the agent's deadlines and the controlling
side's dead-path probing (docs/architecture.md, ICE), all with a fake clock through the agent's public API.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable

import pytest

from dataplane import stun
from dataplane.base import Transmit
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
    IceFailed,
    IceState,
    PairState,
    PeerReflexiveCandidateLearned,
    RoleChanged,
    SelectedPairChanged,
    pair_priority,
)
from dataplane.ice.agent import (
    FINISHED_TRANSACTIONS_KEPT,
    MAX_LEARNED_LOCAL_CANDIDATES,
    MAX_OPTIMISTIC_CANDIDATES,
    MAX_PAIRS,
    MAX_PEER_REFLEXIVE_CANDIDATES,
    MAX_REMOTE_CANDIDATES,
    PathsUnanswered,
)
from dataplane.ice.candidate import compute_foundation, compute_priority
from dataplane.io.rng import SeededRng
from tests.unit.test_ice_agent import (
    A_HOST,
    A_PUBLIC,
    B_HOST,
    B_RELAY,
    Wire,
    _direct_and_relay_setup,
    _direct_and_relay_wired,
    _send_data,
    host_setup,
    make_pair,
)

B_PASSWORD = "b-password-0123456789b"


def _requests_to(wire: Wire, sender: str, dst: tuple[str, int], after: float) -> list[float]:
    return [
        t
        for t, transmit in wire.sent[sender]
        if t > after and transmit.dst == dst and stun.decode(transmit.payload).is_request
    ]


# ---- the shared directory and close() ----------------------------------------------------------------------------


def test_directory_counts_transactions_and_pairs_and_close_withdraws_outstanding_checks() -> None:
    directory = AgentDirectory()
    a = IceAgent(True, "aufr", "a-pw-0123456789012345", "bufr", B_PASSWORD, SeededRng(3), directory=directory)
    a.add_local_candidate(Candidate.host(A_HOST), A_HOST, 0.0)
    a.add_remote_candidate(Candidate.host(B_HOST), 0.0)
    assert len(directory) == 1  # one pair, nothing sent yet
    a.handle_timeout(0.0)
    transmit = a.poll_transmit()
    assert transmit is not None
    transaction_id = stun.decode(transmit.payload).transaction_id
    assert directory.agent_for_transaction(transaction_id) is a
    assert len(directory) == 2  # the pair and its check
    a.close()
    assert directory.agent_for_transaction(transaction_id) is None
    assert len(directory) == 0
    a.close()  # closing twice is harmless
    assert len(directory) == 0


def test_pair_repr_says_nominated_only_for_nominated_pairs() -> None:
    a, b, wire = host_setup()
    (pair,) = a.pairs
    assert "nominated" not in repr(pair) and "waiting" in repr(pair)
    wire.run(3.0)
    (pair,) = a.pairs
    assert pair.nominated and repr(pair).endswith("succeeded, nominated)")


# ---- deadlines -------------------------------------------------------------------------------------------------


def test_poll_timeout_names_each_deadline() -> None:
    a, _ = make_pair()
    assert a.poll_timeout() is None  # nothing to do yet
    a.add_local_candidate(Candidate.host(A_HOST), A_HOST, 2.0)
    assert a.poll_timeout() == (2.0 + 20.0, "idle")
    a.note_activity(10.0)
    assert a.idle is False
    assert a.poll_timeout() == (10.0 + 20.0, "idle")
    a.add_remote_candidate(Candidate.host(B_HOST), 11.0)
    assert a.poll_timeout() == (11.0, "connectivity check")  # the first check is due at once


def test_consent_deadlines_are_named_and_expiry_comes_30_s_after_the_last_answer() -> None:
    a, b, wire = host_setup()
    wire.run(3.0)
    timeout = a.poll_timeout()
    assert timeout is not None and timeout[1] == "consent check" and 3.0 < timeout[0] <= 3.0 + 6.0
    (pair,) = a.pairs
    last = pair.last_response_at
    assert last is not None
    wire.drop = lambda sender, t: True
    reasons = []
    while wire.now < last + 29.9:
        wire.run(wire.now + 0.5)
        timeout = a.poll_timeout()
        assert timeout is not None
        reasons.append(timeout)
    assert (last + 30.0, "consent expiry") in reasons  # no consent check is due before consent runs out


def test_note_data_received_without_a_selected_pair_does_nothing() -> None:
    a, _ = make_pair()
    assert a.note_data_received(1.0) is False
    assert a.note_data_sent(1.0) is False
    a.add_local_candidate(Candidate.host(A_HOST), A_HOST, 1.0)
    a.add_remote_candidate(Candidate.host(B_HOST), 1.0)
    assert a.note_data_received(1.0) is False


# ---- pair failure, consent loss and fallback ------------------------------------------------------------------


def _relay_path(sender: str, t: Transmit) -> bool:
    return B_RELAY in (t.src, t.dst)


def _error_answer(
    wire: Wire, agent: IceAgent, dst: tuple[str, int], also_drop: Callable[[str, Transmit], bool] = lambda s, t: False
) -> bytes:
    """Intercepts ``agent``'s next request to ``dst`` and builds the peer's 400 answer to it."""
    captured: list[Transmit] = []

    def capture(sender: str, t: Transmit) -> bool:
        if t.dst == dst and stun.decode(t.payload).is_request and not captured:
            captured.append(t)
            return True
        return also_drop(sender, t)

    wire.drop = capture
    while not captured:
        wire.run(wire.now + 0.5)
    wire.drop = also_drop
    answer = stun.decode(captured[0].payload).error_response(400, "Bad Request")
    return stun.encode(answer, integrity_key=stun.short_term_key(B_PASSWORD), fingerprint=True)


def test_an_error_answer_on_the_only_pair_disconnects_and_the_pair_is_checked_again() -> None:
    a, b, wire = host_setup()
    wire.run(3.0)
    answer = _error_answer(wire, a, B_HOST)
    assert a.handle_stun(answer, B_HOST, A_HOST, wire.now)
    (disconnected,) = [e for e in iter(a.poll_event, None) if isinstance(e, IceDisconnected)]
    assert isinstance(disconnected.reason, str) and "error" in disconnected.reason
    assert a.selected_pair is None and a.state is IceState.DISCONNECTED
    (pair,) = a.pairs
    assert pair.state is not PairState.FAILED and pair.nominated is False  # re-checked, nominated afresh
    failed_at = wire.now
    wire.run(failed_at + 3.0)
    assert a.failed is False and a.selected_pair is not None
    assert [t for t, _ in wire.kinds("a", IceConnected) if t >= failed_at]


def test_an_error_answer_on_the_selected_pair_moves_to_the_other_working_pair() -> None:
    a, b, wire, b_host, b_relay = _direct_and_relay_setup()
    answer = _error_answer(wire, a, B_HOST)
    assert a.handle_stun(answer, B_HOST, A_HOST, wire.now)
    direct = next(p for p in a.pairs if p.remote.address == B_HOST)
    assert direct.state is PairState.FAILED and direct.nominated is False
    assert a.selected_pair is not None and a.selected_pair[1] == b_relay
    assert not [e for e in iter(a.poll_event, None) if isinstance(e, IceDisconnected)]


def test_losing_the_selected_pair_falls_back_to_a_pair_that_answers_probes() -> None:
    """No nominated pair is left (a probe round voided them) when the selected pair fails: the fallback is a working
    pair that answered its probe, not one that stayed silent."""
    relay2: tuple[str, int] = ("198.51.100.2", 3001)
    a, b, wire, b_host, b_relay = _direct_and_relay_wired()
    wire.own("b", relay2)
    b_relay2 = Candidate.relayed(relay2, B_HOST)
    b.add_local_candidate(b_relay2, B_HOST, 0.0)
    a.add_remote_candidate(b_relay2, 0.0)
    wire.run(20.0)
    assert a.selected_pair is not None and a.selected_pair[1] == b_host
    assert all(p.state is PairState.SUCCEEDED for p in a.pairs)

    def silent_paths_and_nominations(sender: str, t: Transmit) -> bool:
        if B_HOST in (t.src, t.dst) or B_RELAY in (t.src, t.dst):
            return True
        message = stun.decode(t.payload)
        return message.is_request and message.use_candidate()

    wire.drop = silent_paths_and_nominations
    _send_data(wire, a, 23.0)
    by_remote = {p.remote.address: p for p in a.pairs}
    assert by_remote[B_HOST].unresponsive and by_remote[B_RELAY].unresponsive
    assert not by_remote[relay2].unresponsive
    assert a.selected_pair is not None and a.selected_pair[1] == b_host  # its replacement's nomination was lost
    answer = _error_answer(wire, a, B_HOST, also_drop=silent_paths_and_nominations)
    assert a.handle_stun(answer, B_HOST, A_HOST, wire.now)
    assert a.selected_pair is not None and a.selected_pair[1] == b_relay2


def test_a_pair_that_never_answers_fails_without_touching_the_selected_pair() -> None:
    a, b, wire, b_host, b_relay = _direct_and_relay_wired()
    wire.drop = _relay_path
    wire.run(20.0)
    relay = next(p for p in a.pairs if p.remote.address == B_RELAY)
    assert relay.state is PairState.FAILED and relay.nominated is False
    assert a.selected_pair is not None and a.selected_pair[1] == b_host
    changes = [(e.local, e.remote) for _, e in wire.kinds("a", SelectedPairChanged)]
    assert changes == [(Candidate.host(A_HOST), b_host)]  # selected once, never re-announced


def test_consent_lost_on_a_non_selected_pair_fails_it_alone() -> None:
    a, b, wire, b_host, b_relay = _direct_and_relay_setup()
    wire.drop = _relay_path
    wire.run(wire.now + 40.0)
    relay_a = next(p for p in a.pairs if p.remote.address == B_RELAY)
    relay_b = next(p for p in b.pairs if p.local.address == B_RELAY)
    assert relay_a.state is PairState.FAILED and relay_a.nominated is False
    assert relay_b.state is PairState.FAILED and relay_b.remote_nominated is False
    assert a.selected_pair is not None and a.selected_pair[1] == b_host
    assert b.selected_pair is not None and b.selected_pair[0] == b_host
    assert not wire.kinds("a", IceDisconnected) and not wire.kinds("b", IceDisconnected)


def test_after_a_disconnect_failed_pairs_are_checked_again() -> None:
    """RFC 7675 consent runs out on the selected pair: every pair, also one that failed before, is re-checked."""
    a, b, wire, b_host, b_relay = _direct_and_relay_wired()
    wire.drop = _relay_path
    wire.run(25.0)
    assert next(p for p in a.pairs if p.remote.address == B_RELAY).state is PairState.FAILED
    assert not _requests_to(wire, "a", B_RELAY, 20.0)
    wire.drop = lambda sender, t: True
    wire.run(60.0)
    (disconnected_at, _) = wire.kinds("a", IceDisconnected)[0]
    assert _requests_to(wire, "a", B_RELAY, disconnected_at)


# ---- triggered checks (RFC 8445 §7.3.1.4) ------------------------------------------------------------------------


def _check_to_b(transaction_id: bytes) -> bytes:
    request = stun.StunMessage.request(stun.Method.BINDING, transaction_id)
    request.add_username("bufr:aufr").add_priority(12345).add_ice_controlling(5)
    return stun.encode(request, integrity_key=stun.short_term_key(B_PASSWORD), fingerprint=True)


def _next_check(agent: IceAgent) -> Transmit:
    timeout = agent.poll_timeout()
    assert timeout is not None
    agent.handle_timeout(timeout[0])
    transmits = [t for t in iter(agent.poll_transmit, None) if stun.decode(t.payload).is_request]
    assert transmits
    return transmits[0]


def test_a_check_received_on_a_waiting_pair_is_answered_by_a_triggered_check_first() -> None:
    a, b, wire, b_host, b_relay = _direct_and_relay_wired()
    assert b.handle_stun(_check_to_b(b"\x02" * 12), A_HOST, B_RELAY, 0.0)
    check = _next_check(b)
    assert (check.src, check.dst) == (B_RELAY, A_HOST)  # before the higher-priority host pair


def test_a_check_received_on_a_failed_pair_makes_it_waiting_and_triggers_a_check() -> None:
    a, b, wire, b_host, b_relay = _direct_and_relay_wired()
    wire.drop = _relay_path
    wire.run(25.0)
    relay = next(p for p in a.pairs if p.remote.address == B_RELAY)
    assert relay.state is PairState.FAILED
    request = stun.StunMessage.request(stun.Method.BINDING, b"\x03" * 12)
    request.add_username("aufr:bufr").add_priority(12345).add_ice_controlled(5)
    check_to_a = stun.encode(request, integrity_key=stun.short_term_key("a-password-0123456789a"), fingerprint=True)
    assert a.handle_stun(check_to_a, B_RELAY, A_HOST, wire.now)
    assert next(p for p in a.pairs if p.remote.address == B_RELAY).state.value == "waiting"
    check = _next_check(a)
    assert (check.src, check.dst) == (A_HOST, B_RELAY)
    assert next(p for p in a.pairs if p.remote.address == B_RELAY).state.value == "in-progress"


# ---- role conflicts --------------------------------------------------------------------------------------------


def test_after_a_role_switch_pair_priorities_follow_the_new_role() -> None:
    a, b, wire = host_setup(b_controlling=True)
    wire.run(3.0)
    for name, agent in (("a", a), ("b", b)):
        for _, event in wire.kinds(name, RoleChanged):
            assert event.controlling is agent.controlling
    assert [e for _, e in wire.kinds("a", RoleChanged)] + [e for _, e in wire.kinds("b", RoleChanged)]
    assert a.controlling != b.controlling
    for agent in (a, b):
        for pair in agent.pairs:
            local, remote = pair.local.priority, pair.remote.priority
            expected = pair_priority(local, remote) if agent.controlling else pair_priority(remote, local)
            assert pair.priority == expected


# ---- candidates ------------------------------------------------------------------------------------------------


def test_a_signalled_candidate_replaces_the_peer_reflexive_one_only_in_its_own_pairs() -> None:
    _, b, _ = host_setup()
    unknown = ("10.0.0.9", 9000)
    assert b.handle_stun(_check_to_b(b"\x04" * 12), unknown, B_HOST, 0.0)
    learned = [e for e in iter(b.poll_event, None) if isinstance(e, PeerReflexiveCandidateLearned)]
    assert learned and learned[0].candidate.address == unknown
    signalled = Candidate.host(unknown)
    b.add_remote_candidate(signalled, 0.1)
    by_remote = {p.remote.address: p for p in b.pairs}
    assert by_remote[unknown].remote == signalled
    assert by_remote[unknown].priority == pair_priority(signalled.priority, by_remote[unknown].local.priority)
    assert by_remote[A_HOST].remote == Candidate.host(A_HOST)


def test_invalidating_a_candidate_forgets_only_what_was_derived_from_it() -> None:
    a, _ = make_pair()
    a.add_local_candidate(Candidate.host(A_HOST), A_HOST, 0.0)
    srflx = Candidate.server_reflexive(("203.0.113.9", 5000), ("10.0.0.2", 2000))
    first, second = Candidate.host(("10.0.0.2", 2000)), Candidate.host(("10.0.0.3", 7000))
    for candidate in (first, srflx, second):
        a.add_remote_candidate(candidate, 0.0)
    remotes = {c.address for c in a.remote_candidates}
    assert {("203.0.113.9", 2000), ("203.0.113.9", 7000)} <= remotes  # optimistic: srflx IP × host port
    a.invalidate_remote_candidate(Candidate.host(("10.9.9.9", 1)), 0.1)  # unknown: nothing happens
    assert {c.address for c in a.remote_candidates} == remotes
    a.invalidate_remote_candidate(second, 0.2)
    assert {c.address for c in a.remote_candidates} == remotes - {second.address, ("203.0.113.9", 7000)}
    assert {p.remote.address for p in a.pairs} == remotes - {second.address, ("203.0.113.9", 7000)}
    a.add_remote_candidate(second, 0.3)  # signalled again: its optimistic candidate comes back
    assert {c.address for c in a.remote_candidates} == remotes


def test_removing_a_local_base_forgets_its_reflexive_candidates_only() -> None:
    a, _ = make_pair()
    other: tuple[str, int] = ("10.0.1.1", 1001)
    a.add_local_candidate(Candidate.host(A_HOST), A_HOST, 0.0)
    a.add_local_candidate(Candidate.host(other), other, 0.0)
    a.add_local_candidate(Candidate.server_reflexive(("203.0.113.5", 1), A_HOST), A_HOST, 0.0)
    a.add_local_candidate(Candidate.server_reflexive(("203.0.113.5", 2), other), other, 0.0)
    a.add_remote_candidate(Candidate.host(B_HOST), 0.0)
    a.remove_local_candidate(Candidate.host(("10.9.9.9", 1)), 0.1)  # unknown: nothing happens
    assert len(a.local_candidates) == 4
    a.remove_local_candidate(Candidate.host(A_HOST), 0.2)
    assert {c.address for c in a.local_candidates} == {other, ("203.0.113.5", 2)}
    assert [(p.local.address, p.remote.address) for p in a.pairs] == [(other, B_HOST)]
    a.remove_local_candidate(Candidate.server_reflexive(("203.0.113.5", 2), other), 0.3)  # announced only: no pairs
    assert {c.address for c in a.local_candidates} == {other}
    assert [(p.local.address, p.remote.address) for p in a.pairs] == [(other, B_HOST)]


# ---- dead-path probing (controlling side) ------------------------------------------------------------------------


def test_probe_rounds_back_off_while_nothing_answers() -> None:
    a, b, wire, b_host, _ = _direct_and_relay_setup()
    wire.drop = lambda sender, t: True
    _send_data(wire, a, wire.now + 25.0)
    times = [t for t, _ in wire.kinds("a", PathsUnanswered)]
    gaps = [round(later - earlier, 1) for earlier, later in zip(times, times[1:], strict=False)]
    # A round is given up after probe_timeout (1 s); the next waits suspect_after (1 s) doubled each round, at most
    # one consent interval (5 s).
    assert gaps[:5] == [2.0, 3.0, 5.0, 6.0, 6.0]


def test_data_heard_on_an_unanswering_selected_pair_makes_it_responsive_again() -> None:
    a, b, wire, b_host, _ = _direct_and_relay_setup()
    wire.drop = lambda sender, t: True
    _send_data(wire, a, wire.now + 3.0)
    assert wire.kinds("a", PathsUnanswered)
    selected = next(p for p in a.pairs if p.remote.address == B_HOST)
    assert selected.unresponsive
    assert a.note_data_received(wire.now) is True
    assert not selected.unresponsive
    assert a.selected_pair is not None and a.selected_pair[1] == b_host
    timeout = a.poll_timeout()
    assert timeout is not None and timeout[1] != "path probe"  # the silence clock stopped


def test_probes_go_only_to_pairs_that_succeeded() -> None:
    a, b, wire, b_host, b_relay = _direct_and_relay_wired()
    wire.drop = _relay_path
    wire.run(25.0)  # the relay pair's checks gave up at about 17 s
    wire.drop = lambda sender, t: True
    _send_data(wire, a, 40.0)
    assert wire.kinds("a", PathsUnanswered)
    assert not _requests_to(wire, "a", B_RELAY, 20.0)  # the relay pair failed: not probed


# ---- answers to requests (RFC 8445 §7.3, RFC 8489) ---------------------------------------------------------------


def _answers(agent: IceAgent) -> list[Transmit]:
    return [t for t in iter(agent.poll_transmit, None) if not stun.decode(t.payload).is_request]


def test_a_check_without_priority_is_answered_400_from_where_it_arrived() -> None:
    _, b, _ = host_setup()
    request = stun.StunMessage.request(stun.Method.BINDING, b"\x05" * 12)
    request.add_username("bufr:aufr").add_ice_controlling(5)
    assert b.handle_stun(stun.encode(request, integrity_key=stun.short_term_key(B_PASSWORD)), A_HOST, B_HOST, 0.0)
    (answer,) = _answers(b)
    assert (answer.src, answer.dst) == (B_HOST, A_HOST)
    assert stun.has_fingerprint(answer.payload)
    assert stun.check_integrity(answer.payload, stun.short_term_key(B_PASSWORD))
    decoded = stun.decode(answer.payload)
    assert decoded.transaction_id == b"\x05" * 12
    assert decoded.error_code() == (400, "Bad Request")
    assert b.drops[DropReason.MISSING_PRIORITY] == 1


def test_answers_go_back_to_the_source_from_the_receiving_address_with_a_fingerprint() -> None:
    _, b, _ = host_setup()
    assert b.handle_stun(_check_to_b(b"\x06" * 12), A_HOST, B_HOST, 0.0)
    (success,) = _answers(b)
    assert (success.src, success.dst) == (B_HOST, A_HOST) and stun.has_fingerprint(success.payload)
    request = stun.StunMessage.request(stun.Method.BINDING, b"\x08" * 12)
    request.add_username("bufr:aufr").add_priority(1).add_ice_controlling(5).add(0x7777, b"abcd")
    assert b.handle_stun(stun.encode(request, integrity_key=stun.short_term_key(B_PASSWORD)), A_HOST, B_HOST, 0.0)
    (rejection,) = _answers(b)
    assert (rejection.src, rejection.dst) == (B_HOST, A_HOST) and stun.has_fingerprint(rejection.payload)


def test_a_learned_local_candidate_takes_the_priority_its_checks_announced() -> None:
    """RFC 8445 §7.2.5.3.1: a peer-reflexive candidate learned from a response gets the PRIORITY of the request."""
    a, b = make_pair()
    wire = Wire(a, b)
    wire.own("a", A_HOST)
    wire.own("b", B_HOST)
    wire.nat[A_HOST] = ("203.0.113.5", 40000)
    a.add_local_candidate(Candidate.host(A_HOST, local_preference=100), A_HOST, 0.0)
    b.add_local_candidate(Candidate.host(B_HOST), B_HOST, 0.0)
    a.add_remote_candidate(Candidate.host(B_HOST), 0.0)
    wire.run(2.0)
    announced = {stun.decode(t.payload).priority() for _, t in wire.sent["a"] if stun.decode(t.payload).is_request}
    (learned,) = [e.candidate for _, e in wire.kinds("a", PeerReflexiveCandidateLearned)]
    assert announced == {learned.priority}


def test_ice_connected_names_the_selected_pair() -> None:
    a, b, wire = host_setup()
    wire.run(3.0)
    (_, connected) = wire.kinds("a", IceConnected)[0]
    assert (connected.local, connected.remote) == a.selected_pair
    assert (connected.local.address, connected.remote.address) == (A_HOST, B_HOST)


def test_a_check_on_an_address_that_is_not_a_base_is_answered_but_pairs_nothing() -> None:
    _, b, _ = host_setup()
    b_public = ("203.0.113.20", 2000)
    assert b.handle_stun(_check_to_b(b"\x09" * 12), ("10.0.0.7", 7), b_public, 0.0)
    (answer,) = _answers(b)
    assert (answer.src, answer.dst) == (b_public, ("10.0.0.7", 7))
    assert stun.decode(answer.payload).message_class == stun.MessageClass.SUCCESS
    assert [p.remote.address for p in b.pairs] == [A_HOST]
    assert [c.address for c in b.remote_candidates] == [A_HOST]


def test_a_response_to_someone_elses_transaction_is_not_consumed() -> None:
    a, b, wire = host_setup()
    response = stun.StunMessage.request(stun.Method.BINDING, b"\x0a" * 12).success_response()
    assert not a.handle_stun(stun.encode(response), B_HOST, A_HOST, 0.0)


def test_peer_reflexive_candidates_from_one_ip_share_a_foundation() -> None:
    """RFC 8445 §5.1.1.3: same type, same IP -> same foundation; component 1, UDP."""
    _, b, _ = host_setup()
    for port, transaction in ((7000, b"\x0b"), (7001, b"\x0c")):
        assert b.handle_stun(_check_to_b(transaction * 12), ("10.0.0.7", port), B_HOST, 0.0)
    learned = [e.candidate for e in iter(b.poll_event, None) if isinstance(e, PeerReflexiveCandidateLearned)]
    assert len(learned) == 2
    assert learned[0].foundation == learned[1].foundation and learned[0].foundation
    assert all(c.component == 1 and c.transport == "udp" and c.priority == 12345 for c in learned)
    other = Candidate.host(("10.0.0.8", 7000))
    assert b.handle_stun(_check_to_b(b"\x0d" * 12), other.address, B_HOST, 0.0)
    (third,) = [e.candidate for e in iter(b.poll_event, None) if isinstance(e, PeerReflexiveCandidateLearned)]
    assert third.foundation != learned[0].foundation


def _role_request(transaction: bytes, *, controlling: int | None = None, controlled: int | None = None) -> bytes:
    request = stun.StunMessage.request(stun.Method.BINDING, transaction)
    request.add_username("bufr:aufr").add_priority(12345)
    if controlling is not None:
        request.add_ice_controlling(controlling)
    if controlled is not None:
        request.add_ice_controlled(controlled)
    return stun.encode(request, integrity_key=stun.short_term_key(B_PASSWORD), fingerprint=True)


def test_role_conflicts_follow_the_tie_breakers() -> None:
    """RFC 8445 §7.3.1.1: the larger tie-breaker controls; the agent that keeps its role answers 487."""
    for b_controlling in (False, True):
        _, b, _ = host_setup(b_controlling=b_controlling)
        lower, higher = b.tie_breaker - 1, b.tie_breaker + 1
        same_role = {"controlling": higher} if b_controlling else {"controlled": lower}
        assert b.handle_stun(_role_request(b"\x0e" * 12, **same_role), A_HOST, B_HOST, 0.0)
        (answer,) = _answers(b)
        assert stun.decode(answer.payload).message_class == stun.MessageClass.SUCCESS
        assert b.controlling is not b_controlling  # the peer won: b switched
        assert [e for e in iter(b.poll_event, None) if isinstance(e, RoleChanged)] == [RoleChanged(not b_controlling)]
        # Now the peer claims b's new role with a tie-breaker that loses: b keeps it and answers 487.
        losing = {"controlling": b.tie_breaker - 1} if b.controlling else {"controlled": b.tie_breaker + 1}
        assert b.handle_stun(_role_request(b"\x0f" * 12, **losing), A_HOST, B_HOST, 0.0)
        (answer,) = _answers(b)
        assert stun.decode(answer.payload).error_code() == (487, "Role Conflict")
        assert b.controlling is not b_controlling


# ---- diagnostics: the debug log says which pair changed and why --------------------------------------------------

_AGENT_LOGGER = "dataplane.ice.agent"


def _debug_messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == _AGENT_LOGGER and r.levelno == logging.DEBUG]


def test_the_debug_log_names_a_failed_pair_and_the_reason(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=_AGENT_LOGGER)
    a, b, wire, b_host, b_relay = _direct_and_relay_wired()
    wire.drop = _relay_path
    wire.run(20.0)
    relay = next(p for p in a.pairs if p.remote.address == B_RELAY)
    assert f"pair {relay!r} failed: no response" in _debug_messages(caplog)

    caplog.clear()
    answer = _error_answer(wire, a, B_HOST, also_drop=_relay_path)
    assert a.handle_stun(answer, B_HOST, A_HOST, wire.now)
    direct = next(p for p in a.pairs if p.remote.address == B_HOST)
    messages = _debug_messages(caplog)
    assert f"check on {direct!r} answered with error (400, 'Bad Request')" in messages
    assert f"pair {direct!r} failed: error response (400, 'Bad Request')" in messages

    a2, _, _ = host_setup()
    a2.handle_timeout(0.0)
    check = a2.poll_transmit()
    assert check is not None
    response = stun.decode(check.payload).success_response()
    payload = stun.encode(response, integrity_key=stun.short_term_key(B_PASSWORD))
    caplog.clear()
    assert a2.handle_stun(payload, ("10.9.9.9", 2000), A_HOST, 0.01)
    (pair,) = a2.pairs
    assert f"pair {pair!r} failed: response from an unexpected address" in _debug_messages(caplog)


def test_the_debug_log_reports_consent_loss_and_probe_rounds(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=_AGENT_LOGGER)
    a, b, wire, b_host, b_relay = _direct_and_relay_setup()
    wire.drop = _relay_path
    wire.run(wire.now + 40.0)
    relay = next(p for p in a.pairs if p.remote.address == B_RELAY)
    assert f"consent lost on {relay!r}" in _debug_messages(caplog)

    a, b, wire, b_host, b_relay = _direct_and_relay_setup()
    caplog.clear()
    wire.drop = lambda sender, t: True
    _send_data(wire, a, wire.now + 3.0)
    direct = next(p for p in a.pairs if p.remote.address == B_HOST)
    messages = _debug_messages(caplog)
    rounds = [m for m in messages if m.endswith(": probing every succeeded pair")]
    assert rounds and re.fullmatch(rf"selected pair {re.escape(repr(direct))} silent since 2\d\.\d\d\d: .*", rounds[0])
    assert f"selected pair {direct!r} did not answer its probe; nominating a pair that does" in messages


def test_the_debug_log_says_a_check_on_a_non_base_address_was_only_answered(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=_AGENT_LOGGER)
    _, b, _ = host_setup()
    assert b.handle_stun(_check_to_b(b"\x10" * 12), ("10.0.0.7", 7), ("203.0.113.20", 2000), 0.0)
    assert _debug_messages(caplog) == [
        "check from ('10.0.0.7', 7) on ('203.0.113.20', 2000), which is not a local base; answered only"
    ]


# ---- what removing candidates reports --------------------------------------------------------------------------


def test_losing_the_selected_pair_to_a_candidate_removal_names_the_removal() -> None:
    a, b, wire = host_setup()
    wire.run(3.0)
    a.remove_local_candidate(Candidate.host(A_HOST), 3.0)
    disconnected = [e for e in iter(a.poll_event, None) if isinstance(e, IceDisconnected)]
    assert disconnected == [IceDisconnected("local candidate removed")]
    a, b, wire = host_setup()
    wire.run(3.0)
    a.invalidate_remote_candidate(Candidate.host(B_HOST), 3.0)
    disconnected = [e for e in iter(a.poll_event, None) if isinstance(e, IceDisconnected)]
    assert disconnected == [IceDisconnected("remote candidate invalidated")]


def test_any_first_input_starts_the_idle_clock() -> None:
    """Idle = ``idle_after`` (20 s) without activity, counted from the agent's first input, whatever it is."""
    unknown = Candidate.host(("10.9.9.9", 1))
    inputs: list[Callable[[IceAgent], object]] = [
        lambda agent: agent.handle_stun(b"not STUN", B_HOST, A_HOST, 5.0),
        lambda agent: agent.add_local_candidate(Candidate.server_reflexive(A_PUBLIC, A_HOST), A_HOST, 5.0),
        lambda agent: agent.add_remote_candidate(Candidate.host(("fd00::2", 2000)), 5.0),
        lambda agent: agent.remove_local_candidate(unknown, 5.0),
        lambda agent: agent.invalidate_remote_candidate(unknown, 5.0),
        lambda agent: agent.handle_timeout(5.0),
    ]
    for first_input in inputs:
        a, _ = make_pair()
        first_input(a)
        assert a.poll_timeout() == (25.0, "idle")


def test_a_check_that_is_due_is_due_at_the_latest_input() -> None:
    a, _ = make_pair()
    a.add_local_candidate(Candidate.host(A_HOST), A_HOST, 0.0)
    a.add_remote_candidate(Candidate.host(B_HOST), 0.0)
    a.note_activity(7.0)
    assert a.poll_timeout() == (7.0, "connectivity check")


# ---- bounded tables: a check is still ours when a table is full ----------------------------------------------------


def _full_check_list_b() -> IceAgent:
    _, b = make_pair()
    b.add_local_candidate(Candidate.host(B_HOST), B_HOST, 0.0)
    b.add_local_candidate(Candidate.relayed(B_RELAY, B_HOST), B_RELAY, 0.0)
    b.add_remote_candidate(Candidate.host(A_HOST), 0.0)
    for index in range(MAX_PAIRS // 2 - 1):
        b.add_remote_candidate(Candidate.host((f"10.2.0.{index + 1}", 7000)), 0.0)
    assert len(b.pairs) == MAX_PAIRS
    return b


def test_with_a_full_check_list_a_check_on_a_known_pair_still_triggers_it() -> None:
    b = _full_check_list_b()
    assert b.handle_stun(_check_to_b(b"\x11" * 12), A_HOST, B_RELAY, 0.0)
    assert b.drops[DropReason.TOO_MANY_PAIRS] == 0
    check = _next_check(b)
    assert (check.src, check.dst) == (B_RELAY, A_HOST)  # the triggered check, not the best waiting pair
    assert b.handle_stun(_check_to_b(b"\x12" * 12), ("203.0.113.9", 30000), B_HOST, 0.1)  # answered, then dropped
    assert b.drops[DropReason.TOO_MANY_PAIRS] == 1


def test_a_check_from_one_source_too_many_is_answered_and_consumed() -> None:
    _, b, _ = host_setup()
    for port in range(MAX_PEER_REFLEXIVE_CANDIDATES + 1):
        transaction = bytes([0x20, port]) * 6
        assert b.handle_stun(_check_to_b(transaction), ("203.0.113.9", 20000 + port), B_HOST, 0.0)
    assert b.drops[DropReason.TOO_MANY_CANDIDATES] == 1
    assert len(_answers(b)) == MAX_PEER_REFLEXIVE_CANDIDATES + 1


def test_forgotten_candidates_free_their_budget() -> None:
    """Invalidated peer-reflexive and optimistic candidates, and local ones learned through a removed base, no longer
    count against their bounds."""
    _, b, _ = host_setup()
    for index in range(MAX_PEER_REFLEXIVE_CANDIDATES + 4):
        source: tuple[str, int] = ("203.0.113.9", 20000 + index)
        assert b.handle_stun(_check_to_b(bytes([0x30, index]) * 6), source, B_HOST, 0.0)
        assert source in {c.address for c in b.remote_candidates}
        b.invalidate_remote_candidate(Candidate.host(source), 0.0)
    assert b.drops[DropReason.TOO_MANY_CANDIDATES] == 0

    a, _ = make_pair()
    a.add_local_candidate(Candidate.host(A_HOST), A_HOST, 0.0)
    a.add_remote_candidate(Candidate.server_reflexive(("203.0.113.9", 5000), ("10.0.0.2", 2000)), 0.0)
    for index in range(MAX_OPTIMISTIC_CANDIDATES + 4):
        host = Candidate.host(("10.0.0.2", 3000 + index))
        a.add_remote_candidate(host, 0.0)
        assert ("203.0.113.9", 3000 + index) in {c.address for c in a.remote_candidates}
        a.invalidate_remote_candidate(host, 0.0)
    assert a.drops[DropReason.TOO_MANY_CANDIDATES] == 0

    a, _ = make_pair()
    keeper: tuple[str, int] = ("10.0.2.1", 1000)
    a.add_local_candidate(Candidate.host(keeper), keeper, 0.0)
    a.add_remote_candidate(Candidate.host(B_HOST), 0.0)
    peer_key = stun.short_term_key(B_PASSWORD)
    learned = 0
    now = 0.0
    for index in range(MAX_LEARNED_LOCAL_CANDIDATES + 4):
        base: tuple[str, int] = ("10.0.1.1", 1000 + index)
        a.add_local_candidate(Candidate.host(base), base, now)
        for _ in range(3):
            now += 0.1
            a.handle_timeout(now)
            for transmit in iter(a.poll_transmit, None):
                request = stun.decode(transmit.payload)
                assert transmit.src is not None
                mapped = ("198.18.0.1", 10000 + index) if transmit.src == base else transmit.src
                response = request.success_response().add_xor_address(stun.Attr.XOR_MAPPED_ADDRESS, mapped)
                payload = stun.encode(response, integrity_key=peer_key, fingerprint=True)
                a.handle_stun(payload, transmit.dst, transmit.src, now)
        learned += sum(1 for e in iter(a.poll_event, None) if isinstance(e, PeerReflexiveCandidateLearned))
        a.remove_local_candidate(Candidate.host(base), now)
    assert learned == MAX_LEARNED_LOCAL_CANDIDATES + 4
    assert a.drops[DropReason.TOO_MANY_CANDIDATES] == 0


def test_the_directory_remembers_exactly_the_last_finished_transactions() -> None:
    directory = AgentDirectory()
    a = IceAgent(True, "aufr", "a-pw-0123456789012345", "bufr", B_PASSWORD, SeededRng(3), directory=directory)
    ids = [index.to_bytes(12, "big") for index in range(FINISHED_TRANSACTIONS_KEPT + 2)]
    for transaction_id in ids:
        directory._add_transaction(transaction_id, a)
        directory._remove_transaction(transaction_id, a)
    assert not directory.recently_finished(ids[0]) and not directory.recently_finished(ids[1])
    assert all(directory.recently_finished(transaction_id) for transaction_id in ids[2:])


def test_a_waiting_pair_repr_ends_with_its_state() -> None:
    a, _, _ = host_setup()
    (pair,) = a.pairs
    assert repr(pair) == "CandidatePair(host ('10.0.0.1', 1000) -> host ('10.0.0.2', 2000), waiting)"


# ---- role conflicts: equal tie-breakers and 487 answers (RFC 8445 §7.3.1.1, §7.2.5.1) ------------------------------


def test_an_equal_tie_breaker_counts_as_ours_being_larger() -> None:
    """RFC 8445 §7.3.1.1: "larger than or equal to": a controlling agent answers 487 and keeps its role; a controlled
    agent switches to controlling."""
    _, b, _ = host_setup(b_controlling=True)
    assert b.handle_stun(_role_request(b"\x13" * 12, controlling=b.tie_breaker), A_HOST, B_HOST, 0.0)
    (answer,) = _answers(b)
    assert stun.decode(answer.payload).error_code() == (487, "Role Conflict")
    assert b.controlling is True
    _, b, _ = host_setup()
    assert b.handle_stun(_role_request(b"\x14" * 12, controlled=b.tie_breaker), A_HOST, B_HOST, 0.0)
    (answer,) = _answers(b)
    assert stun.decode(answer.payload).message_class == stun.MessageClass.SUCCESS
    assert b.controlling is True


def _answer_next_request(
    wire: Wire, dst: tuple[str, int], code: int, reason: str, also_drop: Callable[[str, Transmit], bool] | None = None
) -> tuple[Transmit, bytes]:
    """Intercepts a's next request to ``dst`` (b never sees it) and builds b's error answer to it."""
    captured: list[Transmit] = []
    other = also_drop if also_drop is not None else (lambda s, t: False)

    def capture(sender: str, t: Transmit) -> bool:
        if sender == "a" and t.dst == dst and stun.decode(t.payload).is_request and not captured:
            captured.append(t)
            return True
        return other(sender, t)

    wire.drop = capture
    while not captured:
        wire.run(wire.now + 0.05)
    wire.drop = other
    answer = stun.decode(captured[0].payload).error_response(code, reason)
    return captured[0], stun.encode(answer, integrity_key=stun.short_term_key(B_PASSWORD), fingerprint=True)


def test_a_487_to_a_consent_check_is_consumed_and_changes_nothing() -> None:
    a, b, wire = host_setup()
    wire.run(3.0)
    _, answer = _answer_next_request(wire, B_HOST, 487, "Role Conflict")
    assert a.handle_stun(answer, B_HOST, A_HOST, wire.now)
    assert a.controlling is True and a.selected_pair is not None
    assert not [e for e in iter(a.poll_event, None) if isinstance(e, RoleChanged | IceDisconnected)]


def test_a_487_to_a_nomination_switches_roles_and_leaves_the_choice_to_the_peer() -> None:
    a, b, wire = host_setup()

    def is_nomination(sender: str, t: Transmit) -> bool:
        message = stun.decode(t.payload)
        return sender == "a" and message.is_request and message.use_candidate()

    captured: list[Transmit] = []

    def capture_nominations(sender: str, t: Transmit) -> bool:
        if is_nomination(sender, t):
            captured.append(t)
            return True
        return False

    wire.drop = capture_nominations
    wire.run(0.04)
    assert captured and a.pairs[0].state is PairState.SUCCEEDED
    answer = stun.decode(captured[0].payload).error_response(487, "Role Conflict")
    payload = stun.encode(answer, integrity_key=stun.short_term_key(B_PASSWORD), fingerprint=True)
    assert a.handle_stun(payload, B_HOST, A_HOST, 0.04)
    assert a.controlling is False
    assert [e for e in iter(a.poll_event, None) if isinstance(e, RoleChanged)] == [RoleChanged(False)]
    assert a.selected_pair is None  # now the peer nominates
    assert not [t for t in iter(a.poll_transmit, None) if stun.decode(t.payload).use_candidate()]


# ---- consent and transactions (RFC 7675 §5.1, RFC 8489 §6.2.1) --------------------------------------------------


def test_one_lost_consent_check_does_not_cost_the_pair() -> None:
    """Consent runs out 30 s after the last *answer*; a single unanswered check (not retransmitted) is harmless, also
    when its own 30 s have passed."""
    a, b, wire = host_setup()
    wire.run(3.0)
    sent, _ = _answer_next_request(wire, B_HOST, 400, "unused")
    wire.run(wire.now + 35.0)
    (pair,) = a.pairs
    assert pair.state is PairState.SUCCEEDED and a.selected_pair is not None
    assert not wire.kinds("a", IceDisconnected)
    assert len([t for t, transmit in wire.sent["a"] if transmit.payload == sent.payload]) == 1


def test_an_answered_check_is_over_a_duplicate_answer_is_not_ours() -> None:
    """RFC 8489 §6.2.1: a response ends its transaction; a second copy (the check was retransmitted and answered
    twice) is left to the caller, which counts it as a late answer."""
    a, b, wire = host_setup()
    a.handle_timeout(0.0)
    check = a.poll_transmit()
    assert check is not None and b.handle_stun(check.payload, A_HOST, B_HOST, 0.0)
    (answer,) = _answers(b)
    assert a.handle_stun(answer.payload, B_HOST, A_HOST, 0.01)
    assert not a.handle_stun(answer.payload, B_HOST, A_HOST, 0.02)
    assert a.pairs[0].state is PairState.SUCCEEDED


def test_a_pair_that_fails_withdraws_its_other_checks() -> None:
    a, b, wire = host_setup()
    wire.run(3.0)
    _, first_answer = _answer_next_request(wire, B_HOST, 400, "Bad Request", also_drop=lambda s, t: s == "a")
    second, _ = _answer_next_request(wire, B_HOST, 400, "unused", also_drop=lambda s, t: s == "a")
    assert a.handle_stun(first_answer, B_HOST, A_HOST, wire.now)
    (pair,) = a.pairs
    assert pair.state is not PairState.SUCCEEDED and a.selected_pair is None
    late = stun.decode(second.payload).success_response().add_xor_address(stun.Attr.XOR_MAPPED_ADDRESS, A_HOST)
    late_payload = stun.encode(late, integrity_key=stun.short_term_key(B_PASSWORD), fingerprint=True)
    assert not a.handle_stun(late_payload, B_HOST, A_HOST, wire.now)  # withdrawn: no longer ours


def test_removing_a_candidate_withdraws_its_check_in_flight() -> None:
    a, _ = make_pair()
    a.add_local_candidate(Candidate.host(A_HOST), A_HOST, 0.0)
    a.add_remote_candidate(Candidate.host(B_HOST), 0.0)
    a.handle_timeout(0.0)
    check = a.poll_transmit()
    assert check is not None
    a.remove_local_candidate(Candidate.host(A_HOST), 0.01)
    late = stun.decode(check.payload).success_response()
    payload = stun.encode(late, integrity_key=stun.short_term_key(B_PASSWORD), fingerprint=True)
    assert not a.handle_stun(payload, B_HOST, A_HOST, 0.02)


# ---- nomination (controlling side) -------------------------------------------------------------------------------


def _uses_candidate(t: Transmit) -> bool:
    message = stun.decode(t.payload)
    return message.is_request and message.use_candidate()


def test_one_nomination_at_a_time_per_pair() -> None:
    a, b, wire, b_host, b_relay = _direct_and_relay_wired()
    wire.drop = lambda sender, t: sender == "a" and _uses_candidate(t)
    wire.run(0.5)
    nominations = {stun.decode(t.payload).transaction_id for _, t in wire.sent["a"] if _uses_candidate(t)}
    assert len(nominations) == 1  # retransmitted on its ladder, never doubled by later answers


def _fallback_to_a_silent_relay() -> tuple[IceAgent, IceAgent, Wire]:
    """Everything went silent (a probe round voided the nominations), then the direct pair failed: a falls back to
    the relay pair, which is working by consent but has not answered a probe."""
    a, b, wire, b_host, b_relay = _direct_and_relay_setup()
    wire.drop = lambda sender, t: True
    _send_data(wire, a, wire.now + 3.0)
    assert wire.kinds("a", PathsUnanswered)
    _, answer = _answer_next_request(wire, B_HOST, 400, "Bad Request", also_drop=lambda s, t: True)
    assert a.handle_stun(answer, B_HOST, A_HOST, wire.now)
    relay = next(p for p in a.pairs if p.remote.address == B_RELAY)
    assert a.selected_pair == (relay.local, relay.remote) and relay.unresponsive and not relay.nominated
    list(iter(a.poll_transmit, None))
    return a, b, wire


def test_data_heard_on_a_silent_fallback_pair_gets_it_nominated() -> None:
    a, b, wire = _fallback_to_a_silent_relay()
    assert a.note_data_received(wire.now) is True
    assert [t.dst for t in iter(a.poll_transmit, None) if _uses_candidate(t)] == [B_RELAY]


def test_a_silent_fallback_pair_that_answers_again_is_nominated_and_the_peer_follows() -> None:
    a, b, wire = _fallback_to_a_silent_relay()
    wire.drop = lambda sender, t: B_HOST in (t.src, t.dst)
    wire.run(wire.now + 7.0)
    assert a.selected_pair is not None and a.selected_pair[1].address == B_RELAY
    assert b.selected_pair is not None and b.selected_pair[0].address == B_RELAY
    relay = next(p for p in a.pairs if p.remote.address == B_RELAY)
    assert relay.nominated and not relay.unresponsive


def test_a_probe_round_the_selected_pair_answers_keeps_its_nomination() -> None:
    """Only a silent *selected* pair voids the nominations; another pair missing its probe is just marked."""
    a, b, wire, b_host, b_relay = _direct_and_relay_setup()
    wire.drop = lambda sender, t: _relay_path(sender, t) or (sender == "a" and _uses_candidate(t))
    _send_data(wire, a, wire.now + 3.0)
    by_remote = {p.remote.address: p for p in a.pairs}
    assert by_remote[B_RELAY].unresponsive and not by_remote[B_HOST].unresponsive
    assert by_remote[B_HOST].nominated
    assert not wire.kinds("a", PathsUnanswered)


def test_what_is_not_a_binding_check_or_answer_is_left_to_the_caller(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=_AGENT_LOGGER)
    _, b, _ = host_setup()
    assert not b.handle_stun(b"\x17\x03\x03" + bytes(29), A_HOST, B_HOST, 0.0)  # not STUN at all
    indication = stun.StunMessage(stun.Method.BINDING, stun.MessageClass.INDICATION, b"\x15" * 12)
    assert not b.handle_stun(stun.encode(indication), A_HOST, B_HOST, 0.0)  # a keepalive, not a check
    assert not _debug_messages(caplog) and not b.drops.total()
    overrun = bytearray(_check_to_b(b"\x16" * 12)[:28])
    overrun[2:4] = (8).to_bytes(2, "big")  # STUN-shaped, but its first attribute claims more than is there
    with pytest.raises(stun.StunParseError) as error:
        stun.decode(bytes(overrun))
    assert not b.handle_stun(bytes(overrun), A_HOST, B_HOST, 0.0)
    assert b.drops[DropReason.MALFORMED] == 1
    assert _debug_messages(caplog) == [f"dropping malformed STUN from ('10.0.0.1', 1000): {error.value}"]


def test_checks_announce_the_priority_of_a_peer_reflexive_candidate_of_their_base() -> None:
    """RFC 8445 §7.1.1: PRIORITY = type preference 110 (peer-reflexive), the base's local preference, component 1."""
    a, _ = make_pair()
    a.add_local_candidate(Candidate.host(A_HOST, local_preference=100), A_HOST, 0.0)
    a.add_remote_candidate(Candidate.host(B_HOST), 0.0)
    a.handle_timeout(0.0)
    check = a.poll_transmit()
    assert check is not None
    assert stun.decode(check.payload).priority() == (110 << 24) + (100 << 8) + 255


def test_a_triggered_check_for_a_pair_removed_meanwhile_is_not_sent() -> None:
    b = _full_check_list_b()
    assert b.handle_stun(_check_to_b(b"\x18" * 12), A_HOST, B_RELAY, 0.0)  # triggers B_RELAY -> A_HOST
    b.remove_local_candidate(Candidate.relayed(B_RELAY, B_HOST), 0.0)
    check = _next_check(b)
    assert check.src == B_HOST


# ---- constructor, states, failure reasons --------------------------------------------------------------------------


def test_every_credential_is_required() -> None:
    credentials = ["aufr", "a-password-0123456789a", "bufr", B_PASSWORD]
    for index in range(4):
        local_ufrag, local_pwd, remote_ufrag, remote_pwd = [c if i != index else "" for i, c in enumerate(credentials)]
        with pytest.raises(ValueError, match="^ICE credentials must not be empty$"):
            IceAgent(True, local_ufrag, local_pwd, remote_ufrag, remote_pwd, SeededRng(1))


def test_an_explicit_timing_profile_wins_and_an_agent_starts_active() -> None:
    a = IceAgent(True, "aufr", "a-pw-0123456789012345", "bufr", B_PASSWORD, SeededRng(3), timing=SERVER_PROFILE)
    assert a.timing is SERVER_PROFILE and a.idle is False
    b = IceAgent(False, "bufr", B_PASSWORD, "aufr", "a-pw-0123456789012345", SeededRng(3), timing=CLIENT_PROFILE)
    assert b.timing is CLIENT_PROFILE


def test_states_new_checking_connected_and_a_new_candidate_keeps_connected() -> None:
    a, b, wire = host_setup()
    fresh, _ = make_pair()
    states = [fresh.state]
    fresh.add_local_candidate(Candidate.host(A_HOST), A_HOST, 0.0)
    states.append(fresh.state)  # no pair yet
    fresh.add_remote_candidate(Candidate.host(B_HOST), 0.0)
    states.append(fresh.state)
    assert states == [IceState.NEW, IceState.NEW, IceState.CHECKING]
    wire.run(3.0)
    assert a.state is IceState.CONNECTED
    a.add_remote_candidate(Candidate.host(("10.0.0.9", 9000)), 3.0)
    assert a.state is IceState.CONNECTED


def test_failure_reasons_and_failed_is_reported_once() -> None:
    a, _, _ = host_setup()
    a.handle_timeout(0.0)
    check = a.poll_transmit()
    assert check is not None
    answer = stun.decode(check.payload).error_response(400, "Bad Request")
    assert a.handle_stun(stun.encode(answer, integrity_key=stun.short_term_key(B_PASSWORD)), B_HOST, A_HOST, 0.01)
    assert [e for e in iter(a.poll_event, None) if isinstance(e, IceFailed)] == [
        IceFailed("all candidate pairs failed")
    ]
    a.remove_local_candidate(Candidate.host(A_HOST), 0.02)
    a.invalidate_remote_candidate(Candidate.host(B_HOST), 0.03)
    assert not [e for e in iter(a.poll_event, None) if isinstance(e, IceFailed)]  # terminal: reported once
    a, _, _ = host_setup()
    a.invalidate_remote_candidate(Candidate.host(B_HOST), 0.0)
    assert [e for e in iter(a.poll_event, None) if isinstance(e, IceFailed)] == [IceFailed("no candidate pairs left")]


def test_the_check_list_holds_exactly_max_pairs_and_only_component_1_candidates() -> None:
    a, _ = make_pair(a_controlling=True)
    a.add_local_candidate(Candidate.host(A_HOST), A_HOST, 0.0)
    a.add_local_candidate(Candidate.relayed(B_RELAY, A_HOST), B_RELAY, 0.0)
    for index in range(MAX_PAIRS // 2 + 5):
        a.add_remote_candidate(Candidate.host((f"10.4.0.{index + 1}", 7000)), 0.0)
    assert len(a.pairs) == MAX_PAIRS
    assert a.drops[DropReason.TOO_MANY_PAIRS] > 0
    rtcp = Candidate.host(("10.0.0.8", 7001))
    b, _ = make_pair()
    b.add_local_candidate(Candidate.host(A_HOST), A_HOST, 0.0)
    b.add_remote_candidate(Candidate(rtcp.foundation, 2, "udp", rtcp.priority, rtcp.address, rtcp.kind), 0.0)
    assert b.remote_candidates == [] and b.pairs == []


def test_a_shared_directory_lists_every_agent_holding_a_pair() -> None:
    directory = AgentDirectory()
    agents = [
        IceAgent(True, f"u{i}", "a-pw-0123456789012345", "bufr", B_PASSWORD, SeededRng(i), directory=directory)
        for i in range(2)
    ]
    for agent in agents:
        agent.add_local_candidate(Candidate.host(A_HOST), A_HOST, 0.0)
        agent.add_remote_candidate(Candidate.host(B_HOST), 0.0)
        agent.add_remote_candidate(Candidate.host(B_HOST), 0.0)  # again: listed once
    assert directory.agents_with_pair(A_HOST, B_HOST) == agents


# ---- signalled candidates replace learned and synthesized ones (RFC 8445 §7.3.1.3) ----------------------------------


def test_a_signalled_candidate_stops_counting_as_learned() -> None:
    _, b, _ = host_setup()
    for index in range(MAX_PEER_REFLEXIVE_CANDIDATES):
        source: tuple[str, int] = ("203.0.113.9", 21000 + index)
        assert b.handle_stun(_check_to_b(bytes([0x40, index]) * 6), source, B_HOST, 0.0)
        b.add_remote_candidate(Candidate.host(source), 0.0)  # the peer signals it after all
    assert b.handle_stun(_check_to_b(b"\x41" * 12), ("203.0.113.9", 22000), B_HOST, 0.0)
    assert ("203.0.113.9", 22000) in {c.address for c in b.remote_candidates}
    assert b.drops[DropReason.TOO_MANY_CANDIDATES] == 0


def test_a_signalled_candidate_that_was_synthesized_outlives_the_synthesis_sources() -> None:
    a, _ = make_pair()
    a.add_local_candidate(Candidate.host(A_HOST), A_HOST, 0.0)
    host = Candidate.host(("10.0.0.2", 2000))
    srflx = Candidate.server_reflexive(("203.0.113.9", 5000), host.address)
    a.add_remote_candidate(host, 0.0)
    a.add_remote_candidate(srflx, 0.0)
    signalled = Candidate.server_reflexive(("203.0.113.9", 2000), host.address)
    a.add_remote_candidate(signalled, 0.0)
    a.invalidate_remote_candidate(host, 0.1)
    assert signalled in a.remote_candidates


def test_optimistic_candidates_are_srflx_ip_times_host_port_ranked_just_below_the_srflx() -> None:
    """Firezone's optimistic candidates (docs/protocol.md §4.3): IPv4 only, host × srflx, one local preference below
    the srflx candidate, the host as related address; an address already known is skipped, not the rest."""
    a, _ = make_pair()
    a.add_local_candidate(Candidate.host(A_HOST), A_HOST, 0.0)
    known = Candidate.host(("203.0.113.9", 2000))  # already the optimistic address of the first host below
    hosts = [known, Candidate.host(("10.0.0.2", 2000)), Candidate.host(("10.0.0.3", 7000))]
    for candidate in [*hosts, Candidate.host(("fd00::2", 2000)), Candidate.relayed(("198.51.100.7", 9), B_HOST)]:
        a.add_remote_candidate(candidate, 0.0)
    srflx = Candidate.server_reflexive(("203.0.113.9", 5000), ("10.0.0.2", 2000), local_preference=300)
    a.add_remote_candidate(srflx, 0.0)
    a.add_remote_candidate(Candidate.server_reflexive(("fd00::9", 5000), ("fd00::2", 2000)), 0.0)  # IPv6: none
    synthesized = {c.address: c for c in a.remote_candidates if c not in hosts and c.address[0] == "203.0.113.9"}
    synthesized.pop(srflx.address)
    assert set(synthesized) == {("203.0.113.9", 7000)}
    assert [c.address for c in a.remote_candidates if c.address[0] == "fd00::9"] == [("fd00::9", 5000)]
    optimistic = synthesized[("203.0.113.9", 7000)]
    assert optimistic == Candidate(
        foundation=compute_foundation(CandidateKind.SERVER_REFLEXIVE, "10.0.0.3", "optimistic"),
        component=1,
        transport="udp",
        priority=compute_priority(CandidateKind.SERVER_REFLEXIVE, 299),
        address=("203.0.113.9", 7000),
        kind=CandidateKind.SERVER_REFLEXIVE,
        related=("10.0.0.3", 7000),
    )
    assert a.has_pair(A_HOST, optimistic.address)
    late_host = Candidate.host(("10.0.0.4", 8000))  # a host signalled after the srflx pairs with it too
    a.add_remote_candidate(late_host, 0.0)
    assert ("203.0.113.9", 8000) in {c.address for c in a.remote_candidates}

    b, _ = make_pair()
    b.add_local_candidate(Candidate.host(A_HOST), A_HOST, 0.0)
    b.add_remote_candidate(Candidate.server_reflexive(("203.0.113.9", 5000), B_HOST, local_preference=0), 0.0)
    for index in range(MAX_OPTIMISTIC_CANDIDATES + 3):
        b.add_remote_candidate(Candidate.host(("10.0.0.2", 3000 + index)), 0.0)
    optimistic_b = [c for c in b.remote_candidates if c.address[0] == "203.0.113.9" and c.address[1] != 5000]
    assert len(optimistic_b) == MAX_OPTIMISTIC_CANDIDATES
    assert b.drops[DropReason.TOO_MANY_CANDIDATES] == 3
    assert {c.priority for c in optimistic_b} == {compute_priority(CandidateKind.SERVER_REFLEXIVE, 0)}


def test_when_every_pair_loses_consent_at_once_every_pair_is_checked_again() -> None:
    """The selected pair's consent runs out and takes the agent to Disconnected: every pair goes back to be re-checked
    (docs/architecture.md, ICE), also one whose consent ran out in the same instant."""
    a, b, wire, b_host, b_relay = _direct_and_relay_setup()
    a.handle_timeout(wire.now + 60.0)
    assert a.state is IceState.DISCONNECTED
    assert [e for e in iter(a.poll_event, None) if isinstance(e, IceDisconnected)] == [
        IceDisconnected("consent expired")
    ]
    assert all(p.state in (PairState.WAITING, PairState.IN_PROGRESS) for p in a.pairs)


def test_an_answer_from_the_wrong_address_fails_only_its_pair() -> None:
    """RFC 8445 §7.2.5.2.1: a response whose source is not the check's destination fails that pair; the selected pair
    is kept."""
    a, b, wire, b_host, b_relay = _direct_and_relay_setup()
    check, _ = _answer_next_request(wire, B_RELAY, 400, "unused")
    answer = stun.decode(check.payload).success_response().add_xor_address(stun.Attr.XOR_MAPPED_ADDRESS, A_HOST)
    payload = stun.encode(answer, integrity_key=stun.short_term_key(B_PASSWORD), fingerprint=True)
    assert a.handle_stun(payload, B_HOST, A_HOST, wire.now)
    assert a.drops[DropReason.ASYMMETRIC_RESPONSE] == 1
    assert next(p for p in a.pairs if p.remote.address == B_RELAY).state is PairState.FAILED
    assert a.selected_pair is not None and a.selected_pair[1] == b_host


def test_a_check_due_when_the_agent_turns_idle_is_named_first() -> None:
    """Deadlines that coincide keep the earlier kind's name: the connectivity check, not the idle switch."""
    a, _ = make_pair()
    a.add_local_candidate(Candidate.host(A_HOST), A_HOST, 0.0)
    a.add_remote_candidate(Candidate.host(B_HOST), 20.0)  # no activity since 0.0: idle is due at 20.0 too
    assert a.poll_timeout() == (20.0, "connectivity check")


def test_an_agent_keeps_its_credentials() -> None:
    a = IceAgent(True, "aufr", "a-pw-0123456789012345", "bufr", B_PASSWORD, SeededRng(3))
    assert (a.local_ufrag, a.local_pwd, a.remote_ufrag, a.remote_pwd) == (
        "aufr",
        "a-pw-0123456789012345",
        "bufr",
        B_PASSWORD,
    )


def test_a_candidate_signalled_twice_keeps_its_first_signal() -> None:
    """RFC 8838 §11.4: a trickled candidate the agent already has is a duplicate and is discarded."""
    a, _ = make_pair()
    a.add_local_candidate(Candidate.host(A_HOST), A_HOST, 0.0)
    first = Candidate.host(B_HOST)
    a.add_remote_candidate(first, 0.0)
    a.add_remote_candidate(Candidate.server_reflexive(B_HOST, ("10.9.9.9", 1)), 0.0)
    assert a.remote_candidates == [first]
    assert a.pairs[0].remote == first


def test_learned_candidates_do_not_use_up_the_budget_for_signalled_ones() -> None:
    _, b, _ = host_setup()
    for index in range(MAX_PEER_REFLEXIVE_CANDIDATES):
        assert b.handle_stun(_check_to_b(bytes([0x50, index]) * 6), ("203.0.113.9", 23000 + index), B_HOST, 0.0)
    for index in range(MAX_REMOTE_CANDIDATES - 1):  # one (A_HOST) is signalled already
        b.add_remote_candidate(Candidate.host((f"10.5.{index // 200}.{index % 200 + 1}", 7000)), 0.0)
    assert b.drops[DropReason.TOO_MANY_CANDIDATES] == 0
    b.add_remote_candidate(Candidate.host(("10.6.0.1", 7000)), 0.0)
    assert b.drops[DropReason.TOO_MANY_CANDIDATES] == 1
