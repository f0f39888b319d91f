"""Spec checks of ICE candidates that the mutation run showed were unpinned (``make mutate``, issue 11).

RFC 8445 §5.1.2.1 priority ranges, §5.1.1.3 foundations (the STUN/TURN server takes part), RFC 8839 §5.1 candidate
grammar (port and priority digit counts, extension attributes are opaque ``name value`` pairs), and that every parse
error says what was wrong with which field (the reason ends up in the drop log).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

import pytest

from dataplane.ice.candidate import (
    Candidate,
    CandidateKind,
    CandidateParseError,
    compute_foundation,
    compute_priority,
)

BASE = ("10.0.0.1", 40000)
PUBLIC = ("198.51.100.7", 50000)
PREFIX = "candidate:1 1 udp 2130706431 10.0.0.1"


def _host_line(port: str = "4000", extras: str = "") -> str:
    return f"{PREFIX} {port} typ host {extras}".rstrip()


def _parse_error(text: object) -> str:
    with pytest.raises(CandidateParseError) as info:
        Candidate.from_sdp(text)  # type: ignore[arg-type]
    return str(info.value)


# ---- RFC 8445 §5.1.2.1 priority --------------------------------------------------------------------------------


def test_priority_accepts_the_whole_local_preference_and_component_ranges() -> None:
    assert compute_priority(CandidateKind.RELAYED, 0, 1) == 255
    assert compute_priority(CandidateKind.HOST, 0, 256) == 126 << 24
    assert compute_priority(CandidateKind.HOST, 65535, 256) == (126 << 24) + (65535 << 8)


@pytest.mark.parametrize(("local_preference", "component"), [(-1, 1), (65536, 1), (0, 0), (0, 257)])
def test_priority_rejects_out_of_range_inputs_and_names_the_field(local_preference: int, component: int) -> None:
    with pytest.raises(ValueError) as info:
        compute_priority(CandidateKind.HOST, local_preference, component)
    field = "local preference" if component == 1 else "component"
    assert str(info.value).startswith(field)


@pytest.mark.parametrize("factory", [Candidate.server_reflexive, Candidate.relayed])
def test_derived_candidates_honour_an_explicit_local_preference(factory: Callable[..., Candidate]) -> None:
    candidate = factory(PUBLIC, BASE, local_preference=7)
    assert candidate.priority & 0x00FFFF00 == 7 << 8


# ---- RFC 8445 §5.1.1.3 foundation: same type, base, server and transport <=> same foundation ------------------


@pytest.mark.parametrize("factory", [Candidate.server_reflexive, Candidate.relayed])
def test_derived_candidates_from_different_servers_get_different_foundations(factory: Callable[..., Candidate]) -> None:
    first = factory(PUBLIC, BASE, server_ip="192.0.2.1")
    second = factory(PUBLIC, BASE, server_ip="192.0.2.2")
    same = factory(("198.51.100.8", 1), ("10.0.0.1", 2), server_ip="192.0.2.1")
    assert first.foundation != second.foundation
    assert first.foundation == same.foundation


def test_foundation_of_a_derived_candidate_uses_its_server() -> None:
    srflx = Candidate.server_reflexive(PUBLIC, BASE, server_ip="192.0.2.1")
    assert srflx.foundation == compute_foundation(CandidateKind.SERVER_REFLEXIVE, "10.0.0.1", "192.0.2.1")
    assert srflx.foundation != compute_foundation(CandidateKind.SERVER_REFLEXIVE, "10.0.0.1")


# ---- constructed candidates are well-formed SDP ---------------------------------------------------------------


# Built inside the test (not at collection), so the mutation run sees the constructors called by this test.
CONSTRUCTIONS: dict[str, Callable[[], Candidate]] = {
    "host4": lambda: Candidate.host(BASE),
    "host6": lambda: Candidate.host(("2001:db8::1", 5)),
    "srflx": lambda: Candidate.server_reflexive(PUBLIC, BASE),
    "prflx": lambda: Candidate.peer_reflexive(PUBLIC, BASE),
    "prflx-signalled": lambda: Candidate.peer_reflexive(PUBLIC, BASE, priority=12345),
    "relay": lambda: Candidate.relayed(PUBLIC, BASE, server_ip="192.0.2.1"),
}


@pytest.mark.parametrize("construction", sorted(CONSTRUCTIONS))
def test_constructed_candidates_survive_an_sdp_round_trip(construction: str) -> None:
    candidate = CONSTRUCTIONS[construction]()
    assert candidate.component == 1
    assert candidate.transport == "udp"
    assert isinstance(candidate.foundation, str) and candidate.foundation.isdigit()
    assert Candidate.from_sdp(candidate.to_sdp()) == candidate


def test_peer_reflexive_with_a_signalled_priority_keeps_everything_else() -> None:
    plain = Candidate.peer_reflexive(PUBLIC, BASE)
    signalled = Candidate.peer_reflexive(PUBLIC, BASE, priority=99)
    assert signalled.priority == 99
    assert (signalled.foundation, signalled.component, signalled.transport) == (
        plain.foundation,
        plain.component,
        plain.transport,
    )
    assert (signalled.address, signalled.kind, signalled.related) == (plain.address, plain.kind, plain.related)


# ---- RFC 8839 grammar limits ----------------------------------------------------------------------------------


def test_port_65535_is_a_port() -> None:
    assert Candidate.from_sdp(_host_line("65535")).address == ("10.0.0.1", 65535)
    assert Candidate.from_sdp(_host_line(extras="raddr 0.0.0.0 rport 65535")).related == ("0.0.0.0", 65535)


@pytest.mark.parametrize("port", ["000080", "0000080", "abc", "8a", "-1", "+80", "\u0668\u0660", "65536", "0"])
def test_malformed_ports_are_parse_errors(port: str) -> None:
    message = _parse_error(_host_line(port))
    assert message.startswith(("not a port", "port out of range"))
    assert repr(port) in message


def test_port_messages_say_which_problem() -> None:
    assert _parse_error(_host_line("12x")).startswith("not a port")
    assert _parse_error(_host_line("99999")).startswith("port out of range")


def test_priority_has_at_most_ten_digits() -> None:
    assert Candidate.from_sdp("candidate:1 1 udp 0000000001 10.0.0.1 1 typ host").priority == 1
    message = _parse_error("candidate:1 1 udp 00000000001 10.0.0.1 1 typ host")
    assert message.startswith("priority is not a number")
    message = _parse_error("candidate:1 1 udp 4294967296 10.0.0.1 1 typ host")
    assert message.startswith("priority out of range")


@pytest.mark.parametrize(
    ("component", "reason"),
    [("257", "component out of range"), ("x", "component is not a number"), ("0", "component must be >= 1")],
)
def test_component_must_be_1_to_256(component: str, reason: str) -> None:
    assert Candidate.from_sdp("candidate:1 256 udp 1 10.0.0.1 1 typ host").component == 256
    assert _parse_error(f"candidate:1 {component} udp 1 10.0.0.1 1 typ host").startswith(reason)


def test_foundation_is_1_to_32_ice_chars() -> None:
    assert Candidate.from_sdp(f"candidate:{'a' * 32} 1 udp 1 10.0.0.1 1 typ host").foundation == "a" * 32
    assert _parse_error(f"candidate:{'a' * 33} 1 udp 1 10.0.0.1 1 typ host").startswith("bad foundation")
    assert "'a-b'" in _parse_error("candidate:a-b 1 udp 1 10.0.0.1 1 typ host")


# ---- extension attributes are opaque name/value pairs --------------------------------------------------------


def test_an_extension_value_that_looks_like_a_keyword_is_just_a_value() -> None:
    parsed = Candidate.from_sdp(_host_line(extras="ufrag rport generation 0"))
    assert parsed.related is None
    parsed = Candidate.from_sdp(_host_line(extras="ufrag raddr raddr 10.0.0.9 rport 7"))
    assert parsed.related == ("10.0.0.9", 7)


@pytest.mark.parametrize(
    ("extras", "key"),
    [
        ("raddr", "raddr"),
        ("rport", "rport"),
        ("generation 0 raddr", "raddr"),
        ("generation 0 rport", "rport"),
        ("raddr 10.0.0.2 rport 5 generation 0 rport", "rport"),
    ],
)
def test_a_trailing_raddr_or_rport_without_its_value_is_an_error(extras: str, key: str) -> None:
    assert _parse_error(_host_line(extras=extras)) == f"{key} without a value"


def test_a_trailing_unknown_key_without_a_value_is_ignored() -> None:
    assert Candidate.from_sdp(_host_line(extras="generation 0 network-cost")).related is None
    assert Candidate.from_sdp(_host_line(extras="raddr 10.0.0.2 rport 5 foo")).related == ("10.0.0.2", 5)


@pytest.mark.parametrize("extras", ["raddr 10.0.0.2", "rport 5"])
def test_raddr_and_rport_come_together(extras: str) -> None:
    assert _parse_error(_host_line(extras=extras)) == "raddr and rport must come together"


# ---- every rejection says why -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (42, "candidate must be a string"),
        ("a=cand:1 1 udp 1 10.0.0.1 1 typ host", "missing 'candidate:' prefix"),
        ("candidate:1 1 udp 1 10.0.0.1 1 typ", "expected at least 8 fields, got 7"),
        ("candidate:1 1 tcp 1 10.0.0.1 1 typ host", "unsupported transport: 'tcp'"),
        ("candidate:1 1 udp 1 10.0.0.1 1 type host", "expected 'typ', got 'type'"),
        ("candidate:1 1 udp 1 10.0.0.1 1 typ stun", "unknown candidate type: 'stun'"),
        ("candidate:1 1 udp 1 not-an-ip 1 typ host", "not an IP address: 'not-an-ip'"),
        ("candidate:1 1 udp 1 fe80::1%eth0 1 typ host", "scoped IPv6 addresses are not usable candidates"),
    ],
)
def test_rejections_carry_their_reason(text: object, reason: str) -> None:
    assert _parse_error(text) == reason


# ---- addresses: the canonical-IPv4 fast path agrees with ipaddress ------------------------------------------------

ADDRESS_TEXTS = [
    "0.0.0.0",
    "1.2.3.4",
    "9.99.199.255",
    "255.255.255.255",
    "256.1.1.1",  # out of range
    "1.2.3.256",
    "1.2.3.999",
    "01.2.3.4",  # leading zero: ipaddress refuses
    "1.2.3.04",
    "00.1.2.3",
    "1.2.3",  # too few parts
    "1.2.3.4.5",  # too many
    "1..2.3",
    "1.2.3.",
    ".1.2.3",
    "1.2.3.1234",
    "1.2.3.+4",
    "1.2.3.-4",
    "\u0661.2.3.4",  # an Arabic-Indic digit: isdigit() but not ASCII
    "1.2.3.\u00b2",  # a superscript two: isdigit() but not a decimal
    "::1",
    "2001:db8::1",
    "2001:DB8::0001",  # not canonical: normalized by the parse
    "fe80::1%eth0",  # scoped: refused
    "",
]


@pytest.mark.parametrize("text", ADDRESS_TEXTS)
def test_a_candidate_address_is_what_ipaddress_makes_of_it_or_refused(text: str) -> None:
    line = f"candidate:1 1 udp 2130706431 {text} 4000 typ host"
    try:
        expected = str(ipaddress.ip_address(text))
    except ValueError:
        expected = None
    if expected is None or "%" in expected:
        with pytest.raises(CandidateParseError):
            Candidate.from_sdp(line)
    else:
        assert Candidate.from_sdp(line).address == (expected, 4000)
