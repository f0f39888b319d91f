"""The p2p control events of DNS resources (docs/protocol.md §3.4): round trips and what is refused."""

from __future__ import annotations

import json
from ipaddress import IPv4Address, IPv6Address, ip_address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dataplane import p2p_control
from dataplane.dns_nat import IpAddress

PROXY4: list[IpAddress] = [IPv4Address(f"100.96.0.{i}") for i in range(1, 5)]
PROXY6: list[IpAddress] = [IPv6Address(f"fd00:2021:1111:8000::{i}") for i in range(1, 5)]


def body(packet: bytes) -> bytes:
    message = p2p_control.parse(packet)
    assert message is not None
    return message.body


@given(
    resource=st.uuids().map(str),
    domain=st.from_regex(r"[a-z0-9]{1,63}(\.[a-z0-9]{1,63}){0,2}", fullmatch=True),
    eight=st.booleans(),
)
def test_assigned_ips_round_trips(resource: str, domain: str, eight: bool) -> None:
    proxies = PROXY4 + PROXY6 if eight else PROXY4
    packet = p2p_control.assigned_ips(resource, domain, proxies)
    assert len(packet) <= p2p_control.MAX_PACKET_SIZE
    assert p2p_control.parse(packet) == p2p_control.ControlMessage(p2p_control.ASSIGNED_IPS_EVENT, body(packet))
    assert p2p_control.parse_assigned_ips(body(packet)) == p2p_control.AssignedIps(resource, domain, tuple(proxies))


def test_the_longest_assigned_ips_fits_one_packet() -> None:
    domain = ".".join(["a" * 63] * 3 + ["b" * 61])
    packet = p2p_control.assigned_ips("0" * 36, domain, PROXY4 + PROXY6)
    assert len(packet) <= p2p_control.MAX_PACKET_SIZE


@pytest.mark.parametrize("count", [0, 1, 3, 5, 7, 9])
def test_only_4_or_8_proxy_ips(count: int) -> None:
    with pytest.raises(ValueError):
        p2p_control.assigned_ips("r", "a.example", (PROXY4 + PROXY6 + PROXY4)[:count])
    raw = json.dumps({"resource": "r", "domain": "a.example", "proxy_ips": ["100.96.0.1"] * count}).encode()
    assert p2p_control.parse_assigned_ips(raw) is None


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"not json",
        b"[]",
        b'{"resource": "r", "domain": "a"}',
        b'{"resource": 1, "domain": "a", "proxy_ips": ["100.96.0.1","100.96.0.2","100.96.0.3","100.96.0.4"]}',
        b'{"resource": "r", "domain": "a", "proxy_ips": ["100.96.0.1","100.96.0.2","100.96.0.3","x"]}',
        b'{"resource": "r", "domain": "a", "proxy_ips": [1,2,3,4]}',
        b'{"resource": "r", "domain": "", "proxy_ips": ["100.96.0.1","100.96.0.2","100.96.0.3","100.96.0.4"]}',
        b"[" * 100_000,
    ],
)
def test_malformed_assigned_ips_are_refused(raw: bytes) -> None:
    assert p2p_control.parse_assigned_ips(raw) is None


def test_domain_status_round_trips_and_unknown_status_is_inactive() -> None:
    for active in (True, False):
        packet = p2p_control.domain_status("r1", "a.example", active)
        assert body(packet).startswith(b"{")
        assert p2p_control.parse(packet).event == p2p_control.DOMAIN_STATUS_EVENT  # type: ignore[union-attr]
        assert p2p_control.parse_domain_status(body(packet)) == p2p_control.DomainStatus("r1", "a.example", active)
    future = json.dumps({"resource": "r1", "domain": "a.example", "status": "Degraded"}).encode()
    assert p2p_control.parse_domain_status(future) == p2p_control.DomainStatus("r1", "a.example", False)
    assert p2p_control.parse_domain_status(b"{}") is None
    assert json.loads(body(p2p_control.domain_status("r1", "a", True)))["status"] == "Active"


def test_goodbye_has_an_empty_body_and_oversized_messages_are_refused() -> None:
    assert p2p_control.parse(p2p_control.goodbye()) == p2p_control.ControlMessage(p2p_control.GOODBYE_EVENT, b"")
    with pytest.raises(p2p_control.ControlMessageTooLarge):
        p2p_control.build(p2p_control.ASSIGNED_IPS_EVENT, b"x" * 1233)
    assert len(p2p_control.build(p2p_control.ASSIGNED_IPS_EVENT, b"x" * 1232)) == 1280
    assert ip_address("100.96.0.1") in PROXY4
