"""Spec checks of the sans-IO ICE agent that mutation testing showed missing (issue 11).

RFC 8445 (pair states, triggered checks, role conflicts), RFC 7675 consent, the agent's deadlines and the controlling
side's dead-path probing (docs/architecture.md, ICE), all with a fake clock through the agent's public API.
"""

from __future__ import annotations

from dataplane import stun
from dataplane.ice import (
    AgentDirectory,
    Candidate,
    IceAgent,
)
from dataplane.io.rng import SeededRng
from tests.unit.test_ice_agent import (
    A_HOST,
    B_HOST,
    Wire,
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
