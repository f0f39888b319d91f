from __future__ import annotations

import pytest

from dataplane.ice.candidate import (
    Candidate,
    CandidateKind,
    CandidateParseError,
    compute_foundation,
    compute_priority,
)

SPEC_EXAMPLE = "candidate:7854631899965427361 1 udp 1694498559 172.28.0.100 47717 typ srflx"


def test_spec_example_round_trips() -> None:
    candidate = Candidate.from_sdp(SPEC_EXAMPLE)
    assert candidate.foundation == "7854631899965427361"
    assert candidate.component == 1
    assert candidate.transport == "udp"
    assert candidate.priority == 1694498559
    assert candidate.address == ("172.28.0.100", 47717)
    assert candidate.kind is CandidateKind.SERVER_REFLEXIVE
    assert candidate.related is None
    assert candidate.to_sdp() == SPEC_EXAMPLE


def test_spec_example_priority_is_an_ipv4_srflx_priority() -> None:
    assert compute_priority(CandidateKind.SERVER_REFLEXIVE, 65534) == 1694498559
    assert Candidate.server_reflexive(("172.28.0.100", 47717), ("10.0.0.1", 1)).priority == 1694498559
    assert Candidate.host(("2001:db8::1", 1)).priority > Candidate.host(("10.0.0.1", 1)).priority


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        (CandidateKind.HOST, (126 << 24) + (65535 << 8) + 255),
        (CandidateKind.PEER_REFLEXIVE, (110 << 24) + (65535 << 8) + 255),
        (CandidateKind.SERVER_REFLEXIVE, (100 << 24) + (65535 << 8) + 255),
        (CandidateKind.RELAYED, (65535 << 8) + 255),
    ],
)
def test_type_preferences_follow_rfc_8445(kind: CandidateKind, expected: int) -> None:
    assert compute_priority(kind) == expected


def test_priority_orders_types_and_local_preference() -> None:
    host = compute_priority(CandidateKind.HOST, 10)
    prflx = compute_priority(CandidateKind.PEER_REFLEXIVE, 65535)
    srflx = compute_priority(CandidateKind.SERVER_REFLEXIVE, 65535)
    relay = compute_priority(CandidateKind.RELAYED, 65535)
    assert host > prflx > srflx > relay
    assert compute_priority(CandidateKind.HOST, 2) > compute_priority(CandidateKind.HOST, 1)
    assert compute_priority(CandidateKind.HOST, 1, component=1) == compute_priority(CandidateKind.HOST, 1, 2) + 1


@pytest.mark.parametrize(
    "bad", [(CandidateKind.HOST, -1, 1), (CandidateKind.HOST, 65536, 1), (CandidateKind.HOST, 1, 0)]
)
def test_priority_rejects_out_of_range_inputs(bad: tuple[CandidateKind, int, int]) -> None:
    with pytest.raises(ValueError):
        compute_priority(*bad)


def test_foundation_equal_iff_type_base_server_transport_equal() -> None:
    a = compute_foundation(CandidateKind.SERVER_REFLEXIVE, "10.0.0.1", "198.51.100.1")
    assert a == compute_foundation(CandidateKind.SERVER_REFLEXIVE, "10.0.0.1", "198.51.100.1")
    assert a != compute_foundation(CandidateKind.SERVER_REFLEXIVE, "10.0.0.2", "198.51.100.1")
    assert a != compute_foundation(CandidateKind.SERVER_REFLEXIVE, "10.0.0.1", "198.51.100.2")
    assert a != compute_foundation(CandidateKind.RELAYED, "10.0.0.1", "198.51.100.1")
    assert a.isdigit() and int(a) < 2**64


def test_relay_candidate_with_related_address_round_trips() -> None:
    relay = Candidate.relayed(("198.51.100.7", 50123), ("10.0.0.1", 52625), server_ip="198.51.100.7")
    text = relay.to_sdp()
    assert text.endswith(" typ relay raddr 10.0.0.1 rport 52625")
    assert Candidate.from_sdp(text) == relay


def test_ipv6_candidates_are_normalized() -> None:
    parsed = Candidate.from_sdp("candidate:1 1 UDP 2130706431 2001:DB8:0:0::1 52625 typ host")
    assert parsed.address == ("2001:db8::1", 52625)
    assert parsed.transport == "udp"
    assert Candidate.from_sdp(parsed.to_sdp()) == parsed
    host = Candidate.host(("2001:db8::0:5", 1))
    assert host.address == ("2001:db8::5", 1)


def test_a_prefix_extra_pairs_and_whitespace_are_tolerated() -> None:
    text = "a=candidate:abc+/ 1 udp 100 10.1.2.3 9 typ prflx raddr 0.0.0.0 rport 0 generation 0 network-id 1\r\n"
    parsed = Candidate.from_sdp(text)
    assert parsed.kind is CandidateKind.PEER_REFLEXIVE
    assert parsed.related == ("0.0.0.0", 0)
    assert parsed.foundation == "abc+/"


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "candidate:",
        "1 1 udp 1 10.0.0.1 1 typ host",
        "candidate:1 1 tcp 1 10.0.0.1 1 typ host",
        "candidate:1 0 udp 1 10.0.0.1 1 typ host",
        "candidate:1 1 udp -1 10.0.0.1 1 typ host",
        "candidate:1 1 udp 4294967296 10.0.0.1 1 typ host",
        "candidate:1 1 udp 1 10.0.0.256 1 typ host",
        "candidate:1 1 udp 1 example.local 1 typ host",
        "candidate:1 1 udp 1 fe80::1%eth0 1 typ host",
        "candidate:1 1 udp 1 ::1 1 typ srflx raddr fe80::1%eth0 rport 1",
        "candidate:1 1 udp 1 10.0.0.1 0 typ host",
        "candidate:1 1 udp 1 10.0.0.1 65536 typ host",
        "candidate:1 1 udp 1 10.0.0.1 1 type host",
        "candidate:1 1 udp 1 10.0.0.1 1 typ nat",
        "candidate:1 1 udp 1 10.0.0.1 1 typ srflx raddr 10.0.0.2",
        "candidate:1 1 udp 1 10.0.0.1 1 typ srflx rport 5",
        "candidate:1 1 udp 1 10.0.0.1 1 typ srflx raddr x rport 5",
        "candidate:bad! 1 udp 1 10.0.0.1 1 typ host",
        "candidate:" + "1" * 33 + " 1 udp 1 10.0.0.1 1 typ host",
        "candidate:1 1 udp ١ 10.0.0.1 1 typ host",
    ],
)
def test_malformed_candidates_raise_parse_error(bad: str) -> None:
    with pytest.raises(CandidateParseError):
        Candidate.from_sdp(bad)


def test_derived_candidates_carry_base_as_related_address() -> None:
    srflx = Candidate.server_reflexive(("203.0.113.1", 40000), ("10.0.0.1", 52625))
    assert srflx.related == ("10.0.0.1", 52625)
    assert srflx.priority == compute_priority(CandidateKind.SERVER_REFLEXIVE, 65534)
    prflx = Candidate.peer_reflexive(("203.0.113.1", 40001), ("10.0.0.1", 52625), priority=7)
    assert prflx.priority == 7 and prflx.kind is CandidateKind.PEER_REFLEXIVE
