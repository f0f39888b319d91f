"""Hypothesis: the candidate parser raises only CandidateParseError, and valid candidates round-trip."""

from __future__ import annotations

import ipaddress

from hypothesis import given
from hypothesis import strategies as st

from dataplane.ice.candidate import Candidate, CandidateKind, CandidateParseError

_tokens = st.one_of(
    st.sampled_from(
        [
            "candidate:1",
            "a=candidate:x",
            "1",
            "udp",
            "UDP",
            "typ",
            "host",
            "srflx",
            "relay",
            "prflx",
            "raddr",
            "rport",
            "generation",
            "0",
            "65535",
            "65536",
            "4294967295",
            "::1",
            "10.0.0.1",
            "fe80::1%eth0",
            "",
            "-1",
            "١",
        ]
    ),
    st.text(max_size=12),
)


def _parse_or_error(text: str) -> Candidate | None:
    try:
        return Candidate.from_sdp(text)
    except CandidateParseError:
        return None


@given(st.text(max_size=200))
def test_arbitrary_text_raises_only_parse_error(text: str) -> None:
    _parse_or_error(text)


@given(st.lists(_tokens, max_size=14))
def test_token_soup_raises_only_parse_error(tokens: list[str]) -> None:
    parsed = _parse_or_error(" ".join(tokens))
    if parsed is not None:
        assert Candidate.from_sdp(parsed.to_sdp()) == parsed


_ips = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
)
_ports = st.integers(1, 65535)


@st.composite
def candidates(draw: st.DrawFn) -> Candidate:
    kind = draw(st.sampled_from(list(CandidateKind)))
    related = None
    if kind is not CandidateKind.HOST and draw(st.booleans()):
        related = (draw(_ips), draw(st.integers(0, 65535)))
    return Candidate(
        foundation=draw(
            st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+/", min_size=1, max_size=32)
        ),
        component=draw(st.integers(1, 256)),
        transport="udp",
        priority=draw(st.integers(0, 2**32 - 1)),
        address=(draw(_ips), draw(_ports)),
        kind=kind,
        related=related,
    )


@given(candidates(), st.booleans(), st.sampled_from(["", " generation 0", " network-id 3 network-cost 10"]))
def test_round_trip(candidate: Candidate, a_prefix: bool, extras: str) -> None:
    text = ("a=" if a_prefix else "") + candidate.to_sdp() + extras
    parsed = Candidate.from_sdp(text)
    assert parsed == candidate
    assert str(ipaddress.ip_address(parsed.address[0])) == parsed.address[0]
