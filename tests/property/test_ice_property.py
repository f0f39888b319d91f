"""Hypothesis: nothing a peer sends makes the ICE agent raise."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from dataplane import stun
from dataplane.ice import Candidate, IceAgent
from dataplane.io.rng import SeededRng

LOCAL = ("10.0.0.2", 2000)
REMOTE = ("10.0.0.1", 1000)


def _agent(controlling: bool) -> IceAgent:
    agent = IceAgent(controlling, "bufr", "b-password-0123456789b", "aufr", "a-password-0123456789a", SeededRng(3))
    agent.add_local_candidate(Candidate.host(LOCAL), LOCAL, 0.0)
    agent.add_remote_candidate(Candidate.host(REMOTE), 0.0)
    agent.handle_timeout(0.0)
    return agent


def _valid_check() -> bytes:
    request = stun.StunMessage.request(stun.Method.BINDING, b"\x07" * 12)
    request.add_username("bufr:aufr").add_priority(7).add_ice_controlling(9).add_use_candidate()
    return stun.encode(request, integrity_key=stun.short_term_key("b-password-0123456789b"))


def _drain(agent: IceAgent) -> None:
    while agent.poll_transmit() is not None:
        pass
    while agent.poll_event() is not None:
        pass


@given(st.binary(max_size=300), st.booleans())
def test_arbitrary_bytes_never_raise(data: bytes, controlling: bool) -> None:
    agent = _agent(controlling)
    agent.handle_stun(data, REMOTE, LOCAL, 0.1)
    agent.handle_timeout(0.2)
    _drain(agent)


@settings(max_examples=300)
@given(st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), min_size=1, max_size=6), st.booleans())
def test_mutated_checks_and_responses_never_raise(mutations: list[tuple[int, int]], controlling: bool) -> None:
    agent = _agent(controlling)
    outgoing = agent.poll_transmit()
    assert outgoing is not None
    # A plausible response to our own check (right transaction id), and a plausible request; then corrupt both.
    request = stun.decode(outgoing.payload)
    response = request.success_response().add_xor_address(stun.Attr.XOR_MAPPED_ADDRESS, LOCAL)
    response_bytes = stun.encode(response, integrity_key=stun.short_term_key("a-password-0123456789a"))
    for original in (response_bytes, _valid_check()):
        data = bytearray(original)
        for position, value in mutations:
            data[position % len(data)] = value
        agent.handle_stun(bytes(data), REMOTE, LOCAL, 0.1)
        agent.handle_stun(bytes(data[: len(data) // 2]), REMOTE, LOCAL, 0.1)
    agent.handle_timeout(0.3)
    _drain(agent)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    loss=st.floats(0.0, 0.9),
    outage=st.floats(0.0, 8.0),
    a_controlling=st.booleans(),
    b_controlling=st.booleans(),
    nat=st.booleans(),
)
def test_agents_connect_once_the_loss_stops(
    seed: int, loss: float, outage: float, a_controlling: bool, b_controlling: bool, nat: bool
) -> None:
    import random

    from tests.unit.test_ice_agent import A_HOST, A_PUBLIC, B_HOST, Wire, make_pair

    a, b = make_pair(a_controlling=a_controlling, b_controlling=b_controlling, seed=seed % 1000)
    wire = Wire(a, b)
    wire.own("a", A_HOST)
    wire.own("b", B_HOST)
    if nat:
        wire.nat[A_HOST] = A_PUBLIC
    a.add_local_candidate(Candidate.host(A_HOST), A_HOST, 0.0)
    b.add_local_candidate(Candidate.host(B_HOST), B_HOST, 0.0)
    a.add_remote_candidate(Candidate.host(B_HOST), 0.0)
    if not nat:
        b.add_remote_candidate(Candidate.host(A_HOST), 0.0)
    chance = random.Random(seed)
    wire.drop = lambda sender, transmit: wire.now < outage and chance.random() < loss
    wire.run(outage + 20.0)
    assert a.controlling != b.controlling
    a_selected, b_selected = a.selected_pair, b.selected_pair
    assert a_selected is not None and b_selected is not None
    assert a_selected[0].address == A_HOST and a_selected[1].address == B_HOST
    assert b_selected[0].address == B_HOST and b_selected[1].address == (A_PUBLIC if nat else A_HOST)
